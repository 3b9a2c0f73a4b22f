"""The `verifier` stage: train the CRV verifier and evaluate it against every baseline.

Every method goes through the same path (`evaluate_methods`): fit on the training steps
(no-op for fixed scores), score the test steps, compute AUROC, AUPR and FPR@95 with
bootstrap intervals (`crv.verifier.metrics`). Methods:

- `crv`: the verifier (`crv.verifier.classifier`) on all graph features (the identity
  family included when the features artifact has it);
- `crv+confidence`: the same classifier on the graph features plus the confidence
  baselines' scores (`CONFIDENCE_COLUMNS` present): does the graph add to confidence?
- `position`: the same classifier on the step's index, `n_prefix_tokens` (the explained
  position + 1: tokens up to the one whose prediction the step's graph explains, by default
  the least confident one, not the step's end) and the problem's complexity only (how
  much is explained by *where* a step is);
- fixed scores from the `baselines` stage: `maxprob`, `perplexity`, `entropy`,
  `temperature`, `energy` (and `coe_r`, `coe_c` when present);
- `lr_probe`: logistic regression (L2, balanced class weights) and `mlp_probe`: an MLP
  (ReLU, Adam, fixed epochs so that no step-level validation split is needed; unweighted
  classes, as scikit-learn's MLP has no class weights), both on standardised
  step-averaged hidden states at the baselines' `probe_layer`.

All methods are compared on the same steps: those with a graph, a baseline row and a
known label. Reported per task (train and test on the task's own splits):

- every method's metrics on the test steps;
- `paired.<crv | crv+confidence>`: AUROC difference against the best baseline (the
  non-CRV method with the highest test AUROC, named in `baseline`), 95% interval from a
  bootstrap resampling test *traces*, the same resamples for both methods;
- `confident_half.<method>`: metrics on the half of the test steps the model was most sure
  of (the lowest `maxprob` scores, i.e. highest mean max-probability; ties broken by row
  order), where confidence by construction separates little;
- `by_error_kind.<natural | planted>.<method>`: natural errors (incorrect steps with no
  planted rule) or planted errors (incorrect steps exercising a planted bug) against all
  correct test steps; null entries with a reason when a kind has no incorrect test step.
  Only for a task whose test steps exercise planted rules (crv-tiny-bugs): without them the
  natural block would repeat the methods' own metrics.
- `by_error_kind_vs_maxprob.<natural | planted>.<crv method>`: {diff, ci} of the CRV
  methods against MaxProb on the same steps, trace bootstrap;

Also per complexity (the task's models, test steps of one complexity), the
leave-one-family-out ablation of CRV, the cross-task transfer matrix of CRV (trained on one
task, tested on another; the diagonal is the in-task result) and training on all tasks
together (tested per task). The bootstrap uses the same seed for every method on a test
set, so all methods are compared on the same resamples.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix

from crv.errors import CRVError
from crv.features.stage import FAMILIES, family_of
from crv.pipeline import StageContext
from crv.verifier.classifier import Matrix, XGBVerifier, feature_matrix
from crv.verifier.config import VerifierConfig
from crv.verifier.metrics import (
    ERROR_KINDS,
    evaluate_scores,
    null_metrics,
    paired_auroc_difference,
)

POSITION_COLUMNS = ("step", "n_prefix_tokens", "complexity")
"""The only inputs of the position baseline."""

CONFIDENCE_COLUMNS = ("maxprob", "perplexity", "entropy", "temperature", "energy")
"""Baseline scores added to the graph features by `crv+confidence`."""

CRV_METHODS = ("crv", "crv+confidence")
"""Methods that read the graph; every other method is a baseline for the paired test."""


class Scorer(Protocol):
    """What every method is: fit on training rows, score test rows (higher = incorrect)."""

    def fit(self, x: Matrix, y: np.ndarray, groups: np.ndarray) -> Scorer: ...

    def score(self, x: Matrix) -> np.ndarray: ...


class FixedScore:
    """A precomputed score column; nothing to fit."""

    trained = False

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> FixedScore:
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return x[:, 0]


class SklearnProbe:
    """A scikit-learn classifier on standardised inputs; score = P(incorrect)."""

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> SklearnProbe:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), self.make())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(x, y)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(x)[:, 1]


@dataclass
class Method:
    """A named method: how to read its inputs from the step table, how to build a scorer."""

    name: str
    inputs: Callable[[pd.DataFrame], Matrix]
    make: Callable[[], Scorer]


def column_inputs(
    columns: list[str] | tuple[str, ...], identity: csr_matrix | None = None
) -> Callable[[pd.DataFrame], Matrix]:
    """Inputs read from step-table columns, followed by the rows (`feature_row`) of the
    identity block when one is given."""

    def inputs(df: pd.DataFrame) -> Matrix:
        dense = df[list(columns)].to_numpy(dtype=np.float64)
        if identity is None:
            return dense
        return feature_matrix(dense, identity[df["feature_row"].to_numpy()])

    return inputs


def graph_method(
    name: str,
    cfg: VerifierConfig,
    columns: list[str],
    identity: tuple[csr_matrix, list[str]] | None,
    seed: int,
) -> Method:
    """The xgboost verifier on step-table `columns` plus the identity block, if any."""
    matrix, id_names = identity or (None, [])
    names = [*columns, *id_names]
    return Method(name, column_inputs(columns, matrix), lambda: XGBVerifier(cfg, names, seed))


def build_methods(
    cfg: VerifierConfig,
    feature_names: list[str],
    score_columns: list[str],
    hidden: np.ndarray,
    seed: int,
    identity: tuple[csr_matrix, list[str]] | None = None,
) -> list[Method]:
    """CRV, CRV + confidence, position, every fixed score present and the two probes, in
    report order. `identity`: the features' identity block (rows = `feature_row`), names."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    def probe_inputs(df: pd.DataFrame) -> np.ndarray:
        return hidden[df["hidden_row"].to_numpy()]

    confidence = [c for c in CONFIDENCE_COLUMNS if c in score_columns]
    methods = [graph_method("crv", cfg, list(feature_names), identity, seed)]
    if confidence:
        methods.append(
            graph_method("crv+confidence", cfg, [*feature_names, *confidence], identity, seed)
        )
    methods += [
        Method(
            "position",
            column_inputs(POSITION_COLUMNS),
            lambda: XGBVerifier(cfg, list(POSITION_COLUMNS), seed),
        )
    ]
    methods += [Method(c, column_inputs([c]), FixedScore) for c in score_columns]
    methods += [
        Method(
            "lr_probe",
            probe_inputs,
            lambda: SklearnProbe(
                lambda: LogisticRegression(C=cfg.lr_probe_c, class_weight="balanced", max_iter=2000)
            ),
        ),
        Method(
            "mlp_probe",
            probe_inputs,
            lambda: SklearnProbe(
                lambda: MLPClassifier(
                    hidden_layer_sizes=tuple(cfg.mlp_probe_hidden),
                    alpha=cfg.mlp_probe_alpha,
                    max_iter=cfg.mlp_probe_max_iter,
                    random_state=seed,
                )
            ),
        ),
    ]
    return methods


