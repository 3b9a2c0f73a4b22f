"""Plain vs skip transcoders (W_skip from zero or from least squares) at one token budget.

Trains the three on the same activations of a subject artifact and its traces (train
split), evaluates each on the test split and prints, per variant, FVU per layer and mean,
CE-loss recovered and KL with all layers spliced: what `transcoders.skip_init` was chosen
from. Sizes are the training defaults except a 1,024-token batch and 8x expansion.

    python benchmarks/skip_init.py SUBJECT_DIR TRACES_DIR [--tokens 400000]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from crv.models.adapter import ArchAdapter
from crv.models.loading import load_subject
from crv.transcoders.activations import load_token_sequences, training_batches
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.evaluate import evaluate_transcoders, take_tokens
from crv.transcoders.train import TranscoderTrainer

VARIANTS = {
    "plain": {},
    "skip_zero": {"skip": True, "skip_init": "zero"},
    "skip_lstsq": {"skip": True, "skip_init": "lstsq"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("subject")
    ap.add_argument("traces")
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_subject(args.subject, "cpu")
    model.eval().requires_grad_(False)
    adapter = ArchAdapter.for_model(model)
    base = TranscodersConfig(
        tokens=args.tokens,
        batch_tokens=1024,
        lr_warmup_steps=10,
        expansion=8,
        shuffle_buffer_tokens=65_536,
        eval_tokens=16_384,
    )
    train = load_token_sequences(base, args.traces, tokenizer, "train")
    test = take_tokens(load_token_sequences(base, args.traces, tokenizer, "test"), base.eval_tokens)
    layers = list(range(adapter.n_layers))
    for name, overrides in VARIANTS.items():
        cfg = dataclasses.replace(base, **overrides)
        start = time.perf_counter()
        trainer = TranscoderTrainer(cfg, adapter.d_model, layers, seed=0)
        batches = training_batches(
            cfg, model, adapter, train, layers, torch.Generator().manual_seed(0)
        )
        trainer.train(batches, progress=False)
        report = evaluate_transcoders(
            model, adapter, trainer.transcoder_set(), test, batch_seqs=16, per_layer_ce=False
        )
        fvu = [row["fvu"] for row in report["layers"]]
        print(
            f"{name:>10}: fvu {' '.join(f'{v:.4f}' for v in fvu)} mean {sum(fvu) / len(fvu):.4f}"
            f"  ce_loss_recovered {report['ce_loss_recovered']:.4f}  kl {report['kl_spliced']:.4f}"
            f"  {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    print(f"{args.tokens} tokens, {base.latents(adapter.d_model)} latents, k {base.k}")


if __name__ == "__main__":
    main()
