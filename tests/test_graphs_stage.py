"""The `graphs` stage end to end on tiny artifacts, its resume, and the graph store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_graphs import CFG, context, make_artifacts

from crv.graphs.attribute import explained_positions, trace_graphs
from crv.graphs.graph import StepGraph
from crv.graphs.stage import run_stage
from crv.graphs.store import (
    iter_step_graphs,
    load_step_graphs,
    save_step_graphs,
    trace_file,
    trace_ids,
)
from crv.models.adapter import ArchAdapter


def assert_same(g: StepGraph, h: StepGraph) -> None:
    assert (g.trace_id, g.step, g.position) == (h.trace_id, h.step, h.position)
    for col in (
        "kind",
        "layer",
        "pos",
        "feature",
        "activation",
        "influence",
        "src",
        "dst",
        "weight",
    ):
        np.testing.assert_array_equal(getattr(g, col), getattr(h, col))
    assert g.scores == pytest.approx(h.scores)


def test_stage_writes_resumes_and_loads(tmp_path: Path) -> None:
    inputs = make_artifacts(tmp_path)
    (tmp_path / "scratch").mkdir()
    metrics = run_stage(context(tmp_path, inputs, "out1"))
    assert metrics["n_traces"] == 3 and metrics["n_graphs"] == 9 and metrics["n_skipped_steps"] == 1
    assert metrics["n_resumed_traces"] == 0
    assert metrics["seconds_per_graph"] > 0 and metrics["mean_nodes"] > 0
    assert 0 <= metrics["replacement_score"] <= 1 and 0 <= metrics["completeness_score"] <= 1
    out = tmp_path / "out1"
    assert trace_ids(out) == ["t/0", "t/2", "t/3"]

    # the stored graphs are the graphs of the library call
    from datasets import load_from_disk

    from crv.models.loading import load_subject
    from crv.transcoders.io import load_transcoder_set

    model, _ = load_subject(inputs["subject"])
    trace = load_from_disk(str(inputs["traces"] / "dataset"))[0]
    assert CFG.position == "least_confident"
    positions = explained_positions(
        model, trace["input_ids"], trace["steps"], trace["prompt_len"], CFG.position
    )
    assert positions != [s["last_token"] for s in trace["steps"]]
    direct = trace_graphs(
        ArchAdapter.for_model(model.requires_grad_(False)),
        load_transcoder_set(inputs["transcoders"]),
        trace["input_ids"],
        positions,
        CFG,
        trace["id"],
    )
    for g, h in zip(load_step_graphs(out, "t/0"), direct, strict=True):
        assert_same(g, h)
        assert g.n_edges > 0 and g.to_networkx().number_of_nodes() == g.n_nodes
    assert len(list(iter_step_graphs(out))) == 9

    # a rerun on the same scratch recomputes nothing
    resumed = run_stage(context(tmp_path, inputs, "out2"))
    assert resumed["n_resumed_traces"] == 3
    assert {k: v for k, v in resumed.items() if k != "n_resumed_traces"} == pytest.approx(
        {k: v for k, v in metrics.items() if k != "n_resumed_traces"}
    )


def test_store_round_trip(tmp_path: Path) -> None:
    g = StepGraph(
        trace_id="a b/c",
        step=2,
        position=7,
        kind=np.array([2, 3], dtype=np.int8),
        layer=np.array([-1, 2], dtype=np.int16),
        pos=np.array([7, 7], dtype=np.int32),
        feature=np.array([4, 9], dtype=np.int32),
        activation=np.array([0.0, 0.8], dtype=np.float32),
        influence=np.array([0.5, 0.8], dtype=np.float32),
        src=np.array([0], dtype=np.int32),
        dst=np.array([1], dtype=np.int32),
        weight=np.array([-1.5], dtype=np.float32),
        scores={"replacement_score": 0.25},
    )
    save_step_graphs(trace_file(tmp_path, "a b/c"), "a b/c", [g])
    save_step_graphs(trace_file(tmp_path, "empty"), "empty", [])
    (loaded,) = load_step_graphs(tmp_path, "a b/c")
    assert_same(loaded, g)
    assert load_step_graphs(tmp_path, "empty") == []
    with pytest.raises(FileNotFoundError):
        load_step_graphs(tmp_path, "missing")
