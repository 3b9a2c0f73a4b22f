"""Loader for GSM8K-format word problems (question, worked answer ending in `#### <gold>`).

Each record becomes a dict:

* `id` (`gsm8k-<split>-<row>`, the record's position in the source, stable when others are
  skipped), `task` (`"gsm8k"`), `question`, `answer` (raw text),
* `gold`: the text after `####`, stripped,
* `steps`: the reference reasoning steps, i.e. the answer text before `####` with GSM8K's
  calculator annotations (`<<48/2=24>>`) removed, split by `step_pattern` (default: one step
  per non-empty line),
* `labels`: per-step correctness (True = correct, null = unknown) from an optional
  `labels` field, or None when the record is unlabelled,
* `given`: True when the record carries its own chain of thought to be scored as given
  (an explicit `steps` list of strings, which replaces the steps read from the answer,
  or `labels`): the traces stage then teacher-forces those steps through the subject
  model, so the labels stay with the text they describe. A record with only question and
  answer is generated afresh and its steps labelled by `label_free_text`.

Labelling free text (`label_free_text`): every calculation a step states, `48/2=24` or
`3 * 12 = 36` (chains `a=b=c` too; GSM8K's `<<48/2=24>>` annotations count as stated), is
evaluated exactly (fractions); a step is correct when all hold, incorrect when one does
not, and `None` (left out of the benchmark, counted) when it states none. The `#### <n>`
line is a step too, correct when its number is the gold. Steps after the first incorrect
one are dropped, as for the synthetic tasks.

Sources: a local JSON Lines file (`.jsonl` / `.json`), a local Parquet file (read with
`datasets`), or else a Hugging Face hub name (`openai/gsm8k`, read with `datasets` when a hub
is reachable). JSON Lines files are read line by line so that a malformed line (bad JSON, a
missing or mistyped field, labels that do not match the steps) is skipped with a warning
naming the file and line, while the other records load; `datasets` would reject the whole
file. Parquet and hub records are validated the same way, named by row.
"""

from __future__ import annotations

import json
import operator
import re
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from crv.errors import CRVError
from crv.tasks.expr import BinaryOp, ExprError, Language, UnaryOp, evaluate, parse
from crv.tasks.segment import GENERIC_STEP_PATTERN, segment_steps

FINAL_MARKER = "####"
CALCULATOR_RE = re.compile(r"<<([^<>]*)>>")
CALC_SPAN_RE = re.compile(r"[\d.+\-*/()= ]*=[\d.+\-*/()= ]*")
FINAL_RE = re.compile(rf"^\s*{FINAL_MARKER}\s*(?P<answer>[^\n]*?)\s*$", re.MULTILINE)
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def _divide(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise ExprError("division by zero")
    return a / b


CALC_LANGUAGE = Language(
    name="calculation",
    binary=(
        BinaryOp("+", 1, operator.add),
        BinaryOp("-", 1, operator.sub),
        BinaryOp("*", 2, operator.mul),
        BinaryOp("/", 2, _divide),
    ),
    unary=(UnaryOp("-", operator.neg, group_atoms=True),),
    literal_pattern=r"\d+(?:\.\d+)?",
    read_literal=Fraction,
)
"""Decimal numbers with + - * / and brackets, evaluated exactly as fractions."""


class MalformedRecord(CRVError, ValueError):
    """A record that lacks a field or has one of the wrong form."""


def _records(path_or_name: str, split: str) -> Iterator[tuple[str, Any]]:
    """`(location, raw record)` pairs; location names the file and line (or row)."""
    path = Path(path_or_name)
    if path.suffix in (".jsonl", ".json"):
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    yield f"{path}:{number}", MalformedRecord(f"not valid UTF-8 ({err.reason})")
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
    if "steps" in record:
        steps = record["steps"]
        if (
            not isinstance(steps, list)
            or not steps
            or not all(isinstance(x, str) and x.strip() and "\n" not in x for x in steps)
        ):
            raise MalformedRecord(
                f"field 'steps' must be a non-empty list of one-line strings, got {steps!r}"
            )
    labels = record.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(
            x is None or isinstance(x, bool) for x in labels
        ):
            raise MalformedRecord(
                f"field 'labels' must be a list of booleans (or nulls), got {labels!r}"
            )
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
        "given": "steps" in record or labels is not None,
    }