def ablation_methods(
    cfg: VerifierConfig,
    feature_names: list[str],
    seed: int,
    identity: tuple[csr_matrix, list[str]] | None = None,
) -> list[Method]:
    """CRV without each feature family present (leave-one-family-out)."""
    present = {family_of(n) for n in feature_names} | ({"identity"} if identity else set())
    return [
        graph_method(
            f"without_{fam}",
            cfg,
            [n for n in feature_names if family_of(n) != fam],
            None if fam == "identity" else identity,
            seed,
        )
        for fam in FAMILIES
        if fam in present
    ]


def fit_method(method: Method, train: pd.DataFrame) -> tuple[Scorer | None, str | None]:
    """Fit a method on training steps; (None, reason) when it cannot be trained."""
    scorer = method.make()
    y = train["label"].to_numpy(dtype=np.int64)
    if getattr(scorer, "trained", True) and (len(y) == 0 or y.min() == y.max()):
        return None, "the training steps hold only one class"
    return scorer.fit(method.inputs(train), y, train["trace_id"].to_numpy()), None


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


def best_baseline(metrics: dict[str, dict]) -> str | None:
    """The non-CRV method with the highest AUROC (None when none has one)."""
    aurocs = {
        m: e["auroc"] for m, e in metrics.items() if m not in CRV_METHODS and e["auroc"] is not None
    }
    return max(aurocs, key=aurocs.__getitem__) if aurocs else None


