"""The `graphs` stage: the pruned attribution graph of every reasoning step of every trace.

Reads the subject model, the traces and the transcoder set through their public loaders,
builds each trace's step graphs from one forward pass (`attribute.TraceAttributor`; with
`graphs.contrastive`, the contrastive graphs of its incorrect steps from the same pass,
`contrastive.py`) and writes one file per trace (`store.py`; the contrastive graphs in a
second one, written first) into the scratch directory first, atomically, so a killed run
resumes with the traces it has not finished; the finished files are then copied into the
artifact. The traces are attributed by `crv.executor` (in this process, or sharded over Ray
workers with one model replica each, `runtime.executor`); every trace's graphs depend only
on the trace, so both give the same artifact. Returns the means over all graphs that the pipeline reports under `graphs`.
"""

from __future__ import annotations

import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from crv.executor import run_sharded
from crv.graphs.attribute import TraceAttributor, explained_positions, span_of
from crv.graphs.config import GraphsConfig
from crv.graphs.contrastive import contrast_attributions, trace_contrasts
from crv.graphs.store import (
    CONTRAST_DIR,
    GRAPH_DIR,
    read_metadata,
    read_step_graphs,
    save_step_graphs,
    trace_file,
)
from crv.pipeline import StageContext
from crv.tables import markdown_table, scalar_rows


def run_stage(ctx: StageContext[GraphsConfig]) -> dict[str, Any]:
    """Build, prune and store the step graphs of the selected traces."""
    from crv.traces.store import load_traces

    cfg = ctx.cfg
    traces = load_traces(ctx.inputs["traces"])
    splits = set(cfg.splits)
    rows = [i for i, split in enumerate(traces["split"]) if split in splits]
    if cfg.max_traces is not None and cfg.max_traces < len(rows):
        # evenly spread, so that a budget still covers every task and complexity
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, cfg.max_traces).round().astype(int)]
    columns = ["id", "input_ids", "steps", "prompt_len"]
    if cfg.contrastive:  # what the checker replays to find the correct step
        columns += ["task", "complexity", "problem", "gold", "completion", "label_mode"]
    traces = traces.select(rows).select_columns(columns)
    ctx.log.info("attributing the steps of %d traces (splits %s)", len(traces), sorted(splits))
    files = [trace_file(ctx.scratch, trace_id) for trace_id in traces["id"]]
    subject, transcoders = ctx.inputs["subject"], ctx.inputs["transcoders"]
    work = partial(attribute_traces, subject, transcoders, ctx.device, cfg)
    n_resumed = run_sharded(list(traces), files, work, ctx.runtime, ctx.device, "traces", ctx.log)

    graph_stats: list[tuple[int, int, float, float]] = []  # nodes, edges, replacement, completeness
    seconds, n_skipped, n_contrastive = 0.0, 0, 0
    out_dir = ctx.out / GRAPH_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.contrastive:
        (ctx.out / CONTRAST_DIR).mkdir(exist_ok=True)
    for path, trace_id in zip(files, traces["id"], strict=True):
        meta = read_metadata(path)
        seconds += float(meta["seconds"])
        n_skipped += int(meta["n_skipped_steps"])
        graph_stats += [
            (g.n_nodes, g.n_edges, g.scores["replacement_score"], g.scores["completeness_score"])
            for g in read_step_graphs(path)
        ]
        shutil.copy2(path, out_dir)
        if cfg.contrastive:
            contrast = trace_file(ctx.scratch, trace_id, CONTRAST_DIR)
            n_contrastive += len(read_step_graphs(contrast))
            shutil.copy2(contrast, ctx.out / CONTRAST_DIR)

    stats = np.array(graph_stats, dtype=np.float64).reshape(-1, 4)
    n_graphs = len(stats)
    means = stats.mean(0) if n_graphs else np.full(4, np.nan)
    if n_skipped:
        ctx.log.warning("%d steps had no valid token position and were skipped", n_skipped)
    return {
        "n_traces": len(traces),
        "n_graphs": n_graphs,
        **({"n_contrastive_graphs": n_contrastive} if cfg.contrastive else {}),
        "n_skipped_steps": n_skipped,
        "n_resumed_traces": n_resumed,
        "seconds_per_graph": seconds / n_graphs if n_graphs else float("nan"),
        "mean_nodes": float(means[0]),
        "mean_edges": float(means[1]),
        "replacement_score": float(means[2]),
        "completeness_score": float(means[3]),
    }


def attribute_traces(
    subject_dir: Path,
    transcoders_dir: Path,
    device: str,
    cfg: GraphsConfig,
    traces: list[tuple[dict[str, Any], Path]],
) -> None:
    """Load the subject with its transcoders once, then build and save the step graphs of
    each trace (`id`, `input_ids`, `steps`, `prompt_len`) to its file, with its time and
    number of skipped steps as metadata: the work of one executor shard."""
    from crv.transcoders.io import load_subject_with_transcoders

    loaded = load_subject_with_transcoders(subject_dir, transcoders_dir, device)
    model, adapter, tset = loaded.model, loaded.adapter, loaded.transcoders
    for trace, file in tqdm(traces, desc="graphs", unit="trace"):
        start = time.perf_counter()
        n_tokens = len(trace["input_ids"])
        positions = explained_positions(
            model, trace["input_ids"], trace["steps"], trace["prompt_len"], cfg.position
        )
        kept = [
            (s["index"], p)
            for s, p in zip(trace["steps"], positions, strict=True)
            if min(span_of(p)) >= 1 and max(span_of(p)) < n_tokens
        ]
        contrasts = trace_contrasts(trace, loaded.tokenizer) if cfg.contrastive else []
        steps = [s for s, _ in kept]
        targets = [p for _, p in kept]
        graphs, contrast_graphs = [], []
        if kept or contrasts:
            attributor = TraceAttributor(
                adapter,
                tset,
                trace["input_ids"],
                [*targets, *(c.position for c in contrasts)],
                cfg,
            )
            atts = attributor.attribute_steps(targets, steps, trace["id"])
            atts_c = contrast_attributions(attributor, contrasts, trace["id"])
            graphs = [a.pruned(cfg.node_threshold, cfg.edge_threshold) for a in atts]
            contrast_graphs = [a.pruned(cfg.node_threshold, cfg.edge_threshold) for a in atts_c]
        meta = {
            "seconds": str(time.perf_counter() - start),
            "n_skipped_steps": str(len(trace["steps"]) - len(kept)),
        }
        if cfg.contrastive:  # first: a finished step-graph file means a finished trace
            save_step_graphs(
                trace_file(file.parent.parent, trace["id"], CONTRAST_DIR),
                trace["id"],
                contrast_graphs,
            )
        save_step_graphs(file, trace["id"], graphs, meta)


def graphs_markdown(section: dict[str, Any]) -> str:
    """The report.md section of a `graphs` result: its scalars."""
    return markdown_table(scalar_rows(section))
