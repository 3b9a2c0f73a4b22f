"""Configuration of the `interventions` stage (the `interventions` config section).

Every field's docstring is its help text. The defaults are sized for crv's embedded subject
model on a 2-core CPU: at most 60 flagged incorrect steps with 3N + 1 = 10 spliced
regenerations (one batch) and one plain second-choice regeneration each, and 20 false
alarms with four and one.
"""

from __future__ import annotations

from dataclasses import dataclass

from crv.options import Choice, check_choices


class RankBy(Choice):
    """How candidate features are ranked (see `InterventionsConfig.rank_by`); shared with
    crv-verify's options."""

    influence = "influence"
    verifier = "verifier"
    layer = "layer"
    margin = "margin"


class Action(Choice):
    """What an intervention does to the feature's activation."""

    suppress = "suppress"
    amplify = "amplify"


class Scope(Choice):
    """Where an intervention applies."""

    step = "step"
    onward = "onward"


class GraphKind(Choice):
    """Which graph proposes the features (see `InterventionsConfig.graph`)."""

    step = "step"
    contrastive = "contrastive"


class PlantedSteps(Choice):
    """Which planted-rule steps are attempted (see `InterventionsConfig.planted_steps`)."""

    flagged = "flagged"
    all = "all"


class FlaggingVerifier(Choice):
    """Which verifier flags a step (see `InterventionsConfig.verifier`)."""

    task = "task"
    pooled = "pooled"


@dataclass
class InterventionsConfig:
    """Which features to intervene on, how, and how many flagged steps to try."""

    split: str = "test"
    """Split of the traces whose flagged steps are intervened on."""

    verifier: FlaggingVerifier = FlaggingVerifier.task
    """Verifier that flags a step: `task`, the step's own task's verifier (the per-task
    detection results); `pooled`, the one trained on all tasks together."""

    graph: GraphKind = GraphKind.step
    """Graph whose features are proposed: `step`, the step's graph (`graphs.position`);
    `contrastive`, for an incorrect step that has one (`graphs.contrastive`), the graph of
    logit(wrong token) - logit(correct token) at the first token where the step departs
    from the correct reduction: `rank_by=margin` (and the margin-matched control) then
    measure how much an edit lowers that difference there, and the second-choice control
    replaces the wrong token. False alarms and steps without one keep the step graph."""

    planted_steps: PlantedSteps = PlantedSteps.flagged
    """Planted-rule steps compared on their own (`planted`): `flagged`, those in the sample
    of flagged steps; `all`, every incorrect step of the split that exercises a planted
    rule, flagged or not (the ones outside the sample, up to `max_planted_steps`, count only
    there, never in the rates of flagged steps)."""

    max_planted_steps: int = 200
    """Cap on the planted-rule steps added by `planted_steps=all` (seeded random sample
    when there are more)."""

    n_proposals: int = 3
    """Interventions proposed per flagged step (N): one feature each, best-ranked first."""

    rank_by: RankBy = RankBy.margin
    """How candidate features are ranked: `influence` (summed graph influence on the
    predicted tokens of the feature's nodes in the step), `verifier` (how much deleting the
    feature's nodes from the step graph lowers the verifier's score), `layer` (latest
    layer first, ties by influence), or `margin` (how much the intervention, measured in a
    forward pass of the spliced model, lowers the margin between the top two logits of the
    prediction the step's graph explains)."""

    candidate_pool: int = 24
    """With rank_by=verifier or margin, only the top features by influence are re-scored
    (each costs one recomputation of the graph features, or one forward pass row). The
    margin-matched control draws one random feature per pool feature and measures them all."""

    action: Action = Action.suppress
    """`suppress`: clamp the feature's activation to 0; `amplify`: multiply it by
    `amplify_scale`."""

    amplify_scale: float = 2.0
    """Factor applied to the activation by the `amplify` action."""

    scope: Scope = Scope.step
    """`step`: intervene at the positions of the step window (those whose computation
    writes the step: from the token before its first token through the token before its
    last) where the feature was active in the original trace; `onward`: at every position
    from the window's start to the end of the regeneration."""

    max_steps: int = 60
    """Cap on the flagged incorrect steps attempted; when more are flagged, a seeded random
    sample of this size is taken (not the highest-scoring ones, which would bias the rates)."""

    max_correct_steps: int = 20
    """Cap on the flagged correct steps (false alarms) attempted for `broken_correct_rate`
    (seeded random sample as for `max_steps`)."""

    extra_new_tokens: int = 32
    """Regeneration length: the larger of the original trace's remaining tokens and the
    canonical solution's tokens, plus this slack. A completion cut off before its answer
    line counts as a wrong final answer."""

    n_examples: int = 5
    """Worked examples kept in the report (fixed ones first)."""

    n_bootstrap: int = 2000
    """Paired bootstrap resamples for the confidence intervals of the differences proposals
    minus control (`controls.<name>.diff`, `fixed_minus_random`)."""

    def __post_init__(self) -> None:
        check_choices(self, "interventions")
        at_least = {
            "n_proposals": 1,
            "candidate_pool": 1,
            "max_steps": 0,
            "max_correct_steps": 0,
            "max_planted_steps": 0,
            "extra_new_tokens": 0,
            "n_examples": 0,
            "n_bootstrap": 0,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(
                    f"interventions.{name} must be >= {low}, got {getattr(self, name)}"
                )
        if self.amplify_scale < 0:
            raise ValueError(f"interventions.amplify_scale must be >= 0, got {self.amplify_scale}")
