"""Training speed of crv's TopK transcoder trainer against a dense implementation and
against this machine's measured matmul throughput.

Both train the same transcoder (same initial weights, same batches, same learning-rate
schedule, decoder normalisation and AuxK) on synthetic activations: x ~ N(0, I) in
d_model dimensions and y = W_2 gelu(W_1 x), a random MLP with 4x hidden width, so the
target has the structure of a real MLP output. The reference computes everything densely
- encoder matmul, TopK as a dense mask, dense decoder matmul, full autograd backward - as
a straightforward implementation would. Prints tokens/s and final FVU of both.

The machine limit: a float32 `torch.matmul` probe at the step's one dense shape ([N, D] x
[D, F], the encoder's pre-activations; best of several runs) gives GFLOP/s; crv's step
needs `step_flops` per token (that matmul, the sparse k- and AuxK-row products, and with
`--skip` the [D, D] skip path forward and backward), so the probe bounds the step at
GFLOP/s / FLOP-per-token tokens/s. Prints both, `limit_ratio: X` (crv's tokens/s over that
bound: 1 would mean every step ran at matmul speed), and ends with `ratio: X` (crv tokens/s
over reference tokens/s).

    python benchmarks/transcoders.py [--d-model 128 --expansion 16 --k 32 --steps 20 --skip]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from crv.transcoders.config import TranscodersConfig
from crv.transcoders.train import TranscoderTrainer


def matmul_gflops(n: int, d: int, f: int, repeats: int = 5) -> float:
    """Measured float32 GFLOP/s of [n, d] x [d, f] (best of `repeats` after a warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a_ND, b_DF = torch.randn(n, d, generator=gen), torch.randn(d, f, generator=gen)
    torch.matmul(a_ND, b_DF)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a_ND, b_DF)
        best = min(best, time.perf_counter() - start)
    return 2 * n * d * f / best / 1e9


def step_flops(d_model: int, n_latents: int, k: int, k_aux: int, skip: bool) -> int:
    """FLOP per token of one training step as crv computes it: the dense encoder matmul,
    decode and the two encoder / one decoder backward products over k (+ AuxK) rows, and
    the skip path (forward, input and weight gradient)."""
    dense = 2 * d_model * n_latents
    sparse = 2 * d_model * (k + k_aux) * 4  # decode, decode grad, encoder grads (x, W)
    return dense + sparse + (6 * d_model * d_model if skip else 0)


