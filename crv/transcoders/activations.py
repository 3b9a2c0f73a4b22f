"""MLP activations of the subject model as a stream of shuffled training batches.

Pipeline: token sequences (the traces' train split by default, or any text dataset) ->
batched forward passes of the subject model with forward hooks on every selected layer's
MLP (through the architecture adapter) -> per-token (MLP in, MLP out) pairs of all layers
at once, [L, N, D] each -> a shuffle buffer -> batches of `batch_tokens` tokens.

Every layer sees the same tokens in the same batch, so all transcoders train in one pass
over the activations. Tokens of one sequence are strongly correlated; the shuffle buffer
(a few hundred thousand tokens) mixes many sequences into each batch. Position 0 (BOS) is
dropped: its MLP activations are outliers that would dominate the variance, and neither
splicing nor attribution graphs use transcoders there.

Memory is fixed by `buffer_mb`, never by the model or the token budget: the buffer is one
preallocated [L, tokens, D] pair (`ShuffleBuffer`), float32 when `shuffle_buffer_tokens`
fit that way (crv-tiny), bfloat16 otherwise, holding fewer tokens when even those do not
fit. When all layers would leave it fewer than `min_shuffle_tokens`, `layer_groups` splits
the layers into groups trained one after another, each in its own pass over the corpus.

Optionally the per-epoch activations are written once as safetensors shards into a cache
keyed by subject, corpus and layers (not by transcoder settings), so a sweep over k,
width or learning rate reruns no model. A cache directory is valid only once its
`complete.json` exists (written last, atomically).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crv.errors import ConfigError
from crv.io import atomic_write, atomic_write_json
from crv.transcoders.config import TranscodersConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # (x_LND, y_LND): MLP in, MLP out of each layer


@dataclass(frozen=True)
class BufferPlan:
    """How the shuffle buffer of one pass is sized."""

    tokens: int
    """Tokens accumulated before half the buffer is emitted as shuffled batches."""
    chunk_tokens: int
    """Most tokens one model batch adds (room kept beyond `tokens`)."""
    dtype: torch.dtype

    def nbytes(self, n_layers: int, d_model: int) -> int:
        """Bytes of the buffer's storage for `n_layers` layers of width `d_model`."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return (self.tokens + self.chunk_tokens) * n_layers * 2 * d_model * itemsize


def _tokens_fitting(cfg: TranscodersConfig, n_layers: int, d_model: int, dtype: torch.dtype) -> int:
    """Buffer tokens (beyond one model batch) that fit `cfg.buffer_mb` for `n_layers`."""
    per_token = n_layers * 2 * d_model * torch.empty((), dtype=dtype).element_size()
    return (cfg.buffer_mb << 20) // per_token - cfg.model_batch_seqs * cfg.max_seq_len


def buffer_plan(cfg: TranscodersConfig, n_layers: int, d_model: int) -> BufferPlan:
    """The buffer of one pass over `n_layers` layers: as many tokens as configured (at
    least two batches) or as fit `buffer_mb`; float32 unless bfloat16 is needed to fit."""
    want = max(cfg.shuffle_buffer_tokens, 2 * cfg.batch_tokens)
    if cfg.buffer_dtype == "auto":
        fits32 = _tokens_fitting(cfg, n_layers, d_model, torch.float32) >= want
        dtype = torch.float32 if fits32 else torch.bfloat16
    else:
        dtype = getattr(torch, cfg.buffer_dtype)
    tokens = min(want, _tokens_fitting(cfg, n_layers, d_model, dtype))
    return BufferPlan(
        max(tokens, 2 * cfg.batch_tokens), cfg.model_batch_seqs * cfg.max_seq_len, dtype
    )


