"""The CRV verifier (xgboost on graph features) and the evaluation of every method.

**The verifier.** A gradient-boosted tree classifier (xgboost, `binary:logistic`) maps a
step's graph features to P(step incorrect). Incorrect steps are rare, so the positive
class is up-weighted by `scale_pos_weight` = (correct / incorrect training steps). A
validation part of the training split (`val_frac` of the training *traces*, drawn
separately among traces with and without an incorrect step so both parts see errors; a
trace's steps never straddle the two parts) serves two purposes:

- early stopping: boosting stops when the validation log-loss, weighted like the training
  loss (incorrect steps count `scale_pos_weight` times), has not improved for
  `early_stopping_rounds` rounds; the model keeps the best round's trees;
- the decision threshold: `max_f1` picks the score threshold with the highest F1 of the
  incorrect class on the validation steps; `recall95` the highest threshold that still
  flags 95% of the incorrect validation steps. 0.5 when validation lacks a class.

A verifier is saved as xgboost's JSON model (`model.json`) plus `verifier.json` (feature
names, threshold, the config that produced it); nothing is pickled.

**The evaluation.** Every method goes through the same path (`evaluate_methods`): fit on
the training steps (no-op for fixed scores), score the test steps, compute AUROC, AUPR and
FPR@95 with bootstrap intervals (`crv.verifier.metrics`). Methods:

- `crv`: the verifier on all graph features;
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
known label. Reported per task (train and test on the task's own splits), per
complexity
(the task's models, test steps of one complexity), the leave-one-family-out ablation of
CRV, the cross-task transfer matrix of CRV (trained on one task, tested on another; the
diagonal is the in-task result) and training on all tasks together (tested per task).
The bootstrap uses the same seed for every method on a test set, so all methods are
compared on the same resamples.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.metrics import roc_auc_score

from crv.features.stage import FAMILIES, family_of
from crv.io import atomic_write, atomic_write_json, read_json
from crv.pipeline import StageContext
from crv.verifier.config import VerifierConfig
from crv.verifier.metrics import evaluate_scores, null_metrics

POSITION_COLUMNS = ("step", "n_prefix_tokens", "complexity")
"""The only inputs of the position baseline."""

MODEL_FILE = "model.json"
META_FILE = "verifier.json"


def split_train_val(groups: np.ndarray, y: np.ndarray, val_frac: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: `val_frac` of the groups (traces), drawn separately
    among groups with and without a positive row, so no group is in both parts."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"g": groups, "y": y})
    has_pos = frame.groupby("g", sort=True)["y"].max()
    val_groups: list = []
    for flag in (0, 1):
        members = np.array(has_pos.index[has_pos.to_numpy() == flag])
        n_val = int(round(val_frac * len(members)))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) >= 2 else 0
        val_groups.extend(rng.permutation(members)[:n_val].tolist())
    return np.isin(groups, np.asarray(val_groups, dtype=groups.dtype))


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: str) -> float:
    """Decision threshold on validation probabilities (see the module docstring)."""
    if len(y) == 0 or y.min() == y.max():
        return 0.5
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last_of_tie = np.r_[ps[1:] != ps[:-1], True]
    tp = np.cumsum(ys)[last_of_tie]
    fp = np.cumsum(1 - ys)[last_of_tie]
    thresholds = ps[last_of_tie]
    if rule == "max_f1":
        f1 = 2 * tp / (tp + fp + ys.sum())
        return float(thresholds[int(np.argmax(f1))])
    if rule == "recall95":
        return float(thresholds[int(np.argmax(tp >= 0.95 * ys.sum()))])
    raise ValueError(f"unknown threshold rule {rule!r}")


class XGBVerifier:
    """xgboost step classifier over named feature columns; see the module docstring."""

    def __init__(self, cfg: VerifierConfig, feature_names: list[str], seed: int = 0) -> None:
        self.cfg = cfg
        self.feature_names = list(feature_names)
        self.seed = seed
        self.booster: xgb.Booster | None = None
        self.threshold = 0.5
        self.info: dict = {}

    def _array(self, x: np.ndarray | pd.DataFrame) -> np.ndarray:
        if isinstance(x, pd.DataFrame):
            x = x[self.feature_names]
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(
                f"expected {len(self.feature_names)} feature columns, got shape {x.shape}"
            )
        return x

    def _matrix(self, x: np.ndarray, **kw) -> xgb.DMatrix:
        return xgb.DMatrix(
            self._array(x), feature_names=self.feature_names, nthread=self.cfg.n_threads, **kw
        )

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> XGBVerifier:
        cfg = self.cfg
        val = split_train_val(groups, y, cfg.val_frac, self.seed)
        val_auroc = None
        tr = ~val
        n_pos = int(y[tr].sum())
        spw = (len(y[tr]) - n_pos) / max(n_pos, 1)
        params = {
            "objective": "binary:logistic",
            "eval_metric": "logloss",
            "max_depth": cfg.max_depth,
            "eta": cfg.learning_rate,
            "subsample": cfg.subsample,
            "colsample_bytree": cfg.colsample_bytree,
            "min_child_weight": cfg.min_child_weight,
            "scale_pos_weight": spw,
            "nthread": cfg.n_threads,
            "seed": self.seed,
        }
        dtrain = self._matrix(x[tr], label=y[tr])
        if val.any():
            dval = self._matrix(x[val], label=y[val], weight=np.where(y[val] == 1, spw, 1.0))
            booster = xgb.train(
                params,
                dtrain,
                cfg.n_estimators,
                evals=[(dval, "val")],
                early_stopping_rounds=cfg.early_stopping_rounds,
                verbose_eval=False,
            )
            booster = booster[: booster.best_iteration + 1]
            self.booster = booster
            p_val = self.predict_proba(x[val])
            self.threshold = choose_threshold(y[val], p_val, cfg.threshold_rule)
            if 0 < y[val].sum() < len(p_val):
                val_auroc = float(roc_auc_score(y[val], p_val))
        else:
            self.booster = xgb.train(params, dtrain, cfg.n_estimators, verbose_eval=False)
        self.info = {
            "n_train": int(tr.sum()),
            "n_val": int(val.sum()),
            "n_train_traces": int(len(np.unique(groups[tr]))),
            "n_val_traces": int(len(np.unique(groups[val]))),
            "scale_pos_weight": spw,
            "n_trees": self.booster.num_boosted_rounds(),
            "val_auroc": val_auroc,
        }
        return self

    def predict_proba(self, x: np.ndarray | pd.DataFrame) -> np.ndarray:
        """P(incorrect) of each row; a DataFrame is read by `feature_names`."""
        if self.booster is None:
            raise RuntimeError("verifier is not fitted")
        return self.booster.inplace_predict(self._array(x), validate_features=False)

    score = predict_proba

    def importance(self) -> dict[str, float]:
        """Total gain of each feature over the trees (0 for unused features)."""
        gain = self.booster.get_score(importance_type="total_gain") if self.booster else {}
        return {n: float(gain.get(n, 0.0)) for n in self.feature_names}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        raw = bytes(self.booster.save_raw(raw_format="json"))
        atomic_write(path / MODEL_FILE, lambda p: p.write_bytes(raw))
        meta = {
            "feature_names": self.feature_names,
            "threshold": self.threshold,
            "seed": self.seed,
            "config": dataclasses.asdict(self.cfg),
            "info": self.info,
        }
        atomic_write_json(path / META_FILE, meta)


def load_verifier(path: str | Path, task: str | None = None) -> XGBVerifier:
    """A saved verifier: the one trained on all tasks, or the one of `task`."""
    path = Path(path) if task is None else Path(path) / "tasks" / task
    meta = read_json(path / META_FILE)
    v = XGBVerifier(VerifierConfig(**meta["config"]), meta["feature_names"], meta["seed"])
    v.booster = xgb.Booster()
    v.booster.load_model(bytearray((path / MODEL_FILE).read_bytes()))
    v.threshold = float(meta["threshold"])
    v.info = meta["info"]
    return v


class Scorer(Protocol):
    """What every method is: fit on training rows, score test rows (higher = incorrect)."""

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> Scorer: ...

    def score(self, x: np.ndarray) -> np.ndarray: ...


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
    inputs: Callable[[pd.DataFrame], np.ndarray]
    make: Callable[[], Scorer]


def column_inputs(columns: list[str] | tuple[str, ...]) -> Callable[[pd.DataFrame], np.ndarray]:
    return lambda df: df[list(columns)].to_numpy(dtype=np.float64)


def build_methods(
    cfg: VerifierConfig,
    feature_names: list[str],
    score_columns: list[str],
    hidden: np.ndarray,
    seed: int,
) -> list[Method]:
    """CRV, position, every fixed score present and the two probes, in report order."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    def probe_inputs(df: pd.DataFrame) -> np.ndarray:
        return hidden[df["hidden_row"].to_numpy()]

    methods = [
        Method("crv", column_inputs(feature_names), lambda: XGBVerifier(cfg, feature_names, seed)),
        Method(
            "position",
            column_inputs(POSITION_COLUMNS),
            lambda: XGBVerifier(cfg, list(POSITION_COLUMNS), seed),
        ),
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


def ablation_methods(cfg: VerifierConfig, feature_names: list[str], seed: int) -> list[Method]:
    """CRV without each feature family (leave-one-family-out)."""
    out = []
    for fam in FAMILIES:
        kept = [n for n in feature_names if family_of(n) != fam]
        out.append(
            Method(
                f"without_{fam}",
                column_inputs(kept),
                lambda kept=kept: XGBVerifier(cfg, kept, seed),
            )
        )
    return out


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
    """Labelled steps present in both tables: the feature table plus the baseline scores and
    `hidden_row` (row of the step in the baselines' probe inputs)."""
    b = baselines[["step_id", *score_columns]].assign(hidden_row=np.arange(len(baselines)))
    data = features.merge(b, on="step_id", how="inner", validate="one_to_one")
    return data[data["label"] >= 0].reset_index(drop=True)


def _counts(df: pd.DataFrame) -> dict[str, int]:
    return {"n_test_steps": len(df), "n_test_incorrect": int((df["label"] == 1).sum())}


def run_stage(ctx: StageContext[VerifierConfig]) -> dict[str, Any]:
    """`verifier` stage: train and evaluate CRV and every baseline; save the verifiers."""
    from crv.baselines.stage import load_baseline_meta, load_baseline_table, load_probe_inputs
    from crv.features.stage import load_feature_names, load_feature_table
    from crv.verifier.plots import plot_feature_importance, plot_roc

    cfg: VerifierConfig = ctx.cfg
    t0 = time.perf_counter()
    names = load_feature_names(ctx.inputs["features"])
    score_cols = list(load_baseline_meta(ctx.inputs["baselines"])["score_columns"])
    hidden = load_probe_inputs(ctx.inputs["baselines"])
    data = step_table(
        load_feature_table(ctx.inputs["features"]),
        load_baseline_table(ctx.inputs["baselines"]),
        score_cols,
    )
    methods = build_methods(cfg, names, score_cols, hidden, ctx.seed)
    ablations = ablation_methods(cfg, names, ctx.seed) if cfg.ablation else []
    tasks = sorted(data["task"].unique())
    train_of = {t: data[(data["task"] == t) & (data["split"] == "train")] for t in tasks}
    test_of = {t: data[(data["task"] == t) & (data["split"] == "test")] for t in tasks}
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
    detection["n_steps"] = len(data)
    ctx.log.info(
        "verifier: %d labelled steps, %d tasks, %.1f s",
        len(data),
        len(tasks),
        time.perf_counter() - t0,
    )
    return detection
