"""The `mechanisms` stage: what the graphs of incorrect steps have that correct ones lack.

On the test steps of each task (labelled, with a graph), every unit of the step graphs (a
transcoder feature, a layer's feature nodes, a layer's error nodes; see `stats`) is tested
for over-representation in incorrect steps: Fisher's exact test on presence, Mann-Whitney U
on summed influence in the graphs that contain it, Benjamini-Hochberg over both, with the
log odds ratio, presence rates and influence AUC as effect sizes and the feature's card
label. Features are tested when
they appear in at least `min_steps` of the task's test graphs; layers and error nodes
always. With planted rules (`crv.tasks.bugs`) and a `planted_rule` step column, the same
test per rule measures whether the top features point at the rule's trigger (`planted`).
When the graphs artifact holds contrastive graphs (`graphs.contrastive`), the incorrect test
steps are also grouped by the features that drive them (`contrastive`, see `groups`), and
`planted.<rule>` scores each rule against that grouping (its group, `recall`, `purity`,
`precision` of the group's top features; the presence-based result under `presence`).

Artifact: `mechanisms.parquet`, every tested unit of every task (columns `task`, `kind`,
`layer`, `feature`, `card`, the statistics of `stats.STAT_COLUMNS`, `q_fisher`, `q_mwu`,
`q`, `significant`), ranked within each task. Report key `mechanisms`: per task the counts
and the top `top_n` features and every layer row; `planted.<rule>.precision` and details.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from crv.io import atomic_write
from crv.mechanisms.config import MechanismsConfig
from crv.mechanisms.contrastive import contrastive_mechanisms
from crv.mechanisms.planted import load_rules, recover_rule
from crv.mechanisms.stats import add_fdr, unit_tests
from crv.pipeline import StageContext

TABLE_FILE = "mechanisms.parquet"
KINDS = ("feature", "layer", "error")
_ROW_COLUMNS = (
    "layer",
    "feature",
    "card",
    "rate_incorrect",
    "rate_correct",
    "log_odds_ratio",
    "auc_influence",
    "p_fisher",
    "p_mwu",
    "q_fisher",
    "q_mwu",
    "significant",
)


def graph_units(graph: Any) -> list[tuple[str, int, int, float]]:
    """(kind, layer, feature, summed influence) of every unit present in a step graph:
    each feature (over its positions), each layer's feature nodes, each layer's error
    nodes (feature -1 for the last two)."""
    from crv.graphs.graph import ERROR, FEATURE

    out: list[tuple[str, int, int, float]] = []
    feat = graph.kind == FEATURE
    if feat.any():
        keys = np.stack([graph.layer[feat].astype(np.int64), graph.feature[feat]], axis=1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        sums = np.bincount(inv.ravel(), weights=graph.influence[feat], minlength=len(uniq))
        out += [
            ("feature", int(layer), int(f), float(s))
            for (layer, f), s in zip(uniq, sums, strict=True)
        ]
    for kind, mask in (("layer", feat), ("error", graph.kind == ERROR)):
        layers = graph.layer[mask].astype(np.int64)
        for layer in np.unique(layers):
            out.append((kind, int(layer), -1, float(graph.influence[mask][layers == layer].sum())))
    return out


def unit_matrices(
    graphs: list[Any],
) -> tuple[sparse.csr_matrix, sparse.csr_matrix, pd.DataFrame]:
    """Presence and summed-influence matrices, steps (graphs, in order) x units, and the
    units' `kind`, `layer`, `feature` (sorted)."""
    index: dict[tuple[str, int, int], int] = {}
    rows, cols, vals = [], [], []
    for i, graph in enumerate(graphs):
        for kind, layer, feature, value in graph_units(graph):
            rows.append(i)
            cols.append(index.setdefault((kind, layer, feature), len(index)))
            vals.append(value)
    keys = sorted(index, key=lambda k: (KINDS.index(k[0]), k[1], k[2]))
    remap = np.empty(len(index), dtype=np.int64)
    remap[[index[k] for k in keys]] = np.arange(len(keys))
    cols_ = remap[np.asarray(cols, dtype=np.int64)] if cols else np.zeros(0, dtype=np.int64)
    shape = (len(graphs), len(keys))
    influence = sparse.csr_matrix((np.asarray(vals, dtype=np.float64), (rows, cols_)), shape=shape)
    present = sparse.csr_matrix((np.ones(len(rows)), (rows, cols_)), shape=shape)
    units = pd.DataFrame(keys, columns=["kind", "layer", "feature"])
    return present, influence, units


