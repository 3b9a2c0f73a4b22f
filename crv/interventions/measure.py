"""Success rates of interventions and their controls, with intervals, and their Markdown.

Per attempted flagged step there is one regeneration without intervention, one per proposal
(N, best-ranked first) and the controls' regenerations (`CONTROLS`): `random` (one random
active feature of each proposal's layer), `margin_matched` (the top N by measured margin
drop of random features drawn at the proposals' candidate pool's layers and positions) and
`second_choice` (one regeneration with the explained token replaced by the model's second
choice, no transcoders). A flagged correct step (a false alarm) gets the top proposal and
each control's first attempt. For a flagged *incorrect* step:

- fixed step (best of N): some proposal's regenerated step (same index) is correct;
- first of N: the top-ranked proposal's is;
- fixed answer: some proposal's regenerated completion ends with the gold answer (the
  final-answer accuracy after the intervention);
- the same for each control, over its own attempts (N, or 1 for `second_choice`);
- unintervened: the regeneration without intervention already gives a correct step (should
  be ~0: together with `consistency_rate` it bounds how much of a "fix" is decoding noise).

For a flagged *correct* step (a false alarm), broken means the top-ranked proposal's
(control's) regenerated step is no longer correct (first of N: what a system without an
oracle would apply). Consistency is over every attempted step: the no-intervention
regeneration reproduces the original step's tokens exactly. The changed-step rates count
single regenerations (all N of every flagged incorrect step) whose step tokens differ from
the original at all: how often an edit has any visible effect.

Best of N is an oracle upper bound (the checker picks the winner); first of N is the
deployable number, and the fair one against `second_choice`, which has one attempt. Rates
come with 95% Wilson score intervals (good coverage at small n and at rates near 0 or 1,
unlike the normal approximation); the differences proposals minus control
(`controls.<name>.{diff, first_diff, broke_diff}`, `fixed_minus_random`) with a paired
percentile bootstrap over steps (2.5% and 97.5% quantiles, seeded), since the proposals and
the controls are tried on the same steps. Steps are treated as independent. Steps that
exercise a planted rule (`planted_rule`, crv-tiny-bugs) are also compared on their own
(`planted`, and per rule); with `planted_steps=all` that comparison holds every planted
incorrect step of the split, flagged or not, also those outside the sample of flagged steps
(`planted.n_outside_sample`), which count nowhere else; `planted.graph_kinds` says how many
were proposed from a contrastive graph.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from crv.tables import interval, markdown_rows

if TYPE_CHECKING:  # annotations only: rendering a report must not import torch
    from crv.interventions.apply import Outcome, StepSpan
    from crv.interventions.propose import Proposal

Z95 = 1.959963984540054
CONTROLS = ("random", "margin_matched", "second_choice")
"""The controls, as `StepAttempt` fields and report keys (`controls.<name>`)."""


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
    """The random control's features."""
    none: Outcome
    graph: list[Outcome] = field(default_factory=list)
    random: list[Outcome] = field(default_factory=list)
    margin_matched: list[Outcome] = field(default_factory=list)
    second_choice: list[Outcome] = field(default_factory=list)
    """The second-choice regeneration (empty when the step has none)."""
    planted_rule: str = ""
    """The planted rule the step exercises (`""`: none), from the trace's step dict."""
    sampled: bool = True
    """The step belongs to the sample of flagged steps; planted-rule steps added by
    `planted_steps=all` (flagged or not) do not, and count only in `planted`."""
    graph_kind: str = "step"
    """The graph that proposed the features: `step` or `contrastive`."""

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
            "planted_rule": self.planted_rule,
            "sampled": self.sampled,
            "graph_kind": self.graph_kind,
            "consistent": self.consistent,
            "outcomes": [
                o.to_dict()
                for o in (self.none, *self.graph, *(o for c in CONTROLS for o in getattr(self, c)))
            ],
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


