"""Parsing `crv-verify`'s input lines into traces (`parse_trace`) and prompts
(`parse_generate`): UTF-8 and JSON decoding, validation and each step's character span. A
bad line is a `TraceError` naming the line and the problem; the line formats are the
command's input contract (`crv.cli.verify`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from crv.errors import CRVError


class TraceError(CRVError, ValueError):
    """A problem with one input line; its message names the line and the problem."""

    def __init__(self, message: str, trace_id: str | int | None = None) -> None:
        super().__init__(message)
        self.trace_id = trace_id
        """The line's `id` when it could be read, for the error record."""


@dataclass
class Trace:
    """One parsed input line: the text the model sees and the steps' character spans."""

    line: int
    id: str | int | None
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
    id: str | int | None
    prompt: str


def _fail(line: int, problem: str, trace_id: str | int | None = None) -> TraceError:
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
    trace_id = obj.get("id")
    if trace_id is not None and (
        not isinstance(trace_id, (str, int)) or trace_id is True or trace_id is False
    ):
        raise _fail(line, f"'id' must be a string or an integer, got {type(trace_id).__name__}")
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
