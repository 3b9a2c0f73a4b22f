"""Feature interventions on flagged steps: can the graph that flagged an error also fix it?

The verifier flags a step from its attribution graph. This stage asks whether the graph
also points at the computation that went wrong: for every flagged step it proposes N
single-feature interventions on transcoder features from the step's pruned graph
(`propose`: ranked by their measured effect on the explained prediction's top-two margin,
by graph influence, by how they move the verifier's score, or by layer; each suppresses the
feature or amplifies it, at the step positions where it was active or from the step
onward), regenerates the trace from the step's first token with the transcoders spliced in
and their error added back, so that only the edited feature differs from the original model
(`apply`; a step's feature edits run as one batch, one edit per row), relabels the
regenerated step and the final answer with the task's checker, and compares against no
intervention and three controls that can fail (`measure`, `controls.<name>` in the report):

- `random`: a random active feature of each proposal's layer;
- `margin_matched`: random active features of the same layers and positions as the
  proposals' candidate pool, ranked by the same measured margin drop, so that the graph's
  influence ranking is the only difference;
- `second_choice`: no transcoders at all: the explained token (by default the step's least
  confident one) replaced by the model's second choice, then greedy decoding.

Steps that exercise a planted rule (crv-tiny-bugs, the step field `planted_rule`) are
also compared on their own (`planted`, and per rule with a worked example); with
`planted_steps=all`, every incorrect planted-rule step of the split is attempted there,
flagged or not, and counted only there. With `graph=contrastive` an incorrect step's features come from its
contrastive graph, the one of logit(wrong token) - logit(correct token) at the first token
where the step departs from the correct reduction: the margin that `rank_by=margin` and the
margin-matched control measure is that difference, and the second-choice control replaces
the wrong token. The contrastive graph needs the correct text, so it is an oracle's choice
of where to look (like best of N), measured against controls given the same position.

Honest limits:

- The graph explains one next-token prediction (by default the step's least confident
  one), not the whole step; its features are candidates for what shaped the step, not
  causes of the error.
- `rank_by=margin` picks the features that most favour the model's first choice over its
  second at that prediction, without knowing which is right: it flips uncertain decisions,
  which fixes a wrong step when the runner-up was right and breaks a correct one just as
  readily (`broken_correct_rate`). A changed step can also become correct by chance. The
  controls are the yardstick: `controls.<name>.diff` (proposals minus control, paired over
  steps) is the effect, and the strongest control is the one that counts. The
  second-choice baseline flips the same decision for free: when it fixes as many steps,
  the graph adds nothing to the fix but the choice of which token to flip.
- Best of N picks the winner with the task checker, an oracle no deployed system has;
  first of N is the deployable rate.
- "No intervention" regeneration runs the spliced model (recon + error), which equals the
  original only up to float rounding, and decodes with a KV cache while the traces were
  decoded in other batches; `consistency_rate` reports how often the original step comes
  back exactly.
- Only tasks with a programmatic checker (arithmetic, Boolean) are intervened on: a
  regenerated free-text step (GSM8K) has no label.

Modules: `config` (InterventionsConfig), `propose`, `apply`, `measure`
(`interventions_markdown`), `stage` (`run_stage`). The heavy ones load lazily so that
importing the configuration does not import torch.
"""

from __future__ import annotations

from typing import Any

from crv.interventions.config import InterventionsConfig

_LAZY = {
    "run_stage": "crv.interventions.stage",
    "interventions_markdown": "crv.interventions.measure",
}

__all__ = ["InterventionsConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
