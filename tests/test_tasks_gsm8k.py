"""The GSM8K-format loader on the shipped sample and on malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crv.tasks import load_gsm8k

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "gsm8k_sample.jsonl"


def test_sample_file() -> None:
    records = load_gsm8k(str(SAMPLE))
    assert [r["gold"] for r in records] == ["48", "45", "15", "16"]
    first = records[0]
    assert first["id"] == "gsm8k-test-000000" and first["task"] == "gsm8k"
    assert first["steps"] == [
        "In the afternoon she makes 3 * 12 = 36 rolls.",
        "In total she makes 12 + 36 = 48 rolls.",
    ]
    assert first["labels"] is None
    assert records[2]["labels"] == [True, False]
    assert len(load_gsm8k(str(SAMPLE), limit=2)) == 2


def test_custom_step_pattern() -> None:
    record = load_gsm8k(str(SAMPLE), step_pattern=r"[^.\n]*\d[^.\n]*\.", limit=1)[0]
    assert len(record["steps"]) == 2


def test_malformed_records_are_skipped_with_a_warning(tmp_path: Path) -> None:
    good = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"question": "Q?", "answer": "no final answer"}),
        json.dumps({**good, "labels": [True, True]}),
        json.dumps({"answer": "1\n#### 1"}),
        "",
        json.dumps({**good, "labels": [False]}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as caught:
        records = load_gsm8k(str(path))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4
    assert messages[0].startswith(f"{path}:2:") and "invalid JSON" in messages[0]
    assert f"{path}:3:" in messages[1] and "####" in messages[1]
    assert f"{path}:4:" in messages[2] and "'labels'" in messages[2]
    assert f"{path}:5:" in messages[3] and "'question'" in messages[3]
    assert [r["id"] for r in records] == ["gsm8k-test-000000", "gsm8k-test-000005"]
    assert records[1]["labels"] == [False]


def test_parquet_file(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    path = tmp_path / "sample.parquet"
    Dataset.from_list([{**r, "labels": r.get("labels")} for r in rows]).to_parquet(str(path))
    records = load_gsm8k(str(path), split="test")
    assert [r["gold"] for r in records] == ["48", "45", "15", "16"]
    assert records[1]["labels"] == [True, True] and records[0]["labels"] is None


def test_unlabelled_steps_segment_with_the_given_pattern():
    from crv.tasks.label import unlabelled_steps
    from crv.tasks.segment import CANONICAL_STEP_PATTERN

    text = "Step 1: 2+3=5, so 5\nAnswer: 5\n#### 5"
    steps, final, correct = unlabelled_steps(text, CANONICAL_STEP_PATTERN)
    assert [s["text"] for s in steps] == ["Step 1: 2+3=5, so 5", "#### 5"]
    assert [s["label"] for s in steps] == [None, None] and (final, correct) == (None, False)
    assert text[steps[0]["start_char"] : steps[0]["end_char"]] == steps[0]["text"]


def test_undecodable_lines_are_skipped_and_no_valid_record_is_an_error(tmp_path):
    import pytest

    from crv.errors import CRVError

    good = json.dumps({"question": "Q?", "answer": "2+2=4\n#### 4"}).encode()
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"question": "\xff"}\n' + good + b"\n")
    with pytest.warns(
        UserWarning, match=r"mixed.jsonl:1: skipped malformed record: not valid UTF-8"
    ):
        records = load_gsm8k(str(path))
    assert [r["gold"] for r in records] == ["4"]
    empty = tmp_path / "bad.jsonl"
    empty.write_bytes(b"not json\n")
    with pytest.warns(UserWarning), pytest.raises(CRVError, match="no valid GSM8K record"):
        load_gsm8k(str(empty))
