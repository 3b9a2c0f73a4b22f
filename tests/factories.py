"""Tiny random models, tokenizers, transcoder sets and composed configs shared by the tests.

Plain functions, imported as `from factories import ...` (pytest puts tests/ on sys.path).
The model and transcoder factories seed their own random generators, so equal arguments
give equal weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
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
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from crv.config import CRVConfig, register_configs
from crv.transcoders.module import TopKTranscoder, TranscoderSet

MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {
    "gemma2": Gemma2ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "gpt_neox": GPTNeoXForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}
FAMILIES = tuple(sorted(MODEL_CLASSES))
"""Every model family the architecture adapter supports."""


def tiny_config(
    family: str,
    *,
    vocab_size: int,
    hidden_size: int = 32,
    n_layers: int = 2,
    sliding_window: int = 4,
    max_positions: int = 32,
    initializer_range: float = 0.02,
    final_logit_softcapping: float | None = None,
) -> PretrainedConfig:
    """Config of a tiny `family` model: 4 heads (2 key-value heads where the family has
    grouped-query attention), head size 8 where it is set apart from the width, MLP width 64.

    `sliding_window` applies to Mistral and Gemma (Gemma3 alternates sliding and full layers,
    starting with sliding); `max_positions` to GPT-2 and GPT-NeoX; `final_logit_softcapping`
    to Gemma2 (the other families have none).
    """
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        initializer_range=initializer_range,
    )
    gemma = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=sliding_window)
    if family in ("llama", "qwen2"):
        return (LlamaConfig if family == "llama" else Qwen2Config)(**shape)
    if family == "mistral":
        return MistralConfig(**shape, sliding_window=sliding_window)
    if family == "qwen3":
        return Qwen3Config(**shape, head_dim=8)
    if family == "gemma2":
        return Gemma2Config(
            **shape,
            **gemma,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=final_logit_softcapping,
        )
    if family == "gemma3":
        layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)]
        return Gemma3TextConfig(**shape, **gemma, layer_types=layer_types)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=n_layers,
            n_head=4,
            n_positions=max_positions,
            initializer_range=initializer_range,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=max_positions,
            initializer_range=initializer_range,
        )
    raise ValueError(f"unknown family {family!r}")


def tiny_model(family: str, seed: int = 0, **config: float | int | None) -> torch.nn.Module:
    """A randomly initialised `family` model (eval mode) of `tiny_config(family, **config)`."""
    cfg = tiny_config(family, **config)
    torch.manual_seed(seed)
    return MODEL_CLASSES[family](cfg).eval()


def tiny_llama(seed: int = 0, **config: float | int) -> LlamaForCausalLM:
    """A randomly initialised Llama (eval mode): vocabulary 50, width 32, 2 layers of 4 heads,
    MLP width 64; `config` overrides or adds `LlamaConfig` fields."""
    shape = dict(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**shape, **config})).eval()


def word_vocabulary(size: int) -> list[str]:
    """`<unk>`, `<bos>`, `<eos>` and the numbers 0, 1, ... up to `size` words."""
    return ["<unk>", "<bos>", "<eos>"] + [str(i) for i in range(size - 3)]


def tiny_tokenizer(size: int = 64) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `word_vocabulary(size)`."""
    vocab = {w: i for i, w in enumerate(word_vocabulary(size))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def random_transcoder_set(
    d_model: int,
    n_latents: int,
    k: int,
    layers: Iterable[int],
    *,
    activation: str = "relu_topk",
    seed: int = 0,
    generator: torch.Generator | None = None,
    init: Callable[[TopKTranscoder, torch.Generator], object] | None = None,
) -> TranscoderSet:
    """Random TopK transcoders for `layers`, drawn in layer order from one generator
    (`generator`, else a fresh one seeded with `seed`). `init(tc, generator)` runs under
    no_grad right after each transcoder is drawn, to change its weights."""
    gen = torch.Generator().manual_seed(seed) if generator is None else generator
    tcs = {}
    for layer in layers:
        tcs[layer] = TopKTranscoder(d_model, n_latents, k, activation, generator=gen)
        if init is not None:
            with torch.no_grad():
                init(tcs[layer], gen)
    return TranscoderSet(tcs, k=k, activation=activation)


ROOT = Path(__file__).resolve().parents[1]


def composed(overrides: list[str]) -> CRVConfig:
    """The config `crv` composes from conf/ with `overrides`, as dataclasses."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))
