"""The `transcoders` stage: train one TopK transcoder per layer, evaluate, save the set.

Reads the subject model and the traces through their public loaders, trains on the
traces' train split (or the configured corpus), evaluates on the test split and writes
the transcoder set (circuit-tracer layout, see `io.py`) plus `eval.json` and
`train_history.json` into the artifact. Returns the evaluation, which the pipeline reports
under `transcoders`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from crv.io import atomic_write_json
from crv.pipeline import StageContext
from crv.transcoders.activations import (
    ActivationCache,
    cache_key,
    load_token_sequences,
    training_batches,
)
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.evaluate import evaluate_transcoders, take_tokens
from crv.transcoders.io import save_transcoder_set
from crv.transcoders.train import TranscoderTrainer


def run_stage(ctx: StageContext[TranscodersConfig]) -> dict[str, Any]:
    from crv.models.adapter import ArchAdapter
    from crv.models.loading import load_subject

    cfg: TranscodersConfig = ctx.cfg
    device = cfg.device or ctx.device
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    torch.manual_seed(seed)
    model, tokenizer = load_subject(ctx.inputs["subject"], device)
    model.eval().requires_grad_(False)
    adapter = ArchAdapter.for_model(model)
    layers = list(cfg.layers) if cfg.layers is not None else list(range(adapter.n_layers))

    traces_dir = ctx.inputs.get("traces")
    train_seqs = load_token_sequences(cfg, traces_dir, tokenizer, "train")
    cache = None
    if cfg.cache_activations:
        root = (
            Path(cfg.cache_dir) if cfg.cache_dir else Path(ctx.scratch).parent / "activation_cache"
        )
        cache = ActivationCache(
            root / cache_key(ctx.inputs["subject"], traces_dir, cfg, layers), cfg.cache_dtype
        )
    trainer = TranscoderTrainer(cfg, adapter.d_model, layers, device, seed)
    ctx.log.info(
        "training %d transcoders: %d latents, k=%d, lr=%.2e, %d tokens from %d sequences",
        len(layers),
        trainer.n_latents,
        cfg.k,
        trainer.lr,
        cfg.tokens,
        len(train_seqs),
    )
    generator = torch.Generator().manual_seed(seed)
    batches = training_batches(cfg, model, adapter, train_seqs, layers, generator, cache, device)
    history = trainer.train(batches, ctx.log)
    tset = trainer.transcoder_set()
    save_transcoder_set(tset, ctx.out)
    atomic_write_json(ctx.out / "train_history.json", history.as_dict())

    # Evaluation always uses the traces' held-out problems, whatever the training corpus.
    eval_cfg = dataclasses.replace(cfg, corpus="traces")
    test_seqs = take_tokens(
        load_token_sequences(eval_cfg, traces_dir, tokenizer, "test"), cfg.eval_tokens
    )
    report = evaluate_transcoders(model, adapter, tset, test_seqs, cfg.model_batch_seqs)
    report["train"] = {
        "tokens_per_s": history.tokens_per_s,
        "seconds": history.seconds,
        "lr": trainer.lr,
    }
    atomic_write_json(ctx.out / "eval.json", report)
    for row in report["layers"]:
        ctx.log.info(
            "layer %d: fvu %.4f l0 %.1f dead %.4f cos %.4f ce recovered %.3f",
            row["layer"],
            row["fvu"],
            row["l0"],
            row["dead_frac"],
            row["cos"],
            row["ce_loss_recovered"],
        )
    ctx.log.info(
        "all layers spliced: ce clean %.4f spliced %.4f zero %.4f, recovered %.3f, kl %.4f",
        report["ce_clean"],
        report["ce_spliced"],
        report["ce_zero"],
        report["ce_loss_recovered"],
        report["kl_spliced"],
    )
    return report
