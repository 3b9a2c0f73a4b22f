"""The `features` stage: one row of graph features per step graph (`crv.features.compute`),
written as the feature table (`crv.features.table`, its public loaders)."""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any

from crv.features.compute import StepRow, family_of, feature_names, infer_n_layers, step_row
from crv.features.config import FeaturesConfig
from crv.features.table import (
    IDENTITY_FILE,
    META_FILE,
    TABLE_FILE,
    save_identity,
    split_identity,
    table_from_rows,
)
from crv.graphs.store import read_step_graphs
from crv.io import atomic_write, atomic_write_json, read_json
from crv.pipeline import StageContext
from crv.traces.steps import step_key_table


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


def run_stage(ctx: StageContext[FeaturesConfig]) -> dict[str, Any]:
    """`features` stage: one row of graph features per step graph (+ the identity block).
    Traces are computed by `crv.executor` (in this process, or sharded over Ray workers),
    one result file per trace in the scratch directory, then merged: every step's features
    depend only on its graph, the config and the seed, so both give the same table."""
    from urllib.parse import quote

    from crv.executor import run_sharded
    from crv.graphs.store import iter_step_graphs, trace_file, trace_ids
    from crv.traces.store import load_traces

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
        atomic_write(ctx.out / IDENTITY_FILE, lambda p: save_identity(p, matrix))
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