def _graphs_of_steps(
    keys: pd.DataFrame,
    load: Callable[[str], list[Any]],
    missing: type[Exception] | tuple[type[Exception], ...],
) -> tuple[pd.DataFrame, list[Any]]:
    """The rows of `keys` that have a graph among `load(trace_id)`'s, and those graphs, in
    the same order; a trace whose graphs are `missing` is skipped."""
    by_step = {
        (t, int(s)): i for i, (t, s) in enumerate(zip(keys["trace_id"], keys["step"], strict=True))
    }
    picked, graphs = [], []
    for trace_id in keys["trace_id"].unique():
        try:
            trace_graphs = load(trace_id)
        except missing:
            continue  # a trace without graphs (graphs.max_traces)
        for g in trace_graphs:
            i = by_step.get((trace_id, int(g.step)))
            if i is not None:
                picked.append(i)
                graphs.append(g)
    return keys.iloc[picked].reset_index(drop=True), graphs


def labelled_test_graphs(traces_dir: Path, graphs_dir: Path) -> tuple[pd.DataFrame, list[Any]]:
    """The labelled test steps that have a graph (key columns, `planted_rule` when the
    traces carry it) and their graphs, in the same order."""
    from crv.graphs.store import load_step_graphs
    from crv.traces.steps import step_key_table
    from crv.traces.store import load_traces

    keys = step_key_table(load_traces(traces_dir))
    keys = keys[(keys["split"] == "test") & (keys["label"] >= 0)]
    return _graphs_of_steps(keys, lambda t: load_step_graphs(graphs_dir, t), FileNotFoundError)


def contrastive_test_graphs(
    traces_dir: Path, graphs_dir: Path, split: str = "test"
) -> tuple[pd.DataFrame, list[Any]] | None:
    """The incorrect steps of `split` that have a contrastive graph (key columns,
    `planted_rule`) and those graphs, in the same order; None when the graphs artifact was
    built without them (`graphs.contrastive=false`)."""
    from crv.graphs.store import CONTRAST_DIR, ContrastiveGraphsError, load_contrastive_graphs
    from crv.traces.steps import step_key_table
    from crv.traces.store import load_traces

    if not (Path(graphs_dir) / CONTRAST_DIR).is_dir():
        return None
    keys = step_key_table(load_traces(traces_dir))
    keys = keys[(keys["split"] == split) & (keys["label"] == 1)]
    return _graphs_of_steps(
        keys, lambda t: load_contrastive_graphs(graphs_dir, t), ContrastiveGraphsError
    )


def task_table(
    present_SU: sparse.csr_matrix,
    influence_SU: sparse.csr_matrix,
    units: pd.DataFrame,
    incorrect_S: np.ndarray,
    cfg: MechanismsConfig,
) -> pd.DataFrame:
    """The ranked test table of one task's steps: features seen in `min_steps`+ graphs,
    every layer and error unit present at all."""
    n_present = np.asarray(present_SU.sum(0)).ravel()
    is_feature = (units["kind"] == "feature").to_numpy()
    cols = np.flatnonzero(np.where(is_feature, n_present >= cfg.min_steps, n_present > 0))
    table = unit_tests(present_SU[:, cols], influence_SU[:, cols], incorrect_S)
    table = pd.concat([units.iloc[cols].reset_index(drop=True), table], axis=1)
    return add_fdr(table, cfg.fdr)


def _rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {c: (v.item() if hasattr(v, "item") else v) for c, v in row.items()}
        for row in table[list(_ROW_COLUMNS)].to_dict("records")
    ]


