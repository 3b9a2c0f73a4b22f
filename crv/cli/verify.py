"""`crv-verify`: score every reasoning step of a user's traces with an exported bundle.

Usage (Hydra overrides)::

    crv-verify bundle=PATH input=traces.jsonl output=scores.jsonl [intervene=true] [format=table]
        [export_graphs=DIR]
    crv-verify bundle=PATH input=prompts.jsonl output=out.jsonl generate=true [correct=...]

`input=-` reads standard input and `output=-` writes standard output.

**Input**: JSONL, one trace per line, either ``{"id": optional str, "prompt": str,
"steps": [str, ...]}`` or ``{"id": ..., "prompt": str, "completion": str}``. A completion is
split into steps with the bundle's step regex. Given `steps`, the completion is their
concatenation joined by "\\n" (no trailing newline), so the same trace given either way is
tokenised identically and gets the same scores. The model sees `prompt` tokenised with its
special tokens (bos) followed by the completion tokenised without them, exactly as traces
were tokenised for training. Blank lines are skipped; every other line gets one record.

**Output**: JSONL, one record per input line, in input order::

    {"id", "line", "steps": [{"index", "text", "score", "flagged", "top_features":
     [{"layer", "feature", "label", "influence"}], "interventions": [{"layer", "feature", "action",
     "scale"}]}], "error": null}

`id` echoes the input's (null when absent or unreadable) and `line` is the 1-based input
line number. `score` is the verifier's probability that the step is incorrect; `flagged` is
`score >= threshold` (the threshold chosen on validation data, stored in the bundle).
`top_features` are the transcoder features of the step's attribution graph with the most
influence on the explained prediction, each with its feature card's short `label` (null for
a bundle without cards); `interventions` (flagged steps only) are the
single-feature edits `crv.interventions.propose` ranks first (`scale` multiplies the
activation: 0 suppresses). With `intervene=true` every step also gets `regenerated`: null
for an unflagged step (or one without proposals), else `{"intervention": 0, "step": the regenerated step's text (null
if the regeneration has no such step), "continuation": the text generated from the step's
first token}`, greedy, with the first intervention applied to the spliced transcoders.

A line that cannot be verified (not UTF-8, not JSON, no `prompt`, no steps, an empty or
non-string step, a first step beyond the model's context) gets a record whose `error` names
the line number and the problem; the other lines are still verified. A trace longer than
the context has every step that fits scored and the others marked `"error": "beyond
context: ..."`; a step with characters the tokenizer cannot represent (dropped, so they
cannot count) gets a `warning` naming them. A human-readable table
goes to stderr (or is the output with `format=table`), with a progress bar for long inputs.

**Verify while generating** (`generate=true [correct=none|intervention|second_choice]
[max_corrections=2]`): each input line is a prompt, ``{"id": optional str, "prompt": str}``
(a line with `steps` or `completion` is an error), and the model writes the steps; each is
scored as its line ends and a flagged one is corrected (`crv.cli.guard`). The record adds
`completion` (the final one), `corrections` (step, policy, before, after, features,
replacement) and `ended` (eos, stop, max_new_tokens, context); each step has `corrected`.

**Exit status**: 0 when every step of every line was scored, 1 when some lines or steps
failed, 2 when nothing
could run (bad or damaged bundle, unreadable input, unwritable output), with a one-line error and
no traceback; 130 when interrupted. A regular output file is written atomically
(`crv.io.atomic_write`): an interrupted run leaves a previous output file untouched and
never a truncated one; stdout, a FIFO, a device or a link is written in place.

Each trace costs one forward pass of the subject for all of its steps (the attribution
module's shared per-trace path) plus the attribution's backward passes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from crv.interventions.config import Action, RankBy, Scope
from crv.options import Choice, check_choices
from crv.traces.config import STOP_PATTERNS

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from crv.bundle import Bundle
    from crv.graphs.graph import StepGraph
    from crv.interventions.apply import StepSpan
    from crv.interventions.propose import Proposal

STDIO = "-"


class OutputFormat(Choice):
    """What `crv-verify` writes (see `VerifyConfig.format`)."""

    jsonl = "jsonl"
    table = "table"


class Correct(Choice):
    """How `generate=true` corrects a flagged step (see `crv.cli.guard`)."""

    none = "none"
    intervention = "intervention"
    second_choice = "second_choice"


@dataclass
class VerifyConfig:
    """Options of `crv-verify` (Hydra overrides, e.g. `bundle=DIR input=- output=out.jsonl`)."""

    bundle: str | None = None
    """Bundle directory exported by the pipeline's `bundle` stage (see artifacts.json)."""

    input: str = STDIO
    """JSONL file of traces; `-` reads standard input."""

    output: str = STDIO
    """Where the records go; `-` writes standard output. A file is replaced atomically."""

    format: OutputFormat = OutputFormat.jsonl
    """jsonl: one JSON record per input line; table: the human-readable table instead."""

    intervene: bool = False
    """Also regenerate each flagged step with its first proposed intervention applied."""

    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""

    model: str | None = None
    """Load the subject model from this HF directory instead of the bundle's (it must be
    the same model: dimensions, vocabulary and config hash are checked)."""

    threshold: float | None = None
    """Flag steps with score >= this instead of the bundle's validation threshold."""

    top_features: int = 5
    """Features listed per step, by summed influence in the step's graph."""

    n_interventions: int = 3
    """Interventions proposed per flagged step."""

    rank_by: RankBy = RankBy.margin
    """How interventions are ranked: influence, verifier, layer or margin (see
    crv.interventions.propose)."""

    action: Action = Action.suppress
    """suppress (activation to 0) or amplify (activation times `amplify_scale`)."""

    amplify_scale: float = 2.0
    """Activation factor of the amplify action."""

    scope: Scope = Scope.step
    """step: intervene where the feature was active in the step; onward: from the step on."""

    regen_extra_tokens: int = 16
    """Regeneration length: the step's own token count plus this many tokens."""

    batch_size: int | None = None
    """Rows per attribution backward pass; default the bundle's (speed and memory only)."""

    progress_min_lines: int = 10
    """Show a progress bar on stderr for inputs of at least this many lines."""

    quiet: bool = False
    """No table and no progress bar on stderr."""

    export_graphs: str | None = None
    """Also write every step's graph into this directory as circuit-tracer graph JSON, for
    circuit-tracer's viewer (see `crv-graphs export`); slugs `<id or lineN>-step<i>`."""

    generate: bool = False
    """Verify while generating: the model writes each prompt's chain of thought greedily and
    every step is scored as its line ends (input: prompts only; see `crv.cli.guard`)."""

    correct: Correct = Correct.none
    """With generate=true, what replaces a flagged step: none (flag only), intervention (its
    first proposed feature intervention) or second_choice (its least confident token
    replaced by the model's second choice)."""

    max_corrections: int = 2
    """With generate=true, corrections per trace at most."""

    max_new_tokens: int = 256
    """With generate=true, generated tokens per prompt at most (and the model's context)."""

    stop: list[str] = field(default_factory=lambda: list(STOP_PATTERNS))
    """With generate=true, regexes (multiline) over the completion that end it, as the
    traces stage's `traces.stop`."""

    def __post_init__(self) -> None:
        check_choices(self, "")
        if self.max_corrections < 0 or self.max_new_tokens < 1:
            raise ValueError("max_corrections must be >= 0 and max_new_tokens >= 1")


