"""Regenerating a trace from a step with transcoder features edited, and relabelling it.

The model runs with every layer's transcoder spliced in and its error term added back
(`crv.transcoders.splice`), so with no intervention it computes what the original model
computes (up to float rounding: the output is recon + (y - recon) rather than y), and an
intervention changes one feature's activation and, through its decoder row, nothing else at
that layer. Regeneration keeps the trace's own token ids up to the step's first token (no
re-tokenisation, so absolute positions match the original trace and its graphs) and decodes
greedily from there with a KV cache; the splice reads absolute positions from the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crv.generation import generate_from_ids
from crv.interventions.propose import FeatureKey, Proposal
from crv.tasks.label import Labelled, label_steps
from crv.tokens import last_token_index, token_char_ends
from crv.transcoders.module import TranscoderSet
from crv.transcoders.splice import FeatureIntervention, splice


@dataclass(frozen=True)
class StepSpan:
    """Where a step sits in its trace's `input_ids`."""

    first_token: int
    """Index of the token holding the step's first character; regeneration starts here."""
    last_token: int
    """Index of the token holding its last character."""

    def window(self, graph_position: int) -> tuple[int, int]:
        """Positions whose computation can change the step on regeneration (inclusive):
        from the token before the first token (it predicts the first token), or from the
        graph's explained token if that is earlier, to the token before the last one."""
        return min(self.first_token - 1, graph_position), self.last_token - 1


def step_span(row: Mapping[str, Any], step: Mapping[str, Any], tokenizer: Any) -> StepSpan:
    """The token span of `step` (a trace's step dict) in `row["input_ids"]`."""
    offset = int(row["prompt_len"])
    ends = token_char_ends(tokenizer, row["input_ids"][offset:], row["completion"])
    first = last_token_index(ends, int(step["start_char"]) + 1, offset)
    return StepSpan(first, int(step["last_token"]))


@torch.inference_mode()
def active_features(
    adapter: Any, tset: TranscoderSet, input_ids: Sequence[int], window: tuple[int, int]
) -> dict[FeatureKey, tuple[int, ...]]:
    """Features in their layer's top k with a non-zero activation at window positions.

    One forward pass of the spliced model (error added back) over the ids up to the
    window's end; returns feature -> its active positions.
    """
    lo, hi = window
    device = adapter.unembed_weight.device
    ids = torch.tensor([list(input_ids[: hi + 1])], device=device)
    with splice(adapter, tset, add_error=True, record=True) as handle:
        adapter.model(input_ids=ids, use_cache=False)
    found: dict[FeatureKey, list[int]] = {}
    for layer, records in handle.records.items():
        acts_TK = records[0].acts_BTK[0, lo : hi + 1].cpu()
        idx_TK = records[0].idx_BTK[0, lo : hi + 1].cpu()
        for t, pos in enumerate(range(lo, hi + 1)):
            for feature in idx_TK[t][acts_TK[t] != 0].tolist():
                found.setdefault((layer, int(feature)), []).append(pos)
    return {key: tuple(positions) for key, positions in sorted(found.items())}


def to_intervention(proposal: Proposal, end: int, row: int | None = None) -> FeatureIntervention:
    """The splice intervention of a proposal, for sequences shorter than `end`, on batch
    row `row` only (None: every row)."""
    action, value = ("zero", 0.0) if proposal.action == "suppress" else ("scale", proposal.value)
    rows = None if row is None else (row,)
    return FeatureIntervention(
        proposal.layer, proposal.feature, proposal.target_positions(end), action, value, rows
    )


