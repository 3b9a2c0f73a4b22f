"""Grouping incorrect steps by the features that drive their contrastive graphs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from crv.graphs.graph import FEATURE, LOGIT, TOKEN, StepGraph
from crv.mechanisms.groups import (
    contrast_effects,
    driver_matrix,
    group_features,
    group_steps,
    rule_recall,
)


def contrast_graph() -> StepGraph:
    """Features A (L0/F5, activation 2, at two positions: A1 activation 1) and B (L1/F9,
    activation 4), a token node and one contrast logit node. Edges: A -> B 2, B -> logit 3,
    A -> logit -1, A1 -> B 1, token -> A 7 (a source only: never a driver)."""
    kind = np.array([FEATURE, FEATURE, FEATURE, TOKEN, LOGIT])
    return StepGraph(
        trace_id="t",
        step=0,
        position=3,
        kind=kind,
        layer=np.array([0, 0, 1, -1, 2]),
        pos=np.array([2, 1, 3, 1, 3]),
        feature=np.array([5, 5, 9, 11, 40]),
        activation=np.array([2.0, 1.0, 4.0, 0.0, 1.0]),
        influence=np.zeros(5),
        src=np.array([0, 2, 0, 1, 3]),
        dst=np.array([2, 4, 4, 2, 0]),
        weight=np.array([2.0, 3.0, -1.0, 1.0, 7.0]),
    )


def test_contrast_effects_follow_the_paths_by_hand():
    effects = contrast_effects(contrast_graph())
    # B: direct 3. A: direct -1 plus 2 * (3 / 4) through B; A1: 1 * 3 / 4 through B
    assert effects[(1, 9)] == pytest.approx(3.0)
    assert effects[(0, 5)] == pytest.approx(-1.0 + 1.5 + 0.75)
    assert set(effects) == {(0, 5), (1, 9)}


def planted_drivers(seed: int, n_per_group: int = 12) -> tuple[list[dict], np.ndarray]:
    """Three mechanisms, each with its own 3 driving features (strong) among 40 shared noise
    features (weak, random); steps shuffled. Returns the drivers and the true group."""
    rng = np.random.default_rng(seed)
    drivers, truth = [], []
    for g in range(3):
        for _ in range(n_per_group):
            d = {(3, 100 * g + j): float(rng.uniform(1.0, 2.0)) for j in range(3)}
            for f in rng.choice(40, size=6, replace=False):
                d[(1, int(f))] = float(rng.uniform(0.0, 0.3))
            d[(2, 7)] = -5.0  # pushes the right token: never a driver
            drivers.append(d)
            truth.append(g)
    order = rng.permutation(len(drivers))
    return [drivers[i] for i in order], np.array(truth)[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouping_recovers_planted_mechanisms(seed: int):
    drivers, truth = planted_drivers(seed)
    X, units = driver_matrix(drivers)
    assert (2, 7) not in units
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0)
    labels = group_steps(X, max_groups=6)
    for g in range(3):
        res = rule_recall(labels, truth == g)
        assert res["recall"] == 1.0 and res["purity"] == 1.0
        top = group_features(X, labels, units, res["group"], 3)
        assert {(f["layer"], f["feature"]) for f in top} == {(3, 100 * g + j) for j in range(3)}
        assert all(f["share_of_steps"] == 1.0 for f in top)


def test_one_mechanism_with_noise_is_not_split_by_the_noise():
    drivers, truth = planted_drivers(3)
    keep = truth != 2
    merged = [dict(d) for d, k in zip(drivers, keep, strict=True) if k]
    for d in merged:  # groups 0 and 1 now share one strong driver set
        for key in [k for k in d if k[0] == 3]:
            d[(3, key[1] % 100)] = d.pop(key)
    noisy = [d for d, k in zip(drivers, truth == 2, strict=True) if k]
    labels = group_steps(driver_matrix(merged + noisy)[0], max_groups=6)
    assert len(set(labels[: len(merged)])) == 1
    assert set(labels[: len(merged)]).isdisjoint(labels[len(merged) :])


def test_rule_recall_by_hand_and_small_inputs():
    labels = np.array([0, 0, 0, 1, 1, 2])
    res = rule_recall(labels, np.array([1, 0, 0, 1, 1, 0], bool))
    assert res == {"n_steps": 3, "group": 1, "group_size": 2, "recall": 2 / 3, "purity": 1.0}
    tie = rule_recall(labels, np.array([1, 0, 0, 1, 0, 0], bool))
    assert tie["group"] == 0 and tie["recall"] == 0.5 and tie["purity"] == pytest.approx(1 / 3)
    assert rule_recall(labels, np.zeros(6, bool))["recall"] is None
    assert group_steps(np.eye(2), 4).tolist() == [0, 0]
    assert group_steps(np.ones((4, 3)) / np.sqrt(3), 4).tolist() == [0, 0, 0, 0]


def graph_of(step: int, drivers: dict) -> StepGraph:
    """A contrastive graph whose feature nodes feed the contrast node directly, each with
    its driver's effect as the edge weight (activation 1)."""
    keys = sorted(drivers)
    n = len(keys)
    return StepGraph(
        trace_id=f"t{step}",
        step=0,
        position=5,
        kind=np.array([FEATURE] * n + [LOGIT]),
        layer=np.array([k[0] for k in keys] + [4]),
        pos=np.full(n + 1, 5),
        feature=np.array([k[1] for k in keys] + [0]),
        activation=np.ones(n + 1),
        influence=np.zeros(n + 1),
        src=np.arange(n),
        dst=np.full(n, n),
        weight=np.array([drivers[k] for k in keys]),
    )


