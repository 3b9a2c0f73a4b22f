"""Synthetic Boolean task: `True`/`False` combined with `and`, `or` and `not`.

`not` is written `not True` on a literal and `not (e)` on anything else; binary operands
that are themselves binary operations are parenthesised (see `crv.tasks.expr`). Values are
always True or False, so no problem is re-drawn.
"""

from __future__ import annotations

import operator

from crv.tasks.expr import BinaryOp, ExprError, Language, TaskSpec, UnaryOp


def _read_bool(text: str) -> bool:
    """`True` / `False` to a bool."""
    if text not in ("True", "False"):
        raise ExprError(f"not a Boolean literal: {text!r}")
    return text == "True"


BOOLEAN_LANGUAGE = Language(
    name="boolean",
    binary=(
        BinaryOp("or", 1, lambda a, b: bool(a) or bool(b)),
        BinaryOp("and", 2, lambda a, b: bool(a) and bool(b)),
    ),
    unary=(UnaryOp("not", operator.not_, group_atoms=False),),
    literal_pattern=r"(?:True|False)\b",
    read_literal=_read_bool,
)

BOOLEAN = TaskSpec(lang=BOOLEAN_LANGUAGE, leaves=(True, False), unary_prob=0.25)
