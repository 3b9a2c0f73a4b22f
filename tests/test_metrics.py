"""Detection metrics against scikit-learn, FPR@95 by hand, bootstrap and Markdown."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from crv.verifier.metrics import (
    bootstrap_intervals,
    detection_markdown,
    detection_metrics,
    evaluate_scores,
)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(400) < 0.15).astype(int)
    s = np.round(rng.normal(size=400) + y, 1)  # rounded: many ties
    m = detection_metrics(y, s)
    fpr, tpr, _ = roc_curve(y, s)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["aupr"] == pytest.approx(average_precision_score(y, s))
    assert m["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def test_fpr95_by_hand():
    # 20 positives, 10 negatives. Sorted by score: 18 positives, then 2 negatives, then
    # the 19th positive (TPR 0.95 reached with FP = 2), then the rest.
    y = np.r_[np.ones(18), 0, 0, 1, 1, np.zeros(8)]
    s = -np.arange(len(y), dtype=float)
    assert detection_metrics(y, s)["fpr95"] == pytest.approx(2 / 10)
    perfect = detection_metrics(np.r_[1, 1, 0, 0], np.r_[4.0, 3, 2, 1])
    assert perfect == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}


def test_bootstrap_is_seeded_and_brackets_point():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.2).astype(int)
    s = rng.normal(size=300) + y
    a = bootstrap_intervals(y, s, 300, seed=1)
    assert a == bootstrap_intervals(y, s, 300, seed=1)
    point = detection_metrics(y, s)
    for k, (lo, hi) in a.items():
        assert lo <= point[k] <= hi


def test_degenerate_test_sets_give_null_with_reason():
    e = evaluate_scores(np.zeros(5, int), np.arange(5.0), 10, 0)
    assert e["auroc"] is None and e["auroc_ci"] is None and "incorrect" in e["reason"]
    assert evaluate_scores(np.zeros(0, int), np.zeros(0), 10, 0)["reason"] == "no test steps"
    ok = evaluate_scores(np.r_[0, 1, 0, 1], np.r_[0.1, 0.9, 0.2, 0.8], 50, 0)
    assert ok["auroc"] == 1.0 and len(ok["auroc_ci"]) == 2


def test_detection_markdown_renders_all_tables():
    entry = evaluate_scores(np.r_[0, 1, 0, 1, 0], np.r_[0.1, 0.9, 0.2, 0.3, 0.5], 20, 0)
    null = evaluate_scores(np.zeros(3, int), np.zeros(3), 20, 0)
    task = {"n_test_steps": 5, "n_test_incorrect": 2, "methods": {"crv": entry, "maxprob": null}}
    reported = {
        **task,
        "paired": {"crv": {"diff": 0.0312, "ci": [-0.01, 0.07], "baseline": "maxprob"}},
        "confident_half_counts": {"n_test_steps": 2, "n_test_incorrect": 1},
        "confident_half": {"crv": entry, "maxprob": null},
        "n_test_incorrect_by_kind": {"natural": 2, "planted": 0},
        "by_error_kind": {"natural": {"crv": entry}, "planted": {"crv": null}},
    }
    detection = {
        "arithmetic": reported,
        "boolean": task,
        "per_complexity": {"arithmetic": {"3": task}},
        "ablation": {"arithmetic": {"all": entry, "without_global": entry}},
        "transfer": {"arithmetic": {"arithmetic": entry, "boolean": null}},
        "all_tasks": {"arithmetic": task, "boolean": task},
        "n_features": 27,
    }
    md = detection_markdown(detection)
    for text in (
        "### Methods",
        "arithmetic AUROC",
        "per complexity",
        "without_global",
        "all tasks",
        "n/a",
        "| arithmetic | crv | maxprob | +3.1 [-1.0, +7.0] |",
        "confident half",
        "arithmetic 2 (1)",
        "arithmetic natural | arithmetic planted",
        "2 natural / 0 planted",
    ):
        assert text in md
    assert "boolean natural" not in md  # tasks without the new entries are left out
