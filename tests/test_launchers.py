"""Sweeps through Hydra launchers (the `cluster` extra): the presets in
conf/hydra/launcher/ compose onto their plugins, and a two-job sweep through the local
submitit executor shares one cache, computing each shared artifact once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from crv.cli.main import CONF_DIR
from crv.report import summarize_sweep

BIN = Path(sys.executable).parent
SUBMITIT = "hydra_plugins.hydra_submitit_launcher"
RAY = "hydra_plugins.hydra_ray_launcher"
MISSING = "the cluster extra is not installed (pip install -e '.[cluster]')"


def _plugin(module: str) -> None:
    pytest.importorskip(module, reason=MISSING)


@pytest.mark.parametrize(
    ("preset", "module", "target", "fields"),
    [
        ("slurm", SUBMITIT, "SlurmLauncher", {"gpus_per_node": 1, "array_parallelism": 16}),
        ("local_jobs", SUBMITIT, "LocalLauncher", {"gpus_per_node": 0, "cpus_per_task": 1}),
        ("ray_cluster", RAY, "RayLauncher", {}),
    ],
)
def test_presets_compose_onto_their_plugins(preset, module, target, fields) -> None:
    _plugin(module)
    from crv.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", [f"hydra/launcher={preset}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(target)
    assert {k: launcher[k] for k in fields} == fields
    if preset == "ray_cluster":
        assert launcher.ray.init.address == "auto" and launcher.ray.remote.num_gpus == 1


def test_local_sweep_shares_one_cache(tmp_path: Path) -> None:
    """Two jobs at once (separate processes) over one cache: both finish, every artifact they
    share was computed by exactly one of them, and crv-sweep-summary lists both."""
    _plugin(SUBMITIT)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [str(BIN / "crv"), "-m", "hydra/launcher=local_jobs", "experiment=smoke",
         "pipeline.stages=[verifier]", "verifier.n_estimators=20,40",
         "transcoders.tokens=20000", "transcoders.shuffle_buffer_tokens=8192",
         f"hydra.sweep.dir={sweep}", f"pipeline.cache_dir={tmp_path}/cache"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((sweep / str(i) / "report.json").read_text()) for i in (0, 1)]
    shared = ("subject", "traces", "transcoders", "graphs", "features", "baselines")
    for stage in shared:
        computed = [stage not in report["reused"] for report in reports]
        assert sorted(computed) == [False, True], (stage, computed)
        assert len(list((tmp_path / "cache" / stage).iterdir())) == 1, stage
    assert all("verifier" not in report["reused"] for report in reports)
    assert len(list((tmp_path / "cache" / "verifier").iterdir())) == 2

    summary = subprocess.run(
        [str(BIN / "crv-sweep-summary"), str(sweep), "verifier.n_steps"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in summary.splitlines() if "verifier.n_estimators=" in line]
    assert len(rows) == 2 and any("=20 " in r for r in rows) and any("=40 " in r for r in rows)
    n_steps = reports[0]["verifier"]["n_steps"]
    assert n_steps > 0 and all(f"| {n_steps} |" in r for r in rows)


def test_sweep_summary_ranks_by_the_metric_given(tmp_path: Path) -> None:
    for run, auroc in (("0", 0.7), ("1", 0.9)):
        (tmp_path / run / ".hydra").mkdir(parents=True)
        (tmp_path / run / ".hydra" / "overrides.yaml").write_text(f"- seed={run}\n")
        report = {"verifier": {"arithmetic": {"methods": {"crv": {"auroc": auroc}}}}}
        (tmp_path / run / "report.json").write_text(json.dumps(report))
    lines = summarize_sweep(tmp_path, "verifier.arithmetic.methods.crv.auroc").splitlines()
    assert lines[2].startswith("| 1 | seed=1 | 0.9 |") and lines[3].startswith("| 0 | seed=0 | 0.7")
