"""Which graph units are over-represented in the graphs of incorrect steps.

A unit is something a step graph may contain: a transcoder feature (layer, feature), all
feature nodes of one layer, or the error nodes of one layer. For every unit and a group of
incorrect vs correct steps:

- presence: Fisher's exact test, one-sided (is the unit present more often in incorrect
  steps' graphs?), computed as the hypergeometric tail P(X >= a) with the margins fixed,
  exactly what `scipy.stats.fisher_exact(..., alternative="greater")` returns;
- influence: the Mann-Whitney U test, one-sided, among the graphs that contain the unit
  (when present, does it carry more influence in incorrect steps' graphs?); exact for
  small groups, asymptotic otherwise; its effect size is the AUC U / (n_x n_y). Counting
  absent units as influence 0 instead would put most steps in one tied block, where the
  asymptotic test is anti-conservative; among present units the influences are continuous
  and the test holds its level (the simulations: README.md, "Figures behind the code");
- effect size of presence: the log odds ratio with 0.5 added to every cell (finite for
  empty cells) and the presence rates in both groups;
- Benjamini-Hochberg control of the false discovery rate over the p-values of both tests of
  every tested unit together: a unit survives when either of its q-values is <= the FDR.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import false_discovery_control, hypergeom, mannwhitneyu

EXACT_MAX = 10
"""The Mann-Whitney p-value is exact when the smaller group has at most this many values."""

STAT_COLUMNS = (
    "n_present",
    "present_incorrect",
    "present_correct",
    "rate_incorrect",
    "rate_correct",
    "log_odds_ratio",
    "p_fisher",
    "mean_influence_incorrect",
    "mean_influence_correct",
    "auc_influence",
    "p_mwu",
)


def fisher_greater(
    present_incorrect: np.ndarray, n_present: np.ndarray, n_incorrect: int, n_steps: int
) -> np.ndarray:
    """One-sided Fisher p-values P(X >= a), X ~ Hypergeometric(n_steps, n_present, n_incorrect)."""
    return hypergeom.sf(present_incorrect - 1, n_steps, n_present, n_incorrect)


def log_odds_ratio(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """log((a + .5)(d + .5) / ((b + .5)(c + .5))): a, b present / absent among incorrect
    steps, c, d among correct ones."""
    return np.log((a + 0.5) * (d + 0.5) / ((b + 0.5) * (c + 0.5)))


def _column_sums(m_SU: sparse.spmatrix) -> np.ndarray:
    return np.asarray(m_SU.sum(0), dtype=np.float64).ravel()


def influence_test(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """One-sided Mann-Whitney U of x > y: (p-value, AUC = U / (len(x) len(y))); (1, nan)
    when a group is empty. Exact when the smaller group has at most `EXACT_MAX` values,
    else asymptotic."""
    if len(x) == 0 or len(y) == 0:
        return 1.0, float("nan")
    method = "exact" if min(len(x), len(y)) <= EXACT_MAX else "asymptotic"
    res = mannwhitneyu(x, y, alternative="greater", method=method)
    return float(res.pvalue), float(res.statistic) / (len(x) * len(y))


def unit_tests(
    present_SU: sparse.spmatrix,
    influence_SU: sparse.spmatrix,
    incorrect_S: np.ndarray,
    chunk: int = 512,
) -> pd.DataFrame:
    """`STAT_COLUMNS` for each unit (column) of steps x units matrices of presence (0/1)
    and summed influence; one row per unit, in column order."""
    incorrect_S = np.asarray(incorrect_S, dtype=bool)
    n_inc, n_cor = int(incorrect_S.sum()), int((~incorrect_S).sum())
    if n_inc == 0 or n_cor == 0:
        raise ValueError(f"need incorrect and correct steps, got {n_inc} and {n_cor}")
    present_SU = sparse.csc_matrix(present_SU)
    influence_SU = sparse.csc_matrix(influence_SU)
    a = _column_sums(present_SU[incorrect_S]).round().astype(np.int64)
    c = _column_sums(present_SU[~incorrect_S]).round().astype(np.int64)
    b, d = n_inc - a, n_cor - c
    n_units = present_SU.shape[1]
    p_mwu, auc = np.ones(n_units), np.full(n_units, np.nan)
    mean_inc, mean_cor = np.full(n_units, np.nan), np.full(n_units, np.nan)
    for start in range(0, n_units, chunk):
        present_SC = present_SU[:, start : start + chunk].toarray() > 0
        influence_SC = influence_SU[:, start : start + chunk].toarray()
        for j in range(present_SC.shape[1]):
            x = influence_SC[present_SC[:, j] & incorrect_S, j]
            y = influence_SC[present_SC[:, j] & ~incorrect_S, j]
            u = start + j
            p_mwu[u], auc[u] = influence_test(x, y)
            mean_inc[u] = x.mean() if len(x) else np.nan
            mean_cor[u] = y.mean() if len(y) else np.nan
    return pd.DataFrame(
        {
            "n_present": a + c,
            "present_incorrect": a,
            "present_correct": c,
            "rate_incorrect": a / n_inc,
            "rate_correct": c / n_cor,
            "log_odds_ratio": log_odds_ratio(a, b, c, d),
            "p_fisher": fisher_greater(a, a + c, n_inc, n_inc + n_cor),
            "mean_influence_incorrect": mean_inc,
            "mean_influence_correct": mean_cor,
            "auc_influence": auc,
            "p_mwu": p_mwu,
        }
    )


def add_fdr(table: pd.DataFrame, fdr: float) -> pd.DataFrame:
    """`q_fisher`, `q_mwu` (Benjamini-Hochberg over both columns of p-values together),
    `significant` (either q <= fdr), rows ranked by their smaller q, then log odds ratio."""
    table = table.copy()
    n = len(table)
    q = (
        false_discovery_control(np.concatenate([table["p_fisher"], table["p_mwu"]]), method="bh")
        if n
        else np.zeros(0)
    )
    table["q_fisher"], table["q_mwu"] = q[:n], q[n:]
    table["q"] = np.minimum(table["q_fisher"], table["q_mwu"])
    table["significant"] = table["q"] <= fdr
    return table.sort_values(
        ["q", "log_odds_ratio"], ascending=[True, False], kind="stable"
    ).reset_index(drop=True)
