"""The `baselines` stage: every step's baseline scores and probe inputs (`crv.baselines.scores`).

Each trace's scores go to a file of the scratch directory first (`crv.executor`: in this
process, or sharded over Ray workers), so a killed run resumes with the traces it has not
scored; the temperature is fitted once all are there. The transcoders are attached to the
same forward pass, so the latent activations cost no second pass.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix, vstack

from crv.baselines.config import BaselinesConfig
from crv.baselines.scores import (
    HIDDEN_FILE,
    HIDDEN_STATES_FILE,
    LATENTS_FILE,
    META_FILE,
    POOLINGS,
    SCORE_COLUMNS,
    TABLE_FILE,
    LatentLayout,
    TraceScores,
    fit_temperature,
    hidden_layers_within,
    latent_layout,
    resolve_probe_layer,
    save_latents,
    temperature_scores,
    trace_step_scores,
)
from crv.io import atomic_write, atomic_write_json
from crv.pipeline import StageContext
from crv.traces.steps import KEY_COLUMNS, step_key_table

if TYPE_CHECKING:
    import torch

    from crv.transcoders.module import TranscoderSet


class Baselines(NamedTuple):
    """All steps' baselines, rows aligned with `table`."""

    table: pd.DataFrame
    """`KEY_COLUMNS` + score columns."""
    probe: np.ndarray
    """Mean-pooled hidden state at `probe_layer` [n_steps, D]."""
    hidden: np.ndarray
    """Pooled hidden states float16 [n_steps, len(POOLINGS), n_kept, D]."""
    latents: csr_matrix | None
    """Pooled transcoder latents, or None without transcoders."""
    meta: dict
    """Score columns, probe layers, latent layout, fitted temperature."""


def step_spans(traces) -> tuple[dict[str, pd.DataFrame], list[dict[str, Any]]]:
    """The steps of each trace (its rows of the step key table, by trace id) and, for each
    trace with steps, in order, `{id, input_ids, spans}`: what `trace_step_scores` reads."""
    keys = step_key_table(traces)
    by_trace = dict(tuple(keys.groupby("trace_id", sort=False)))
    items = []
    for tr in traces.select_columns(["id", "input_ids"]):
        steps = by_trace.get(tr["id"])
        if steps is None:
            continue
        prev, last = steps["prev_last_token"].tolist(), steps["last_token"].tolist()
        spans = [(min(p + 1, t), t) for p, t in zip(prev, last, strict=True)]
        items.append({"id": tr["id"], "input_ids": tr["input_ids"], "spans": spans})
    return by_trace, items


def kept_hidden_layers(model: torch.nn.Module, cfg: BaselinesConfig, n_steps: int) -> list[int]:
    """The hidden-state outputs whose pooled values fit `probe_max_bytes` over `n_steps`."""
    n_hidden, d_model = model.config.num_hidden_layers + 1, model.config.hidden_size
    return hidden_layers_within(n_hidden, d_model, cfg.probe_max_bytes / max(n_steps, 1))


def baseline_table(
    model: torch.nn.Module,
    traces,
    cfg: BaselinesConfig,
    device: str = "cpu",
    transcoders: TranscoderSet | None = None,
) -> Baselines:
    """Scores and probe inputs of every step of every trace, in memory."""
    by_trace, items = step_spans(traces)
    layers = kept_hidden_layers(model, cfg, sum(len(it["spans"]) for it in items))
    scores = [
        trace_step_scores(model, it["input_ids"], it["spans"], cfg, device, transcoders, layers)
        for it in items
    ]
    n_hidden = model.config.num_hidden_layers + 1
    layout = latent_layout(transcoders) if transcoders is not None else None
    return merge_scores([by_trace[it["id"]] for it in items], scores, cfg, n_hidden, layers, layout)


def merge_scores(
    steps: list[pd.DataFrame],
    scores: list[TraceScores],
    cfg: BaselinesConfig,
    n_hidden: int,
    hidden_layers: list[int],
    layout: LatentLayout | None,
) -> Baselines:
    """`baseline_table`'s result from each trace's steps and scores, in trace order: the
    temperature is fitted on all of them."""
    parts = [s[list(KEY_COLUMNS)].assign(**sc.scores) for s, sc in zip(steps, scores, strict=True)]
    table = pd.concat(parts, ignore_index=True)
    conf = np.concatenate([sc.conf for sc in scores])
    train = ((table["split"] == "train") & (table["label"] >= 0)).to_numpy()
    correct = 1 - table["label"].to_numpy()[train]
    t_star, bce = fit_temperature(conf[train], correct, cfg.temperature_grid)
    table.insert(
        table.columns.get_loc("energy"),
        "temperature",
        temperature_scores(conf, t_star, cfg.temperature_grid),
    )
    latents = None
    if layout is not None:
        latents = vstack([sc.latents for sc in scores], format="csr")
    meta = {
        "score_columns": [c for c in SCORE_COLUMNS if c in table.columns],
        "probe_layer": resolve_probe_layer(cfg.probe_layer, n_hidden),
        "hidden_layers": list(hidden_layers),
        "poolings": list(POOLINGS),
        "latent_layout": layout.to_json() if layout is not None else None,
        "temperature": t_star,
        "temperature_grid": list(cfg.temperature_grid),
        "temperature_bce": bce,
    }
    return Baselines(
        table,
        np.concatenate([sc.probe for sc in scores]),
        np.concatenate([sc.hidden for sc in scores]),
        latents,
        meta,
    )


