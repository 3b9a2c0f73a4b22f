"""Every method the verifier stage compares, and the saved form a bundle ships (library).

A method is a named way to read a step's inputs and a scorer that is fit on training
steps and scores steps (higher = more likely incorrect). Every scorer also reports, in
`info`, its AUROC on the validation part of the training split (`split_train_val`: the
same traces for every method, the ones xgboost stops early on) and a decision threshold
chosen there, so that methods are compared and chosen without a test step:

- `FixedScore`: a precomputed baseline column (MaxProb, entropy, ...); nothing to fit.
- `SklearnProbe`: a scikit-learn classifier on standardised inputs (the fixed-layer
  `lr_probe` and `mlp_probe`); fit on the training part for validation, then refit on all
  training steps.
- `HiddenProbe` (`probe`): logistic regression on the hidden states of one layer pooled one
  way; the layer (every hidden-state output kept by the baselines), the pooling (mean,
  last token, max) and the L2 strength C (`probe_c_grid`) are the combination with the
  highest validation AUROC, then refit on all training steps.
- `SparseProbe` (`tc_probe`): L1 logistic regression on the transcoder latents of every
  layer pooled the three ways at once (max-abs scaled, so zeros stay zeros); C chosen on
  validation (`tc_probe_c_grid`); it names the latents it uses (`top_features`).
- `XGBVerifier` (`crv.verifier.classifier`): the graph-feature methods.
- `StackedVerifier`: xgboost on step-table columns plus the scores of probes ("parts").
  For the training steps those scores are out-of-fold (`stack_folds` folds of whole
  traces, each part fit, its own choices included, without the fold it scores), so the
  stacked model never learns from a probe score of a step the probe was fit on; for new
  steps the parts are fit on all training steps.

Saved form (docs/verifier_methods.md): `save_method` writes a method's `spec.json` and its
model (xgboost JSON or a JSON of logistic coefficients, never a pickle); `load_method` and
`selected_method` read them back as a `SavedMethod`, whose `score(StepInputs)` is what a
bundle calls.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix, hstack, issparse

from crv.baselines.scores import POOLINGS, LatentLayout, temperature_scores
from crv.errors import CRVError
from crv.features.compute import FAMILIES, family_of
from crv.io import atomic_write_json, read_json
from crv.verifier.classifier import (
    Matrix,
    XGBVerifier,
    choose_threshold,
    explicit_csr,
    feature_matrix,
    frame_matrix,
    load_verifier,
    split_train_val,
)
from crv.verifier.config import VerifierConfig

POSITION_COLUMNS = ("step", "n_prefix_tokens", "complexity")
"""The only inputs of the position baseline."""

CONFIDENCE_COLUMNS = ("maxprob", "perplexity", "entropy", "temperature", "energy")
"""Baseline scores added to the graph features by `crv+confidence` and `crv+probes`."""

CRV_METHODS = ("crv", "crv+confidence", "crv+probes")
"""Methods that read the graph; every other method is a baseline for the paired test."""

PROBE_METHODS = ("probe", "tc_probe", "lr_probe", "mlp_probe")
"""Methods that read the subject's internals without a graph: the strongest of them is
what `by_error_kind_vs_probe` compares against."""

STACK_PARTS = ("probe", "tc_probe")
"""The probes whose scores the stacked methods read."""

SPEC_FILE = "spec.json"
LOGISTIC_FILE = "logistic.json"
SELECTED_FILE = "selected.json"
INPUTS_FILE = "inputs.json"
"""The baselines' metadata (temperature, grid, hidden layers, latent layout) the saved
methods were trained with, copied into the verifier artifact."""
METHODS_DIR = "methods"
FORMAT_VERSION = 1


class MethodError(CRVError):
    """A saved method that cannot be read or does not fit the inputs it is given."""


class Scorer(Protocol):
    """What every method is: fit on training rows, score rows (higher = incorrect).
    `info` holds at least `val_auroc` and `threshold` after `fit`."""

    info: dict

    def fit(self, x: Any, y: np.ndarray, groups: np.ndarray) -> Scorer: ...

    def score(self, x: Any) -> np.ndarray: ...


def validation_info(y_val: np.ndarray, p_val: np.ndarray, rule: str) -> dict[str, Any]:
    """`val_auroc` (None without both classes) and the `threshold` chosen on validation."""
    from sklearn.metrics import roc_auc_score

    both = len(y_val) > 0 and 0 < y_val.sum() < len(y_val)
    return {
        "val_auroc": float(roc_auc_score(y_val, p_val)) if both else None,
        "threshold": choose_threshold(y_val, p_val, rule),
    }


def _rows(x: Any, mask: np.ndarray) -> Any:
    return x[np.flatnonzero(mask)] if issparse(x) else x[mask]


class FixedScore:
    """A precomputed score column; nothing to fit."""

    trained = False

    def __init__(self, cfg: VerifierConfig, seed: int) -> None:
        self.cfg, self.seed, self.info = cfg, seed, {}

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> FixedScore:
        val = split_train_val(groups, y, self.cfg.val_frac, self.seed)
        self.info = validation_info(y[val], self.score(x[val]), self.cfg.threshold_rule)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x[:, 0], dtype=np.float64)


def _quiet_fit(model: Any, x: Any, y: np.ndarray) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


class SklearnProbe:
    """A scikit-learn classifier on standardised inputs; score = P(incorrect). Fit on the
    training part for `info`, then on all training rows."""

    def __init__(self, make: Callable[[], object], cfg: VerifierConfig, seed: int) -> None:
        self.make, self.cfg, self.seed, self.info = make, cfg, seed, {}

    def _fit(self, x: np.ndarray, y: np.ndarray) -> Any:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return _quiet_fit(make_pipeline(StandardScaler(), self.make()), x, y)

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> SklearnProbe:
        val = split_train_val(groups, y, self.cfg.val_frac, self.seed)
        if val.any() and len(np.unique(y[~val])) == 2:
            p_val = self._fit(x[~val], y[~val]).predict_proba(x[val])[:, 1]
            self.info = validation_info(y[val], p_val, self.cfg.threshold_rule)
        else:
            self.info = {"val_auroc": None, "threshold": 0.5}
        self.model = self._fit(x, y)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(x)[:, 1]


@dataclass
class Logistic:
    """A fitted logistic regression on scaled inputs: sigmoid(((x - mean) / scale) . coef + b)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def decision(self, x: Matrix) -> np.ndarray:
        if issparse(x):  # mean is 0 for sparse inputs (max-abs scaling)
            return np.asarray(x @ (self.coef / self.scale)).ravel() + self.intercept
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef + (
            self.intercept
        )

    def score(self, x: Matrix) -> np.ndarray:
        return 1 / (1 + np.exp(-self.decision(x)))

    def to_json(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": float(self.intercept),
        }

    @classmethod
    def from_json(cls, d: dict) -> Logistic:
        arrays = [np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "coef")]
        if len({len(a) for a in arrays}) != 1:
            raise MethodError("logistic.json: mean, scale and coef differ in length")
        return cls(*arrays, float(d["intercept"]))


