"""Semantic step judge for real models: true statements, not the canonical form.

A pretrained model that follows the step format of `crv.tasks.format` still writes steps
the strict checker rejects although they are true: `Step 1: 9-1=8, so 7+(9-1)` (the value
is computed but the expression is restated whole), `True or (False and False)=True`
(several operations reduced at once), `5+9=14, 14+7=21, so 7*21` (two computations),
`7+(8)=15` (redundant brackets). The semantic judge accepts a step

    Step k: <computations>, so <expression>

(`so` may also separate computations, the last part being the restatement; without `so`,
a bare chain `Step k: <whole expression>=...=<expression>` whose first side has the value
of the expression before the step restates its last side; `a is b` reads as `a=b` and
`so Answer: 21` as `so 21`) when

1. every computation it states is true: the computations are separated by `,`, `;`,
   `then` (and `and` where `and` is not an operator of the task); each is a chain
   `e1=e2(=e3...)` of expressions of the task (any spacing, redundant brackets, unary
   minus) whose values are all equal, and
2. the restated `<expression>` has the value of the expression before the step (a
   restated chain `so (7+5)*9=12*9` is a computation too, and its last side is what is
   restated).

Exact and programmatic (the task's own parser and evaluator), no judge model. A line that
is not of that shape, or a part that is not an expression of the task, is unparseable
(incorrect, counted apart). Reasons: `unparseable`, `wrong_result` (a stated computation is
false), `wrong_value` (the restated expression changed the value), else `ok`. A step need
not make progress: the value is what is checked, as the CRV paper's state verification does.
"""

from __future__ import annotations

import re

from crv.tasks.checker import Verdict, canonical_next
from crv.tasks.expr import ExprError, Language, Node, evaluate, parse

HEAD_RE = re.compile(r"\s*Step\s*\d+\s*:\s*(?P<body>.*\S)\s*")
SO_RE = re.compile(r"\s*(?:,\s*|\s)so\s+")
IS_RE = re.compile(r"\s+is\s+")
ANSWER_RE = re.compile(r"^\s*Answer:\s*")


def _separator(lang: Language) -> re.Pattern[str]:
    """Where one computation ends and the next begins in the task's language."""
    words = ["then"] + ([] if "and" in lang.binary_ops else ["and"])
    return re.compile(r"\s*[;,]\s*|\s+(?:" + "|".join(words) + r")\s+")


def _computations_hold(text: str, lang: Language) -> bool:
    """True when every `e1=e2(=...)` chain in `text` holds; raises `ExprError` on text that
    is not a list of such chains."""
    pieces = [p for p in _separator(lang).split(text) if p.strip()]
    if not pieces:
        raise ExprError("no computation")
    holds = True
    for piece in pieces:
        sides = piece.split("=")
        if len(sides) < 2:
            raise ExprError(f"{piece!r} is not a computation")
        values = [evaluate(parse(side, lang), lang) for side in sides]
        holds &= all(v == values[0] for v in values)
    return holds


def _split(body: str, state: Node, lang: Language) -> tuple[str, str] | None:
    """`(computations, restated chain)` of a step body, None when it has neither shape:
    `<computations>, so <computations>, so <expression>`, or a bare chain
    `<expression>=...=<expression>` that starts from an expression of the state's value
    (the whole state, restated at its end). `a is b` reads as `a=b`, and a restatement
    `so Answer: 21` as `so 21`."""
    body = IS_RE.sub("=", body)
    parts = SO_RE.split(body)
    if len(parts) >= 2:
        return ", ".join(parts[:-1]), ANSWER_RE.sub("", parts[-1]).rstrip(" .")
    if "=" in body:
        try:
            first = evaluate(parse(body.split("=", 1)[0], lang), lang)
        except (ExprError, RecursionError):
            return None
        if first == evaluate(state, lang):
            return body, body.rstrip(" .")
    return None


def judge_semantic(state: Node, text: str, lang: Language) -> Verdict:
    """Check one step line: its computations true, its restatement of the same value."""
    expected = canonical_next(state, lang)
    head = HEAD_RE.fullmatch(text)
    split = _split(head["body"], state, lang) if head else None
    if split is None:
        return Verdict(False, "unparseable", expected, None)
    computations, restated = split
    try:
        # `so (7+5)*9=12*9` restates a chain: it must hold, and its last side is the state
        holds = _computations_hold(computations, lang) and (
            "=" not in restated or _computations_hold(restated, lang)
        )
        rest = parse(restated.rsplit("=", 1)[-1], lang)
        same_value = evaluate(rest, lang) == evaluate(state, lang)
    except (ExprError, RecursionError):
        return Verdict(False, "unparseable", expected, None)
    if not holds:
        return Verdict(True, "wrong_result", expected, None)
    if not same_value:
        return Verdict(True, "wrong_value", expected, None)
    return Verdict(True, "ok", expected, rest)
