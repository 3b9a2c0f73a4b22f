"""Configuration of the `cards` stage (`cards` section); field docstrings are the help."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "test", "all")


@dataclass
class CardsConfig:
    """What a feature card holds and which traces it is read from (`cards` section)."""

    n_contexts: int = 8
    """Top activating contexts kept per feature (streaming top-n, memory features x n)."""

    context_before: int = 8
    """Tokens of text shown before a context's activating token."""

    context_after: int = 2
    """Tokens of text shown after a context's activating token."""

    n_logit_tokens: int = 5
    """Output tokens listed per feature as most promoted and most suppressed."""

    split: str = "train"
    """Traces the contexts come from: train (the transcoders' corpus), test or all."""

    max_traces: int | None = None
    """Read at most this many traces of the split (None: all)."""

    runtime_batch_seqs: int = 32
    """Traces per forward pass of the subject model (speed and memory only)."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"cards.split must be one of {SPLITS}, not {self.split!r}")
        for name in ("n_contexts", "n_logit_tokens", "runtime_batch_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"cards.{name} must be at least 1, not {getattr(self, name)}")
        if self.context_before < 0 or self.context_after < 0:
            raise ValueError("cards.context_before and cards.context_after must be >= 0")
