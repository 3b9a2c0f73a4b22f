"""Peak memory of the transcoders' behaviour evaluation with and without the logits budget.

`crv.transcoders.evaluate.behaviour_metrics` runs the model clean, spliced and zero-ablated
on the eval sequences; each forward's logits take tokens x vocabulary x 4 bytes and the
clean log-probabilities stay alive beside each variant's. With Qwen's 151,936-token
vocabulary a batch of 8 traces of 300 tokens is 1.46 GB of logits per copy, which set the
qwen_smoke peak. The budget (`LOGITS_BUDGET_BYTES`) shrinks the batch until one forward's
logits fit it.

Each variant runs in its own process (ru_maxrss never goes down), on the same random
Llama with Qwen's vocabulary and a random transcoder set; the script prints the memory the
evaluation added to each process and the CE numbers (equal up to float rounding), and ends
with `ratio: X` (budgeted peak increase over unbudgeted).

    python benchmarks/eval_memory.py [--vocab 151936 --seqs 8 --seq-len 300 --batch-seqs 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import crv.transcoders.evaluate as evaluate
from crv.models.adapter import ArchAdapter
from crv.transcoders.module import TopKTranscoder, TranscoderSet


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> dict[str, float]:
    """Build the model and set, evaluate, and return the peak increase and CE numbers."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    model = LlamaForCausalLM(config).eval()
    adapter = ArchAdapter.for_model(model)
    gen = torch.Generator().manual_seed(0)
    tset = TranscoderSet(
        {layer: TopKTranscoder(64, 256, 8, generator=gen) for layer in (0, 1)}, 8, "relu_topk"
    )
    seqs = torch.randint(0, args.vocab, (args.seqs, args.seq_len), generator=gen).tolist()
    if not args.budget:
        evaluate.LOGITS_BUDGET_BYTES = 1 << 62
    before = _rss_mib()
    out = evaluate.behaviour_metrics(model, adapter, tset, seqs, args.batch_seqs, per_layer=False)
    return {
        "peak_increase_mib": _rss_mib() - before,
        "batch_seqs": evaluate.logits_batch_seqs(seqs, args.batch_seqs, args.vocab),
        **{k: out[k] for k in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=300)
    parser.add_argument("--batch-seqs", type=int, default=8)
    parser.add_argument("--child", choices=("budget", "none"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.budget = args.child == "budget"
        print(json.dumps(child(args)))
        return
    rows = {}
    for mode in ("none", "budget"):
        cmd = [sys.executable, __file__, "--child", mode, "--vocab", str(args.vocab)]
        cmd += ["--seqs", str(args.seqs), "--seq-len", str(args.seq_len)]
        cmd += ["--batch-seqs", str(args.batch_seqs)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"{'logits budget':<14} {'batch':>5} {'peak +MiB':>10} {'ce_clean':>9} {'ce_spliced':>10}"
    )
    for mode, r in rows.items():
        print(
            f"{mode:<14} {r['batch_seqs']:>5} {r['peak_increase_mib']:>10.0f} "
            f"{r['ce_clean']:>9.4f} {r['ce_spliced']:>10.4f}"
        )
    ratio = rows["budget"]["peak_increase_mib"] / rows["none"]["peak_increase_mib"]
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
