"""Per-layer transcoders (sparse codes of at most k latents) and the set of them for one model.

A transcoder is a wide, sparse replacement for one MLP: it reads the MLP's input x and
predicts the MLP's output y (Dunefsky et al. 2024),

    pre = W_enc x + b_enc                    W_enc [F, D], b_enc [F]
    f   = TopK(act(pre))                     keep the k largest entries, zero the rest
    y^  = W_dec^T f + b_dec (+ W_skip x)     W_dec [F, D], b_dec [D], W_skip [D, D]

`act` is the identity (`topk`, what crv trains: TopK fixes the L0 at k, so there is no
sparsity penalty to tune, Gao et al. 2024), ReLU (`relu_topk`, and `relu` for published
ReLU sets) or JumpReLU (`jumprelu`: pre where pre > threshold[f], else 0). For ReLU and
JumpReLU sets k only caps the code: the k most active latents are kept, and whatever the
rest would add is left to the error term (exact attribution is unaffected; set k to the
set's largest L0 to keep everything). `W_skip` (skip transcoders) is a linear path from
MLP input to output outside the latents.

Why the custom autograd function: a dense implementation multiplies by all F latents three
times in the encoder (forward, input gradient, weight gradient) and three times in the
decoder, though only k of F (k/F = 1/64 at the defaults) are non-zero. Here only the
forward pre-activation matmul is dense - it is needed to find the top k. Everything after
it touches the selected latents only:

- decode: `F.embedding_bag` with the activations as per-sample weights sums k decoder
  rows per token; its backward gathers the k rows for the activations' gradient and
  forms the weight gradient as a sparse [F, N] x [N, D] product (embedding_bag's own
  backward sorts all N x k indices, slower than the rest of the step together);
- encoder backward: the input gradient is the same gather-sum over the k encoder rows
  (embedding_bag again), the weight gradient a sparse [F, N] x [N, D] product whose
  non-zeros are the (latent, token) pairs that were selected.

The same function also selects the AuxK latents (the top `k_aux` pre-activations among
latents currently flagged dead), so one backward pass serves both losses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("topk", "relu_topk", "relu", "jumprelu")
"""Activations a transcoder can apply; training supports `topk` and `relu_topk`."""

FEATURE_INPUT_HOOK = "mlp.hook_in"
FEATURE_OUTPUT_HOOK = "mlp.hook_out"


class _TopKEncode(torch.autograd.Function):
    """(x, W_enc, b_enc) -> (acts_NK, idx_NK, aux_acts_NA, aux_idx_NA); sparse backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_ND: torch.Tensor,
        W_enc_FD: torch.Tensor,
        b_enc_F: torch.Tensor,
        k: int,
        relu: bool,
        aux_candidates_C: torch.Tensor | None,
        k_aux: int,
        threshold_F: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pre_NF = torch.addmm(b_enc_F, x_ND, W_enc_FD.T)
        if threshold_F is not None:  # JumpReLU, before the selection
            pre_NF = pre_NF.where(pre_NF > threshold_F, 0.0)
        vals_NK, idx_NK = pre_NF.topk(k, dim=-1, sorted=False)
        if aux_candidates_C is not None and k_aux > 0:
            aux_vals_NA, pos_NA = pre_NF[:, aux_candidates_C].topk(k_aux, dim=-1, sorted=False)
            aux_idx_NA = aux_candidates_C[pos_NA]
        else:
            aux_vals_NA = pre_NF.new_zeros(x_ND.shape[0], 0)
            aux_idx_NA = idx_NK.new_zeros(x_ND.shape[0], 0)
        if relu:
            vals_NK, aux_vals_NA = vals_NK.clamp_min(0), aux_vals_NA.clamp_min(0)
        ctx.save_for_backward(x_ND, W_enc_FD, idx_NK, aux_idx_NA, vals_NK, aux_vals_NA)
        ctx.gated = relu or threshold_F is not None
        ctx.mark_non_differentiable(idx_NK, aux_idx_NA)
        return vals_NK, idx_NK, aux_vals_NA, aux_idx_NA

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        g_acts_NK: torch.Tensor,
        _g_idx: torch.Tensor | None,
        g_aux_NA: torch.Tensor,
        _g_aux_idx: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        x_ND, W_enc_FD, idx_NK, aux_idx_NA, vals_NK, aux_vals_NA = ctx.saved_tensors
        g_NS = torch.cat([g_acts_NK, g_aux_NA], dim=1)  # S = K + A selected latents
        idx_NS = torch.cat([idx_NK, aux_idx_NA], dim=1)
        if ctx.gated:  # (Jump)ReLU passes gradient only where the kept value is non-zero
            g_NS = g_NS * (torch.cat([vals_NK, aux_vals_NA], dim=1) != 0)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_NS, W_enc_FD, per_sample_weights=g_NS, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = torch.sparse.mm(_selected_FN(idx_NS, g_NS, W_enc_FD.shape[0]), x_ND)
        if ctx.needs_input_grad[2]:
            grad_b = g_NS.new_zeros(W_enc_FD.shape[0]).index_add_(
                0, idx_NS.reshape(-1), g_NS.reshape(-1)
            )
        return grad_x, grad_W, grad_b, None, None, None, None, None


