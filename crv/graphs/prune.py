"""Influence on the logits, pruning by influence, and the graph scores.

All functions work on the row form of an adjacency: `adj_RN` holds one row per node that
has incoming edges (targets) and one column per node (sources), signed, target <- source.
A step graph's nodes are ordered [features | errors | tokens | logits] and its rows are
[features | logits]: row r < n_features is node r, the rest are the logit nodes.

Influence (CRV, after Ameisen et al. 2025): with M the row-normalised |A| (each target's
incoming absolute weights sum to 1) and w the logit probabilities, a node's influence is
w (M + M^2 + M^3 + ...), the probability-weighted share of all paths into the logits that
start at it. M is nilpotent (a feature only reads features of earlier layers), so the series
is finite; it is computed exactly by one triangular solve over the feature rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crv.graphs.graph import StepGraph


def normalize_rows(adj_RC: torch.Tensor) -> torch.Tensor:
    """|A| with each row scaled to sum 1 (all-zero rows stay zero)."""
    abs_RC = adj_RC.abs()
    sums_R1 = abs_RC.sum(1, keepdim=True)
    return abs_RC / torch.where(sums_R1 > 0, sums_R1, torch.ones_like(sums_R1))


def column_influence(
    normed_RC: torch.Tensor, weight_R: torch.Tensor, own_col_R: torch.Tensor, layer_R: torch.Tensor
) -> torch.Tensor:
    """Influence of every column: x = w (M + M^2 + ...), as x = (w + x[own_col]) M.

    `weight_R` is each row's weight (logit probability; 0 for feature rows), `own_col_R` the
    column that is the same node as the row (-1 for rows that are no source, the logits) and
    `layer_R` the row's layer. Rows only read columns of lower-layer rows, so ordered by
    layer the feature block of M is strictly lower triangular and x on the feature rows
    solves x (I - M_FF) = w M_RF exactly (in float64; the
    final product over all columns runs in the dtype of `normed_RC`). Returns float64 [C].
    """
    feat_F = torch.nonzero(own_col_R >= 0).flatten()
    feat_F = feat_F[torch.argsort(layer_R[feat_F], stable=True)]
    M_RF = normed_RC[:, own_col_R[feat_F]].double()
    w_R = weight_R.double()
    direct_F = w_R @ M_RF
    eye = torch.eye(len(feat_F), dtype=torch.float64, device=M_RF.device)
    # x (I - M_FF) = direct  <=>  (I - M_FF)^T x^T = direct^T, upper triangular
    x_F = torch.linalg.solve_triangular(
        (eye - M_RF[feat_F]).T, direct_F[:, None], upper=True, unitriangular=True
    )[:, 0]
    total_R = w_R.clone()
    total_R[feat_F] += x_F
    return (total_R.to(normed_RC.dtype) @ normed_RC).double()


def top_share_mask(values: torch.Tensor, share: float) -> torch.Tensor:
    """The largest values that together hold `share` of the total (ties at the cut kept).

    Values must be >= 0; zeros are never kept.
    """
    flat = values.reshape(-1).double()
    total = flat.sum()
    if total <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    sorted_vals = torch.sort(flat, descending=True).values
    cum = torch.cumsum(sorted_vals, 0)
    n_keep = int(torch.searchsorted(cum, share * total).clamp(max=len(cum) - 1)) + 1
    cut = sorted_vals[n_keep - 1]
    return (values >= cut.to(values.dtype)) & (values > 0)


@dataclass
class GraphCounts:
    """Node counts per kind, in node order [features | errors | tokens | logits]."""

    n_features: int
    n_errors: int
    n_tokens: int
    n_logits: int

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens + self.n_logits

    @property
    def row_nodes(self) -> torch.Tensor:
        """The node index of every adjacency row ([features | logits])."""
        return torch.cat(
            [
                torch.arange(self.n_features),
                torch.arange(self.n_nodes - self.n_logits, self.n_nodes),
            ]
        )


@dataclass
class PruneResult:
    node_mask_N: torch.Tensor
    """Nodes kept."""
    edge_mask_RN: torch.Tensor
    """Edges kept, in the row form of the adjacency."""
    influence_N: torch.Tensor
    """Influence of every node on the logits in the unpruned graph (float64; 0 for logits)."""
    replacement_score: float
    completeness_score: float


def node_influence(
    adj_RN: torch.Tensor,
    counts: GraphCounts,
    logit_probs: torch.Tensor,
    feature_layer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised |A|, influence of every node on the logits) of a step graph."""
    n_f, n_l = counts.n_features, counts.n_logits
    normed_RN = normalize_rows(adj_RN)
    weight_R = torch.cat([torch.zeros(n_f, dtype=torch.float64), logit_probs.double().cpu()])
    own_R = torch.cat([torch.arange(n_f), torch.full((n_l,), -1)])
    layer_R = torch.cat([feature_layer.long().cpu(), torch.zeros(n_l, dtype=torch.long)])
    return normed_RN, column_influence(normed_RN, weight_R.to(adj_RN.device), own_R, layer_R)