def score_traces(
    subject_dir: Path,
    transcoders_dir: Path | None,
    device: str,
    cfg: BaselinesConfig,
    n_steps: int,
    items: list[tuple[dict, Path]],
) -> None:
    """Load the subject (and transcoders) once, then write each trace's
    `trace_step_scores` to its file (safetensors: `score.<column>`, `probe`, `conf`,
    `hidden`, the latents' CSR parts; counts and layouts as metadata): the work of one
    executor shard."""
    from safetensors.numpy import save_file

    from crv.models.loading import load_subject

    model, _ = load_subject(subject_dir, device)
    tset = None
    if transcoders_dir is not None:
        from crv.models.adapter import ArchAdapter
        from crv.transcoders.io import load_transcoder_set

        tset = load_transcoder_set(transcoders_dir, device)
        tset.check_compatible(ArchAdapter.for_model(model))
    layers = kept_hidden_layers(model, cfg, n_steps)
    meta = {
        "n_hidden": str(model.config.num_hidden_layers + 1),
        "hidden_layers": json.dumps(layers),
        "layout": json.dumps(latent_layout(tset).to_json()) if tset is not None else "null",
    }
    for item, file in items:
        sc = trace_step_scores(model, item["input_ids"], item["spans"], cfg, device, tset, layers)
        tensors = {f"score.{k}": v for k, v in sc.scores.items()}
        tensors |= {"probe": sc.probe, "conf": sc.conf, "hidden": sc.hidden}
        if sc.latents is not None:
            tensors |= {
                "latents.data": sc.latents.data.astype(np.float32),
                "latents.indices": sc.latents.indices.astype(np.int32),
                "latents.indptr": sc.latents.indptr.astype(np.int64),
            }
        atomic_write(file, lambda p, t=tensors: save_file(t, str(p), meta))


def read_scores(file: Path) -> tuple[TraceScores, dict[str, Any]]:
    """A trace's scores as `score_traces` wrote them, and its metadata (`n_hidden`,
    `hidden_layers`, `layout`) decoded."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = load_file(file)
    with safe_open(str(file), "np") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    cols = {k.removeprefix("score."): v for k, v in tensors.items() if k.startswith("score.")}
    order = [c for c in SCORE_COLUMNS if c in cols]  # the column order trace_step_scores gives
    latents = None
    if meta["layout"] is not None:
        layout = LatentLayout.from_json(meta["layout"])
        parts = tuple(tensors[f"latents.{k}"] for k in ("data", "indices", "indptr"))
        latents = csr_matrix(parts, shape=(len(tensors["probe"]), layout.n_columns))
    sc = TraceScores(
        {c: cols[c] for c in order}, tensors["probe"], tensors["conf"], tensors["hidden"], latents
    )
    return sc, meta


def save_baselines(out: Path, result: Baselines) -> None:
    """The artifact's files (see the module docstring of `crv.baselines.scores`)."""
    from safetensors.numpy import save_file

    atomic_write(out / TABLE_FILE, lambda p: result.table.to_parquet(p, index=False))
    atomic_write(out / HIDDEN_FILE, lambda p: _save_npy(p, result.probe))
    hidden_meta = {"layers": json.dumps(result.meta["hidden_layers"])}
    atomic_write(
        out / HIDDEN_STATES_FILE,
        lambda p: save_file({"hidden": np.ascontiguousarray(result.hidden)}, str(p), hidden_meta),
    )
    if result.latents is not None:
        layout = LatentLayout.from_json(result.meta["latent_layout"])
        atomic_write(out / LATENTS_FILE, lambda p: save_latents(p, result.latents, layout))
    atomic_write_json(out / META_FILE, result.meta)


def run_stage(ctx: StageContext[BaselinesConfig]) -> dict[str, Any]:
    """`baselines` stage: one row of baseline scores (+ probe inputs) per step. Traces are
    scored by `crv.executor` (in this process or sharded over Ray workers), one file per
    trace in the scratch directory, then merged in trace order."""
    from urllib.parse import quote

    from crv.executor import run_sharded
    from crv.traces.store import load_traces

    t0 = time.perf_counter()
    by_trace, items = step_spans(load_traces(ctx.inputs["traces"]))
    n_steps = sum(len(it["spans"]) for it in items)
    transcoders = ctx.inputs.get("transcoders") if ctx.cfg.latents else None
    files = [ctx.scratch / "scores" / f"{quote(it['id'], safe='')}.safetensors" for it in items]
    work = partial(score_traces, ctx.inputs["subject"], transcoders, ctx.device, ctx.cfg, n_steps)
    n_resumed = run_sharded(items, files, work, ctx.runtime, ctx.device, "traces", ctx.log)
    read = [read_scores(f) for f in files]
    meta0 = read[0][1]
    layout = LatentLayout.from_json(meta0["layout"]) if meta0["layout"] is not None else None
    result = merge_scores(
        [by_trace[it["id"]] for it in items],
        [sc for sc, _ in read],
        ctx.cfg,
        int(meta0["n_hidden"]),
        meta0["hidden_layers"],
        layout,
    )
    save_baselines(ctx.out, result)
    ctx.log.info(
        "baselines: %d steps, T* = %.3g, %.1f s",
        len(result.table),
        result.meta["temperature"],
        time.perf_counter() - t0,
    )
    return {
        "n_steps": len(result.table),
        "hidden_dim": int(result.probe.shape[1]),
        "n_resumed_traces": n_resumed,
        "hidden_states_bytes": int(result.hidden.nbytes),
        "latents_nnz": int(result.latents.nnz) if result.latents is not None else 0,
        **{k: v for k, v in result.meta.items() if k != "temperature_grid"},
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
