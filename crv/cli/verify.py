"""`crv-verify`: score every reasoning step of a user's traces with an exported bundle.

Usage (Hydra overrides)::

    crv-verify bundle=PATH input=traces.jsonl output=scores.jsonl [intervene=true] [format=table]
        [export_graphs=DIR]
    crv-verify bundle=PATH input=prompts.jsonl output=out.jsonl generate=true [correct=...]

`input=-` reads standard input and `output=-` writes standard output.

`bundle=` also takes a run directory of `crv` (its `artifacts.json` names the bundle).

**Input**: JSONL, one trace per line, either ``{"id": optional str or int, "prompt": str,
"steps": [str, ...]}`` or ``{"id": ..., "prompt": str, "completion": str}``. A completion is
split into steps with the bundle's step regex. Given `steps`, the completion is their
concatenation joined by "\\n" (no trailing newline), so the same trace given either way is
tokenised identically and gets the same scores (`crv.check.scorer` says how a trace is
tokenised and scored). Blank lines are skipped; every other line gets one record.

**Output**: JSONL, one record per input line, in input order::

    {"id", "line", "steps": [{"index", "text", "score", "flagged", "top_features":
     [{"layer", "feature", "label", "influence"}], "interventions": [{"layer", "feature", "action",
     "scale"}]}], "error": null}

`id` echoes the input's as given, a string or an integer (null when absent or unreadable)
and `line` is the 1-based input line number. `score` is the bundle's shipped method's score
(higher = more likely incorrect: P(incorrect) for `crv` and the probes, the baseline's value
for a confidence score); `flagged` is `score >= threshold` (the threshold chosen on
validation data, stored in the bundle).
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
goes to stderr (or is the output with `format=table`), with a progress bar for long inputs;
under a step's row it shows the step's warning and, with `intervene=true`, the regenerated
step and the intervention that produced it.

**Verify while generating** (`generate=true [correct=none|intervention|second_choice]
[max_corrections=2]`): each input line is a prompt, ``{"id": optional str, "prompt": str}``
(a line with `steps` or `completion` is an error), and the model writes the steps; each is
scored as its line ends and a flagged one is corrected (`crv.check.guard`). The record adds
`completion` (the final one), `corrections` (step, policy, before, after, features,
replacement) and `ended` (eos, stop, max_new_tokens, context); each step has `corrected`.

**Exit status**: 0 when every step of every line was scored, 1 when some lines or steps
failed, 2 when nothing
could run (bad or damaged bundle, unreadable input, unwritable output), with a one-line error and
no traceback; 130 when interrupted. A regular output file is written atomically
(`crv.io.atomic_write`): an interrupted run leaves a previous output file untouched and
never a truncated one; stdout, a FIFO, a device or a link is written in place.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from crv.check.config import STDIO, VerifyConfig
from crv.check.inputs import Prompt, Trace, TraceError, iter_lines
from crv.check.scorer import StepVerifier
from crv.errors import CRVError
from crv.subject.sources import DATA_DIR

if TYPE_CHECKING:
    from crv.bundle import Bundle


USAGE = """usage: crv-verify bundle=DIR input=traces.jsonl output=scores.jsonl [option=value ...]
       crv-verify bundle=DIR input=prompts.jsonl output=out.jsonl generate=true [correct=...]

Scores every reasoning step of JSONL traces with a bundle exported by `crv` (bundle= is the
bundle directory, or a crv run directory whose artifacts.json lists one); `-` is stdin or
stdout. Exit status 0: every step scored; 1: some lines or steps failed; 2: nothing could
run (one line on stderr)."""


class LineWorker(Protocol):
    """What checks input lines: `StepVerifier` (traces) or `crv.check.guard.Guard` (prompts)."""

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
        rid = _shorten("-" if rec["id"] is None else str(rec["id"]), 14)
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
            rows += _step_notes(step)
    failed = sum(rec["error"] is not None for rec in records)
    n_corrections = sum(len(rec.get("corrections") or ()) for rec in records)
    corrected = f", {n_corrections} corrections (* rewritten)" if n_corrections else ""
    rows.append(
        f"{len(records)} traces ({len(records) - failed} verified, {failed} failed), "
        f"{n_steps} steps, {n_flagged} flagged at threshold {threshold:.4g}{corrected}"
    )
    return "\n".join(rows) + "\n"


def _step_notes(step: dict[str, Any]) -> list[str]:
    """Rows under a step's row: its tokenizer warning, and its regeneration (`intervene`)."""
    indent = " " * 36
    rows = [f"{indent}warning: {step['warning']}"] if step.get("warning") else []
    regen = step.get("regenerated")
    if regen:
        edit = step["interventions"][regen["intervention"]]
        name = f"L{edit['layer']}/F{edit['feature']} {edit['action']}"
        text = regen["step"] if regen["step"] is not None else f"(no step) {regen['continuation']}"
        rows.append(f"{indent}{'->':<4}  {name:<20} {_shorten(text, 60)}")
    return rows


class _Failure(CRVError):
    """A run-level failure: printed as one line, exit status 2."""


def _read_input(source: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if source == STDIO else Path(source).read_bytes()
    except OSError as exc:
        raise _Failure(f"cannot read input {source}: {exc.strerror or exc}") from None


def bundle_dir(given: str) -> str:
    """The bundle directory `bundle=` names: itself, or for a crv run directory the bundle
    its `artifacts.json` lists; _Failure saying where the bundle is when that has none."""
    from crv.io import read_json

    listing = Path(given) / "artifacts.json"
    if not listing.is_file():
        return given
    try:
        artifacts = read_json(listing)
    except (OSError, ValueError) as exc:
        raise _Failure(f"bundle={given}: cannot read {listing}: {exc}") from None
    if "bundle" not in artifacts:
        raise _Failure(
            f"bundle={given} is a run directory without a bundle ({listing} lists "
            f"{', '.join(artifacts) or 'nothing'}): rerun crv with the bundle stage, e.g. "
            "pipeline.stages=[bundle] and the run's options"
        )
    if not Path(artifacts["bundle"]).is_dir():
        raise _Failure(f"bundle={given}: its bundle {artifacts['bundle']} no longer exists")
    return str(artifacts["bundle"])


SHIPPED_BUNDLE = DATA_DIR / "crv-tiny-bugs-bundle"
"""The bundle crv-verify uses when none is given: a small one in the repository's data/."""


def _check_config(cfg: VerifyConfig) -> None:
    if not cfg.bundle:
        if not SHIPPED_BUNDLE.is_dir():
            raise _Failure(
                f"no bundle given and no shipped bundle at {SHIPPED_BUNDLE}: "
                "crv-verify bundle=PATH input=FILE output=FILE"
            )
        cfg.bundle = str(SHIPPED_BUNDLE)
    cfg.bundle = bundle_dir(cfg.bundle)
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


def verify_command(cfg: VerifyConfig) -> int:
    """Run `crv-verify`; returns the exit status (0 all verified, 1 some lines failed,
    2 nothing could run), printing run-level errors as one line on stderr."""
    try:
        _check_config(cfg)
        data = _read_input(cfg.input)
        bundle = _load_quietly(cfg)
        verifier = StepVerifier(bundle, cfg)
        worker: LineWorker = verifier
        if cfg.generate:
            from crv.check.guard import Guard

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
