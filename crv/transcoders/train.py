"""Training TopK transcoders for all layers in one pass over the activations.

Loss per layer, on a batch of N tokens (Gao et al. 2024; EleutherAI sparsify):

    FVU  = sum (y^ - y)^2 / sum (y - mean_batch(y))^2
    AuxK = sum (e^ - e)^2 / sum (y - mean_batch(y))^2,   e = y - y^ (constant)
           e^ = decoder sum over the top k_aux pre-activations among dead latents
    loss = FVU + auxk_coef * AuxK

FVU is scale-free, so one learning rate fits every layer whatever its output norm. A
latent is dead when it has not fired for `dead_tokens` training tokens; AuxK gives dead
latents gradient toward the part of the output the live latents miss, which revives most
of them (without it large fractions of TopK latents die).

Each layer's data are scaled by constants fixed on the first batch so that the centred
MLP input and output have mean squared norm d_model (unit variance per dimension): the
unit-norm decoder rows, the initial encoder and Adam's step sizes then suit every layer and
every model, however small or large its activations. The scales are folded into the
weights at the end (`TopKTranscoder.fold_scales`), so the saved transcoders act on raw
activations.

Recipe details: biases start at the data means of the first batch (b_dec = mean y,
b_enc = -W_enc mean x), decoder rows are kept at unit norm with the gradient component
along each row removed before the step, Adam with the learning rate scaled as
1/sqrt(F / 2^14), linear warmup and a linear decay to zero over the last steps. All layers
are updated from the same batch with one optimizer; their losses are independent, so
summing them before the backward pass changes nothing per layer. When the shuffle buffer
cannot hold all layers (`activations.layer_groups`), `train_transcoders` trains the groups
one after another, each from its own pass over the corpus.

Skip transcoders (`skip`) add W_skip x to y^ in the same loss; W_skip is one more
parameter of the same optimizer (its scale folds like the encoder's, x in and y out).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from crv.transcoders.activations import (
    ActivationCache,
    ShuffleBuffer,
    buffer_plan,
    layer_groups,
    training_batches,
)
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.module import TopKTranscoder, TranscoderSet, sparse_decode, topk_encode


@dataclass
class LayerLoss:
    """One layer's losses on one batch (tensors with grad) and its firing mask."""

    fvu: torch.Tensor
    auxk: torch.Tensor
    fired_F: torch.Tensor


def transcoder_loss(
    tc: TopKTranscoder,
    x_ND: torch.Tensor,
    y_ND: torch.Tensor,
    dead_F: torch.Tensor | None = None,
    k_aux: int = 0,
) -> LayerLoss:
    """FVU of the reconstruction plus the AuxK loss over the latents flagged in `dead_F`."""
    candidates_C = dead_F.nonzero().squeeze(1) if dead_F is not None else None
    k_aux = min(k_aux, candidates_C.numel()) if candidates_C is not None else 0
    acts_NK, idx_NK, aux_acts_NA, aux_idx_NA = topk_encode(
        x_ND, tc.W_enc, tc.b_enc, tc.k, tc.relu, candidates_C, k_aux
    )
    y_hat_ND = sparse_decode(acts_NK, idx_NK, tc.W_dec) + tc.b_dec
    skip_ND = tc.skip(x_ND)
    if skip_ND is not None:
        y_hat_ND = y_hat_ND + skip_ND
    total_var = (y_ND - y_ND.mean(0)).pow(2).sum()
    err_ND = y_hat_ND - y_ND
    fvu = err_ND.pow(2).sum() / total_var
    if k_aux > 0:
        e_hat_ND = sparse_decode(aux_acts_NA, aux_idx_NA, tc.W_dec)
        auxk = (e_hat_ND + err_ND.detach()).pow(2).sum() / total_var
    else:
        auxk = fvu.new_zeros(())
    fired_F = torch.zeros(tc.n_latents, dtype=torch.bool, device=x_ND.device)
    fired_F[idx_NK[acts_NK != 0]] = True
    return LayerLoss(fvu, auxk, fired_F)


def _unit_variance_scale(a_LND: torch.Tensor) -> torch.Tensor:
    """Per layer, c such that c * (a - mean a) has mean squared norm D; [L]."""
    sq_norm_L = (a_LND - a_LND.mean(1, keepdim=True)).pow(2).sum(-1).mean(1)
    return (a_LND.shape[-1] / sq_norm_L.clamp_min(1e-12)).sqrt()


@dataclass
class StepMetrics:
    """Per-layer metrics of one step (floats), keyed by layer."""

    fvu: dict[int, float]
    auxk: dict[int, float]
    dead_frac: dict[int, float]
    tokens: int


