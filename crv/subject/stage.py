"""The `subject` stage: the model whose reasoning is verified, as a plain HF directory.

Every later stage loads the subject from this artifact with `load_subject`, so model
provenance (embedded crv-tiny, hub name, local directory, GGUF inside a pip package) is
resolved exactly once, and a GGUF model is dequantised to fp32 safetensors only once.
"""

from __future__ import annotations

import shutil
from typing import Any

from crv.pipeline import StageContext
from crv.subject.config import SubjectConfig
from crv.subject.sources import SHIPPED, shipped_tiny_dir


def shipped_fingerprint(cfg: SubjectConfig) -> str:
    """Content hash of the shipped checkpoint a subject copies ("" for every other subject):
    part of the subject's cache key, so a retrained shipped model is never taken for the
    one a cache holds."""
    from crv.pipeline import file_digest

    if cfg.name not in SHIPPED or cfg.retrain:
        return ""
    return file_digest(shipped_tiny_dir(cfg.name) / "model.safetensors")


def run_stage(ctx: StageContext[SubjectConfig]) -> dict[str, Any]:
    from crv.models.adapter import ArchAdapter
    from crv.models.loading import load_subject
    from crv.subject.sources import export_subject

    cfg = ctx.cfg
    if cfg.name in SHIPPED:
        if cfg.retrain:
            from crv.models.tiny import train_recipe

            train_recipe(ctx.out, seed=ctx.seed, name=cfg.name)
        else:
            shutil.copytree(shipped_tiny_dir(cfg.name), ctx.out, dirs_exist_ok=True)
    else:
        export_subject(cfg, ctx.out, ctx.scratch)
    model, _ = load_subject(ctx.out, "cpu")
    adapter = ArchAdapter.for_model(model)
    return {
        "name": cfg.name,
        "family": adapter.family,
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "vocab_size": adapter.vocab_size,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
