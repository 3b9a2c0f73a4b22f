"""Mechanism recovery on planted rules: do the error-mechanism features point at the bug?

A subject trained with planted rules (`crv.tasks.bugs.RULES`, e.g. "a product with 7 as an
operand comes out one too high") makes errors whose cause is known. For each rule the
graphs of the incorrect steps that exercise it (`planted_rule` of the step) are compared
with the correct steps of the rule's task by the same tests as the error-mechanism table
(`stats`); its `top_k` features (ranked by q-value, then log odds ratio) are checked
against the rule's trigger:

    a feature points at the rule when at least `min_share` of its card's top contexts match
    the rule's `trigger` pattern in what the feature had read when it fired: the context's
    text up to and including the activating token. For `7*8=57` that is a feature firing
    on the `7` of `7*`, on the `=` after `8*7` or on the product's first digit, not one
    firing on every `=`. (Only the left context counts: a feature cannot see what follows.)

precision = features pointing at the rule / features checked. `base_rate` is the same
share among every tested feature: the precision a random choice of tested features would
reach. Recovery fails when the precision is below one half or no feature survives the
correction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from crv.mechanisms.stats import add_fdr, unit_tests

BUGS_MODULE = "crv.tasks.bugs"


def load_rules() -> tuple[Any, ...] | None:
    """`crv.tasks.bugs.RULES`, or None when this crv has no planted rules."""
    import importlib

    try:
        module = importlib.import_module(BUGS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == BUGS_MODULE:
            return None
        raise
    return tuple(module.RULES)


def points_at(contexts: Sequence[dict[str, Any]], trigger: str, min_share: float) -> bool:
    """Whether at least `min_share` of a card's top `contexts` match `trigger` in the text
    read up to and including their activating token (`token_start` + the token)."""
    if not contexts:
        return False
    pattern = re.compile(trigger)
    hits = sum(
        pattern.search(c["text"][: c["token_start"] + len(c["token"])]) is not None
        for c in contexts
    )
    return hits >= min_share * len(contexts)


def recover_rule(
    rule: Any,
    steps: pd.DataFrame,
    present_SU: Any,
    influence_SU: Any,
    units: pd.DataFrame,
    cards: Any,
    *,
    fdr: float,
    min_steps: int,
    top_k: int,
    min_share: float,
) -> dict[str, Any]:
    """Precision of `rule`'s top features against its trigger (see the module docstring).

    `steps` has `task`, `label` (1 incorrect, 0 correct) and `planted_rule`, one row per row
    of the matrices; `units` has `kind`, `layer`, `feature`, one row per column.
    """
    in_task = (steps["task"] == rule.task).to_numpy()
    positive = in_task & (steps["label"] == 1).to_numpy()
    positive &= (steps["planted_rule"] == rule.name).to_numpy()
    negative = in_task & (steps["label"] == 0).to_numpy()
    out: dict[str, Any] = {
        "task": rule.task,
        "trigger": rule.trigger,
        "n_incorrect": int(positive.sum()),
        "n_correct": int(negative.sum()),
        "precision": None,
    }
    if not positive.any() or not negative.any():
        out["verdict"] = "not measured: no incorrect test step exercises the rule"
        if not negative.any():
            out["verdict"] = "not measured: the task has no correct test steps"
        return out
    rows = positive | negative
    present, influence = present_SU[rows], influence_SU[rows]
    cols = np.flatnonzero(
        (units["kind"] == "feature").to_numpy() & (np.asarray(present.sum(0)).ravel() >= min_steps)
    )
    table = unit_tests(present[:, cols], influence[:, cols], positive[rows])
    table = pd.concat([units.iloc[cols].reset_index(drop=True), table], axis=1)
    table = add_fdr(table, fdr)
    table["points_at_rule"] = [
        points_at(cards.top_contexts(int(r.layer), int(r.feature)), rule.trigger, min_share)
        for r in table.itertuples()
    ]
    top = table.head(top_k)
    n_points = int(top["points_at_rule"].sum())
    precision = n_points / len(top) if len(top) else None
    out.update(
        precision=precision,
        k=len(top),
        n_pointing=n_points,
        n_tested=len(table),
        n_significant=int(table["significant"].sum()),
        base_rate=float(table["points_at_rule"].mean()) if len(table) else None,
        features=[_feature_entry(r, cards) for r in top.itertuples()],
    )
    if precision is None:
        out["verdict"] = f"failed: no feature appears in {min_steps}+ of these graphs"
    elif out["n_significant"] == 0:
        out["verdict"] = "failed: no feature survives the correction"
    elif precision < 0.5:
        out["verdict"] = f"failed: {n_points} of {len(top)} top features point at the trigger"
    else:
        out["verdict"] = f"recovered: {n_points} of {len(top)} top features point at the trigger"
    return out


def _feature_entry(row: Any, cards: Any) -> dict[str, Any]:
    layer, feature = int(row.layer), int(row.feature)
    card = cards.card(layer, feature)
    return {
        "layer": layer,
        "feature": feature,
        "label": card["label"],
        "q": float(row.q),
        "log_odds_ratio": float(row.log_odds_ratio),
        "rate_incorrect": float(row.rate_incorrect),
        "rate_correct": float(row.rate_correct),
        "points_at_rule": bool(row.points_at_rule),
        "top_contexts": [
            {"text": c["text"], "token": c["token"], "activation": c["activation"]}
            for c in card["top_contexts"][:3]
        ],
        "promotes": [p["token"] for p in card["promotes"][:3]],
    }
