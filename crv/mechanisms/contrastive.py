"""The contrastive part of the `mechanisms` section: groups of incorrect steps and the
planted rules found among them.

Per task, the incorrect test steps that have a contrastive graph are grouped by their
driving features (`crv.mechanisms.groups`, no label used); each group is reported with its
top features and their cards. On a subject with planted rules, each rule is scored against
the grouping: its group (the one holding most of its steps), recall and purity
(`groups.rule_recall`), and precision measured as in `planted`: the share of the group's
top `planted_top_k` features whose card points at the rule's trigger (`planted.points_at`).
`base_rate` is that share among every driving feature of the task's contrastive graphs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from crv.mechanisms.config import MechanismsConfig
from crv.mechanisms.groups import (
    contrast_effects,
    driver_matrix,
    group_features,
    group_steps,
    rule_recall,
)
from crv.mechanisms.planted import points_at


def _card_entry(feature: dict[str, Any], cards: Any) -> dict[str, Any]:
    card = cards.card(feature["layer"], feature["feature"])
    return {
        **feature,
        "label": card["label"],
        "top_contexts": [
            {"text": c["text"], "token": c["token"], "activation": c["activation"]}
            for c in card["top_contexts"][:3]
        ],
        "promotes": [p["token"] for p in card["promotes"][:3]],
    }


def task_groups(
    steps: pd.DataFrame, graphs: Sequence[Any], cards: Any, cfg: MechanismsConfig
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The report entry of one task's incorrect steps (rows of `steps`, their contrastive
    `graphs` in the same order), and the grouping: group ids, driver matrix, its features."""
    X_SU, units = driver_matrix([contrast_effects(g) for g in graphs])
    labels_S = group_steps(X_SU, cfg.max_groups)
    rules = steps["planted_rule"].fillna("") if "planted_rule" in steps else None
    groups = []
    for g in range(int(labels_S.max()) + 1 if len(labels_S) else 0):
        members = labels_S == g
        entry: dict[str, Any] = {"group": g, "n_steps": int(members.sum())}
        if rules is not None:  # evaluation only: the grouping never saw it
            entry["planted_rules"] = dict(Counter(rules[members].tolist()))
        entry["examples"] = steps.loc[members, "step_id"].head(3).tolist()
        top = group_features(X_SU, labels_S, units, g, cfg.planted_top_k)
        entry["features"] = [_card_entry(f, cards) for f in top]
        groups.append(entry)
    entry = {
        "n_steps": len(graphs),
        "n_groups": len(groups),
        "n_without_drivers": int((X_SU.sum(1) == 0).sum()),
        "groups": groups,
    }
    return entry, labels_S, X_SU, units


def contrastive_mechanisms(
    steps: pd.DataFrame,
    graphs: Sequence[Any],
    cards: Any,
    cfg: MechanismsConfig,
    rules: tuple[Any, ...] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `contrastive` report entry, `planted` per rule) from incorrect test steps
    (`step_id`, `task`, optional `planted_rule`) and their contrastive graphs (same order);
    `planted` is empty without rules or planted-rule steps."""
    section: dict[str, Any] = {"max_groups": cfg.max_groups, "tasks": {}}
    planted: dict[str, Any] = {}
    has_rules = "planted_rule" in steps and steps["planted_rule"].fillna("").astype(bool).any()
    for task in sorted(steps["task"].unique()):
        rows = np.flatnonzero((steps["task"] == task).to_numpy())
        task_steps = steps.iloc[rows].reset_index(drop=True)
        entry, labels_S, X_SU, units = task_groups(
            task_steps, [graphs[i] for i in rows], cards, cfg
        )
        section["tasks"][task] = entry
        if not (rules and has_rules):
            continue
        for rule in (r for r in rules if r.task == task):
            of_rule = (task_steps["planted_rule"] == rule.name).to_numpy()
            planted[rule.name] = _rule_entry(rule, of_rule, labels_S, X_SU, units, cards, cfg)
    for rule, res in planted.items():
        shared = [
            other
            for other, o in planted.items()
            if other != rule
            and o.get("group") is not None
            and o["task"] == res["task"]
            and o["group"] == res.get("group")
        ]
        res["shares_group_with"] = shared
    return section, planted


def _rule_entry(
    rule: Any,
    of_rule_S: np.ndarray,
    labels_S: np.ndarray,
    X_SU: np.ndarray,
    units: list[tuple[int, int]],
    cards: Any,
    cfg: MechanismsConfig,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "method": "contrastive",
        "task": rule.task,
        "trigger": rule.trigger,
        **rule_recall(labels_S, of_rule_S),
        "precision": None,
    }
    if out["group"] is None:
        out["verdict"] = "not measured: no incorrect test step of the rule has a contrastive graph"
        return out
    top = group_features(X_SU, labels_S, units, out["group"], cfg.planted_top_k)
    pointing = [
        points_at(cards.top_contexts(f["layer"], f["feature"]), rule.trigger, cfg.planted_min_share)
        for f in top
    ]
    every = [
        points_at(cards.top_contexts(layer, f), rule.trigger, cfg.planted_min_share)
        for layer, f in units
    ]
    out.update(
        k=len(top),
        n_pointing=int(sum(pointing)),
        precision=sum(pointing) / len(top) if top else None,
        base_rate=float(np.mean(every)) if every else None,
        features=[
            {**_card_entry(f, cards), "points_at_rule": p}
            for f, p in zip(top, pointing, strict=True)
        ],
    )
    if out["precision"] is None:
        out["verdict"] = "failed: the rule's group has no driving feature"
    else:
        found = "recovered" if out["precision"] >= 0.5 and out["recall"] >= 0.5 else "failed"
        out["verdict"] = (
            f"{found}: {out['n_pointing']} of {out['k']} top features point at the trigger; "
            f"group {out['group']} holds {out['recall']:.0%} of the rule's steps "
            f"({out['purity']:.0%} of the group)"
        )
    return out
