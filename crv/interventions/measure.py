"""Success rates of interventions with confidence intervals, and their Markdown rendering.

Per attempted flagged step there is one regeneration without intervention, one per proposal
(N, best-ranked first) and one per random control. For a flagged *incorrect* step:

- fixed step (best of N): some proposal's regenerated step (same index) is correct;
- first of N: the top-ranked proposal's is;
- fixed answer: some proposal's regenerated completion ends with the gold answer;
- random: the same with the random controls;
- unintervened: the regeneration without intervention already gives a correct step (should
  be ~0: together with `consistency_rate` it bounds how much of a "fix" is decoding noise).

For a flagged *correct* step (a false alarm), broken means the top-ranked proposal's
regenerated step is no longer correct (first of N: what a system without an oracle would
apply). Consistency is over every attempted step: the no-intervention regeneration
reproduces the original step's tokens exactly. The changed-step rates count single
regenerations (all N of every flagged incorrect step) whose step tokens differ from the
original at all: how often a one-feature edit has any visible effect.

Best of N is an oracle upper bound (the checker picks the winner); first of N is the
deployable number. Rates come with 95% Wilson score intervals (good coverage at small n and
at rates near 0 or 1, unlike the normal approximation); `fixed_minus_random` with a paired
percentile bootstrap over steps (2.5% and 97.5% quantiles, seeded), since the proposal and
the control are tried on the same steps. Steps are treated as independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only: rendering a report must not import torch
    from crv.interventions.apply import Outcome, StepSpan
    from crv.interventions.propose import Proposal

Z95 = 1.959963984540054


@dataclass
class StepAttempt:
    """Everything tried on one flagged step."""

    step_id: str
    trace_id: str
    step: int
    task: str
    incorrect: bool
    """The step's label: True = incorrect (a true alarm), False = correct (a false alarm)."""
    score: float
    """The verifier's probability that the step is incorrect."""
    original_text: str
    original_final_correct: bool
    span: StepSpan
    proposals: list[Proposal]
    controls: list[Proposal]
    none: Outcome
    graph: list[Outcome] = field(default_factory=list)
    random: list[Outcome] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """The regeneration without intervention reproduces the original step's tokens."""
        return not self.none.changed

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_id": self.step_id,
            "trace_id": self.trace_id,
            "step": self.step,
            "task": self.task,
            "incorrect": self.incorrect,
            "score": self.score,
            "original_text": self.original_text,
            "original_final_correct": self.original_final_correct,
            "first_token": self.span.first_token,
            "last_token": self.span.last_token,
            "consistent": self.consistent,
            "outcomes": [o.to_dict() for o in (self.none, *self.graph, *self.random)],
        }


def wilson_interval(successes: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval [low, high] for a binomial proportion; None when n = 0."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def paired_bootstrap_diff(
    a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int
) -> list[float] | None:
    """Percentile 95% interval of mean(a - b) over steps resampled with replacement."""
    if len(a) == 0:
        return None
    diff = a.astype(np.float64) - b.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return [round(float(low), 4), round(float(high), 4)]


def _rate(flags: Sequence[bool], out: dict[str, Any], name: str) -> None:
    k, n = int(sum(flags)), len(flags)
    out[name] = round(k / n, 4) if n else None
    out[f"{name}_ci"] = wilson_interval(k, n)


def _example(a: StepAttempt) -> dict[str, Any]:
    """The first fixing proposal's outcome (or the top proposal's) of one step."""
    shown = next((o for o in a.graph if o.step_correct), a.graph[0] if a.graph else a.none)
    return {
        "step_id": a.step_id,
        "task": a.task,
        "score": round(a.score, 4),
        "original_step": a.original_text,
        "features": [f"L{p.layer}/F{p.feature} (score {p.score:.3g})" for p in a.proposals],
        "intervention": shown.proposal.name() if shown.proposal else "none",
        "regenerated_step": shown.step_text,
        "final_answer": shown.final_answer,
        "fixed_step": shown.step_correct,
        "fixed_answer": shown.final_correct,
    }


