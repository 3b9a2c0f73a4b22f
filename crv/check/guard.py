"""Verify while generating (`crv-verify generate=true`): score each reasoning step as its
line ends, replace a flagged step by a correction, and go on from the correction.

The algorithm, for one prompt
-----------------------------
1. The subject model decodes greedily (`crv.generation.GreedyDecoder`: one KV cache for the
   whole trace), keeping each new token's probability.
2. When a token ends a line (and when generation ends), the completion is split with the
   bundle's step pattern and every step that has ended and is not yet scored is scored as
   crv-verify scores a step (`StepVerifier`): its token span, the prediction its graph
   explains (the bundle's `graphs.position`; `least_confident` reads the probabilities kept
   while decoding), its pruned attribution graph, and the bundle's shipped method on its
   graph features (and, when the method reads them, the baselines' scores of the step
   from a forward pass over the trace so far): the scores crv-verify gives the finished
   trace, tested.
   Flagged: score >= threshold.
3. A flagged step is corrected when the policy is not `none`, the trace has corrections
   left (`max_corrections`) and the step is not itself a correction:
   - `intervention`: the step's first proposed intervention (`StepVerifier.propose`, ranked
     as by crv-verify and the interventions stage) is applied in the spliced model with the
     error added back (`crv.transcoders.splice`), which recomputes the sequence from the
     step window's first position and rewrites the step until its line ends; then the plain
     model goes on.
   - `second_choice`: the step's least confident token (the `least_confident` rule of
     `crv.graphs.attribute.step_positions`) is replaced by the model's second choice there
     (`crv.interventions.apply.second_choice_token`, the interventions stage's control), and
     greedy decoding goes on from it.
   The sequence and the KV cache are cut back to where the rewrite starts, so the trace
   before it is kept token for token. The rewritten step is scored when its line ends (the
   correction's `after`) and is never corrected again. A flagged step without a proposal is
   left as it is and costs no correction.
4. Generation ends at an end-of-sequence id, a stop pattern (`stop`), `max_new_tokens` or
   the model's context, as the traces stage's generation does.

With `correct=none` nothing is rewritten: the completion is plain greedy decoding, token for
token (tested against `crv.generation.generate_greedy`).

Cost: no pass over the prefix is repeated while nothing is rewritten. Decoding and the token
probabilities come from one KV cache; the attribution is one `TraceAttributor` extended step
by step (`ReplacementTrace.extend` runs the frozen forward on from the previous step's
position, and rows of earlier positions stay cached), so a step's graph costs its own
backward passes, which run back over the whole prefix, as in the graphs stage. Rebuilding
the attribution per step instead costs more graph time (measured: README.md, "Figures behind
the code"). A rewrite cuts the decoder back
(`GreedyDecoder.truncate`) and starts the attribution anew from the prefix; it adds the
proposal's forward passes (intervention) or one forward over the prefix (second choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crv.check.inputs import Prompt, TraceError, parse_generate
from crv.check.scorer import StepVerifier, proposal_fields
from crv.generation import GreedyDecoder, pattern_stop, stop_ids
from crv.graphs.attribute import Explained, TraceAttributor, span_of, step_positions
from crv.graphs.graph import StepGraph
from crv.interventions.apply import StepSpan, second_choice_token, to_intervention
from crv.shipped import input_rows
from crv.tasks.segment import segment_steps
from crv.tokens import step_token_spans
from crv.transcoders.splice import splice
from crv.verifier.methods import StepInputs


@dataclass
class GuardedTrace:
    """One prompt's guarded generation."""

    prompt_ids: list[int]
    completion_ids: list[int]
    """The final completion's tokens (without the end-of-sequence id)."""
    completion: str
    steps: list[dict[str, Any]]
    """The final trace's steps: index, text, score, flagged, top_features, corrected."""
    corrections: list[dict[str, Any]]
    """Each correction: step, policy, start_char, before {text, score}, after {text, score,
    flagged} (None: the rewrite has no step there), features (the intervention's), replacement
    (second_choice: position, original and replacement token)."""
    ended: str
    """Why generation ended: eos, stop, max_new_tokens or context."""
    n_scored: int = 0
    """Steps scored, rewritten ones included."""

    def fields(self) -> dict[str, Any]:
        """The output record's fields (crv-verify adds id, line and error)."""
        return {
            "completion": self.completion,
            "steps": self.steps,
            "corrections": self.corrections,
            "ended": self.ended,
        }


