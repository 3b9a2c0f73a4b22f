"""The four commands' option handling: every bad option is one line and exit 2 before any
stage runs and before a run folder exists (one table, one row per misuse); the help texts;
crv-sweep-summary's arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import crv.cli.graphs
import crv.cli.verify
import crv.pipeline
from crv.cli.graphs import main as graphs_main
from crv.cli.main import main as crv_main
from crv.cli.main import verify_main
from crv.report import sweep_main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS: dict[str, Callable[[], None]] = {
    "crv": crv_main,
    "crv-verify": verify_main,
    "crv-graphs": graphs_main,
    "crv-sweep-summary": sweep_main,
}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# (command, argv, words the one stderr line holds, environment); `{tmp}` is the test's folder
MISUSES = [
    ("crv", ["nosuch.option=1"], ["unknown option nosuch.option"], {}),
    ("crv", ["+transcoders.kk=3"], ["unknown option transcoders.kk", "did you mean transcoders.k?"], {}),
    ("crv", ["trancoders.k=3"], ["unknown option trancoders.k", "did you mean transcoders.k?"], {}),
    ("crv", ["--cfg", "job", "+foo=1"], ["unknown option foo"], {}),
    ("crv", ["pipeline.stages=[subjct]"], ["pipeline.stages", "'subjct'", "did you mean subject?"], {}),
    ("crv", ["traces.tasks=[arithmetc]"], ["traces.tasks", "did you mean arithmetic?"], {}),
    ("crv", ["experiment=smok"], ["experiment=smok: no such preset", "did you mean smoke?"], {}),
    ("crv", ["graphs.position=middle"], ["graphs.position=middle", "expected one of"], {}),
    ("crv", ["graphs.node_threshold=2"], ["graphs.node_threshold"], {}),
    ("crv", ["-m", "transcoders.k=8,0"], ["transcoders.k must be > 0"], {}),
    ("crv", ["device=gpu"], ["device='gpu' is not a device", "did you mean cpu?"], {}),
    ("crv", ["device=cuda"], ["device=cuda: CUDA is not available"], {}),
    ("crv", ["device=gpu", "--help"], ["device='gpu'"], {}),
    ("crv", ["hydra.run.dir=/proc/crv-run"], ["hydra.run.dir=/proc/crv-run", "cannot write in /proc"], {}),
    ("crv", ["hydra.run.dir={tmp}/file/run"], ["hydra.run.dir=", "is not a directory"], {}),
    ("crv", ["pipeline.cache_dir={tmp}/file/cache"], ["pipeline.cache_dir=", "is not a directory"], {}),
    ("crv", ["traces.gsm8k_path=/no/such.jsonl"], ["traces.gsm8k_path=/no/such.jsonl: no such file"], {}),
    ("crv", ["subject.name=nosuch/model"], ["subject.name='nosuch/model'", "unreachable (HF_HUB_OFFLINE=1)"], {"HF_HUB_OFFLINE": "1"}),
    ("crv", ["subject.name=nosuch/model"], ["subject.name='nosuch/model'", "no connection to 127.0.0.1:9"], {"HF_ENDPOINT": "http://127.0.0.1:9"}),
    ("crv-verify", ["bundl=x"], ["unknown option bundl", "did you mean bundle?"], {}),
    ("crv-verify", ["bundle=x", "+foo=1"], ["unknown option foo"], {}),
    ("crv-verify", ["bundle=x", "device=gpu"], ["device='gpu' is not a device"], {}),
    ("crv-verify", ["bundle=x", "format=html"], ["format=html", "expected one of"], {}),
    ("crv-graphs", ["export", "limt=3"], ["unknown option limt", "did you mean limit?"], {}),
    ("crv-graphs", ["export", "run=x", "device=gpu"], ["device='gpu' is not a device"], {}),
    ("crv-graphs", ["exprot"], ["usage: crv-graphs export"], {}),
    ("crv-graphs", ["serve", "portt=1"], ["unknown option portt", "did you mean port?"], {}),
    ("crv-sweep-summary", ["/no/such/sweep"], ["/no/such/sweep: no such directory"], {}),
    ("crv-sweep-summary", ["{tmp}/sweep", "transcoders.ce_loss_recoverd"], ["in none of the 1 reports", "did you mean transcoders.ce_loss_recovered?"], {}),
    ("crv-sweep-summary", ["{tmp}/sweep", "transcoders"], ["is not a number"], {}),
    ("crv-sweep-summary", ["{tmp}/file"], ["no such directory"], {}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "argv", "words", "env"),
    MISUSES,
    ids=[f"{c} {' '.join(a)}"[:60] for c, a, _, e in MISUSES],
)
def test_every_misuse_is_one_line_exit_2_before_anything_runs(
    command: str,
    argv: list[str],
    words: list[str],
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "device=cuda" in argv and _cuda():
        pytest.skip("this machine has CUDA")
    (tmp_path / "file").write_text("a file, not a directory")
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    report = {"transcoders": {"ce_loss_recovered": 0.7}}
    (tmp_path / "sweep" / "0" / "report.json").write_text(json.dumps(report))
    ran: list[str] = []
    monkeypatch.setattr(crv.pipeline, "run_pipeline", lambda *a, **k: ran.append("pipeline"))
    monkeypatch.setattr(crv.cli.verify, "verify_command", lambda cfg: ran.append("verify") or 0)
    for name, (config, _) in crv.cli.graphs.COMMANDS.items():
        monkeypatch.setitem(
            crv.cli.graphs.COMMANDS, name, (config, lambda cfg: ran.append("graphs"))
        )
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [command, *(a.format(tmp=tmp_path) for a in argv)])
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command]()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(err) == 1 or (command == "crv-sweep-summary" and err[0].startswith("usage")), err
    assert all(word in err[-1] for word in words), err
    assert not ran
    assert not (tmp_path / "outputs").exists()  # no run folder, no cache


def test_a_working_directory_that_cannot_be_written_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir("/proc")  # nothing can be created there, not even by root
    monkeypatch.setattr(sys, "argv", ["crv", "experiment=smoke"])
    with pytest.raises(SystemExit) as exit_info:
        crv_main()
    [err] = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert "hydra.run.dir=outputs/runs/" in err and "the working directory /proc" in err


def test_help_shows_the_composed_values_and_the_presets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def help_of(*argv: str) -> str:
        monkeypatch.setattr(sys, "argv", ["crv", *argv, "--help"])
        crv_main()
        return capsys.readouterr().out

    default, smoke = help_of(), help_of("experiment=smoke")
    assert "  graphs.max_feature_nodes=64 " in default  # the default preset's, not the schema's
    assert "  graphs.max_feature_nodes=24 " in smoke and "traces.n_per_complexity=15 " in smoke
    assert "pipeline.stages=[subject,traces," in default
    for preset in ("experiment=smoke", "experiment=bugs", "subject=crv_tiny_bugs"):
        assert f"  {preset} " in default
    line = next(x for x in default.splitlines() if x.startswith("  transcoders.k="))
    assert len(line.split(maxsplit=1)) == 2  # the option's help text follows its value


def test_crv_verify_help_explains_every_option(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import fields

    from crv.check.config import VerifyConfig

    monkeypatch.setattr(sys, "argv", ["crv-verify", "--help"])
    verify_main()
    out = capsys.readouterr().out
    assert out.startswith("usage: crv-verify bundle=")
    for f in fields(VerifyConfig):
        [line] = [x for x in out.splitlines() if x.startswith(f"  {f.name}=")]
        assert len(line.split(maxsplit=1)) == 2, line  # name=default, then help text


def test_help_into_a_closed_pipe_ends_without_a_traceback() -> None:
    code = "from crv.cli.main import main; main()"
    proc = subprocess.run(
        f"{sys.executable} -c '{code}' --help | head -1",
        shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout.startswith("crv: ")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_sweep_summary_help_and_default_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["crv-sweep-summary", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        sweep_main()
    assert exit_info.value.code == 0
    assert "transcoders.ce_loss_recovered" in capsys.readouterr().out
    for run, value in (("0", 0.5), ("1", 0.8), ("2", None)):
        (tmp_path / run / ".hydra").mkdir(parents=True)
        (tmp_path / run / ".hydra" / "overrides.yaml").write_text(f"- seed={run}\n")
        report = {"transcoders": {"ce_loss_recovered": value}}
        (tmp_path / run / "report.json").write_text(json.dumps(report))
    monkeypatch.setattr(sys, "argv", ["crv-sweep-summary", str(tmp_path)])
    sweep_main()
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "0", "2"]  # best first, null last
