"""The `verifier` stage: train every method (`crv.verifier.methods`) and evaluate it.

Every method goes through the same path (`evaluate_methods`): fit on the training steps
(no-op for fixed scores), score the test steps, compute AUROC, AUPR and FPR@95 with
bootstrap intervals (`crv.verifier.metrics`). Methods:

- `crv`: the verifier (`crv.verifier.classifier`) on all graph features (the identity
  family included when the features artifact has it);
- `crv+confidence`: the same classifier on the graph features plus the confidence
  baselines' scores (`CONFIDENCE_COLUMNS` present): does the graph add to confidence?
- `crv+probes`: the same classifier on graph features + confidence + the out-of-fold
  scores of `probe` and `tc_probe` (stacked): the best verifier crv builds; and
  `probes+confidence`, the same without the graph: does the graph add to the probes?
- `position`: the same classifier on the step's index, `n_prefix_tokens` (the explained
  position + 1) and the problem's complexity only (how much is explained by *where* a
  step is);
- fixed scores from the `baselines` stage: `maxprob`, `perplexity`, `entropy`,
  `temperature`, `energy` (and `coe_r`, `coe_c` when present);
- `probe`: logistic regression on the hidden states of the layer, pooling and C with the
  best validation AUROC; `tc_probe`: sparse (L1) logistic regression on the transcoder
  latents of every layer and pooling, naming the latents it uses;
- `lr_probe` (L2, balanced class weights) and `mlp_probe` (ReLU, Adam, fixed epochs):
  the fixed-layer probes on the mean-pooled hidden state at the baselines' `probe_layer`.

Everything that is chosen is chosen on the validation part of the training split (the
traces xgboost stops early on), never on a test step: the probes' settings, the strongest
baseline (every non-CRV method) and the strongest probe (`PROBE_METHODS`), and the method
each task's bundle ships (`selected.json`). All methods are compared on the same steps:
those with a graph, a baseline row and a known label. Reported per task:

- every method's metrics on the test steps, and its `validation_auroc`;
- `paired.<crv method>`: AUROC difference against the strongest baseline, 95% interval
  from a bootstrap resampling test *traces*, the same resamples for both methods;
- `vs_maxprob.<method>` and `vs_probe.<method>` ({diff, ci, probe}): the CRV methods,
  probes and MaxProb against MaxProb and against the strongest probe;
- `confident_half.<method>` (and `confident_half_vs_maxprob`, `confident_half_vs_probe`):
  on the half of the test steps the model was most sure of (the lowest `maxprob`
  scores; ties broken by row order), where confidence by construction separates little;
- `by_error_kind.<natural | planted>.<method>`: natural errors (incorrect steps with no
  planted rule) or planted errors (incorrect steps exercising a planted bug) against all
  correct test steps; null entries with a reason when a kind has no incorrect test step.
  Only for a task whose test steps exercise planted rules (crv-tiny-bugs): without them the
  natural block would repeat the methods' own metrics. `by_error_kind_vs_maxprob` and
  `by_error_kind_vs_probe` hold the paired differences on those steps;
- `probe_choice`: the probe's layer, pooling and C, the transcoder probe's C and top
  latents; `selected`: the shipped method and its threshold.

Also per complexity (the task's models, test steps of one complexity), the
leave-one-family-out ablation of CRV, the cross-task transfer matrix of CRV (trained on one
task, tested on another; the diagonal is the in-task result) and training on all tasks
together (tested per task). The bootstrap uses the same seed for every method on a test
set, so all methods are compared on the same resamples.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crv.errors import CRVError
from crv.io import atomic_write_json
from crv.pipeline import StageContext
from crv.verifier.classifier import XGBVerifier
from crv.verifier.config import VerifierConfig
from crv.verifier.methods import (
    CRV_METHODS,
    FORMAT_VERSION,
    INPUTS_FILE,
    PROBE_METHODS,
    SELECTED_FILE,
    HiddenInputs,
    HiddenProbe,
    Method,
    ProbeData,
    Scorer,
    SparseProbe,
    ablation_methods,
    build_methods,
    fit_method,
    method_dir_name,
    savable,
    save_method,
    select_on_validation,
    task_methods_dir,
)
from crv.verifier.metrics import (
    ERROR_KINDS,
    evaluate_scores,
    null_metrics,
    paired_auroc_difference,
)


def score_and_evaluate(
    method: Method, scorer: Scorer, test: pd.DataFrame, n_bootstrap: int, seed: int
) -> tuple[np.ndarray, dict]:
    """Scores of a fitted method on test steps and its metrics entry."""
    s = scorer.score(method.inputs(test)) if len(test) else np.zeros(0)
    return s, evaluate_scores(test["label"].to_numpy(), s, n_bootstrap, seed)


def evaluate_methods(
    methods: list[Method],
    train: pd.DataFrame,
    tests: dict[str, pd.DataFrame],
    n_bootstrap: int,
    seed: int,
) -> tuple[dict[str, dict[str, dict]], dict[str, Scorer | None], dict[str, dict[str, np.ndarray]]]:
    """Fit each method on `train` and evaluate it on every named test set.

    Returns (metrics[test][method], fitted scorers by method, scores[test][method])."""
    metrics: dict[str, dict[str, dict]] = {t: {} for t in tests}
    scores: dict[str, dict[str, np.ndarray]] = {t: {} for t in tests}
    fitted: dict[str, Scorer | None] = {}
    for m in methods:
        scorer, reason = fit_method(m, train)
        fitted[m.name] = scorer
        for t, test in tests.items():
            if scorer is None:
                metrics[t][m.name] = null_metrics(reason)
            else:
                scores[t][m.name], metrics[t][m.name] = score_and_evaluate(
                    m, scorer, test, n_bootstrap, seed
                )
    return metrics, fitted, scores


def transfer_matrix(
    method: Method,
    fitted: dict[str, Scorer | None],
    tests: dict[str, pd.DataFrame],
    n_bootstrap: int,
    seed: int,
) -> dict[str, dict[str, dict]]:
    """metrics[train task][test task] of the per-task fitted scorers of one method."""
    out: dict[str, dict[str, dict]] = {}
    for a, scorer in fitted.items():
        out[a] = {
            b: null_metrics("no model could be trained on this task")
            if scorer is None
            else score_and_evaluate(method, scorer, test, n_bootstrap, seed)[1]
            for b, test in tests.items()
        }
    return out


def step_table(
    features: pd.DataFrame, baselines: pd.DataFrame, score_columns: list[str]
) -> pd.DataFrame:
    """Labelled steps present in both tables: the feature table plus the baseline scores,
    `feature_row` (row of the step in the feature table and its identity block) and
    `hidden_row` (row of the step in the baselines' probe inputs)."""
    f = features.assign(feature_row=np.arange(len(features)))
    b = baselines[["step_id", *score_columns]].assign(hidden_row=np.arange(len(baselines)))
    data = f.merge(b, on="step_id", how="inner", validate="one_to_one")
    return data[data["label"] >= 0].reset_index(drop=True)


def strongest(
    fitted: dict[str, Scorer | None], candidates: list[str] | tuple[str, ...]
) -> dict[str, Any] | None:
    """The candidate method with the highest AUROC on the validation part of the training
    split (never a test step): `{method, val_auroc, chosen_on}`; None when none has one."""
    aurocs = {
        m: fitted[m].info.get("val_auroc")
        for m in candidates
        if fitted.get(m) is not None and fitted[m].info.get("val_auroc") is not None
    }
    if not aurocs:
        return None
    best = max(aurocs, key=aurocs.__getitem__)
    return {"method": best, "val_auroc": aurocs[best], "chosen_on": "validation"}


def paired_against(
    test: pd.DataFrame,
    metrics: dict[str, dict],
    scores: dict[str, np.ndarray],
    boot: tuple,
    base: str | None,
    methods: list[str] | tuple[str, ...] = CRV_METHODS,
    key: str = "baseline",
) -> dict[str, dict]:
    """`<method>`: AUROC difference against `base` on the same steps, with a bootstrap
    that resamples traces; `key` names `base` in each entry."""
    out: dict[str, dict] = {}
    for m in methods:
        if m not in metrics or m == base:
            continue
        if base is None or base not in scores or m not in scores or metrics[m]["auroc"] is None:
            reason = metrics[m].get("reason") or f"no {key} with test scores"
            out[m] = {"diff": None, "ci": None, key: base, "reason": reason}
            continue
        y, groups = test["label"].to_numpy(), test["trace_id"].to_numpy()
        diff = paired_auroc_difference(y, scores[m], scores[base], groups, *boot)
        out[m] = {**diff, key: base}
    return out


def confident_half(test: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the half (rounded down) of the test steps with the lowest `maxprob`
    score, i.e. the highest mean max-probability: the steps the model was most sure of."""
    order = np.argsort(test["maxprob"].to_numpy(), kind="stable")
    mask = np.zeros(len(test), dtype=bool)
    mask[order[: len(test) // 2]] = True
    return mask


def planted_mask(steps: pd.DataFrame) -> np.ndarray:
    """The steps that exercise a planted rule (`planted_rule` neither empty nor missing)."""
    return steps["planted_rule"].fillna("").to_numpy() != ""


def error_kind_mask(test: pd.DataFrame, kind: str) -> np.ndarray:
    """Correct steps plus the incorrect steps of one kind: `natural` (no planted rule) or
    `planted` (exercising a planted rule)."""
    planted = planted_mask(test)
    wrong = test["label"].to_numpy() == 1
    of_kind = planted if kind == "planted" else ~planted
    return ~wrong | of_kind


def subset_metrics(
    test: pd.DataFrame,
    mask: np.ndarray,
    metrics: dict[str, dict],
    scores: dict[str, np.ndarray],
    boot: tuple,
    empty_reason: str,
) -> dict[str, dict]:
    """Every method's metrics on the test steps in `mask` (the same fitted scorers)."""
    y = test["label"].to_numpy()[mask]
    out = {}
    for m, entry in metrics.items():
        if m not in scores:
            out[m] = null_metrics(entry.get("reason") or "no scores")
        elif not (y == 1).any():
            out[m] = null_metrics(empty_reason)
        else:
            out[m] = evaluate_scores(y, scores[m][mask], *boot)
    return out


def _counts(df: pd.DataFrame) -> dict[str, int]:
    return {"n_test_steps": len(df), "n_test_incorrect": int((df["label"] == 1).sum())}


COMPARED = (*CRV_METHODS, "probes+confidence", *PROBE_METHODS, "maxprob")
"""Methods held against MaxProb and against the strongest probe (each but itself)."""


def task_report(
    test: pd.DataFrame,
    metrics: dict,
    scores: dict,
    boot: tuple,
    baseline: str | None,
    probe: str | None,
) -> dict:
    """The paired, confident-half and by-error-kind entries of one task's test steps.
    `baseline` and `probe`: the strongest baseline and probe, chosen on validation."""
    compared = [m for m in COMPARED if m in metrics]

    def against(sub: pd.DataFrame, mask: np.ndarray, kind_metrics: dict, prefix: str) -> dict:
        sub_scores = {m: sc[mask] for m, sc in scores.items()}
        out = {}
        if "maxprob" in scores:
            out[f"{prefix}vs_maxprob"] = paired_against(
                sub, kind_metrics, sub_scores, boot, "maxprob", compared
            )
        out[f"{prefix}vs_probe"] = paired_against(
            sub, kind_metrics, sub_scores, boot, probe, compared, "probe"
        )
        return out

    everything = np.ones(len(test), dtype=bool)
    report: dict = {
        "paired": paired_against(test, metrics, scores, boot, baseline),
        **against(test, everything, metrics, ""),
    }
    if "maxprob" in test.columns:
        half = confident_half(test)
        report["confident_half_counts"] = _counts(test[half])
        report["confident_half"] = subset_metrics(
            test, half, metrics, scores, boot, "no incorrect step in the confident half"
        )
        report |= against(test[half], half, report["confident_half"], "confident_half_")
    if not planted_mask(test).any():
        return report  # a subject without planted rules: "natural" would repeat `methods`
    planted = planted_mask(test[test["label"] == 1])
    report["n_test_incorrect_by_kind"] = {
        "natural": int((~planted).sum()),
        "planted": int(planted.sum()),
    }
    for key in ("by_error_kind", "by_error_kind_vs_maxprob", "by_error_kind_vs_probe"):
        report[key] = {}
    for kind in ERROR_KINDS:
        mask = error_kind_mask(test, kind)
        kind_metrics = subset_metrics(
            test, mask, metrics, scores, boot, f"no {kind}-error incorrect test steps"
        )
        report["by_error_kind"][kind] = kind_metrics
        for key, entry in against(test[mask], mask, kind_metrics, "").items():
            report[f"by_error_kind_{key}"][kind] = entry
    return report


def probe_choices(fitted: dict[str, Scorer | None]) -> dict[str, Any]:
    """What the probes chose on validation: the hidden-state probe's layer, pooling and C;
    the transcoder probe's C and its top latents."""
    out: dict[str, Any] = {}
    probe, tc = fitted.get("probe"), fitted.get("tc_probe")
    if isinstance(probe, HiddenProbe):
        out["probe"] = {k: probe.info[k] for k in ("layer", "pooling", "c", "val_auroc")}
    if isinstance(tc, SparseProbe):
        out["tc_probe"] = {k: tc.info[k] for k in ("c", "val_auroc", "n_used")} | {
            "top_features": tc.info["top_features"][:10]
        }
    return out


def save_task_methods(
    out: Path, task: str, methods: list[Method], fitted: dict, temperature: float
) -> dict[str, Any] | None:
    """Save every savable fitted method of one task (or `all`); the selected.json entry of
    the one with the highest validation AUROC."""
    specs, dirs = {}, {}
    for m in methods:
        scorer = fitted.get(m.name)
        if scorer is None or not savable(m, scorer):
            continue
        path = task_methods_dir(out, task) / method_dir_name(m.name)
        specs[m.name] = save_method(path, m.name, m.spec_inputs, scorer, temperature)
        dirs[m.name] = path.relative_to(out).as_posix()
    best = select_on_validation(specs)
    if best is None:
        return None
    spec = specs[best]
    return {
        "method": best,
        "dir": dirs[best],
        "threshold": spec["threshold"],
        "val_auroc": spec["val_auroc"],
    }


def run_stage(ctx: StageContext[VerifierConfig]) -> dict[str, Any]:
    """`verifier` stage: train and evaluate CRV and every baseline; save the verifiers."""
    from crv.baselines.scores import (
        load_baseline_meta,
        load_baseline_table,
        load_hidden_states,
        load_latents,
        load_probe_inputs,
    )
    from crv.features.table import load_feature_names, load_feature_table, load_identity
    from crv.verifier.plots import plot_feature_importance, plot_roc

    cfg: VerifierConfig = ctx.cfg
    t0 = time.perf_counter()
    names = load_feature_names(ctx.inputs["features"])
    identity = load_identity(ctx.inputs["features"])
    meta = load_baseline_meta(ctx.inputs["baselines"])
    score_cols = list(meta["score_columns"])
    pooled = load_hidden_states(ctx.inputs["baselines"])
    probe_data = ProbeData(
        load_probe_inputs(ctx.inputs["baselines"]),
        HiddenInputs(*pooled) if pooled is not None else None,
        load_latents(ctx.inputs["baselines"]),
    )
    data = step_table(
        load_feature_table(ctx.inputs["features"], identity=False),
        load_baseline_table(ctx.inputs["baselines"]),
        score_cols,
    )
    methods = build_methods(cfg, names, score_cols, probe_data, ctx.seed, identity)
    ablations = ablation_methods(cfg, names, ctx.seed, identity) if cfg.ablation else []
    tasks = sorted(data["task"].unique())
    train_of = {t: data[(data["task"] == t) & (data["split"] == "train")] for t in tasks}
    test_of = {t: data[(data["task"] == t) & (data["split"] == "test")] for t in tasks}
    empty = [t for t in tasks if test_of[t].empty or train_of[t].empty]
    if not tasks or empty:
        raise CRVError(
            f"verifier: no labelled steps with graphs and baselines for task(s) {empty or 'any'} "
            "in the train or test split; an empty benchmark is not a result"
        )
    boot = (cfg.n_bootstrap, ctx.seed)

    detection: dict = {}
    per_complexity: dict = {}
    ablation: dict = {}
    crv_by_task: dict[str, Scorer | None] = {}
    selected: dict[str, Any] = {}
    baselines = [m.name for m in methods if m.name not in CRV_METHODS]
    for t in tasks:
        test = test_of[t]
        tests = {"all": test} | {str(c): g for c, g in test.groupby("complexity")}
        metrics, fitted, scores = evaluate_methods(methods, train_of[t], tests, *boot)
        base, probe = strongest(fitted, baselines), strongest(fitted, PROBE_METHODS)
        detection[t] = {
            **_counts(test),
            "n_train_steps": len(train_of[t]),
            # for choosing settings without looking at the test steps
            "crv_validation_auroc": getattr(fitted["crv"], "info", {}).get("val_auroc"),
            "validation_auroc": {
                m: (f.info.get("val_auroc") if f is not None else None) for m, f in fitted.items()
            },
            "strongest_baseline": base,
            "strongest_probe": probe,
            "probe_choice": probe_choices(fitted),
            "methods": metrics["all"],
            **task_report(
                test,
                metrics["all"],
                scores["all"],
                boot,
                base and base["method"],
                probe and probe["method"],
            ),
        }
        selected[t] = save_task_methods(ctx.out, t, methods, fitted, meta.get("temperature"))
        detection[t]["selected"] = selected[t]
        per_complexity[t] = {
            c: {**_counts(tests[c]), "methods": metrics[c]} for c in tests if c != "all"
        }
        crv_by_task[t] = fitted["crv"]
        if isinstance(fitted["crv"], XGBVerifier):
            fitted["crv"].save(ctx.out / "tasks" / t)
        if scores["all"]:
            plot_roc(
                test["label"].to_numpy(),
                scores["all"],
                f"ROC curves, {t} test steps",
                ctx.out / f"roc_{t}.png",
            )
        if ablations:
            abl, _, _ = evaluate_methods(ablations, train_of[t], {"all": test}, *boot)
            ablation[t] = {"all": metrics["all"]["crv"], **abl["all"]}
    if cfg.transfer:
        crv = next(m for m in methods if m.name == "crv")
        detection["transfer"] = transfer_matrix(crv, crv_by_task, test_of, *boot)
    pooled_train = data[data["split"] == "train"]
    metrics, fitted, _ = evaluate_methods(methods, pooled_train, test_of, *boot)
    detection["all_tasks"] = {t: {**_counts(test_of[t]), "methods": metrics[t]} for t in tasks}
    selected["all"] = save_task_methods(ctx.out, "all", methods, fitted, meta.get("temperature"))
    atomic_write_json(ctx.out / INPUTS_FILE, meta)  # what a bundle needs to build StepInputs
    atomic_write_json(
        ctx.out / SELECTED_FILE,
        {
            "format_version": FORMAT_VERSION,
            "rule": "highest validation AUROC among saved methods",
            "tasks": {t: e for t, e in selected.items() if e is not None},
        },
    )
    pooled = fitted["crv"]
    if isinstance(pooled, XGBVerifier):
        pooled.save(ctx.out)
        plot_feature_importance(pooled.importance(), ctx.out / "feature_importance.png")
        detection["threshold"] = pooled.threshold
    else:
        ctx.log.warning("verifier: no verifier saved: the training steps hold only one class")
    detection["per_complexity"] = per_complexity
    if ablations:
        detection["ablation"] = ablation
    detection["n_features"] = len(names)
    detection["n_identity_features"] = len(identity[1]) if identity else 0
    detection["n_steps"] = len(data)
    ctx.log.info(
        "verifier: %d labelled steps, %d tasks, %.1f s",
        len(data),
        len(tasks),
        time.perf_counter() - t0,
    )
    return detection
