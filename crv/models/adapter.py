"""The one place in crv that knows model families.

Everything downstream (transcoder training, splicing, attribution) speaks of "layer l,
MLP in, MLP out" and of a residual stream that is linear once attention patterns and
norm scales are frozen. This module maps those notions onto the module trees of the
supported Hugging Face families, one small table row per family, so that adding a family
means adding a row rather than touching the stages.

`ArchAdapter.frozen()` builds the "local replacement model" that attribution
differentiates: inside it every norm keeps its exact output value, but its derivative is
that of the norm with the normalising factor (1/rms or 1/std) held constant, and every
attention layer's probabilities are constants for autograd (backward and forward mode).
With MLP outputs held fixed, the derivatives are then those of a model that is linear
(affine, with biases) in the token embeddings and MLP outputs, so gradient x activation
sums exactly to the logits. Forward values are untouched: evaluating at another input
re-computes the scales, so the linearity is of the derivatives, not of finite differences.
Attention is frozen through transformers' attention-function registry: for the model's
implementation X (eager or sdpa) a twin `crv_frozen_X` is registered that keeps X's masks
and output values and adds an eager, detached-softmax path for the derivatives; it is
switched on for the model's configs inside the context and switched back on exit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

FROZEN_ATTENTION = "crv_frozen"  # prefix of the registered implementations
_FROZEN_FLAG = "_crv_frozen"  # set on the model while inside frozen()
SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class _FamilySpec:
    """Where one family keeps its parts, as dotted attribute paths from the *ForCausalLM."""

    family: str
    layers: str  # ModuleList of decoder blocks
    mlp: str  # attribute of a block: input[0] is the post-norm MLP input
    final_norm: str
    rms_weight_offset: float = 0.0  # RMSNorm scales by (offset + weight): 1.0 for Gemma


_LLAMA_LIKE = {"layers": "model.layers", "mlp": "mlp", "final_norm": "model.norm"}

# Keyed by `config.model_type`.
_FAMILIES: dict[str, _FamilySpec] = {
    "llama": _FamilySpec("llama", **_LLAMA_LIKE),
    "mistral": _FamilySpec("mistral", **_LLAMA_LIKE),
    "qwen2": _FamilySpec("qwen2", **_LLAMA_LIKE),
    "qwen3": _FamilySpec("qwen3", **_LLAMA_LIKE),
    "gemma2": _FamilySpec("gemma2", **_LLAMA_LIKE, rms_weight_offset=1.0),
    "gemma3_text": _FamilySpec("gemma3", **_LLAMA_LIKE, rms_weight_offset=1.0),
    "gpt2": _FamilySpec("gpt2", "transformer.h", "mlp", "transformer.ln_f"),
    "gpt_neox": _FamilySpec("gpt_neox", "gpt_neox.layers", "mlp", "gpt_neox.final_layer_norm"),
}


def _additive_mask(
    mask: torch.Tensor | None, q_len: int, k_len: int, like: torch.Tensor
) -> torch.Tensor:
    """The attention mask in eager's additive float form, whatever form it came in.

    sdpa passes None for a purely causal mask (it skips the mask only when no sliding
    window binds) and a 4D boolean mask (True = attend) otherwise; eager passes an
    additive float mask already.
    """
    if mask is None:  # causal; with a cache the queries are the last q_len positions
        q_pos = torch.arange(q_len, device=like.device)[:, None] + (k_len - q_len)
        mask = torch.arange(k_len, device=like.device)[None, :] <= q_pos
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return torch.where(mask, zero, torch.finfo(like.dtype).min)
    return mask[..., :k_len]


def _frozen_attention(
    module: nn.Module,
    query_BHQd: torch.Tensor,
    key_BKSd: torch.Tensor,
    value_BKSd: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    original: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention whose probabilities are constants for autograd.

    The gradient path is eager attention with a detached softmax, mirroring the eager
    functions of the supported families: grouped-query heads repeated, scores scaled and
    optionally soft-capped (Gemma2), the mask as passed (causal and sliding window are
    already in it), softmax in float32. Its value is also the output when the model runs
    eager attention (identical in float32); with `original` (sdpa) the output value is
    sdpa's, so values inside frozen() are bit-identical to outside.
    """
    if original is not None:  # only its value is used: give it no gradient or tangent
        exact_BQHd, weights = original(
            module,
            query_BHQd.detach(),
            key_BKSd.detach(),
            value_BKSd.detach(),
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            softcap=softcap,
            **kwargs,
        )
    n_rep = query_BHQd.shape[1] // key_BKSd.shape[1]
    key_BHSd = key_BKSd.repeat_interleave(n_rep, dim=1)
    value_BHSd = value_BKSd.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query_BHQd.shape[-1] ** -0.5
    scores_BHQS = torch.matmul(query_BHQd, key_BHSd.transpose(2, 3)) * scaling
    if softcap is not None:
        scores_BHQS = torch.tanh(scores_BHQS / softcap) * softcap
    q_len, k_len = query_BHQd.shape[2], key_BHSd.shape[2]
    scores_BHQS = scores_BHQS + _additive_mask(attention_mask, q_len, k_len, scores_BHQS)
    probs_BHQS = torch.softmax(scores_BHQS, dim=-1, dtype=torch.float32).to(query_BHQd.dtype)
    probs_BHQS = nn.functional.dropout(probs_BHQS.detach(), p=dropout, training=module.training)
    out_BQHd = torch.einsum("bhqs,bhsd->bqhd", probs_BHQS, value_BHSd).contiguous()
    if original is None:
        return out_BQHd, probs_BHQS
    return exact_BQHd + (out_BQHd - out_BQHd.detach()), weights