def fit_logistic(x: Matrix, y: np.ndarray, c: float, l1: bool, seed: int) -> Logistic:
    """Balanced-class logistic regression on standardised (dense) or max-abs scaled
    (sparse) inputs; L1 (liblinear) or L2 (lbfgs)."""
    from sklearn.linear_model import LogisticRegression

    if issparse(x):
        scale = np.asarray(abs(x).max(axis=0).todense()).ravel()
        mean = np.zeros(x.shape[1])
    else:
        mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    xs = x.multiply(1 / scale).tocsr() if issparse(x) else (x - mean) / scale
    kw = {"l1_ratio": 1.0, "solver": "liblinear"} if l1 else {"solver": "lbfgs"}
    lr = _quiet_fit(
        LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed, **kw),
        xs,
        y,
    )
    return Logistic(mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]))


@dataclass
class HiddenInputs:
    """Pooled hidden states [n, len(POOLINGS), len(layers), D] and their layer indices."""

    hidden: np.ndarray
    layers: list[int]

    def __getitem__(self, rows: np.ndarray) -> HiddenInputs:
        return HiddenInputs(self.hidden[rows], self.layers)

    def __len__(self) -> int:
        return len(self.hidden)

    def at(self, layer: int, pooling: str) -> np.ndarray:
        """[n, D] float64: one layer pooled one way."""
        p, i = POOLINGS.index(pooling), self.layers.index(layer)
        return self.hidden[:, p, i].astype(np.float64)


