"""crv-verify: bad input lines, ordering, atomic output, exit codes, steps == completion.

Tests of the command's plumbing (ordering, exit codes, stdio, atomic output) replace the
per-trace scoring by a stub so they cost no attribution; the `test_end_to_end_*` tests
score real traces with the tiny bundle of `fixtures_bundle`.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures_bundle import (
    PROMPT,
    STEPS,
    write_subject,
)

import crv.cli.verify as verify
from crv.bundle import load_bundle
from crv.check.config import VerifyConfig
from crv.check.inputs import Trace
from crv.check.scorer import StepVerifier
from crv.cli.verify import verify_command, verify_line

GOOD = {"prompt": PROMPT, "steps": STEPS}


def jsonl(*objs: Any) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)


def run(tmp_path: Path, bundle: Path, data: bytes, **overrides: Any) -> tuple[int, list[dict]]:
    """Run crv-verify on `data`; the exit status and the output records."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(data)
    settings = {"bundle": str(bundle), "input": str(src), "output": str(out), "quiet": True}
    code = verify_command(VerifyConfig(**{**settings, **overrides}))
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return code, records


@pytest.fixture
def stub_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Score every trace's steps 0.25 without attribution (for plumbing tests)."""

    def fake(self: StepVerifier, trace: Trace) -> list[dict[str, Any]]:
        self.encode(trace)  # keeps the context-length check
        return [
            {"index": i, "text": trace.completion[s:e], "score": 0.25, "flagged": False,
             "top_features": [], "interventions": []}
            for i, (s, e) in enumerate(trace.spans)
        ]  # fmt: skip

    monkeypatch.setattr(StepVerifier, "verify", fake)


@pytest.fixture(scope="module")
def verifier(tiny_bundle: Path) -> StepVerifier:
    return StepVerifier(load_bundle(tiny_bundle), VerifyConfig())


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"prompt": "Q: 1\\n", "steps": ["a"', "not valid JSON"),
        (b'{"steps": ["Step 1: 1+1=2, so 2"]}', "missing 'prompt'"),
        (jsonl({"prompt": PROMPT}).strip(), "no steps"),
        (jsonl({"prompt": PROMPT, "steps": []}).strip(), "no steps"),
        (jsonl({"prompt": PROMPT, "completion": "Answer: 3\n\n"}).strip(), "no steps"),
        (jsonl({"prompt": PROMPT, "steps": [STEPS[0], "  "]}).strip(), "step 1 is empty"),
        (jsonl({"prompt": PROMPT, "steps": [STEPS[0], 7]}).strip(), "step 1 is not a string"),
        (
            jsonl({"prompt": "Q: Evaluate " + "1+" * 60 + "1\n", "steps": STEPS}).strip(),
            "beyond the model's context of 96 tokens",
        ),
        (b'{"prompt": "Q: \xff\\n", "steps": ["a"]}', "not valid UTF-8"),
    ],
    ids=[
        "not-json", "no-prompt", "no-steps", "empty-steps", "no-step-in-completion",
        "empty-step", "non-string-step", "too-long", "not-utf8",
    ],
)  # fmt: skip
def test_bad_line_gets_an_error_naming_line_and_problem(
    verifier: StepVerifier, raw: bytes, problem: str
) -> None:
    record = verify_line(verifier, 7, raw)
    assert record["error"].startswith("line 7: ")
    assert problem in record["error"]
    assert record["steps"] == [] and record["line"] == 7