def _frozen_implementation(original: str) -> str:
    """Register (once) the frozen twin of attention implementation `original`; its name.

    The twin builds its masks exactly as `original` does (mask functions are looked up by
    the same name as attention functions); without a registered mask function
    transformers would build no mask at all. Flash and flex attention pass masks in other
    forms (2D padding masks, block masks) and are not supported.
    """
    if original not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"frozen() supports models running {' or '.join(SUPPORTED_ATTENTION)} attention, "
            f"not {original!r}: call model.set_attn_implementation('sdpa') first"
        )
    name = f"{FROZEN_ATTENTION}_{original}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        exact = None if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]
        ALL_ATTENTION_FUNCTIONS.register(name, functools.partial(_frozen_attention, original=exact))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _get(root: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _norm_with_frozen_scale(
    norm: nn.Module, rms_weight_offset: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm as a function whose normalising factor is detached (linear in its input)."""
    if isinstance(norm, nn.LayerNorm):

        def layer_norm(x: torch.Tensor) -> torch.Tensor:
            dims = tuple(range(-len(norm.normalized_shape), 0))
            x32 = x.float()
            centred = x32 - x32.mean(dims, keepdim=True)
            var = centred.pow(2).mean(dims, keepdim=True)
            y = centred * torch.rsqrt(var + norm.eps).detach()
            if norm.weight is not None:
                y = y * norm.weight.float()
            if norm.bias is not None:
                y = y + norm.bias.float()
            return y

        return layer_norm

    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise ValueError(f"RMSNorm {type(norm).__name__} has no eps attribute")

    def rms_norm(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).detach()
        return x32 * inv_rms * (rms_weight_offset + norm.weight.float())

    return rms_norm


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__


class ArchAdapter:
    """Family-independent view of a decoder-only causal LM.

    Attributes: `model`, `family`, `n_layers`, `d_model`, `vocab_size`, `layers` (decoder
    blocks), `embed_tokens`, `unembed_weight` [vocab, D], `final_norm`, `norms` (every norm
    module, including attention q/k norms).
    """

    def __init__(self, model: PreTrainedModel, spec: _FamilySpec) -> None:
        self.model = model
        self._spec = spec
        self.family = spec.family
        self.layers: list[nn.Module] = list(_get(model, spec.layers))
        self.n_layers = len(self.layers)
        self.embed_tokens: nn.Module = model.get_input_embeddings()
        self.unembed_weight: torch.Tensor = model.get_output_embeddings().weight
        self.vocab_size, self.d_model = self.unembed_weight.shape
        self.final_norm: nn.Module = _get(model, spec.final_norm)
        self.norms: list[nn.Module] = [m for m in model.modules() if _is_norm(m)]
        self._frozen_norms = {
            norm: _norm_with_frozen_scale(norm, spec.rms_weight_offset) for norm in self.norms
        }
        self._check_norms()

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> ArchAdapter:
        """The adapter for `model`; ValueError naming the supported families if unknown."""
        model_type = getattr(model.config, "model_type", None)
        spec = _FAMILIES.get(model_type)
        if spec is None:
            supported = ", ".join(sorted(_FAMILIES))
            raise ValueError(
                f"crv has no architecture adapter for model_type {model_type!r} "
                f"({type(model).__name__}); supported model types: {supported}"
            )
        return cls(model, spec)

    def mlp(self, layer: int) -> nn.Module:
        """Layer `layer`'s MLP: forward input[0] is MLP in [B, T, D], its output MLP out."""
        return _get(self.layers[layer], self._spec.mlp)

    def run_body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """A forward pass through the embedding, the decoder blocks and the final norm, not
        the unembedding: for work that reads activations through hooks. Logits would cost
        tokens x vocabulary x 4 bytes."""
        self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def _check_norms(self) -> None:
        """Fail early if a norm module does not compute what its frozen version assumes."""
        for norm, frozen_norm in self._frozen_norms.items():
            weight = getattr(norm, "weight", None)
            if isinstance(norm, nn.LayerNorm):
                dim = norm.normalized_shape
            elif isinstance(weight, torch.Tensor):
                dim = tuple(weight.shape)
            else:
                raise ValueError(f"unsupported norm module {type(norm).__name__} in {self.family}")
            like = weight if isinstance(weight, torch.Tensor) else self.unembed_weight
            with torch.no_grad():
                x = torch.randn(2, *dim, generator=torch.Generator().manual_seed(0))
                x = x.to(device=like.device, dtype=like.dtype)
                expected, got = norm(x).float(), frozen_norm(x)
            tol = 1e-4 if like.dtype == torch.float32 else 3e-2
            if not torch.allclose(expected, got, rtol=tol, atol=tol):
                raise ValueError(
                    f"norm {type(norm).__name__} of {self.family} does not match crv's frozen "
                    f"formula (max diff {(expected - got).abs().max().item():.3g})"
                )

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Detach attention probabilities and norm scale factors; values stay unchanged.

        Each config's attention implementation X is switched to its registered frozen twin
        `crv_frozen_X`, and each norm gets a linearising forward hook; both are undone on
        exit, also on an exception.
        """
        if getattr(self.model, _FROZEN_FLAG, False):  # nested use: already linearised
            yield
            return
        configs = {
            id(m.config): m.config
            for m in self.model.modules()
            if isinstance(getattr(m, "config", None), PretrainedConfig)
        }
        saved = {key: cfg._attn_implementation_internal for key, cfg in configs.items()}
        handles = []
        try:
            for key, cfg in configs.items():
                cfg._attn_implementation_internal = _frozen_implementation(saved[key] or "eager")
            for norm, frozen_norm in self._frozen_norms.items():
                handles.append(norm.register_forward_hook(_linearising_hook(frozen_norm)))
            setattr(self.model, _FROZEN_FLAG, True)
            yield
        finally:
            setattr(self.model, _FROZEN_FLAG, False)
            for handle in handles:
                handle.remove()
            for key, cfg in configs.items():
                cfg._attn_implementation_internal = saved[key]


def _linearising_hook(
    frozen_norm: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
    """Forward hook: keep the norm's output value, take the frozen-scale norm's gradient."""

    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        lin = frozen_norm(inputs[0]).to(out.dtype)
        return out.detach() + (lin - lin.detach())

    return hook
