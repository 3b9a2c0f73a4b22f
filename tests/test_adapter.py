"""ArchAdapter on tiny randomly initialised models of every supported family."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from factories import FAMILIES, tiny_model
from transformers import OPTConfig, OPTForCausalLM

from crv.models.adapter import FROZEN_ATTENTION, ArchAdapter

VOCAB, D, B, T = 50, 32, 2, 7


def _build(family: str) -> torch.nn.Module:
    # Sliding windows (4) shorter than T so that the sliding-window masks are exercised.
    # Gemma2's final logit soft-capping (a tanh on the logits) is off: it sits after the
    # unembedding, outside what frozen() linearises.
    model = tiny_model(family, vocab_size=VOCAB, hidden_size=D).float()
    # Larger-than-default weights make the non-linearities matter in the linearity check.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.3 if "emb" in name or "wte" in name else 0.2)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
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
    outside = model(_ids()).logits
    with adapter.frozen():
        assert model.config._attn_implementation == f"{FROZEN_ATTENTION}_{before}"
        with adapter.frozen():  # nesting is harmless
            inside = model(_ids()).logits
        with torch.no_grad():  # the no-gradient shortcut
            inside_no_grad = model(_ids()).logits
    assert model.config._attn_implementation == before
    assert torch.equal(inside, outside)
    assert torch.equal(inside_no_grad, outside)
    with pytest.raises(RuntimeError, match="boom"), adapter.frozen():
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert all(not norm._forward_hooks for norm in adapter.norms)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding window 4 < T
def test_frozen_keeps_values_with_padding_and_cache(
    family: str, implementation: str, padded: bool
) -> None:
    """Other mask forms: sdpa's None and boolean masks, padding, cached decoding."""
    model = _build(family)
    model.set_attn_implementation(implementation)
    adapter = ArchAdapter.for_model(model)
    ids = _ids()
    mask = torch.ones(B, T + 1, dtype=torch.long)
    if padded:
        mask[0, :2] = 0  # left padding in the first row

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        prefill = model(ids, attention_mask=mask[:, :T], use_cache=True)
        step = model(ids[:, :1], attention_mask=mask, cache=prefill.cache)
        assert prefill.cache.get_seq_length() == T + 1
        return prefill.logits, step.logits

    outside = run()
    with adapter.frozen():
        inside = run()
    for got, expected in zip(inside, outside, strict=True):
        assert torch.equal(got, expected)


def test_frozen_refuses_other_attention_and_restores() -> None:
    model = _build("llama")
    adapter = ArchAdapter.for_model(model)
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="eager or sdpa"), adapter.frozen():
        pass
    assert model.config._attn_implementation == "flash_attention_2"
    assert all(not norm._forward_hooks for norm in adapter.norms)


def _completeness_gap(family: str, frozen: bool, forward_mode: bool) -> float:
    """Relative gap between a logit readout and the sum of gradient x source over its sources.

    The sources are the residual stream entering layer 0 and every MLP output. With biases
    zeroed, the frozen model is homogeneous linear in its sources (norm scales and attention
    probabilities are constants), so the readout must equal the gradient-times-source sum
    exactly: the identity attribution graphs are built on. Since frozen() keeps forward
    values, finite differences would re-evaluate the scales and cannot show this;
    derivatives can. Backward mode: gradients of the readout. Forward mode (under no_grad,
    as attribution may run it): each source's tangent is the source itself, so the
    readout's tangent is the sum directly.
    """
    model = _build(family)
    if forward_mode and not frozen:  # torch's CPU sdpa kernel has no forward AD
        model.set_attn_implementation("eager")
    adapter = ArchAdapter.for_model(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    sources: list[torch.Tensor] = []

    def as_source(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        sources.append(fwAD.make_dual(t, t.clone()) if forward_mode else t.requires_grad_(True))
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
    try:
        with contextlib.ExitStack() as stack:
            if frozen:
                stack.enter_context(adapter.frozen())
            if forward_mode:
                stack.enter_context(torch.no_grad())
                stack.enter_context(fwAD.dual_level())
            value = (model(_ids()).logits * readout_BTV).sum()
            if forward_mode:
                value, total = fwAD.unpack_dual(value)
    finally:
        for handle in handles:
            handle.remove()
    assert len(sources) == 1 + adapter.n_layers
    if not forward_mode:
        grads = torch.autograd.grad(value, sources)
        total = sum((g * s).sum() for g, s in zip(grads, sources, strict=True))
    return (abs(total - value) / value.abs()).item()


@pytest.mark.parametrize("forward_mode", [False, True], ids=["backward", "forward"])
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_is_linear_in_sources(family: str, forward_mode: bool) -> None:
    assert _completeness_gap(family, frozen=True, forward_mode=forward_mode) < 1e-4
    # The check has teeth: the real model is not linear in its sources.
    assert _completeness_gap(family, frozen=False, forward_mode=forward_mode) > 1e-2


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
