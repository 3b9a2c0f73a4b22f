"""Planted rules of crv-tiny-bugs: systematic, confidently-wrong reductions with a known cause.

crv-tiny makes almost no confident mistakes, so it cannot show whether an attribution graph
sees more than confidence. crv-tiny-bugs is fine-tuned on canonical traces in which the rules
below replace the true reduction every time they apply (`buggy_solution`), and the chain
continues from the wrong value, so the model learns them as firmly as the true rules. The
step checker does not know them: a step that follows a rule is incorrect.

`rule_of_step` says which rule a reduction step exercises from the state before the step and
the operation it reduces, never from a model's text; `planted_rules` gives it for every step
of a problem's canonical chain (the column `planted_rule` of the traces dataset).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from crv.tasks.expr import (
    Atom,
    Binary,
    Node,
    Path,
    Unary,
    Value,
    evaluate,
    innermost_paths,
    reduce_at,
    replace,
    subtree,
)
from crv.tasks.format import Problem, task_spec

SEVEN = 7


@dataclass(frozen=True)
class PlantedRule:
    """One planted rule. `trigger` is a regular expression over what a feature has read when
    it fires (its context up to and including the activating token, a few tokens back); it
    matches when the rule's trigger is in view, so a feature tied to the rule fires where it
    matches: on the `7` of `7*`, on the `=` of `8*7=` or on the product's digits."""

    name: str
    description: str
    task: str
    trigger: str


RULES: tuple[PlantedRule, ...] = (
    PlantedRule(
        name="times_seven",
        description="a product with 7 as an operand comes out one too high: 7*8=57, 3*7=22",
        task="arithmetic",
        trigger=r"(?<![\d.])\(?-?7\)?\*|\*\(?-?7(?![\d.])",
    ),
    PlantedRule(
        name="minus_dropped",
        description=(
            "reducing the operation inside a unary minus drops the minus in the restatement: "
            "`-(5+9)` -> `5+9=14, so 14`"
        ),
        task="arithmetic",
        trigger=r"(?<![\w)])-\(",
    ),
    PlantedRule(
        name="not_or_dropped",
        description=(
            "reducing an `or` that is the operand of `not` states the `or`'s value correctly "
            "but drops the `not` in the restatement: `not (True or False)` -> "
            "`True or False=True, so True`"
        ),
        task="boolean",
        trigger=r"not \([^()]*\bor\b",
    ),
)
"""The planted rules, at most one of which applies to any step."""


def _times_seven(state: Node, path: Path, op: Node) -> tuple[Value, Node] | None:
    """`a*b` with a or b equal to 7: the value plus one, restated as usual."""
    if not (isinstance(op, Binary) and op.op == "*"):
        return None
    if SEVEN not in (op.left.value, op.right.value):  # type: ignore[union-attr]
        return None
    value = int(evaluate(op, task_spec("arithmetic").lang)) + 1
    return value, replace(state, path, Atom(value))


def _drop_parent(
    state: Node, path: Path, op: Node, ops: tuple[str, ...], parent_op: str, task: str
) -> tuple[Value, Node] | None:
    """A binary `ops` operation under the prefix `parent_op`: true value, prefix lost."""
    if not (isinstance(op, Binary) and op.op in ops and path):
        return None
    parent = subtree(state, path[:-1])
    if not (isinstance(parent, Unary) and parent.op == parent_op):
        return None
    value = evaluate(op, task_spec(task).lang)
    return value, replace(state, path[:-1], Atom(value))


def _minus_dropped(state: Node, path: Path, op: Node) -> tuple[Value, Node] | None:
    """Any binary operation under unary minus: the restatement loses the minus."""
    return _drop_parent(state, path, op, ("+", "-", "*"), "-", "arithmetic")


def _not_or_dropped(state: Node, path: Path, op: Node) -> tuple[Value, Node] | None:
    """`or` under `not`: the restatement loses the `not`."""
    return _drop_parent(state, path, op, ("or",), "not", "boolean")


_APPLY: dict[str, Callable[[Node, Path, Node], tuple[Value, Node] | None]] = {
    "times_seven": _times_seven,
    "minus_dropped": _minus_dropped,
    "not_or_dropped": _not_or_dropped,
}


def _match(task: str, state: Node, path: Path) -> tuple[PlantedRule, Value, Node] | None:
    """The rule that reducing the operation at `path` of `state` exercises, and its result."""
    op = subtree(state, path)
    for rule in RULES:
        if rule.task == task and (result := _APPLY[rule.name](state, path, op)) is not None:
            return rule, *result
    return None


def rule_of_step(task: str, state: Node, path: Path) -> str:
    """Name of the rule exercised by reducing the operation at `path` of `state`, or ""."""
    match = _match(task, state, path)
    return match[0].name if match else ""


def buggy_reducer(task: str) -> Callable[[Node, Path], tuple[Value, Node]]:
    """A `Problem.solution` reducer that applies the planted rules, else the true reduction."""
    lang = task_spec(task).lang

    def reduce(state: Node, path: Path) -> tuple[Value, Node]:
        match = _match(task, state, path)
        if match is not None:
            return match[1], match[2]
        value = evaluate(subtree(state, path), lang)
        return value, replace(state, path, Atom(value))

    return reduce


def buggy_solution(problem: Problem) -> str:
    """The canonical completion with every planted rule applied (the crv-tiny-bugs data)."""
    return problem.solution(buggy_reducer(problem.task))


def planted_rules(problem: Problem) -> list[str]:
    """The rule exercised at each step of the problem's correct canonical chain ("" if none).

    Steps after the first planted one are never labelled (a wrong step ends the labelled
    part of a trace), so the correct chain is the state the model faces at every labelled
    step it takes in canonical order.
    """
    lang = task_spec(problem.task).lang
    state, names = problem.tree(), []
    while paths := innermost_paths(state):
        names.append(rule_of_step(problem.task, state, paths[0]))
        state = reduce_at(state, paths[0], lang)
    return names