def load_gsm8k(
    path_or_name: str,
    split: str = "test",
    step_pattern: str = GENERIC_STEP_PATTERN,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load up to `limit` GSM8K-format records; malformed ones (bad JSON, not UTF-8, missing
    fields) are skipped with a warning naming file and line. No valid record at all is a
    CRVError: an empty benchmark would only look like a result."""
    records: list[dict[str, Any]] = []
    skipped = 0
    for row, (location, raw) in enumerate(_records(path_or_name, split)):
        if limit is not None and len(records) >= limit:
            break
        try:
            record = parse_record(raw, step_pattern)
        except MalformedRecord as err:
            warnings.warn(f"{location}: skipped malformed record: {err}", stacklevel=2)
            skipped += 1
            continue
        records.append({"id": f"gsm8k-{split}-{row:06d}", **record})
    if not records:
        raise CRVError(f"{path_or_name}: no valid GSM8K record ({skipped} malformed, skipped)")
    return records


def _normalise(text: str) -> str:
    """`$1,200 x 3` -> `1200 * 3`: currency signs and thousands commas dropped, `x`/`×`
    between numbers and `÷` as operators."""
    text = text.replace("$", "").replace("÷", "/")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return re.sub(r"(?<=[\d)])\s*[x×]\s*(?=[\d(])", " * ", text)


def _holds(chain: str) -> bool | None:
    """Whether the calculation `a=b(=c...)` holds; None when it is not one (fewer than two
    sides, no operator, a side that is not an expression). A side written with d decimals
    matches a value that rounds to it (`10/3=3.33`)."""
    sides = [side.strip().rstrip(".").strip() for side in chain.split("=")]
    sides[0] = sides[0].lstrip(")*/+. ")  # a span may begin inside the sentence around it
    if len(sides) < 2 or not all(sides) or not any(re.search(r"\d\s*[-+*/]", s) for s in sides):
        return None
    try:
        values = [evaluate(parse(side, CALC_LANGUAGE), CALC_LANGUAGE) for side in sides]
    except (ExprError, RecursionError):
        return None
    exact = values[0]
    for side, value in zip(sides[1:], values[1:], strict=True):
        decimals = len(side.rsplit(".", 1)[1]) if re.fullmatch(r"-?\d+\.\d+", side) else 0
        if value != exact and not (decimals and round(exact, decimals) == value):
            return False
    return True


def calculations(text: str) -> list[bool]:
    """Whether each calculation `text` states holds, in order (annotations first)."""
    verdicts = [_holds(_normalise(m[1])) for m in CALCULATOR_RE.finditer(text)]
    visible = _normalise(CALCULATOR_RE.sub(" ", text))
    verdicts += [_holds(m[0]) for m in CALC_SPAN_RE.finditer(visible)]
    return [v for v in verdicts if v is not None]


def step_label(text: str) -> bool | None:
    """True when every calculation in `text` holds, False when one does not, None when it
    states none."""
    verdicts = calculations(text)
    return all(verdicts) if verdicts else None


def same_number(answer: str, gold: str) -> bool:
    """True when the first number in `answer` equals the gold number (`$1,200.` = `1200`)."""
    found = NUMBER_RE.search(_normalise(answer))
    gold_found = NUMBER_RE.search(_normalise(gold))
    if found is None or gold_found is None:
        return answer.strip() == gold.strip()
    return Fraction(found[0]) == Fraction(gold_found[0])


def free_text_step(
    index: int, completion: str, span: tuple[int, int], label: bool | None, reason: str
) -> dict[str, Any]:
    """One step dict of a free-text trace (the fields `crv.tasks.label.label_steps` gives)."""
    start, end = span
    return {
        "index": index,
        "text": completion[start:end],
        "label": label,
        "parsed": True,
        "reason": reason,
        "start_char": start,
        "end_char": end,
    }


def label_free_text(completion: str, gold: str) -> tuple[list[dict[str, Any]], str | None, bool]:
    """Steps of a free-text completion labelled by their calculations and, for the `####`
    line, by the gold; the final answer and its correctness. Text after the `####` line is
    ignored; steps after the first incorrect one are dropped."""
    final = FINAL_RE.search(completion)
    body = completion[: final.end()] if final else completion
    steps = []
    for index, span in enumerate(segment_steps(body, GENERIC_STEP_PATTERN)):
        text = completion[span[0] : span[1]]
        if final and span[0] >= final.start():
            verdict = step_label(text) is not False and same_number(final["answer"], gold)
            reason = "right_answer" if verdict else "wrong_answer"
        else:
            verdict = step_label(text)
            reason = {True: "ok", False: "wrong_calculation", None: "nothing_checkable"}[verdict]
        steps.append(free_text_step(index, completion, span, verdict, reason))
        if verdict is False:
            break
    answer = final["answer"] if final else None
    return steps, answer, answer is not None and same_number(answer, gold)