class HiddenProbe:
    """`probe`: logistic regression on the hidden states of the layer, pooling and C chosen
    on validation (module docstring)."""

    def __init__(self, cfg: VerifierConfig, seed: int) -> None:
        self.cfg, self.seed, self.info = cfg, seed, {}

    def fit(self, x: HiddenInputs, y: np.ndarray, groups: np.ndarray) -> HiddenProbe:
        val = split_train_val(groups, y, self.cfg.val_frac, self.seed)
        grid = []
        for layer in x.layers:
            for pooling in POOLINGS:
                xs = x.at(layer, pooling)
                for c in self.cfg.probe_c_grid:
                    grid.append(self._candidate(xs, y, val, (layer, pooling, c)))
        best = max(grid, key=lambda g: -1.0 if g["val_auroc"] is None else g["val_auroc"])
        self.layer, self.pooling, self.c = best["layer"], best["pooling"], best["c"]
        self.model = fit_logistic(x.at(self.layer, self.pooling), y, self.c, False, self.seed)
        self.info = {**best, "grid": grid}
        return self

    def _candidate(self, xs: np.ndarray, y: np.ndarray, val: np.ndarray, key: tuple) -> dict:
        layer, pooling, c = key
        out: dict[str, Any] = {"layer": layer, "pooling": pooling, "c": c}
        if not val.any() or len(np.unique(y[~val])) < 2:
            return {**out, "val_auroc": None, "threshold": 0.5}
        model = fit_logistic(xs[~val], y[~val], c, False, self.seed)
        return {**out, **validation_info(y[val], model.score(xs[val]), self.cfg.threshold_rule)}

    def score(self, x: HiddenInputs) -> np.ndarray:
        return self.model.score(x.at(self.layer, self.pooling))

    def saved(self) -> tuple[dict, Logistic]:
        """The spec inputs and model of the fitted probe."""
        return {"hidden": {"layer": self.layer, "pooling": self.pooling}}, self.model


class SparseProbe:
    """`tc_probe`: L1 logistic regression on the pooled transcoder latents, C chosen on
    validation; names the latents it uses (`top_features`)."""

    def __init__(self, cfg: VerifierConfig, layout: LatentLayout, seed: int) -> None:
        self.cfg, self.layout, self.seed, self.info = cfg, layout, seed, {}

    def fit(self, x: csr_matrix, y: np.ndarray, groups: np.ndarray) -> SparseProbe:
        val = split_train_val(groups, y, self.cfg.val_frac, self.seed)
        grid = []
        for c in self.cfg.tc_probe_c_grid:
            entry: dict[str, Any] = {"c": c, "val_auroc": None, "threshold": 0.5}
            if val.any() and len(np.unique(y[~val])) == 2:
                model = fit_logistic(_rows(x, ~val), y[~val], c, True, self.seed)
                p_val = model.score(_rows(x, val))
                entry |= validation_info(y[val], p_val, self.cfg.threshold_rule)
                entry["n_used"] = int(np.count_nonzero(model.coef))
            grid.append(entry)
        best = max(grid, key=lambda g: -1.0 if g["val_auroc"] is None else g["val_auroc"])
        self.c = best["c"]
        self.model = fit_logistic(x, y, self.c, True, self.seed)
        self.info = {**best, "grid": grid, "n_used": len(self.used()), "top_features": self.top()}
        return self

    def used(self) -> np.ndarray:
        """Columns with a non-zero coefficient, largest |coef| first."""
        nz = np.flatnonzero(self.model.coef)
        return nz[np.argsort(-np.abs(self.model.coef[nz]), kind="stable")]

    def top(self, n: int = 20) -> list[dict]:
        """The `n` latents with the largest |coefficient| (on max-abs scaled inputs)."""
        out = []
        for col in self.used()[:n]:
            layer, latent, pooling = self.layout.describe(col)
            coef = float(self.model.coef[col])
            out.append({"layer": layer, "latent": latent, "pooling": pooling, "coef": coef})
        return out

    def score(self, x: csr_matrix) -> np.ndarray:
        return self.model.score(x)

    def saved(self) -> tuple[dict, Logistic]:
        """Spec inputs (the used latents) and the model restricted to them."""
        cols = self.used()
        latents = [list(self.layout.describe(c)) for c in cols]
        m = self.model
        return {"latents": latents}, Logistic(
            m.mean[cols], m.scale[cols], m.coef[cols], m.intercept
        )


