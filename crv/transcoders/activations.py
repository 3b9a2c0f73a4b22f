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

Optionally the per-epoch activations are written once as safetensors shards into a cache
keyed by subject, corpus and layers (not by transcoder settings), so a sweep over k,
width or learning rate reruns no model. A cache directory is valid only once its
`complete.json` exists (written last, atomically).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crv.io import atomic_write, atomic_write_json
from crv.transcoders.config import TranscodersConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # (x_LND, y_LND): MLP in, MLP out of each layer


def load_token_sequences(
    cfg: TranscodersConfig, traces_dir: str | Path | None, tokenizer: Any, split: str
) -> list[list[int]]:
    """Token id sequences of the corpus, truncated to `cfg.max_seq_len`.

    `cfg.corpus == "traces"`: the `input_ids` of the traces rows of `split`. Otherwise a
    text dataset (a `save_to_disk` directory, or a name/path for `datasets.load_dataset`
    with `cfg.corpus_split`), tokenised with the subject's tokenizer.
    """
    if cfg.corpus == "traces":
        from crv.traces.stage import load_traces

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
) -> Iterator[Batch]:
    """(MLP in, MLP out) of `layers` for every non-padding token except position 0.

    Yields one (x_LND, y_LND) float32 pair per batch of sequences.
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
                model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
            keep_BT = mask_BT.bool()
            keep_BT[:, 0] = False
            x_LND = torch.stack([captured[layer][0][keep_BT] for layer in layers]).float()
            y_LND = torch.stack([captured[layer][1][keep_BT] for layer in layers]).float()
            captured.clear()
            yield x_LND.to(out_device), y_LND.to(out_device)


def shuffled_batches(
    chunks: Iterable[Batch], batch_tokens: int, buffer_tokens: int, generator: torch.Generator
) -> Iterator[Batch]:
    """Re-batch a stream of (x_LND, y_LND) chunks into shuffled batches of `batch_tokens`.

    Chunks accumulate until the buffer holds `buffer_tokens`; then the buffer is permuted
    and its first half is emitted as batches while the second half stays to mix with
    later chunks. At the end of the stream the rest is emitted (last partial batch too).
    """
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    for x_LND, y_LND in chunks:
        xs.append(x_LND)
        ys.append(y_LND)
        held += x_LND.shape[1]
        if held < max(buffer_tokens, 2 * batch_tokens):
            continue
        x_LND, y_LND = torch.cat(xs, 1), torch.cat(ys, 1)
        perm = torch.randperm(held, generator=generator).to(x_LND.device)
        x_LND, y_LND = x_LND[:, perm], y_LND[:, perm]
        n_out = (held // 2) // batch_tokens * batch_tokens
        for start in range(0, n_out, batch_tokens):
            yield x_LND[:, start : start + batch_tokens], y_LND[:, start : start + batch_tokens]
        xs, ys, held = [x_LND[:, n_out:]], [y_LND[:, n_out:]], held - n_out
    if held:
        x_LND, y_LND = torch.cat(xs, 1), torch.cat(ys, 1)
        perm = torch.randperm(held, generator=generator).to(x_LND.device)
        for start in range(0, held, batch_tokens):
            sel = perm[start : start + batch_tokens]
            yield x_LND[:, sel], y_LND[:, sel]


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
        self, generator: torch.Generator | None, device: str | torch.device = "cpu"
    ) -> Iterator[Batch]:
        """The shards as float32 chunks, in random order when a generator is given."""
        n_shards = json.loads((self.dir / self.COMPLETE).read_text())["n_shards"]
        order = (
            torch.randperm(n_shards, generator=generator).tolist()
            if generator is not None
            else range(n_shards)
        )
        for i in order:
            tensors = load_file(str(self.dir / f"shard_{i:05d}.safetensors"))
            yield tensors["x"].float().to(device), tensors["y"].float().to(device)


def training_batches(
    cfg: TranscodersConfig,
    model: torch.nn.Module,
    adapter: Any,
    seqs: Sequence[Sequence[int]],
    layers: Sequence[int],
    generator: torch.Generator,
    cache: ActivationCache | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[Batch]:
    """Shuffled (x_LND, y_LND) batches until `cfg.tokens` tokens, repeating the corpus.

    With a cache the model runs once (filling the cache if it is not complete) and later
    epochs read the shards; without one every epoch reruns the model.
    """

    def epoch_chunks() -> Iterator[Batch]:
        if cache is not None:
            if not cache.complete:
                cache.write(
                    model_activations(
                        model, adapter, batch_sequences(seqs, cfg.model_batch_seqs, None), layers
                    )
                )
            yield from cache.read(generator, device)
        else:
            seq_batches = batch_sequences(seqs, cfg.model_batch_seqs, generator)
            yield from model_activations(model, adapter, seq_batches, layers, device)

    def all_epochs() -> Iterator[Batch]:
        while True:
            n_epoch = 0
            for x_LND, y_LND in epoch_chunks():
                n_epoch += x_LND.shape[1]
                yield x_LND, y_LND
            if n_epoch == 0:
                raise ValueError("the corpus yields no tokens (all sequences shorter than 2)")

    seen = 0
    for x_LND, y_LND in shuffled_batches(
        all_epochs(), cfg.batch_tokens, cfg.shuffle_buffer_tokens, generator
    ):
        n = min(x_LND.shape[1], cfg.tokens - seen)
        seen += n
        yield x_LND[:, :n], y_LND[:, :n]
        if seen >= cfg.tokens:
            return
