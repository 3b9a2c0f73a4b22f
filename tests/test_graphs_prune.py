"""Influence, pruning and scores on hand-built adjacency matrices with known answers."""

from __future__ import annotations

import numpy as np
import torch

from crv.graphs.prune import (
    GraphCounts,
    column_influence,
    graph_scores,
    node_influence,
    prune,
    top_share_mask,
)

# Nodes: f0 (layer 0), f1 (layer 1) | e0 | t0, t1 | logit.  Rows: f0, f1, logit.
#   f0 <- t0 (1), e0 (1)          f1 <- f0 (3), t1 (-1)         logit <- f1 (2), t0 (6)
COUNTS = GraphCounts(n_features=2, n_errors=1, n_tokens=2, n_logits=1)
ADJ = torch.tensor(
    [
        # f0   f1   e0   t0   t1   logit
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0],  # f0
        [3.0, 0.0, 0.0, 0.0, -1.0, 0.0],  # f1 (a negative edge: |.| counts)
        [0.0, 2.0, 0.0, 6.0, 0.0, 0.0],  # logit
    ]
)
PROBS = torch.tensor([0.5])
LAYERS = torch.tensor([0, 1])


def test_influence_by_hand() -> None:
    # normalised: f0 = [e0 .5, t0 .5]; f1 = [f0 .75, t1 .25]; logit = [f1 .25, t0 .75]
    # influence (w = 0.5 on the logit): f1 = .125, f0 = .125 * .75, t0 = .375 + f0 / 2
    _, inf = node_influence(ADJ, COUNTS, PROBS, LAYERS)
    f0 = 0.5 * 0.25 * 0.75
    expected = [f0, 0.125, f0 * 0.5, 0.375 + f0 * 0.5, 0.125 * 0.25, 0.0]
    np.testing.assert_allclose(inf.numpy(), expected, atol=1e-12)


def test_influence_is_the_power_series() -> None:
    """w (M + M^2 + ...) on a random layered DAG, against explicit matrix powers."""
    rng = np.random.default_rng(0)
    counts = GraphCounts(n_features=12, n_errors=5, n_tokens=4, n_logits=3)
    layers = np.sort(rng.integers(0, 4, counts.n_features))
    N, rows = counts.n_nodes, counts.row_nodes.numpy()
    dense = np.zeros((N, N))
    for r in rows:
        dense[r, counts.n_features : N - counts.n_logits] = rng.normal(
            size=N - counts.n_logits - counts.n_features
        )
        if r < counts.n_features:  # features read lower-layer features only
            dense[r, : counts.n_features] = rng.normal(size=counts.n_features) * (
                layers < layers[r]
            )
        else:
            dense[r, : counts.n_features] = rng.normal(size=counts.n_features)
    perm = rng.permutation(counts.n_features)  # the solve must not rely on the node order
    dense[: counts.n_features] = dense[perm]
    dense[:, : counts.n_features] = dense[:, perm]
    layers = layers[perm]
    probs = rng.dirichlet(np.ones(counts.n_logits))
    M = np.abs(dense) / np.maximum(np.abs(dense).sum(1, keepdims=True), 1e-300)
    w = np.zeros(N)
    w[-counts.n_logits :] = probs
    expected = sum(w @ np.linalg.matrix_power(M, k) for k in range(1, 8))
    _, inf = node_influence(
        torch.tensor(dense[rows]), counts, torch.tensor(probs), torch.tensor(layers)
    )
    np.testing.assert_allclose(inf.numpy(), expected, atol=1e-10)


def test_column_influence_of_logit_rows_only() -> None:
    normed = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    inf = column_influence(
        normed, torch.tensor([0.4, 0.6]), torch.tensor([-1, -1]), torch.tensor([0, 0])
    )
    np.testing.assert_allclose(inf.numpy(), [0.7, 0.3], atol=1e-7)


def test_top_share_mask() -> None:
    v = torch.tensor([0.125, 0.5, 0.0, 0.25, 0.125])
    assert top_share_mask(v, 0.5).tolist() == [False, True, False, False, False]
    assert top_share_mask(v, 0.75).tolist() == [False, True, False, True, False]
    assert top_share_mask(v, 0.8).tolist() == [True, True, False, True, True]  # ties at the cut
    assert top_share_mask(v, 1.0).tolist() == [True, True, False, True, True]  # zeros never
    assert not top_share_mask(torch.zeros(3), 0.9).any()


def test_scores_by_hand() -> None:
    normed, inf = node_influence(ADJ, COUNTS, PROBS, LAYERS)
    replacement, completeness = graph_scores(normed, inf, COUNTS, PROBS)
    token_inf = float(inf[3] + inf[4])
    assert replacement == np.float64(token_inf / (token_inf + float(inf[2])))
    # f0 takes half its input from e0; f1 and the logit none
    out = np.array([inf[0], inf[1], 0.5])
    assert np.isclose(completeness, (out @ [0.5, 1.0, 1.0]) / out.sum())


def test_prune_keeps_the_influential_part() -> None:
    # Node influence: t0 .421875, f1 .125, f0 .09375, e0 .046875, t1 .03125 (total .71875);
    # the top 60% are t0 and f1, then tokens and logits are added.
    result = prune(ADJ, COUNTS, PROBS, LAYERS, node_threshold=0.6, edge_threshold=1.0)
    # f0 (and with it e0) dropped: f1 keeps only its edge from t1
    assert result.node_mask_N.tolist() == [False, True, False, True, True, True]
    kept_edges = {
        (int(r), int(c))
        for r, c in zip(*torch.nonzero(result.edge_mask_RN, as_tuple=True), strict=True)
    }
    assert kept_edges == {(1, 4), (2, 1), (2, 3)}
    # edge scores on the cut graph: t0 -> logit .375, f1 -> logit .125, t1 -> f1 .125; at 55%
    # only t0 -> logit stays, f1 has no outgoing edge left and goes; tokens and logit stay
    result = prune(ADJ, COUNTS, PROBS, LAYERS, node_threshold=0.6, edge_threshold=0.55)
    assert result.node_mask_N.tolist() == [False, False, False, True, True, True]
    assert {
        (int(r), int(c))
        for r, c in zip(*torch.nonzero(result.edge_mask_RN, as_tuple=True), strict=True)
    } == {(2, 3)}
