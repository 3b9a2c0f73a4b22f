"""The verifier a bundle ships, and the inputs crv-verify computes for it.

A bundle used to ship only `crv` (xgboost on graph features), so a user's verdict could be
worse than the simplest confidence score crv already computes for its own report. The
verifier stage now saves every method a bundle can feed and names, per task and for `all`
tasks together, the one with the highest validation AUROC (`crv.verifier.methods`,
`selected.json`). The bundle ships `all`'s (a user's trace names no task): it copies that
method's directory and records its name, kind, threshold and inputs in the manifest.

For a user's trace the method's inputs come from the library code the pipeline used:
graph features from the step graphs (`crv.features`), and, when the method reads them,
the baseline scores, pooled hidden states and transcoder latents of one forward pass
(`crv.baselines.scores.trace_step_scores`, with the bundle's copy of the baselines'
settings and fitted temperature), so its numbers are the ones the baselines stage gives
the same trace. A format-1 bundle's `crv` verifier is wrapped by `V1Method`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from crv.verifier.methods import StepInputs

if TYPE_CHECKING:
    import torch

    from crv.baselines.config import BaselinesConfig
    from crv.transcoders.module import TranscoderSet
    from crv.verifier.classifier import XGBVerifier

SHIPPED_TASK = "all"
"""The `selected.json` entry a bundle ships: trained and chosen on every task together."""


@dataclass
class V1Method:
    """The `crv` verifier of a format-1 bundle, scored as a saved method is."""

    verifier: XGBVerifier
    threshold: float
    name: str = "crv"
    kind: str = "xgboost"

    @property
    def needs(self) -> set[str]:
        return {"features"}

    def score(self, x: StepInputs) -> np.ndarray:
        return np.asarray(self.verifier.predict_proba(x.features), dtype=np.float64)


def baseline_spans(prompt_len: int, last_tokens: list[int]) -> list[tuple[int, int]]:
    """Each step's (first, last) token as the baselines stage counts them: the tokens after
    the previous step's last one (after the prompt for the first step) up to its own."""
    prev = [prompt_len - 1, *last_tokens[:-1]]
    return [(min(p + 1, t), t) for p, t in zip(prev, last_tokens, strict=True)]


def step_inputs(
    model: torch.nn.Module,
    input_ids: list[int],
    prompt_len: int,
    last_tokens: list[int],
    cfg: BaselinesConfig,
    temperature: float,
    transcoders: TranscoderSet | None = None,
    device: str = "cpu",
) -> StepInputs:
    """The baselines stage's scores, pooled hidden states (every layer) and, with
    `transcoders`, pooled latents of a trace's steps, from one forward pass."""
    from crv.baselines.scores import latent_layout, trace_step_scores

    spans = baseline_spans(prompt_len, last_tokens)
    ts = trace_step_scores(model, input_ids, spans, cfg, device, transcoders)
    layout = latent_layout(transcoders) if transcoders is not None else None
    layers = list(range(ts.hidden.shape[2]))
    return StepInputs.from_trace_scores([ts], temperature, cfg.temperature_grid, layers, layout)


def input_rows(x: StepInputs, index: list[int]) -> StepInputs:
    """The inputs of the steps at `index`, in that order."""
    rows = np.asarray(index, dtype=np.int64)
    return StepInputs(
        features=None if x.features is None else x.features.iloc[rows].reset_index(drop=True),
        scores=None if x.scores is None else x.scores.iloc[rows].reset_index(drop=True),
        hidden=None if x.hidden is None else x.hidden[rows],
        latents=None if x.latents is None else (x.latents[0][rows], x.latents[1]),
    )


def manifest_entry(spec: dict[str, Any], threshold: float, needs: set[str]) -> dict[str, Any]:
    """The manifest's `verifier` entry of a saved method (its `spec.json`)."""
    return {
        "method": spec["name"],
        "kind": spec["kind"],
        "threshold": float(threshold),
        "feature_names": list(spec["inputs"]["features"]),
        "needs": sorted(needs),
        "val_auroc": spec.get("val_auroc"),
    }


def baselines_section(cfg: BaselinesConfig, temperature: float) -> dict[str, Any]:
    """The manifest's `baselines` entry: the settings and fitted temperature `step_inputs`
    needs to give a user's trace the baselines stage's numbers."""
    return {"config": dataclasses.asdict(cfg), "temperature": float(temperature)}