def graph_scores(
    normed_RN: torch.Tensor,
    influence_N: torch.Tensor,
    counts: GraphCounts,
    logit_probs: torch.Tensor,
) -> tuple[float, float]:
    """(replacement score, completeness score) of an unpruned step graph.

    Replacement: the share of the end-to-end influence on the logits that starts at token
    nodes rather than at error nodes (the two kinds of pure sources). Completeness: over the
    nodes with incoming edges (features, logits), weighted by their influence (probability
    for logits), the share of their normalised incoming weight that does not come directly
    from an error node.
    """
    n_f, n_e, n_t = counts.n_features, counts.n_errors, counts.n_tokens
    err = slice(n_f, n_f + n_e)
    tok = slice(n_f + n_e, n_f + n_e + n_t)
    token_inf, error_inf = float(influence_N[tok].sum()), float(influence_N[err].sum())
    replacement = token_inf / (token_inf + error_inf) if token_inf + error_inf > 0 else 0.0
    out_R = influence_N[counts.row_nodes].clone()
    out_R[n_f:] += logit_probs.double().cpu()
    error_share_R = normed_RN[:, err].double().sum(1).cpu()
    completeness = (
        float((out_R * (1 - error_share_R)).sum() / out_R.sum()) if out_R.sum() > 0 else 0.0
    )
    return replacement, completeness


def prune(
    adj_RN: torch.Tensor,
    counts: GraphCounts,
    logit_probs: torch.Tensor,
    feature_layer: torch.Tensor,
    node_threshold: float,
    edge_threshold: float,
) -> PruneResult:
    """Prune a step graph by influence on its logits.

    Nodes: the smallest set holding `node_threshold` of the total node influence, plus every
    token and logit node. Edges, on the graph cut to those nodes and renormalised: score =
    normalised |weight| x (influence + probability) of its target; keep the smallest set
    holding `edge_threshold` of the total score. Then repeatedly drop feature and error
    nodes without a kept outgoing edge and features without a kept incoming edge (with their
    edges); token and logit nodes always stay.
    """
    adj_RN = adj_RN.cpu()
    n_f, N = counts.n_features, counts.n_nodes
    rows = counts.row_nodes
    normed_RN, influence_N = node_influence(adj_RN, counts, logit_probs, feature_layer)
    replacement, completeness = graph_scores(normed_RN, influence_N, counts, logit_probs)

    always = torch.zeros(N, dtype=torch.bool)
    always[n_f + counts.n_errors :] = True  # tokens and logits
    node_mask = top_share_mask(influence_N, node_threshold) | always

    kept_RN = adj_RN * node_mask[rows][:, None] * node_mask[None, :]
    normed_kept_RN, influence_kept_N = node_influence(kept_RN, counts, logit_probs, feature_layer)
    target_R = influence_kept_N[rows].clone()
    target_R[n_f:] += logit_probs.double().cpu()
    edge_mask = top_share_mask(normed_kept_RN.double() * target_R[:, None], edge_threshold)

    prunable = torch.zeros(N, dtype=torch.bool)
    prunable[: n_f + counts.n_errors] = True  # features and errors
    while True:
        has_out_N = edge_mask.any(0)
        has_in_N = torch.zeros(N, dtype=torch.bool)
        has_in_N[rows] = edge_mask.any(1)
        has_in_N[n_f:] = True  # only features need an incoming edge
        new_mask = node_mask & (~prunable | has_out_N) & has_in_N
        if torch.equal(new_mask, node_mask):
            break
        node_mask = new_mask
        edge_mask &= node_mask[rows][:, None] & node_mask[None, :]
    return PruneResult(node_mask, edge_mask, influence_N, replacement, completeness)


def to_step_graph(
    trace_id: str,
    step: int,
    position: int,
    nodes: dict[str, np.ndarray],
    adj_RN: torch.Tensor,
    counts: GraphCounts,
    result: PruneResult,
    scores: dict[str, float],
) -> StepGraph:
    """The pruned `StepGraph` from an unpruned node table and a pruning result.

    `nodes` holds the node columns kind, layer, pos, feature, activation (all N nodes).
    """
    keep_N = result.node_mask_N.numpy()
    new_index = np.cumsum(keep_N) - 1
    rows = counts.row_nodes.numpy()
    r_E, src_E = np.nonzero(result.edge_mask_RN.numpy())
    influence = result.influence_N.numpy().astype(np.float32)
    influence[counts.n_nodes - counts.n_logits :] = nodes["activation"][
        counts.n_nodes - counts.n_logits :
    ]
    return StepGraph(
        trace_id=trace_id,
        step=step,
        position=position,
        kind=nodes["kind"][keep_N],
        layer=nodes["layer"][keep_N],
        pos=nodes["pos"][keep_N],
        feature=nodes["feature"][keep_N],
        activation=nodes["activation"][keep_N],
        influence=influence[keep_N],
        src=new_index[src_E].astype(np.int32),
        dst=new_index[rows[r_E]].astype(np.int32),
        weight=adj_RN.cpu().numpy()[r_E, src_E].astype(np.float32),
        scores={
            **scores,
            "replacement_score": result.replacement_score,
            "completeness_score": result.completeness_score,
        },
    )
