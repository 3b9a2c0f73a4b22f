"""Artifact cache: keys, reuse, atomic commits, resumable scratch, stage closure."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from crv.pipeline import Stage, artifact_key, run_pipeline, stage_closure


@dataclass
class Cfg:
    value: int = 1
    runtime_batch_size: int = 8


CALLS: list[str] = []


def _up(ctx):
    CALLS.append("up")
    (ctx.out / "value.txt").write_text(str(ctx.cfg.value))
    return {"value": ctx.cfg.value}


def _down(ctx):
    CALLS.append("down")
    up = int((ctx.inputs["up"] / "value.txt").read_text())
    (ctx.scratch / "shard.txt").write_text("partial work")
    if ctx.cfg.value < 0:
        raise RuntimeError("simulated crash")
    (ctx.out / "value.txt").write_text(str(up + ctx.cfg.value))
    return {"sum": up + ctx.cfg.value}


@pytest.fixture()
def stages(monkeypatch):
    mod = types.ModuleType("fake_stages")
    mod.up, mod.down = _up, _down
    monkeypatch.setitem(sys.modules, "fake_stages", mod)
    CALLS.clear()
    return (
        Stage("up", (), "fake_stages:up"),
        Stage("down", ("up",), "fake_stages:down"),
    )


def _run(stages, tmp_path: Path, a: int, b: int, requested=("down",)):
    return run_pipeline(
        {"up": Cfg(a), "down": Cfg(b)}, requested, tmp_path, seed=0, device="cpu", stages=stages
    )


def test_second_run_reuses_every_stage(stages, tmp_path):
    first = _run(stages, tmp_path, 1, 2)
    second = _run(stages, tmp_path, 1, 2)
    assert CALLS == ["up", "down"]
    assert [r.reused for r in first] == [False, False]
    assert [r.reused for r in second] == [True, True]
    assert second[1].metrics == {"sum": 3}
    assert (second[1].path / "manifest.json").is_file()


def test_changing_a_downstream_section_keeps_upstream(stages, tmp_path):
    _run(stages, tmp_path, 1, 2)
    results = _run(stages, tmp_path, 1, 5)
    assert CALLS == ["up", "down", "down"]
    assert [r.reused for r in results] == [True, False]
    assert results[1].metrics == {"sum": 6}


def test_upstream_change_invalidates_downstream(stages, tmp_path):
    _run(stages, tmp_path, 1, 2)
    _run(stages, tmp_path, 4, 2)
    assert CALLS == ["up", "down", "up", "down"]


def test_runtime_fields_do_not_change_the_key(stages):
    stage = stages[0]
    assert artifact_key(stage, Cfg(1, 8), 0, {}) == artifact_key(stage, Cfg(1, 64), 0, {})
    assert artifact_key(stage, Cfg(1), 0, {}) != artifact_key(stage, Cfg(1), 1, {})


def test_a_new_shipped_checkpoint_gets_a_new_subject_key(tmp_path, monkeypatch):
    import shutil

    import crv.subject.sources as subject_sources
    from crv.pipeline import STAGE_BY_NAME
    from crv.subject.config import SubjectConfig

    stage = STAGE_BY_NAME["subject"]
    shutil.copytree(subject_sources.DATA_DIR / "crv-tiny", tmp_path / "crv-tiny")
    monkeypatch.setattr(subject_sources, "DATA_DIR", tmp_path)
    before = artifact_key(stage, SubjectConfig(), 0, {})
    with open(tmp_path / "crv-tiny" / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")  # the last weights change, the config does not
    assert artifact_key(stage, SubjectConfig(), 0, {}) != before
    hub = SubjectConfig(name="Qwen/Qwen2.5-Coder-0.5B-Instruct")  # not shipped: config only
    assert stage.data_fingerprint(hub) == "" == stage.data_fingerprint(SubjectConfig(retrain=True))


def test_crash_leaves_no_trusted_artifact_and_keeps_scratch(stages, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(stages, tmp_path, 1, -1)
    stage_dir = tmp_path / "down"
    assert not [p for p in stage_dir.iterdir() if not p.name.endswith(".scratch")]
    scratch = next(stage_dir.glob("*.scratch"))
    assert (scratch / "shard.txt").read_text() == "partial work"
    # the upstream artifact survived and is reused by the next run
    results = _run(stages, tmp_path, 1, 2)
    assert results[0].reused and not results[1].reused


def test_subset_runs_dependencies_only(stages, tmp_path):
    results = _run(stages, tmp_path, 1, 2, requested=("up",))
    assert [r.name for r in results] == ["up"]
    assert [s.name for s in stage_closure(["down"], stages)] == ["up", "down"]
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        stage_closure(["nope"], stages)


def _slow_up(ctx):
    """Appends one line per computation to `runs.txt` beside the cache, then takes a while."""
    import time

    with open(ctx.out.parents[1] / "runs.txt", "a") as fh:
        fh.write(f"{ctx.cfg.value}\n")
    time.sleep(1.0)
    (ctx.out / "value.txt").write_text(str(ctx.cfg.value))
    return {"value": ctx.cfg.value}


def _run_slow(cache: str, barrier) -> None:  # noqa: ANN001
    mod = types.ModuleType("fake_slow_stages")
    mod.up = _slow_up
    sys.modules["fake_slow_stages"] = mod
    barrier.wait()
    run_pipeline(
        {"up": Cfg(5)}, ("up",), cache, seed=0, device="cpu",
        stages=(Stage("up", (), "fake_slow_stages:up"),),
    )  # fmt: skip


def test_concurrent_runs_compute_a_missing_artifact_once(tmp_path):
    """Two processes that need the same missing artifact at once: one computes it, the other
    waits for its lock and reuses it; the cache holds one complete artifact, nothing else."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_run_slow, args=(str(tmp_path), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "runs.txt").read_text() == "5\n"
    (artifact,) = [p for p in (tmp_path / "up").iterdir() if p.is_dir()]
    assert (artifact / "value.txt").read_text() == "5" and (artifact / "manifest.json").is_file()


def test_report_md_has_each_stage_section_in_stage_order():
    """report.md's sections come from the stage table: each stage with a renderer and a
    report entry gets its title and its renderer's text, in the order of STAGES."""
    from crv.pipeline import STAGES
    from crv.report import render_markdown

    report = {
        "traces": {"table": [{"task": "boolean", "n_traces": 3}]},
        "graphs": {"n_graphs": 7, "replacement_score": 0.5},
        "features": {"n_steps": 4},  # no renderer: no section
        "timings": {"traces": 1.0},
    }
    md = render_markdown(report, [])
    assert md.index("## Traces\n") < md.index("## Attribution graphs\n")
    assert "| boolean | 3 |" in md and "| n_graphs | 7 |" in md
    assert "## Transcoders" not in md and "n_steps" not in md
    titled = [s for s in STAGES if s.renderer]
    assert {s.name for s in titled} >= {"traces", "verifier", "mechanisms", "interventions"}
    assert all(s.title and callable(s.load_renderer()) for s in titled)