class Guard:
    """Generates and verifies the steps of prompts with a `StepVerifier`'s bundle and options
    (`correct`, `max_corrections`, `max_new_tokens`, `stop`, `threshold`)."""

    def __init__(self, verifier: StepVerifier) -> None:
        b = verifier.bundle
        self.verifier, self.cfg = verifier, verifier.cfg
        self.threshold = verifier.threshold
        self.eos = set(stop_ids(b.model, b.tokenizer))
        self.should_stop = pattern_stop(b.tokenizer, self.cfg.stop)

    def parse_line(self, raw: bytes, line: int) -> Prompt:
        return parse_generate(raw, line)

    def check(self, prompt: Prompt) -> dict[str, Any]:
        return self.generate(prompt).fields()

    def generate(self, prompt: Prompt) -> GuardedTrace:
        """Write, verify and correct one prompt's chain of thought (see the module docstring)."""
        return _Run(self, prompt).result()


@dataclass
class _Step:
    span: StepSpan
    start_char: int
    record: dict[str, Any]


@dataclass
class _Run:
    """The state of one guarded generation."""

    guard: Guard
    prompt: Prompt
    steps: list[_Step] = field(default_factory=list)
    corrections: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Any] | None = None
    """The last correction, until its rewritten step is scored."""
    attributor: TraceAttributor | None = None
    """The attribution of the trace so far, extended step by step."""
    n_scored: int = 0

    def __post_init__(self) -> None:
        b = self.guard.verifier.bundle
        self.tok = b.tokenizer
        prompt_ids = list(self.tok(self.prompt.prompt)["input_ids"])
        self.prompt_len = len(prompt_ids)
        context = b.max_context
        self.limit = self.prompt_len + self.guard.cfg.max_new_tokens
        if context is not None and context <= self.limit:
            self.limit = context
            if self.prompt_len >= context:
                raise TraceError(
                    f"line {self.prompt.line}: the prompt is {self.prompt_len} tokens, "
                    f"no room left in the model's context of {context} tokens",
                    self.prompt.id,
                )
        self.context = context
        self.trace_id = f"line{self.prompt.line}" if self.prompt.id is None else str(self.prompt.id)
        self.decoder = GreedyDecoder(b.model, prompt_ids)
        self.probs: list[float] = [1.0] * (self.prompt_len - 1)
        """probs[p]: the model's probability of token p + 1 when it was decoded (prompt
        positions are never read)."""

    def result(self) -> GuardedTrace:
        ended = self.decode_line()
        while True:
            rewritten = self.score_ended_steps(final=bool(ended))
            if rewritten is not None:
                ended = rewritten
            elif ended:
                break
            else:
                ended = self.decode_line()
        ids = self.decoder.ids
        return GuardedTrace(
            prompt_ids=ids[: self.prompt_len],
            completion_ids=ids[self.prompt_len :],
            completion=self.completion(),
            steps=[s.record for s in self.steps],
            corrections=self.corrections,
            ended=ended,
            n_scored=self.n_scored,
        )

    # -- decoding ---------------------------------------------------------------------------

    def completion(self) -> str:
        return self.tok.decode(self.decoder.ids[self.prompt_len :], skip_special_tokens=True)

    def push(self, token: int, prob: float) -> str | None:
        """Append one token: "" when it ends a line, why generation ended, or None."""
        self.decoder.feed([token])
        self.probs.append(prob)
        should_stop = self.guard.should_stop
        if should_stop is not None and should_stop(self.decoder.ids[self.prompt_len :]):
            return "stop"
        return "" if "\n" in self.tok.decode([token]) else None

    def decode_line(self) -> str:
        """Decode greedily until a token ends a line ("") or generation ends (why)."""
        while True:
            if len(self.decoder.ids) >= self.limit:
                at_context = self.context is not None and self.limit == self.context
                return "context" if at_context else "max_new_tokens"
            token, prob = self.decoder.next_token()
            if token in self.guard.eos:
                return "eos"
            status = self.push(token, prob)
            if status is not None:
                return status

    # -- scoring ----------------------------------------------------------------------------

    def positions(self, last_tokens: list[int], rule: str) -> list[Explained]:
        """`step_positions` of steps ending at `last_tokens`, with the decoding probabilities."""
        steps = [{"last_token": t} for t in last_tokens]
        return step_positions(steps, self.prompt_len, rule, np.asarray(self.probs))

    def score_ended_steps(self, final: bool) -> str | None:
        """Score the steps that have ended since the last call (all of them once generation
        has ended); when one is corrected, the rewrite's status (see `decode_line`)."""
        v = self.guard.verifier
        completion_ids = self.decoder.ids[self.prompt_len :]
        completion = self.completion()
        spans = segment_steps(completion, v.bundle.step_pattern)
        if not final:
            line_end = completion.rfind("\n")
            spans = [s for s in spans if s[1] <= line_end]
        if len(spans) <= len(self.steps):
            return None
        first, last = step_token_spans(self.tok, completion_ids, completion, spans, self.prompt_len)
        for i in range(len(self.steps), len(spans)):
            span = StepSpan(first[i], last[i])
            position = self.positions(last[: i + 1], v.graphs_cfg.position)[-1]
            graph = self.graph(i, position)
            inputs = v.step_inputs(self.decoder.ids, self.prompt_len, last[: i + 1])
            if inputs is not None:
                inputs = input_rows(inputs, [i])
            score = float(v.scores([graph], inputs)[0])
            flagged = score >= self.guard.threshold
            text = completion[spans[i][0] : spans[i][1]]
            rewrite = self.pending is not None and self.pending["start_char"] == spans[i][0]
            record = {
                "index": i,
                "text": text,
                "score": score,
                "flagged": flagged,
                "top_features": v.top_features(graph),
                "corrected": rewrite,
            }
            self.steps.append(_Step(span, spans[i][0], record))
            self.n_scored += 1
            if rewrite:
                self.pending["after"] = {"text": text, "score": score, "flagged": flagged}
            self.pending = None
            if flagged and not rewrite and self.may_correct():
                status = self.correct(i, graph, inputs)
                if status is not None:
                    return status
        return None

    def graph(self, i: int, position: Explained) -> StepGraph:
        """Step i's pruned graph, explaining the prediction at `position`: the trace's
        attribution goes on from the previous step's (`TraceAttributor.extend`), or starts
        anew after a rewrite cut it back."""
        v = self.guard.verifier
        b, cfg, ids = v.bundle, v.graphs_cfg, self.decoder.ids
        first = min(span_of(position))
        if first < 1:  # position 0 (bos) has no sources to explain it from
            raise TraceError(f"line {self.prompt.line}: the prompt has no token before step 0")
        if self.attributor is None or first < self.attributor.trace.n_positions:
            self.attributor = TraceAttributor(b.adapter, b.transcoders, ids, [position], cfg)
        else:
            self.attributor.extend(ids, [position])
        att = self.attributor.attribute_step(position, i, self.trace_id)
        return att.pruned(cfg.node_threshold, cfg.edge_threshold)

    # -- correcting -------------------------------------------------------------------------

    def may_correct(self) -> bool:
        cfg = self.guard.cfg
        return cfg.correct != "none" and len(self.corrections) < cfg.max_corrections

    def correct(self, i: int, graph: StepGraph, inputs: StepInputs | None) -> str | None:
        """Rewrite flagged step i (its baselines' `inputs`, when the bundle's method reads
        them) by the policy; the rewrite's status, or None when there is nothing to apply
        (no proposal)."""
        step = self.steps[i]
        entry: dict[str, Any] = {
            "step": i,
            "policy": str(self.guard.cfg.correct),
            "start_char": step.start_char,
            "before": {"text": step.record["text"], "score": step.record["score"]},
            "after": None,
            "features": [],
            "replacement": None,
        }
        if self.guard.cfg.correct == "intervention":
            status = self.intervene(i, graph, inputs, entry)
        else:
            status = self.second_choice(i, entry)
        if status is not None:
            self.corrections.append(entry)
            self.pending = entry
        return status

    def cut(self, i: int, keep: int) -> None:
        """Forget steps i.., the probabilities of tokens from `keep` on and an attribution
        that reaches them (the decoder is cut by the caller, under whatever splice the
        rewrite needs)."""
        del self.steps[i:]
        del self.probs[keep - 1 :]
        if self.attributor is not None and self.attributor.trace.n_positions > keep:
            self.attributor = None

    def intervene(
        self, i: int, graph: StepGraph, inputs: StepInputs | None, entry: dict[str, Any]
    ) -> str | None:
        v = self.guard.verifier
        span = self.steps[i].span
        proposals = v.propose(self.decoder.ids, span, graph, inputs)
        if not proposals:
            return None
        best = proposals[0]
        entry["features"] = [{**proposal_fields(best), "label": v.label(best.layer, best.feature)}]
        b = v.bundle
        edit = to_intervention(best, self.limit)
        self.cut(i, span.first_token)
        with splice(b.adapter, b.transcoders, add_error=True, interventions=[edit]):
            self.decoder.truncate(span.first_token, recompute_from=best.start)
            return self.decode_line()

    def second_choice(self, i: int, entry: dict[str, Any]) -> str:
        span = self.steps[i].span  # the step's own tokens: predictions first - 1 .. last - 1
        position = self.positions([span.first_token - 1, span.last_token], "least_confident")[-1]
        ids = self.decoder.ids
        original = ids[position + 1]
        token = second_choice_token(self.guard.verifier.bundle.model, ids, position)
        entry["replacement"] = {
            "position": position + 1,
            "original": self.tok.decode([original]),
            "replacement": self.tok.decode([token]),
        }
        self.cut(i, position + 1)
        self.decoder.truncate(position + 1)
        status = self.push(token, self.decoder.probability(token))
        return self.decode_line() if status is None else status