def mechanisms(
    steps: pd.DataFrame,
    graphs: list[Any],
    cards: Any,
    cfg: MechanismsConfig,
    rules: tuple[Any, ...] | None,
    contrastive: tuple[pd.DataFrame, list[Any]] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The full table (all tasks) and the report section, from labelled test steps
    (`task`, `label`, optional `planted_rule`) and their graphs (same order). With
    `contrastive` (incorrect test steps and their contrastive graphs) the section also
    groups them (`contrastive`), and `planted.<rule>` scores each rule against the groups,
    the presence-based result kept under `planted.<rule>.presence`."""
    present, influence, units = unit_matrices(graphs)
    tables, report_tasks = [], {}
    for task in sorted(steps["task"].unique()):
        rows = (steps["task"] == task).to_numpy()
        incorrect = (steps.loc[rows, "label"] == 1).to_numpy()
        entry: dict[str, Any] = {
            "n_incorrect": int(incorrect.sum()),
            "n_correct": int((~incorrect).sum()),
        }
        report_tasks[task] = entry
        if incorrect.all() or not incorrect.any():
            entry["note"] = "not tested: the task needs both incorrect and correct test steps"
            continue
        table = task_table(present[rows], influence[rows], units, incorrect, cfg)
        table["card"] = [
            cards.label(int(r.layer), int(r.feature)) if r.kind == "feature" else ""
            for r in table.itertuples()
        ]
        table.insert(0, "task", task)
        tables.append(table)
        kinds = table.groupby("kind")
        entry["n_tested"] = {k: int(kinds.size().get(k, 0)) for k in KINDS}
        entry["n_significant"] = {k: int(kinds["significant"].sum().get(k, 0)) for k in KINDS}
        entry["nothing_survives"] = not bool(table["significant"].any())
        entry["top"] = _rows(table[table["kind"] == "feature"].head(cfg.top_n))
        layer_rows = table[table["kind"] != "feature"].sort_values(["kind", "layer"])
        entry["layers"] = [
            {"kind": k, **r} for k, r in zip(layer_rows["kind"], _rows(layer_rows), strict=True)
        ]
    full = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    section: dict[str, Any] = {"fdr": cfg.fdr, "min_steps": cfg.min_steps, "tasks": report_tasks}
    section["planted"], skipped = {}, None
    if rules is None:
        skipped = "crv.tasks.bugs is not available"
    elif "planted_rule" not in steps.columns or not steps["planted_rule"].fillna("").any():
        skipped = "no test step exercises a planted rule (the subject has none)"
    else:
        for rule in rules:
            section["planted"][rule.name] = recover_rule(
                rule,
                steps,
                present,
                influence,
                units,
                cards,
                fdr=cfg.fdr,
                min_steps=cfg.min_steps,
                top_k=cfg.planted_top_k,
                min_share=cfg.planted_min_share,
            )
    if contrastive is not None and len(contrastive[1]):
        section["contrastive"], by_rule = contrastive_mechanisms(*contrastive, cards, cfg, rules)
        for name, res in by_rule.items():
            res["presence"] = section["planted"].get(name)
        if not skipped:
            section["planted"] = by_rule
    if skipped:
        section["planted_skipped"] = skipped
    return full, section


def run_stage(ctx: StageContext[MechanismsConfig]) -> dict[str, Any]:
    """`mechanisms` stage: the error-mechanism table of the test steps."""
    from crv.cards.store import load_feature_cards

    cfg: MechanismsConfig = ctx.cfg
    t0 = time.perf_counter()
    steps, graphs = labelled_test_graphs(ctx.inputs["traces"], ctx.inputs["graphs"])
    if not graphs:
        raise ValueError("mechanisms: no labelled test step has a graph")
    cards = load_feature_cards(ctx.inputs["cards"])
    contrastive = contrastive_test_graphs(ctx.inputs["traces"], ctx.inputs["graphs"])
    table, section = mechanisms(steps, graphs, cards, cfg, load_rules(), contrastive)
    atomic_write(ctx.out / TABLE_FILE, lambda p: table.to_parquet(p, index=False))
    section["n_graphs"] = len(graphs)
    if contrastive is None:
        section["contrastive_skipped"] = "the graphs were built without graphs.contrastive"
    section["seconds"] = time.perf_counter() - t0
    ctx.log.info("mechanisms: %d test graphs, %.1f s", len(graphs), section["seconds"])
    return section


def load_mechanism_table(path: str | Path) -> pd.DataFrame:
    """The full error-mechanism table of a `mechanisms` artifact."""
    return pd.read_parquet(Path(path) / TABLE_FILE)
