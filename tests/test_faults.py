"""Fault injection: damaged caches, bad values, special output files, file permissions.

Each case is a fault a user can cause by accident; the test pins the behaviour crv promises
for it (see README "Failure behaviour"): a damaged artifact is never reused silently, a bad
value stops the run with one line and exit 2, crv-verify writes pipes and devices in place.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_bundle import (
    PROMPT,
    STEPS,
)

from crv.check.config import VerifyConfig
from crv.cli.verify import verify_command
from crv.io import atomic_write_text
from crv.pipeline import CacheDamageError, Stage, run_pipeline

CALLS: list[str] = []


@dataclass
class Cfg:
    value: int = 1


def _make(ctx):
    CALLS.append(ctx.name)
    (ctx.out / "big.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB: only sized by default
    (ctx.out / "small.txt").write_text(str(ctx.cfg.value))
    return {"value": ctx.cfg.value}


@pytest.fixture()
def stage(monkeypatch: pytest.MonkeyPatch) -> tuple[Stage, ...]:
    import types

    mod = types.ModuleType("fault_stages")
    mod.make = _make
    monkeypatch.setitem(sys.modules, "fault_stages", mod)
    CALLS.clear()
    return (Stage("one", (), "fault_stages:make"),)


def _run(stages, root: Path, **kw):
    return run_pipeline({"one": Cfg()}, ["one"], root, seed=0, device="cpu", stages=stages, **kw)


def _damage_cases(artifact: Path) -> dict:
    return {
        "deleted": lambda: (artifact / "small.txt").unlink(),
        "truncated": lambda: (artifact / "big.bin").write_bytes(b"x" * 10),
        "edited_small": lambda: (artifact / "small.txt").write_text("9"),
        "edited_metrics": lambda: (artifact / "metrics.json").write_text('{"value": 99}\n'),
        "added": lambda: (artifact / "extra.txt").write_text("?"),
    }


@pytest.mark.parametrize(
    "case", ["deleted", "truncated", "edited_small", "edited_metrics", "added"]
)
def test_damaged_artifact_is_recomputed(stage, tmp_path: Path, case: str, caplog) -> None:
    first = _run(stage, tmp_path)[0]
    _damage_cases(first.path)[case]()
    second = _run(stage, tmp_path)[0]
    assert CALLS == ["one", "one"] and not second.reused
    assert second.metrics == {"value": 1}
    assert "is damaged" in caplog.text


def test_same_size_edit_of_a_large_file_needs_verify_cache(stage, tmp_path: Path) -> None:
    first = _run(stage, tmp_path)[0]
    data = bytearray((first.path / "big.bin").read_bytes())
    data[100] ^= 0xFF
    (first.path / "big.bin").write_bytes(bytes(data))
    assert _run(stage, tmp_path)[0].reused  # sizes only for large files by default
    assert not _run(stage, tmp_path, verify_cache=True)[0].reused


def test_on_damage_fail_names_the_file(stage, tmp_path: Path) -> None:
    first = _run(stage, tmp_path)[0]
    (first.path / "small.txt").unlink()
    with pytest.raises(CacheDamageError, match=r"one/\w+ is damaged: .*small.txt is missing"):
        _run(stage, tmp_path, on_damage="fail")


def test_stale_tmp_of_dead_process_is_removed_but_live_and_scratch_kept(stage, tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / "one" / f"abc.tmp-{dead}"
    live = tmp_path / "one" / f"abc.tmp-{os.getpid()}"
    scratch = tmp_path / "one" / "unfinished.scratch"
    for d in (stale, live, scratch):
        d.mkdir(parents=True)
    _run(stage, tmp_path)
    assert not stale.exists() and live.exists() and scratch.exists()


def test_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


def _crv(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from crv.cli.main import main; main()", "experiment=smoke",
           f"hydra.run.dir={tmp_path / 'run'}", f"pipeline.cache_dir={tmp_path / 'cache'}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["device=cuda"], "CUDA is not available"),
        (["nosuch.option=1"], "nosuch"),
        (["traces.gsm8k_path=/no/such/file.jsonl"], "no such file"),
        (["subject.name=/no/such/model"], "subject.name='/no/such/model' cannot be loaded"),
    ],
)
def test_bad_values_stop_before_any_stage_with_exit_2(tmp_path: Path, args, needle) -> None:
    if needle == "CUDA is not available":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    proc = _crv(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "traces").exists()


def test_read_only_cache_is_one_line_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = _crv(tmp_path, f"pipeline.cache_dir={blocker / 'cache'}")
    assert proc.returncode == 2
    assert "is not writable" in proc.stderr and "Traceback" not in proc.stderr


# crv-verify ---------------------------------------------------------------------------


def _verify(tmp_path: Path, bundle: Path, output: str) -> int:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": PROMPT, "steps": STEPS}) + "\n")
    return verify_command(
        VerifyConfig(bundle=str(bundle), input=str(src), output=output, quiet=True)
    )


def test_verify_writes_into_a_fifo_without_replacing_it(tmp_path: Path, tiny_bundle: Path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    assert _verify(tmp_path, tiny_bundle, str(fifo)) == 0
    reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert json.loads(got[0].decode().splitlines()[0])["steps"]


def test_verify_writes_through_a_link_without_replacing_it(tmp_path: Path, tiny_bundle: Path):
    target, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    target.write_text("")
    link.symlink_to(target)
    assert _verify(tmp_path, tiny_bundle, str(link)) == 0
    assert link.is_symlink() and target.read_text().strip()


def test_verify_unwritable_device_is_exit_2(tmp_path: Path, tiny_bundle: Path, capsys):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    assert _verify(tmp_path, tiny_bundle, "/dev/full") == 2
    assert "cannot write output /dev/full" in capsys.readouterr().err
    assert stat.S_ISCHR(Path("/dev/full").stat().st_mode)


def test_verify_damaged_bundle_is_exit_2_with_one_line(tmp_path: Path, tiny_bundle: Path, capsys):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    layer = next((copy / "transcoders").glob("layer_*.safetensors"))
    layer.write_bytes(layer.read_bytes()[:100])
    assert _verify(tmp_path, copy, str(tmp_path / "out.jsonl")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load bundle" in err[0]


def test_verify_scores_the_steps_that_fit_and_marks_the_rest(tmp_path: Path, tiny_bundle: Path):
    steps = STEPS * 12  # far longer than the tiny bundle's 96-token context
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": PROMPT, "steps": steps}) + "\n")
    code = verify_command(
        VerifyConfig(bundle=str(tiny_bundle), input=str(src), output=str(out), quiet=True)
    )
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    scored = [s for s in record["steps"] if "score" in s]
    beyond = [s for s in record["steps"] if "error" in s]
    assert code == 1 and record["error"] is None
    assert scored and beyond and len(scored) + len(beyond) == len(steps)
    assert [s["index"] for s in record["steps"]] == list(range(len(steps)))
    assert all(s["error"].startswith("beyond context") for s in beyond)


def test_verify_warns_about_characters_the_tokenizer_drops(tmp_path: Path, tiny_bundle: Path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    odd = [STEPS[0] + " \U0001f914", *STEPS[1:]]
    src.write_text(json.dumps({"prompt": PROMPT, "steps": odd}) + "\n")
    verify_command(
        VerifyConfig(bundle=str(tiny_bundle), input=str(src), output=str(out), quiet=True)
    )
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert "\U0001f914" in record["steps"][0]["warning"]
    assert "warning" not in record["steps"][1]


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_tmp(tmp_path: Path) -> None:
    import signal
    import time

    cmd = [sys.executable, "-c", "from crv.cli.main import main; main()", "experiment=smoke",
           f"hydra.run.dir={tmp_path / 'run'}", f"pipeline.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    # A shell's background job inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 600  # generous: CI machines are shared and slow to start
    while not list((tmp_path / "cache").glob("traces/*.tmp-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
    assert list((tmp_path / "cache").glob("traces/*.tmp-*")), "the traces stage never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list((tmp_path / "cache").glob("*/*.tmp-*"))
