"""The `transcoders` stage: train one transcoder per layer (or take a published set),
evaluate, save the set.

Reads the subject model and the traces through their public loaders. Without
`pretrained` it trains on the traces' train split (or the configured corpus), in as many
passes as the shuffle buffer needs, and writes the set (circuit-tracer layout, see `io.py`)
and `train_history.json`. With `pretrained` it loads the named set, checks it against the
subject (a transcoder for every layer, the model's width) and writes only a `config.yaml`
naming the set's files where they are, so a large published set is never copied. Either
way it evaluates the set on the test split and writes `eval.json`; the evaluation is what
the pipeline reports under `transcoders`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from crv.errors import CRVError
from crv.io import atomic_write_json
from crv.pipeline import StageContext
from crv.tables import markdown_table, scalar_rows
from crv.transcoders import distributed
from crv.transcoders.activations import cache_factory, load_token_sequences
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.evaluate import evaluate_transcoders, take_tokens
from crv.transcoders.io import (
    CONFIG_NAME,
    load_transcoder_set,
    save_transcoder_set,
    write_set_config,
)
from crv.transcoders.module import TranscoderSet
from crv.transcoders.train import train_transcoders


def load_pretrained(cfg: TranscodersConfig, adapter: Any, device: str) -> TranscoderSet:
    """The published set `cfg.pretrained`, checked against the subject model: a CRVError
    naming the file and field when it cannot be read, lacks layers or has another width."""
    try:
        tset = load_transcoder_set(cfg.pretrained, device, k=cfg.k)
        tset.check_compatible(adapter)
    except (ValueError, OSError, SafetensorError) as exc:
        raise CRVError(f"transcoders.pretrained: {exc}") from None
    missing = sorted(set(range(adapter.n_layers)) - set(tset.layers))
    if missing:
        raise CRVError(
            f"transcoders.pretrained: {cfg.pretrained}/{CONFIG_NAME}: field 'transcoders' "
            f"covers layers {tset.layers}, but the subject has {adapter.n_layers} layers "
            f"(missing {missing})"
        )
    return tset


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
    traces_dir = ctx.inputs.get("traces")

    if cfg.pretrained:
        tset = load_pretrained(cfg, adapter, device)
        ctx.log.info(
            "pretrained set %s: %d layers, %d latents, %s, k=%d",
            cfg.pretrained,
            len(tset),
            tset[tset.layers[0]].n_latents,
            tset.activation,
            tset.k,
        )
        write_set_config(tset, ctx.out)
        train_report = {"pretrained": str(cfg.pretrained)}
    else:
        tset, train_report = _train(ctx, cfg, model, adapter, tokenizer, device, seed)

    # Evaluation always uses the traces' held-out problems, whatever the training corpus.
    eval_cfg = dataclasses.replace(cfg, corpus="traces")
    test_seqs = take_tokens(
        load_token_sequences(eval_cfg, traces_dir, tokenizer, "test"), cfg.eval_tokens
    )
    report = evaluate_transcoders(
        model, adapter, tset, test_seqs, cfg.model_batch_seqs, cfg.per_layer_ce
    )
    report["train"] = train_report
    atomic_write_json(ctx.out / "eval.json", report)
    for row in report["layers"]:
        ctx.log.info(
            "layer %d: fvu %.4f l0 %.1f dead %.4f cos %.4f ce recovered %.3f",
            row["layer"],
            row["fvu"],
            row["l0"],
            row["dead_frac"],
            row["cos"],
            row.get("ce_loss_recovered", float("nan")),
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


def _train(
    ctx: Any,
    cfg: TranscodersConfig,
    model: torch.nn.Module,
    adapter: Any,
    tokenizer: Any,
    device: str,
    seed: int,
) -> tuple[TranscoderSet, dict[str, Any]]:
    """Train, save the set and its history; returns the set and the report's `train`."""
    layers = list(cfg.layers) if cfg.layers is not None else list(range(adapter.n_layers))
    traces_dir = ctx.inputs.get("traces")
    train_seqs = load_token_sequences(cfg, traces_dir, tokenizer, "train")
    root = (
        Path(cfg.runtime_cache_dir)
        if cfg.runtime_cache_dir
        else Path(ctx.scratch).parent / "activation_cache"
    )

    cache_for = cache_factory(cfg, ctx.inputs["subject"], traces_dir, root)
    ctx.log.info(
        "training %d transcoders: %d latents, k=%d, lr=%.2e, %d tokens from %d sequences",
        len(layers),
        cfg.latents(adapter.d_model),
        cfg.k,
        cfg.learning_rate(adapter.d_model),
        cfg.tokens,
        len(train_seqs),
    )
    train = train_transcoders
    if distributed.active():  # launched by torchrun: every rank trains a block of layers
        distributed.announce(ctx.inputs["subject"], traces_dir, cfg, layers, seed, device, root)
        train = distributed.train_layer_split
    tset, history = train(cfg, model, adapter, train_seqs, layers, device, seed, cache_for, ctx.log)
    save_transcoder_set(tset, ctx.out)
    atomic_write_json(ctx.out / "train_history.json", history.as_dict())
    report = {
        "tokens_per_s": history.tokens_per_s,
        "seconds": history.seconds,
        "lr": cfg.learning_rate(adapter.d_model),
        "passes": history.passes,
    }
    return tset, report


def transcoders_markdown(section: dict[str, Any]) -> str:
    """The report.md section of a `transcoders` result: per layer, then the scalars."""
    return markdown_table(section.get("layers", [])) + "\n" + markdown_table(scalar_rows(section))
