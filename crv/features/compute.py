"""Graph features of a step's pruned attribution graph (the `features` stage).

Each pruned `StepGraph` becomes one fixed-length vector of 23 + n_layers numbers (55 for a
32-layer model, as in CRV), in three families. Undefined values (for example the top logit
probability of a graph without logit nodes) are NaN, which xgboost treats as missing.

**global** - the size and confidence of the computation:

- `total_active_features`: transcoder features active anywhere in the explained prefix
  before pruning (the graph's `n_active_features` score).
- `n_feature_nodes`, `n_error_nodes`: feature and error nodes kept by pruning.
- `top_logit_prob`: probability of the most likely attributed logit.
- `logit_entropy`: Shannon entropy (nats) of the attributed logits' probabilities
  renormalised to sum to one: -sum p_i log p_i, 0 for a single logit.
  A whole-step graph (logits at several positions) takes both per position, then the
  least certain one: the lowest top probability, the highest entropy.

**node** - how influence and activation are spread:

- `mean_node_influence`: mean `influence` (on the logits) over feature, error and token
  nodes; logit nodes are left out because their `influence` is their probability.
- `error_influence_total`, `error_influence_mean`: sum and mean influence of error nodes
  (0 without error nodes): how much of the explanation the transcoders failed to capture.
- `feature_act_mean`, `feature_act_max`, `feature_act_std`: activation statistics of the
  kept feature nodes (population std; 0 without feature nodes).
- `layer_hist_<l>` for l = 0 .. n_layers-1: number of kept feature nodes in layer l.

**topology** - shape of the pruned DiGraph (source -> target, signed weights):

- `edge_weight_sum`, `edge_weight_mean`, `edge_weight_std`: of the signed edge weights.
- `n_edges`; `density` = E / (N (N - 1)) (directed).
- `n_weak_components`: weakly connected components.
- `degree_centrality_mean`, `degree_centrality_max`: (in + out degree) / (N - 1).
- `betweenness_mean`, `betweenness_max`: weighted betweenness centrality, normalised by
  (N - 1)(N - 2). Shortest paths need a length, and a strong edge should make two nodes
  *close*, so an edge's length is 1 / |weight| (a path of strong effects is short; a weak
  link is a long detour). Exact on graphs of at most `betweenness_exact_max_nodes` nodes;
  above that the k-source estimate (Brandes & Pich 2007, `betweenness_k` pivots drawn with
  the run's seed, so repeatable): exact betweenness costs O(N E + N^2 log N) per graph,
  seconds for a few hundred nodes in networkx, while k pivots cost k / N of that.
- `avg_shortest_path_lwcc`: mean shortest-path length in hops over all pairs of nodes of
  the largest weakly connected component, taken undirected (the directed component is
  generally not strongly connected, where the directed average is undefined). Computed
  with scipy's breadth-first `shortest_path` (identical to networkx's
  `average_shortest_path_length` on the undirected component, tested; much faster).
- `token_logit_shortest_path`: length (sum of 1 / |weight|) of the shortest directed path
  from any input-token node to any logit node; -1 if no logit is reachable from a token.

Edges of weight exactly 0 carry no effect and are left out of the topology.

**identity** (optional, `features.identity`) - *which* features carry the step's
computation, not just how many: `id_L<l>_F<f>` is the summed influence of the kept nodes of
transcoder feature f of layer l (over positions) and `err_L<l>` the summed influence of the
kept error nodes of layer l. A node absent from the graph (or of zero influence) is
*missing*, not 0: the family is stored as a sparse matrix (`identity.npz`, rows aligned with
the feature table, columns named in `features.json`'s `identity_names`, the union over all
step graphs) and xgboost treats entries a sparse matrix does not store as missing. A model
with 100k features per layer gives a long, very sparse vocabulary; thousands of Parquet
columns would not do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import networkx as nx
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

from crv.features.config import FeaturesConfig
from crv.graphs.graph import ERROR, FEATURE, LOGIT, TOKEN, StepGraph

HIST_PREFIX = "layer_hist_"


FEATURE_FAMILIES: dict[str, str] = {
    "total_active_features": "global",
    "n_feature_nodes": "global",
    "n_error_nodes": "global",
    "top_logit_prob": "global",
    "logit_entropy": "global",
    "mean_node_influence": "node",
    "error_influence_total": "node",
    "error_influence_mean": "node",
    "feature_act_mean": "node",
    "feature_act_max": "node",
    "feature_act_std": "node",
    HIST_PREFIX + "<l>": "node",
    "edge_weight_sum": "topology",
    "edge_weight_mean": "topology",
    "edge_weight_std": "topology",
    "n_edges": "topology",
    "density": "topology",
    "n_weak_components": "topology",
    "degree_centrality_mean": "topology",
    "degree_centrality_max": "topology",
    "betweenness_mean": "topology",
    "betweenness_max": "topology",
    "avg_shortest_path_lwcc": "topology",
    "token_logit_shortest_path": "topology",
}
"""Family of every feature; the per-layer histogram columns `layer_hist_0`, `layer_hist_1`,
... all share the entry `layer_hist_<l>` (use `family_of`)."""


FAMILIES = ("global", "node", "topology", "identity")


IDENTITY_NAME = re.compile(r"^(id_L\d+_F\d+|err_L\d+)$")
"""Names of the identity family's columns."""


