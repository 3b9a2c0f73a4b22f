"""ArchAdapter on tiny randomly initialised models of every supported family."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from crv.models.adapter import FROZEN_ATTENTION, ArchAdapter

VOCAB, D, B, T = 50, 32, 2, 7
_LLAMA_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=D,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
)
# Sliding windows shorter than T so that the sliding-window masks are exercised.
# Gemma2's final logit soft-capping (a tanh on the logits) is switched off: it sits after
# the unembedding, outside what frozen() linearises.
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA_SHAPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_LLAMA_SHAPE, sliding_window=4)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_LLAMA_SHAPE)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_LLAMA_SHAPE, head_dim=8)),
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(
            **_LLAMA_SHAPE,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=None,
        )
    ),
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **_LLAMA_SHAPE,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        )
    ),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=32)
    ),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    ),
}


def _build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]().float().eval()
    # Larger-than-default weights make the non-linearities matter in the linearity check.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.3 if "emb" in name or "wte" in name else 0.2)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model_and_adapter(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, ArchAdapter]:
    model = _build(request.param)
    return model, ArchAdapter.for_model(model)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


def test_shapes_and_parts(model_and_adapter: tuple[torch.nn.Module, ArchAdapter]) -> None:
    model, adapter = model_and_adapter
    assert adapter.n_layers == len(adapter.layers) == 2
    assert (adapter.d_model, adapter.vocab_size) == (D, VOCAB)
    assert adapter.unembed_weight.shape == (VOCAB, D)
    assert adapter.final_norm in adapter.norms
    for layer in adapter.layers:
        assert sum(1 for m in layer.modules() if m in adapter.norms) >= 2
    seen: dict[int, tuple[torch.Size, torch.Size]] = {}
    handles = [
        adapter.mlp(layer).register_forward_hook(
            lambda _m, inp, out, layer=layer: seen.__setitem__(layer, (inp[0].shape, out.shape))
        )
        for layer in range(adapter.n_layers)
    ]
    try:
        model(_ids())
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {layer: ((B, T, D), (B, T, D)) for layer in range(adapter.n_layers)}
    assert adapter.embed_tokens(_ids()).shape == (B, T, D)


def test_mlp_output_is_the_real_one(model_and_adapter: tuple[torch.nn.Module, ArchAdapter]) -> None:
    model, adapter = model_and_adapter
    # Not a constant shift: LayerNorm's centring would remove it.
    bump_D = torch.randn(D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        clean = model(_ids()).logits
        for layer in range(adapter.n_layers):
            handle = adapter.mlp(layer).register_forward_hook(lambda _m, _i, out: out + bump_D)
            try:
                patched = model(_ids()).logits
            finally:
                handle.remove()
            assert not torch.allclose(clean, patched, atol=1e-3)
        assert torch.equal(model(_ids()).logits, clean)


def test_frozen_keeps_values_and_restores(
    model_and_adapter: tuple[torch.nn.Module, ArchAdapter],
) -> None:
    model, adapter = model_and_adapter
    before = model.config._attn_implementation
    with torch.no_grad():
        outside = model(_ids()).logits
        with adapter.frozen():
            assert model.config._attn_implementation == f"{FROZEN_ATTENTION}_{before}"
            with adapter.frozen():  # nesting is harmless
                inside = model(_ids()).logits
        assert model.config._attn_implementation == before
        assert torch.equal(inside, outside)
        with pytest.raises(RuntimeError, match="boom"), adapter.frozen():
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert all(not norm._forward_hooks for norm in adapter.norms)


def _completeness_gap(model: torch.nn.Module, adapter: ArchAdapter, frozen: bool) -> float:
    """Relative gap between a logit readout and the sum of gradient x source over its sources.

    The sources are the residual stream entering layer 0 and every MLP output, all made
    leaves. With biases zeroed, the frozen model is homogeneous linear in its sources (norm
    scales and attention probabilities are constants), so the readout must equal the
    gradient-times-source sum exactly: the identity attribution graphs are built on. Since
    frozen() keeps forward values, finite differences would re-evaluate the scales and
    cannot show this; gradients can.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    sources: list[torch.Tensor] = []

    def as_source(t: torch.Tensor) -> torch.Tensor:
        sources.append(t.detach().requires_grad_(True))
        return sources[-1]

    def resid_hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (as_source(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": as_source(kwargs["hidden_states"])}

    handles = [adapter.layers[0].register_forward_pre_hook(resid_hook, with_kwargs=True)]
    handles += [
        adapter.mlp(layer).register_forward_hook(lambda _m, _i, out: as_source(out))
        for layer in range(adapter.n_layers)
    ]
    readout_BTV = torch.randn(B, T, VOCAB, generator=torch.Generator().manual_seed(2))
    ctx = adapter.frozen() if frozen else contextlib.nullcontext()
    try:
        with ctx:
            value = (model(_ids()).logits * readout_BTV).sum()
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(value, sources)
    total = sum((g * s).sum() for g, s in zip(grads, sources, strict=True))
    assert len(sources) == 1 + adapter.n_layers
    return (abs(total - value) / value.abs()).item()


def test_frozen_is_linear_in_sources(model_and_adapter: tuple[torch.nn.Module, ArchAdapter]) -> None:
    model, adapter = model_and_adapter
    assert _completeness_gap(model, adapter, frozen=True) < 1e-4
    assert _completeness_gap(model, adapter, frozen=False) > 1e-2  # the check has teeth


def test_unknown_family_is_a_clear_error() -> None:
    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=D,
            num_hidden_layers=1,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=D,
        )
    )
    with pytest.raises(ValueError, match=r"'opt'.*gemma2.*gpt_neox.*llama.*qwen3"):
        ArchAdapter.for_model(model)
