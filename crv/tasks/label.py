"""Step labels of a completion: each task's checker applied to the model's text.

Synthetic tasks are checked exactly, by the judge the row's `label_mode` names: `strict`
(`crv.tasks.checker`, the canonical form crv-tiny is trained on) or `semantic`
(`crv.tasks.semantic`, true statements in any form, for pretrained models). GSM8K-format
rows are labelled by `crv.tasks.gsm8k.label_free_text`. Used by the traces stage and by
regenerations (interventions, crv-verify), which pass the trace row and so relabel a
regenerated completion the way its trace was labelled. Text without a task
(crv-verify's regenerations) is only segmented: `unlabelled_steps`.
"""

from __future__ import annotations

from typing import Any

from crv.tasks.checker import Judge, judge_strict
from crv.tasks.segment import segment_steps
from crv.tasks.semantic import judge_semantic

Labelled = tuple[list[dict[str, Any]], str | None, bool]
"""Steps (index, text, label, parsed, reason, start_char, end_char, planted_rule), final
answer, its correctness; `planted_rule` (`crv.tasks.bugs`) comes from the problem, not the
text ("" for none and for GSM8K; none at all in `unlabelled_steps`)."""

JUDGES: dict[str, Judge] = {"strict": judge_strict, "semantic": judge_semantic}
"""Label modes of the synthetic tasks (`traces.labels`)."""


def judge_for(mode: str) -> Judge:
    """The judge of a label mode; clear error for an unknown one."""
    try:
        return JUDGES[mode]
    except KeyError:
        raise ValueError(f"traces.labels must be one of {sorted(JUDGES)}, got {mode!r}") from None


def unlabelled_steps(completion: str, pattern: str) -> Labelled:
    """The steps of a free text split by `pattern`, with unknown labels and no final answer."""
    steps = [
        {"index": i, "text": completion[s:e], "label": None, "parsed": True, "reason": "",
         "start_char": s, "end_char": e}
        for i, (s, e) in enumerate(segment_steps(completion, pattern))
    ]  # fmt: skip
    return steps, None, False


def label_steps(row: dict[str, Any], completion: str, planted: bool = True) -> Labelled:
    """The labelled steps of `completion`, a new completion of the trace `row`; a step is a
    plain dict, so other fields can be added to it. `planted=False` (a subject not trained
    with the planted rules) leaves every step's `planted_rule` empty."""
    if row["task"] == "gsm8k":
        from crv.tasks.gsm8k import label_free_text

        steps, final, correct = label_free_text(completion, row["gold"])
        return [s | {"planted_rule": ""} for s in steps], final, correct

    from crv.tasks import Problem
    from crv.tasks.bugs import planted_rules
    from crv.tasks.checker import check_completion

    problem = Problem(row["id"], row["task"], row["complexity"], row["problem"], row["gold"])
    checked = check_completion(problem, completion, judge_for(row.get("label_mode") or "strict"))
    rules = planted_rules(problem) if planted else []
    steps = [
        {
            "index": s.index,
            "text": s.text,
            "label": s.label,
            "parsed": s.parsed,
            "reason": s.reason,
            "start_char": s.start_char,
            "end_char": s.end_char,
            "planted_rule": rules[s.index] if s.index < len(rules) else "",
        }
        for s in checked.steps
    ]
    return steps, checked.final_answer, checked.final_correct