class TriggerCards:
    """Cards of test_mechanisms' shape: mechanism g's driver features fire on `Rg`."""

    def top_contexts(self, layer: int, feature: int) -> list[dict]:
        text = f"x R{feature // 100}" if layer == 3 else "x y"
        return [{"text": text, "token": text[-1], "token_start": len(text) - 1, "activation": 1.0}]

    def label(self, layer: int, feature: int) -> str:
        return f"on {self.top_contexts(layer, feature)[0]['text']}"

    def card(self, layer: int, feature: int) -> dict:
        return {
            "label": self.label(layer, feature),
            "top_contexts": self.top_contexts(layer, feature),
            "promotes": [{"token": "0", "value": 1.0}],
        }


def test_contrastive_mechanisms_find_each_planted_rule_by_group_and_card():
    import pandas as pd

    from crv.mechanisms.config import MechanismsConfig
    from crv.mechanisms.contrastive import contrastive_mechanisms
    from crv.mechanisms.render import mechanisms_markdown

    @dataclass(frozen=True)
    class Rule:
        name: str
        task: str
        trigger: str

    drivers, truth = planted_drivers(4)
    names = np.array(["r0", "r1", ""])[truth]  # mechanism 2 is a natural error: no rule
    steps = pd.DataFrame(
        {"step_id": [f"t{i}:0" for i in range(len(truth))], "task": "arithmetic",
         "planted_rule": names}
    )  # fmt: skip
    graphs = [graph_of(i, d) for i, d in enumerate(drivers)]
    rules = (Rule("r0", "arithmetic", "R0"), Rule("r1", "arithmetic", "R1"),
             Rule("r2", "boolean", "R2"))  # fmt: skip
    cfg = MechanismsConfig(planted_top_k=4)
    section, planted = contrastive_mechanisms(steps, graphs, TriggerCards(), cfg, rules)
    entry = section["tasks"]["arithmetic"]
    assert entry["n_groups"] == 3 and entry["n_steps"] == len(graphs)
    assert sorted(g["n_steps"] for g in entry["groups"]) == [12, 12, 12]
    for name in ("r0", "r1"):
        res = planted[name]
        assert res["recall"] == 1.0 and res["purity"] == 1.0 and res["shares_group_with"] == []
        # 3 driving features point at the trigger; the 4th is a noise feature
        assert res["precision"] == 0.75 and res["k"] == 4
        assert res["verdict"].startswith("recovered")
        group = entry["groups"][res["group"]]
        assert group["planted_rules"] == {name: 12}
    assert "r2" not in planted  # no boolean step: the task is not there
    md = mechanisms_markdown({"fdr": 0.05, "min_steps": 5, "tasks": {},
                              "contrastive": section, "planted": planted})  # fmt: skip
    assert "| `r0` | 12 |" in md and "0.75 of 4" in md