@dataclass
class StackInputs:
    """A stacked method's inputs: its step-table columns and each part's inputs."""

    base: Matrix
    parts: dict[str, Any]

    def __getitem__(self, rows: np.ndarray) -> StackInputs:
        return StackInputs(_rows(self.base, rows), {k: v[rows] for k, v in self.parts.items()})

    def __len__(self) -> int:
        return self.base.shape[0]


def _with_columns(base: Matrix, extra: np.ndarray) -> Matrix:
    if issparse(base):
        return hstack([base, explicit_csr(extra)], format="csr")
    return np.hstack([base, extra])


class StackedVerifier:
    """xgboost on columns + out-of-fold part scores (module docstring)."""

    def __init__(
        self,
        cfg: VerifierConfig,
        names: list[str],
        parts: dict[str, Callable[[], Scorer]],
        seed: int,
        memo: dict,
    ) -> None:
        self.cfg, self.names, self.make_parts, self.seed, self.memo = cfg, names, parts, seed, memo
        self.info: dict = {}

    def _fit_part(self, name: str, x: Any, y: np.ndarray, groups: np.ndarray) -> Scorer:
        """A part fit on these rows; the same fit is shared by every stacked method."""
        digest = hashlib.sha1(np.asarray(groups).astype(str).tobytes() + y.tobytes()).hexdigest()
        key = (name, digest)
        if key not in self.memo:
            self.memo[key] = self.make_parts[name]().fit(x, y, groups)
        return self.memo[key]

    def out_of_fold(self, x: StackInputs, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """[n, n_parts] part scores, each row scored by parts fit without its trace's fold."""
        from sklearn.model_selection import GroupKFold

        n_folds = min(self.cfg.stack_folds, len(np.unique(groups)))
        oof = np.zeros((len(y), len(self.make_parts)))
        for tr, te in GroupKFold(n_splits=n_folds).split(np.zeros(len(y)), y, groups):
            for j, name in enumerate(self.make_parts):
                if len(np.unique(y[tr])) < 2:
                    oof[te, j] = 0.5
                    continue
                part = self._fit_part(name, x.parts[name][tr], y[tr], groups[tr])
                oof[te, j] = part.score(x.parts[name][te])
        return oof

    def fit(self, x: StackInputs, y: np.ndarray, groups: np.ndarray) -> StackedVerifier:
        oof = self.out_of_fold(x, y, groups)
        self.parts = {
            name: self._fit_part(name, x.parts[name], y, groups) for name in self.make_parts
        }
        names = [*self.names, *(f"{p}_score" for p in self.make_parts)]
        self.xgb = XGBVerifier(self.cfg, names, self.seed).fit(
            _with_columns(x.base, oof), y, groups
        )
        self.info = {**self.xgb.info, "threshold": self.xgb.threshold, "parts": list(self.parts)}
        return self

    def score(self, x: StackInputs) -> np.ndarray:
        cols = np.stack([p.score(x.parts[n]) for n, p in self.parts.items()], axis=1)
        return self.xgb.score(_with_columns(x.base, cols))


@dataclass
class Method:
    """A named method: how to read its inputs from the step table, how to build a scorer,
    and what its spec records about the inputs (`features`, `scores`)."""

    name: str
    inputs: Callable[[pd.DataFrame], Any]
    make: Callable[[], Scorer]
    spec_inputs: dict = field(default_factory=dict)


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
    score_columns: tuple[str, ...] = (),
) -> Method:
    """The xgboost verifier on step-table `columns` plus the identity block, if any; the
    spec counts the `score_columns` among them as baseline scores, the rest as graph
    features."""
    matrix, id_names = identity or (None, [])
    names = [*columns, *id_names]
    features = [c for c in columns if c not in score_columns]
    spec = {"features": [*features, *id_names], "scores": list(score_columns)}
    return Method(name, column_inputs(columns, matrix), lambda: XGBVerifier(cfg, names, seed), spec)