def synthetic_batches(
    d_model: int, batch_tokens: int, n_batches: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (x_LND, y_LND) with L = 1 from a random MLP."""
    gen = torch.Generator().manual_seed(seed)
    W1_HD = torch.randn(4 * d_model, d_model, generator=gen) / d_model**0.5
    W2_DH = torch.randn(d_model, 4 * d_model, generator=gen) / (4 * d_model) ** 0.5
    out = []
    for _ in range(n_batches):
        x_ND = torch.randn(batch_tokens, d_model, generator=gen)
        y_ND = F.gelu(x_ND @ W1_HD.T) @ W2_DH.T
        out.append((x_ND[None], y_ND[None]))
    return out


class DenseReference:
    """`TranscoderTrainer.step` with the loss computed densely over all F latents.

    It drives a trainer of its own (parameters, optimizer, schedule, data scales, dead
    counters), so only the encode/decode/backward path differs from crv's step.
    """

    def __init__(self, trainer: TranscoderTrainer) -> None:
        self.trainer = trainer
        self.tc = trainer.tset[trainer.layers[0]]

    def _acts(self, pre_NF: torch.Tensor, k: int) -> torch.Tensor:
        """Dense [N, F] activations: pre-activations masked to the top k per token."""
        mask_NF = torch.zeros_like(pre_NF).scatter_(1, pre_NF.topk(k, dim=1).indices, 1.0)
        return (pre_NF.relu() if self.tc.relu else pre_NF.masked_fill(mask_NF == 0, 0.0)) * mask_NF

    def step(self, x_LND: torch.Tensor, y_LND: torch.Tensor) -> float:
        t, tc = self.trainer, self.tc
        x_ND, y_ND = x_LND[0] * t.scale_x_L[0], y_LND[0] * t.scale_y_L[0]
        pre_NF = x_ND @ tc.W_enc.T + tc.b_enc
        acts_NF = self._acts(pre_NF, tc.k)
        err_ND = acts_NF @ tc.W_dec + tc.b_dec - y_ND
        total_var = (y_ND - y_ND.mean(0)).pow(2).sum()
        fvu = err_ND.pow(2).sum() / total_var
        loss = fvu
        dead_F = t.dead_mask()[0]
        n_dead = int(dead_F.sum())
        if n_dead > 0 and t.k_aux > 0:
            masked_NF = pre_NF.masked_fill(~dead_F, float("-inf"))
            aux_NF = self._acts(masked_NF, min(t.k_aux, n_dead)).nan_to_num(0.0, 0.0, 0.0)
            auxk = (aux_NF @ tc.W_dec + err_ND.detach()).pow(2).sum() / total_var
            loss = loss + t.cfg.auxk_coef * auxk
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in t.optimizer.param_groups:
            group["lr"] = t.lr * t.lr_factor()
        tc.remove_parallel_decoder_grad()
        t.optimizer.step()
        tc.normalize_decoder()
        t.since_fired_LF += x_ND.shape[0]
        t.since_fired_LF[0, (acts_NF != 0).any(0)] = 0
        t.step_count += 1
        return fvu.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--expansion", type=int, default=TranscodersConfig.expansion)
    ap.add_argument("--k", type=int, default=TranscodersConfig.k)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3, help="fixed, so a short run gets somewhere")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dead-tokens", type=int, default=16_384, help="small, so AuxK is active")
    ap.add_argument("--skip", action="store_true", help="skip transcoders (transcoders.skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TranscodersConfig(
        k=args.k,
        expansion=args.expansion,
        batch_tokens=args.batch_tokens,
        tokens=args.steps * args.batch_tokens,
        lr=args.lr,
        lr_warmup_steps=5,
        dead_tokens=args.dead_tokens,
        skip=args.skip,
    )
    batches = synthetic_batches(args.d_model, args.batch_tokens, args.steps + 1, seed=0)
    crv_trainer = TranscoderTrainer(cfg, args.d_model, [0], "cpu", seed=0)
    ref_trainer = TranscoderTrainer(cfg, args.d_model, [0], "cpu", seed=0)
    ref = DenseReference(ref_trainer)
    # Step 0 (scales, data-mean initialisation, warm-up) runs untimed through the trainer
    # for both, so both start from identical weights and optimizer state.
    crv_trainer.step(*batches[0])
    ref_trainer.step(*batches[0])

    results = {}
    for name, step in (
        ("crv", lambda b: crv_trainer.step(*b).fvu[0]),
        ("reference", lambda b: ref.step(*b)),
    ):
        fvus = []
        start = time.perf_counter()
        for batch in batches[1:]:
            fvus.append(step(batch))
        seconds = time.perf_counter() - start
        tok_s = args.steps * args.batch_tokens / seconds
        final = sum(fvus[-5:]) / len(fvus[-5:])
        results[name] = tok_s
        print(
            f"{name:>9}: {tok_s:9.0f} tokens/s  {seconds:6.2f} s  final FVU (mean of last 5) {final:.4f}"
        )
    n_latents = cfg.latents(args.d_model)
    print(
        f"d_model {args.d_model}, {n_latents} latents, k {args.k}, {args.batch_tokens} tokens/step, "
        f"{args.steps} steps, {args.threads} threads, skip {args.skip}"
    )
    gflops = matmul_gflops(args.batch_tokens, args.d_model, n_latents)
    per_token = step_flops(args.d_model, n_latents, args.k, cfg.aux_k(args.d_model), args.skip)
    bound = gflops * 1e9 / per_token
    print(
        f"matmul_gflops: {gflops:.1f} (float32 [{args.batch_tokens}, {args.d_model}] x "
        f"[{args.d_model}, {n_latents}]); step needs {per_token / 1e6:.2f} MFLOP/token, "
        f"bound {bound:.0f} tokens/s"
    )
    print(f"limit_ratio: {results['crv'] / bound:.3f}")
    print(f"ratio: {results['crv'] / results['reference']:.2f}")


if __name__ == "__main__":
    main()
