"""Contrastive targets: where an incorrect step departs from a correct one, and which token.

A step's ordinary graph explains the model's confident prediction; when that prediction is
the error, what matters is why the model preferred the wrong token to the right one. For an
incorrect synthetic step the checker knows the state before it (the problem's expression
reduced by the earlier, correct steps). Every innermost operation of that state gives one
correct step line `Step k: op=value, so rest` (`k` as the model wrote it); the one sharing
the longest prefix with the model's text is the reduction the model departed from (the
leftmost one on ties). The first differing character lies in one token of the trace: the
graph explains logit(that token) - logit(the first token of the correct continuation) at
the position before it (`TraceAttributor.contrast_node`), one target node whose row is the
difference of the two tokens' rows, so its edges are as exact as any.

For a trace without gold (a user's), `TraceAttributor.margin_node` gives the same kind of
target from the model alone: top-1 minus top-2 at a chosen position.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crv.graphs.attribute import StepAttribution, TraceAttributor
from crv.tasks import Problem, check_completion
from crv.tasks.expr import (
    Node,
    evaluate,
    innermost_paths,
    parse,
    reduce_at,
    subtree,
    to_text,
    value_text,
)
from crv.tasks.format import TASKS, step_line, task_spec
from crv.tasks.label import judge_for
from crv.tokens import last_token_index, token_char_ends

STEP_NUMBER = re.compile(r"Step (\d+):")


@dataclass(frozen=True)
class Contrast:
    """The contrastive target of one incorrect step: at `position`, the model wrote `token`
    (input_ids[position + 1]) where the correct step line `correct_line` continues with
    `baseline`."""

    step: int
    position: int
    token: int
    baseline: int
    correct_line: str


def correct_lines(state: Node, task: str, number: int) -> list[str]:
    """Every correct step line numbered `number` from `state`, one per innermost operation
    (leftmost first)."""
    lang = task_spec(task).lang
    lines = []
    for path in innermost_paths(state):
        op = subtree(state, path)
        rest = to_text(reduce_at(state, path, lang), lang)
        lines.append(step_line(number, to_text(op, lang), value_text(evaluate(op, lang)), rest))
    return lines


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def state_before(row: dict[str, Any], index: int) -> Node:
    """The correct state before step `index` of a synthetic trace row (the checker's
    replay of the earlier steps, which must all be correct)."""
    problem = Problem(row["id"], row["task"], row["complexity"], row["problem"], row["gold"])
    if index == 0:
        return problem.tree()
    checked = check_completion(
        problem, row["completion"], judge_for(row.get("label_mode") or "strict")
    )
    return parse(checked.steps[index - 1].expected, task_spec(row["task"]).lang)


def step_contrast(row: dict[str, Any], step: dict[str, Any], tokenizer: Any) -> Contrast | None:
    """The contrastive target of an incorrect step of a synthetic trace row (`task`,
    `complexity`, `problem`, `gold`, `completion`, `input_ids`, `prompt_len`); None when
    the step has no correct counterpart (a state already reduced to a value, or a
    departure the tokenizer cannot place)."""
    number = STEP_NUMBER.match(step["text"])
    k = int(number.group(1)) if number else step["index"] + 1
    candidates = correct_lines(state_before(row, step["index"]), row["task"], k)
    if not candidates:
        return None
    text = step["text"]
    line = max(candidates, key=lambda c: common_prefix(text, c))  # max keeps the first on ties
    completion, offset = row["completion"], int(row["prompt_len"])
    char = step["start_char"] + common_prefix(text, line)  # first differing character
    if char >= len(completion):
        return None
    ids = list(row["input_ids"])
    ends = token_char_ends(tokenizer, ids[offset:], completion)
    i = last_token_index(ends, char + 1, offset)  # the token holding it
    token_start = ends[i - offset - 1] if i > offset else 0
    correct = completion[: step["start_char"]] + line + "\n"
    rest = tokenizer(correct[token_start:], add_special_tokens=False)["input_ids"]
    if i < 2 or not rest or rest[0] == ids[i]:  # position i - 1 = 0 (BOS) has no sources
        return None
    return Contrast(step["index"], i - 1, ids[i], int(rest[0]), line)


def trace_contrasts(row: dict[str, Any], tokenizer: Any) -> list[Contrast]:
    """The contrastive targets of a trace row's incorrect synthetic steps (GSM8K-format and
    unlabelled steps have none)."""
    if row["task"] not in TASKS:
        return []
    found = (step_contrast(row, s, tokenizer) for s in row["steps"] if s["label"] is False)
    return [c for c in found if c is not None]


def contrast_scores(contrast: Contrast, probs: Sequence[float]) -> dict[str, float]:
    """Scores stored with a contrastive graph: its two tokens and their probabilities."""
    return {
        "contrast_token": float(contrast.token),
        "contrast_baseline": float(contrast.baseline),
        "contrast_token_prob": float(probs[contrast.token]),
        "contrast_baseline_prob": float(probs[contrast.baseline]),
    }


def contrast_attributions(
    attributor: TraceAttributor, contrasts: Sequence[Contrast], trace_id: str = ""
) -> list[StepAttribution]:
    """The unpruned contrastive graphs of `contrasts` (their positions must be targets of
    `attributor`), sharing its rows with the trace's step graphs."""
    out = []
    for c in contrasts:
        node = attributor.contrast_node(c.position, c.token, c.baseline)
        scores = contrast_scores(c, attributor.trace.probs(c.position))
        out.append(attributor.attribute([node], c.step, trace_id, scores))
    return out
