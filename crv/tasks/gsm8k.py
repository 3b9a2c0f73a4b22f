"""Loader for GSM8K-format word problems (question, worked answer ending in `#### <gold>`).

Each record becomes a dict:

* `id` (`gsm8k-<split>-<row>`, the record's position in the source, stable when others are
  skipped), `task` (`"gsm8k"`), `question`, `answer` (raw text),
* `gold`: the text after `####`, stripped,
* `steps`: the reference reasoning steps, i.e. the answer text before `####` with GSM8K's
  calculator annotations (`<<48/2=24>>`) removed, split by `step_pattern` (default: one step
  per non-empty line),
* `labels`: per-step correctness (True = correct) from an optional `labels` field, or None
  when the record is unlabelled.

Sources: a local JSON Lines file (`.jsonl` / `.json`), a local Parquet file (read with
`datasets`), or else a Hugging Face hub name (`openai/gsm8k`, read with `datasets` when a hub
is reachable). JSON Lines files are read line by line so that a malformed line (bad JSON, a
missing or mistyped field, labels that do not match the steps) is skipped with a warning
naming the file and line, while the other records load; `datasets` would reject the whole
file. Parquet and hub records are validated the same way, named by row.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crv.tasks.segment import GENERIC_STEP_PATTERN, segment_steps

FINAL_MARKER = "####"
CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


class MalformedRecord(ValueError):
    """A record that lacks a field or has one of the wrong form."""


def _records(path_or_name: str, split: str) -> Iterator[tuple[str, Any]]:
    """`(location, raw record)` pairs; location names the file and line (or row)."""
    path = Path(path_or_name)
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{path}:{number}", MalformedRecord(f"invalid JSON ({err.msg})")
        return
    from datasets import load_dataset

    if path.suffix == ".parquet":
        dataset = load_dataset("parquet", data_files={split: str(path)}, split=split)
        where = str(path)
    else:
        config = "main" if path_or_name.rstrip("/").split("/")[-1] == "gsm8k" else None
        dataset = load_dataset(path_or_name, config, split=split)
        where = f"{path_or_name}[{split}]"
    for row, record in enumerate(dataset):
        yield f"{where} row {row}", record


def _field(record: dict[str, Any], name: str) -> str:
    """A required non-empty string field."""
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise MalformedRecord(f"field {name!r} must be a non-empty string, got {value!r}")
    return value


def parse_record(record: Any, step_pattern: str = GENERIC_STEP_PATTERN) -> dict[str, Any]:
    """Validate one raw record and derive gold, steps and labels (without the id)."""
    if isinstance(record, MalformedRecord):
        raise record
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(record).__name__}")
    question, answer = _field(record, "question"), _field(record, "answer")
    if FINAL_MARKER not in answer:
        raise MalformedRecord(f"field 'answer' has no {FINAL_MARKER!r} final answer")
    reasoning, gold = answer.rsplit(FINAL_MARKER, 1)
    if not gold.strip():
        raise MalformedRecord(f"field 'answer' has nothing after {FINAL_MARKER!r}")
    reasoning = CALCULATOR_RE.sub("", reasoning)
    steps = [reasoning[start:end].strip() for start, end in segment_steps(reasoning, step_pattern)]
    labels = record.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, bool) for x in labels):
            raise MalformedRecord(f"field 'labels' must be a list of booleans, got {labels!r}")
        if len(labels) != len(steps):
            raise MalformedRecord(
                f"field 'labels' has {len(labels)} entries for {len(steps)} reference steps"
            )
    return {
        "task": "gsm8k",
        "question": question,
        "answer": answer,
        "gold": gold.strip(),
        "steps": steps,
        "labels": labels,
    }


def load_gsm8k(
    path_or_name: str,
    split: str = "test",
    step_pattern: str = GENERIC_STEP_PATTERN,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load up to `limit` GSM8K-format records; malformed ones are skipped with a warning."""
    records: list[dict[str, Any]] = []
    for row, (location, raw) in enumerate(_records(path_or_name, split)):
        if limit is not None and len(records) >= limit:
            break
        try:
            record = parse_record(raw, step_pattern)
        except MalformedRecord as err:
            warnings.warn(f"{location}: skipped malformed record: {err}", stacklevel=2)
            continue
        records.append({"id": f"gsm8k-{split}-{row:06d}", **record})
    return records