def feature_names(n_layers: int) -> list[str]:
    """Feature columns in table order for a model with `n_layers` layers."""
    names: list[str] = []
    for name in FEATURE_FAMILIES:
        if name == HIST_PREFIX + "<l>":
            names.extend(f"{HIST_PREFIX}{layer}" for layer in range(n_layers))
        else:
            names.append(name)
    return names


def family_of(name: str) -> str:
    """The family (`global`, `node`, `topology` or `identity`) of a feature column."""
    if name.startswith(HIST_PREFIX) and name[len(HIST_PREFIX) :].isdigit():
        return FEATURE_FAMILIES[HIST_PREFIX + "<l>"]
    if IDENTITY_NAME.match(name):
        return "identity"
    return FEATURE_FAMILIES[name]


def graph_features(
    g: StepGraph, n_layers: int, cfg: FeaturesConfig | None = None, seed: int = 0
) -> dict[str, float]:
    """All features of one step graph: `feature_names(n_layers)` and, when `cfg.identity`,
    the identity entries of the nodes in the graph (`identity_features`)."""
    cfg = cfg or FeaturesConfig()
    out = _aggregate_features(g, n_layers, cfg, seed)
    if cfg.identity:
        out.update(identity_features(g))
    return out


def _aggregate_features(
    g: StepGraph, n_layers: int, cfg: FeaturesConfig, seed: int
) -> dict[str, float]:
    out = _global_features(g)
    out.update(_node_features(g, n_layers))
    out.update(_topology_features(g, cfg, seed))
    return out


def identity_features(g: StepGraph) -> dict[str, float]:
    """Summed influence of each (layer, feature) node (`id_L<l>_F<f>`) and of the error
    nodes of each layer (`err_L<l>`) in the graph; zero sums are left out (missing)."""
    out: dict[str, float] = {}
    columns = (g.kind, g.layer, g.feature, g.influence)
    for kind, layer, feature, influence in zip(*(c.tolist() for c in columns), strict=True):
        if kind == FEATURE:
            name = f"id_L{layer}_F{feature}"
        elif kind == ERROR:
            name = f"err_L{layer}"
        else:
            continue
        out[name] = out.get(name, 0.0) + influence
    return {n: v for n, v in out.items() if v != 0}


def _identity_order(name: str) -> tuple[int, int, int]:
    """Sort key of identity names: features by (layer, feature), then error layers."""
    numbers = [int(x) for x in re.findall(r"\d+", name)]
    return (0, *numbers) if name.startswith("id_") else (1, numbers[0], 0)


def identity_matrix(rows: list[dict[str, float]]) -> tuple[csr_matrix, list[str]]:
    """The identity family of `rows` (one dict per step, from `identity_features`) as a
    sparse matrix [n_rows, n_names] storing only the present entries, and its column
    names (the union of the rows' names, features by layer and index, then errors)."""
    names = sorted({n for r in rows for n in r}, key=_identity_order)
    col = {n: j for j, n in enumerate(names)}
    indptr = np.cumsum([0, *(len(r) for r in rows)])
    indices = np.fromiter((col[n] for r in rows for n in r), dtype=np.int64, count=indptr[-1])
    data = np.fromiter((v for r in rows for v in r.values()), dtype=np.float64, count=indptr[-1])
    m = csr_matrix((data, indices, indptr), shape=(len(rows), len(names)))
    m.sort_indices()
    return m, names


def _global_features(g: StepGraph) -> dict[str, float]:
    is_logit = g.kind == LOGIT
    tops, entropies = [], []
    for pos in np.unique(g.pos[is_logit]):  # a whole-step graph: per position, then the worst
        probs = g.activation[is_logit & (g.pos == pos)].astype(np.float64)
        if probs.sum() > 0:
            p = probs / probs.sum()
            p = p[p > 0]
            tops.append(float(probs.max()))
            entropies.append(float(-(p * np.log(p)).sum()))
    top = min(tops) if tops else float("nan")
    entropy = max(entropies) if entropies else float("nan")
    return {
        "total_active_features": float(g.scores.get("n_active_features", np.nan)),
        "n_feature_nodes": float(np.sum(g.kind == FEATURE)),
        "n_error_nodes": float(np.sum(g.kind == ERROR)),
        "top_logit_prob": top,
        "logit_entropy": entropy,
    }


