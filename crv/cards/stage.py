"""The `cards` stage: the feature cards (`crv.cards.store`) of every transcoder feature,
from one streaming pass over the traces."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from crv.cards.config import CardsConfig
from crv.cards.store import CardArrays, save_cards
from crv.cards.topk import StreamingTopK
from crv.device import LOGITS_BUDGET_BYTES
from crv.pipeline import StageContext
from crv.tables import markdown_table, scalar_rows

_ROW, _POS = 0, 1
"""Payload columns of a top context: trace row and token position; the window follows."""


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
    many as `LOGITS_BUDGET_BYTES` holds (a layer of a large model against a large
    vocabulary is gigabytes of logits in one piece)."""
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
    from crv.traces.store import load_traces
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


def cards_markdown(section: dict[str, Any]) -> str:
    """The report.md section of a `cards` result: per layer, then the scalars."""
    return markdown_table(section.get("layers", [])) + "\n" + markdown_table(scalar_rows(section))