def summarize(
    attempts: Sequence[StepAttempt],
    n_flagged: int,
    n_false_alarms: int,
    n_examples: int,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """The `interventions` report section (see the module docstring for each rate)."""
    wrong = [a for a in attempts if a.incorrect]
    right = [a for a in attempts if not a.incorrect]
    fixed = np.array([any(o.step_correct for o in a.graph) for a in wrong], dtype=bool)
    random_fixed = np.array([any(o.step_correct for o in a.random) for a in wrong], dtype=bool)
    out: dict[str, Any] = {
        "n_flagged": n_flagged,
        "n_attempted": len(wrong),
        "n_false_alarms": n_false_alarms,
        "n_false_alarms_attempted": len(right),
        "n_without_proposals": sum(not a.proposals for a in attempts),
    }
    _rate(fixed.tolist(), out, "fixed_step_rate")
    _rate([any(o.final_correct for o in a.graph) for a in wrong], out, "fixed_answer_rate")
    _rate([bool(a.graph) and a.graph[0].step_correct for a in wrong], out, "first_fixed_step_rate")
    _rate(random_fixed.tolist(), out, "random_fixed_step_rate")
    _rate([any(o.final_correct for o in a.random) for a in wrong], out, "random_fixed_answer_rate")
    _rate([a.none.step_correct for a in wrong], out, "unintervened_fixed_step_rate")
    _rate([a.original_final_correct for a in wrong], out, "original_answer_rate")
    _rate(
        [bool(a.graph) and not a.graph[0].step_correct for a in right], out, "broken_correct_rate"
    )
    _rate([a.consistent for a in attempts], out, "consistency_rate")
    _rate([o.changed for a in wrong for o in a.graph], out, "changed_step_rate")
    _rate([o.changed for a in wrong for o in a.random], out, "random_changed_step_rate")
    out["fixed_minus_random"] = (
        round(float(fixed.mean() - random_fixed.mean()), 4) if len(wrong) else None
    )
    out["fixed_minus_random_ci"] = paired_bootstrap_diff(fixed, random_fixed, n_bootstrap, seed)
    ordered = sorted(wrong, key=lambda a: (not any(o.step_correct for o in a.graph), a.step_id))
    out["examples"] = [_example(a) for a in ordered[:n_examples]]
    return out


RATE_ROWS = (
    ("fixed_step_rate", "incorrect step becomes correct (best of N proposals)"),
    ("first_fixed_step_rate", "incorrect step becomes correct (top proposal only)"),
    ("random_fixed_step_rate", "incorrect step becomes correct (best of N random features)"),
    ("fixed_minus_random", "difference, best of N proposals minus random (paired bootstrap)"),
    ("fixed_answer_rate", "final answer correct after a proposal (best of N)"),
    ("random_fixed_answer_rate", "final answer correct after a random feature (best of N)"),
    ("original_answer_rate", "final answer already correct in the original trace"),
    ("unintervened_fixed_step_rate", "step correct when regenerated without intervention"),
    ("broken_correct_rate", "false alarm: correct step broken by the top proposal"),
    ("changed_step_rate", "a proposal changes the step at all (per regeneration)"),
    ("random_changed_step_rate", "a random feature changes the step at all (per regeneration)"),
    ("consistency_rate", "no-intervention regeneration reproduces the original step"),
)


def _fmt_rate(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def interventions_markdown(result: dict[str, Any]) -> str:
    """The report.md section of an `interventions` result (the dict `summarize` returns)."""
    settings = ""
    if "rank_by" in result:
        settings = (
            f"{result['n_proposals']} proposals per step ranked by {result['rank_by']}, "
            f"action {result['action']}, scope {result['scope']}, {result['verifier']} verifier. "
        )
    counts = (
        f"Flagged incorrect steps: {result.get('n_flagged')} "
        f"({result.get('n_attempted')} attempted); false alarms: {result.get('n_false_alarms')} "
        f"({result.get('n_false_alarms_attempted')} attempted). "
    )
    lines = [
        settings
        + counts
        + "Rates with 95% intervals (Wilson; paired bootstrap for the difference).\n",
        "| measure | rate [95% CI] |",
        "|---|---|",
    ]
    for key, label in RATE_ROWS:
        if key in result:
            lines.append(f"| {label} | {_fmt_rate(result[key], result.get(f'{key}_ci'))} |")
    examples = result.get("examples") or []
    if examples:
        lines.append("\nWorked examples:\n")
    for ex in examples:
        verdict = "fixed" if ex["fixed_step"] else "not fixed"
        lines += [
            f"- `{ex['step_id']}` (verifier score {ex['score']}): {verdict}",
            f"  - original step: `{ex['original_step']}`",
            f"  - candidate features: {', '.join(ex['features']) or 'none'}",
            f"  - intervention: {ex['intervention']}",
            f"  - regenerated step: `{ex['regenerated_step']}`; final answer `{ex['final_answer']}`"
            f" ({'correct' if ex['fixed_answer'] else 'wrong'})",
        ]
    return "\n".join(lines) + "\n"
