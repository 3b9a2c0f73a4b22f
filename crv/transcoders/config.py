"""Configuration of the `transcoders` stage (the `transcoders` config section).

Every field's docstring is its help text. The defaults are sized for crv's embedded subject
model (Llama, 4 layers, d_model 128, MLP 512, a 33-token vocabulary) on a 2-core CPU:
16x expansion (2,048 latents) with plain TopK, k = 32 (so L0 = k exactly), 2M tokens, all
layers trained in one pass (the 2 GiB buffer holds all their float32 tokens with room for
one model batch). Larger models get a bfloat16 buffer of fewer tokens, and layer groups
trained in several passes when even that is below `min_shuffle_tokens`. What these
defaults measured (bfloat16 against float32, FVU per layer, the alternatives): README.md,
"Figures behind the code".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from crv.options import Choice, check_choices


class Activation(Choice):
    """What TopK keeps when training (see `TranscodersConfig.activation`)."""

    topk = "topk"
    relu_topk = "relu_topk"


class CacheDtype(Choice):
    """Storage dtype of cached activations."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class SkipInit(Choice):
    """How a skip transcoder's W_skip starts (see `TranscodersConfig.skip_init`)."""

    lstsq = "lstsq"
    zero = "zero"


class BufferDtype(Choice):
    """Dtype of the shuffle buffer (`auto`: float32 when it fits, else bfloat16)."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


@dataclass
class TranscodersConfig:
    """Hyperparameters of per-layer TopK transcoders (MLP in -> MLP out)."""

    pretrained: str | None = None
    """A published transcoder set to evaluate instead of training one: a directory or a hub
    repo `owner/name[@revision]` in circuit-tracer's layout (`config.yaml` naming per-layer
    safetensors by path or `hf://owner/name[@revision]/file` URI). Hub files come from
    huggingface_hub's cache (offline once cached)."""

    k: int = 32
    """Number of latents kept per token by TopK (the L0 of every transcoder); for a
    pretrained set whose config names no k, its k (TopK) or the cap on active latents kept
    per token (ReLU, JumpReLU: the rest goes to the error term)."""

    expansion: int = 16
    """Latents per model dimension; ignored when `n_latents` is set."""

    n_latents: int | None = None
    """Number of latents F per layer; default `expansion * d_model`."""

    activation: Activation = Activation.topk
    """`relu_topk`: ReLU on the k kept pre-activations; `topk`: kept values unchanged."""

    skip: bool = False
    """Train skip transcoders: a linear path y^ += W_skip x ([d_model, d_model], learned
    jointly with the latents) beside the sparse code, saved as `W_skip` in each layer file
    (circuit-tracer's layout) and a direct MLP-in -> MLP-out path in attribution graphs.
    The latents then only code what a linear map of the MLP input cannot predict."""

    skip_init: SkipInit = SkipInit.zero
    """`zero`: W_skip starts at zero and is learned with the latents from the loss alone;
    `lstsq`: it starts at the ridge least-squares map from MLP input to output on the first
    batch (b_dec at the mean residual; needs `init_from_data`). `lstsq` starts lower but
    ends higher at crv-tiny's budgets (`benchmarks/skip_init.py`, README): the latents,
    left only a residual from the first step, code it less well than the output itself."""

    lr: float | None = None
    """Adam learning rate; default 4e-4 / sqrt(n_latents / 2**14), e.g. 3.2e-3 for 256 latents
    (2x sparsify's constant: crv's budgets are millions, not billions, of tokens)."""

    lr_warmup_steps: int = 50
    """Steps of linear learning-rate warmup from zero."""

    lr_decay_frac: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to zero."""

    batch_tokens: int = 4096
    """Tokens per optimisation step (the same tokens for every layer)."""

    tokens: int = 2_000_000
    """Token budget per layer; the corpus is repeated (reshuffled) when it is shorter."""

    k_aux: int | None = None
    """Dead latents used by the AuxK loss per token; default d_model // 2."""

    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (reconstruct the residual error from dead latents)."""

    dead_tokens: int = 250_000
    """A latent is dead for AuxK when it has not fired within this many training tokens."""

    normalize_decoder: bool = True
    """Keep decoder rows at unit norm (gradient parallel to each row removed before a step)."""

    init_from_data: bool = True
    """On the first batch set b_dec to the mean MLP output and b_enc to -W_enc @ mean MLP input."""

    seed: int | None = None
    """Seed of initialisation and shuffling; default the pipeline's global seed."""

    device: str | None = None
    """Device for the model and the transcoders; default the pipeline's device."""

    layers: list[int] | None = None
    """Layers to train transcoders for; default all layers."""

    corpus: str = "traces"
    """`traces`: input_ids of the train split of the traces; otherwise a `datasets` text
    dataset: a directory saved with `save_to_disk` or a name/path for `load_dataset`."""

    corpus_split: str = "train"
    """Split of a `load_dataset` corpus (unused for `traces`)."""

    corpus_text_column: str = "text"
    """Text column of a text corpus."""

    max_seq_len: int = 512
    """Sequences longer than this are truncated (text corpora and traces alike)."""

    model_batch_seqs: int = 32
    """Sequences per subject-model forward pass when collecting activations."""

    shuffle_buffer_tokens: int = 262_144
    """Most tokens held in the shuffle buffer that decorrelates batches from sequences."""

    buffer_mb: int = 2048
    """Memory of the shuffle buffer in MiB (MLP in and out of every layer trained in a pass,
    plus room for one model batch); fewer tokens are held when they do not fit."""

    buffer_dtype: BufferDtype = BufferDtype.auto
    """`float32`, `bfloat16`, or `auto`: float32 when `shuffle_buffer_tokens` of all layers
    fit in `buffer_mb` that way, else bfloat16 (training always computes in float32)."""

    min_shuffle_tokens: int = 65_536
    """Fewest tokens the buffer may hold; when all layers would leave it fewer, layers are
    trained in groups, one pass over the corpus per group."""

    cache_activations: bool = False
    """Cache the activations on disk as safetensors shards (reused across transcoder settings:
    the cache is keyed by the subject, corpus and layers only)."""

    runtime_cache_dir: str | None = None
    """Where activation caches live; default `<scratch>/../activation_cache`."""

    cache_dtype: CacheDtype = CacheDtype.bfloat16
    """Storage dtype of cached activations (training always runs in float32)."""

    eval_tokens: int = 65_536
    """Cap on the held-out (test split) tokens used for evaluation."""

    per_layer_ce: bool = True
    """Also measure CE with each layer spliced alone and zero-ablated alone: two extra
    forward passes per layer (49 in all for a 24-layer model instead of 3); the all-layer
    CE, KL and every reconstruction metric are measured either way."""

    runtime_log_every: int = 50
    """Log per-layer metrics every this many steps."""

    def __post_init__(self) -> None:
        check_choices(self, "transcoders")
        positive = {
            "k": self.k,
            "expansion": self.expansion,
            "batch_tokens": self.batch_tokens,
            "tokens": self.tokens,
            "dead_tokens": self.dead_tokens,
            "max_seq_len": self.max_seq_len,
            "model_batch_seqs": self.model_batch_seqs,
            "shuffle_buffer_tokens": self.shuffle_buffer_tokens,
            "buffer_mb": self.buffer_mb,
            "min_shuffle_tokens": self.min_shuffle_tokens,
            "eval_tokens": self.eval_tokens,
            "runtime_log_every": self.runtime_log_every,
        }
        optional = {"n_latents": self.n_latents, "k_aux": self.k_aux}
        positive.update({name: value for name, value in optional.items() if value is not None})
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"transcoders.{name} must be > 0, got {value}")
        if self.n_latents is not None and self.k > self.n_latents:
            raise ValueError(f"transcoders.k ({self.k}) exceeds n_latents ({self.n_latents})")
        if self.lr_warmup_steps < 0 or self.auxk_coef < 0 or (self.lr or 0) < 0:
            raise ValueError("transcoders.lr, lr_warmup_steps and auxk_coef must be >= 0")
        if not 0 <= self.lr_decay_frac <= 1:
            raise ValueError(
                f"transcoders.lr_decay_frac must lie in [0, 1], got {self.lr_decay_frac}"
            )

    def latents(self, d_model: int) -> int:
        """The number of latents F for a model of width `d_model`."""
        return self.n_latents if self.n_latents is not None else self.expansion * d_model

    def learning_rate(self, d_model: int) -> float:
        """The Adam learning rate, scaled down as 1/sqrt(F / 2**14) unless set."""
        if self.lr is not None:
            return self.lr
        return 4e-4 / math.sqrt(self.latents(d_model) / 2**14)

    def aux_k(self, d_model: int) -> int:
        """The number of dead latents AuxK may use per token."""
        return self.k_aux if self.k_aux is not None else d_model // 2
