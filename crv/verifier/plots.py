"""PNG figures of the verifier stage (matplotlib, headless Agg backend).

- `plot_roc`: ROC curves (FPR against TPR, incorrect = positive) of every method on one
  test set, with each method's AUROC in the legend and the chance diagonal.
- `plot_feature_importance`: the verifier's features ranked by total gain (the summed
  loss reduction of every split on the feature), coloured by family.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from crv.features.compute import family_of  # noqa: E402
from crv.io import atomic_write  # noqa: E402
from crv.verifier.metrics import detection_metrics  # noqa: E402

FAMILY_COLOURS = {
    "global": "tab:blue",
    "node": "tab:orange",
    "topology": "tab:green",
    "identity": "tab:purple",
}


def plot_roc(y: np.ndarray, scores: dict[str, np.ndarray], title: str, path: str | Path) -> None:
    """ROC curve of each method's scores against labels `y` (1 = incorrect)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if len(y) and y.min() != y.max():
        for name, s in scores.items():
            if not np.all(np.isfinite(s)):
                continue
            fpr, tpr, _ = roc_curve(y, s)
            auroc = detection_metrics(y, s)["auroc"]
            ax.plot(fpr, tpr, lw=2.2 if name == "crv" else 1.2, label=f"{name} ({auroc:.3f})")
        ax.legend(loc="lower right", fontsize=7, title="method (AUROC)", title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "test steps hold one class only", ha="center")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate (incorrect steps)", title=title)
    _save(fig, path)


def plot_feature_importance(importance: dict[str, float], path: str | Path, top: int = 30) -> None:
    """Horizontal bars of the `top` features by gain, coloured by family."""
    items = sorted(importance.items(), key=lambda kv: kv[1], reverse=True)[:top][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(items) + 1.2))
    ax.barh(
        [k for k, _ in items],
        [v for _, v in items],
        color=[FAMILY_COLOURS[family_of(k)] for k, _ in items],
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in FAMILY_COLOURS.values()]
    ax.legend(handles, list(FAMILY_COLOURS), fontsize=7, loc="lower right")
    ax.set(xlabel="total gain", title="CRV verifier: feature importance")
    ax.tick_params(axis="y", labelsize=7)
    _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
