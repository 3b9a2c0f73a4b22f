"""Step labels of a completion: each task's checker applied to the model's text.

Synthetic tasks are checked exactly (`crv.tasks.checker`); a GSM8K-format record carries
its own labels, and any other free text (crv-verify's regenerations) is only segmented.
Used by the traces stage and by regenerations (interventions, crv-verify).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crv.tasks.segment import GENERIC_STEP_PATTERN, segment_steps

Labelled = tuple[list[dict[str, Any]], str | None, bool]
"""Steps (index, text, label, parsed, start_char, end_char), final answer, its correctness."""


def label_free_text(
    completion: str,
    pattern: str = GENERIC_STEP_PATTERN,
    labels: Sequence[bool | None] = (),
    gold: str | None = None,
) -> Labelled:
    """Free-text steps split by `pattern`, with the given `labels` (None past their end);
    the final answer is the text after the last `####` (GSM8K's format), correct when it
    equals `gold`."""
    spans = segment_steps(completion, pattern)
    steps = [
        {
            "index": i,
            "text": completion[s:e],
            "label": labels[i] if i < len(labels) else None,
            "parsed": True,
            "start_char": s,
            "end_char": e,
        }
        for i, (s, e) in enumerate(spans)
    ]
    final = completion.rsplit("####", 1)[-1].strip() if "####" in completion else None
    return steps, final, gold is not None and final == gold


def label_steps(row: dict[str, Any], completion: str) -> Labelled:
    """The labelled steps of `completion`, a new completion of the trace `row`."""
    if row["task"] == "gsm8k":
        return label_free_text(completion, labels=row.get("labels") or (), gold=row["gold"])

    from crv.tasks import Problem
    from crv.tasks.checker import check_completion

    problem = Problem(row["id"], row["task"], row["complexity"], row["problem"], row["gold"])
    checked = check_completion(problem, completion)
    steps = [
        {
            "index": s.index,
            "text": s.text,
            "label": s.label,
            "parsed": s.parsed,
            "start_char": s.start_char,
            "end_char": s.end_char,
        }
        for s in checked.steps
    ]
    return steps, checked.final_answer, checked.final_correct
