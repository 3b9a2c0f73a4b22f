"""Scoring the steps of a parsed trace with an exported bundle (`StepVerifier`).

The model sees the trace's `prompt` tokenised with its special tokens (bos) followed by the
completion tokenised without them, exactly as traces were tokenised for training; a trace
longer than the model's context is cut there, and the steps that end beyond it are not
scored. Each step's attribution graph explains the prediction the bundle's
`graphs.position` picks; its pruned graph gives the bundle's graph features. The step's
score is the bundle's shipped method (`crv.shipped`: the one that won on validation) on
what it reads: the graph features, and, when it reads them, the baselines stage's
confidence scores and probe inputs of the step (`crv.shipped.step_inputs`, one more forward
pass of the trace); it is flagged at the threshold. A flagged
step gets the single-feature interventions `crv.interventions.propose` ranks first and,
with `intervene`, a greedy regeneration with the first of them applied to the spliced
transcoders.

Each trace costs one forward pass of the subject for all of its steps (the attribution
module's shared per-trace path) plus the attribution's backward passes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crv.check.inputs import Trace, TraceError, parse_trace
from crv.shipped import input_rows

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from crv.bundle import Bundle
    from crv.check.config import VerifyConfig
    from crv.graphs.graph import StepGraph
    from crv.interventions.apply import StepSpan
    from crv.interventions.propose import Proposal
    from crv.verifier.methods import StepInputs


@dataclass
class Encoded:
    """A trace as the model sees it, with each step's first and last token index."""

    input_ids: list[int]
    prompt_len: int
    first_tokens: list[int]
    last_tokens: list[int]
    n_fit: int
    """Steps that end inside the model's context (all of them, unless the trace is longer);
    `input_ids` is cut at the context length."""
    warnings: list[str | None]
    """Per step: the characters the tokenizer cannot represent (dropped), or None."""