def layer_groups(cfg: TranscodersConfig, layers: Sequence[int], d_model: int) -> list[list[int]]:
    """`layers` split into the fewest near-equal groups whose buffer holds at least
    `min_shuffle_tokens` (or all it is asked to hold) within `buffer_mb`.

    Raises ConfigError when even one layer does not fit.
    """
    floor = min(
        max(cfg.shuffle_buffer_tokens, 2 * cfg.batch_tokens),
        max(cfg.min_shuffle_tokens, 2 * cfg.batch_tokens),
    )
    dtype = torch.float32 if cfg.buffer_dtype == "float32" else torch.bfloat16
    for n_groups in range(1, len(layers) + 1):
        size = -(-len(layers) // n_groups)
        if _tokens_fitting(cfg, size, d_model, dtype) >= floor:
            bounds = [round(i * len(layers) / n_groups) for i in range(n_groups + 1)]
            return [list(layers[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    one_layer_mb = BufferPlan(floor, cfg.model_batch_seqs * cfg.max_seq_len, dtype).nbytes(
        1, d_model
    )
    raise ConfigError(
        f"transcoders.buffer_mb={cfg.buffer_mb} holds less than min_shuffle_tokens="
        f"{floor} tokens of one layer (d_model {d_model}, plus one model batch of "
        f"model_batch_seqs x max_seq_len tokens): needs {-(-one_layer_mb >> 20)} MiB"
    )


class ShuffleBuffer:
    """A preallocated [L, capacity, D] pair of MLP in / out rows, shuffled by index.

    Rows never move: `order` lists the occupied slots in arrival order, a flush permutes
    it, gathers the first half as batches and frees their slots for the next chunks. The
    batches equal those of concatenating the chunks and permuting the rows (`peak_bytes`:
    storage plus the largest batch gathered, what the stream holds at most besides one
    incoming chunk).
    """

    def __init__(self, plan: BufferPlan, batch_tokens: int, generator: torch.Generator) -> None:
        self.plan, self.batch_tokens, self.generator = plan, batch_tokens, generator
        self.x_LCD: torch.Tensor | None = None
        self.y_LCD: torch.Tensor | None = None
        self.order = torch.zeros(0, dtype=torch.long)
        self.free = torch.zeros(0, dtype=torch.long)
        self.peak_bytes = 0

    @property
    def held(self) -> int:
        return len(self.order)

    @property
    def nbytes(self) -> int:
        return 0 if self.x_LCD is None else 2 * self.x_LCD.nbytes

    def add(self, x_LND: torch.Tensor, y_LND: torch.Tensor) -> None:
        """Store a chunk's rows in free slots (allocating the storage on the first chunk)."""
        if self.x_LCD is None:
            L, _, D = x_LND.shape
            capacity = self.plan.tokens + self.plan.chunk_tokens
            self.x_LCD = torch.empty(L, capacity, D, dtype=self.plan.dtype, device=x_LND.device)
            self.y_LCD = torch.empty_like(self.x_LCD)
            self.free = torch.arange(capacity)
        n = x_LND.shape[1]
        if n > len(self.free):
            raise ValueError(f"a chunk of {n} tokens exceeds the buffer's {len(self.free)} free")
        slots, self.free = self.free[:n], self.free[n:]
        index = slots.to(self.x_LCD.device)
        self.x_LCD[:, index] = x_LND.to(self.plan.dtype)
        self.y_LCD[:, index] = y_LND.to(self.plan.dtype)
        self.order = torch.cat([self.order, slots])

    def _gather(self, slots: torch.Tensor) -> Batch:
        index = slots.to(self.x_LCD.device)
        batch = self.x_LCD[:, index], self.y_LCD[:, index]
        self.peak_bytes = max(self.peak_bytes, self.nbytes + 2 * batch[0].nbytes)
        return batch

    def flush(self) -> Iterator[Batch]:
        """Emit a random half of the held rows (whole batches) and keep the rest."""
        rows = self.order[torch.randperm(self.held, generator=self.generator)]
        n_out = (self.held // 2) // self.batch_tokens * self.batch_tokens
        self.order, out = rows[n_out:], rows[:n_out]
        self.free = torch.cat([self.free, out])
        for start in range(0, n_out, self.batch_tokens):
            yield self._gather(out[start : start + self.batch_tokens])

    def drain(self) -> Iterator[Batch]:
        """Emit every held row in random order (the last batch may be partial)."""
        rows = self.order[torch.randperm(self.held, generator=self.generator)]
        self.order = self.order[:0]
        for start in range(0, len(rows), self.batch_tokens):
            yield self._gather(rows[start : start + self.batch_tokens])


def load_token_sequences(
    cfg: TranscodersConfig, traces_dir: str | Path | None, tokenizer: Any, split: str
) -> list[list[int]]:
    """Token id sequences of the corpus, truncated to `cfg.max_seq_len`.

    `cfg.corpus == "traces"`: the `input_ids` of the traces rows of `split`. Otherwise a
    text dataset (a `save_to_disk` directory, or a name/path for `datasets.load_dataset`
    with `cfg.corpus_split`), tokenised with the subject's tokenizer.
    """
    if cfg.corpus == "traces":
        from crv.traces.store import load_traces

        ds = load_traces(traces_dir)
        seqs = [ids for ids, s in zip(ds["input_ids"], ds["split"], strict=True) if s == split]
    else:
        import datasets

        saved = Path(cfg.corpus)
        if (saved / "state.json").is_file() or (saved / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(cfg.corpus)
        else:
            ds = datasets.load_dataset(cfg.corpus, split=cfg.corpus_split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.corpus_split]
        texts = [t for t in ds[cfg.corpus_text_column] if t]
        seqs = tokenizer(texts, truncation=True, max_length=cfg.max_seq_len)["input_ids"]
    return [list(s[: cfg.max_seq_len]) for s in seqs if len(s) > 1]


def batch_sequences(
    seqs: Sequence[Sequence[int]], batch_seqs: int, generator: torch.Generator | None
) -> Iterator[list[Sequence[int]]]:
    """Batches of sequences in random order (or in order without a generator).

    Within windows of 16 batches sequences are sorted by length to limit padding.
    """
    n = len(seqs)
    order = (
        torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    )
    window = 16 * batch_seqs
    for start in range(0, n, window):
        chunk = sorted(order[start : start + window], key=lambda i: len(seqs[i]))
        batches = [chunk[i : i + batch_seqs] for i in range(0, len(chunk), batch_seqs)]
        if generator is not None:
            batches = [
                batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()
            ]
        for b in batches:
            yield [seqs[i] for i in b]


def pad_batch(
    seqs: Sequence[Sequence[int]], device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, T] (pad id 0) and attention mask [B, T]."""
    T = max(len(s) for s in seqs)
    ids_BT = torch.zeros(len(seqs), T, dtype=torch.long)
    mask_BT = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BT[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask_BT[i, : len(s)] = 1
    return ids_BT.to(device), mask_BT.to(device)


def autocast_for(device: torch.device | str) -> Any:
    """bf16 autocast for model forwards on CUDA; nothing on CPU (bf16 is slower there)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def model_activations(
    model: torch.nn.Module,
    adapter: Any,
    seq_batches: Iterable[Sequence[Sequence[int]]],
    layers: Sequence[int],
    out_device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[Batch]:
    """(MLP in, MLP out) of `layers` for every non-padding token except position 0.

    Yields one (x_LND, y_LND) pair in `dtype` per batch of sequences.
    """
    device = next(model.parameters()).device
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(layer: int) -> Any:
        def hook(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            captured[layer] = (inputs[0], out)

        return hook

    with ExitStack() as stack:
        for layer in layers:
            handle = adapter.mlp(layer).register_forward_hook(hook_for(layer))
            stack.callback(handle.remove)
        for seqs in seq_batches:
            ids_BT, mask_BT = pad_batch(seqs, device)
            with autocast_for(device):
                adapter.run_body(ids_BT, mask_BT)  # no logits: only the hooks' captures
            keep_BT = mask_BT.bool()
            keep_BT[:, 0] = False
            x_LND = torch.stack([captured[layer][0][keep_BT] for layer in layers]).to(dtype)
            y_LND = torch.stack([captured[layer][1][keep_BT] for layer in layers]).to(dtype)
            captured.clear()
            yield x_LND.to(out_device), y_LND.to(out_device)


def shuffled_batches(chunks: Iterable[Batch], buffer: ShuffleBuffer) -> Iterator[Batch]:
    """Re-batch a stream of (x_LND, y_LND) chunks into shuffled batches through `buffer`.

    Chunks accumulate until the buffer holds `plan.tokens`; then a random half of its rows
    is emitted as batches while the rest stays to mix with later chunks. At the end of the
    stream the rest is emitted (last partial batch too).
    """
    for x_LND, y_LND in chunks:
        buffer.add(x_LND, y_LND)
        if buffer.held >= buffer.plan.tokens:
            yield from buffer.flush()
    if buffer.held:
        yield from buffer.drain()


def cache_key(
    subject_dir: str | Path,
    traces_dir: str | Path | None,
    cfg: TranscodersConfig,
    layers: Sequence[int],
) -> str:
    """Hash of what determines the activations (never the transcoder settings)."""
    what = {
        "subject": str(Path(subject_dir).resolve()),
        "traces": str(Path(traces_dir).resolve()) if traces_dir else None,
        "corpus": [cfg.corpus, cfg.corpus_split, cfg.corpus_text_column, cfg.max_seq_len],
        "layers": list(layers),
        "dtype": cfg.cache_dtype,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class ActivationCache:
    """Activations of one corpus epoch as safetensors shards `shard_{i:05d}.safetensors`.

    Each shard holds `x` and `y`, [L, N, D] in the cache dtype; rows are in model order,
    shuffling happens when reading (shard order, then the shuffle buffer).
    """

    COMPLETE = "complete.json"

    def __init__(self, directory: str | Path, dtype: str = "bfloat16") -> None:
        self.dir = Path(directory)
        self.dtype = getattr(torch, dtype)

    @property
    def complete(self) -> bool:
        return (self.dir / self.COMPLETE).exists()

    def write(self, chunks: Iterable[Batch], shard_tokens: int = 65_536) -> int:
        """Write the stream as shards; returns the number of tokens."""
        self.dir.mkdir(parents=True, exist_ok=True)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        n_shards = n_tokens = held = 0

        def flush() -> None:
            nonlocal n_shards, xs, ys, held
            tensors = {
                "x": torch.cat(xs, 1).to(self.dtype).contiguous().cpu(),
                "y": torch.cat(ys, 1).to(self.dtype).contiguous().cpu(),
            }
            atomic_write(
                self.dir / f"shard_{n_shards:05d}.safetensors", lambda p: save_file(tensors, str(p))
            )
            n_shards, xs, ys, held = n_shards + 1, [], [], 0

        for x_LND, y_LND in chunks:
            xs.append(x_LND)
            ys.append(y_LND)
            held += x_LND.shape[1]
            n_tokens += x_LND.shape[1]
            if held >= shard_tokens:
                flush()
        if held:
            flush()
        atomic_write_json(self.dir / self.COMPLETE, {"n_shards": n_shards, "n_tokens": n_tokens})
        return n_tokens

    def read(
        self,
        generator: torch.Generator | None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_tokens: int | None = None,
    ) -> Iterator[Batch]:
        """The shards as chunks in `dtype` of at most `max_tokens` tokens, shards in random
        order when a generator is given."""
        n_shards = json.loads((self.dir / self.COMPLETE).read_text())["n_shards"]
        order = (
            torch.randperm(n_shards, generator=generator).tolist()
            if generator is not None
            else range(n_shards)
        )
        for i in order:
            tensors = load_file(str(self.dir / f"shard_{i:05d}.safetensors"))
            x_LND, y_LND = tensors["x"].to(device, dtype), tensors["y"].to(device, dtype)
            step = max_tokens or x_LND.shape[1]
            for start in range(0, x_LND.shape[1], step):
                yield x_LND[:, start : start + step], y_LND[:, start : start + step]


def cache_factory(
    cfg: TranscodersConfig,
    subject_dir: str | Path,
    traces_dir: str | Path | None,
    root: str | Path,
) -> Callable[[list[int]], ActivationCache | None]:
    """`group -> ActivationCache` under `root` keyed by `cache_key`, or always None when
    `cfg.cache_activations` is off."""

    def cache_for(group: list[int]) -> ActivationCache | None:
        if not cfg.cache_activations:
            return None
        return ActivationCache(
            Path(root) / cache_key(subject_dir, traces_dir, cfg, group), cfg.cache_dtype
        )

    return cache_for


def training_batches(
    cfg: TranscodersConfig,
    model: torch.nn.Module,
    adapter: Any,
    seqs: Sequence[Sequence[int]],
    layers: Sequence[int],
    generator: torch.Generator,
    cache: ActivationCache | None = None,
    device: str | torch.device = "cpu",
    on_tokens: Callable[[int], object] | None = None,
    buffer: ShuffleBuffer | None = None,
) -> Iterator[Batch]:
    """Shuffled (x_LND, y_LND) batches until `cfg.tokens` tokens, repeating the corpus.

    With a cache the model runs once (filling the cache if it is not complete) and later
    epochs read the shards; without one every epoch reruns the model. `on_tokens(n)` is
    called for every chunk of n activations collected (a progress bar that moves from the
    first forward pass, long before the buffer is full). `buffer` defaults to one sized
    by `buffer_plan` for `layers`.
    """
    if buffer is None:
        buffer = ShuffleBuffer(
            buffer_plan(cfg, len(layers), adapter.d_model), cfg.batch_tokens, generator
        )
    dtype, chunk_tokens = buffer.plan.dtype, buffer.plan.chunk_tokens

    def epoch_chunks() -> Iterator[Batch]:
        if cache is not None:
            if not cache.complete:
                cache.write(
                    model_activations(
                        model, adapter, batch_sequences(seqs, cfg.model_batch_seqs, None), layers
                    )
                )
            yield from cache.read(generator, device, dtype, chunk_tokens)
        else:
            seq_batches = batch_sequences(seqs, cfg.model_batch_seqs, generator)
            yield from model_activations(model, adapter, seq_batches, layers, device, dtype)

    def all_epochs() -> Iterator[Batch]:
        while True:
            n_epoch = 0
            for x_LND, y_LND in epoch_chunks():
                n_epoch += x_LND.shape[1]
                if on_tokens is not None:
                    on_tokens(x_LND.shape[1])
                yield x_LND, y_LND
            if n_epoch == 0:
                raise ValueError("the corpus yields no tokens (all sequences shorter than 2)")

    seen = 0
    for x_LND, y_LND in shuffled_batches(all_epochs(), buffer):
        n = min(x_LND.shape[1], cfg.tokens - seen)
        seen += n
        yield x_LND[:, :n], y_LND[:, :n]
        if seen >= cfg.tokens:
            return