@torch.inference_mode()
def margin_drops(
    adapter: Any,
    tset: TranscoderSet,
    input_ids: Sequence[int],
    position: int,
    proposals: Sequence[Proposal],
) -> list[float]:
    """How much each proposal, applied alone, lowers the margin between the top two
    next-token logits at `position` (the two of the unedited spliced model).

    One forward pass of the spliced model over the ids up to `position`, batched: row 0
    unedited, row b + 1 with proposal b only."""
    device = adapter.unembed_weight.device
    ids = torch.tensor([list(input_ids[: position + 1])] * (len(proposals) + 1), device=device)
    interventions = [to_intervention(p, position + 1, b + 1) for b, p in enumerate(proposals)]
    with splice(adapter, tset, add_error=True, interventions=interventions):
        logits_BV = adapter.model(input_ids=ids, use_cache=False).logits[:, -1].double()
    first, second = torch.topk(logits_BV[0], 2).indices.tolist()
    margin_B = logits_BV[:, first] - logits_BV[:, second]
    return (margin_B[0] - margin_B[1:]).tolist()


@dataclass
class Outcome:
    """One regeneration from a step and its relabelling."""

    condition: str
    """`none` (no intervention), `graph` (a proposal) or `random` (the control)."""
    rank: int
    """Index of the proposal or control among the step's N (-1 for `none`)."""
    proposal: Proposal | None
    regenerated: str
    """Decoded text from the step's first token to the end of the regeneration."""
    changed: bool
    """The regenerated tokens differ from the original step's tokens (compared token by
    token over the original step, so a trace cut off by its token cap still compares)."""
    step_text: str | None
    """Text of the step with the same index in the new completion (None: it has none)."""
    step_correct: bool
    final_answer: str | None
    final_correct: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "rank": self.rank,
            "proposal": self.proposal.to_dict() if self.proposal else None,
            "regenerated": self.regenerated,
            "changed": self.changed,
            "step_text": self.step_text,
            "step_correct": self.step_correct,
            "final_answer": self.final_answer,
            "final_correct": self.final_correct,
        }


def regenerate_batch(
    adapter: Any,
    tset: TranscoderSet,
    tokenizer: Any,
    row: Mapping[str, Any],
    step_index: int,
    span: StepSpan,
    max_new_tokens: int,
    proposals: Sequence[Proposal | None],
    ranks: Sequence[int],
    label: Callable[[str], Labelled] | None = None,
) -> list[Outcome]:
    """Greedy regenerations of `row` from the step's first token, one per proposal (None =
    no intervention), decoded side by side as one batch: every row starts from the same
    token prefix (so no padding) and row b carries only proposal b's intervention.

    Each new completion is the original completion's tokens before the step followed by
    the regenerated tokens; `label` (default: `crv.tasks.label.label_steps` for `row`)
    relabels it, and the step at `step_index` is the regenerated step.
    """
    label = label or (lambda completion: label_steps(dict(row), completion))
    prefix = list(row["input_ids"][: span.first_token])
    end = len(prefix) + max_new_tokens
    interventions = [to_intervention(p, end, b) for b, p in enumerate(proposals) if p is not None]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = adapter.unembed_weight.device
    with torch.inference_mode(), splice(adapter, tset, add_error=True, interventions=interventions):
        generated = generate_from_ids(
            adapter.model,
            [prefix] * len(proposals),
            [max_new_tokens] * len(proposals),
            eos,
            pad,
            device,
        )
    original = list(row["input_ids"][span.first_token : span.last_token + 1])
    offset = int(row["prompt_len"])
    outcomes = []
    for proposal, rank, (new_ids, _) in zip(proposals, ranks, generated, strict=True):
        completion = tokenizer.decode(prefix[offset:] + new_ids, skip_special_tokens=True)
        steps, final_answer, final_correct = label(completion)
        step = steps[step_index] if step_index < len(steps) else None
        outcomes.append(
            Outcome(
                condition=proposal.source if proposal else "none",
                rank=rank,
                proposal=proposal,
                regenerated=tokenizer.decode(new_ids, skip_special_tokens=True),
                changed=new_ids[: len(original)] != original,
                step_text=step["text"] if step else None,
                step_correct=bool(step and step["label"]),
                final_answer=final_answer,
                final_correct=bool(final_correct),
            )
        )
    return outcomes
