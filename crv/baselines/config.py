"""Configuration of the `baselines` stage (`baselines` section); field docstrings are the help."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BaselinesConfig:
    """Output- and hidden-state-based baselines from the subject's forward pass (`baselines`)."""

    probe_layer: int | None = None
    """Index into the model's hidden states (0 = embeddings, l = after block l, negative
    counts from the end) averaged over the step's tokens for the probes; default: the
    middle block, n_layers // 2."""

    temperature_grid: list[float] = field(
        default_factory=lambda: [round(0.05 * 1.2**i, 6) for i in range(40)]
    )
    """Temperatures tried when fitting temperature scaling (0.05 to about 60, geometric)."""

    coe: bool = True
    """Also compute the Chain-of-Embedding scores CoE-R and CoE-C (Wang et al. 2024)."""

    def __post_init__(self) -> None:
        if not self.temperature_grid or min(self.temperature_grid) <= 0:
            raise ValueError("baselines.temperature_grid must be a non-empty list of values > 0")
