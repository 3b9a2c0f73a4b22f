"""Transcoder training memory: a shuffle buffer sized in bytes, layer groups, progress."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_llama

from crv.errors import ConfigError
from crv.models.adapter import ArchAdapter
from crv.transcoders.activations import (
    BufferPlan,
    ShuffleBuffer,
    buffer_plan,
    layer_groups,
    shuffled_batches,
    training_batches,
)
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.train import train_transcoders

# 4 layers of width 32: 1 MiB holds 2,048 bf16 tokens of all layers (1,024 float32).
SMALL = dict(
    buffer_mb=1, model_batch_seqs=4, max_seq_len=32, batch_tokens=128, min_shuffle_tokens=512
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(num_hidden_layers=4).requires_grad_(False)


def _seqs(n: int, length: int = 32) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 50, (length,), generator=gen).tolist() for _ in range(n)]


def test_crv_tiny_default_buffer_is_unchanged() -> None:
    """crv-tiny (4 layers, d 128) keeps 262,144 float32 tokens: its numbers stay."""
    plan = buffer_plan(TranscodersConfig(), 4, 128)
    assert (plan.tokens, plan.dtype) == (262_144, torch.float32)
    assert plan.nbytes(4, 128) <= 2048 << 20
    assert layer_groups(TranscodersConfig(), range(4), 128) == [[0, 1, 2, 3]]


def test_large_models_get_bf16_and_layer_groups() -> None:
    cfg = TranscodersConfig()
    qwen = buffer_plan(cfg, 24, 896)  # Qwen2.5-0.5B: 45 GB at 262,144 float32 tokens
    assert qwen.dtype == torch.bfloat16 and qwen.nbytes(24, 896) <= 2048 << 20
    groups = layer_groups(cfg, range(24), 896)
    assert sorted(sum(groups, [])) == list(range(24)) and len(groups) > 1
    for group in groups:
        plan = buffer_plan(cfg, len(group), 896)
        assert plan.tokens >= cfg.min_shuffle_tokens
        assert plan.nbytes(len(group), 896) <= 2048 << 20
    with pytest.raises(ConfigError, match="buffer_mb=64 .* needs 1280 MiB"):
        layer_groups(TranscodersConfig(buffer_mb=64), range(32), 4096)


def test_buffer_batches_equal_concatenate_and_permute() -> None:
    """The slot-indexed buffer emits exactly the batches of concatenating the chunks and
    permuting the rows (the previous implementation), from the same generator."""
    gen = torch.Generator().manual_seed(0)
    chunks = [
        (torch.randn(2, n, 3, generator=gen), torch.randn(2, n, 3, generator=gen))
        for n in (70, 50, 90, 30, 64, 11)
    ]
    plan = BufferPlan(tokens=128, chunk_tokens=90, dtype=torch.float32)
    got = list(shuffled_batches(chunks, ShuffleBuffer(plan, 32, torch.Generator().manual_seed(5))))

    ref_gen, expected = torch.Generator().manual_seed(5), []
    xs, ys = [], []
    for x, y in chunks:
        xs, ys = [*xs, x], [*ys, y]
        held = sum(t.shape[1] for t in xs)
        if held >= 128:
            perm = torch.randperm(held, generator=ref_gen)
            x_all, y_all = torch.cat(xs, 1)[:, perm], torch.cat(ys, 1)[:, perm]
            n_out = (held // 2) // 32 * 32
            expected += [(x_all[:, s : s + 32], y_all[:, s : s + 32]) for s in range(0, n_out, 32)]
            xs, ys = [x_all[:, n_out:]], [y_all[:, n_out:]]
    perm = torch.randperm(sum(t.shape[1] for t in xs), generator=ref_gen)
    x_all, y_all = torch.cat(xs, 1)[:, perm], torch.cat(ys, 1)[:, perm]
    expected += [(x_all[:, s : s + 32], y_all[:, s : s + 32]) for s in range(0, len(perm), 32)]
    assert len(got) == len(expected) and sum(x.shape[1] for x, _ in got) == 315
    for (gx, gy), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(gx, ex) and torch.equal(gy, ey)


def test_peak_memory_is_flat_in_the_token_budget(model: torch.nn.Module) -> None:
    """Two token budgets (4x apart, both far beyond the buffer) peak at the same allocated
    bytes, within buffer_mb, though the configured buffer would hold a million tokens."""
    adapter = ArchAdapter.for_model(model)
    peaks = []
    for tokens in (4_000, 16_000):
        cfg = TranscodersConfig(tokens=tokens, shuffle_buffer_tokens=1_000_000, **SMALL)
        gen = torch.Generator().manual_seed(0)
        plan = buffer_plan(cfg, 4, adapter.d_model)
        buffer = ShuffleBuffer(plan, cfg.batch_tokens, gen)
        batches = training_batches(cfg, model, adapter, _seqs(40), range(4), gen, buffer=buffer)
        n = sum(x.shape[1] for x, _ in batches)
        assert n == tokens
        peaks.append(buffer.peak_bytes)
    assert plan.dtype == torch.bfloat16 and plan.tokens == 2048 - 128
    assert abs(peaks[0] - peaks[1]) <= 0.1 * peaks[1]
    batch_bytes = 2 * 4 * 128 * 32 * 2
    assert peaks[1] <= (1 << 20) + batch_bytes


def test_progress_moves_before_the_first_batch(model: torch.nn.Module) -> None:
    adapter = ArchAdapter.for_model(model)
    cfg = TranscodersConfig(tokens=1000, shuffle_buffer_tokens=1024, **SMALL)
    collected: list[int] = []
    batches = training_batches(
        cfg, model, adapter, _seqs(40), range(4), torch.Generator(), on_tokens=collected.append
    )
    next(batches)
    assert collected[0] == cfg.model_batch_seqs * 31  # the first forward pass, BOS dropped
    assert sum(collected) >= 1024  # the first batch waits for a full buffer


def test_layer_groups_train_every_layer(model: torch.nn.Module) -> None:
    """A buffer too small for all layers trains them in two passes; every layer learns."""
    adapter = ArchAdapter.for_model(model)
    cfg = TranscodersConfig(
        k=4,
        expansion=2,
        tokens=4096,
        lr_warmup_steps=2,
        runtime_log_every=4,
        **{**SMALL, "min_shuffle_tokens": 3000},
    )
    assert layer_groups(cfg, range(4), adapter.d_model) == [[0, 1], [2, 3]]
    tset, history = train_transcoders(
        cfg, model, adapter, _seqs(40), range(4), "cpu", seed=0, progress=False
    )
    assert tset.layers == [0, 1, 2, 3] and history.passes == 2
    assert set(history.fvu) == {0, 1, 2, 3}
    for layer in range(4):
        assert history.fvu[layer][-1] < 0.8 * history.fvu[layer][0]
