"""Configuration of the `interventions` stage (the `intervention` config section).

Every field's docstring is its help text. The defaults are sized for crv's embedded subject
model on a 2-core CPU: about a hundred flagged steps, eleven regenerations each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RankBy = Literal["influence", "verifier", "layer"]
Action = Literal["suppress", "amplify"]
Scope = Literal["step", "onward"]


@dataclass
class InterventionConfig:
    """Which features to intervene on, how, and how many flagged steps to try."""

    split: str = "test"
    """Split of the traces whose flagged steps are intervened on."""

    n_proposals: int = 5
    """Interventions proposed per flagged step (N): one feature each, best-ranked first."""

    rank_by: RankBy = "influence"
    """How candidate features are ranked: `influence` (summed graph influence on the
    predicted tokens of the feature's nodes in the step), `verifier` (how much deleting the
    feature's nodes from the step graph lowers the verifier's score), or `layer` (latest
    layer first, ties by influence)."""

    candidate_pool: int = 24
    """With rank_by=verifier, only the top features by influence are re-scored (each costs
    one recomputation of the graph features)."""

    action: Action = "suppress"
    """`suppress`: clamp the feature's activation to 0; `amplify`: multiply it by
    `amplify_scale`."""

    amplify_scale: float = 2.0
    """Factor applied to the activation by the `amplify` action."""

    scope: Scope = "step"
    """`step`: intervene at the step's positions where the feature was active in the
    original trace; `onward`: at every position from the step's start onward during
    regeneration."""

    max_steps: int = 80
    """Cap on the flagged incorrect steps attempted (the lowest-scoring are dropped first
    is NOT applied: a seeded random sample is taken so the rates are unbiased)."""

    max_correct_steps: int = 40
    """Cap on the flagged correct steps (false alarms) attempted for `broken_correct_rate`."""

    max_new_tokens: int = 160
    """Regeneration length cap; a completion cut off before its answer line counts as a
    wrong final answer."""

    n_examples: int = 5
    """Worked examples kept in the report (fixed ones first)."""

    n_bootstrap: int = 2000
    """Paired bootstrap resamples for the confidence interval of `fixed_minus_random`."""