class StepVerifier:
    """Scores the steps of parsed traces with a loaded bundle (one forward pass per trace)."""

    def __init__(self, bundle: Bundle, cfg: VerifyConfig) -> None:
        self.bundle, self.cfg = bundle, cfg
        self.threshold = bundle.threshold if cfg.threshold is None else float(cfg.threshold)
        self.graphs_cfg = bundle.graphs
        if cfg.batch_size is not None:
            self.graphs_cfg = dataclasses.replace(self.graphs_cfg, batch_size=cfg.batch_size)
        self.exporter = None
        if cfg.export_graphs is not None:
            from crv.graphs.export import GraphExporter

            self.exporter = GraphExporter(
                cfg.export_graphs,
                bundle.tokenizer,
                bundle.adapter.n_layers,
                f"crv-{Path(cfg.bundle or 'bundle').name}",
                self.graphs_cfg.node_threshold,
                self.graphs_cfg.edge_threshold,
                bundle.cards,
            )

    def parse_line(self, raw: bytes, line: int) -> Trace:
        """An input line as a trace (`parse_trace` with the bundle's step pattern)."""
        return parse_trace(raw, line, self.bundle.step_pattern)

    def check(self, trace: Trace) -> dict[str, Any]:
        """The output record's fields of a trace: its step records."""
        return {"steps": self.verify(trace)}

    def encode(self, trace: Trace) -> Encoded:
        """Token ids of prompt + completion and each step's token span; TraceError when the
        trace does not fit the model's context."""
        from crv.tokens import step_token_spans

        tok = self.bundle.tokenizer
        prompt_ids = tok(trace.prompt)["input_ids"]
        completion_ids = tok(trace.completion, add_special_tokens=False)["input_ids"]
        ids = list(prompt_ids) + list(completion_ids)
        offset = len(prompt_ids)
        first, last = step_token_spans(tok, completion_ids, trace.completion, trace.spans, offset)
        limit = self.bundle.max_context
        n_fit = len(last) if limit is None else sum(t < limit for t in last)
        if n_fit == 0:
            raise TraceError(
                f"line {trace.line}: the trace is {len(ids)} tokens and its first step ends "
                f"beyond the model's context of {limit} tokens"
            )
        if limit is not None:
            ids = ids[:limit]
        warnings = [unrepresentable(tok, trace.completion[s:e]) for s, e in trace.spans]
        return Encoded(ids, offset, first[:n_fit], last[:n_fit], n_fit, warnings)

    def graphs(self, trace: Trace, enc: Encoded) -> list[StepGraph]:
        """The pruned step graphs of all steps of a trace, from one shared forward pass
        (written for the viewer too with `export_graphs`)."""
        from crv.graphs.attribute import attribute_trace, explained_positions, span_of

        b, cfg = self.bundle, self.graphs_cfg
        steps = [{"last_token": t} for t in enc.last_tokens]
        positions = explained_positions(
            b.adapter.model, enc.input_ids, steps, enc.prompt_len, cfg.position
        )
        if (
            min(min(span_of(p)) for p in positions) < 1
        ):  # position 0 (bos) has no sources to explain it from
            raise TraceError(
                f"line {trace.line}: the prompt is empty; step 0 has no token before it"
            )
        trace_id = f"line{trace.line}" if trace.id is None else str(trace.id)
        atts = attribute_trace(b.adapter, b.transcoders, enc.input_ids, positions, cfg, trace_id)
        if self.exporter is not None:
            for att in atts:
                self.exporter.add(att, enc.input_ids, f"{trace_id}-step{att.step}")
        return [att.pruned(cfg.node_threshold, cfg.edge_threshold) for att in atts]

    def feature_frame(self, graphs: list[StepGraph]) -> pd.DataFrame:
        """The verifier's input rows (one per graph) in the bundle's feature order."""
        import pandas as pd

        from crv.features.compute import graph_features

        b = self.bundle
        rows = [graph_features(g, b.n_layers_features, b.features, b.feature_seed) for g in graphs]
        return pd.DataFrame(rows, columns=b.feature_names).astype("float64")

    def label(self, layer: int, feature: int) -> str | None:
        """The feature card's label, None when the bundle has no cards."""
        cards = self.bundle.cards
        return cards.label(layer, feature) if cards is not None else None

    def step_inputs(
        self, input_ids: list[int], prompt_len: int, last_tokens: list[int]
    ) -> StepInputs | None:
        """The baselines' numbers of the steps ending at `last_tokens` when the shipped
        method reads more than graph features (None otherwise)."""
        from crv.shipped import step_inputs

        b = self.bundle
        needs = b.method.needs
        if not needs - {"features"}:
            return None
        device = str(next(b.model.parameters()).device)
        tset = b.transcoders if "latents" in needs else None
        return step_inputs(
            b.model, input_ids, prompt_len, last_tokens, b.baselines, b.temperature, tset, device
        )

    def scores(self, graphs: list[StepGraph], inputs: StepInputs | None) -> np.ndarray:
        """The shipped method's score of each step from its graph and its `inputs` (rows
        aligned with `graphs`; None when the method reads only graph features)."""
        from crv.verifier.methods import StepInputs

        x = dataclasses.replace(inputs or StepInputs(), features=self.feature_frame(graphs))
        return self.bundle.method.score(x)

    def top_features(self, graph: StepGraph) -> list[dict[str, Any]]:
        """The graph's `top_features` most influential features, labelled."""
        from crv.interventions.propose import candidate_influence

        influence = candidate_influence(graph, 0)
        top = sorted(influence, key=lambda key: (-influence[key], key))[: self.cfg.top_features]
        return [
            {
                "layer": layer,
                "feature": feature,
                "label": self.label(layer, feature),
                "influence": influence[layer, feature],
            }
            for layer, feature in top
        ]

    def verify(self, trace: Trace) -> list[dict[str, Any]]:
        """The step records of one trace (the `steps` of `crv-verify`'s output records)."""
        enc = self.encode(trace)
        graphs = self.graphs(trace, enc)
        inputs = self.step_inputs(enc.input_ids, enc.prompt_len, enc.last_tokens)
        scores = self.scores(graphs, inputs)
        records = []
        for i, ((start, end), graph, score) in enumerate(
            zip(trace.spans[: enc.n_fit], graphs, scores, strict=True)
        ):
            flagged = bool(score >= self.threshold)
            record: dict[str, Any] = {
                "index": i,
                "text": trace.completion[start:end],
                "score": float(score),
                "flagged": flagged,
                "top_features": self.top_features(graph),
                "interventions": [],
            }
            if enc.warnings[i]:
                record["warning"] = enc.warnings[i]
            if flagged:
                step = input_rows(inputs, [i]) if inputs is not None else None
                record.update(self.interventions(enc, i, graph, step))
            elif self.cfg.intervene:
                record["regenerated"] = None
            records.append(record)
        limit = self.bundle.max_context
        for i, (start, end) in enumerate(trace.spans[enc.n_fit :], start=enc.n_fit):
            records.append(
                {
                    "index": i,
                    "text": trace.completion[start:end],
                    "error": f"beyond context: the step ends past the model's {limit} tokens",
                }
            )
        return records

    def propose(
        self, input_ids: list[int], span: StepSpan, graph: StepGraph, inputs: StepInputs | None
    ) -> list[Proposal]:
        """The `n_interventions` interventions `crv.interventions.propose` ranks first for
        the step at `span` of `input_ids` whose graph is `graph` (`rank_by=verifier` scores
        the edited graphs with the step's own `inputs`)."""
        from crv.interventions.apply import active_features, margin_drops
        from crv.interventions.propose import propose

        cfg, b = self.cfg, self.bundle
        window = span.window(graph.position)
        active = active_features(b.adapter, b.transcoders, input_ids, window)
        return propose(
            graph,
            window,
            active,
            cfg.n_interventions,
            cfg.rank_by,
            cfg.action,
            cfg.amplify_scale,
            cfg.scope,
            score_graph=lambda g: float(self.scores([g], inputs)[0]),
            margin_drops=lambda ps: margin_drops(
                b.adapter, b.transcoders, input_ids, graph.position, ps
            ),
        )

    def interventions(
        self, enc: Encoded, i: int, graph: StepGraph, inputs: StepInputs | None
    ) -> dict[str, Any]:
        """Proposed interventions of a flagged step (its `inputs`: `step_inputs`' row) and,
        with `intervene`, the regeneration."""
        from crv.interventions.apply import StepSpan, regenerate_batch
        from crv.tasks.label import unlabelled_steps

        cfg, b = self.cfg, self.bundle
        span = StepSpan(enc.first_tokens[i], enc.last_tokens[i])
        proposals = self.propose(enc.input_ids, span, graph, inputs)
        out: dict[str, Any] = {"interventions": [proposal_fields(p) for p in proposals]}
        if not cfg.intervene:
            return out
        if not proposals:
            out["regenerated"] = None
            return out
        # no checker for a user's trace: the new completion is only split into steps,
        # with the bundle's own step pattern, and the step with the same index is kept
        row = {"input_ids": enc.input_ids, "prompt_len": enc.prompt_len}
        n_new = span.last_token - span.first_token + 1 + cfg.regen_extra_tokens
        [outcome] = regenerate_batch(
            b.adapter,
            b.transcoders,
            b.tokenizer,
            row,
            i,
            span,
            n_new,
            proposals[:1],
            [0],
            label=lambda completion: unlabelled_steps(completion, b.step_pattern),
        )
        out["regenerated"] = {
            "intervention": 0,
            "step": outcome.step_text,
            "continuation": outcome.regenerated,
        }
        return out


def unrepresentable(tokenizer: Any, text: str) -> str | None:
    """A warning naming the characters of `text` that do not survive tokenisation (a small
    vocabulary drops them silently: `14 🤔` would score exactly as `14`), or None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lost = sorted(set(text) - set(tokenizer.decode(ids, skip_special_tokens=True)))
    if not lost:
        return None
    return f"characters the tokenizer cannot represent were dropped: {''.join(lost)!r}"


def proposal_fields(p: Proposal) -> dict[str, Any]:
    """A proposed intervention as an output record names it."""
    return {"layer": p.layer, "feature": p.feature, "action": p.action, "scale": p.value}
