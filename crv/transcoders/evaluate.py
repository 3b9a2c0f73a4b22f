"""Held-out evaluation of a transcoder set: reconstruction and spliced-in behaviour.

Reconstruction, per layer, on every non-padding token except position 0 of the eval
sequences (the traces' test split):

- FVU against the dataset-level variance: sum (y^ - y)^2 / sum (y - mean_dataset(y))^2,
  the sums running over all eval tokens (not averaged per batch);
- L0: mean number of non-zero activations per token (k for TopK, less when ReLU zeroes
  some kept values);
- dead fraction: latents that never fired on the eval tokens;
- cos: mean cosine similarity between y^ and y per token.

Behaviour, next-token cross-entropy on the same sequences (predictions from positions
>= 1, since position 0 stays clean in every variant): the clean model, every MLP replaced
by its transcoder (`splice`), every MLP zero-ablated, and each layer spliced or ablated
alone. CE-loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean): 1 means the
transcoders lose nothing, 0 means they are as bad as deleting the MLPs. KL(clean ||
spliced) is averaged per predicted token. A forward's logits take tokens x vocabulary x 4
bytes, and the clean log-probabilities stay alive beside each variant's (about 5 copies in
all), so behaviour batches hold at most `LOGITS_BUDGET_BYTES` of logits: for a 152k-token
vocabulary that is one trace at a time, and memory does not grow with `batch_seqs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from crv.device import LOGITS_BUDGET_BYTES
from crv.transcoders.activations import autocast_for, batch_sequences, model_activations, pad_batch
from crv.transcoders.module import TranscoderSet
from crv.transcoders.splice import splice, zero_ablate


def logits_batch_seqs(seqs: Sequence[Sequence[int]], batch_seqs: int, vocab_size: int) -> int:
    """`batch_seqs`, made smaller (at least 1) so that one batch's logits fit the budget."""
    longest = max((len(s) for s in seqs), default=1)
    return max(1, min(batch_seqs, LOGITS_BUDGET_BYTES // (4 * longest * vocab_size)))


def take_tokens(seqs: Sequence[Sequence[int]], max_tokens: int) -> list[Sequence[int]]:
    """The first sequences holding at most about `max_tokens` tokens (at least one)."""
    out, n = [], 0
    for s in seqs:
        if out and n + len(s) > max_tokens:
            break
        out.append(s)
        n += len(s)
    return out


@torch.no_grad()
def reconstruction_metrics(
    model: torch.nn.Module,
    adapter: Any,
    tset: TranscoderSet,
    seqs: Sequence[Sequence[int]],
    batch_seqs: int,
) -> list[dict[str, float]]:
    """Per-layer FVU, L0, dead fraction and cosine similarity on `seqs`."""
    layers = tset.layers
    device = tset[layers[0]].W_enc.device
    d_model = tset.d_model
    n = 0
    sum_y_LD = torch.zeros(len(layers), d_model, dtype=torch.float64, device=device)
    sum_y2_LD = torch.zeros_like(sum_y_LD)
    sse_L = torch.zeros(len(layers), dtype=torch.float64, device=device)
    cos_L = torch.zeros_like(sse_L)
    l0_L = torch.zeros_like(sse_L)
    fired_LF = torch.zeros(len(layers), tset[layers[0]].n_latents, dtype=torch.bool, device=device)
    for x_LND, y_LND in model_activations(
        model, adapter, batch_sequences(seqs, batch_seqs, None), layers, device
    ):
        n += x_LND.shape[1]
        for i, layer in enumerate(layers):
            tc = tset[layer]
            acts_NK, idx_NK = tc.encode(x_LND[i])
            y_hat_ND = tc.reconstruct(x_LND[i], acts_NK, idx_NK).float()
            y_ND = y_LND[i]
            sum_y_LD[i] += y_ND.sum(0).double()
            sum_y2_LD[i] += y_ND.double().pow(2).sum(0)
            sse_L[i] += (y_hat_ND - y_ND).double().pow(2).sum()
            cos_L[i] += F.cosine_similarity(y_hat_ND, y_ND, dim=-1).double().sum()
            on_NK = acts_NK != 0
            l0_L[i] += on_NK.sum()
            fired_LF[i, idx_NK[on_NK]] = True
    total_var_L = (sum_y2_LD - sum_y_LD.pow(2) / max(n, 1)).sum(1)
    return [
        {
            "layer": layer,
            "fvu": (sse_L[i] / total_var_L[i]).item(),
            "l0": (l0_L[i] / max(n, 1)).item(),
            "dead_frac": 1.0 - fired_LF[i].float().mean().item(),
            "cos": (cos_L[i] / max(n, 1)).item(),
        }
        for i, layer in enumerate(layers)
    ]


@torch.no_grad()
def _next_token_logprobs(
    model: torch.nn.Module, ids_BT: torch.Tensor, mask_BT: torch.Tensor, ctx: AbstractContextManager
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [P, V] at predicting positions (>= 1, target not padding) and targets [P]."""
    with ctx, autocast_for(ids_BT.device):
        logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False).logits
    pred_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
    pred_BT[:, 1:-1] = mask_BT[:, 2:].bool()
    targets_P = ids_BT[:, 1:][pred_BT[:, :-1]]
    return logits_BTV[pred_BT].float().log_softmax(-1), targets_P


@torch.no_grad()
def behaviour_metrics(
    model: torch.nn.Module,
    adapter: Any,
    tset: TranscoderSet,
    seqs: Sequence[Sequence[int]],
    batch_seqs: int,
    per_layer: bool = True,
) -> dict[str, Any]:
    """CE of clean, spliced and zero-ablated models (all layers, and one layer at a time when
    `per_layer`), and the KL of the spliced model from the clean one."""
    layers = tset.layers
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    kl_sum, n_pred = 0.0, 0

    def contexts() -> dict[str, AbstractContextManager]:
        ctxs: dict[str, AbstractContextManager] = {
            "clean": nullcontext(),
            "spliced": splice(adapter, tset),
            "zero": zero_ablate(adapter, layers),
        }
        for layer in layers if per_layer else []:
            ctxs[f"spliced_{layer}"] = splice(adapter, tset, layers=[layer])
            ctxs[f"zero_{layer}"] = zero_ablate(adapter, [layer])
        return ctxs

    batch_seqs = logits_batch_seqs(seqs, batch_seqs, adapter.vocab_size)
    for seq_batch in batch_sequences(seqs, batch_seqs, None):
        ids_BT, mask_BT = pad_batch(seq_batch, device)
        variants = contexts()
        clean_PV, targets_P = _next_token_logprobs(model, ids_BT, mask_BT, variants.pop("clean"))
        n_pred += targets_P.numel()
        sums["clean"] = (
            sums.get("clean", 0.0) + F.nll_loss(clean_PV, targets_P, reduction="sum").item()
        )
        for name, ctx in variants.items():
            logp_PV, _ = _next_token_logprobs(model, ids_BT, mask_BT, ctx)
            sums[name] = (
                sums.get(name, 0.0) + F.nll_loss(logp_PV, targets_P, reduction="sum").item()
            )
            if name == "spliced":
                kl_sum += F.kl_div(logp_PV, clean_PV, log_target=True, reduction="sum").item()
    ce = {name: total / max(n_pred, 1) for name, total in sums.items()}

    def recovered(zero: float, spliced: float) -> float:
        gap = zero - ce["clean"]
        return (zero - spliced) / gap if gap != 0 else float("nan")

    return {
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero": ce["zero"],
        "ce_loss_recovered": recovered(ce["zero"], ce["spliced"]),
        "kl_spliced": kl_sum / max(n_pred, 1),
        "n_predictions": n_pred,
        "per_layer": {
            layer: {
                "ce_spliced": ce[f"spliced_{layer}"],
                "ce_zero": ce[f"zero_{layer}"],
                "ce_loss_recovered": recovered(ce[f"zero_{layer}"], ce[f"spliced_{layer}"]),
            }
            for layer in (layers if per_layer else [])
        },
    }


def evaluate_transcoders(
    model: torch.nn.Module,
    adapter: Any,
    tset: TranscoderSet,
    seqs: Sequence[Sequence[int]],
    batch_seqs: int = 32,
    per_layer_ce: bool = True,
) -> dict[str, Any]:
    """The report: `layers` (per-layer reconstruction, and per-layer CE when `per_layer_ce`)
    plus the all-layer CE numbers."""
    per_layer = reconstruction_metrics(model, adapter, tset, seqs, batch_seqs)
    behaviour = behaviour_metrics(model, adapter, tset, seqs, batch_seqs, per_layer_ce)
    by_layer = behaviour.pop("per_layer")
    for row in per_layer:
        row.update(by_layer.get(row["layer"], {}))
    return {"layers": per_layer, "n_tokens": sum(len(s) - 1 for s in seqs), **behaviour}
