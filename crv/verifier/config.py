"""Configuration of the `verifier` stage (`verifier` section).

Every field's docstring is its help text. The defaults are sized for crv's embedded subject
model (4 layers, a few thousand step graphs of a few hundred nodes) on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crv.options import Choice, check_choices


class ThresholdRule(Choice):
    """How the decision threshold is chosen (see `VerifierConfig.threshold_rule`)."""

    max_f1 = "max_f1"
    recall95 = "recall95"


@dataclass
class VerifierConfig:
    """The xgboost verifier, the probes and the evaluation protocol (`verifier` section)."""

    n_estimators: int = 400
    """Maximum boosting rounds (early stopping usually ends sooner)."""

    max_depth: int = 4
    """Maximum depth of each tree."""

    learning_rate: float = 0.05
    """Shrinkage per boosting round (xgboost `eta`)."""

    subsample: float = 0.8
    """Fraction of training rows sampled for each tree."""

    colsample_bytree: float = 0.8
    """Fraction of feature columns sampled for each tree."""

    min_child_weight: float = 1.0
    """Minimum summed hessian in a leaf (larger = more conservative trees)."""

    early_stopping_rounds: int = 30
    """Stop when the validation loss has not improved for this many rounds."""

    val_frac: float = 0.2
    """Fraction of the training traces (whole problems, never single steps) held out for
    early stopping and for choosing the decision threshold."""

    threshold_rule: ThresholdRule = ThresholdRule.max_f1
    """How the decision threshold is chosen on the validation part: `max_f1` (the score
    threshold maximising F1 of the incorrect class) or `recall95` (the highest threshold
    that still flags 95% of the incorrect validation steps)."""

    runtime_n_threads: int = 2
    """CPU threads used by xgboost."""

    n_bootstrap: int = 1000
    """Bootstrap resamples of the test steps for the 95% confidence intervals (0 = none)."""

    lr_probe_c: float = 1.0
    """Inverse L2 regularisation strength of the logistic-regression probe."""

    probe_c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])
    """Inverse L2 strengths tried by the layer-selecting probe `probe` (with every kept
    layer and pooling; the combination with the best validation AUROC is refit)."""

    tc_probe_c_grid: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    """Inverse L1 strengths tried by the transcoder-feature probe `tc_probe` (chosen on
    validation; smaller = fewer latents used)."""

    stack_folds: int = 5
    """Folds of whole training traces for the out-of-fold probe scores that the stacked
    methods (`crv+probes`, `probes+confidence`) are trained on."""

    mlp_probe_hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden layer sizes of the MLP probe."""

    mlp_probe_alpha: float = 1e-3
    """L2 penalty of the MLP probe."""

    mlp_probe_max_iter: int = 300
    """Most training epochs of the MLP probe. No validation split and no early stopping on
    one; scikit-learn ends sooner only when the training loss improves by less than 1e-4
    for 10 epochs in a row."""

    ablation: bool = True
    """Also train CRV without each feature family (leave-one-family-out ablation)."""

    transfer: bool = True
    """Also evaluate the CRV verifier of each task on the other tasks' test steps."""

    def __post_init__(self) -> None:
        check_choices(self, "verifier")
        positive = {
            "n_estimators": self.n_estimators,
            "max_depth": self.max_depth,
            "learning_rate": self.learning_rate,
            "early_stopping_rounds": self.early_stopping_rounds,
            "runtime_n_threads": self.runtime_n_threads,
            "lr_probe_c": self.lr_probe_c,
            "mlp_probe_max_iter": self.mlp_probe_max_iter,
            "probe_c_grid": min(self.probe_c_grid, default=0),
            "tc_probe_c_grid": min(self.tc_probe_c_grid, default=0),
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"verifier.{name} must be > 0, got {value}")
        for name in ("subsample", "colsample_bytree"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"verifier.{name} must lie in (0, 1], got {getattr(self, name)}")
        if self.stack_folds < 2:
            raise ValueError(f"verifier.stack_folds must be >= 2, got {self.stack_folds}")
        if not 0 < self.val_frac < 1:
            raise ValueError(f"verifier.val_frac must lie in (0, 1), got {self.val_frac}")
        if min(self.n_bootstrap, self.min_child_weight, self.mlp_probe_alpha) < 0:
            raise ValueError(
                "verifier.n_bootstrap, min_child_weight and mlp_probe_alpha must be >= 0"
            )
        if any(size < 1 for size in self.mlp_probe_hidden):
            raise ValueError(
                f"verifier.mlp_probe_hidden sizes must be >= 1, got {self.mlp_probe_hidden}"
            )
