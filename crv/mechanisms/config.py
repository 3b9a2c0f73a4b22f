"""Configuration of the `mechanisms` stage (`mechanisms` section); field docstrings are the help."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MechanismsConfig:
    """Which graph units are compared between incorrect and correct test steps, and how
    incorrect steps are grouped by their contrastive graphs."""

    fdr: float = 0.05
    """False discovery rate of the Benjamini-Hochberg procedure (over both tests of every
    tested unit of a task)."""

    min_steps: int = 5
    """A feature is tested only when it appears in at least this many of the task's test
    step graphs (rarer ones cannot reach significance and only dilute the correction)."""

    top_n: int = 20
    """Rows per task in report.md; the artifact's table holds every tested unit."""

    planted_top_k: int = 10
    """Top features per planted rule whose cards are checked against the rule's trigger."""

    max_groups: int = 4
    """Most groups per task when the incorrect steps are grouped by the features that drive
    their contrastive graphs (the cut with the best silhouette among 2..max_groups)."""

    planted_min_share: float = 0.5
    """A feature points at a planted rule when at least this share of its card's top
    contexts match the rule's trigger in the text read up to the activating token."""

    def __post_init__(self) -> None:
        if not 0.0 < self.fdr < 1.0:
            raise ValueError(f"mechanisms.fdr must be in (0, 1), not {self.fdr}")
        if not 0.0 < self.planted_min_share <= 1.0:
            raise ValueError(
                f"mechanisms.planted_min_share must be in (0, 1], not {self.planted_min_share}"
            )
        for name in ("min_steps", "top_n", "planted_top_k", "max_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"mechanisms.{name} must be at least 1, not {getattr(self, name)}")
