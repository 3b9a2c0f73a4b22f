"""Detection metrics with bootstrap confidence intervals; the incorrect step is the positive.

Every method gives each test step a score, higher = more likely incorrect. Sweeping a
threshold over the scores gives, at each distinct score value s (descending), the counts
TP(s) and FP(s) of positive and negative steps with score >= s, and from them the true and
false positive rates TPR = TP / P and FPR = FP / N.

- **AUROC**: area under the ROC curve (FPR, TPR), trapezoidal, starting at (0, 0); tied
  scores form one diagonal segment. Equals the probability that a random incorrect step
  scores above a random correct one (ties count one half). 0.5 = chance.
- **AUPR**: average precision, sum over thresholds of (R_k - R_{k-1}) * P_k with recall R
  and precision P = TP / (TP + FP) at threshold k (no interpolation). Its chance level is
  the positive rate, so it is informative when incorrect steps are rare.
- **FPR@95**: the false positive rate at the highest threshold whose TPR reaches 95%,
  i.e. the smallest share of correct steps one must flag to catch 95% of the incorrect
  ones. Lower is better; 1 - 0.05 at chance.

These match scikit-learn's `roc_auc_score`, `average_precision_score` and `roc_curve`
(tested). They are written over per-threshold counts so that a bootstrap resample is just a
vector of multiplicities over the sorted steps: all resamples are evaluated at once with
cumulative sums, with no re-sorting, which makes thousands of resamples cheap.

Confidence intervals: percentile bootstrap over steps (resampling test steps with
replacement, seeded), 2.5% and 97.5% quantiles; resamples without a positive or without a
negative step are skipped. Steps of one trace are correlated, so these intervals are
somewhat optimistic; they describe the test set's sampling noise, not the training noise.

Paired differences (`paired_auroc_difference`, "is method A better than method B?")
resample *groups* (traces): a resample draws traces with replacement and takes every step
of a drawn trace, as often as the trace was drawn, so the correlation of a trace's steps
widens the interval as it should. Both methods are scored on the same resamples and the
interval is that of the per-resample difference.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from crv.tables import interval, markdown_rows

METRICS = ("auroc", "aupr", "fpr95")
ERROR_KINDS = ("natural", "planted")
"""Incorrect steps without / with a planted rule (`by_error_kind`)."""
TPR_TARGET = 0.95


def _sort_by_score(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order of the steps by descending score, and where each run of tied scores starts
    in that order (one run per distinct threshold)."""
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    return order, starts


def _metrics_from_weights(
    y_sorted: np.ndarray, starts: np.ndarray, w: np.ndarray
) -> dict[str, np.ndarray]:
    """AUROC, AUPR and FPR@95 for each row of multiplicities `w` [B, n] over sorted steps."""
    b = w.shape[0]
    pos = np.add.reduceat(w * y_sorted, starts, axis=1)
    neg = np.add.reduceat(w * (1 - y_sorted), starts, axis=1)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    p, n = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / p, fp / n
        tpr0 = np.c_[np.zeros((b, 1)), tpr]
        fpr0 = np.c_[np.zeros((b, 1)), fpr]
        auroc = np.sum(np.diff(fpr0, axis=1) * (tpr0[:, 1:] + tpr0[:, :-1]) / 2, axis=1)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 1.0)
        aupr = np.sum(np.diff(tpr0, axis=1) * precision, axis=1)
        first = np.argmax(tpr >= TPR_TARGET - 1e-12, axis=1)
        fpr95 = fpr[np.arange(b), first]
    valid = (p[:, 0] > 0) & (n[:, 0] > 0)
    return {
        k: np.where(valid, v, np.nan) for k, v in zip(METRICS, (auroc, aupr, fpr95), strict=True)
    }


def detection_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR and FPR@95 of `scores` (higher = incorrect) for labels 1 = incorrect.

    NaN where the labels hold only one class."""
    y = np.asarray(y_true, dtype=float)
    s = np.asarray(scores, dtype=float)
    if len(y) == 0:
        return dict.fromkeys(METRICS, float("nan"))
    order, starts = _sort_by_score(s)
    out = _metrics_from_weights(y[order], starts, np.ones((1, len(y))))
    return {k: float(v[0]) for k, v in out.items()}


def bootstrap_intervals(
    y_true: np.ndarray,
    scores: np.ndarray,
    n_bootstrap: int,
    seed: int,
    level: float = 0.95,
    chunk: int = 200,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of each metric, resampling steps with replacement."""
    y = np.asarray(y_true, dtype=float)
    s = np.asarray(scores, dtype=float)
    n = len(y)
    if n_bootstrap <= 0 or n == 0:
        return {k: (float("nan"), float("nan")) for k in METRICS}
    order, starts = _sort_by_score(s)
    y_sorted = y[order]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        w = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(float)
        for k, v in _metrics_from_weights(y_sorted, starts, w).items():
            draws[k].append(v)
    alpha = (1 - level) / 2
    out = {}
    for k in METRICS:
        v = np.concatenate(draws[k])
        v = v[np.isfinite(v)]
        out[k] = (
            (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha)))
            if len(v)
            else (float("nan"), float("nan"))
        )
    return out


