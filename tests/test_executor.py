"""`crv.executor` without Ray: sharding, resuming finished items, the checks of its
settings (tests/test_ray.py runs it on Ray)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from crv.errors import ConfigError, CRVError
from crv.executor import INSTALL_HINT, run_sharded, shards
from crv.io import atomic_write_text
from crv.runtime import Executor, RuntimeConfig

ROOT = Path(__file__).resolve().parents[1]


def square(log: Path, items: list[tuple[int, Path]]) -> None:
    """Fake work: each item's square into its file, and one log line per computed item."""
    for item, file in items:
        with log.open("a") as fh:
            fh.write(f"{item}\n")
        atomic_write_text(file, str(item * item))


def test_shards_deal_items_round_robin():
    assert shards(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert shards([1, 2], 4) == [[1], [2]]


def test_local_run_computes_only_the_unfinished_items(tmp_path: Path, caplog):
    files = [tmp_path / "out" / f"{i}.txt" for i in range(6)]
    for i in (1, 4):  # finished by a killed run
        atomic_write_text(files[i], "kept")
    log = tmp_path / "log"
    stage_log = logging.getLogger("crv.graphs")
    with caplog.at_level(logging.INFO, logger="crv.graphs"):
        resumed = run_sharded(
            list(range(6)), files, partial(square, log), RuntimeConfig(), "cpu", "traces", stage_log
        )
    assert resumed == 2
    [said] = [r.getMessage() for r in caplog.records if r.name == "crv.graphs"]
    assert said.startswith("resumed 2 of 6 traces from scratch") and "other 4" in said
    assert log.read_text().split() == ["0", "2", "3", "5"]
    assert [f.read_text() for f in files] == ["0", "kept", "4", "9", "kept", "25"]
    assert (
        run_sharded(list(range(6)), files, partial(square, tmp_path / "log2"), RuntimeConfig()) == 6
    )
    assert not (tmp_path / "log2").exists()  # nothing pending: work (and its model) never runs


def test_work_that_leaves_an_item_unwritten_is_an_error(tmp_path: Path):
    files = [tmp_path / f"{i}.txt" for i in range(3)]
    with pytest.raises(CRVError, match="without writing 3 results"):
        run_sharded([0, 1, 2], files, lambda items: None, RuntimeConfig())


def test_ray_executor_without_ray_says_how_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    runtime = RuntimeConfig(executor="ray")
    assert runtime.executor is Executor.ray
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        run_sharded([0], [tmp_path / "0.txt"], partial(square, tmp_path / "log"), runtime)


def test_ray_on_cuda_needs_gpus_per_worker(tmp_path: Path):
    with pytest.raises(ConfigError, match="runtime.gpus_per_worker"):
        run_sharded([0], [tmp_path / "0"], print, RuntimeConfig(executor="ray"), "cuda")


def test_crv_with_ray_executor_but_no_ray_fails_before_any_stage(tmp_path: Path):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "ray.py").write_text('raise ImportError("no ray here")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), str(ROOT)])}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "crv"), "experiment=smoke", "runtime.executor=ray",
         f"hydra.run.dir={tmp_path}/run", f"pipeline.cache_dir={tmp_path}/cache"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"crv: error: {INSTALL_HINT}"
    assert not (tmp_path / "cache" / "subject").exists()
