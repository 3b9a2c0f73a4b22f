"""Skip transcoders (`transcoders.skip`): W_skip trains, folds, saves and loads.

The graphs side (a trained W_skip as a direct path, exact edges) is in test_graphs_attribute.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from factories import tiny_llama
from safetensors.torch import load_file

from crv.models.adapter import ArchAdapter
from crv.transcoders.activations import training_batches
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.evaluate import reconstruction_metrics
from crv.transcoders.io import load_transcoder_set, save_transcoder_set
from crv.transcoders.module import TranscoderSet
from crv.transcoders.train import TranscoderTrainer

torch.set_num_threads(1)
CFG = TranscodersConfig(
    k=4, expansion=2, tokens=12_288, batch_tokens=256, lr=3e-3, lr_warmup_steps=5,
    shuffle_buffer_tokens=2048,
)  # fmt: skip


@pytest.fixture(scope="module")
def adapter() -> ArchAdapter:
    # initializer_range 0.2: an MLP far from linear, so the latents have work to do
    return ArchAdapter.for_model(tiny_llama(initializer_range=0.2).requires_grad_(False))


def _seqs(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, 50, (39,), generator=gen).tolist()] for _ in range(n)]


def _train(adapter: ArchAdapter, cfg: TranscodersConfig) -> TranscoderSet:
    trainer = TranscoderTrainer(cfg, adapter.d_model, [0, 1], seed=0)
    batches = training_batches(
        cfg, adapter.model, adapter, _seqs(40, 0), [0, 1], torch.Generator().manual_seed(0)
    )
    trainer.train(batches, progress=False)
    return trainer.transcoder_set()


@pytest.fixture(scope="module")
def skip_set(adapter: ArchAdapter) -> TranscoderSet:
    return _train(adapter, dataclasses.replace(CFG, skip=True))


def _fvu(adapter: ArchAdapter, tset: TranscoderSet) -> list[float]:
    rows = reconstruction_metrics(adapter.model, adapter, tset, _seqs(8, 1), batch_seqs=8)
    return [row["fvu"] for row in rows]


def test_least_squares_init_finds_a_linear_map_in_raw_units() -> None:
    """y = A x + c exactly: after the first step (lr 0) the saved W_skip is A and b_dec c,
    in raw units although training ran on rescaled data (the scales fold into W_skip)."""
    gen = torch.Generator().manual_seed(0)
    A_DD, c_D = torch.randn(8, 8, generator=gen), torch.randn(8, generator=gen)
    x = 5.0 + 3.0 * torch.randn(1, 512, 8, generator=gen)
    cfg = TranscodersConfig(
        k=2, n_latents=16, batch_tokens=512, tokens=512, lr=0.0, skip=True, skip_init="lstsq"
    )
    trainer = TranscoderTrainer(cfg, d_model=8, layers=[0], seed=0)
    trainer.step(x, 0.1 * (x @ A_DD.T + c_D))  # output scale != input scale
    tc = trainer.transcoder_set()[0]
    torch.testing.assert_close(tc.W_skip, 0.1 * A_DD, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(tc.b_dec, 0.1 * c_D, atol=1e-2, rtol=0)  # the ridge shrinks W
    other = TranscoderTrainer(dataclasses.replace(cfg, skip_init="zero"), 8, [0], seed=0)
    other.step(x, 0.1 * (x @ A_DD.T + c_D))
    assert other.transcoder_set()[0].W_skip.abs().max() == 0  # lr 0: never moved


def test_skip_transcoders_beat_plain_at_the_same_budget(
    adapter: ArchAdapter, skip_set: TranscoderSet
) -> None:
    plain = _train(adapter, CFG)
    assert plain[0].W_skip is None and skip_set[0].W_skip is not None
    fvu_plain, fvu_skip = _fvu(adapter, plain), _fvu(adapter, skip_set)
    pairs = list(zip(fvu_skip, fvu_plain, strict=True))
    assert all(s < 0.9 * p for s, p in pairs), pairs


def test_skip_set_round_trips_in_circuit_tracers_layout(
    tmp_path: Path, adapter: ArchAdapter, skip_set: TranscoderSet
) -> None:
    save_transcoder_set(skip_set, tmp_path)
    tensors = load_file(str(tmp_path / "layer_1.safetensors"))
    assert set(tensors) == {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip"}
    assert tensors["W_skip"].shape == (32, 32)
    loaded = load_transcoder_set(tmp_path)
    x_ND = torch.randn(7, 32)
    for layer in (0, 1):
        torch.testing.assert_close(loaded[layer].W_skip, skip_set[layer].W_skip)
        torch.testing.assert_close(loaded[layer](x_ND), skip_set[layer](x_ND))
    assert _fvu(adapter, loaded) == _fvu(adapter, skip_set)
