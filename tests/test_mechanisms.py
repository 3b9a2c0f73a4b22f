"""Error mechanisms: the tests per unit, the FDR control, planted-rule precision, and the
stage's table and report section on hand-built step graphs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.stats import fisher_exact, mannwhitneyu

from crv.graphs.graph import ERROR, FEATURE, LOGIT, StepGraph
from crv.mechanisms.config import MechanismsConfig
from crv.mechanisms.planted import BUGS_MODULE, load_rules, points_at, recover_rule
from crv.mechanisms.render import mechanisms_markdown
from crv.mechanisms.stage import graph_units, mechanisms
from crv.mechanisms.stats import (
    add_fdr,
    fisher_greater,
    influence_test,
    log_odds_ratio,
    unit_tests,
)


def test_fisher_greater_equals_scipy():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n_inc, n_cor = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        a, c = int(rng.integers(0, n_inc + 1)), int(rng.integers(0, n_cor + 1))
        expected = fisher_exact([[a, n_inc - a], [c, n_cor - c]], alternative="greater").pvalue
        got = fisher_greater(np.array([a]), np.array([a + c]), n_inc, n_inc + n_cor)[0]
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_log_odds_ratio_and_bh_by_hand():
    assert log_odds_ratio(3, 1, 1, 3) == pytest.approx(2 * np.log(7 / 3))
    table = pd.DataFrame({"p_fisher": [0.001, 0.04], "p_mwu": [0.02, 0.9], "log_odds_ratio": 0.0})
    out = add_fdr(table, 0.05)
    # pooled p sorted 0.001, 0.02, 0.04, 0.9 (m = 4): q = 0.004, 0.04, 0.0533, 0.9
    assert out["q_fisher"].tolist() == pytest.approx([0.004, 0.04 * 4 / 3])
    assert out["q_mwu"].tolist() == pytest.approx([0.04, 0.9])
    assert out["significant"].tolist() == [True, False]


def planted_matrices(seed: int, planted: dict[int, float], n_units: int = 30):
    """40 incorrect and 60 correct steps; unit u is present with probability 0.3, except
    that a planted unit is present in incorrect steps with probability `planted[u]`
    (influence uniform in (0, 1), doubled for planted units in incorrect steps)."""
    rng = np.random.default_rng(seed)
    incorrect = np.r_[np.ones(40, bool), np.zeros(60, bool)]
    prob = np.full((100, n_units), 0.3)
    for u, p in planted.items():
        prob[incorrect, u] = p
    present = rng.random((100, n_units)) < prob
    influence = rng.random((100, n_units)) * present
    for u in planted:
        influence[incorrect, u] *= 2
    return sparse.csr_matrix(present.astype(float)), sparse.csr_matrix(influence), incorrect


def test_an_over_represented_feature_is_found_and_a_null_table_finds_nothing():
    present, influence, incorrect = planted_matrices(0, {7: 0.8})
    table = unit_tests(present, influence, incorrect).rename_axis("unit").reset_index()
    table = add_fdr(table, 0.05)
    assert table.loc[table["significant"], "unit"].tolist() == [7]
    top = table.iloc[0]  # ranked first
    assert top["unit"] == 7
    assert top["rate_incorrect"] == pytest.approx(present[:40, 7].sum() / 40)
    assert top["log_odds_ratio"] > 1.5 and top["auc_influence"] > 0.5
    null = add_fdr(unit_tests(*planted_matrices(1, {})), 0.05)
    assert not null["significant"].any()


def test_influence_is_compared_among_the_graphs_that_contain_the_unit():
    present, influence, incorrect = planted_matrices(2, {3: 0.6}, n_units=5)
    table = unit_tests(present, influence, incorrect)
    has, dense = present.toarray() > 0, influence.toarray()
    for u in range(5):
        x, y = dense[incorrect & has[:, u], u], dense[~incorrect & has[:, u], u]
        wins = (x[:, None] > y[None, :]).mean() + 0.5 * (x[:, None] == y[None, :]).mean()
        assert table["auc_influence"][u] == pytest.approx(wins)
        assert table["mean_influence_incorrect"][u] == pytest.approx(x.mean())
        assert table["present_incorrect"][u] == len(x)
        expected = mannwhitneyu(x, y, alternative="greater", method="asymptotic").pvalue
        assert table["p_mwu"][u] == pytest.approx(expected)


def test_influence_test_is_exact_for_small_groups_and_empty_groups_are_untested():
    p, auc = influence_test(np.array([5.0, 6.0]), np.array([1.0, 2.0, 3.0]))
    assert auc == 1.0 and p == pytest.approx(1 / 10)  # 1 of C(5, 2) orderings
    p, auc = influence_test(np.zeros(0), np.array([1.0]))
    assert p == 1.0 and np.isnan(auc)


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    task: str
    trigger: str


def context(text: str) -> dict:
    """A card context whose activating token is the text's `|`-marked token (or its last)."""
    left, _, rest = text.partition("|")
    token = rest[:1] if rest else left[-1]
    start = len(left) if rest else len(left) - 1
    return {"text": left + rest, "token": token, "token_start": start, "activation": 1.0}


