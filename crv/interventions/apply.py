"""Regenerating a trace from a step with transcoder features edited, and relabelling it.

The model runs with every layer's transcoder spliced in and its error term added back
(`crv.transcoders.splice`), so with no intervention it computes what the original model
computes (up to float rounding: the output is recon + (y - recon) rather than y), and an
intervention changes one feature's activation and, through its decoder row, nothing else at
that layer. Regeneration keeps the trace's own token ids up to the step's first token (no
re-tokenisation, so absolute positions match the original trace and its graphs) and decodes
greedily from there with a KV cache; the splice reads absolute positions from the cache.

The second-choice baseline (`regenerate_second_choices`) runs the original model, no
splice: it keeps the trace up to the explained token, puts the model's second choice there,
and decodes greedily to the same end; the stage decodes every step's at once.
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
    pair: tuple[int, int] | None = None,
) -> list[float]:
    """How much each proposal, applied alone, lowers the margin logit(first) -
    logit(second) of the next-token logits at `position`: by default the top two of the
    unedited spliced model; `pair` = (first, second) token ids names them (a contrastive
    graph's wrong and correct token).

    One forward pass of the spliced model over the ids up to `position`, batched: row 0
    unedited, row b + 1 with proposal b only."""
    device = adapter.unembed_weight.device
    ids = torch.tensor([list(input_ids[: position + 1])] * (len(proposals) + 1), device=device)
    interventions = [to_intervention(p, position + 1, b + 1) for b, p in enumerate(proposals)]
    with splice(adapter, tset, add_error=True, interventions=interventions):
        logits_BV = adapter.model(input_ids=ids, use_cache=False).logits[:, -1].double()
    first, second = pair or torch.topk(logits_BV[0], 2).indices.tolist()
    margin_B = logits_BV[:, first] - logits_BV[:, second]
    return (margin_B[0] - margin_B[1:]).tolist()


@dataclass
class Outcome:
    """One regeneration from a step and its relabelling."""

    condition: str
    """`none` (no intervention), `graph` (a proposal), or a control: `random`,
    `margin_matched` (`Proposal.source`), `second_choice`."""
    rank: int
    """Index of the proposal or control among the step's N (-1 for `none`)."""
    proposal: Proposal | None
    regenerated: str
    """Decoded text from the step's first token (or the replaced token, if earlier) to the
    end of the regeneration."""
    changed: bool
    """The regenerated tokens differ from the original step's tokens (compared token by
    token over the original step, so a trace cut off by its token cap still compares)."""
    step_text: str | None
    """Text of the step with the same index in the new completion (None: it has none)."""
    step_correct: bool
    final_answer: str | None
    final_correct: bool
    replacement: dict[str, Any] | None = None
    """`second_choice` only: {"position", "original", "replacement"}, the replaced token's
    position in `input_ids` and the two tokens' text."""

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
            "replacement": self.replacement,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Outcome:
        """The outcome `to_dict` gave."""
        proposal = Proposal.from_dict(d["proposal"]) if d["proposal"] else None
        return cls(**{**d, "proposal": proposal})


def relabel(
    tokenizer: Any,
    row: Mapping[str, Any],
    step_index: int,
    span: StepSpan,
    ids: Sequence[int],
    start: int,
    label: Callable[[str], Labelled] | None = None,
) -> dict[str, Any]:
    """The Outcome fields of a regenerated sequence `ids` (the whole `input_ids`, old prefix
    included) that may differ from the original trace from position `start` on; `label`
    (default: `crv.tasks.label.label_steps` for `row`) labels the new completion."""
    label = label or (lambda completion: label_steps(dict(row), completion))
    original = list(row["input_ids"][start : span.last_token + 1])
    offset = int(row["prompt_len"])
    steps, final_answer, final_correct = label(
        tokenizer.decode(ids[offset:], skip_special_tokens=True)
    )
    step = steps[step_index] if step_index < len(steps) else None
    return {
        "regenerated": tokenizer.decode(ids[start:], skip_special_tokens=True),
        "changed": list(ids[start : start + len(original)]) != original,
        "step_text": step["text"] if step else None,
        "step_correct": bool(step and step["label"]),
        "final_answer": final_answer,
        "final_correct": bool(final_correct),
    }


def _generate(
    adapter: Any, tokenizer: Any, prompts: list[list[int]], caps: list[int]
) -> list[list[int]]:
    """Greedy continuations of token-id prompts as one batch (under whatever splice is on)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = adapter.unembed_weight.device
    with torch.inference_mode():
        generated = generate_from_ids(adapter.model, prompts, caps, eos, pad, device)
    return [new_ids for new_ids, _ in generated]


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
    prefix = list(row["input_ids"][: span.first_token])
    end = len(prefix) + max_new_tokens
    interventions = [to_intervention(p, end, b) for b, p in enumerate(proposals) if p is not None]
    n = len(proposals)
    with splice(adapter, tset, add_error=True, interventions=interventions):
        generated = _generate(adapter, tokenizer, [prefix] * n, [max_new_tokens] * n)
    return [
        Outcome(
            condition=proposal.source if proposal else "none",
            rank=rank,
            proposal=proposal,
            **relabel(tokenizer, row, step_index, span, prefix + new_ids, span.first_token, label),
        )
        for proposal, rank, new_ids in zip(proposals, ranks, generated, strict=True)
    ]


@torch.inference_mode()
def second_choice_token(model: Any, input_ids: Sequence[int], position: int) -> int:
    """The original model's most likely next token at `position` other than the trace's own
    token at `position + 1` (its second choice when the trace took its first, as greedy
    decoding does)."""
    device = next(model.parameters()).device
    logits_V = model(input_ids=torch.tensor([list(input_ids[: position + 1])], device=device))
    first, second = torch.topk(logits_V.logits[0, -1], 2).indices.tolist()
    return second if first == int(input_ids[position + 1]) else first


@dataclass(frozen=True)
class SecondChoice:
    """One step's second-choice regeneration to run (see `regenerate_second_choices`)."""

    row: Mapping[str, Any]
    step_index: int
    span: StepSpan
    position: int
    """The explained position: the token at `position + 1` is replaced."""
    max_new_tokens: int
    """As for `regenerate_batch`: the regeneration ends at the step's first token + this."""


def regenerate_second_choices(
    adapter: Any, tokenizer: Any, todo: Sequence[SecondChoice], batch_size: int = 64
) -> list[Outcome | None]:
    """The second-choice baseline of several steps: the trace's token at `position + 1`
    (the prediction the step's graph explains, by default the step's least confident one)
    replaced by the original model's second choice, then greedy decoding by the original
    model, no transcoders, to where `regenerate_batch`'s regeneration ends. The steps are
    decoded together, `batch_size` at a time (left-padded: batched equals alone). None for
    a step whose trace has no token after `position`."""
    prefixes: dict[int, list[int]] = {}
    for i, job in enumerate(todo):
        ids = list(job.row["input_ids"])
        if job.position + 1 < len(ids):
            token = second_choice_token(adapter.model, ids, job.position)
            prefixes[i] = [*ids[: job.position + 1], token]
    caps = {
        i: max(0, todo[i].span.first_token + todo[i].max_new_tokens - len(prefix))
        for i, prefix in prefixes.items()
    }
    order = list(prefixes)
    generated: dict[int, list[int]] = {}
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        new = _generate(adapter, tokenizer, [prefixes[i] for i in chunk], [caps[i] for i in chunk])
        generated.update(zip(chunk, new, strict=True))
    out: list[Outcome | None] = [None] * len(todo)
    for i, prefix in prefixes.items():
        job = todo[i]
        ids = list(job.row["input_ids"])
        start = min(job.span.first_token, job.position + 1)
        fields = relabel(tokenizer, job.row, job.step_index, job.span, prefix + generated[i], start)
        out[i] = Outcome(
            condition="second_choice",
            rank=0,
            proposal=None,
            **fields,
            replacement={
                "position": job.position + 1,
                "original": tokenizer.decode([ids[job.position + 1]]),
                "replacement": tokenizer.decode([prefix[-1]]),
            },
        )
    return out
