"""End to end: `crv experiment=quick` runs every stage and writes a complete report.

The golden check of crv: the console scripts as a user runs them, on the shipped
crv-tiny-bugs (the preset the README shows first: enough incorrect test steps on both tasks
that the verifier's AUROCs, the probes and the interventions have numbers), then
`crv-verify` on the bundle that run exported. Slow-ish (a few minutes on 2 CPU cores), so it
runs once per session and the other checks share its output.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

METHODS = (
    "crv",
    "position",
    "maxprob",
    "perplexity",
    "entropy",
    "temperature",
    "energy",
    "lr_probe",
    "mlp_probe",
    "probe",
    "tc_probe",
    "crv+probes",
    "probes+confidence",
)
PRESET = "experiment=quick"
METRIC_KEYS = ("auroc", "aupr", "fpr95", "auroc_ci", "aupr_ci", "fpr95_ci")
BIN = Path(sys.executable).parent


def _crv(
    *args: str, cwd: Path, script: str = "crv", stdin: str | None = None
) -> subprocess.CompletedProcess:
    # One thread: the golden numbers are a seeded run's, and float sums (so the trained
    # transcoders and everything after them) differ between thread counts.
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(BIN / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=900,
    )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smoke")
    proc = _crv(
        PRESET,
        f"hydra.run.dir={root}/run",
        f"pipeline.cache_dir={root}/cache",
        cwd=Path.cwd(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_report_has_every_stage_and_key(smoke_run: Path):
    report = json.loads((smoke_run / "run" / "report.json").read_text())
    for key in (
        "subject",
        "traces",
        "transcoders",
        "graphs",
        "features",
        "verifier",
        "interventions",
        "bundle",
        "cards",
        "mechanisms",
        "timings",
        "peak_memory_mb",
    ):
        assert key in report, key
    assert report["cards"]["n_tokens"] > 0
    assert set(report["mechanisms"]["tasks"]) == {"arithmetic", "boolean"}
    tc = report["transcoders"]
    for key in ("layers", "ce_clean", "ce_spliced", "ce_zero", "ce_loss_recovered", "kl_spliced"):
        assert key in tc
    assert {"layer", "fvu", "l0", "dead_frac", "cos"} <= set(tc["layers"][0])
    for key in (
        "n_graphs",
        "seconds_per_graph",
        "mean_nodes",
        "mean_edges",
        "replacement_score",
        "completeness_score",
    ):
        assert key in report["graphs"]
    for task in ("arithmetic", "boolean"):
        det = report["verifier"][task]
        assert det["n_test_incorrect"] >= 30, (task, det["n_test_incorrect"])
        for method in METHODS:
            assert set(METRIC_KEYS) <= set(det["methods"][method]), (task, method)
    assert "ablation" in report["verifier"] and "transfer" in report["verifier"]
    iv = report["interventions"]
    for key in (
        "n_flagged",
        "n_attempted",
        "fixed_step_rate",
        "fixed_answer_rate",
        "random_fixed_step_rate",
        "random_fixed_answer_rate",
        "broken_correct_rate",
        "fixed_step_rate_ci",
    ):
        assert key in iv
    assert iv["n_attempted"] > 0 and iv["fixed_step_rate"] is not None
    planted = report["mechanisms"]["planted"]
    assert planted, "crv-tiny-bugs' planted rules have no mechanisms rows"
    for rule, row in planted.items():
        if row.get("n_steps"):
            assert 0 <= row["recall"] <= 1 and 0 <= row["precision"] <= 1, rule
    artifacts = json.loads((smoke_run / "run" / "artifacts.json").read_text())
    assert set(artifacts) >= {
        "subject",
        "traces",
        "transcoders",
        "graphs",
        "features",
        "verifier",
        "bundle",
    }
    assert all(Path(p).is_absolute() and Path(p).is_dir() for p in artifacts.values())
    md = (smoke_run / "run" / "report.md").read_text()
    assert "Error detection" in md and "Error mechanisms" in md and "plots/" in md


def test_rerun_reuses_cached_stages(smoke_run: Path):
    proc = _crv(
        PRESET,
        "pipeline.stages=[subject,traces]",
        f"hydra.run.dir={smoke_run}/rerun",
        f"pipeline.cache_dir={smoke_run}/cache",
        cwd=Path.cwd(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((smoke_run / "rerun" / "report.json").read_text())
    assert report["reused"] == ["subject", "traces"]
    assert "reusing cached artifact" in proc.stdout + proc.stderr


def test_crv_verify_on_the_smoke_bundle(smoke_run: Path, tmp_path: Path):
    bundle = json.loads((smoke_run / "run" / "artifacts.json").read_text())["bundle"]
    lines = [
        {
            "id": "good",
            "prompt": "Q: Evaluate (2+3)*4\n",
            "completion": "Step 1: 2+3=5, so 5*4\nStep 2: 5*4=20, so 20\nAnswer: 20\n",
        },
        {
            "id": "bad",
            "prompt": "Q: Evaluate (2+3)*4\n",
            "steps": ["Step 1: 2+3=6, so 6*4", "Step 2: 6*4=24, so 24"],
        },
        {"id": "broken"},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = _crv(
        f"bundle={bundle}", f"input={inp}", f"output={out}", cwd=tmp_path, script="crv-verify"
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # one line failed, the others verified
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records[:2]] == ["good", "bad"]
    assert records[0]["error"] is None and len(records[0]["steps"]) == 2
    assert all(0.0 <= s["score"] <= 1.0 for r in records[:2] for s in r["steps"])
    labels = [f["label"] for r in records[:2] for s in r["steps"] for f in s["top_features"]]
    assert labels and all(isinstance(label, str) and label for label in labels)
    assert "line 3" in records[2]["error"]


def test_help_and_cfg():
    proc = _crv("--help", cwd=Path.cwd())
    assert proc.returncode == 0 and "transcoders.k=" in proc.stdout
    proc = _crv("--cfg", "job", PRESET, cwd=Path.cwd())
    assert proc.returncode == 0 and "n_per_complexity: 30" in proc.stdout
    assert shutil.which("crv", path=str(BIN))


GOLDEN = Path(__file__).parent / "golden" / "smoke.json"
TOLERANCE = {
    "auroc": 0.03,
    "fvu": 0.02,
    "fixed_step_rate": 0.01,
    "ce_loss_recovered": 0.02,
    "replacement_score": 0.02,
    "completeness_score": 0.02,
    "incorrect_steps": 0,
}
"""Absolute tolerance per kind of headline number: a seeded run repeats exactly on one
machine; these absorb float differences between machines and library versions, not a
regression (the quick run's fixed-step rate moves in steps of 1/12 or more)."""


def headline_numbers(report: dict) -> dict[str, float | None]:
    """The quick run's headline numbers: test AUROC per task of CRV, MaxProb, the
    layer-selecting probe and the combined verifier, FVU per transcoder layer, the
    interventions' fixed-step rate, the incorrect steps per task, CE loss recovered and the
    graphs' scores. A number that turns None (no incorrect test step) differs too."""
    out: dict[str, float | None] = {}
    for task in ("arithmetic", "boolean"):
        for method in ("crv", "maxprob", "probe", "crv+probes"):
            methods = report["verifier"][task]["methods"]
            out[f"verifier.{task}.{method}.auroc"] = methods[method]["auroc"]
    for row in report["traces"]["table"]:
        if row["complexity"] == "all":
            out[f"traces.{row['task']}.incorrect_steps"] = row["incorrect_steps"]
    for row in report["transcoders"]["layers"]:
        out[f"transcoders.layer{row['layer']}.fvu"] = row["fvu"]
    out["transcoders.ce_loss_recovered"] = report["transcoders"]["ce_loss_recovered"]
    for key in ("replacement_score", "completeness_score"):
        out[f"graphs.{key}"] = report["graphs"][key]
    out["interventions.fixed_step_rate"] = report["interventions"]["fixed_step_rate"]
    return out


def golden_differences(
    expected: dict[str, float | None], got: dict[str, float | None]
) -> dict[str, tuple]:
    """key -> (golden, now) for every headline number outside its tolerance; a number that
    appears, disappears (None) or turns NaN differs too."""
    off: dict[str, tuple] = {}
    for key in sorted(set(expected) | set(got)):
        if key not in expected or key not in got:
            off[key] = (expected.get(key, "absent"), got.get(key, "absent"))
            continue
        want, have = expected[key], got[key]
        if want is None or have is None or math.isnan(want) or math.isnan(have):
            same = repr(want) == repr(have)
        else:
            same = abs(have - want) <= TOLERANCE[key.rsplit(".", 1)[-1]]
        if not same:
            off[key] = (want, have)
    return off


def test_golden_comparison_catches_a_halved_auroc():
    golden = {"verifier.arithmetic.crv.auroc": 0.9, "transcoders.layer0.fvu": 0.1}
    assert golden_differences(golden, dict(golden)) == {}
    assert golden_differences(golden, {**golden, "transcoders.layer0.fvu": 0.115}) == {}
    assert golden_differences(golden, {**golden, "verifier.arithmetic.crv.auroc": 0.45}) == {
        "verifier.arithmetic.crv.auroc": (0.9, 0.45)
    }
    assert golden_differences({**golden, "interventions.fixed_step_rate": None}, golden) == {
        "interventions.fixed_step_rate": (None, "absent")
    }
    nan = {"verifier.arithmetic.crv.auroc": float("nan")}
    assert golden_differences(nan, nan) == {}
    assert golden_differences(nan, {"verifier.arithmetic.crv.auroc": 0.9})


def test_headline_numbers_match_the_golden_values(smoke_run: Path):
    """A change that moves a headline number fails until tests/golden/smoke.json is
    updated on purpose: `CRV_UPDATE_GOLDEN=1 pytest tests/test_smoke.py` rewrites it from
    this run (review the diff before committing it)."""
    got = headline_numbers(json.loads((smoke_run / "run" / "report.json").read_text()))
    if os.environ.get("CRV_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    off = golden_differences(json.loads(GOLDEN.read_text()), got)
    assert not off, f"headline numbers moved (golden, now): {off}"