class FakeCards:
    """Cards whose contexts are given per (layer, feature); "9" otherwise."""

    def __init__(self, texts: dict[tuple[int, int], list[str]]) -> None:
        self.texts = texts

    def top_contexts(self, layer: int, feature: int) -> list[dict]:
        return [context(t) for t in self.texts.get((layer, feature), ["9", "9"])]

    def label(self, layer: int, feature: int) -> str:
        return f"on {self.top_contexts(layer, feature)[0]['token']}"

    def card(self, layer: int, feature: int) -> dict:
        return {
            "label": self.label(layer, feature),
            "top_contexts": self.top_contexts(layer, feature),
            "promotes": [{"token": "0", "value": 1.0}],
        }


def test_points_at_reads_the_left_context_only():
    seven = next(r for r in load_rules() if r.name == "times_seven").trigger
    # the `=` after 5*7 and the `7` of `7*` have the trigger in view; a `=` of 5*5 has not
    assert points_at([context("Step 2: 5*7|=36"), context("Step 1: 7|*8=")], seven, 1.0)
    assert not points_at([context("Step 1: 5*5|=25")], seven, 0.5)
    # what follows the activating token is not in view, nor is 17 or 0.7 a 7
    assert not points_at([context("Step 1: 5|*7=36")], seven, 0.5)
    assert not points_at([context("Step 1: 17*2|=")], seven, 0.5)
    assert points_at([context("(-7)*8|="), context("5*5|=")], seven, 0.5)
    assert not points_at([context("(-7)*8|="), context("5*5|=")], seven, 0.6)
    assert not points_at([], seven, 0.5)
    minus = next(r for r in load_rules() if r.name == "minus_dropped").trigger
    assert points_at([context("Step 1: -(5|+9)")], minus, 1.0)
    assert not points_at([context("Step 1: 5-(|-1)")], minus, 0.5)
    not_or = next(r for r in load_rules() if r.name == "not_or_dropped").trigger
    assert points_at([context("not (True or| False)")], not_or, 1.0)
    assert not points_at([context("not (True and| False) or")], not_or, 0.5)


@pytest.mark.parametrize(("min_share", "precision"), [(0.5, 0.5), (0.7, 0.0)])
def test_planted_precision_on_hand_built_cards(min_share: float, precision: float):
    """Units 4 and 9 are over-represented in the rule's incorrect steps; unit 4's card fires
    on the trigger "7" in 2 of 3 contexts, unit 9's on "8"."""
    present, influence, incorrect = planted_matrices(3, {4: 0.9, 9: 0.9})
    steps = pd.DataFrame(
        {
            "task": "arithmetic",
            "label": incorrect.astype(int),
            "planted_rule": np.where(incorrect, "times7", ""),
        }
    )
    units = pd.DataFrame({"kind": "feature", "layer": 1, "feature": np.arange(30)})
    cards = FakeCards({(1, 4): ["7|*", "3*7|=", "8*"], (1, 9): ["8*", "8*", "8*"]})
    rule = Rule("times7", "7*x one too high", "arithmetic", r"7\*|\*7")
    out = recover_rule(
        rule, steps, present, influence, units, cards,
        fdr=0.05, min_steps=5, top_k=2, min_share=min_share,
    )  # fmt: skip
    assert [f["feature"] for f in out["features"]] in ([4, 9], [9, 4])
    assert out["precision"] == precision
    assert out["base_rate"] == pytest.approx((precision > 0) / 30)
    assert out["n_incorrect"] == 40 and out["n_correct"] == 60
    assert out["verdict"].startswith("recovered" if precision >= 0.5 else "failed")
    other = Rule("not_or", "dropped not", "boolean", "not")
    missing = recover_rule(
        other, steps, present, influence, units, cards,
        fdr=0.05, min_steps=5, top_k=2, min_share=0.5,
    )  # fmt: skip
    assert missing["precision"] is None and "not measured" in missing["verdict"]


def graph(step: int, nodes: list[tuple[int, int, int, float]]) -> StepGraph:
    """A step graph of (kind, layer, feature, influence) nodes plus one logit; no edges."""
    nodes = [*nodes, (LOGIT, 2, 5, 1.0)]
    kind, layer, feature, influence = (np.array(col) for col in zip(*nodes, strict=True))
    n = len(nodes)
    return StepGraph(
        "t", step, 0, kind.astype(np.int8), layer.astype(np.int16), np.zeros(n, np.int32),
        feature.astype(np.int32), np.ones(n, np.float32), influence.astype(np.float32),
        np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32),
    )  # fmt: skip