@dataclass
class ProbeData:
    """The baselines' probe inputs, rows = the baseline table's (`hidden_row`)."""

    probe: np.ndarray
    """Mean-pooled hidden state at `probe_layer` [n, D] (`lr_probe`, `mlp_probe`)."""
    hidden: HiddenInputs | None = None
    latents: tuple[csr_matrix, LatentLayout] | None = None


def build_methods(
    cfg: VerifierConfig,
    feature_names: list[str],
    score_columns: list[str],
    data: ProbeData,
    seed: int,
    identity: tuple[csr_matrix, list[str]] | None = None,
) -> list[Method]:
    """CRV, CRV + confidence, CRV + probes, position, every fixed score present, the probes
    and probes + confidence, in report order. `identity`: the features' identity block
    (rows = `feature_row`), names."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    def rows(df: pd.DataFrame) -> np.ndarray:
        return df["hidden_row"].to_numpy()

    confidence = tuple(c for c in CONFIDENCE_COLUMNS if c in score_columns)
    parts: dict[str, Callable[[], Scorer]] = {}
    part_inputs: dict[str, Callable[[pd.DataFrame], Any]] = {}
    if data.hidden is not None:
        parts["probe"] = lambda: HiddenProbe(cfg, seed)
        part_inputs["probe"] = lambda df: data.hidden[rows(df)]
    if data.latents is not None:
        latents, layout = data.latents
        parts["tc_probe"] = lambda: SparseProbe(cfg, layout, seed)
        part_inputs["tc_probe"] = lambda df: latents[rows(df)]
    memo: dict = {}  # part fits shared by the stacked methods of one training set

    def stacked(name: str, columns: list[str], with_identity: bool) -> Method:
        base = graph_method(
            name,
            cfg,
            [*columns, *confidence],
            identity if with_identity else None,
            seed,
            confidence,
        )

        def inputs(df: pd.DataFrame) -> StackInputs:
            return StackInputs(base.inputs(df), {p: f(df) for p, f in part_inputs.items()})

        names = [*columns, *confidence, *(identity[1] if with_identity and identity else [])]
        spec = {**base.spec_inputs, "parts": list(parts)}
        return Method(name, inputs, lambda: StackedVerifier(cfg, names, parts, seed, memo), spec)

    methods = [graph_method("crv", cfg, list(feature_names), identity, seed)]
    if confidence:
        methods.append(
            graph_method(
                "crv+confidence", cfg, [*feature_names, *confidence], identity, seed, confidence
            )
        )
    if parts and confidence:
        methods.append(stacked("crv+probes", list(feature_names), True))
    methods.append(
        Method(
            "position",
            column_inputs(POSITION_COLUMNS),
            lambda: XGBVerifier(cfg, list(POSITION_COLUMNS), seed),
        )
    )
    methods += [
        Method(c, column_inputs([c]), lambda: FixedScore(cfg, seed), {"scores": [c]})
        for c in score_columns
    ]
    for name in parts:
        methods.append(Method(name, part_inputs[name], parts[name]))
    if parts and confidence:
        methods.append(stacked("probes+confidence", [], False))

    def probe_inputs(df: pd.DataFrame) -> np.ndarray:
        return data.probe[rows(df)]

    methods += [
        Method(
            "lr_probe",
            probe_inputs,
            lambda: SklearnProbe(
                lambda: LogisticRegression(
                    C=cfg.lr_probe_c, class_weight="balanced", max_iter=2000
                ),
                cfg,
                seed,
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
                ),
                cfg,
                seed,
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


# ---- saved form ------------------------------------------------------------------------


def method_dir_name(name: str) -> str:
    """The directory of a method: its name with `+` as `_plus_`."""
    return name.replace("+", "_plus_")


def _spec(name: str, kind: str, inputs: dict, info: dict, temperature: float | None) -> dict:
    base = {"features": [], "scores": [], "hidden": None, "latents": [], "parts": []}
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "kind": kind,
        "threshold": float(info.get("threshold", 0.5)),
        "val_auroc": info.get("val_auroc"),
        "inputs": base | inputs,
        "temperature": temperature,
        "info": {k: v for k, v in info.items() if k != "grid"},
    }


def savable(method: Method, scorer: Scorer | None) -> bool:
    """Whether `save_method` writes this fitted method: one a bundle can compute the
    inputs of (not the position baseline, not the fixed-layer probes)."""
    if isinstance(scorer, (HiddenProbe, SparseProbe)):
        return True
    return bool(method.spec_inputs) and isinstance(
        scorer, (FixedScore, XGBVerifier, StackedVerifier)
    )


def save_method(
    path: Path, name: str, spec_inputs: dict, scorer: Scorer, temperature: float | None = None
) -> dict:
    """Write a fitted method to `path` (spec.json + model); returns the spec."""
    path = Path(path)
    info = dict(scorer.info)
    if isinstance(scorer, FixedScore):
        spec = _spec(name, "fixed", spec_inputs, info, temperature)
    elif isinstance(scorer, (HiddenProbe, SparseProbe)):
        inputs, model = scorer.saved()
        atomic_write_json(path / LOGISTIC_FILE, model.to_json())
        spec = _spec(name, "logistic", inputs, info, temperature)
    elif isinstance(scorer, XGBVerifier):
        scorer.save(path)
        info["threshold"] = scorer.threshold
        spec = _spec(name, "xgboost", spec_inputs, info, temperature)
    elif isinstance(scorer, StackedVerifier):
        scorer.xgb.save(path)
        for part_name, part in scorer.parts.items():
            save_method(path / "parts" / part_name, part_name, {}, part, temperature)
        spec = _spec(name, "xgboost", spec_inputs, info, temperature)
    else:
        raise MethodError(f"method {name!r} has no saved form")
    atomic_write_json(path / SPEC_FILE, spec)
    return spec


@dataclass
class StepInputs:
    """What a saved method may read of n steps (each field None when not computed)."""

    features: pd.DataFrame | None = None
    """Graph-feature columns by name (identity columns as `frame_matrix` reads them)."""
    scores: pd.DataFrame | None = None
    """Baseline score columns (`maxprob`, ..., `temperature`)."""
    hidden: HiddenInputs | None = None
    latents: tuple[csr_matrix, LatentLayout] | None = None

    @classmethod
    def from_trace_scores(
        cls,
        traces: list,
        temperature: float,
        grid: list[float],
        hidden_layers: list[int],
        layout: LatentLayout | None = None,
        features: pd.DataFrame | None = None,
    ) -> StepInputs:
        """The inputs of the steps of one or more traces' `trace_step_scores` results (in
        order), with the baselines' T* and temperature grid."""
        from scipy.sparse import vstack

        scores = pd.concat([pd.DataFrame(t.scores) for t in traces], ignore_index=True)
        conf = np.concatenate([t.conf for t in traces])
        scores["temperature"] = temperature_scores(conf, temperature, grid)
        hidden = HiddenInputs(np.concatenate([t.hidden for t in traces]), list(hidden_layers))
        latents = None
        if layout is not None and all(t.latents is not None for t in traces):
            latents = (vstack([t.latents for t in traces], format="csr"), layout)
        return cls(features, scores, hidden, latents)


