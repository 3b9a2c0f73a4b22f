"""Configuration of the `traces` stage (`traces` section); field docstrings are the help."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """Solved examples in the canonical format prepended to each prompt (for pretrained chat models)."""
    max_new_tokens_factor: float = 1.5
    """Token cap per problem = factor x tokens of its canonical solution + 16 (stops runaways)."""
    runtime_batch_size: int = 64
    """Prompts per generation batch (memory only; not part of the cache key)."""
