"""The exact step checker and step segmentation on hand-written completions."""

from __future__ import annotations

import random

import pytest

from crv.tasks import (
    GENERIC_STEP_PATTERN,
    Problem,
    check_completion,
    generate_problems,
    segment_steps,
)

ARITH = Problem("a", "arithmetic", 3, "7*((5+9)+7)", "147")
BOOL = Problem("b", "boolean", 3, "not (True and False) or False", "True")
TAIL = "Step 2: 14+7=21, so 7*21\nStep 3: 7*21=147, so 147\nAnswer: 147\n"


def reasons(problem: Problem, completion: str) -> list[str]:
    return [step.reason for step in check_completion(problem, completion).steps]


@pytest.mark.parametrize(
    ("first_step", "reason", "parsed"),
    [
        ("Step 1: 5+9=15, so 7*(15+7)", "wrong_result", True),
        ("Step 1: (5+9)+7=21, so 7*21", "not_innermost", True),
        ("Step 1: 9+5=14, so 7*(14+7)", "not_in_expression", True),
        ("Step 1: 5+9=14, so 7*(14+8)", "miscopied", True),
        ("Step 1: 5+9=14, so 7*14+7", "miscopied", True),
        ("Step 1: 14=14, so 7*(14+7)", "not_an_operation", True),
        ("Step 1: five plus nine is fourteen", "unparseable", False),
        ("Step 1: 5+9=14, so 7*(14+", "unparseable", False),
        ("Stp 1 5+9 gives 14", "unparseable", False),
    ],
)
def test_wrong_first_step_is_labelled_and_truncates(
    first_step: str, reason: str, parsed: bool
) -> None:
    checked = check_completion(ARITH, f"{first_step}\n{TAIL}")
    assert len(checked.steps) == 1  # only steps up to the first incorrect one are kept
    step = checked.steps[0]
    assert (step.label, step.reason, step.parsed) == (False, reason, parsed)
    assert step.expected == "7*(14+7)"
    assert checked.n_unparsed == int(not parsed)
    assert checked.final_answer == "147" and checked.final_correct


def test_error_in_a_later_step() -> None:
    completion = "Step 1: 5+9=14, so 7*(14+7)\nStep 2: 14+7=21, so 7*20\n" + TAIL
    checked = check_completion(ARITH, completion)
    assert [(s.label, s.reason) for s in checked.steps] == [(True, "ok"), (False, "miscopied")]
    assert checked.steps[1].expected == "7*21"
    assert (
        completion[checked.steps[1].start_char : checked.steps[1].end_char] == checked.steps[1].text
    )


def test_any_innermost_operation_and_redundant_brackets_are_accepted() -> None:
    problem = Problem("p", "arithmetic", 3, "(1+2)*(3+4)", "21")
    completion = (
        "Step 1: 3+4=7, so ((1+2))*7\nStep 2: 1+2=3, so 3*7\nStep 3: 3*7=21, so 21\nAnswer: 21\n"
    )
    checked = check_completion(problem, completion)
    assert [s.reason for s in checked.steps] == ["ok"] * 3 and checked.final_correct
    assert checked.steps[0].expected == "(1+2)*7"


def test_negative_values_and_unary_minus() -> None:
    problem = Problem("n", "arithmetic", 3, "(-(4))*(2-7)", "20")
    good = "Step 1: -(4)=-4, so (-4)*(2-7)\nStep 2: 2-7=-5, so (-4)*(-5)\nStep 3: (-4)*(-5)=20, so 20\n"
    assert reasons(problem, good + "Answer: 20\n") == ["ok"] * 3
    assert reasons(problem, "Step 1: 2-7=5, so (-(4))*5\n") == ["wrong_result"]


def test_boolean_steps() -> None:
    assert reasons(BOOL, BOOL.solution()) == ["ok"] * 3
    assert reasons(BOOL, "Step 1: True and False=True, so not True or False\n") == ["wrong_result"]
    assert reasons(BOOL, "Step 1: not True=False, so False or False\n") == ["not_in_expression"]
    assert reasons(BOOL, "Step 1: True and False=False, so not (False or False)\n") == ["miscopied"]


def test_final_answer() -> None:
    steps = "Step 1: 5+9=14, so 7*(14+7)\n"
    wrong = check_completion(ARITH, steps + "Answer: 148\nQ: Evaluate 1+1\nStep 1: junk\n")
    assert wrong.final_answer == "148" and not wrong.final_correct
    assert len(wrong.steps) == 1  # text after the Answer line is ignored
    missing = check_completion(ARITH, steps)
    assert missing.final_answer is None and not missing.final_correct


def test_never_raises_on_garbage() -> None:
    rng = random.Random(0)
    pieces = [
        "Step 1:",
        " ",
        "=",
        ", so ",
        "(",
        ")",
        "-",
        "+",
        "*",
        "7",
        "True",
        "not",
        "\n",
        "é",
        "Answer:",
    ]
    problems = generate_problems("arithmetic", 5, 5, 0) + generate_problems("boolean", 5, 5, 0)
    texts = ["", "\n\n", "Step 1: " + "(" * 5000 + "1=1, so 1\n"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randrange(60))) for _ in range(200)]
    for problem in problems:
        for text in texts:
            checked = check_completion(problem, text)
            assert all(not s.label for s in checked.steps[-1:]) or all(
                s.label for s in checked.steps
            )


def test_segmentation() -> None:
    completion = ARITH.solution()
    spans = segment_steps(completion)
    assert [completion[a:b] for a, b in spans] == completion.splitlines()[:3]
    free = "First, 3 * 4 = 12.\n\n  Then 12 + 1 = 13.\n#### 13"
    assert [free[a:b] for a, b in segment_steps(free, GENERIC_STEP_PATTERN)] == [
        "First, 3 * 4 = 12.",
        "  Then 12 + 1 = 13.",
        "#### 13",
    ]
    sentences = segment_steps("A is 1. B is 2.", r"[^.\s][^.]*\.")
    assert sentences == [(0, 7), (8, 15)]
