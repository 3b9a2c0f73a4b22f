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

import dataclasses
import re
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix, load_npz, save_npz
from scipy.sparse.csgraph import shortest_path

from crv.features.config import FeaturesConfig
from crv.graphs.graph import ERROR, FEATURE, LOGIT, TOKEN, StepGraph
from crv.graphs.store import read_step_graphs
from crv.io import atomic_write, atomic_write_json, read_json
from crv.pipeline import StageContext, artifact_config
from crv.traces.steps import KEY_COLUMNS, step_key_table

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

TABLE_FILE = "features.parquet"
META_FILE = "features.json"
IDENTITY_FILE = "identity.npz"


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


def trace_rows(
    n_layers: int, cfg: FeaturesConfig, seed: int, items: list[tuple[Path, Path]]
) -> None:
    """The work of one executor shard: for each (trace's graph file, result file), the
    `step_row` of every step graph of the trace, written to the result file as JSON
    (floats round-trip exactly, NaN included)."""
    for graph_file, out in items:
        rows = [step_row(g, n_layers, cfg, seed) for g in read_step_graphs(graph_file)]
        atomic_write_json(out, [list(r) for r in rows])


def read_trace_rows(path: Path) -> list[StepRow]:
    """The rows `trace_rows` wrote to `path`."""
    return [(step_id, dense, identity) for step_id, dense, identity in read_json(path)]


def feature_table(
    graphs: Iterable[StepGraph],
    keys: pd.DataFrame,
    n_layers: int,
    cfg: FeaturesConfig,
    seed: int,
) -> pd.DataFrame:
    """The feature table of step graphs held in memory (the stage computes the same from
    the graph files, `trace_rows`)."""
    rows = [step_row(g, n_layers, cfg, seed) for g in graphs]
    return table_from_rows(rows, keys, n_layers, cfg.identity)


def table_from_rows(
    rows: list[StepRow], keys: pd.DataFrame, n_layers: int, identity: bool
) -> pd.DataFrame:
    """The feature table: `KEY_COLUMNS` (from `keys`, n_prefix_tokens = position + 1)
    followed by `feature_names(n_layers)`, one row per step row (every step must be in
    `keys`), sorted by trace and step; with `identity`, then the identity family as pandas
    sparse columns (`identity_matrix`; absent entries are missing)."""
    names = feature_names(n_layers)
    feats = pd.DataFrame(
        [{"step_id": step_id, **f} for step_id, f, _ in rows],
        columns=["step_id", "n_prefix_tokens", *names],
    )
    unknown = feats.loc[~feats["step_id"].isin(keys["step_id"]), "step_id"]
    if len(unknown):
        raise ValueError(f"graphs of steps missing from the traces, e.g. {unknown.iloc[0]}")
    key_cols = [c for c in KEY_COLUMNS if c != "n_prefix_tokens"]
    table = keys[key_cols].merge(feats, on="step_id", how="inner", validate="one_to_one")
    table = table[[*KEY_COLUMNS, *names]].astype({n: np.float64 for n in names})
    table = table.sort_values(["trace_id", "step"], kind="stable").reset_index(drop=True)
    if not identity:
        return table
    identity_of = {step_id: ident for step_id, _, ident in rows}
    matrix, id_names = identity_matrix([identity_of[s] for s in table["step_id"]])
    return with_identity(table, matrix, id_names)


def with_identity(table: pd.DataFrame, matrix: csr_matrix, names: list[str]) -> pd.DataFrame:
    """`table` with the identity block [n_rows, n_names] appended as sparse columns."""
    sparse = pd.DataFrame.sparse.from_spmatrix(matrix, index=table.index, columns=names)
    return pd.concat([table, sparse], axis=1)


def split_identity(table: pd.DataFrame) -> tuple[pd.DataFrame, csr_matrix, list[str]]:
    """(the table without identity columns, the identity block as CSR, its names)."""
    names = [c for c in table.columns if IDENTITY_NAME.match(c)]
    dense = table.drop(columns=names)
    if not names:
        return dense, csr_matrix((len(table), 0)), names
    return dense, table[names].sparse.to_coo().tocsr(), names


def infer_n_layers(graphs: Iterable[StepGraph]) -> int:
    """n_layers from the first graph with logit nodes (their `layer` is n_layers)."""
    for g in graphs:
        if np.any(g.kind == LOGIT):
            return int(g.layer[g.kind == LOGIT].max())
    raise ValueError("cannot infer n_layers: no graph has logit nodes; set features.n_layers")