def paired_against_best(
    test: pd.DataFrame,
    metrics: dict[str, dict],
    scores: dict[str, np.ndarray],
    boot: tuple,
    base: str | None = None,
) -> dict[str, dict]:
    """`paired.<crv method>`: AUROC difference against `base` (default: the best
    baseline), with a bootstrap that resamples traces."""
    base = base or best_baseline(metrics)
    out: dict[str, dict] = {}
    for m in CRV_METHODS:
        if m not in metrics:
            continue
        if base is None or m not in scores or metrics[m]["auroc"] is None:
            reason = metrics[m].get("reason") or "no baseline has a test AUROC"
            out[m] = {"diff": None, "ci": None, "baseline": base, "reason": reason}
            continue
        y, groups = test["label"].to_numpy(), test["trace_id"].to_numpy()
        diff = paired_auroc_difference(y, scores[m], scores[base], groups, *boot)
        out[m] = {**diff, "baseline": base}
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


def task_report(test: pd.DataFrame, metrics: dict, scores: dict, boot: tuple) -> dict:
    """The paired, confident-half and by-error-kind entries of one task's test steps."""
    report: dict = {"paired": paired_against_best(test, metrics, scores, boot)}
    if "maxprob" in test.columns:
        half = confident_half(test)
        report["confident_half_counts"] = _counts(test[half])
        report["confident_half"] = subset_metrics(
            test, half, metrics, scores, boot, "no incorrect step in the confident half"
        )
    if not planted_mask(test).any():
        return report  # a subject without planted rules: "natural" would repeat `methods`
    planted = planted_mask(test[test["label"] == 1])
    report["n_test_incorrect_by_kind"] = {
        "natural": int((~planted).sum()),
        "planted": int(planted.sum()),
    }
    report["by_error_kind"], report["by_error_kind_vs_maxprob"] = {}, {}
    for kind in ERROR_KINDS:
        mask = error_kind_mask(test, kind)
        kind_metrics = subset_metrics(
            test, mask, metrics, scores, boot, f"no {kind}-error incorrect test steps"
        )
        report["by_error_kind"][kind] = kind_metrics
        if "maxprob" in scores:  # planted errors are confident: is the graph above MaxProb?
            report["by_error_kind_vs_maxprob"][kind] = paired_against_best(
                test[mask], kind_metrics, {m: sc[mask] for m, sc in scores.items()}, boot, "maxprob"
            )
    return report


def run_stage(ctx: StageContext[VerifierConfig]) -> dict[str, Any]:
    """`verifier` stage: train and evaluate CRV and every baseline; save the verifiers."""
    from crv.baselines.stage import load_baseline_meta, load_baseline_table, load_probe_inputs
    from crv.features.stage import load_feature_names, load_feature_table, load_identity
    from crv.verifier.plots import plot_feature_importance, plot_roc

    cfg: VerifierConfig = ctx.cfg
    t0 = time.perf_counter()
    names = load_feature_names(ctx.inputs["features"])
    identity = load_identity(ctx.inputs["features"])
    score_cols = list(load_baseline_meta(ctx.inputs["baselines"])["score_columns"])
    hidden = load_probe_inputs(ctx.inputs["baselines"])
    data = step_table(
        load_feature_table(ctx.inputs["features"], identity=False),
        load_baseline_table(ctx.inputs["baselines"]),
        score_cols,
    )
    methods = build_methods(cfg, names, score_cols, hidden, ctx.seed, identity)
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
    for t in tasks:
        test = test_of[t]
        tests = {"all": test} | {str(c): g for c, g in test.groupby("complexity")}
        metrics, fitted, scores = evaluate_methods(methods, train_of[t], tests, *boot)
        detection[t] = {
            **_counts(test),
            "n_train_steps": len(train_of[t]),
            # for choosing settings without looking at the test steps
            "crv_validation_auroc": getattr(fitted["crv"], "info", {}).get("val_auroc"),
            "methods": metrics["all"],
            **task_report(test, metrics["all"], scores["all"], boot),
        }
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
