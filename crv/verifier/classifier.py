"""The CRV verifier: an xgboost classifier from a step's graph features to P(incorrect).

A gradient-boosted tree classifier (xgboost, `binary:logistic`) maps a step's graph
features to P(step incorrect). Incorrect steps are rare, so the positive class is
up-weighted by `scale_pos_weight` = (correct / incorrect training steps). A validation part
of the training split (`val_frac` of the training *traces*, drawn separately among traces
with and without an incorrect step so both parts see errors; a trace's steps never
straddle the two parts) serves two purposes:

- early stopping: boosting stops when the validation log-loss, weighted like the training
  loss (incorrect steps count `scale_pos_weight` times), has not improved for
  `early_stopping_rounds` rounds; the model keeps the best round's trees;
- the decision threshold: `max_f1` picks the score threshold with the highest F1 of the
  incorrect class on the validation steps; `recall95` the highest threshold that still
  flags 95% of the incorrect validation steps. 0.5 when validation lacks a class.

Inputs are dense arrays, or sparse CSR matrices when the features' identity family is in
use: xgboost treats the entries a sparse matrix does not store as *missing*, which is what
an absent identity entry means, so the dense (aggregate) columns go in as explicitly stored
values (`feature_matrix`) and only the identity block is sparse. A DataFrame is read by
column name; identity columns it lacks, and identity entries that are NaN or 0, count as
absent (a frame built from `graph_features` rows holds only the graph's own entries).

A verifier is saved as xgboost's JSON model (`model.json`) plus `verifier.json` (feature
names, threshold, the config that produced it); nothing is pickled. The evaluation of
every method lives in `crv.verifier.stage`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb
from scipy.sparse import csr_matrix, hstack, issparse
from sklearn.metrics import roc_auc_score

from crv.features.compute import family_of
from crv.io import atomic_write, atomic_write_json, read_json
from crv.verifier.config import VerifierConfig

Matrix = np.ndarray | csr_matrix
"""A feature matrix: dense, or CSR with a sparse identity block (see the module docstring)."""

MODEL_FILE = "model.json"
META_FILE = "verifier.json"


def explicit_csr(x: np.ndarray) -> csr_matrix:
    """Dense [n, m] as CSR storing every entry, zeros included (stored = not missing)."""
    n, m = x.shape
    indptr = np.arange(0, n * m + 1, max(m, 1)) if m else np.zeros(n + 1, dtype=np.int64)
    return csr_matrix((x.ravel(), np.tile(np.arange(m), n), indptr), shape=(n, m))


def feature_matrix(dense: np.ndarray, identity: csr_matrix | None) -> Matrix:
    """Dense columns followed by the identity block's columns; dense when there is none."""
    if identity is None or identity.shape[1] == 0:
        return dense
    return hstack([explicit_csr(dense), identity], format="csr")


def _is_identity(name: str) -> bool:
    """Whether a column is in the identity block (a baseline or probe score is not a
    graph feature at all, so it is a dense column)."""
    try:
        return family_of(name) == "identity"
    except KeyError:
        return False


def frame_matrix(frame: pd.DataFrame, names: list[str]) -> Matrix:
    """The columns `names` of a frame, in that order (identity semantics: module docstring)."""
    is_id = np.array([_is_identity(n) for n in names], dtype=bool)
    missing = [n for n, i in zip(names, is_id, strict=True) if not i and n not in frame]
    if missing:
        raise ValueError(f"feature columns missing from the input: {missing[:5]}")
    if not is_id.any():
        return frame[names].to_numpy(dtype=np.float64)
    dense_names = [n for n, i in zip(names, is_id, strict=True) if not i]
    id_names = [n for n, i in zip(names, is_id, strict=True) if i]
    present = [j for j, n in enumerate(id_names) if n in frame]
    block = frame[[id_names[j] for j in present]]
    if all(isinstance(t, pd.SparseDtype) for t in block.dtypes):
        coo = block.sparse.to_coo() if present else csr_matrix((len(frame), 0)).tocoo()
        rows, cols, vals = coo.row, coo.col, coo.data
    else:
        values = block.to_numpy(dtype=np.float64)
        rows, cols = np.nonzero(np.isfinite(values) & (values != 0))
        vals = values[rows, cols]
    keep = np.isfinite(vals) & (vals != 0)
    identity = csr_matrix(
        (vals[keep], (rows[keep], np.asarray(present, dtype=np.int64)[cols[keep]])),
        shape=(len(frame), len(id_names)),
    )
    x = feature_matrix(frame[dense_names].to_numpy(dtype=np.float64), identity)
    order = np.argsort(np.argsort(is_id, kind="stable"), kind="stable")
    return x[:, order] if np.any(order != np.arange(len(names))) else x


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

    def _array(self, x: Matrix | pd.DataFrame) -> Matrix:
        if isinstance(x, pd.DataFrame):
            x = frame_matrix(x, self.feature_names)
        elif issparse(x):
            x = csr_matrix(x, dtype=np.float64)
        else:
            x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(
                f"expected {len(self.feature_names)} feature columns, got shape {x.shape}"
            )
        return x

    def _matrix(self, x: Matrix, **kw) -> xgb.DMatrix:
        return xgb.DMatrix(
            self._array(x),
            feature_names=self.feature_names,
            nthread=self.cfg.runtime_n_threads,
            **kw,
        )

    def fit(self, x: Matrix, y: np.ndarray, groups: np.ndarray) -> XGBVerifier:
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
            "nthread": cfg.runtime_n_threads,
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

    def predict_proba(self, x: Matrix | pd.DataFrame) -> np.ndarray:
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