def group_weights(
    groups: np.ndarray, n_bootstrap: int, seed: int, chunk: int = 200
) -> Iterator[np.ndarray]:
    """Multiplicities [b, n] of the n steps in bootstrap resamples of their groups (whole
    groups drawn with replacement), `n_bootstrap` rows in all, in chunks of `chunk`."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n_groups, size=(b, n_groups)) + (np.arange(b) * n_groups)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        yield counts[:, inverse].astype(float)


def paired_auroc_difference(
    y_true: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    groups: np.ndarray,
    n_bootstrap: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, object]:
    """AUROC(a) - AUROC(b) on the same steps, with a percentile interval from a bootstrap
    that resamples `groups` (traces): `{diff, ci: [low, high]}`; None where undefined."""
    y = np.asarray(y_true, dtype=float)
    sorted_ = [_sort_by_score(np.asarray(s, dtype=float)) for s in (scores_a, scores_b)]
    point = [_metrics_from_weights(y[o], st, np.ones((1, len(y))))["auroc"][0] for o, st in sorted_]
    draws = [np.zeros(0)]
    for w in group_weights(groups, n_bootstrap, seed) if len(y) else ():
        a, b = (_metrics_from_weights(y[o], st, w[:, o])["auroc"] for o, st in sorted_)
        draws.append(a - b)
    d = np.concatenate(draws)
    d = d[np.isfinite(d)]
    alpha = (1 - level) / 2
    ci = [float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))] if len(d) else None
    return {"diff": _none_if_nan(float(point[0] - point[1])) if len(y) else None, "ci": ci}


def evaluate_scores(
    y_true: np.ndarray, scores: np.ndarray, n_bootstrap: int, seed: int
) -> dict[str, object]:
    """The report entry of one method on one test set.

    `{auroc, aupr, fpr95, auroc_ci, aupr_ci, fpr95_ci}` as fractions with intervals
    `[low, high]`; when the test set lacks incorrect or correct steps, or scores are not
    finite, every value is None and `reason` says why."""
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(scores, dtype=float)
    reason = None
    if len(y) == 0:
        reason = "no test steps"
    elif y.sum() == 0:
        reason = "no incorrect steps in the test set"
    elif y.sum() == len(y):
        reason = "no correct steps in the test set"
    elif not np.all(np.isfinite(s)):
        reason = "non-finite scores"
    if reason is not None:
        return null_metrics(reason)
    point = detection_metrics(y, s)
    ci = bootstrap_intervals(y, s, n_bootstrap, seed)
    out: dict[str, object] = dict(point)
    for k in METRICS:
        out[f"{k}_ci"] = [_none_if_nan(ci[k][0]), _none_if_nan(ci[k][1])]
    return out


def null_metrics(reason: str) -> dict[str, object]:
    """A metrics entry with every value None and the reason."""
    out: dict[str, object] = dict.fromkeys(METRICS)
    out.update({f"{k}_ci": None for k in METRICS})
    out["reason"] = reason
    return out


def _none_if_nan(x: float) -> float | None:
    return None if not np.isfinite(x) else x


def metric_cell(entry: dict | None, metric: str, ci: bool = True) -> str:
    """A metric as a percentage with its interval, or "n/a" when it is missing."""
    if not entry:
        return "n/a"
    return interval(
        entry.get(metric), entry.get(f"{metric}_ci") if ci else None, fmt=".1f", scale=100
    )


def diff_cell(entry: dict) -> str:
    """A paired difference in AUROC points with its interval, or why it is missing."""
    if entry.get("diff") is None:
        return f"n/a ({entry.get('reason', 'undefined')})"
    return interval(entry["diff"], entry.get("ci"), fmt="+.1f", scale=100)


def _auroc_table(
    title: str,
    note: str,
    counts: dict[str, str],
    columns: dict[str, dict[str, dict]],
    methods: list[str],
) -> list[str]:
    """A section with one row per method and one AUROC column per named test subset;
    `note` is followed by the per-task `counts`."""
    rows = [[m] + [metric_cell(col.get(m), "auroc") for col in columns.values()] for m in methods]
    count_text = ", ".join(f"{t} {c}" for t, c in counts.items())
    return [f"### {title}\n", f"{note}: {count_text}.\n", markdown_rows(["method", *columns], rows)]


def _new_keys_markdown(detection: dict, tasks: list[str], methods: list[str]) -> list[str]:
    """Tables of the paired differences, the confident half and the error kinds."""
    parts: list[str] = []
    rows = [
        [t, m, e.get("baseline") or "n/a", diff_cell(e)]
        for t in tasks
        for m, e in detection[t].get("paired", {}).items()
    ]
    parts += _section(
        "Paired AUROC difference against the strongest baseline",
        "AUROC points, method minus the baseline with the highest AUROC on the validation "
        "part of the training split (no test step chooses it); 95% interval from a "
        "bootstrap resampling test traces (same resamples for both).",
        ["task", "method", "strongest baseline", "difference"],
        rows,
    )
    parts += _probe_choice_section(detection, tasks)
    rows = [
        [t, subset, m, diff_cell(e), diff_cell(detection[t][f"{prefix}vs_probe"].get(m, {}))]
        for t in tasks
        for subset, prefix in (("all", ""), ("confident half", "confident_half_"))
        for m, e in detection[t].get(f"{prefix}vs_maxprob", {}).items()
    ]
    parts += _section(
        "Paired AUROC differences against MaxProb and against the strongest probe",
        "AUROC points, method minus MaxProb / minus the probe with the highest validation "
        "AUROC, on all test steps and on the confident half; 95% interval from the trace "
        "bootstrap.",
        ["task", "test steps", "method", "- MaxProb", "- strongest probe"],
        rows,
    )
    halves = [t for t in tasks if "confident_half" in detection[t]]
    if halves:
        half = {t: detection[t]["confident_half_counts"] for t in halves}
        parts += _auroc_table(
            "AUROC on the confident half of the test steps",
            "The half of each task's test steps with the highest mean max-probability; "
            "steps (incorrect)",
            {t: f"{c['n_test_steps']} ({c['n_test_incorrect']})" for t, c in half.items()},
            {f"{t} AUROC": detection[t]["confident_half"] for t in halves},
            methods,
        )
    kinds = [t for t in tasks if "by_error_kind" in detection[t]]
    if kinds:
        n_kind = {t: detection[t]["n_test_incorrect_by_kind"] for t in kinds}
        parts += _auroc_table(
            "AUROC by error kind",
            "Natural errors (no planted rule) or planted errors (a planted rule) against all "
            "correct test steps; incorrect test steps",
            {t: f"{n['natural']} natural / {n['planted']} planted" for t, n in n_kind.items()},
            {f"{t} {k}": detection[t]["by_error_kind"][k] for t in kinds for k in ERROR_KINDS},
            methods,
        )
    rows = [
        [t, k, m, diff_cell(e)]
        for t in kinds
        for k in ERROR_KINDS
        for m, e in (detection[t].get("by_error_kind_vs_maxprob", {}).get(k) or {}).items()
    ]
    parts += _section(
        "Paired AUROC difference against MaxProb by error kind",
        "AUROC points, method minus MaxProb on the same steps of one error kind (and all "
        "correct test steps); 95% interval from the trace bootstrap.",
        ["task", "error kind", "method", "difference"],
        rows,
    )
    rows = [
        [t, k, m, e.get("probe") or "n/a", diff_cell(e)]
        for t in kinds
        for k in ERROR_KINDS
        for m, e in (detection[t].get("by_error_kind_vs_probe", {}).get(k) or {}).items()
    ]
    parts += _section(
        "Paired AUROC difference against the strongest probe by error kind",
        "AUROC points, method minus the probe with the highest validation AUROC, on the "
        "steps of one error kind (and all correct test steps); 95% interval from the trace "
        "bootstrap.",
        ["task", "error kind", "method", "probe", "difference"],
        rows,
    )
    return parts


def _probe_choice_section(detection: dict, tasks: list[str]) -> list[str]:
    """What was chosen on validation: the strongest baseline and probe, the hidden-state
    probe's layer, pooling and C, the transcoder probe's C and its top latents."""
    rows = []
    for t in tasks:
        d = detection[t]
        choice = d.get("probe_choice", {})
        hidden = choice.get("probe")
        tc = choice.get("tc_probe")
        top = ", ".join(
            f"L{f['layer']}/F{f['latent']} {f['pooling']} {f['coef']:+.2f}"
            for f in (tc or {}).get("top_features", [])[:5]
        )
        rows.append(
            [
                t,
                (d.get("strongest_baseline") or {}).get("method", "n/a"),
                (d.get("strongest_probe") or {}).get("method", "n/a"),
                f"layer {hidden['layer']}, {hidden['pooling']}, C={hidden['c']:g}"
                if hidden
                else "n/a",
                f"C={tc['c']:g}, {tc['n_used']} latents: {top}" if tc else "n/a",
                (d.get("selected") or {}).get("method", "n/a"),
            ]
        )
    return _section(
        "Chosen on validation",
        "Everything here is chosen on the validation part of the training split; "
        "`selected` is the saved method a bundle ships for the task.",
        ["task", "strongest baseline", "strongest probe", "probe", "tc_probe", "selected"],
        rows,
    )


def _section(title: str, note: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A titled table with its note, or nothing when there are no rows."""
    return [f"### {title}\n", f"{note}\n", markdown_rows(header, rows)] if rows else []


