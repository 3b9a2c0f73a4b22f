"""Attribution edges are exact direct effects; whole-trace graphs equal prefix graphs.

Tiny random models of every family the adapter supports (Llama, Mistral, Qwen2, Qwen3,
Gemma2, Gemma3, GPT-2, GPT-NeoX; sliding windows shorter than the sequence) with random TopK
transcoders, non-trivial norm weights and biases. The reference is computed without
any of crv's attribution machinery: a forward pass through the frozen model in which every
MLP output is a constant (its clean value = transcoder-out + error) and a single source is
perturbed with forward-mode AD. The frozen model is affine in the sources, so the tangent
is exactly the finite change per unit perturbation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from factories import random_transcoder_set, tiny_model

from crv.graphs.attribute import StepAttribution, attribute_trace
from crv.graphs.config import GraphsConfig
from crv.graphs.graph import ERROR, FEATURE, LOGIT, TOKEN
from crv.models.adapter import ArchAdapter
from crv.transcoders.activations import training_batches
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.module import TopKTranscoder, TranscoderSet
from crv.transcoders.train import TranscoderTrainer

VOCAB, D, N_LAYERS, T = 37, 32, 3, 15
POSITIONS = [6, 10, 14]
FAMILIES = ["llama", "qwen2", "gemma2", "gpt2", "gemma3", "mistral", "qwen3", "gpt_neox"]
CFG = GraphsConfig(
    max_logits=4, logit_cum_prob=1.0, max_feature_nodes=10_000, batch_size=16, update_interval=1
)


@pytest.fixture(autouse=True)
def _fast_cpu() -> Iterator[None]:
    """One thread (tiny ops on a shared CPU) and no denormals (tangents of these random
    models underflow into them, which makes matmuls ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def make_model(family: str, attn_implementation: str | None) -> torch.nn.Module:
    model = tiny_model(
        family,
        vocab_size=VOCAB,
        hidden_size=D,
        n_layers=N_LAYERS,
        sliding_window=5,
        max_positions=64,
        initializer_range=0.15,
        final_logit_softcapping=30.0,
    ).requires_grad_(False)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    with torch.no_grad():  # non-trivial norm weights and biases
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def make_transcoders(activation: str) -> TranscoderSet:
    def init(tc: TopKTranscoder, gen: torch.Generator) -> None:
        tc.requires_grad_(False)
        tc.b_enc.copy_(0.2 * torch.randn(48, generator=gen))
        tc.W_dec.mul_(2.0)

    return random_transcoder_set(
        D, 48, 4, range(N_LAYERS), activation=activation, seed=1, init=init
    )


def setup(
    family: str, attn_implementation: str | None = None
) -> tuple[ArchAdapter, TranscoderSet, torch.Tensor]:
    model = make_model(family, attn_implementation)
    ids = torch.randint(1, VOCAB, (T,), generator=torch.Generator().manual_seed(2))
    return (
        ArchAdapter.for_model(model),
        make_transcoders("topk" if family == "gpt2" else "relu_topk"),
        ids,
    )


@contextlib.contextmanager
def hooked(
    adapter: ArchAdapter, layer0: Callable, mlp: Callable, final: Callable
) -> Iterator[None]:
    handles = [adapter.layers[0].register_forward_pre_hook(layer0, with_kwargs=True)]
    handles += [adapter.mlp(i).register_forward_hook(mlp(i)) for i in range(adapter.n_layers)]
    handles.append(adapter.final_norm.register_forward_hook(final))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def clean_run(
    adapter: ArchAdapter, tset: TranscoderSet, ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Layer-0 input [T, D], MLP inputs and outputs, TopK codes and errors [L, T, ...] of the
    clean pass."""
    rec: dict[str, list] = {"h0": [], "out": [], "in": []}

    def layer0(_, args, kwargs):
        rec["h0"].append((args[0] if args else kwargs["hidden_states"])[0])

    def mlp(_layer):
        def hook(_, inputs, out):
            rec["in"].append(inputs[0][0])
            rec["out"].append(out[0])

        return hook

    with torch.no_grad(), adapter.frozen(), hooked(adapter, layer0, mlp, lambda *_: None):
        adapter.model(input_ids=ids[None])
    codes = [tset[i].encode(rec["in"][i]) for i in range(adapter.n_layers)]
    errors = [
        rec["out"][i] - tset[i].reconstruct(rec["in"][i], *codes[i])
        for i in range(adapter.n_layers)
    ]
    return {
        "h0": rec["h0"][0],
        "in": torch.stack(rec["in"]),
        "out": torch.stack(rec["out"]),
        "acts": torch.stack([c[0] for c in codes]),
        "idx": torch.stack([c[1] for c in codes]),
        "errors": torch.stack(errors),
    }


def perturbed_targets(
    adapter: ArchAdapter,
    clean: dict[str, torch.Tensor],
    layer: int,
    pos: int,
    vec: torch.Tensor,
    tset: TranscoderSet,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Changes of every MLP input [L, T, D] and of the final norm output [T, D] per unit
    move of the source vector `vec` at (layer, pos) (layer -1: the layer-0 input), with
    every MLP output held at its clean constant plus, for skip transcoders, the skip path's
    change (forward-mode AD in a scalar eps)."""
    shift = torch.zeros(1, T, D)
    shift[0, pos] = vec

    def run(eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, list] = {"in": [], "final": []}

        def layer0(_, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).detach()
            h = h + eps * shift if layer == -1 else h
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        def mlp(at: int):
            def hook(_, inputs, out):
                seen["in"].append(inputs[0][0])
                const = clean["out"][at][None]
                if tset[at].W_skip is not None:
                    const = const + (inputs[0] - clean["in"][at][None]) @ tset[at].W_skip.T
                return const + eps * shift if at == layer else const

            return hook

        def final(_, __, out):
            seen["final"].append(out[0])

        with adapter.frozen(), hooked(adapter, layer0, mlp, final):
            adapter.model(input_ids=clean["ids"][None])
        return torch.stack(seen["in"]), seen["final"][0]

    _, tangents = torch.func.jvp(run, (torch.zeros(()),), (torch.ones(()),))
    return tangents


def source_vector(
    att: StepAttribution, j: int, clean: dict[str, torch.Tensor], tset: TranscoderSet
):
    """(layer of the leaf, position, vector) whose unit perturbation is source node j."""
    kind, layer, pos = (
        int(att.nodes["kind"][j]),
        int(att.nodes["layer"][j]),
        int(att.nodes["pos"][j]),
    )
    if kind == FEATURE:
        latent = int(att.nodes["feature"][j])
        slot = int(torch.nonzero(clean["idx"][layer, pos] == latent)[0, 0])
        act = clean["acts"][layer, pos, slot]
        assert act == pytest.approx(float(att.nodes["activation"][j]), rel=1e-4, abs=1e-5)
        return layer, pos, act * tset[layer].W_dec[latent]
    if kind == ERROR:
        return layer, pos, clean["errors"][layer, pos]
    assert kind == TOKEN
    return -1, pos, clean["h0"][pos]


def expected_column(
    att: StepAttribution,
    tangent_in: torch.Tensor,
    tangent_final: torch.Tensor,
    adapter,
    tset,
    baseline: int | None = None,
):
    """Change of every row node's pre-activation / demeaned logit (minus the `baseline`
    token's logit: a contrastive target), in row order."""
    W_U = adapter.unembed_weight.float()
    dirs = W_U - W_U.mean(0)
    if baseline is not None:
        dirs = dirs - dirs[baseline]
    values = []
    for node in att.counts.row_nodes.tolist():
        kind, layer, pos, index = (
            int(att.nodes[c][node]) for c in ("kind", "layer", "pos", "feature")
        )
        if kind == FEATURE:
            values.append(tset[layer].W_enc[index] @ tangent_in[layer, pos])
        else:
            assert kind == LOGIT
            values.append(dirs[index] @ tangent_final[pos])
    return torch.stack(values)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_edges_equal_perturbation_effects(family: str) -> None:
    # eager: the forward-mode reference cannot run through sdpa kernels
    check_edges_are_perturbation_effects(*setup(family, "eager"))


def make_published_kind(kind: str) -> TranscoderSet:
    """Random sets like those published: ReLU (k = F: no cap), JumpReLU (random positive
    thresholds), TopK, and a ReLU-TopK skip transcoder (random W_skip)."""
    activation = {"relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}.get(kind, "relu_topk")

    def init(tc: TopKTranscoder, gen: torch.Generator) -> None:
        tc.requires_grad_(False)
        tc.b_enc.copy_(0.2 * torch.randn(48, generator=gen))
        tc.W_dec.mul_(2.0 if kind != "relu" else 0.5)
        if kind == "jumprelu":
            tc.threshold.copy_(0.3 * torch.rand(48, generator=gen))
        if kind == "skip":
            tc.W_skip = torch.nn.Parameter(
                0.3 * torch.randn(D, D, generator=gen) / D**0.5, requires_grad=False
            )

    k = 48 if kind in ("relu", "jumprelu") else 4
    return random_transcoder_set(D, 48, k, range(N_LAYERS), activation=activation, init=init)


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk", "skip"])
def test_edges_equal_perturbation_effects_for_published_kinds(kind: str) -> None:
    adapter, _, ids = setup("llama", "eager")
    check_edges_are_perturbation_effects(adapter, make_published_kind(kind), ids)


def check_edges_are_perturbation_effects(
    adapter: ArchAdapter,
    tset: TranscoderSet,
    ids: torch.Tensor,
    att: StepAttribution | None = None,
    baseline: int | None = None,
) -> None:
    """Columns of `att` (default: the graph of the last of POSITIONS) against perturbations."""
    if att is None:  # the last step: sources at every position
        att = attribute_trace(adapter, tset, ids, POSITIONS, CFG)[-1]
    clean = clean_run(adapter, tset, ids) | {"ids": ids}
    n = att.counts
    # errors at positions 1..p; tokens at 0..p: BOS is a source (as in circuit-tracer)
    assert n.n_errors == N_LAYERS * POSITIONS[-1] and n.n_tokens == POSITIONS[-1] + 1
    assert n.n_features > 20  # every active feature with a path to the logits is expanded
    assert att.nodes["pos"][att.nodes["kind"] != TOKEN].min() >= 1
    rng = np.random.default_rng(0)
    bos = np.flatnonzero((att.nodes["kind"] == TOKEN) & (att.nodes["pos"] == 0))
    sources = np.concatenate(
        [
            bos,
            *(
                rng.choice(np.flatnonzero(att.nodes["kind"] == kind), 3, replace=False)
                for kind in (FEATURE, ERROR, TOKEN)
            ),
        ]
    )
    biggest = 0.0
    for j in sources:
        layer, pos, vec = source_vector(att, int(j), clean, tset)
        tangent_in, tangent_final = perturbed_targets(adapter, clean, layer, pos, vec, tset)
        expected = expected_column(att, tangent_in, tangent_final, adapter, tset, baseline)
        got = att.adjacency_RN[:, j]
        torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)
        biggest = max(biggest, float(expected.abs().max()))
    assert biggest > 0.05  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_contrastive_edges_equal_perturbation_effects(family: str) -> None:
    """A contrastive target logit(token) - logit(baseline) at the last position: its row
    and the feature rows expanded for it are exact direct effects too."""
    from crv.graphs.attribute import TraceAttributor

    adapter, tset, ids = setup(family, "eager")
    attributor = TraceAttributor(adapter, tset, ids, POSITIONS, CFG)
    node = attributor.contrast_node(POSITIONS[-1], 5, 11)
    att = attributor.attribute([node])
    assert att.counts.n_logits == 1 and float(att.logit_weights[0]) == 1.0
    check_edges_are_perturbation_effects(adapter, tset, ids, att, baseline=11)


def test_bos_token_node_has_edges() -> None:
    """The BOS token node (position 0) reaches later positions through attention: it has
    edges in the unpruned graph and keeps some after pruning, like circuit-tracer's."""
    adapter, tset, ids = setup("llama")
    att = attribute_trace(adapter, tset, ids, POSITIONS[-1:], CFG)[0]
    (bos,) = np.flatnonzero((att.nodes["kind"] == TOKEN) & (att.nodes["pos"] == 0))
    column = att.adjacency_RN[:, bos].abs()
    assert int((column > 1e-3).sum()) > 5
    assert float(column.max()) > 0.01 * float(att.adjacency_RN.abs().max())
    g = att.pruned(0.8, 0.98)
    (kept,) = np.flatnonzero((g.kind == TOKEN) & (g.pos == 0))
    assert (g.src == kept).any()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_trace_equals_prefix(family: str) -> None:
    adapter, tset, ids = setup(family)
    cfg = GraphsConfig(max_logits=3, max_feature_nodes=40, batch_size=6, update_interval=2)
    whole = attribute_trace(adapter, tset, ids, POSITIONS, cfg)
    for att in whole:
        (alone,) = attribute_trace(adapter, tset, ids[: att.position + 1], [att.position], cfg)
        for col in ("kind", "layer", "pos", "feature"):
            np.testing.assert_array_equal(att.nodes[col], alone.nodes[col])
        np.testing.assert_allclose(att.nodes["activation"], alone.nodes["activation"], atol=1e-5)
        torch.testing.assert_close(att.adjacency_RN, alone.adjacency_RN, atol=1e-5, rtol=1e-4)
        g, h = att.pruned(0.8, 0.98), alone.pruned(0.8, 0.98)
        for col in ("kind", "layer", "pos", "feature", "src", "dst"):
            np.testing.assert_array_equal(getattr(g, col), getattr(h, col))
        np.testing.assert_allclose(g.weight, h.weight, atol=1e-5, rtol=1e-4)


def test_short_segments_change_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cutting the forward into segments of 2-3 tokens gives the same graphs."""
    import crv.graphs.replacement as replacement

    adapter, tset, ids = setup("llama")
    cfg = GraphsConfig(max_logits=3, max_feature_nodes=40, batch_size=6, update_interval=2)
    whole = attribute_trace(adapter, tset, ids, POSITIONS, cfg)
    monkeypatch.setattr(replacement, "SEGMENT_TOKENS", 3)
    short = attribute_trace(adapter, tset, ids, POSITIONS, cfg)
    assert len(replacement.segment_ends([p + 1 for p in POSITIONS], 3)) > len(POSITIONS)
    for a, b in zip(whole, short, strict=True):
        np.testing.assert_array_equal(a.nodes["feature"], b.nodes["feature"])
        torch.testing.assert_close(a.adjacency_RN, b.adjacency_RN, atol=1e-5, rtol=1e-4)


def test_segment_ends_cut_long_stretches() -> None:
    from crv.graphs.replacement import segment_ends

    assert segment_ends([5, 12], 64) == [5, 12]
    ends = segment_ends([10, 11, 40], 8)
    assert ends[-1] == 40 and {10, 11} <= set(ends)
    assert all(0 < b - a <= 8 for a, b in zip([0, *ends[:-1]], ends, strict=True))


def test_rows_are_shared_between_steps() -> None:
    from crv.graphs.attribute import TraceAttributor

    adapter, tset, ids = setup("llama")
    attributor = TraceAttributor(adapter, tset, ids, POSITIONS, CFG)
    for p in POSITIONS:
        attributor.attribute_step(p)
    # every active feature is expanded at every step: features of earlier positions are reused
    assert attributor.n_rows_computed < attributor.n_rows_requested
    computed = attributor.n_rows_computed
    attributor.attribute_step(POSITIONS[-1])
    assert attributor.n_rows_computed == computed


def test_before_position_is_the_previous_steps_after() -> None:
    from crv.graphs.attribute import step_positions

    steps = [{"last_token": 6}, {"last_token": 10}, {"last_token": 14}]
    assert step_positions(steps, 4, "after") == [6, 10, 14]
    assert step_positions(steps, 4, "before") == [3, 6, 10]
    probs = np.ones(20)
    probs[[4, 5, 9, 12, 13]] = [0.5, 0.2, 0.3, 0.1, 0.1]  # p = position 14 (after) is no choice
    probs[14] = 0.01
    assert step_positions(steps, 4, "least_confident", probs) == [5, 9, 12]
    with pytest.raises(ValueError, match="token probabilities"):
        step_positions(steps, 4, "least_confident")
    adapter, tset, ids = setup("qwen2")
    cfg = GraphsConfig(max_feature_nodes=30, batch_size=8)
    after = attribute_trace(adapter, tset, ids, step_positions(steps, 4, "after"), cfg)
    before = attribute_trace(adapter, tset, ids, step_positions(steps, 4, "before"), cfg)
    for a, b in zip(after[:-1], before[1:], strict=True):
        torch.testing.assert_close(a.adjacency_RN, b.adjacency_RN, atol=1e-5, rtol=1e-4)


def test_next_token_probs_are_the_generated_tokens_probabilities() -> None:
    from crv.graphs.attribute import next_token_probs

    adapter, _, ids = setup("llama")
    probs = next_token_probs(adapter.model, ids)
    with torch.no_grad():
        p_TV = torch.softmax(adapter.model(input_ids=torch.as_tensor([list(ids)])).logits[0], -1)
    assert probs.shape == (len(ids) - 1,)
    for p in (0, 3, len(ids) - 2):
        assert probs[p] == pytest.approx(float(p_TV[p, int(ids[p + 1])]), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_an_extended_trace_equals_one_built_at_once(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Targets added one at a time as the sequence grows (crv-verify generate=true) give the
    segments and graphs of a trace built with all of them at once; earlier rows are kept."""
    import crv.graphs.replacement as replacement
    from crv.graphs.attribute import TraceAttributor

    monkeypatch.setattr(replacement, "SEGMENT_TOKENS", 3)  # cuts inside the new stretches
    adapter, tset, ids = setup(family)
    cfg = GraphsConfig(max_logits=3, max_feature_nodes=40, batch_size=6, update_interval=2)
    whole = TraceAttributor(adapter, tset, ids, POSITIONS, cfg)
    grown = TraceAttributor(adapter, tset, ids[: POSITIONS[0] + 1], POSITIONS[:1], cfg)
    for step, p in enumerate(POSITIONS):
        if step:
            computed = grown.n_rows_computed
            grown.extend(ids[: p + 1], [p])
            assert grown.n_rows_computed == computed  # the cache survives
        a, b = grown.attribute_step(p, step), whole.attribute_step(p, step)
        for col in ("kind", "layer", "pos", "feature"):
            np.testing.assert_array_equal(a.nodes[col], b.nodes[col])
        torch.testing.assert_close(a.adjacency_RN, b.adjacency_RN, atol=1e-6, rtol=1e-5)
    assert grown.trace.ends == whole.trace.ends
    longer = torch.cat([ids, ids[:1]])
    with pytest.raises(ValueError, match="must lie in"):
        grown.extend(longer, [POSITIONS[-1]])  # not past the sequence so far
    longer[2] = (longer[2] + 1) % VOCAB
    with pytest.raises(ValueError, match="do not continue"):
        grown.extend(longer, [T])


def test_edges_equal_perturbation_effects_for_trained_skip_transcoders() -> None:
    """Skip transcoders as crv trains them (`transcoders.skip`, W_skip learned with the
    latents): the skip path is a direct MLP-in -> MLP-out path, edges stay exact."""
    adapter, _, ids = setup("llama", "eager")
    cfg = TranscodersConfig(
        k=4, n_latents=48, tokens=4096, batch_tokens=256, lr=3e-3, lr_warmup_steps=2,
        shuffle_buffer_tokens=1024, skip=True,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    seqs = torch.randint(1, VOCAB, (32, T), generator=gen).tolist()
    trainer = TranscoderTrainer(cfg, D, list(range(N_LAYERS)), seed=0)
    layers = list(range(N_LAYERS))
    trainer.train(training_batches(cfg, adapter.model, adapter, seqs, layers, gen), progress=False)
    tset = trainer.transcoder_set()
    assert all(float(tset[layer].W_skip.norm()) > 0.1 for layer in layers)
    check_edges_are_perturbation_effects(adapter, tset, ids)