def test_graph_units_sum_influence_per_feature_layer_and_error_node():
    g = graph(0, [(FEATURE, 0, 3, 0.25), (FEATURE, 0, 3, 0.5), (FEATURE, 1, 2, 0.125),
                  (ERROR, 1, -1, 0.0625)])  # fmt: skip
    assert sorted(graph_units(g)) == [
        ("error", 1, -1, 0.0625),
        ("feature", 0, 3, 0.75),
        ("feature", 1, 2, 0.125),
        ("layer", 0, -1, 0.75),
        ("layer", 1, -1, 0.125),
    ]


def step_graphs(seed: int, planted: bool) -> tuple[pd.DataFrame, list[StepGraph]]:
    """40 incorrect and 60 correct steps of one task; 12 layer-0 features present with
    probability 0.3; with `planted`, L1/F7 appears in 80% of incorrect steps only."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(40, int), np.zeros(60, int)]
    graphs = []
    for i, label in enumerate(labels):
        nodes = [(FEATURE, 0, f, float(rng.random())) for f in range(12) if rng.random() < 0.3]
        if planted and label == 1 and rng.random() < 0.8:
            nodes.append((FEATURE, 1, 7, 0.5))
        nodes.append((ERROR, 0, -1, 0.1))
        graphs.append(graph(i, nodes))
    return pd.DataFrame({"task": "arithmetic", "label": labels}), graphs


def test_mechanisms_section_names_the_planted_feature_by_its_card():
    steps, graphs = step_graphs(0, planted=True)
    cards = FakeCards({(1, 7): ["7", "7"]})
    table, section = mechanisms(steps, graphs, cards, MechanismsConfig(), rules=None)
    entry = section["tasks"]["arithmetic"]
    assert not entry["nothing_survives"]
    assert entry["n_significant"]["feature"] == 1
    assert (entry["top"][0]["layer"], entry["top"][0]["feature"]) == (1, 7)
    assert entry["top"][0]["card"] == "on 7"
    assert {(r["kind"], r["layer"]) for r in entry["layers"]} == {
        ("layer", 0),
        ("layer", 1),
        ("error", 0),
    }
    assert len(table) == 12 + 1 + 3 and set(table["task"]) == {"arithmetic"}
    assert section["planted_skipped"] == "crv.tasks.bugs is not available"
    md = mechanisms_markdown(section)
    assert "L1/F7 | `on 7`" in md and "Nothing survives" not in md


def test_mechanisms_says_plainly_when_nothing_survives():
    steps, graphs = step_graphs(1, planted=False)
    rule = Rule("times7", "", "arithmetic", ("7",))
    _, section = mechanisms(steps, graphs, FakeCards({}), MechanismsConfig(), rules=(rule,))
    assert section["tasks"]["arithmetic"]["nothing_survives"]
    assert section["planted"] == {}
    assert (
        section["planted_skipped"] == "no test step exercises a planted rule (the subject has none)"
    )
    steps["planted_rule"] = ""  # the column of a subject without planted rules: same
    _, section = mechanisms(steps, graphs, FakeCards({}), MechanismsConfig(), rules=(rule,))
    assert section["planted"] == {} and "subject has none" in section["planted_skipped"]
    assert "**Nothing survives the correction**" in mechanisms_markdown(section)


def test_mechanisms_measures_each_planted_rule_from_the_step_column():
    steps, graphs = step_graphs(0, planted=True)
    steps["planted_rule"] = np.where(steps["label"] == 1, "times7", "")
    cards = FakeCards({(1, 7): ["7", "7"]})
    rules = (Rule("times7", "", "arithmetic", "7"), Rule("not_or", "", "boolean", "not"))
    _, section = mechanisms(steps, graphs, cards, MechanismsConfig(planted_top_k=1), rules)
    times7 = section["planted"]["times7"]
    assert times7["precision"] == 1.0 and times7["features"][0]["feature"] == 7
    assert section["planted"]["not_or"]["precision"] is None
    assert "planted_skipped" not in section
    md = mechanisms_markdown(section)
    assert "**times7**" in md and "precision 1.00" in md and "not measured" in md


def test_load_rules_reads_the_bugs_module_when_there_is_one(monkeypatch: pytest.MonkeyPatch):
    import sys
    import types

    fake = types.ModuleType(BUGS_MODULE)
    fake.RULES = (Rule("times7", "", "arithmetic", "7"),)
    monkeypatch.setitem(sys.modules, BUGS_MODULE, fake)
    assert load_rules() == fake.RULES
    monkeypatch.setitem(sys.modules, BUGS_MODULE, None)  # import of it fails: no rules
    assert load_rules() is None