@dataclass
class TrainHistory:
    """Logged per-layer metrics: every `runtime_log_every` steps the mean over those steps."""

    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    fvu: dict[int, list[float]] = field(default_factory=dict)
    auxk: dict[int, list[float]] = field(default_factory=dict)
    dead_frac: dict[int, list[float]] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    passes: int = 1

    def add_pass(self, other: TrainHistory) -> None:
        """Fold in the history of another layer group (same step schedule)."""
        for name in ("fvu", "auxk", "dead_frac"):
            getattr(self, name).update(getattr(other, name))
        tokens = self.tokens_per_s * self.seconds + other.tokens_per_s * other.seconds
        self.seconds += other.seconds
        self.tokens_per_s = tokens / max(self.seconds, 1e-9)
        self.passes += 1

    def as_dict(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "fvu": {str(k): v for k, v in self.fvu.items()},
            "auxk": {str(k): v for k, v in self.auxk.items()},
            "dead_frac": {str(k): v for k, v in self.dead_frac.items()},
            "tokens_per_s": self.tokens_per_s,
            "seconds": self.seconds,
            "passes": self.passes,
        }


class TranscoderTrainer:
    """Owns the transcoders of `own` (default all of `layers`), their optimizer and
    dead-latent counters.

    The initialisations of `layers` are drawn from `seed` in order; a layer not owned is
    drawn and dropped, only to advance the generator, so a layer starts from the same
    weights whichever trainer (or rank, `crv.transcoders.distributed`) owns it.
    """

    def __init__(
        self,
        cfg: TranscodersConfig,
        d_model: int,
        layers: Sequence[int],
        device: str | torch.device = "cpu",
        seed: int = 0,
        own: Collection[int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.layers = [layer for layer in layers if own is None or layer in own]
        if not self.layers:
            raise ValueError(f"a trainer owns none of the layers {list(layers)} (own: {own})")
        self.device = torch.device(device)
        self.n_latents = cfg.latents(d_model)
        self.k_aux = cfg.aux_k(d_model)
        gen = torch.Generator().manual_seed(seed)
        drawn = list(layers)[: list(layers).index(self.layers[-1]) + 1]
        transcoders = {}
        for layer in drawn:
            tc = TopKTranscoder(d_model, self.n_latents, cfg.k, cfg.activation, gen, cfg.skip)
            if layer in self.layers:
                transcoders[layer] = tc.to(self.device)
        self.tset = TranscoderSet(transcoders, k=cfg.k, activation=cfg.activation)
        self.lr = cfg.learning_rate(d_model)
        params = [p for layer in self.layers for p in self.tset[layer].parameters()]
        self.optimizer = torch.optim.Adam(params, lr=self.lr)
        self.total_steps = max(1, math.ceil(cfg.tokens / cfg.batch_tokens))
        self.step_count = 0
        self.scale_x_L = torch.ones(len(self.layers), device=self.device)
        self.scale_y_L = torch.ones(len(self.layers), device=self.device)
        # Training tokens since each latent last fired; dead when above cfg.dead_tokens.
        self.since_fired_LF = torch.zeros(
            len(self.layers), self.n_latents, dtype=torch.long, device=self.device
        )

    def transcoder_set(self) -> TranscoderSet:
        """A copy of the trained set acting on raw (unscaled) activations."""
        out = copy.deepcopy(self.tset)
        for i, layer in enumerate(self.layers):
            out[layer].fold_scales(self.scale_x_L[i].item(), self.scale_y_L[i].item())
            out[layer].eval().requires_grad_(False)
        return out

    def lr_factor(self) -> float:
        """Linear warmup, constant, then linear decay to zero over `lr_decay_frac` of steps."""
        step, total = self.step_count, self.total_steps
        warm = min(1.0, (step + 1) / max(1, self.cfg.lr_warmup_steps))
        decay_steps = int(self.cfg.lr_decay_frac * total)
        decay = min(1.0, (total - step) / decay_steps) if decay_steps > 0 else 1.0
        return max(0.0, min(warm, decay))

    def dead_mask(self) -> torch.Tensor:
        """[L, F] bool: latents that have not fired within `dead_tokens` tokens."""
        return self.since_fired_LF > self.cfg.dead_tokens

    def step(self, x_LND: torch.Tensor, y_LND: torch.Tensor) -> StepMetrics:
        """One optimisation step of every layer on the same N tokens."""
        x_LND = x_LND.to(self.device, torch.float32)
        y_LND = y_LND.to(self.device, torch.float32)
        n_tokens = x_LND.shape[1]
        if self.step_count == 0:
            self.scale_x_L = _unit_variance_scale(x_LND)
            self.scale_y_L = _unit_variance_scale(y_LND)
        x_LND = x_LND * self.scale_x_L[:, None, None]
        y_LND = y_LND * self.scale_y_L[:, None, None]
        if self.step_count == 0 and self.cfg.init_from_data:
            lstsq = self.cfg.skip_init == "lstsq"
            for i, layer in enumerate(self.layers):
                self.tset[layer].init_from_data(x_LND[i], y_LND[i], lstsq)
        dead_LF = self.dead_mask()
        use_aux = self.cfg.auxk_coef > 0 and self.k_aux > 0
        losses = [
            transcoder_loss(
                self.tset[layer], x_LND[i], y_LND[i], dead_LF[i] if use_aux else None, self.k_aux
            )
            for i, layer in enumerate(self.layers)
        ]
        total = sum(loss.fvu + self.cfg.auxk_coef * loss.auxk for loss in losses)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self.lr_factor()
        if self.cfg.normalize_decoder:
            for layer in self.layers:
                self.tset[layer].remove_parallel_decoder_grad()
        self.optimizer.step()
        if self.cfg.normalize_decoder:
            for layer in self.layers:
                self.tset[layer].normalize_decoder()
        fired_LF = torch.stack([loss.fired_F for loss in losses])
        self.since_fired_LF += n_tokens
        self.since_fired_LF[fired_LF] = 0
        self.step_count += 1
        dead_frac = dead_LF.float().mean(1).tolist()
        return StepMetrics(
            fvu={layer: loss.fvu.item() for layer, loss in zip(self.layers, losses, strict=True)},
            auxk={layer: loss.auxk.item() for layer, loss in zip(self.layers, losses, strict=True)},
            dead_frac=dict(zip(self.layers, dead_frac, strict=True)),
            tokens=n_tokens,
        )

    def train(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        log: logging.Logger | None = None,
        progress: bool = True,
    ) -> TrainHistory:
        """Run `step` over `batches` with a progress bar (tokens/s, FVU, dead fraction)."""
        log = log or logging.getLogger("crv.transcoders")
        hist = TrainHistory()
        window: list[StepMetrics] = []
        seen = 0
        start = time.perf_counter()
        bar = tqdm(
            total=self.cfg.tokens,
            unit="tok",
            unit_scale=True,
            disable=not progress,
            desc="transcoders",
        )
        for x_LND, y_LND in batches:
            metrics = self.step(x_LND, y_LND)
            seen += metrics.tokens
            window.append(metrics)
            bar.update(metrics.tokens)
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                tok_s=f"{seen / elapsed:.0f}",
                fvu=f"{sum(metrics.fvu.values()) / len(metrics.fvu):.4f}",
                dead=f"{max(metrics.dead_frac.values()):.3f}",
            )
            if len(window) == self.cfg.runtime_log_every:
                self._log_window(hist, window, seen, log)
                window = []
        if window:
            self._log_window(hist, window, seen, log)
        bar.close()
        hist.seconds = time.perf_counter() - start
        hist.tokens_per_s = seen / max(hist.seconds, 1e-9)
        return hist

    def _log_window(
        self, hist: TrainHistory, window: list[StepMetrics], seen: int, log: logging.Logger
    ) -> None:
        hist.steps.append(self.step_count)
        hist.tokens.append(seen)
        for layer in self.layers:
            for name in ("fvu", "auxk", "dead_frac"):
                mean = sum(getattr(m, name)[layer] for m in window) / len(window)
                getattr(hist, name).setdefault(layer, []).append(mean)
        log.info(
            "step %d, %d tokens: %s",
            self.step_count,
            seen,
            "; ".join(
                f"L{layer} fvu {hist.fvu[layer][-1]:.4f} auxk {hist.auxk[layer][-1]:.3f} "
                f"dead {hist.dead_frac[layer][-1]:.3f}"
                for layer in self.layers
            ),
        )


def train_transcoders(
    cfg: TranscodersConfig,
    model: torch.nn.Module,
    adapter: Any,
    seqs: Sequence[Sequence[int]],
    layers: Sequence[int],
    device: str | torch.device,
    seed: int,
    cache_for: Callable[[list[int]], ActivationCache | None] = lambda _: None,
    log: logging.Logger | None = None,
    progress: bool = True,
    own: Collection[int] | None = None,
) -> tuple[TranscoderSet, TrainHistory]:
    """Train transcoders for `layers` in as many passes as the buffer needs
    (`layer_groups`); the first pass is seeded exactly as a single pass would be.

    `cache_for(group)` gives the activation cache of a group (None: no cache). With `own`
    only those layers are trained (and returned), each exactly as in a run over all
    `layers`: its group's seed, initialisation and shuffle-buffer size; a group without
    an owned layer costs no pass.
    """
    groups = layer_groups(cfg, layers, adapter.d_model)
    parts: list[tuple[TranscoderSet, TrainHistory]] = []
    for g, group in enumerate(groups):
        mine = [layer for layer in group if own is None or layer in own]
        if not mine:
            continue
        trainer = TranscoderTrainer(cfg, adapter.d_model, group, device, seed + g, mine)
        generator = torch.Generator().manual_seed(seed + g)
        plan = buffer_plan(cfg, len(group), adapter.d_model)
        buffer = ShuffleBuffer(plan, cfg.batch_tokens, generator)
        desc = "activations" if len(groups) == 1 else f"activations {g + 1}/{len(groups)}"
        with tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
            batches = training_batches(
                cfg,
                model,
                adapter,
                seqs,
                mine,
                generator,
                cache_for(mine),
                device,
                bar.update,
                buffer,
            )
            part = trainer.train(batches, log, progress)
        parts.append((trainer.transcoder_set(), part))
    if not parts:
        raise ValueError(f"none of the layers {sorted(own or [])} is among {list(layers)}")
    tset, history = parts[0]
    for group_set, part in parts[1:]:
        tset.transcoders.update(group_set.transcoders)
        history.add_pass(part)
    return tset, history