def detection_markdown(detection: dict) -> str:
    """Markdown tables of the verifier stage's report: the method comparison per task
    (AUROC, AUPR, FPR@95 in %, 95% bootstrap intervals), the paired differences against
    the best baseline, the confident half, the error kinds, per complexity (AUROC), the
    leave-one-family-out ablation, and the transfer matrix with training on all tasks."""
    tasks = [t for t, v in detection.items() if isinstance(v, dict) and "methods" in v]
    if not tasks:
        return "No detection results.\n"
    methods = list(dict.fromkeys(m for t in tasks for m in detection[t]["methods"]))
    names = {"auroc": "AUROC", "aupr": "AUPR", "fpr95": "FPR@95"}
    parts = [
        "Incorrect step = positive class; values in %, 95% bootstrap intervals over test "
        "steps; FPR@95 lower is better.\n",
        "Test steps (incorrect): "
        + ", ".join(
            f"{t} {detection[t]['n_test_steps']} ({detection[t]['n_test_incorrect']})"
            for t in tasks
        )
        + ".\n",
    ]
    header = ["method"] + [f"{t} {names[k]}" for t in tasks for k in METRICS]
    rows = [
        [m] + [metric_cell(detection[t]["methods"].get(m), k) for t in tasks for k in METRICS]
        for m in methods
    ]
    parts += ["### Methods\n", markdown_rows(header, rows)]
    parts += _new_keys_markdown(detection, tasks, methods)

    per_c = detection.get("per_complexity", {})
    rows = [
        [f"{t}", c, f"{e['n_test_steps']} ({e['n_test_incorrect']})"]
        + [metric_cell(e["methods"].get(m), "auroc", ci=False) for m in methods]
        for t in tasks
        for c, e in per_c.get(t, {}).items()
    ]
    if rows:
        parts += [
            "### AUROC per complexity\n",
            markdown_rows(["task", "complexity", "steps (incorrect)", *methods], rows),
        ]

    ablation = detection.get("ablation", {})
    if ablation:
        variants = list(dict.fromkeys(v for t in ablation for v in ablation[t]))
        header = ["CRV features"] + [f"{t} {names[k]}" for t in tasks for k in ("auroc", "fpr95")]
        rows = [
            [v]
            + [
                metric_cell(ablation.get(t, {}).get(v), k)
                for t in tasks
                for k in ("auroc", "fpr95")
            ]
            for v in variants
        ]
        parts += ["### Ablation (leave one feature family out)\n", markdown_rows(header, rows)]

    transfer = detection.get("transfer", {})
    pooled = detection.get("all_tasks", {})
    if transfer or pooled:
        rows = [[a] + [metric_cell(transfer[a].get(b), "auroc") for b in tasks] for a in transfer]
        if pooled:
            rows.append(
                ["all tasks"]
                + [
                    metric_cell(pooled.get(b, {}).get("methods", {}).get("crv"), "auroc")
                    for b in tasks
                ]
            )
        parts += [
            "### CRV AUROC: trained on (rows), tested on (columns)\n",
            markdown_rows(["train \\ test", *tasks], rows),
        ]
    return "\n".join(parts)