class SavedMethod:
    """A method read back from its directory; `score(StepInputs)` -> [n] P(incorrect)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        file = self.path / SPEC_FILE
        if not file.is_file():
            raise MethodError(f"{self.path}: no {SPEC_FILE}; not a saved verifier method")
        self.spec = read_json(file)
        if self.spec.get("format_version") != FORMAT_VERSION:
            raise MethodError(
                f"{file}: format_version {self.spec.get('format_version')!r}, this crv reads "
                f"{FORMAT_VERSION}"
            )
        self.name, self.kind, self.inputs = (
            self.spec["name"],
            self.spec["kind"],
            self.spec["inputs"],
        )
        self.parts = {p: SavedMethod(self.path / "parts" / p) for p in self.inputs["parts"]}
        if self.kind == "xgboost":
            self.model: Any = load_verifier(self.path)
        elif self.kind == "logistic":
            self.model = Logistic.from_json(read_json(self.path / LOGISTIC_FILE))
        elif self.kind != "fixed":
            raise MethodError(f"{file}: unknown kind {self.kind!r}")

    @property
    def threshold(self) -> float:
        return float(self.spec["threshold"])

    @property
    def needs(self) -> set[str]:
        """Which `StepInputs` fields scoring reads."""
        inp = self.inputs
        need = {k for k in ("features", "scores", "latents") if inp[k]}
        need |= {"hidden"} if inp["hidden"] else set()
        for part in self.parts.values():
            need |= part.needs
        return need

    def _require(self, x: StepInputs, what: str) -> Any:
        value = getattr(x, what)
        if value is None:
            raise MethodError(f"method {self.name!r} ({self.path}) reads {what}, not given")
        return value

    def score(self, x: StepInputs) -> np.ndarray:
        """P(incorrect) (or the fixed score) of each step, higher = more likely incorrect."""
        inp = self.inputs
        if self.kind == "fixed":
            return self._require(x, "scores")[inp["scores"][0]].to_numpy(dtype=np.float64)
        if self.kind == "logistic":
            if inp["hidden"]:
                h = self._require(x, "hidden")
                return self.model.score(h.at(inp["hidden"]["layer"], inp["hidden"]["pooling"]))
            latents, layout = self._require(x, "latents")
            cols = [layout.column(int(la), int(j), str(p)) for la, j, p in inp["latents"]]
            return self.model.score(latents[:, cols] if cols else csr_matrix((latents.shape[0], 0)))
        frames = []
        if inp["features"]:
            frames.append(self._require(x, "features").reset_index(drop=True))
        if inp["scores"]:
            frames.append(self._require(x, "scores")[inp["scores"]].reset_index(drop=True))
        if self.parts:
            frames.append(pd.DataFrame({f"{n}_score": p.score(x) for n, p in self.parts.items()}))
        frame = pd.concat(frames, axis=1)
        return self.model.predict_proba(frame_matrix(frame, self.model.feature_names))


def task_methods_dir(verifier_dir: str | Path, task: str) -> Path:
    """Where the methods of one task (or `all`) are saved."""
    return Path(verifier_dir) / METHODS_DIR / task


def load_method(verifier_dir: str | Path, task: str, name: str) -> SavedMethod:
    """A saved method of a task (`all`: trained on every task)."""
    return SavedMethod(task_methods_dir(verifier_dir, task) / method_dir_name(name))


def selected_method(verifier_dir: str | Path, task: str) -> tuple[SavedMethod, float]:
    """The method that won on validation for `task` (or `all`), and its threshold."""
    file = Path(verifier_dir) / SELECTED_FILE
    if not file.is_file():
        raise MethodError(f"{verifier_dir}: no {SELECTED_FILE} (a verifier from an older crv)")
    tasks = read_json(file)["tasks"]
    if task not in tasks:
        raise MethodError(f"{file}: no method selected for task {task!r}; has {sorted(tasks)}")
    entry = tasks[task]
    return SavedMethod(Path(verifier_dir) / entry["dir"]), float(entry["threshold"])


def select_on_validation(specs: dict[str, dict]) -> str | None:
    """The name of the saved method with the highest validation AUROC (None without one)."""
    scored = {
        n: s["val_auroc"]
        for n, s in specs.items()
        if s.get("val_auroc") is not None and math.isfinite(s["val_auroc"])
    }
    return max(scored, key=scored.__getitem__) if scored else None
