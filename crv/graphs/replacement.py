"""The local replacement model of one token sequence, and batched backward passes through it.

`ReplacementTrace` runs the subject model once over a sequence inside `adapter.frozen()`
(attention probabilities and norm scales constant for autograd) with hooks that make the
autograd leaves whose gradients give every attribution row:

- the input of layer 0 (the token nodes' vectors, positional or scaled embeddings included),
- every MLP's output, replaced by a detached copy of itself (same value, no gradient path
  back into the MLP), which splits into transcoder features and an error term (a skip
  transcoder's linear path x @ W_skip.T stays differentiable: a direct path MLP in -> out),

and that keep the tensors targets are read at: every MLP's input (a feature's pre-activation
is `W_enc[f] . MLP-in`) and the final norm's output (a demeaned logit is
`(W_U[t] - mean_v W_U[v]) . final-norm-out`). Between the leaves and those tensors the
frozen model is affine, so a gradient injected at a target and read at the leaves is that
target's exact row of direct effects.

The forward runs through the model's KV cache in segments that end at the target positions
(the steps' tokens), or at the positions `segment_at` names, so that the targets of a
whole-step graph (every position of a step) share the step's segment; the logits of every
target are kept. It is still one pass over the sequence, but the autograd graph of a
segment only reaches back into earlier segments (through the cached keys and values), so a
backward pass for targets at position q traverses positions <= q only, as if the sequence
had been cut after q. Long stretches between targets are cut further, into segments of at
most `SEGMENT_TOKENS`: a segment's attention backward covers its block of the causal matrix,
so smaller segments skip most of the masked upper triangle (for a prefix attributed alone,
one segment otherwise). This changes no value, only the cost.

A row is a dense float32 vector over the source columns of positions 0..q, laid out
position-major by `SourceLayout`. At position 0 (BOS) only the token node is a source: its
features and error columns stay zero, as in circuit-tracer (BOS activations are outliers that
transcoders are not trained on), while the BOS embedding's effect on later positions through
attention is kept, so the influence ranking sees the same sources as circuit-tracer's.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from crv.models.adapter import ArchAdapter
from crv.transcoders.module import TranscoderSet

Key = tuple[int, int, int]
"""A target: (layer, position, feature index); layer = n_layers and a token id for logits."""


class Stopwatch:
    """Seconds per part of the work, summed over calls: where attribution time goes.

    Cheap enough (about a microsecond per call) to stay on.
    """

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - start


SEGMENT_TOKENS = 64
"""Longest forward segment. A segment's backward multiplies by its attention block over all
earlier keys, so shorter segments skip more of the causal mask's zero upper triangle, but
each costs a model call and more autograd nodes. 64 was the best of 32-96 tokens on
crv-tiny in `benchmarks/attribution.py`'s per-step path; re-measure there before changing
it."""


SOURCE_CACHE_BYTES = 256 << 20
"""Largest table of activation-scaled decoder vectors kept per trace (else gathered per
batch, as large models need): 18 MB for a 260-token crv-tiny trace; it saves a gather of
every position's decoder vectors per batch."""


@dataclass(frozen=True)
class SourceLayout:
    """Source columns of a row: per position, per layer [its K TopK slots | its error], then
    the token.

    Position-major, so the sources at positions <= q are the first (q + 1) * stride columns;
    a layer's features and error are adjacent, so one product fills them.
    """

    n_layers: int
    k: int

    @property
    def stride(self) -> int:
        return self.n_layers * (self.k + 1) + 1

    def feature_col(self, pos: np.ndarray | int, layer: np.ndarray | int, slot: np.ndarray | int):
        return pos * self.stride + layer * (self.k + 1) + slot

    def error_col(self, pos: np.ndarray | int, layer: np.ndarray | int):
        return pos * self.stride + layer * (self.k + 1) + self.k

    def token_col(self, pos: np.ndarray | int):
        return pos * self.stride + self.n_layers * (self.k + 1)


