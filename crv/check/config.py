"""The options of `crv-verify` (Hydra overrides): one dataclass whose field docstrings are
the help text, for the command and the engine (`crv.check.scorer`, `crv.check.guard`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crv.interventions.config import Action, RankBy, Scope
from crv.options import Choice, check_choices
from crv.traces.config import STOP_PATTERNS

STDIO = "-"


class OutputFormat(Choice):
    """What `crv-verify` writes (see `VerifyConfig.format`)."""

    jsonl = "jsonl"
    table = "table"


class Correct(Choice):
    """How `generate=true` corrects a flagged step (see `crv.check.guard`)."""

    none = "none"
    intervention = "intervention"
    second_choice = "second_choice"


@dataclass
class VerifyConfig:
    """Options of `crv-verify` (Hydra overrides, e.g. `bundle=DIR input=- output=out.jsonl`)."""

    bundle: str | None = None
    """Bundle directory exported by the pipeline's `bundle` stage, or a run directory whose
    artifacts.json lists one; default: the bundle shipped in data/crv-tiny-bugs-bundle
    (crv-tiny-bugs, exported by `crv experiment=quick`)."""

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
    every step is scored as its line ends (input: prompts only; see `crv.check.guard`)."""

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