def _shown(outcomes: Sequence[Outcome]) -> Outcome | None:
    """The first outcome that fixes the step, else the first one."""
    return next((o for o in outcomes if o.step_correct), outcomes[0] if outcomes else None)


def _example(a: StepAttempt) -> dict[str, Any]:
    """The first fixing proposal's outcome (or the top proposal's) of one step, and the
    same for each control."""
    shown = _shown(a.graph) or a.none
    controls = {}
    for name in CONTROLS:
        o = _shown(getattr(a, name))
        if o is not None:
            edit = o.proposal.name() if o.proposal else _replacement_text(o.replacement)
            controls[name] = {
                "intervention": edit,
                "regenerated_step": o.step_text,
                "fixed_step": o.step_correct,
            }
    return {
        "step_id": a.step_id,
        "task": a.task,
        "planted_rule": a.planted_rule,
        "score": round(a.score, 4),
        "original_step": a.original_text,
        "features": [f"L{p.layer}/F{p.feature} (score {p.score:.3g})" for p in a.proposals],
        "intervention": shown.proposal.name() if shown.proposal else "none",
        "regenerated_step": shown.step_text,
        "final_answer": shown.final_answer,
        "fixed_step": shown.step_correct,
        "fixed_answer": shown.final_correct,
        "controls": controls,
    }


def _replacement_text(replacement: dict[str, Any] | None) -> str:
    if replacement is None:
        return "none"
    r = replacement
    return f"token {r['position']} {r['original']!r} -> {r['replacement']!r}"


