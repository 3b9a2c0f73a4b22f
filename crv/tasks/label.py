"""Step labels of a completion: each task's checker applied to the model's text.

Synthetic tasks are checked exactly (`crv.tasks.checker`); a GSM8K-format record carries
its own labels. Used by the traces stage and by regenerations (interventions, crv-verify).
"""

from __future__ import annotations

from typing import Any


def label_steps(
    row: dict[str, Any], completion: str
) -> tuple[list[dict[str, Any]], str | None, bool]:
    """Steps (index, text, label, parsed, start_char, end_char), final answer, its correctness."""
    if row["task"] == "gsm8k":
        from crv.tasks.segment import GENERIC_STEP_PATTERN, segment_steps

        spans = segment_steps(completion, GENERIC_STEP_PATTERN)
        labels = row.get("labels") or [None] * len(spans)
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
        return steps, final, final == row["gold"]

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
