"""The `cards` stage: what each transcoder feature reads and writes, for naming it.

crv names features by number (`L3/F1630`), which tells a person nothing. A feature card
says when the feature fires and what it does to the output:

- `frequency`: the share of tokens (of the configured traces, BOS left out) on which the
  feature is active (in its layer's top k with a non-zero activation);
- `top_contexts`: its `n_contexts` strongest activations, each with the activating token
  and the text around it, found in one streaming pass over the traces with a per-feature
  top-n (`StreamingTopK`), so memory stays at features x n whatever the corpus size;
- `promotes` / `suppresses`: the output tokens its decoder direction raises and lowers
  most, `W_dec[f] @ W_U.T` through the architecture adapter's unembedding. This is the
  direct path only and ignores the final norm's scale (and any logit soft-capping): it
  ranks tokens as the unembedding reads the direction, not by the exact logit change.

`label(layer, feature)` condenses a card to a few words (`on "7" 6/8 → "8"`: the most
common activating token among the top contexts, with its share when not all, and the most
promoted token), used in report.md, crv-verify's `top_features` and exports.

Artifact: `cards.safetensors` (per layer `count`, `top_value`, `top_row`, `top_pos`,
`top_window` [F, n, W] token ids with -1 padding, `promote_id`, `promote_value`,
`suppress_id`, `suppress_value`) and `cards.json` (layers, token count, window shape, the
token strings of every id used, the trace ids of the rows, the config). Public loader:
`load_feature_cards(dir) -> FeatureCards`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from crv.cards.config import CardsConfig
from crv.cards.topk import StreamingTopK
from crv.device import LOGITS_BUDGET_BYTES
from crv.io import atomic_write, atomic_write_json, read_json
from crv.pipeline import StageContext

TENSOR_FILE = "cards.safetensors"
META_FILE = "cards.json"
FORMAT = "crv-feature-cards/1"
_ROW, _POS = 0, 1
"""Payload columns of a top context: trace row and token position; the window follows."""


@dataclasses.dataclass
class CardArrays:
    """The cards of one layer as arrays over its F features."""

    count: np.ndarray  # int64 [F]: tokens on which the feature was active
    top_value: np.ndarray  # float32 [F, n]: activations, best first (-inf: empty slot)
    top_row: np.ndarray  # int32 [F, n]: trace row of each context (-1: empty)
    top_pos: np.ndarray  # int32 [F, n]: token position in that trace
    top_window: np.ndarray  # int [F, n, W]: token ids around it (-1: outside the trace)
    promote_id: np.ndarray  # int [F, m] (token ids: int16 for vocabularies that fit, else int32)
    promote_value: np.ndarray  # float32 [F, m]
    suppress_id: np.ndarray  # int [F, m]
    suppress_value: np.ndarray  # float32 [F, m]


def _batched(seqs: Iterable[Sequence[int]], size: int) -> Iterator[list[Sequence[int]]]:
    it = iter(seqs)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _token_table(batch: Sequence[Sequence[int]], row0: int, before: int, after: int) -> np.ndarray:
    """Payload rows [row, pos, window...] of every token the activations cover (all positions
    but 0, row-major, as `model_activations` yields them); [N, 2 + W]."""
    width = before + after + 1
    longest = max(len(s) for s in batch)
    padded_BT = np.full((len(batch), longest + width), -1, dtype=np.int64)
    rows, poss = [], []
    for j, seq in enumerate(batch):
        padded_BT[j, before : before + len(seq)] = seq
        rows.append(np.full(len(seq) - 1, j))
        poss.append(np.arange(1, len(seq)))
    j_N, pos_N = np.concatenate(rows), np.concatenate(poss)
    window_NW = padded_BT[j_N[:, None], pos_N[:, None] + np.arange(width)[None, :]]
    return np.column_stack([j_N + row0, pos_N, window_NW])


@torch.no_grad()
def logit_effects(
    W_dec_FD: torch.Tensor, W_U_VD: torch.Tensor, m: int, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The m most promoted and most suppressed tokens of each decoder row through the
    unembedding, `W_dec[f] @ W_U.T` (no final norm): ids and values, [F, m] each, promoted
    largest first, suppressed most negative first. Rows go `chunk` at a time, by default as
    many as `LOGITS_BUDGET_BYTES` holds (a 3,584-row layer against Qwen's 152k-token
    vocabulary is 2.2 GB of logits in one piece; it set the Qwen benchmark's peak)."""
    m = min(m, W_U_VD.shape[0])
    chunk = chunk or max(1, LOGITS_BUDGET_BYTES // (4 * W_U_VD.shape[0]))
    out: list[list[np.ndarray]] = [[], [], [], []]
    W_U_VD = W_U_VD.float()
    for start in range(0, W_dec_FD.shape[0], chunk):
        logits_CV = W_dec_FD[start : start + chunk].float().to(W_U_VD.device) @ W_U_VD.T
        top, low = logits_CV.topk(m, dim=1), logits_CV.topk(m, dim=1, largest=False)
        for i, t in enumerate((top.indices, top.values, low.indices, low.values)):
            out[i].append(t.cpu().numpy())
    ids_up, vals_up, ids_down, vals_down = (np.concatenate(parts) for parts in out)
    return (
        ids_up.astype(np.int32),
        vals_up.astype(np.float32),
        ids_down.astype(np.int32),
        vals_down.astype(np.float32),
    )


@torch.no_grad()
def compute_cards(
    model: torch.nn.Module,
    adapter: Any,
    tset: Any,
    seqs: Iterable[Sequence[int]],
    cfg: CardsConfig,
) -> tuple[dict[int, CardArrays], int]:
    """Cards of every feature of `tset` from one streaming pass over token sequences.

    `seqs` is consumed once, `cfg.runtime_batch_seqs` at a time; row i of a context is the
    i-th sequence. Returns the per-layer arrays and the number of tokens read.
    """
    from crv.transcoders.activations import model_activations

    layers = tset.layers
    width = cfg.context_before + cfg.context_after + 1
    trackers = {
        layer: StreamingTopK(tset[layer].n_latents, cfg.n_contexts, 2 + width) for layer in layers
    }
    counts = {layer: np.zeros(tset[layer].n_latents, dtype=np.int64) for layer in layers}
    batches, replay = itertools.tee(_batched(seqs, cfg.runtime_batch_seqs))
    row0 = n_tokens = 0
    for batch, (x_LND, _) in zip(
        replay, model_activations(model, adapter, batches, layers), strict=True
    ):
        payload_NP = _token_table(batch, row0, cfg.context_before, cfg.context_after)
        order_N = n_tokens + np.arange(len(payload_NP))
        for li, layer in enumerate(layers):
            acts_NK, idx_NK = tset[layer].encode(x_LND[li].to(tset[layer].W_enc.device))
            acts_NK, idx_NK = acts_NK.float().cpu().numpy(), idx_NK.cpu().numpy()
            token_M, slot_M = np.nonzero(acts_NK != 0)
            feature_M = idx_NK[token_M, slot_M]
            counts[layer] += np.bincount(feature_M, minlength=len(counts[layer]))
            trackers[layer].update(
                feature_M, acts_NK[token_M, slot_M], token_M, order_N, payload_NP
            )
        row0 += len(batch)
        n_tokens += len(payload_NP)
    W_U_VD = adapter.unembed_weight.detach()
    id_dtype = np.int16 if W_U_VD.shape[0] <= np.iinfo(np.int16).max else np.int32
    cards = {}
    for layer in layers:
        tracker = trackers[layer]
        up_id, up_value, down_id, down_value = logit_effects(
            tset[layer].W_dec.detach(), W_U_VD, cfg.n_logit_tokens
        )
        cards[layer] = CardArrays(
            counts[layer],
            tracker.values_FN,
            tracker.payload_FNP[:, :, _ROW].astype(np.int32),
            tracker.payload_FNP[:, :, _POS].astype(np.int32),
            tracker.payload_FNP[:, :, 2:].astype(id_dtype),
            up_id.astype(id_dtype),
            up_value,
            down_id.astype(id_dtype),
            down_value,
        )
    return cards, n_tokens


def save_cards(
    out: str | Path,
    cards: dict[int, CardArrays],
    n_tokens: int,
    tokenizer: Any,
    trace_ids: Sequence[str],
    cfg: CardsConfig,
) -> None:
    """Write `cards.safetensors` and `cards.json` (written last) into `out`."""
    out = Path(out)
    tensors = {
        f"{name}.{layer}": np.ascontiguousarray(getattr(arr, name))
        for layer, arr in cards.items()
        for name in (f.name for f in dataclasses.fields(CardArrays))
    }
    used = set()
    for arr in cards.values():
        for ids in (arr.top_window, arr.promote_id, arr.suppress_id):
            used.update(np.unique(ids[ids >= 0]).tolist())
    strings = {str(i): tokenizer.decode([i]) for i in sorted(used)}
    atomic_write(out / TENSOR_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write_json(
        out / META_FILE,
        {
            "format": FORMAT,
            "layers": sorted(cards),
            "n_latents": {str(layer): len(arr.count) for layer, arr in cards.items()},
            "n_tokens": n_tokens,
            "context_before": cfg.context_before,
            "context_after": cfg.context_after,
            "token_strings": strings,
            "trace_ids": list(trace_ids),
            "config": dataclasses.asdict(cfg),
        },
    )


def _quote(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)


class FeatureCards:
    """The feature cards of a `cards` artifact (see the module docstring)."""

    def __init__(self, meta: dict[str, Any], cards: dict[int, CardArrays]) -> None:
        self.meta, self._cards = meta, cards
        self.layers: list[int] = sorted(cards)
        self.n_tokens = int(meta["n_tokens"])
        self._strings = {int(k): v for k, v in meta["token_strings"].items()}
        self._before = int(meta["context_before"])
        self._trace_ids: list[str] = list(meta["trace_ids"])

    def _arrays(self, layer: int, feature: int) -> CardArrays:
        arr = self._cards.get(layer)
        if arr is None:
            raise KeyError(f"no feature cards for layer {layer}; layers: {self.layers}")
        if not 0 <= feature < len(arr.count):
            raise KeyError(f"feature {feature} out of range for layer {layer} ({len(arr.count)})")
        return arr

    def token(self, token_id: int) -> str:
        return self._strings.get(int(token_id), f"<{int(token_id)}>")

    def frequency(self, layer: int, feature: int) -> float:
        """Share of the read tokens on which the feature was active."""
        return float(self._arrays(layer, feature).count[feature]) / max(self.n_tokens, 1)

    def top_contexts(self, layer: int, feature: int) -> list[dict[str, Any]]:
        """Strongest activations first: text around the token, the token, its activation,
        where the token starts in the text, and the trace and position it came from."""
        arr = self._arrays(layer, feature)
        out = []
        for slot in np.flatnonzero(np.isfinite(arr.top_value[feature])):
            window = arr.top_window[feature, slot]
            left = "".join(self.token(i) for i in window[: self._before] if i >= 0)
            tok = self.token(window[self._before])
            right = "".join(self.token(i) for i in window[self._before + 1 :] if i >= 0)
            out.append(
                {
                    "text": left + tok + right,
                    "token": tok,
                    "token_start": len(left),
                    "activation": float(arr.top_value[feature, slot]),
                    "trace_id": self._trace_ids[int(arr.top_row[feature, slot])],
                    "position": int(arr.top_pos[feature, slot]),
                }
            )
        return out

    def top_tokens(self, layer: int, feature: int) -> list[str]:
        """The activating token of each top context, strongest first."""
        arr = self._arrays(layer, feature)
        valid = np.isfinite(arr.top_value[feature])
        return [self.token(i) for i in arr.top_window[feature, valid, self._before]]

    def _logit_list(self, ids: np.ndarray, values: np.ndarray) -> list[dict[str, Any]]:
        return [
            {"token": self.token(i), "value": float(v)} for i, v in zip(ids, values, strict=True)
        ]

    def card(self, layer: int, feature: int) -> dict[str, Any]:
        """`frequency`, `top_contexts`, `promotes`, `suppresses` and the `label`."""
        arr = self._arrays(layer, feature)
        return {
            "layer": layer,
            "feature": feature,
            "label": self.label(layer, feature),
            "frequency": self.frequency(layer, feature),
            "top_contexts": self.top_contexts(layer, feature),
            "promotes": self._logit_list(arr.promote_id[feature], arr.promote_value[feature]),
            "suppresses": self._logit_list(arr.suppress_id[feature], arr.suppress_value[feature]),
        }

    def label(self, layer: int, feature: int) -> str:
        """A few words: `on "7" 6/8 → "8"` (most common activating token of the top
        contexts, its share when not all, the most promoted token); `never active → "8"`
        for a feature with no context."""
        arr = self._arrays(layer, feature)
        promoted = f" → {_quote(self.token(arr.promote_id[feature, 0]))}"
        tokens = self.top_tokens(layer, feature)
        if not tokens:
            return "never active" + promoted
        (common, n), *_ = Counter(tokens).most_common(1)
        share = "" if n == len(tokens) else f" {n}/{len(tokens)}"
        return f"on {_quote(common)}{share}{promoted}"


def load_feature_cards(path: str | Path) -> FeatureCards:
    """The feature cards of a `cards` artifact (or a bundle's copy of one)."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"no feature cards at {path}: {META_FILE} is missing")
    meta = read_json(meta_file)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    tensors = load_file(str(path / TENSOR_FILE))
    names = [f.name for f in dataclasses.fields(CardArrays)]
    cards = {}
    for layer in meta["layers"]:
        missing = [n for n in names if f"{n}.{layer}" not in tensors]
        if missing:
            raise ValueError(f"{path / TENSOR_FILE}: layer {layer} lacks {missing}")
        cards[int(layer)] = CardArrays(**{n: tensors[f"{n}.{layer}"] for n in names})
    return FeatureCards(meta, cards)


def copy_cards(src: str | Path, dest: str | Path) -> None:
    """Copy the card files of a `cards` artifact into `dest` (created), e.g. a bundle."""
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (TENSOR_FILE, META_FILE):
        atomic_write(dest / name, lambda p, name=name: shutil.copyfile(Path(src) / name, p))


def _split_sequences(
    traces: Any, cfg: CardsConfig, trace_ids: list[str]
) -> Iterator[Sequence[int]]:
    """input_ids of the configured split's traces, in dataset order, streamed; appends
    each yielded trace's id to `trace_ids`."""
    taken = 0
    for row in traces.select_columns(["id", "split", "input_ids"]):
        if cfg.split != "all" and row["split"] != cfg.split:
            continue
        if cfg.max_traces is not None and taken >= cfg.max_traces:
            return
        if len(row["input_ids"]) < 2:
            continue
        trace_ids.append(row["id"])
        taken += 1
        yield row["input_ids"]


def run_stage(ctx: StageContext[CardsConfig]) -> dict[str, Any]:
    """`cards` stage: one card per transcoder feature from the traces of `cards.split`."""
    from crv.models.adapter import ArchAdapter
    from crv.models.loading import load_subject
    from crv.traces.stage import load_traces
    from crv.transcoders.io import load_transcoder_set

    cfg: CardsConfig = ctx.cfg
    t0 = time.perf_counter()
    model, tokenizer = load_subject(ctx.inputs["subject"], ctx.device)
    model.requires_grad_(False)
    adapter = ArchAdapter.for_model(model)
    tset = load_transcoder_set(ctx.inputs["transcoders"], ctx.device)
    tset.check_compatible(adapter)
    trace_ids: list[str] = []
    seqs = _split_sequences(load_traces(ctx.inputs["traces"]), cfg, trace_ids)
    cards, n_tokens = compute_cards(model, adapter, tset, seqs, cfg)
    if n_tokens == 0:
        raise ValueError(f"cards: the traces of split {cfg.split!r} hold no tokens to read")
    save_cards(ctx.out, cards, n_tokens, tokenizer, trace_ids, cfg)
    seconds = time.perf_counter() - t0
    layers = [
        {
            "layer": layer,
            "never_active_frac": float(np.mean(arr.count == 0)),
            "median_frequency": float(np.median(arr.count) / n_tokens),
        }
        for layer, arr in cards.items()
    ]
    ctx.log.info("cards: %d traces, %d tokens, %.1f s", len(trace_ids), n_tokens, seconds)
    return {
        "n_traces": len(trace_ids),
        "n_tokens": n_tokens,
        "n_features": int(sum(len(arr.count) for arr in cards.values())),
        "seconds": seconds,
        "tokens_per_s": n_tokens / max(seconds, 1e-9),
        "layers": layers,
    }
