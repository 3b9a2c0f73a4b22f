"""Semantic step labels (`traces.labels=semantic`) on hand-written real-model steps."""

from __future__ import annotations

import pytest

from crv.tasks import Problem
from crv.tasks.label import label_steps

ARITH = Problem("a", "arithmetic", 3, "7+(9-1)", "15")
TIMES = Problem("t", "arithmetic", 3, "7*((5+9)+7)", "147")
BOOL = Problem("b", "boolean", 3, "True or (False and False)", "True")


def verdicts(problem: Problem, completion: str, mode: str = "semantic") -> list[tuple]:
    row = {
        "id": problem.id,
        "task": problem.task,
        "complexity": problem.complexity,
        "problem": problem.expression,
        "gold": problem.gold,
        "label_mode": mode,
    }
    steps, _, _ = label_steps(row, completion)
    return [(s["label"], s["reason"], s["parsed"]) for s in steps]


OK = (True, "ok", True)


@pytest.mark.parametrize(
    ("problem", "completion", "expected"),
    [
        # value computed, expression restated whole (value kept)
        (ARITH, "Step 1: 9-1=8, so 7+(9-1)\nStep 2: 7+8=15, so 15\n", [OK, OK]),
        # redundant brackets around an operand
        (ARITH, "Step 1: 9-1=8, so 7+(8)\nStep 2: 7+(8)=15, so 15\n", [OK, OK]),
        # any spacing, trailing full stop
        (ARITH, "Step 1:  9 - 1 = 8 , so 7 + 8.\nStep 2: 7 + 8 = 15, so 15\n", [OK, OK]),
        # two computations in one step, both true
        (TIMES, "Step 1: 5+9=14, 14+7=21, so 7*21\nStep 2: 7*21=147, so 147\n", [OK, OK]),
        (TIMES, "Step 1: 5+9=14 and 14+7=21, so 7*21\n", [OK]),
        # a chain of equalities
        (TIMES, "Step 1: (5+9)+7=14+7=21, so 7*21\n", [OK]),
        # two computations, the second false
        (TIMES, "Step 1: 5+9=14, 14+7=22, so 7*22\n", [(False, "wrong_result", True)]),
        # a restated chain: it must hold, its last side is the restatement
        (ARITH, "Step 1: 9-1=8, so 7+(9-1)=7+8\n", [OK]),
        (ARITH, "Step 1: 9-1=8, so 7+(9-1)=7+9\n", [(False, "wrong_result", True)]),
        # a false computation
        (ARITH, "Step 1: 9-1=7, so 7+7\n", [(False, "wrong_result", True)]),
        # a true computation but the restated expression changed value
        (ARITH, "Step 1: 9-1=8, so 7+9\n", [(False, "wrong_value", True)]),
        # Boolean: one step reduces a whole sub-expression
        (BOOL, "Step 1: True or (False and False)=True, so True\n", [OK]),
        (
            BOOL,
            "Step 1: False and False=False, so True or False\nStep 2: True or False=True, so True\n",
            [OK, OK],
        ),
        (BOOL, "Step 1: False and False=True, so True or True\n", [(False, "wrong_result", True)]),
        (BOOL, "Step 1: not True=False, so False\n", [(False, "wrong_value", True)]),
        # `so` between computations, `is` for `=`, `so Answer: v` restates v
        (TIMES, "Step 1: 5+9=14, so 14+7=21, so 7*21\n", [OK]),
        (TIMES, "Step 1: 5+9=14, so 14+7=22, so 7*22\n", [(False, "wrong_result", True)]),
        (BOOL, "Step 1: True or (False and False) is True, so True\n", [OK]),
        (ARITH, "Step 1: 9-1=8, so 7+8\nStep 2: 7+8=15, so Answer: 15\n", [OK, OK]),
        (ARITH, "Step 1: 7+(9-1)=16, so Answer: 16\n", [(False, "wrong_result", True)]),
        # a bare chain from the whole expression restates its last side
        (ARITH, "Step 1: 7+(9-1)=7+8=15\n", [OK]),
        (ARITH, "Step 1: 7+(9-1)=7+8\nStep 2: 7+8=16\n", [OK, (False, "wrong_result", True)]),
        (BOOL, "Step 1: True or (False and False)=True or False\n", [OK]),
        # unparseable: a computation alone (no restatement), words, not the task's language
        (ARITH, "Step 1: 9-1=8\n", [(False, "unparseable", False)]),
        (ARITH, "Step 1: subtract one from nine, so 7+8\n", [(False, "unparseable", False)]),
        (ARITH, "Step 1: 9-1, so 7+8\n", [(False, "unparseable", False)]),
        (BOOL, "Step 1: false and false=false, so True\n", [(False, "unparseable", False)]),
    ],
)
def test_semantic_labels(problem: Problem, completion: str, expected: list[tuple]) -> None:
    assert verdicts(problem, completion) == expected


def test_unary_minus_and_negative_values() -> None:
    problem = Problem("n", "arithmetic", 3, "(-(4))*(2-7)", "20")
    completion = "Step 1: -(4)=-4, 2 - 7 = -5, so -4*(-5)\nStep 2: (-4)*(-5)=20, so 20\n"
    assert verdicts(problem, completion) == [OK, OK]
    assert verdicts(problem, "Step 1: - 4 = 4, so 4*(2-7)\n")[0][1] == "wrong_result"


def test_strict_mode_rejects_what_semantic_accepts() -> None:
    completion = "Step 1: 9-1=8, so 7+(9-1)\nStep 2: 7+8=15, so 15\nAnswer: 15\n"
    assert verdicts(ARITH, completion, "strict") == [(False, "miscopied", True)]
    assert verdicts(ARITH, completion) == [OK, OK]


def test_semantic_labels_truncate_after_the_first_error_and_read_the_answer() -> None:
    row = {"id": "a", "task": "arithmetic", "complexity": 3, "problem": "7+(9-1)", "gold": "15"}
    completion = "Step 1: 9-1=9, so 7+9\nStep 2: 7+9=16, so 16\nAnswer: (15)\nQ: Evaluate 1+1\n"
    steps, final, correct = label_steps({**row, "label_mode": "semantic"}, completion)
    assert [s["index"] for s in steps] == [0]
    assert final == "(15)" and correct  # the same value as the gold


def test_unknown_label_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="traces.labels must be one of"):
        verdicts(ARITH, "Step 1: 9-1=8, so 7+8\n", "fuzzy")