def topk_encode(
    x_ND: torch.Tensor,
    W_enc_FD: torch.Tensor,
    b_enc_F: torch.Tensor,
    k: int,
    relu: bool,
    aux_candidates_C: torch.Tensor | None = None,
    k_aux: int = 0,
    threshold_F: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TopK encoding with a sparse backward; also the AuxK selection among candidates.

    Returns `acts_NK, idx_NK, aux_acts_NA, aux_idx_NA`: the k kept activations and their
    latent indices, and the top `k_aux` activations among the latents `aux_candidates_C`
    (empty [N, 0] when none are given). `k_aux` must not exceed the number of candidates.
    `threshold_F` (JumpReLU) zeroes pre-activations at or below it before the selection.
    """
    return _TopKEncode.apply(x_ND, W_enc_FD, b_enc_F, k, relu, aux_candidates_C, k_aux, threshold_F)


def _selected_FN(idx_NS: torch.Tensor, vals_NS: torch.Tensor, n_latents: int) -> torch.Tensor:
    """The [F, N] sparse matrix with vals[n, s] at (idx[n, s], n): a code as a matrix."""
    n_tokens, n_sel = idx_NS.shape
    cols = torch.arange(n_tokens, device=idx_NS.device).repeat_interleave(n_sel)
    return torch.sparse_coo_tensor(
        torch.stack([idx_NS.reshape(-1), cols]),
        vals_NS.reshape(-1),
        (n_latents, n_tokens),
        check_invariants=False,
    )


class _SparseDecode(torch.autograd.Function):
    """(acts_NK, idx_NK, W_dec) -> sum_k acts[n, k] W_dec[idx[n, k]]; sparse backward.

    The forward is embedding_bag's gather-sum. Its own backward for the weight sorts all
    N x K indices to accumulate rows (the costliest op of a training step); here the weight
    gradient is the sparse [F, N] x [N, D] product the encoder's weight gradient uses, and
    only the activations' gradient comes from embedding_bag.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        acts_NK: torch.Tensor,
        idx_NK: torch.Tensor,
        W_dec_FD: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(acts_NK, idx_NK, W_dec_FD)
        return F.embedding_bag(idx_NK, W_dec_FD, per_sample_weights=acts_NK, mode="sum")

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, g_ND: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        acts_NK, idx_NK, W_dec_FD = ctx.saved_tensors
        grad_acts = grad_W = None
        if ctx.needs_input_grad[0]:  # <W_dec[idx[n, k]], g[n]>: embedding_bag's own
            with torch.enable_grad():  # per-sample-weight backward (without its weight part)
                a_NK = acts_NK.detach().requires_grad_(True)
                y_ND = F.embedding_bag(
                    idx_NK, W_dec_FD.detach(), per_sample_weights=a_NK, mode="sum"
                )
                (grad_acts,) = torch.autograd.grad(y_ND, a_NK, g_ND)
        if ctx.needs_input_grad[2]:
            grad_W = torch.sparse.mm(_selected_FN(idx_NK, acts_NK, W_dec_FD.shape[0]), g_ND)
        return grad_acts, None, grad_W


def sparse_decode(
    acts_NK: torch.Tensor, idx_NK: torch.Tensor, W_dec_FD: torch.Tensor
) -> torch.Tensor:
    """sum_k acts[n, k] * W_dec[idx[n, k]] as a gather-sum (no bias); [N, D]."""
    if not (torch.is_grad_enabled() and (acts_NK.requires_grad or W_dec_FD.requires_grad)):
        return F.embedding_bag(idx_NK, W_dec_FD, per_sample_weights=acts_NK, mode="sum")
    return _SparseDecode.apply(acts_NK, idx_NK, W_dec_FD)


def ridge_map(x_ND: torch.Tensor, y_ND: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """W [D_out, D_in] minimising |(y - mean y) - (x - mean x) W^T|^2 + lam |W|^2.

    lam is `ridge` times the mean eigenvalue of the centred x's Gram matrix: negligible
    when the tokens outnumber the dimensions, and a well-posed solve when they do not.
    """
    xc_ND = x_ND - x_ND.mean(0)
    gram_DD = xc_ND.T @ xc_ND
    lam = ridge * gram_DD.diagonal().mean().clamp_min(1e-12)
    gram_DD.diagonal().add_(lam)
    return torch.linalg.solve(gram_DD, xc_ND.T @ (y_ND - y_ND.mean(0))).T


class TopKTranscoder(nn.Module):
    """One layer's transcoder: MLP in [..., D] -> MLP out [..., D] through k of F latents.

    Inputs of any leading shape are flattened to tokens and computed in the parameters'
    dtype; outputs come back in the input's shape and dtype. `threshold` ([F], JumpReLU)
    and `W_skip` ([D, D]) exist only where the activation or the set has them (None else).
    """

    threshold: torch.Tensor | None
    W_skip: torch.Tensor | None

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        activation: str = "relu_topk",
        generator: torch.Generator | None = None,
        skip: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must be in 1..n_latents={n_latents}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        self.activation = str(activation)  # a plain str also for a config's enum member
        # Gao et al.: unit-norm decoder rows, encoder initialised as the decoder's transpose
        # (both are stored [F, D], so the same matrix), scaled so that pre-activations of
        # a unit-variance input have about unit variance across latents.
        dirs_FD = torch.randn(n_latents, d_model, generator=generator)
        dirs_FD /= dirs_FD.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(dirs_FD.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(dirs_FD.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        jump = activation == "jumprelu"
        self.register_parameter("threshold", nn.Parameter(torch.zeros(n_latents)) if jump else None)
        self.register_parameter(
            "W_skip", nn.Parameter(torch.zeros(d_model, d_model)) if skip else None
        )

    @property
    def relu(self) -> bool:
        return self.activation in ("relu_topk", "relu")

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations x @ W_enc.T + b_enc; [N, F]."""
        return F.linear(x_ND.to(self.W_enc.dtype), self.W_enc, self.b_enc)

    def encode(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k kept activations and their latent indices, each [..., K]."""
        lead = x_ND.shape[:-1]
        x_flat = x_ND.reshape(-1, self.d_model).to(self.W_enc.dtype)
        acts_NK, idx_NK, _, _ = topk_encode(
            x_flat, self.W_enc, self.b_enc, self.k, self.relu, threshold_F=self.threshold
        )
        return acts_NK.reshape(*lead, self.k), idx_NK.reshape(*lead, self.k)

    def decode(self, acts_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """W_dec^T f + b_dec from the sparse code; [..., D]."""
        lead = acts_NK.shape[:-1]
        k = acts_NK.shape[-1]
        y_ND = sparse_decode(acts_NK.reshape(-1, k), idx_NK.reshape(-1, k), self.W_dec) + self.b_dec
        return y_ND.reshape(*lead, self.d_model)

    def skip(self, x_ND: torch.Tensor) -> torch.Tensor | None:
        """The skip path x @ W_skip.T ([..., D], parameters' dtype); None without W_skip."""
        if self.W_skip is None:
            return None
        return F.linear(x_ND.to(self.W_skip.dtype), self.W_skip)

    def reconstruct(
        self, x_ND: torch.Tensor, acts_NK: torch.Tensor, idx_NK: torch.Tensor
    ) -> torch.Tensor:
        """The transcoder's output for input `x_ND` with code (acts, idx): decode + skip."""
        y_ND = self.decode(acts_NK, idx_NK)
        skip_ND = self.skip(x_ND)
        return y_ND if skip_ND is None else y_ND + skip_ND

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x_ND, *self.encode(x_ND)).to(x_ND.dtype)

    @torch.no_grad()
    def init_from_data(
        self, x_ND: torch.Tensor, y_ND: torch.Tensor, skip_lstsq: bool = False
    ) -> None:
        """b_dec = mean(y); b_enc = -W_enc mean(x) (pre-activations centred on the data).

        With the decoder bias at the output mean the loss starts at (about) FVU 1 instead of
        the FVU of predicting zero, and centred pre-activations make TopK select on the
        token-specific part of the input rather than on its mean. With `skip_lstsq` (skip
        transcoders) W_skip is first set to the least-squares map x -> y on these tokens
        (`ridge_map`) and b_dec to the mean of what it leaves, so the loss starts at the
        linear map's FVU and the latents code the residual from the first step.
        """
        x_ND, y_ND = x_ND.float(), y_ND.float()
        mean_y_D = y_ND.mean(0)
        if skip_lstsq and self.W_skip is not None:
            self.W_skip.copy_(ridge_map(x_ND, y_ND))
            mean_y_D = mean_y_D - self.W_skip @ x_ND.mean(0)
        self.b_dec.copy_(mean_y_D)
        self.b_enc.copy_(-(self.W_enc @ x_ND.mean(0)))

    @torch.no_grad()
    def fold_scales(self, scale_x: float, scale_y: float) -> None:
        """Turn a transcoder of (scale_x * x -> scale_y * y) into one of (x -> y).

        The latents shrink by 1/scale_y (W_enc *= scale_x / scale_y, b_enc /= scale_y), a
        common positive factor, so TopK selects the same latents and ReLU zeroes the same
        ones; the decoder rows stay unit-norm, b_dec /= scale_y and W_skip *= scale_x /
        scale_y.
        """
        self.W_enc *= scale_x / scale_y
        self.b_enc /= scale_y
        self.b_dec /= scale_y
        if self.W_skip is not None:
            self.W_skip *= scale_x / scale_y

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row (it would only change norms)."""
        if self.W_dec.grad is None:
            return
        dots_F = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad -= dots_F * self.W_dec


@dataclass
class TranscoderSet:
    """The transcoders of one model, keyed by layer, with circuit-tracer's metadata."""

    transcoders: dict[int, TopKTranscoder]
    k: int
    activation: str
    feature_input_hook: str = FEATURE_INPUT_HOOK
    feature_output_hook: str = FEATURE_OUTPUT_HOOK
    files: dict[int, str] = field(default_factory=dict)
    """Per-layer file each transcoder was loaded from (for error messages)."""

    def __post_init__(self) -> None:
        self.activation = str(self.activation)  # plain str: it is written to config.yaml

    def __getitem__(self, layer: int) -> TopKTranscoder:
        return self.transcoders[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.transcoders))

    def __len__(self) -> int:
        return len(self.transcoders)

    @property
    def layers(self) -> list[int]:
        return sorted(self.transcoders)

    @property
    def d_model(self) -> int:
        return next(iter(self.transcoders.values())).d_model

    def to(self, device: str | torch.device) -> TranscoderSet:
        for tc in self.transcoders.values():
            tc.to(device)
        return self

    def check_compatible(self, adapter: object) -> None:
        """Raise ValueError naming the file, layer and shape if this set does not fit the model.

        `adapter` is a `crv.models.adapter.ArchAdapter` (anything with `n_layers`, `d_model`).
        """
        n_layers, d_model = adapter.n_layers, adapter.d_model
        for layer in self.layers:
            tc = self.transcoders[layer]
            where = self.files.get(layer, f"layer {layer}")
            if not 0 <= layer < n_layers:
                raise ValueError(
                    f"{where}: transcoder for layer {layer}, but the model has {n_layers} layers"
                )
            for name in ("W_enc", "W_dec", "b_dec"):
                shape = tuple(getattr(tc, name).shape)
                if shape[-1] != d_model:
                    raise ValueError(
                        f"{where}: layer {layer} {name} has shape {list(shape)}, but the "
                        f"model's d_model is {d_model} (expected last dim {d_model})"
                    )
