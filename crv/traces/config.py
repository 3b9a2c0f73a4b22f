"""Configuration of the `traces` stage (`traces` section); field docstrings are the help."""

from __future__ import annotations

from dataclasses import dataclass, field

from crv.options import check_names
from crv.tasks.format import TASKS

STOP_PATTERNS = (r"^Answer:[^\n]*\n", r"^####[^\n]*\n")
"""Default stop patterns: a completion ends with its answer line (canonical or GSM8K)."""


@dataclass
class TracesConfig:
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "boolean"])
    """Synthetic tasks to generate problems for: arithmetic, boolean."""
    complexities: list[int] = field(default_factory=lambda: [3, 5, 7, 10])
    """Numbers of operators per problem."""
    n_per_complexity: int = 200
    """Distinct problems per task and complexity (train + test)."""
    test_frac: float = 0.2
    """Share of problems in the test split (split by problem, never by step)."""
    n_test_per_complexity: dict[str, int] = field(default_factory=dict)
    """Test problems per complexity for the tasks named here, instead of test_frac's share
    (their training problems stay as many): a task whose errors are rare needs more test
    problems for narrow intervals, not a bigger training set."""
    gsm8k_path: str | None = None
    """Optional GSM8K-format file (JSONL/Parquet, question + answer with ####) to add as task gsm8k."""
    gsm8k_limit: int | None = None
    """Read at most this many GSM8K records."""
    few_shot: int = 0
    """Solved 3-operator examples in the canonical format before each problem (chat turns
    in the chat style); 0 for crv-tiny, which knows the format."""
    prompt_style: str = "auto"
    """plain (`Q: ...` text) | chat (system instruction stating the step format, examples as
    chat turns, the tokenizer's chat template) | auto (chat when the tokenizer has one)."""
    labels: str = "strict"
    """strict (the canonical step form, for crv-tiny) | semantic (every stated computation
    true and the restated expression's value kept; real-model subject presets pick it)."""
    stop: list[str] = field(default_factory=lambda: list(STOP_PATTERNS))
    """Stop patterns (regexes over the completion, multiline): generation ends once one
    matches, so a completion ends with its answer line instead of running into a new `Q:`."""
    max_new_tokens_factor: float = 1.5
    """Token cap per problem = factor x tokens of its canonical solution + 16 (stops runaways)."""
    runtime_batch_size: int = 64
    """Prompts per generation batch (memory only; not part of the cache key)."""

    def __post_init__(self) -> None:
        if not self.tasks and not self.gsm8k_path:
            raise ValueError("traces.tasks is empty and no traces.gsm8k_path is given")
        check_names(self.tasks, TASKS, "traces.tasks")
        if not self.complexities or min(self.complexities) < 1:
            raise ValueError(f"traces.complexities must be >= 1, got {self.complexities}")
        if self.n_per_complexity < 1:
            raise ValueError(f"traces.n_per_complexity must be >= 1, got {self.n_per_complexity}")
        if not 0 <= self.test_frac < 1:
            raise ValueError(f"traces.test_frac must lie in [0, 1), got {self.test_frac}")
        if min(self.n_test_per_complexity.values(), default=1) < 1:
            raise ValueError("traces.n_test_per_complexity values must be >= 1")
        if self.gsm8k_limit is not None and self.gsm8k_limit < 1:
            raise ValueError(f"traces.gsm8k_limit must be >= 1 or None, got {self.gsm8k_limit}")
        if self.few_shot < 0:
            raise ValueError(f"traces.few_shot must be >= 0, got {self.few_shot}")
        if self.max_new_tokens_factor <= 0 or self.runtime_batch_size < 1:
            raise ValueError("traces.max_new_tokens_factor must be > 0 and runtime_batch_size >= 1")
