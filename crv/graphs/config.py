"""Configuration of the `graphs` stage (the `graphs` config section).

Every field's docstring is its help text. The defaults follow CRV (10 logits up to 95%
probability, 80% node / 98% edge influence) except the explained position: CRV explains the
prediction after the step's last token (`after`), crv by default the step's least confident
prediction (`least_confident`), which on crv-tiny gave the better verifier on the
validation part of the training split (numbers in README.md). The feature budget is scaled
like the paper's: 4,096 expanded features for Llama-3.1-8B is the number of active latents
at one position (32 layers x k 128); for crv's embedded subject (4 layers x k 32) that is 128
(measured times per step graph: README.md).
Fields named `runtime_*` change speed or memory, never a graph, and are left out of the
artifact's cache key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crv.options import Choice, check_choices


class Position(Choice):
    """Which next-token prediction a step's graph explains (see `GraphsConfig.position`)."""

    after = "after"
    before = "before"
    least_confident = "least_confident"
    step = "step"
    step_surprise = "step_surprise"


@dataclass
class GraphsConfig:
    """How each reasoning step's attribution graph is built and pruned."""

    max_logits: int = 10
    """Most next-token logits attributed per step (the top ones by probability)."""

    logit_cum_prob: float = 0.95
    """Stop adding logits once their cumulative probability reaches this."""

    max_feature_nodes: int = 128
    """Most transcoder features given a row (expanded) per step, in order of influence
    (CRV: 4096 for Llama-3.1-8B, the active latents of one position; scale with layers x k)."""

    batch_size: int = 32
    """Target rows per backward pass."""

    update_interval: int = 2
    """Batches of feature rows expanded between two re-rankings of the candidate features."""

    node_threshold: float = 0.8
    """Pruning keeps the smallest node set holding this share of the influence on the logits."""

    edge_threshold: float = 0.98
    """Pruning then keeps the smallest edge set holding this share of the edge influence."""

    position: Position = Position.least_confident
    """Token whose next-token logits a step's graph explains: `after` = the step's last token,
    `before` = the previous step's last token (the prompt's last token for the first step),
    `least_confident` = the one of the step's own predictions (positions `before` .. `after`
    - 1) whose generated token had the lowest probability: the step's least certain decision;
    `step` = all of the step's own predictions in one whole-step graph (a logit node per
    position and attributed token, each position's logits weighing 1/n of the influence),
    `step_surprise` = the same with each position weighted by the surprise 1 - p of its
    generated token."""

    contrastive: bool = False
    """Also build, for every incorrect synthetic step, the contrastive graph of
    logit(generated token) - logit(correct token) at the first token where the step departs
    from a correct reduction (`crv.graphs.contrastive`), stored beside the step graphs."""

    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    """Trace splits to attribute."""

    max_traces: int | None = None
    """Attribute at most this many traces, spread evenly over the selected splits' traces in
    dataset order (so every task and complexity is represented); None = all."""

    runtime_row_cache_mb: int = 512
    """Memory for rows kept for reuse by later steps of the same trace (least recently used
    rows are dropped first and recomputed if needed again)."""

    def __post_init__(self) -> None:
        check_choices(self, "graphs")
        if not (0 < self.node_threshold <= 1 and 0 < self.edge_threshold <= 1):
            raise ValueError("graphs.node_threshold and edge_threshold must lie in (0, 1]")
        if min(self.max_logits, self.batch_size, self.update_interval) < 1:
            raise ValueError("graphs.max_logits, batch_size and update_interval must be >= 1")
        if self.max_feature_nodes < 1:  # a graph without features has nothing to verify with
            raise ValueError(f"graphs.max_feature_nodes must be >= 1, got {self.max_feature_nodes}")
        if not 0 < self.logit_cum_prob <= 1:
            raise ValueError(f"graphs.logit_cum_prob must lie in (0, 1], got {self.logit_cum_prob}")
        if self.max_traces is not None and self.max_traces < 1:
            raise ValueError(f"graphs.max_traces must be >= 1 or None, got {self.max_traces}")
        if self.runtime_row_cache_mb < 0:
            raise ValueError("graphs.runtime_row_cache_mb must be >= 0")
