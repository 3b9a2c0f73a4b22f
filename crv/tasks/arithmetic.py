"""Synthetic arithmetic task: nested integer expressions over single-digit operands.

Operators: binary `+`, `-`, `*` and unary minus (written `-(e)`, see `crv.tasks.expr`).
Leaves are the digits 0-9. Problems whose value or any intermediate value exceeds 999 in
magnitude are re-drawn, so every number the model reads or writes has at most three digits
(plus a sign) and the task stays about reasoning order rather than long multiplication.
"""

from __future__ import annotations

import operator

from crv.tasks.expr import BinaryOp, Language, TaskSpec, UnaryOp

ARITHMETIC_LANGUAGE = Language(
    name="arithmetic",
    binary=(
        BinaryOp("+", 1, operator.add),
        BinaryOp("-", 1, operator.sub),
        BinaryOp("*", 2, operator.mul),
    ),
    unary=(UnaryOp("-", operator.neg, group_atoms=True),),
    literal_pattern=r"\d+",
    read_literal=int,
)

ARITHMETIC = TaskSpec(
    lang=ARITHMETIC_LANGUAGE,
    leaves=tuple(range(10)),
    unary_prob=0.2,
    max_abs=999,
)