def _pick_examples(wrong: Sequence[StepAttempt], n: int) -> list[StepAttempt]:
    """Up to `n` incorrect steps, fixed ones first; planted-rule steps get at least half the
    places when there are any."""

    def order(attempts: list[StepAttempt]) -> list[StepAttempt]:
        return sorted(attempts, key=lambda a: (not any(o.step_correct for o in a.graph), a.step_id))

    planted = order([a for a in wrong if a.planted_rule])
    natural = order([a for a in wrong if not a.planted_rule])
    k = min(len(planted), max(n - len(natural), (n + 1) // 2))
    return planted[:k] + natural[: n - k]


def _flags(
    wrong: Sequence[StepAttempt], right: Sequence[StepAttempt], name: str
) -> dict[str, np.ndarray]:
    """Per-step outcomes of one condition (`graph` or a control): on incorrect steps, some
    attempt fixes the step / the first one does / some attempt's final answer is correct;
    on false alarms, the first attempt breaks the step."""
    runs = [getattr(a, name) for a in wrong]
    tops = [getattr(a, name)[:1] for a in right]
    return {
        "fixed_step_rate": np.array([any(o.step_correct for o in r) for r in runs], dtype=bool),
        "first_fixed_step_rate": np.array([bool(r) and r[0].step_correct for r in runs], bool),
        "fixed_answer_rate": np.array([any(o.final_correct for o in r) for r in runs], bool),
        "broke_rate": np.array([bool(t) and not t[0].step_correct for t in tops], dtype=bool),
    }


PAIRED = (("diff", "fixed_step_rate"), ("first_diff", "first_fixed_step_rate"))
"""Paired differences proposals minus control: (report key, per-step outcome)."""


def compare_controls(
    wrong: Sequence[StepAttempt], right: Sequence[StepAttempt], n_bootstrap: int, seed: int
) -> dict[str, Any]:
    """The proposals' rates on these steps and, under `controls.<name>`, each control's
    rates and the paired differences proposals minus control with percentile bootstrap 95%
    intervals: `diff` (best of the proposals vs best of the control's attempts),
    `first_diff` (top vs top) and `broke_diff` (breaking false alarms, top vs top)."""
    mine = _flags(wrong, right, "graph")
    out: dict[str, Any] = {"n_attempted": len(wrong), "n_false_alarms_attempted": len(right)}
    for key, flags in mine.items():
        _rate(flags.tolist(), out, "broken_correct_rate" if key == "broke_rate" else key)
    out["controls"] = {}
    for name in CONTROLS:
        theirs = _flags(wrong, right, name)
        block: dict[str, Any] = {}
        for key, flags in theirs.items():
            _rate(flags.tolist(), block, key)
        _rate([o.changed for a in wrong for o in getattr(a, name)], block, "changed_step_rate")
        for diff, key in (*PAIRED, ("broke_diff", "broke_rate")):
            a, b = mine[key], theirs[key]
            block[diff] = round(float(a.mean() - b.mean()), 4) if len(a) else None
            block[f"{diff}_ci"] = paired_bootstrap_diff(a, b, n_bootstrap, seed)
        out["controls"][name] = block
    return out


def planted_summary(
    wrong: Sequence[StepAttempt], right: Sequence[StepAttempt], n_bootstrap: int, seed: int
) -> dict[str, Any] | None:
    """`compare_controls` on planted-rule steps only, and under `rules.<rule>` per rule with
    its worked example (does editing the proposed features undo the rule?); None when no
    attempted step exercises a planted rule."""
    rules = sorted({a.planted_rule for a in (*wrong, *right) if a.planted_rule})
    if not rules:
        return None

    def of(attempts: Sequence[StepAttempt], rule: str | None) -> list[StepAttempt]:
        return [a for a in attempts if a.planted_rule and rule in (None, a.planted_rule)]

    out = compare_controls(of(wrong, None), of(right, None), n_bootstrap, seed)
    out["rules"] = {}
    for rule in rules:
        block = compare_controls(of(wrong, rule), of(right, rule), n_bootstrap, seed)
        block["examples"] = [_example(a) for a in _pick_examples(of(wrong, rule), 1)]
        out["rules"][rule] = block
    return out


def summarize(
    attempts: Sequence[StepAttempt],
    n_flagged: int,
    n_false_alarms: int,
    n_examples: int,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """The `interventions` report section (see the module docstring for each rate):
    the sample of flagged steps only, but for `planted`, which holds every attempted
    planted-rule step."""
    wrong = [a for a in attempts if a.incorrect and a.sampled]
    right = [a for a in attempts if not a.incorrect and a.sampled]
    planted_wrong = [a for a in attempts if a.incorrect]
    compared = compare_controls(wrong, right, n_bootstrap, seed)
    random = compared["controls"]["random"]
    out: dict[str, Any] = {
        "n_flagged": n_flagged,
        "n_false_alarms": n_false_alarms,
        "n_without_proposals": sum(not a.proposals for a in attempts),
        **compared,
    }
    for key in ("fixed_step_rate", "fixed_answer_rate", "changed_step_rate"):
        out[f"random_{key}"], out[f"random_{key}_ci"] = random[key], random[f"{key}_ci"]
    out["fixed_minus_random"], out["fixed_minus_random_ci"] = random["diff"], random["diff_ci"]
    _rate([a.none.step_correct for a in wrong], out, "unintervened_fixed_step_rate")
    _rate([a.original_final_correct for a in wrong], out, "original_answer_rate")
    _rate([a.consistent for a in attempts], out, "consistency_rate")
    _rate([o.changed for a in wrong for o in a.graph], out, "changed_step_rate")
    out["planted"] = planted_summary(planted_wrong, right, n_bootstrap, seed)
    if out["planted"] is not None:
        out["planted"]["n_outside_sample"] = sum(not a.sampled for a in planted_wrong)
        out["planted"]["graph_kinds"] = dict(
            sorted(Counter(a.graph_kind for a in planted_wrong if a.planted_rule).items())
        )
    out["examples"] = [_example(a) for a in _pick_examples(wrong, n_examples)]
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
        markdown_rows(
            ["measure", "rate [95% CI]"],
            [
                [label, interval(result[key], result.get(f"{key}_ci"))]
                for key, label in RATE_ROWS
                if key in result
            ],
        ).rstrip("\n"),
    ]
    if result.get("controls"):
        lines += ["", *controls_markdown(result)]
    examples = result.get("examples") or []
    if examples:
        lines.append("\nWorked examples:\n")
    for ex in examples:
        verdict = "fixed" if ex["fixed_step"] else "not fixed"
        rule = f", planted rule `{ex['planted_rule']}`" if ex.get("planted_rule") else ""
        lines += [
            f"- `{ex['step_id']}` (verifier score {ex['score']}{rule}): {verdict}",
            f"  - original step: `{ex['original_step']}`",
            f"  - candidate features: {', '.join(ex['features']) or 'none'}",
            f"  - intervention: {ex['intervention']}",
            f"  - regenerated step: `{ex['regenerated_step']}`; final answer `{ex['final_answer']}`"
            f" ({'correct' if ex['fixed_answer'] else 'wrong'})",
        ]
        for name, c in (ex.get("controls") or {}).items():
            fixed = "fixed" if c["fixed_step"] else "not fixed"
            lines.append(f"  - {name}: {c['intervention']}: `{c['regenerated_step']}` ({fixed})")
    return "\n".join(lines) + "\n"


CONTROL_LABELS = {
    "random": "random features (same layers)",
    "margin_matched": "margin-matched random features",
    "second_choice": "second-choice token (no transcoders)",
}


def controls_markdown(result: dict[str, Any]) -> list[str]:
    """The table of proposals vs each control: all attempted steps, then planted-rule
    steps and each planted rule when there are any."""
    blocks = [("all", result)]
    planted = result.get("planted")
    if planted:
        blocks.append(("planted rules", planted))
        blocks += [(f"rule `{rule}`", b) for rule, b in planted["rules"].items()]
    lines = [
        "Proposals vs controls on the same steps: rates with 95% Wilson intervals (best of "
        "each condition's attempts; `second_choice` has one), and proposals minus control "
        "with paired bootstrap 95% intervals (best vs best, top vs top, and breaking false "
        "alarms top vs top: negative is better for the proposals).\n",
    ]
    if planted and planted.get("n_outside_sample"):
        lines.insert(
            1,
            f"Planted-rule rows include {planted['n_outside_sample']} incorrect steps outside "
            "the sample of flagged steps, flagged or not (`planted_steps=all`); proposals per "
            "graph: "
            + ", ".join(f"{k} {v}" for k, v in planted.get("graph_kinds", {}).items())
            + ".\n",
        )
    header = [
        "steps (incorrect / false alarms)",
        "condition",
        "fixes incorrect step",
        "top attempt fixes",
        "final answer correct",
        "breaks false alarm",
        "fix diff (best)",
        "fix diff (top)",
        "break diff",
    ]
    rows = []
    for steps, b in blocks:
        where = f"{steps} ({b.get('n_attempted')} / {b.get('n_false_alarms_attempted')})"
        rates = _rate_cells(b, (*FIX_COLUMNS, "broken_correct_rate"))
        rows.append([where, "proposals", *rates, "", "", ""])
        for name, c in b["controls"].items():
            rates = _rate_cells(c, (*FIX_COLUMNS, "broke_rate"))
            diffs = [
                interval(c.get(k), c.get(f"{k}_ci"), fmt="+.3f")
                for k in ("diff", "first_diff", "broke_diff")
            ]
            rows.append([where, CONTROL_LABELS.get(name, name), *rates, *diffs])
    lines.append(markdown_rows(header, rows).rstrip("\n"))
    return lines


FIX_COLUMNS = ("fixed_step_rate", "first_fixed_step_rate", "fixed_answer_rate")


def _rate_cells(block: dict[str, Any], keys: Sequence[str]) -> list[str]:
    return [interval(block.get(k), block.get(f"{k}_ci")) for k in keys]
