"""Which torch device a run uses: one rule for the pipeline and crv-verify."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """ "auto" becomes "cuda" when CUDA is available, else "cpu"; anything else is kept."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