def test_end_to_end_steps_and_completion_score_alike_and_order_is_kept(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """End to end: one forward pass per trace, both input forms, a bad line between."""
    as_completion = {"id": "b", "prompt": PROMPT, "completion": "\n".join(STEPS) + "\nAnswer: 70\n"}
    data = jsonl({"id": "a", **GOOD}, b"{oops", as_completion)
    code, records = run(tmp_path, tiny_bundle, data)
    assert code == 1
    assert [(r["id"], r["line"], r["error"] is None) for r in records] == [
        ("a", 1, True),
        (None, 2, False),
        ("b", 3, True),
    ]
    a, b = records[0]["steps"], records[2]["steps"]
    assert [s["text"] for s in a] == [s["text"] for s in b] == STEPS
    assert [s["score"] for s in a] == [s["score"] for s in b]
    assert [s["top_features"] for s in a] == [s["top_features"] for s in b]
    threshold = load_bundle(tiny_bundle).threshold
    for step in a:
        assert 0.0 <= step["score"] <= 1.0
        assert step["flagged"] == (step["score"] >= threshold)
        assert set(step["top_features"][0]) == {"layer", "feature", "label", "influence"}


@pytest.mark.parametrize("rank_by", ["influence", "margin"])
def test_end_to_end_intervene_proposes_and_regenerates(
    tmp_path: Path, tiny_bundle: Path, rank_by: str
) -> None:
    code, [record] = run(
        tmp_path, tiny_bundle, jsonl({"prompt": PROMPT, "steps": STEPS[:1]}),
        intervene=True, threshold=0.0, n_interventions=2, rank_by=rank_by,
    )  # fmt: skip
    assert code == 0
    [step] = record["steps"]
    assert step["flagged"]
    assert 1 <= len(step["interventions"]) <= 2
    assert set(step["interventions"][0]) == {"layer", "feature", "action", "scale"}
    assert step["interventions"][0]["action"] == "suppress"
    assert step["interventions"][0]["scale"] == 0.0
    assert isinstance(step["regenerated"]["continuation"], str)
    table = verify.render_table([record], 0.0)
    assert "  ->    L" in table  # the regenerated step under its row, with its intervention
    regenerated = step["regenerated"]["step"] or "(no step)"
    assert regenerated.replace("\n", "\\n")[:40] in table


def test_exit_status_zero_when_all_lines_verify(
    tmp_path: Path, tiny_bundle: Path, stub_scoring: None
) -> None:
    code, records = run(tmp_path, tiny_bundle, jsonl(GOOD, b"", b"  ", GOOD))
    assert code == 0
    assert [r["line"] for r in records] == [1, 4]  # blank lines are skipped, numbers kept


def test_exit_status_one_and_order_kept_when_some_lines_fail(
    tmp_path: Path, tiny_bundle: Path, stub_scoring: None
) -> None:
    lines = [{"id": str(i), **GOOD} if i % 3 else {"id": str(i)} for i in range(1, 10)]
    code, records = run(tmp_path, tiny_bundle, jsonl(*lines))
    assert code == 1
    assert [r["id"] for r in records] == [str(i) for i in range(1, 10)]
    assert [r["error"] is None for r in records] == [bool(i % 3) for i in range(1, 10)]


@pytest.mark.parametrize("what", ["bundle", "input", "model"])
def test_exit_status_two_with_one_line_error_when_nothing_can_run(
    tmp_path: Path, tiny_bundle: Path, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides: dict[str, Any] = {
        "bundle": {"bundle": str(tmp_path / "nowhere")},
        "input": {"input": str(tmp_path / "missing.jsonl")},
        "model": {"model": str(write_subject(tmp_path / "other", hidden_size=48))},
    }[what]
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(GOOD))
    settings = {"bundle": str(tiny_bundle), "input": str(src), "output": str(tmp_path / "o")}
    assert verify_command(VerifyConfig(**{**settings, **overrides})) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("crv-verify: error: ")
    expected = {
        "bundle": "bundle.json is missing",
        "input": "cannot read input",
        "model": "d_model",
    }
    assert expected[what] in err
    assert not (tmp_path / "o").exists()


def test_failure_mid_write_keeps_the_previous_output(
    tmp_path: Path, tiny_bundle: Path, stub_scoring: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.jsonl"
    previous = '{"previous": "good output"}\n'
    out.write_text(previous)
    real, calls = verify.verify_line, []

    def failing(*args: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 2:  # the first record is already in the temporary file
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(verify, "verify_line", failing)
    code, _ = run(tmp_path, tiny_bundle, jsonl(GOOD, GOOD, GOOD))
    assert code == 2
    assert out.read_text() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]

    def interrupted(*args: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify_line", interrupted)
    code, _ = run(tmp_path, tiny_bundle, jsonl(GOOD))
    assert code == 130
    assert out.read_text() == previous


def test_stdin_to_stdout_and_table(
    tiny_bundle: Path,
    stub_scoring: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = jsonl({"id": "x", **GOOD}, b"[1, 2]")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert verify_command(VerifyConfig(bundle=str(tiny_bundle), input="-", output="-")) == 1
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["id"] for r in records] == ["x", None]
    assert "expected a JSON object" in records[1]["error"]
    assert "2 traces (1 verified, 1 failed), 3 steps" in captured.err  # the table on stderr

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    cfg = VerifyConfig(bundle=str(tiny_bundle), input="-", output="-", format="table", quiet=True)
    assert verify_command(cfg) == 1
    captured = capsys.readouterr()
    assert "Step 2: 2+3=5, so 14*5" in captured.out and "ERR" in captured.out
    assert captured.err == ""


def test_integer_ids_are_kept_as_given(
    tmp_path: Path, tiny_bundle: Path, stub_scoring: None
) -> None:
    data = jsonl({**GOOD, "id": 7}, {**GOOD, "id": 0}, {**GOOD, "id": "x"}, {**GOOD, "id": True})
    code, records = run(tmp_path, tiny_bundle, data)
    assert [r["id"] for r in records[:3]] == [7, 0, "x"]
    assert all(r["error"] is None for r in records[:3])
    assert code == 1 and "'id' must be a string or an integer" in records[3]["error"]
    table = verify.render_table(records, 0.5)
    assert "    1  7   " in table and "    2  0   " in table


def test_table_shows_warnings_and_regenerated_steps() -> None:
    step = {
        "index": 2, "text": "Step 3: 8*5=45, so 45", "score": 0.9, "flagged": True,
        "top_features": [], "warning": "characters the tokenizer cannot represent were dropped",
        "interventions": [{"layer": 3, "feature": 17, "action": "suppress", "scale": 0.0}],
        "regenerated": {"intervention": 0, "step": "Step 3: 8*5=40, so 40", "continuation": ""},
    }  # fmt: skip
    rows = verify.render_table([{"id": 1, "line": 1, "steps": [step], "error": None}], 0.5)
    rows = rows.splitlines()
    assert "Step 3: 8*5=45" in rows[1]
    assert rows[2].strip() == "warning: characters the tokenizer cannot represent were dropped"
    assert rows[3].split() == ["->", "L3/F17", "suppress", "Step", "3:", "8*5=40,", "so", "40"]


def test_bundle_may_be_a_run_directory(
    tmp_path: Path, tiny_bundle: Path, stub_scoring: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "artifacts.json").write_text(json.dumps({"bundle": str(tiny_bundle)}))
    code, records = run(tmp_path, run_dir, jsonl(GOOD))
    assert code == 0 and len(records[0]["steps"]) == len(STEPS)
    (run_dir / "artifacts.json").write_text(json.dumps({"subject": str(tmp_path)}))
    code, _ = run(tmp_path, run_dir, jsonl(GOOD))
    [err] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "is a run directory without a bundle" in err and "subject" in err