def run_stage(ctx: StageContext[FeaturesConfig]) -> dict[str, Any]:
    """`features` stage: one row of graph features per step graph (+ the identity block).
    Traces are computed by `crv.executor` (in this process, or sharded over Ray workers),
    one result file per trace in the scratch directory, then merged: every step's features
    depend only on its graph, the config and the seed, so both give the same table."""
    from urllib.parse import quote

    from crv.executor import run_sharded
    from crv.graphs.store import iter_step_graphs, trace_file, trace_ids
    from crv.traces.stage import load_traces

    cfg: FeaturesConfig = ctx.cfg
    t0 = time.perf_counter()
    keys = step_key_table(load_traces(ctx.inputs["traces"]))
    if cfg.n_layers is None:
        n_layers = infer_n_layers(iter_step_graphs(ctx.inputs["graphs"]))
    else:
        n_layers = cfg.n_layers
    ids = trace_ids(ctx.inputs["graphs"])
    graph_files = [trace_file(ctx.inputs["graphs"], trace_id) for trace_id in ids]
    files = [ctx.scratch / "features" / f"{quote(t, safe='')}.json" for t in ids]
    work = partial(trace_rows, n_layers, cfg, ctx.seed)
    cpu_only = dataclasses.replace(ctx.runtime, gpus_per_worker=0.0)  # graphs in, numbers out
    n_resumed = run_sharded(graph_files, files, work, cpu_only, "cpu", "traces", ctx.log)
    rows = [row for f in files for row in read_trace_rows(f)]
    table, matrix, identity_names = split_identity(
        table_from_rows(rows, keys, n_layers, cfg.identity)
    )
    atomic_write(ctx.out / TABLE_FILE, lambda p: table.to_parquet(p, index=False))
    if cfg.identity:
        atomic_write(ctx.out / IDENTITY_FILE, lambda p: _save_sparse(p, matrix))
    names = feature_names(n_layers)
    atomic_write_json(
        ctx.out / META_FILE,
        {
            "n_layers": n_layers,
            "feature_names": names,
            "families": {n: family_of(n) for n in names},
            "identity_names": identity_names,
            "config": dataclasses.asdict(cfg),
            "seed": ctx.seed,
        },
    )
    seconds = time.perf_counter() - t0
    labelled = table[table["label"] >= 0]
    ctx.log.info("features: %d step graphs, %d features, %.1f s", len(table), len(names), seconds)
    out = {
        "n_steps": len(table),
        "n_labelled": len(labelled),
        "n_incorrect": int((labelled["label"] == 1).sum()),
        "n_features": len(names),
        "n_layers": n_layers,
        "n_resumed_traces": n_resumed,
        "seconds_per_graph": seconds / max(len(table), 1),
    }
    if cfg.identity:
        out["n_identity_columns"] = len(identity_names)
        out["identity_entries_per_step"] = matrix.nnz / max(len(table), 1)
    return out


def _save_sparse(path: Path, matrix: csr_matrix) -> None:
    with open(path, "wb") as f:
        save_npz(f, matrix, compressed=True)


def load_feature_table(path: str | Path, identity: bool = True) -> pd.DataFrame:
    """The feature table written by the `features` stage (`KEY_COLUMNS` + features); with
    `identity`, and when the artifact has the identity family, its columns are appended as
    pandas sparse columns (absent entries = missing)."""
    table = pd.read_parquet(Path(path) / TABLE_FILE)
    if "planted_rule" not in table.columns:  # artifacts from before the column existed
        table.insert(table.columns.get_loc("label") + 1, "planted_rule", "")
    block = load_identity(path) if identity else None
    return table if block is None else with_identity(table, *block)


def load_identity(path: str | Path) -> tuple[csr_matrix, list[str]] | None:
    """The identity family of a `features` artifact: sparse matrix [n_steps, n_names]
    (rows aligned with `load_feature_table`) and column names; None when it has none."""
    file = Path(path) / IDENTITY_FILE
    if not file.is_file():
        return None
    names = load_feature_meta(path).get("identity_names") or []
    matrix = load_npz(file).tocsr()
    if matrix.shape[1] != len(names):
        raise ValueError(
            f"{file}: {matrix.shape[1]} identity columns, but {len(names)} names in {META_FILE}"
        )
    return matrix, names


def load_feature_names(path: str | Path) -> list[str]:
    """Aggregate feature columns of a `features` artifact, in table order (the identity
    family's names come with `load_identity`)."""
    return list(load_feature_meta(path)["feature_names"])


def load_features_config(path: str | Path) -> FeaturesConfig:
    """The settings a `features` artifact's features were computed with."""
    return FeaturesConfig(**artifact_config(path))


def load_feature_meta(path: str | Path) -> dict:
    """n_layers, feature names, families, config and seed of a `features` artifact: what
    `graph_features` needs to compute identical features for new graphs."""
    return read_json(Path(path) / META_FILE)