def _node_features(g: StepGraph, n_layers: int) -> dict[str, float]:
    influence = g.influence.astype(np.float64)
    non_logit = influence[g.kind != LOGIT]
    err = influence[g.kind == ERROR]
    is_feat = g.kind == FEATURE
    acts = g.activation[is_feat].astype(np.float64)
    layers = g.layer[is_feat].astype(np.int64)
    hist = np.bincount(layers[(layers >= 0) & (layers < n_layers)], minlength=n_layers)
    out = {
        "mean_node_influence": float(non_logit.mean()) if len(non_logit) else float("nan"),
        "error_influence_total": float(err.sum()),
        "error_influence_mean": float(err.mean()) if len(err) else 0.0,
        "feature_act_mean": float(acts.mean()) if len(acts) else 0.0,
        "feature_act_max": float(acts.max()) if len(acts) else 0.0,
        "feature_act_std": float(acts.std()) if len(acts) else 0.0,
    }
    out.update({f"{HIST_PREFIX}{layer}": float(hist[layer]) for layer in range(n_layers)})
    return out


def _topology_features(g: StepGraph, cfg: FeaturesConfig, seed: int) -> dict[str, float]:
    n = g.n_nodes
    keep = g.weight != 0
    src, dst = g.src[keep].astype(np.int64), g.dst[keep].astype(np.int64)
    w = g.weight[keep].astype(np.float64)
    dg = nx.DiGraph()
    dg.add_nodes_from(range(n))
    dg.add_weighted_edges_from(
        zip(src.tolist(), dst.tolist(), (1.0 / np.abs(w)).tolist(), strict=True), weight="length"
    )
    out = {
        "edge_weight_sum": float(w.sum()),
        "edge_weight_mean": float(w.mean()) if len(w) else 0.0,
        "edge_weight_std": float(w.std()) if len(w) else 0.0,
        "n_edges": float(dg.number_of_edges()),
        "density": float(nx.density(dg)),
        "n_weak_components": float(nx.number_weakly_connected_components(dg)) if n else 0.0,
    }
    deg = np.array(list(nx.degree_centrality(dg).values())) if n > 1 else np.zeros(1)
    out["degree_centrality_mean"] = float(deg.mean())
    out["degree_centrality_max"] = float(deg.max())
    k = None if n <= cfg.betweenness_exact_max_nodes else min(cfg.betweenness_k, n)
    btw = np.array(list(nx.betweenness_centrality(dg, k=k, weight="length", seed=seed).values()))
    out["betweenness_mean"] = float(btw.mean()) if n else 0.0
    out["betweenness_max"] = float(btw.max()) if n else 0.0
    out["avg_shortest_path_lwcc"] = _avg_hops_largest_wcc(dg, n, src, dst)
    tokens = np.flatnonzero(g.kind == TOKEN).tolist()
    logits = set(np.flatnonzero(g.kind == LOGIT).tolist())
    dist = nx.multi_source_dijkstra_path_length(dg, tokens, weight="length") if tokens else {}
    reached = [d for node, d in dist.items() if node in logits]
    out["token_logit_shortest_path"] = float(min(reached)) if reached else -1.0
    return out


def _avg_hops_largest_wcc(dg: nx.DiGraph, n: int, src: np.ndarray, dst: np.ndarray) -> float:
    if n < 2:
        return 0.0
    comp = np.fromiter(max(nx.weakly_connected_components(dg), key=len), dtype=np.int64)
    if len(comp) < 2:
        return 0.0
    adj = csr_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))[comp][:, comp]
    hops = shortest_path(adj, method="D", directed=False, unweighted=True)
    m = len(comp)
    return float(hops.sum() / (m * (m - 1)))


StepRow = tuple[str, dict[str, float], dict[str, float] | None]
"""One step graph's features: (step_id, the aggregate families with `n_prefix_tokens`, the
identity family or None when it is off)."""


def step_row(g: StepGraph, n_layers: int, cfg: FeaturesConfig, seed: int) -> StepRow:
    """The features of one step graph, as `table_from_rows` takes them."""
    dense = {"n_prefix_tokens": int(g.position) + 1, **_aggregate_features(g, n_layers, cfg, seed)}
    return f"{g.trace_id}:{int(g.step)}", dense, identity_features(g) if cfg.identity else None


def infer_n_layers(graphs: Iterable[StepGraph]) -> int:
    """n_layers from the first graph with logit nodes (their `layer` is n_layers)."""
    for g in graphs:
        if np.any(g.kind == LOGIT):
            return int(g.layer[g.kind == LOGIT].max())
    raise ValueError("cannot infer n_layers: no graph has logit nodes; set features.n_layers")
