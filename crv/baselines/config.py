"""Configuration of the `baselines` stage (`baselines` section); field docstrings are the help."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BaselinesConfig:
    """Output- and hidden-state-based baselines from the subject's forward pass (`baselines`)."""

    probe_layer: int | None = None
    """Index into the model's hidden states (0 = embeddings, l = after block l, negative
    counts from the end) averaged over the step's tokens for the fixed-layer probes
    (`lr_probe`, `mlp_probe`); default: the middle block, n_layers // 2."""

    probe_max_bytes: int = 512 * 2**20
    """Most bytes of pooled hidden states saved for the layer-selecting probe (float16,
    steps x 3 poolings x layers x D): every layer when they fit, else as many evenly spaced
    layers (the embeddings and the last block included) as do."""

    latents: bool = True
    """Also save each step's transcoder latent activations (every transcoder layer, pooled
    like the hidden states, sparse) for the transcoder-feature probe."""

    temperature_grid: list[float] = field(
        default_factory=lambda: [round(0.05 * 1.2**i, 6) for i in range(40)]
    )
    """Temperatures tried when fitting temperature scaling (0.05 to about 60, geometric)."""

    coe: bool = True
    """Also compute the Chain-of-Embedding scores CoE-R and CoE-C (Wang et al. 2024)."""

    def __post_init__(self) -> None:
        if self.probe_max_bytes <= 0:
            raise ValueError("baselines.probe_max_bytes must be > 0")
        if not self.temperature_grid or min(self.temperature_grid) <= 0:
            raise ValueError("baselines.temperature_grid must be a non-empty list of values > 0")
