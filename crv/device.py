"""Which torch device a run uses, and how much of it one vocabulary-wide tensor may take:
one rule for the pipeline and crv-verify."""

from __future__ import annotations

LOGITS_BUDGET_BYTES = 256 * 2**20
"""Most fp32 vocabulary-wide values (rows x vocabulary x 4 bytes) one forward or projection
may hold at once. With Qwen's 152k-token vocabulary a few rows fill it, so work over logits
goes in chunks sized by it, and memory does not grow with the batch or the model's width."""


def resolve_device(device: str) -> str:
    """ "auto" becomes "cuda" when CUDA is available, else "cpu"; anything else is kept."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
