"""Configuration of the `features`, `baselines` and `verifier` stages.

Every field's docstring is its help text. The defaults are sized for crv's embedded subject
model (4 layers, a few thousand step graphs of a few hundred nodes) on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FeaturesConfig:
    """How graph features are computed from the pruned step graphs (`features` section)."""

    n_layers: int | None = None
    """Layers of the subject model (one histogram bin each); default: read from the logit
    nodes of the graphs (their `layer` is n_layers)."""

    betweenness_exact_max_nodes: int = 64
    """Graphs with at most this many nodes get exact betweenness centrality; larger ones
    use the k-source sampling estimate (Brandes & Pich 2007) with `betweenness_k` sources."""

    betweenness_k: int = 32
    """Number of sampled source nodes for approximate betweenness on large graphs."""

    n_workers: int = 1
    """Processes computing features (graphs are independent); 1 computes in-process. About
    50 ms per graph of 300 nodes and 2,500 edges in one process; extra processes pay a few
    seconds of start-up and help only on otherwise idle cores."""


@dataclass
class BaselinesConfig:
    """Output- and hidden-state-based baselines from the subject's forward pass (`baselines`)."""

    probe_layer: int | None = None
    """Index into the model's hidden states (0 = embeddings, l = after block l, negative
    counts from the end) averaged over the step's tokens for the probes; default: the
    middle block, n_layers // 2."""

    temperature_grid: list[float] = field(
        default_factory=lambda: [round(0.05 * 1.2**i, 6) for i in range(40)]
    )
    """Temperatures tried when fitting temperature scaling (0.05 to about 60, geometric)."""

    coe: bool = True
    """Also compute the Chain-of-Embedding scores CoE-R and CoE-C (Wang et al. 2024)."""


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

    threshold_rule: str = "max_f1"
    """How the decision threshold is chosen on the validation part: `max_f1` (the score
    threshold maximising F1 of the incorrect class) or `recall95` (the highest threshold
    that still flags 95% of the incorrect validation steps)."""

    n_threads: int = 2
    """CPU threads used by xgboost."""

    n_bootstrap: int = 1000
    """Bootstrap resamples of the test steps for the 95% confidence intervals (0 = none)."""

    lr_probe_c: float = 1.0
    """Inverse L2 regularisation strength of the logistic-regression probe."""

    mlp_probe_hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden layer sizes of the MLP probe."""

    mlp_probe_alpha: float = 1e-3
    """L2 penalty of the MLP probe."""

    mlp_probe_max_iter: int = 300
    """Maximum training epochs of the MLP probe (it stops early on a validation split)."""

    ablation: bool = True
    """Also train CRV without each feature family (leave-one-family-out ablation)."""

    transfer: bool = True
    """Also evaluate the CRV verifier of each task on the other tasks' test steps."""