def segment_ends(targets: Sequence[int], max_len: int, start: int = 0) -> list[int]:
    """Ends (exclusive) of forward segments from `start` on: every target end, with the
    stretch before each cut into near-equal segments of at most `max_len` tokens."""
    ends = []
    for end in sorted(set(targets)):
        n = -(-(end - start) // max_len)
        ends += [start + round(i * (end - start) / n) for i in range(1, n + 1)]
        start = end
    return ends


class ReplacementTrace:
    """One frozen forward pass over `input_ids[: max(positions) + 1]`; rows by backward passes.

    After construction: `acts_PLK` / `idx_PLK` (TopK activations and latent indices of every
    layer's transcoder), `errors_PLD` (MLP out minus transcoder reconstruction), `embeds_PD`
    (layer-0 input) for the P positions up to the last target position, and the next-token
    probabilities at each target position (`probs(pos)`). `extend` adds later targets of a
    growing sequence without running the model over its prefix again.
    """

    def __init__(
        self,
        adapter: ArchAdapter,
        tset: TranscoderSet,
        input_ids: Sequence[int] | torch.Tensor,
        positions: Sequence[int],
        stopwatch: Stopwatch | None = None,
        segment_at: Sequence[int] | None = None,
    ) -> None:
        if sorted(tset.layers) != list(range(adapter.n_layers)):
            raise ValueError(
                f"attribution needs a transcoder for every layer 0..{adapter.n_layers - 1}, "
                f"the set has layers {tset.layers}"
            )
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        if not positions or min(positions) < 1 or max(positions) >= len(ids):
            raise ValueError(
                f"target positions must lie in 1..{len(ids) - 1}, got {sorted(positions)}"
            )
        self.adapter, self.tset = adapter, tset
        self.stopwatch = stopwatch or Stopwatch()
        self.n_layers = adapter.n_layers
        self.layout = SourceLayout(adapter.n_layers, tset.k)
        self.device = adapter.unembed_weight.device
        L = self.n_layers
        self._emb_leaves: list[torch.Tensor] = []  # per segment [1, n_s, D]
        self._mlp_in: list[list[torch.Tensor]] = [[] for _ in range(L)]  # [layer][segment]
        self._mlp_out: list[list[torch.Tensor]] = [[] for _ in range(L)]  # leaves
        self._final: list[torch.Tensor] = []
        self._probs: dict[int, torch.Tensor] = {}
        self._cache = DynamicCache(config=adapter.model.config)
        self._targets: set[int] = set()
        self.ends: list[int] = []
        self.n_positions = 0
        self._run(ids, positions, segment_at)
        W_U = adapter.unembed_weight.detach().float()
        self._logit_dirs_VD = W_U - W_U.mean(0, keepdim=True)

    def extend(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        positions: Sequence[int],
        segment_at: Sequence[int] | None = None,
    ) -> None:
        """Add targets `positions`, all past the sequence so far, of `input_ids`, which must
        continue this trace's tokens: the forward goes on from where it stopped (the rows of
        earlier targets stay valid, attention being causal), and everything is as if the
        trace had been built at once with all targets (same segments, same values)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        old = self.n_positions
        if not positions or min(positions) < old or max(positions) >= len(ids):
            raise ValueError(
                f"new target positions must lie in {old}..{len(ids) - 1}, got {sorted(positions)}"
            )
        if not torch.equal(ids[:old].to(self.device), self.input_ids):
            raise ValueError("input_ids do not continue the trace's tokens")
        self._run(ids, positions, segment_at)

    def _run(
        self, ids: torch.Tensor, positions: Sequence[int], segment_at: Sequence[int] | None
    ) -> None:
        """Forward and encode the segments that end at the new targets `positions` (or at
        `segment_at` and the last target: targets inside a segment cost no extra cut)."""
        first_seg, start = len(self.ends), self.n_positions
        new = {int(p) for p in positions}
        self._targets |= new
        cuts = new if segment_at is None else {*map(int, segment_at), max(new)}
        self.ends += segment_ends([p + 1 for p in cuts], SEGMENT_TOKENS, start)
        self.starts = [0, *self.ends[:-1]]
        self.n_positions = self.ends[-1]
        self.input_ids = ids[: self.n_positions].to(self.device)
        with self.stopwatch("forward"):
            self._forward(first_seg)
        with self.stopwatch("encode"):
            self._encode(first_seg)

    # -- forward -------------------------------------------------------------------------

    def _forward(self, first_seg: int) -> None:
        """Run segments `first_seg`.. through the model, on from the KV cache."""
        model = self.adapter.model
        segments = zip(self.starts[first_seg:], self.ends[first_seg:], strict=True)
        with torch.enable_grad(), self.adapter.frozen(), self._hooks():
            for start, end in segments:
                inside = [p for p in range(start, end) if p in self._targets]
                out = model(
                    input_ids=self.input_ids[None, start:end],
                    position_ids=torch.arange(start, end, device=self.device)[None],
                    cache=self._cache,
                    use_cache=True,
                    logits_to_keep=end - inside[0] if inside else 1,
                )
                for p in inside:
                    logits_V = out.logits[0, p - end].detach().double()
                    self._probs[p] = torch.softmax(logits_V, -1).cpu()

    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        """Leaves at the layer-0 input and the MLP outputs; keep MLP inputs and final norm out.

        Registered inside `frozen()`, so they run after the adapter's linearising norm hooks
        and see the linearised tensors.
        """

        def embed_hook(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            leaf = hidden.detach().requires_grad_(True)
            self._emb_leaves.append(leaf)
            if args:
                return (leaf, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": leaf}

        def mlp_hook(layer: int):
            def hook(_: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
                self._mlp_in[layer].append(inputs[0])
                leaf = out.detach().requires_grad_(True)
                self._mlp_out[layer].append(leaf)
                skip = self.tset[layer].skip(inputs[0])
                if skip is None:
                    return leaf
                # A skip transcoder's linear path: same value, gradient MLP out -> MLP in.
                return leaf + (skip - skip.detach()).to(leaf.dtype)

            return hook

        def final_hook(_: nn.Module, __: tuple, out: torch.Tensor) -> None:
            self._final.append(out)

        handles = [self.adapter.layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True)]
        handles += [
            self.adapter.mlp(i).register_forward_hook(mlp_hook(i)) for i in range(self.n_layers)
        ]
        handles.append(self.adapter.final_norm.register_forward_hook(final_hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def _encode(self, first_seg: int) -> None:
        """Transcoder activations, errors and embeddings of segments `first_seg`.., appended."""
        acts, idx, errors = [], [], []
        for layer in range(self.n_layers):
            tc = self.tset[layer]
            x_PD = torch.cat(self._mlp_in[layer][first_seg:], dim=1)[0].detach()
            y_PD = torch.cat(self._mlp_out[layer][first_seg:], dim=1)[0].detach().float()
            acts_PK, idx_PK = tc.encode(x_PD)
            acts.append(acts_PK.float())
            idx.append(idx_PK)
            errors.append(y_PD - tc.reconstruct(x_PD, acts_PK, idx_PK).float())
        new = (
            torch.stack(acts, dim=1),
            torch.stack(idx, dim=1),
            torch.stack(errors, dim=1),
            torch.cat(self._emb_leaves[first_seg:], dim=1)[0].detach().float(),
        )
        if first_seg > 0:
            old = (self.acts_PLK, self.idx_PLK, self.errors_PLD, self.embeds_PD)
            new = tuple(torch.cat([a, b]) for a, b in zip(old, new, strict=True))
        self.acts_PLK, self.idx_PLK, self.errors_PLD, self.embeds_PD = new
        P, L, K = self.acts_PLK.shape
        n_bytes = P * L * (K + 1) * self.embeds_PD.shape[1] * 4
        start = self.starts[first_seg]
        kept = self._sources_LPJD if first_seg > 0 else None
        self._sources_LPJD = None
        if n_bytes <= SOURCE_CACHE_BYTES:
            added = [self._layer_sources(start if kept else 0, P, layer) for layer in range(L)]
            if kept:
                added = [torch.cat([a, b]) for a, b in zip(kept, added, strict=True)]
            self._sources_LPJD = added

    def _layer_sources(self, start: int, end: int, layer: int) -> torch.Tensor:
        """[P, K + 1, D] float32 at positions start..end-1 of `layer`: every TopK slot's
        decoder vector times its activation, then the error vector. A row's entries at the
        layer's MLP-out leaf are these vectors' dot products with the gradient there."""
        if self._sources_LPJD is not None:
            return self._sources_LPJD[layer][start:end]
        W_dec = self.tset[layer].W_dec.detach()  # gather, then float: a bf16 set stays bf16
        dec_PKD = (
            W_dec[self.idx_PLK[start:end, layer]].float() * self.acts_PLK[start:end, layer, :, None]
        )
        return torch.cat([dec_PKD, self.errors_PLD[start:end, layer, None]], dim=1)

    def probs(self, pos: int) -> torch.Tensor:
        """Next-token probabilities (float64, [V], on the CPU) at a target position."""
        return self._probs[pos]

    # -- rows ----------------------------------------------------------------------------

    def _target_vectors(self, keys: Sequence[Key]) -> torch.Tensor:
        vecs = []
        for layer, _, index in keys:
            if layer == self.n_layers:
                vecs.append(self._logit_dirs_VD[index])
            else:
                vecs.append(self.tset[layer].W_enc[index].detach().float())
        return torch.stack(vecs)

    def rows(self, keys: Sequence[Key]) -> list[torch.Tensor]:
        """The rows of `keys` from one batched backward pass; row b has (pos_b + 1) * stride
        columns (float32): the direct effect of every source on the target's pre-activation
        (feature) or demeaned logit (logit)."""
        L, K, S = self.n_layers, self.layout.k, self.layout.stride
        B = len(keys)
        layer_B = np.array([k[0] for k in keys])
        pos_B = np.array([k[1] for k in keys])
        seg_B = np.searchsorted(self.ends, pos_B, side="right")
        last_seg = int(seg_B.max())
        top_layer = int(layer_B.max())  # leaves at layers >= top_layer get no gradient
        vecs_BD = self._target_vectors(keys)

        outputs, grad_outputs = [], []
        for layer, seg in sorted({(int(a), int(b)) for a, b in zip(layer_B, seg_B, strict=True)}):
            out = self._final[seg] if layer == L else self._mlp_in[layer][seg]
            members = np.flatnonzero((layer_B == layer) & (seg_B == seg))
            grad = out.new_zeros(B, *out.shape)
            grad[members, 0, pos_B[members] - self.starts[seg]] = vecs_BD[members].to(out.dtype)
            outputs.append(out)
            grad_outputs.append(grad)
        inputs = self._emb_leaves[: last_seg + 1] + [
            leaf for layer in range(top_layer) for leaf in self._mlp_out[layer][: last_seg + 1]
        ]
        with self.stopwatch("backward"):
            grads = torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )

        P = self.ends[last_seg]
        n_seg = last_seg + 1
        with torch.no_grad(), self.stopwatch("assemble"):
            row_BPS = torch.zeros(B, P, S, device=self.device)
            # per position: [layer 0 slots | error | layer 1 ... | token], see SourceLayout
            by_layer_BPLJ = row_BPS[:, :, : L * (K + 1)].unflatten(2, (L, K + 1))
            for seg in range(n_seg):  # segment by segment: no concatenation of gradients
                start, end = self.starts[seg], self.ends[seg]
                if grads[seg] is not None:
                    row_BPS[:, start:end, -1] = torch.einsum(
                        "bpd,pd->bp", grads[seg][:, 0].float(), self.embeds_PD[start:end]
                    )
                for layer in range(top_layer):
                    grad = grads[n_seg * (layer + 1) + seg]
                    if grad is not None:
                        by_layer_BPLJ[:, start:end, layer] = torch.einsum(
                            "bpd,pjd->bpj",
                            grad[:, 0].float(),
                            self._layer_sources(start, end, layer),
                        )
            row_BPS[:, 0, :-1] = 0.0  # BOS: its token node is a source, not its features/error
        return [row_BPS[b, : pos_B[b] + 1].reshape(-1).clone() for b in range(B)]