class TraceError(ValueError):
    """A problem with one input line; its message names the line and the problem."""

    def __init__(self, message: str, trace_id: str | None = None) -> None:
        super().__init__(message)
        self.trace_id = trace_id
        """The line's `id` when it could be read, for the error record."""


@dataclass
class Trace:
    """One parsed input line: the text the model sees and the steps' character spans."""

    line: int
    id: str | None
    prompt: str
    completion: str
    spans: list[tuple[int, int]]


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of every non-blank line, without line endings."""
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not content
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if raw.strip():
            yield number, raw


@dataclass
class Prompt:
    """One parsed input line of `generate=true`: a prompt whose steps the model writes."""

    line: int
    id: str | None
    prompt: str


def _fail(line: int, problem: str, trace_id: str | None = None) -> TraceError:
    return TraceError(f"line {line}: {problem}", trace_id)


def parse_prompt(raw: bytes, line: int) -> tuple[dict[str, Any], Prompt]:
    """Decode one input line and read its `id` and `prompt` (the JSON object too, for the
    rest of the record); TraceError naming the problem otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(
            line, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise _fail(line, f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("id") is not None and not isinstance(obj["id"], str):
        raise _fail(line, f"'id' must be a string, got {type(obj['id']).__name__}")
    trace_id = obj.get("id")
    if "prompt" not in obj:
        raise _fail(line, "missing 'prompt'", trace_id)
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise _fail(line, f"'prompt' must be a string, got {type(prompt).__name__}", trace_id)
    return obj, Prompt(line, trace_id, prompt)


def parse_generate(raw: bytes, line: int) -> Prompt:
    """One input line of `generate=true`: a prompt only (the model writes the steps)."""
    obj, prompt = parse_prompt(raw, line)
    given = [key for key in ("steps", "completion") if key in obj]
    if given:
        raise _fail(
            line,
            f"generate=true writes the steps itself: give only 'id' and 'prompt' "
            f"(the line has {given[0]!r})",
            prompt.id,
        )
    if not prompt.prompt.strip():
        raise _fail(line, "the prompt is empty", prompt.id)
    return prompt


def parse_trace(raw: bytes, line: int, step_pattern: str) -> Trace:
    """Decode and validate one input line; TraceError naming the problem otherwise."""
    from crv.tasks.segment import segment_steps

    obj, header = parse_prompt(raw, line)
    trace_id, prompt = header.id, header.prompt

    def fail(problem: str) -> TraceError:
        return _fail(line, problem, trace_id)

    if "steps" in obj and "completion" in obj:
        raise fail("give either 'steps' or 'completion', not both")
    if "steps" in obj:
        steps = obj["steps"]
        if not isinstance(steps, list):
            raise fail(f"'steps' must be a list of strings, got {type(steps).__name__}")
        if not steps:
            raise fail("no steps: 'steps' is empty")
        spans, start = [], 0
        for i, step in enumerate(steps):
            if not isinstance(step, str):
                raise fail(f"step {i} is not a string (got {type(step).__name__})")
            if not step.strip():
                raise fail(f"step {i} is empty")
            spans.append((start, start + len(step)))
            start += len(step) + 1
        return Trace(line, trace_id, prompt, "\n".join(steps), spans)
    if "completion" not in obj:
        raise fail("no steps: give 'steps' (a list of strings) or 'completion' (a string)")
    completion = obj["completion"]
    if not isinstance(completion, str):
        raise fail(f"'completion' must be a string, got {type(completion).__name__}")
    spans = segment_steps(completion, step_pattern)
    if not spans:
        raise fail("no steps: the completion has no step matching the bundle's step pattern")
    return Trace(line, trace_id, prompt, completion, spans)


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
        from crv.graphs.attribute import attribute_trace, explained_positions

        b, cfg = self.bundle, self.graphs_cfg
        steps = [{"last_token": t} for t in enc.last_tokens]
        positions = explained_positions(
            b.adapter.model, enc.input_ids, steps, enc.prompt_len, cfg.position
        )
        if min(positions) < 1:  # position 0 (bos) has no sources to explain it from
            raise TraceError(
                f"line {trace.line}: the prompt is empty; step 0 has no token before it"
            )
        trace_id = trace.id or f"line{trace.line}"
        atts = attribute_trace(b.adapter, b.transcoders, enc.input_ids, positions, cfg, trace_id)
        if self.exporter is not None:
            for att in atts:
                self.exporter.add(att, enc.input_ids, f"{trace_id}-step{att.step}")
        return [att.pruned(cfg.node_threshold, cfg.edge_threshold) for att in atts]

    def feature_frame(self, graphs: list[StepGraph]) -> pd.DataFrame:
        """The verifier's input rows (one per graph) in the bundle's feature order."""
        import pandas as pd

        from crv.features.stage import graph_features

        b = self.bundle
        rows = [graph_features(g, b.n_layers_features, b.features, b.feature_seed) for g in graphs]
        return pd.DataFrame(rows, columns=b.feature_names).astype("float64")

    def label(self, layer: int, feature: int) -> str | None:
        """The feature card's label, None when the bundle has no cards."""
        cards = self.bundle.cards
        return cards.label(layer, feature) if cards is not None else None

    def score_graph(self, graph: StepGraph) -> float:
        """P(incorrect) of one graph (used to rank interventions by verifier effect)."""
        return float(self.scores([graph])[0])

    def scores(self, graphs: list[StepGraph]) -> np.ndarray:
        """The verifier's P(incorrect) of each graph."""
        return self.bundle.verifier.predict_proba(self.feature_frame(graphs))

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
        """The step records of one trace (see the module docstring)."""
        enc = self.encode(trace)
        graphs = self.graphs(trace, enc)
        scores = self.scores(graphs)
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
                record.update(self.interventions(trace, enc, i, graph))
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

    def propose(self, input_ids: list[int], span: StepSpan, graph: StepGraph) -> list[Proposal]:
        """The `n_interventions` interventions `crv.interventions.propose` ranks first for
        the step at `span` of `input_ids` whose graph is `graph`."""
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
            score_graph=self.score_graph,
            margin_drops=lambda ps: margin_drops(
                b.adapter, b.transcoders, input_ids, graph.position, ps
            ),
        )

    def interventions(self, trace: Trace, enc: Encoded, i: int, graph: StepGraph) -> dict[str, Any]:
        """Proposed interventions of a flagged step and, with `intervene`, the regeneration."""
        from crv.interventions.apply import StepSpan, regenerate_batch
        from crv.tasks.label import unlabelled_steps

        cfg, b = self.cfg, self.bundle
        span = StepSpan(enc.first_tokens[i], enc.last_tokens[i])
        proposals = self.propose(enc.input_ids, span, graph)
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


class LineWorker(Protocol):
    """What checks input lines: `StepVerifier` (traces) or `crv.cli.guard.Guard` (prompts)."""

    threshold: float

    def parse_line(self, raw: bytes, line: int) -> Trace | Prompt: ...

    def check(self, item: Any) -> dict[str, Any]: ...


def verify_line(worker: LineWorker, line: int, raw: bytes) -> dict[str, Any]:
    """The output record of one input line; problems become the record's `error`."""
    trace_id = None
    try:
        item = worker.parse_line(raw, line)
        trace_id = item.id
        fields = worker.check(item)
    except TraceError as exc:
        return {"id": exc.trace_id or trace_id, "line": line, "steps": [], "error": str(exc)}
    except Exception as exc:  # one bad trace must not stop the others
        return {
            "id": trace_id,
            "line": line,
            "steps": [],
            "error": f"line {line}: cannot verify: {type(exc).__name__}: {exc}",
        }
    return {"id": trace_id, "line": line, **fields, "error": None}


def _shorten(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(records: list[dict[str, Any]], threshold: float) -> str:
    """Records as a fixed-width table: one row per step, one per failed line, a summary
    (`generate=true`: a rewritten step's flag column has `*`)."""
    rows = [
        f"{'line':>5}  {'id':<14} {'step':>4}  {'score':>6}  {'flag':<4}  {'top feature':<20} text"
    ]
    n_steps = n_flagged = 0
    for rec in records:
        rid = _shorten(rec["id"] or "-", 14)
        if rec["error"] is not None:
            rows.append(
                f"{rec['line']:>5}  {rid:<14} {'-':>4}  {'-':>6}  {'ERR':<4}  {rec['error']}"
            )
            continue
        for step in rec["steps"]:
            if "error" in step:
                rows.append(
                    f"{rec['line']:>5}  {rid:<14} {step['index']:>4}  {'-':>6}  {'ERR':<4}  "
                    f"{step['error']}"
                )
                continue
            n_steps += 1
            n_flagged += step["flagged"]
            top = step["top_features"][0] if step["top_features"] else None
            feat = f"L{top['layer']}/F{top['feature']} ({top['influence']:.3g})" if top else "-"
            flag = ("!!" if step["flagged"] else "") + ("*" if step.get("corrected") else "")
            rows.append(
                f"{rec['line']:>5}  {rid:<14} {step['index']:>4}  {step['score']:>6.3f}  "
                f"{flag:<4}  {feat:<20} {_shorten(step['text'], 60)}"
            )
    failed = sum(rec["error"] is not None for rec in records)
    n_corrections = sum(len(rec.get("corrections") or ()) for rec in records)
    corrected = f", {n_corrections} corrections (* rewritten)" if n_corrections else ""
    rows.append(
        f"{len(records)} traces ({len(records) - failed} verified, {failed} failed), "
        f"{n_steps} steps, {n_flagged} flagged at threshold {threshold:.4g}{corrected}"
    )
    return "\n".join(rows) + "\n"


class _Failure(Exception):
    """A run-level failure: printed as one line, exit status 2."""


def _read_input(source: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if source == STDIO else Path(source).read_bytes()
    except OSError as exc:
        raise _Failure(f"cannot read input {source}: {exc.strerror or exc}") from None


def _check_config(cfg: VerifyConfig) -> None:
    if not cfg.bundle:
        raise _Failure("no bundle given: crv-verify bundle=PATH input=FILE output=FILE")
    if cfg.generate and (cfg.intervene or cfg.export_graphs is not None):
        option = "intervene=true" if cfg.intervene else "export_graphs"
        raise _Failure(f"generate=true corrects steps with correct=...; {option} is for traces")


def _load_quietly(cfg: VerifyConfig) -> Bundle:
    """The bundle, loaded without transformers' weight-loading progress bar (stderr is for
    the command's own table and progress)."""
    from transformers.utils import logging as hf_logging

    from crv.bundle import BundleError, load_bundle
    from crv.device import resolve_device

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_bundle(cfg.bundle, resolve_device(cfg.device), cfg.model)
    except BundleError as exc:
        raise _Failure(str(exc)) from None
    except Exception as exc:  # a damaged file inside the bundle, whatever the library says
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _Failure(f"cannot load bundle {cfg.bundle}: {type(exc).__name__}: {first}") from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def run_verify(
    cfg: VerifyConfig, verifier: LineWorker, lines: list[tuple[int, bytes]], sink: IO[str]
) -> list[dict[str, Any]]:
    """Verify `lines` in order, streaming JSONL records to `sink` (`format=jsonl`) or the
    table at the end (`format=table`); returns the records."""
    from tqdm.auto import tqdm

    show_progress = not cfg.quiet and len(lines) >= cfg.progress_min_lines
    records = []
    for line, raw in tqdm(
        lines, desc="verify", unit="trace", file=sys.stderr, disable=not show_progress
    ):
        record = verify_line(verifier, line, raw)
        records.append(record)
        if cfg.format == "jsonl":
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    if cfg.format == "table":
        sink.write(render_table(records, verifier.threshold))
    return records


def _writes_in_place(target: str) -> bool:
    """Whether `target` must be written directly: stdout, a FIFO, a device, a link. Only a
    regular file (or a new path) is replaced atomically; replacing anything else would
    swap the pipe, device node or link for a regular file its reader never sees."""
    if target == STDIO:
        return True
    path = Path(target)
    return path.is_symlink() or (path.exists() and not path.is_file())


def _write_output(
    target: str, produce: Callable[[IO[str]], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Run `produce` into stdout or a special file directly, or into a regular file
    atomically (all or nothing)."""
    from crv.io import atomic_write

    result: list[list[dict[str, Any]]] = []

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as sink:
            result.append(produce(sink))

    try:
        if target == STDIO:
            result.append(produce(sys.stdout))
            sys.stdout.flush()
        elif _writes_in_place(target):
            write(Path(target))
        else:
            atomic_write(target, write)
    except OSError as exc:
        if target == STDIO:
            _silence_stdout()
        kept = "" if _writes_in_place(target) else "; it was left unchanged"
        raise _Failure(f"cannot write output {target}: {exc.strerror or exc}{kept}") from None
    return result[0]


def _silence_stdout() -> None:
    """After a failed write to stdout, point fd 1 at /dev/null so that the interpreter's
    final flush of the unwritten buffer cannot fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def verify_main(cfg: VerifyConfig) -> int:
    """Run `crv-verify`; returns the exit status (0 all verified, 1 some lines failed,
    2 nothing could run), printing run-level errors as one line on stderr."""
    try:
        _check_config(cfg)
        data = _read_input(cfg.input)
        bundle = _load_quietly(cfg)
        verifier = StepVerifier(bundle, cfg)
        worker: LineWorker = verifier
        if cfg.generate:
            from crv.cli.guard import Guard

            worker = Guard(verifier)
        lines = list(iter_lines(data))
        records = _write_output(cfg.output, lambda sink: run_verify(cfg, worker, lines, sink))
        if verifier.exporter is not None:
            try:
                verifier.exporter.finish()
            except OSError as exc:
                raise _Failure(f"cannot write graphs to {cfg.export_graphs}: {exc}") from None
    except _Failure as exc:
        print(f"crv-verify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = "" if cfg.output == STDIO else f"; {cfg.output} was left unchanged"
        print(f"crv-verify: interrupted{kept}", file=sys.stderr)
        return 130
    if cfg.format == "jsonl" and not cfg.quiet:
        sys.stderr.write(render_table(records, verifier.threshold))
    return 1 if any(_failed(rec) for rec in records) else 0


def _failed(record: dict[str, Any]) -> bool:
    """A line failed when it could not be verified or some of its steps were not scored."""
    return record["error"] is not None or any("error" in s for s in record["steps"])
