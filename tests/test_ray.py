"""The Ray executor on a local 2-CPU cluster: shards run in worker processes, a worker that
dies is retried without redoing finished items, a run resumes from its scratch directory,
and the pipeline's artifacts equal the local executor's."""

from __future__ import annotations

import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

ray = pytest.importorskip("ray", reason='the Ray executor needs the extra: pip install -e ".[ray]"')

from factories import composed  # noqa: E402

from crv.baselines.scores import load_baseline_table, load_probe_inputs  # noqa: E402
from crv.executor import run_sharded  # noqa: E402
from crv.features.table import load_feature_table  # noqa: E402
from crv.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from crv.pipeline import run_pipeline  # noqa: E402
from crv.runtime import RuntimeConfig  # noqa: E402

RAY = RuntimeConfig(executor="ray", workers=2)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def square_once(log: Path, die_on: int | None, items: list[tuple[int, Path]]) -> None:
    """Fake work: log the item, write its square and this process's id; the process dies
    the first time it reaches item `die_on` (before writing it)."""
    for item, file in items:
        with log.open("a") as fh:
            fh.write(f"{item}\n")
        marker = log.with_name("died")
        if item == die_on and not marker.exists():
            marker.touch()
            os._exit(1)
        atomic_write_json(file, {"square": item * item, "pid": os.getpid()})


def test_shards_run_in_workers_and_skip_finished_items(tmp_path: Path):
    files = [tmp_path / "out" / f"{i}.json" for i in range(8)]
    for i in (2, 5):
        atomic_write_text(files[i], "kept")
    log = tmp_path / "log"
    assert run_sharded(list(range(8)), files, partial(square_once, log, None), RAY) == 2
    assert sorted(map(int, log.read_text().split())) == [0, 1, 3, 4, 6, 7]
    assert files[2].read_text() == files[5].read_text() == "kept"
    results = [read_json(files[i]) for i in (0, 1, 3, 4, 6, 7)]
    assert [r["square"] for r in results] == [0, 1, 9, 16, 36, 49]
    assert os.getpid() not in {r["pid"] for r in results}


def test_a_dead_worker_is_retried_without_redoing_its_finished_items(tmp_path: Path):
    files = [tmp_path / "out" / f"{i}.json" for i in range(8)]
    log = tmp_path / "log"
    # shard [0, 2, 4, 6] dies at 4 after writing 0 and 2; its retry does 4 and 6 only
    assert run_sharded(list(range(8)), files, partial(square_once, log, 4), RAY) == 0
    assert (tmp_path / "died").exists()
    computed = sorted(map(int, log.read_text().split()))
    assert computed == [0, 1, 2, 3, 4, 4, 5, 6, 7]
    assert [read_json(f)["square"] for f in files] == [i * i for i in range(8)]


def meet(room: Path, n: int, items: list[tuple[int, Path]]) -> None:
    """Fake work that only goes on once `n` processes have entered `room` (a shard run
    after another, not beside it, times out), then writes its process id per item."""
    room.mkdir(exist_ok=True)
    (room / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(room.iterdir())) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(room.iterdir()))} of {n} shards ever ran at once")
        time.sleep(0.05)
    for _, file in items:
        atomic_write_json(file, {"pid": os.getpid()})


def test_two_workers_run_their_shards_at_the_same_time(tmp_path: Path):
    files = [tmp_path / "out" / f"{i}.json" for i in range(6)]
    run_sharded(list(range(6)), files, partial(meet, tmp_path / "room", 2), RAY)
    pids = [read_json(f)["pid"] for f in files]
    assert len(set(pids)) == 2 and pids[0::2] == [pids[0]] * 3  # round-robin shards


SMALL = [
    "experiment=smoke",
    "traces.runtime_batch_size=8",  # 8 generation batches to shard
    "transcoders.tokens=8192",
    "transcoders.dead_tokens=4096",
    "transcoders.eval_tokens=1024",
]
TIMING_KEYS = {"seconds_per_graph", "generation_seconds", "seconds_per_trace"}


def figures(metrics: object) -> object:
    """A stage's reported figures, rounded to 3 decimals, without timings and resume counts."""
    if isinstance(metrics, dict):
        return {
            k: figures(v)
            for k, v in metrics.items()
            if k not in TIMING_KEYS and not k.startswith("n_resumed")
        }
    if isinstance(metrics, list):
        return [figures(v) for v in metrics]
    return round(metrics, 3) if isinstance(metrics, float) else metrics


def test_pipeline_on_ray_gives_the_local_artifacts(tmp_path: Path):
    """Smoke settings (smaller transcoders) through the interventions, once local and once with
    2 Ray workers on a fresh cache holding only the local subject and transcoders (their
    stages do not shard), plus two finished graphs in the graphs stage's scratch: same
    traces, graphs, features, baseline scores, intervention attempts and reported figures."""
    # the training split: these small transcoders' verifier flags no test step
    cfg = composed([*SMALL, "interventions.split=train"])
    sections = {name: getattr(cfg, name) for name in vars(cfg)}
    run = partial(run_pipeline, sections, ["interventions"], seed=0, device="cpu")
    local = {r.name: r for r in run(cache_root=tmp_path / "local")}

    ray_cache = tmp_path / "ray"
    for stage in ("subject", "transcoders"):
        shutil.copytree(local[stage].path, ray_cache / stage / local[stage].key)
    finished = sorted((local["graphs"].path / "graphs").iterdir())[:2]
    scratch = ray_cache / "graphs" / f"{local['graphs'].key}.scratch" / "graphs"
    scratch.mkdir(parents=True)
    for file in finished:
        shutil.copy2(file, scratch)
    on_ray = {r.name: r for r in run(cache_root=ray_cache, runtime=RAY)}

    assert not on_ray["traces"].reused and not on_ray["graphs"].reused
    assert on_ray["traces"].metrics["n_resumed_batches"] == 0
    assert on_ray["graphs"].metrics["n_resumed_traces"] == 2
    for stage in ("traces", "graphs", "features", "baselines", "verifier", "interventions"):
        assert figures(on_ray[stage].metrics) == figures(local[stage].metrics), stage
    assert (on_ray["traces"].path / "dataset").exists()
    from crv.traces.store import load_traces

    assert (
        load_traces(on_ray["traces"].path).to_list() == load_traces(local["traces"].path).to_list()
    )
    attempts = read_json(on_ray["interventions"].path / "interventions.json")["attempts"]
    assert attempts, "no flagged step attempted: the comparison would be empty"
    assert attempts == read_json(local["interventions"].path / "interventions.json")["attempts"]
    pd.testing.assert_frame_equal(
        load_feature_table(on_ray["features"].path), load_feature_table(local["features"].path)
    )
    for load in (load_baseline_table, load_probe_inputs):
        pd.testing.assert_frame_equal(
            pd.DataFrame(load(on_ray["baselines"].path)),
            pd.DataFrame(load(local["baselines"].path)),
        )
    names = sorted(p.name for p in (local["graphs"].path / "graphs").iterdir())
    assert names == sorted(p.name for p in (on_ray["graphs"].path / "graphs").iterdir())
    for name in names:
        want = load_file(local["graphs"].path / "graphs" / name)
        got = load_file(on_ray["graphs"].path / "graphs" / name)
        assert want.keys() == got.keys()
        for key, array in want.items():
            if np.issubdtype(array.dtype, np.floating):
                np.testing.assert_allclose(got[key], array, rtol=1e-5, atol=0, err_msg=key)
            else:
                np.testing.assert_array_equal(got[key], array, err_msg=key)
