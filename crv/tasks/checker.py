"""Exact step checker for the synthetic tasks (programmatic state verification).

The checker replays a completion against the problem's expression, judging each step with
a `Judge`: the strict one here (the canonical form, for crv-tiny) or the semantic one of
`crv.tasks.semantic` (true statements in any form, for pretrained models). The state starts
as the problem's expression; under the strict judge a step `Step k: <op>=<value>, so <rest>`
is correct when

1. `<op>` is an innermost operation of the state (operands all literals; any of them, not
   only the leftmost one the canonical solution picks),
2. `<value>` is its value, and
3. `<rest>` parses and equals the state with that operation replaced by its value.

Comparisons are on ASTs (`crv.tasks.expr`), so redundant brackets in `<rest>` are accepted;
the step number `k` is not checked. The correct step's `<rest>` becomes the next state.

Labels follow the CRV paper: only steps up to and including the first incorrect one are
kept, because once a step is wrong the later steps have no well-defined correct state.
Steps are the lines before the first `Answer:` line (`CANONICAL_STEP_PATTERN`); text after
that line is ignored. The final answer is the text of that `Answer:` line.

Reasons, checked in this order: `unparseable` (the line is not `Step k: op=value, so rest` or
a part is not an expression of the task), `not_an_operation` (`<op>` is a bare value),
`not_innermost` (`<op>` occurs in the state but has an unreduced operand),
`not_in_expression` (`<op>` does not occur in the state), `wrong_result`, `miscopied`
(`<rest>` is not the state with the operation reduced), else `ok`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from crv.tasks.expr import (
    Atom,
    ExprError,
    Language,
    Node,
    evaluate,
    innermost_paths,
    is_innermost,
    parse,
    parse_value,
    reduce_at,
    subtree,
    to_text,
    walk,
)
from crv.tasks.format import ANSWER_PREFIX, STEP_RE, Problem, task_spec
from crv.tasks.segment import CANONICAL_STEP_PATTERN, segment_steps

ANSWER_RE = re.compile(rf"^{re.escape(ANSWER_PREFIX)}[ \t]*(?P<answer>[^\n]*?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class StepCheck:
    """The verdict on one step; `start_char:end_char` is its text within the completion."""

    index: int
    text: str
    start_char: int
    end_char: int
    parsed: bool
    label: bool  # True = correct
    reason: str
    expected: str  # the correct restated expression after this step


@dataclass(frozen=True)
class CheckedTrace:
    """The checked steps (up to and including the first incorrect one) and the answer."""

    steps: list[StepCheck]
    final_answer: str | None
    final_correct: bool
    n_unparsed: int


@dataclass(frozen=True)
class Verdict:
    """A judge's verdict on one step line, before it is placed in the completion."""

    parsed: bool
    reason: str
    expected: str
    next_state: Node | None  # set only when the step is correct


Judge = Callable[[Node, str, Language], Verdict]
"""`(state, step line, language) -> Verdict`: the strict judge here, the semantic one in
`crv.tasks.semantic`."""


def canonical_next(state: Node, lang: Language) -> str:
    """The canonical restatement after `state`'s leftmost innermost operation is reduced."""
    paths = innermost_paths(state)
    return to_text(reduce_at(state, paths[0], lang) if paths else state, lang)


def judge_strict(state: Node, text: str, lang: Language) -> Verdict:
    """Check one step line against the current state, in the canonical form only."""
    paths = innermost_paths(state)
    canonical = canonical_next(state, lang)
    match = STEP_RE.fullmatch(text.strip())
    if match is None:
        return Verdict(False, "unparseable", canonical, None)
    try:
        op = parse(match["op"], lang)
        value = parse_value(match["value"], lang)
        rest = parse(match["rest"], lang)
    except (ExprError, RecursionError):
        return Verdict(False, "unparseable", canonical, None)
    if isinstance(op, Atom):
        return Verdict(True, "not_an_operation", canonical, None)
    if not is_innermost(op):
        occurs = any(sub == op for _, sub in walk(state))
        return Verdict(True, "not_innermost" if occurs else "not_in_expression", canonical, None)
    reduced = [reduce_at(state, path, lang) for path in paths if subtree(state, path) == op]
    if not reduced:
        return Verdict(True, "not_in_expression", canonical, None)
    expected = to_text(reduced[0], lang)
    if value != evaluate(op, lang):
        return Verdict(True, "wrong_result", expected, None)
    if rest not in reduced:
        return Verdict(True, "miscopied", expected, None)
    return Verdict(True, "ok", to_text(rest, lang), rest)


def _same_value(answer: str, gold: str, lang: Language) -> bool:
    """True when `answer` is `gold`, or reads as the same value of the language."""
    if answer == gold:
        return True
    try:
        return parse_value(answer.strip().rstrip("."), lang) == parse_value(gold, lang)
    except (ExprError, RecursionError):
        return False


def check_completion(
    problem: Problem, completion: str, judge: Judge = judge_strict
) -> CheckedTrace:
    """Label the steps of `completion` for a synthetic `problem` with `judge`; never raises
    on bad text. The final answer is correct when it is the gold text or, parsed as a value
    of the task, equals the gold value (`Answer: (147)`)."""
    lang = task_spec(problem.task).lang
    answer = ANSWER_RE.search(completion)
    body = completion[: answer.start()] if answer else completion
    state: Node = problem.tree()
    steps: list[StepCheck] = []
    for index, (start, end) in enumerate(segment_steps(body, CANONICAL_STEP_PATTERN)):
        text = completion[start:end]
        verdict = judge(state, text, lang)
        label = verdict.next_state is not None
        steps.append(
            StepCheck(
                index, text, start, end, verdict.parsed, label, verdict.reason, verdict.expected
            )
        )
        if not label:
            break
        state = verdict.next_state
    final_answer = answer["answer"] if answer else None
    return CheckedTrace(
        steps=steps,
        final_answer=final_answer,
        final_correct=final_answer is not None and _same_value(final_answer, problem.gold, lang),
        n_unparsed=sum(not step.parsed for step in steps),
    )
