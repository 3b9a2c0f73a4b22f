"""Synthetic problem generation, the canonical format and train/test splits."""

from __future__ import annotations

import re

import pytest

from crv.tasks import TASKS, Problem, check_completion, generate_problems, make_splits
from crv.tasks.expr import count_operators, evaluate, parse, to_text, walk

COMPLEXITIES = (1, 2, 3, 5, 7, 10)
ALPHABET = re.compile(r"Q:|Evaluate|Step|so|Answer:|True|False|and|or|not|[0-9+\-*()=:, \n]")


def test_canonical_example_matches_the_contract() -> None:
    problem = Problem("x", "arithmetic", 3, "7*((5+9)+7)", "147")
    assert problem.prompt == "Q: Evaluate 7*((5+9)+7)\n"
    assert problem.solution() == (
        "Step 1: 5+9=14, so 7*(14+7)\n"
        "Step 2: 14+7=21, so 7*21\n"
        "Step 3: 7*21=147, so 147\n"
        "Answer: 147\n"
    )


def test_boolean_example_and_negative_values() -> None:
    boolean = Problem("b", "boolean", 3, "not (True and False) or False", "True")
    assert boolean.solution().splitlines()[0] == (
        "Step 1: True and False=False, so not False or False"
    )
    negative = Problem("a", "arithmetic", 3, "3*(2-7)", "-15")
    assert (
        negative.solution()
        == "Step 1: 2-7=-5, so 3*(-5)\nStep 2: 3*(-5)=-15, so -15\nAnswer: -15\n"
    )
    unary = Problem("u", "arithmetic", 2, "(-(4))+1", "-3")
    assert unary.solution().splitlines()[0] == "Step 1: -(4)=-4, so (-4)+1"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_per_seed_and_different_across_seeds(task: str) -> None:
    first = generate_problems(task, 5, 20, seed=1)
    assert first == generate_problems(task, 5, 20, seed=1)
    assert [p.expression for p in first] != [
        p.expression for p in generate_problems(task, 5, 20, 2)
    ]
    assert len({p.id for p in first}) == 20
    assert first[3].id == f"{task}-n5-000003"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_problems_are_well_formed(task: str) -> None:
    lang = TASKS[task].lang
    for n in (*COMPLEXITIES, 13):
        for problem in generate_problems(task, n, 25, seed=0):
            tree = parse(problem.expression, lang)
            assert count_operators(tree) == problem.complexity == n
            assert to_text(tree, lang) == problem.expression
            assert str(evaluate(tree, lang)) == problem.gold
            assert ALPHABET.sub("", problem.prompt + problem.solution()) == ""
            if task == "arithmetic":
                assert all(abs(evaluate(sub, lang)) <= 999 for _, sub in walk(tree))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_canonical_solution_passes_the_checker(task: str) -> None:
    for n in COMPLEXITIES:
        for problem in generate_problems(task, n, 40, seed=3):
            checked = check_completion(problem, problem.solution())
            assert [s.reason for s in checked.steps] == ["ok"] * n, problem.solution()
            assert checked.final_answer == problem.gold
            assert checked.final_correct and checked.n_unparsed == 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_do_not_leak_and_are_deterministic(task: str) -> None:
    train, test = make_splits(task, (1, 3, 5), 60, test_frac=0.25, seed=0)
    assert {p.expression for p in train}.isdisjoint(p.expression for p in test)
    assert (train, test) == make_splits(task, (1, 3, 5), 60, test_frac=0.25, seed=0)
    assert len({p.id for p in train + test}) == len(train) + len(test)
    for n in (3, 5):
        n_test = sum(p.complexity == n for p in test)
        assert n_test == 15 and sum(p.complexity == n for p in train) == 45
    # Boolean n=1 has only 10 distinct problems: fewer, but still distinct and disjoint.
    assert sum(p.complexity == 1 for p in train + test) == (10 if task == "boolean" else 60)
    # a fixed test size per complexity keeps the training split's size
    train2, test2 = make_splits(task, (3, 5), 60, test_frac=0.25, seed=0, n_test=40)
    assert {p.expression for p in train2}.isdisjoint(p.expression for p in test2)
    for n in (3, 5):
        assert sum(p.complexity == n for p in test2) == 40
        assert sum(p.complexity == n for p in train2) == 45


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        generate_problems("chess", 3, 1, 0)
    with pytest.raises(ValueError, match="complexity"):
        generate_problems("arithmetic", 0, 1, 0)
    with pytest.raises(ValueError, match="test_frac"):
        make_splits("boolean", (3,), 10, test_frac=1.5, seed=0)
    with pytest.raises(ValueError, match="test problems"):
        make_splits("boolean", (3,), 10, test_frac=0.2, seed=0, n_test=-1)
