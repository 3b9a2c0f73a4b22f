"""Problems and the canonical chain-of-thought format (a contract other stages parse).

```
Q: Evaluate 7*((5+9)+7)
Step 1: 5+9=14, so 7*(14+7)
Step 2: 14+7=21, so 7*21
Step 3: 7*21=147, so 147
Answer: 147
```

The prompt is the `Q:` line including its newline; the completion is everything after it,
every line ending with a newline. Each step reduces one innermost operation (the canonical
solution takes the leftmost one), states it as `<operation>=<value>` and restates the whole
remaining expression after `, so `, printed canonically (`crv.tasks.expr.to_text`): brackets
that wrapped the reduced operation disappear, and a negative result is bracketed where it
becomes an operand (`3*(-5)`). The last step restates the bare value, then `Answer: <value>`.

Only these pieces appear in prompts and completions: digits, `+ - * ( ) = : ,`, space,
newline and the words `Q: Evaluate Step so Answer: True False and or not`.

Generation is deterministic: `generate_problems(task, n, count, seed)` seeds its own
`random.Random` from the task, the complexity and the seed, so the same arguments always give
the same problems (across processes and Python versions that keep string seeding).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from crv.tasks.arithmetic import ARITHMETIC
from crv.tasks.boolean import BOOLEAN
from crv.tasks.expr import (
    Node,
    Path,
    TaskSpec,
    Value,
    evaluate,
    innermost_paths,
    parse,
    reduce_at,
    subtree,
    to_text,
    value_text,
)

MAX_DRAWS_PER_PROBLEM = 50

Reducer = Callable[[Node, Path], tuple[Value, Node]]
"""One reduction step: (state, path of the operation) -> (stated value, next state)."""

TASKS: dict[str, TaskSpec] = {"arithmetic": ARITHMETIC, "boolean": BOOLEAN}

PROMPT_PREFIX = "Q: Evaluate "
ANSWER_PREFIX = "Answer:"
# `Step k: <operation>=<value>, so <expression>`; the operation never contains `=`.
STEP_RE = re.compile(r"Step (?P<index>\d+): (?P<op>[^=]+)=(?P<value>.*?), so (?P<rest>.+)")


def task_spec(task: str) -> TaskSpec:
    """The `TaskSpec` of a task name; clear error for an unknown one."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}") from None


def step_line(index: int, op_text: str, value: str, rest: str) -> str:
    """One canonical step line, without its newline."""
    return f"Step {index}: {op_text}={value}, so {rest}"


@dataclass(frozen=True)
class Problem:
    """One synthetic problem; `complexity` is its number of operators."""

    id: str
    task: str
    complexity: int
    expression: str
    gold: str

    @property
    def prompt(self) -> str:
        """The prompt line: `Q: Evaluate <expression>\\n`."""
        return f"{PROMPT_PREFIX}{self.expression}\n"

    def tree(self) -> Node:
        """The parsed expression."""
        return parse(self.expression, task_spec(self.task).lang)

    def solution(self, reduce: Reducer | None = None) -> str:
        """The canonical completion (leftmost innermost operation first).

        `reduce(state, path)` gives the stated value and the next state of each step; the
        default is the true reduction, so the completion is correct. `crv.tasks.bugs` passes
        one that applies its planted rules.
        """
        lang = task_spec(self.task).lang
        node, lines = self.tree(), []
        while paths := innermost_paths(node):
            operation = subtree(node, paths[0])
            if reduce is None:
                value, node = evaluate(operation, lang), reduce_at(node, paths[0], lang)
            else:
                value, node = reduce(node, paths[0])
            lines.append(
                step_line(
                    len(lines) + 1, to_text(operation, lang), value_text(value), to_text(node, lang)
                )
            )
        lines.append(f"{ANSWER_PREFIX} {to_text(node, lang)}")
        return "".join(line + "\n" for line in lines)


def generate_problems(
    task: str, complexity: int, count: int, seed: int, unique: bool = False
) -> list[Problem]:
    """`count` random problems with `complexity` operators.

    Draws are independent, so small complexities repeat expressions. With `unique=True`
    repeats are re-drawn; when the space is too small (e.g. Boolean n=1 has 10 problems)
    drawing stops after `MAX_DRAWS_PER_PROBLEM * count` tries and fewer problems come back.
    """
    spec = task_spec(task)
    rng = random.Random(f"{task}-{complexity}-{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    for _ in range(count if not unique else MAX_DRAWS_PER_PROBLEM * count):
        if len(problems) == count:
            break
        node = spec.sample(complexity, rng)
        expression = to_text(node, spec.lang)
        if unique and expression in seen:
            continue
        seen.add(expression)
        problems.append(
            Problem(
                id=f"{task}-n{complexity}-{len(problems):06d}",
                task=task,
                complexity=complexity,
                expression=expression,
                gold=value_text(evaluate(node, spec.lang)),
            )
        )
    return problems


def make_splits(
    task: str,
    complexities: Sequence[int],
    n_per_complexity: int,
    test_frac: float,
    seed: int,
    n_test: int | None = None,
) -> tuple[list[Problem], list[Problem]]:
    """Train and test problems; every expression is distinct, so none is in both splits.

    Each complexity contributes up to `n_per_complexity` distinct problems (fewer only when
    the task has fewer, see `generate_problems`), `round(test_frac * k)` of them to test.
    With `n_test`, the test split gets `n_test` problems per complexity instead and the
    training split keeps its `n_per_complexity - round(test_frac * n_per_complexity)`.
    """
    if not 0.0 <= test_frac <= 1.0:
        raise ValueError(f"test_frac must be in [0, 1], got {test_frac}")
    if n_test is not None and n_test < 0:
        raise ValueError(f"the number of test problems must be >= 0, got {n_test}")
    train: list[Problem] = []
    test: list[Problem] = []
    n_train = n_per_complexity - round(test_frac * n_per_complexity)
    for complexity in complexities:
        n_total = n_per_complexity if n_test is None else n_train + n_test
        problems = generate_problems(task, complexity, n_total, seed, unique=True)
        random.Random(f"split-{task}-{complexity}-{seed}").shuffle(problems)
        k = round(test_frac * len(problems)) if n_test is None else n_test
        test.extend(sorted(problems[:k], key=lambda p: p.id))
        train.extend(sorted(problems[k:], key=lambda p: p.id))
    return train, test
