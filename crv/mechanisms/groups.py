"""Mechanisms from contrastive graphs: group incorrect steps by the features that drive them.

A contrastive graph explains logit(wrong token) - logit(correct token) at the first token
where an incorrect step departs from the correct reduction. A feature *drives* the error
when its effect on that contrast is positive: it pushes the wrong token over the right one.
Its effect is the signed sum over the graph's paths from its nodes to the contrast
(`contrast_effects`): an edge weight is the direct contribution of the source's activation
to the target's pre-activation, so a path's effect is the product of its edge weights, each
after the first divided by the activation of the feature it leaves (its effect per unit).

Steps are grouped without any planted-rule label (`group_steps`): each step is the set of
its drivers ((layer, feature), effects summed over positions, positive); the steps of one
task are clustered by average-linkage agglomeration on the cosine distance of those sets
(1 - |A & B| / sqrt(|A| |B|)), and the dendrogram is cut at the number of groups (2 to
`max_groups`) with the highest mean silhouette; no cut when fewer than 3 steps. Sets rather
than effect sizes, because one or two output features at the departure carry most of a
step's effect and differ with the wrong digit; on the training split's planted-rule steps
of crv-tiny-bugs the sets grouped each rule's steps together more often (the comparison is
in the README). A group's top features are those with the largest mean effect (each step's
effects scaled to unit length) over its steps (`group_features`): the features that drive
that group's errors, named by their cards.

Per planted rule (`rule_recall`), the rule's group is the group holding most of the rule's
incorrect steps (ties: the smaller group id); recall is the share of the rule's steps in it
and purity the share of the group's steps that exercise the rule. Labels are used only here,
to score the grouping, never to form it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crv.graphs.graph import FEATURE, LOGIT, StepGraph

FeatureKey = tuple[int, int]
"""(layer, feature index)."""
Drivers = Mapping[FeatureKey, float]
"""A step's features and their effect on the contrast (positive: pushes the wrong token)."""


def contrast_effects(graph: StepGraph) -> dict[FeatureKey, float]:
    """Signed effect of every feature of a contrastive graph on its logit node(s), summed
    over the feature's nodes (see the module docstring): targets are processed from the
    logits down the layers, so each node's effect is final before any node that feeds it."""
    n = graph.n_nodes
    per_unit_N = np.zeros(n)
    per_unit_N[graph.kind == LOGIT] = 1.0
    effect_N = np.zeros(n)
    feat = graph.kind == FEATURE
    src, dst, weight = graph.src, graph.dst, graph.weight.astype(np.float64)
    for layer in np.unique(graph.layer[feat])[::-1]:
        nodes = np.flatnonzero(feat & (graph.layer == layer))
        out = np.isin(src, nodes)
        np.add.at(effect_N, src[out], weight[out] * per_unit_N[dst[out]])
        act = graph.activation[nodes].astype(np.float64)
        per_unit_N[nodes] = np.divide(
            effect_N[nodes], act, out=np.zeros(len(nodes)), where=act != 0
        )
    drivers: dict[FeatureKey, float] = {}
    for i in np.flatnonzero(feat):
        key = (int(graph.layer[i]), int(graph.feature[i]))
        drivers[key] = drivers.get(key, 0.0) + float(effect_N[i])
    return drivers


def driver_matrix(
    drivers: Sequence[Drivers],
) -> tuple[np.ndarray, list[FeatureKey]]:
    """Steps x features, each row the step's positive effects scaled to unit length (a step
    with no driver is a zero row), and the features (sorted) of the columns."""
    units = sorted({k for d in drivers for k, v in d.items() if v > 0})
    col = {k: j for j, k in enumerate(units)}
    X_SU = np.zeros((len(drivers), len(units)))
    for i, d in enumerate(drivers):
        for k, v in d.items():
            if v > 0:
                X_SU[i, col[k]] = v
    norms_S1 = np.linalg.norm(X_SU, axis=1, keepdims=True)
    return np.divide(X_SU, norms_S1, out=np.zeros_like(X_SU), where=norms_S1 > 0), units


def group_steps(X_SU: np.ndarray, max_groups: int) -> np.ndarray:
    """Group ids (0 = largest group, ties by first step) of the rows of a driver matrix:
    average linkage on the cosine distance of the rows' driver sets (non-zero entries), cut
    at the number of groups in 2..`max_groups` with the best mean silhouette. Fewer than 3
    steps, or rows that are all alike, make one group."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist, squareform
    from sklearn.metrics import silhouette_score

    n = len(X_SU)
    if n < 3:
        return np.zeros(n, dtype=np.int64)
    # a zero row (no driver) is at distance 1 from every other row
    dist = np.clip(np.nan_to_num(pdist(X_SU > 0, "cosine"), nan=1.0), 0.0, 2.0)
    if not (dist > 1e-12).any():
        return np.zeros(n, dtype=np.int64)
    tree = linkage(dist, method="average")
    square = squareform(dist)
    best, best_score = np.zeros(n, dtype=np.int64), -np.inf
    for k in range(2, min(max_groups, n - 1) + 1):
        labels = fcluster(tree, k, criterion="maxclust")
        if len(np.unique(labels)) < 2:
            continue
        score = silhouette_score(square, labels, metric="precomputed")
        if score > best_score + 1e-12:
            best, best_score = labels, score
    return _by_size(best)


def _by_size(labels_S: np.ndarray) -> np.ndarray:
    """Relabel so that group 0 is the largest, ties broken by the earliest step."""
    ids, first, counts = np.unique(labels_S, return_index=True, return_counts=True)
    order = sorted(range(len(ids)), key=lambda i: (-counts[i], first[i]))
    remap = {ids[i]: g for g, i in enumerate(order)}
    return np.array([remap[x] for x in labels_S], dtype=np.int64)


def group_features(
    X_SU: np.ndarray, labels_S: np.ndarray, units: Sequence[FeatureKey], group: int, k: int
) -> list[dict[str, Any]]:
    """The `k` features with the largest mean scaled effect over the group's steps (ties by
    (layer, feature)): layer, feature, that mean, and the share of the group's steps it
    drives at all."""
    rows = X_SU[labels_S == group]
    if not len(rows):
        return []
    mean_U, share_U = rows.mean(0), (rows > 0).mean(0)
    order = sorted(np.flatnonzero(mean_U > 0), key=lambda j: (-mean_U[j], units[j]))[:k]
    return [
        {
            "layer": int(units[j][0]),
            "feature": int(units[j][1]),
            "mean_drive": float(mean_U[j]),
            "share_of_steps": float(share_U[j]),
        }
        for j in order
    ]


def rule_recall(labels_S: np.ndarray, of_rule_S: np.ndarray) -> dict[str, Any]:
    """The rule's group (most of the rule's steps, ties by smaller id), the recall (share of
    the rule's steps in it), its purity (share of its steps that are the rule's) and sizes."""
    of_rule_S = np.asarray(of_rule_S, dtype=bool)
    n = int(of_rule_S.sum())
    if n == 0:
        return {"n_steps": 0, "group": None, "recall": None, "purity": None}
    counts = np.bincount(labels_S[of_rule_S], minlength=int(labels_S.max()) + 1)
    group = int(np.argmax(counts))
    size = int((labels_S == group).sum())
    return {
        "n_steps": n,
        "group": group,
        "group_size": size,
        "recall": float(counts[group] / n),
        "purity": float(counts[group] / size),
    }
