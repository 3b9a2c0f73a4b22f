"""TopK transcoders: gradients, training state, activations and the on-disk format."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from factories import random_transcoder_set, tiny_llama
from safetensors.torch import load_file, save_file

from crv.transcoders.activations import (
    ActivationCache,
    batch_sequences,
    model_activations,
    pad_batch,
    training_batches,
)
from crv.transcoders.config import Activation, TranscodersConfig
from crv.transcoders.io import load_transcoder_set, save_transcoder_set
from crv.transcoders.module import TopKTranscoder, TranscoderSet, topk_encode
from crv.transcoders.train import TranscoderTrainer, transcoder_loss

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return tiny_llama().requires_grad_(False)


def _dense_loss(
    tc: TopKTranscoder, x_ND: torch.Tensor, y_ND: torch.Tensor, dead_F: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """FVU + AuxK computed naively over all latents (the reference for the gradients)."""
    pre_NF = x_ND @ tc.W_enc.T + tc.b_enc

    def topk_dense(p_NF: torch.Tensor, k: int) -> torch.Tensor:
        keep_NF = torch.zeros_like(p_NF, dtype=torch.bool)
        keep_NF.scatter_(1, p_NF.topk(k, dim=1).indices, True)
        vals_NF = p_NF.relu() if tc.relu else p_NF
        return torch.where(keep_NF, vals_NF, torch.zeros_like(vals_NF))

    err_ND = topk_dense(pre_NF, tc.k) @ tc.W_dec + tc.b_dec - y_ND
    total_var = (y_ND - y_ND.mean(0)).pow(2).sum()
    masked_NF = pre_NF.masked_fill(~dead_F, float("-inf"))
    aux_NF = topk_dense(masked_NF, k_aux)
    auxk = (aux_NF @ tc.W_dec + err_ND.detach()).pow(2).sum() / total_var
    return err_ND.pow(2).sum() / total_var + auxk / 32


@pytest.mark.parametrize("activation", ["relu_topk", "topk"])
def test_topk_auxk_gradients_match_dense(activation: str) -> None:
    gen = torch.Generator().manual_seed(0)
    tc = TopKTranscoder(12, 48, 5, activation, generator=gen).double()
    with torch.no_grad():
        tc.W_dec.mul_(torch.rand(48, 1, generator=gen, dtype=torch.float64))
    x_ND = torch.randn(30, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    y_ND = torch.randn(30, 12, generator=gen, dtype=torch.float64)
    dead_F = torch.zeros(48, dtype=torch.bool)
    dead_F[::3] = True

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, [x_ND, *tc.parameters()]))

    out = transcoder_loss(tc, x_ND, y_ND, dead_F, k_aux=4)
    ours = grads(out.fvu + out.auxk / 32)
    ref = grads(_dense_loss(tc, x_ND, y_ND, dead_F, k_aux=4))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_topk_encode_gradcheck() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, generator=gen, dtype=torch.float64, requires_grad=True)
    candidates = torch.tensor([0, 2, 3, 7, 9])

    def f(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts, _, aux, _ = topk_encode(x, W, b, 3, True, candidates, 2)
        return acts, aux

    assert torch.autograd.gradcheck(f, (x, W, b))


def test_dead_latent_tracking() -> None:
    cfg = TranscodersConfig(
        k=2, n_latents=8, batch_tokens=16, tokens=160, dead_tokens=40, init_from_data=False
    )
    trainer = TranscoderTrainer(cfg, d_model=4, layers=[0], seed=0)
    with torch.no_grad():
        trainer.tset[0].b_enc.zero_()
        trainer.tset[0].b_enc[5] = -1e4  # latent 5 can never be selected with a positive value
        trainer.tset[0].b_enc[6] = 1e4  # latent 6 fires on every token
    gen = torch.Generator().manual_seed(0)
    dead_5, auxk = [], []
    for _ in range(4):
        x = torch.randn(1, 16, 4, generator=gen)
        metrics = trainer.step(x, x.clone())
        dead_5.append(bool(trainer.dead_mask()[0, 5]))
        auxk.append(metrics.auxk[0])
    assert dead_5 == [False, False, True, True]  # dead once unfired for more than 40 tokens
    assert auxk[:3] == [0.0, 0.0, 0.0] and auxk[3] > 0  # AuxK uses it from the next step on
    assert trainer.since_fired_LF[0, 6] == 0 and trainer.since_fired_LF[0, 5] == 64
    assert not trainer.dead_mask()[0, 6]


def test_bias_initialised_from_data_means() -> None:
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(2, 64, 8, generator=gen)
    y = -1.0 + 0.5 * torch.randn(2, 64, 8, generator=gen)
    cfg = TranscodersConfig(k=4, n_latents=32, batch_tokens=64, tokens=64, lr=0.0)
    trainer = TranscoderTrainer(cfg, d_model=8, layers=[0, 3], seed=0)
    trainer.step(x, y)
    tset = trainer.transcoder_set()  # scales folded back: acts on raw activations
    for i, layer in enumerate([0, 3]):
        tc = tset[layer]
        torch.testing.assert_close(tc.b_dec, y[i].mean(0), atol=1e-5, rtol=1e-5)
        centred_F = tc.pre_acts(x[i].mean(0, keepdim=True))[0]
        torch.testing.assert_close(centred_F, torch.zeros(32), atol=1e-4, rtol=0)


def _random_set(
    d_model: int = 8, n_latents: int = 24, layers: tuple[int, ...] = (0, 1)
) -> TranscoderSet:
    gen = torch.Generator().manual_seed(2)
    tset = random_transcoder_set(d_model, n_latents, 3, layers, generator=gen)
    with torch.no_grad():
        for layer in layers:
            tset[layer].b_enc.normal_(generator=gen)
            tset[layer].b_dec.normal_(generator=gen)
    return tset


def test_save_load_round_trip(tmp_path: Path) -> None:
    tset = _random_set()
    save_transcoder_set(tset, tmp_path)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set"
    assert (
        cfg["feature_input_hook"] == "mlp.hook_in" and cfg["feature_output_hook"] == "mlp.hook_out"
    )
    assert cfg["transcoders"] == ["layer_0.safetensors", "layer_1.safetensors"]
    assert cfg["activation"] == "relu_topk" and cfg["k"] == 3
    tensors = load_file(str(tmp_path / "layer_1.safetensors"))
    assert tensors["W_enc"].shape == (24, 8) and tensors["W_dec"].shape == (24, 8)
    assert tensors["b_enc"].shape == (24,) and tensors["b_dec"].shape == (8,)

    loaded = load_transcoder_set(tmp_path, "cpu")
    assert loaded.layers == [0, 1] and loaded.k == 3 and loaded.activation == "relu_topk"
    x = torch.randn(5, 8)
    for layer in (0, 1):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(loaded[layer], name), getattr(tset[layer], name))
        torch.testing.assert_close(loaded[layer](x), tset[layer](x))


def test_a_set_built_from_a_config_choice_saves_plain_strings(tmp_path: Path) -> None:
    """The trainer passes `TranscodersConfig.activation`, an enum member; config.yaml is
    written with yaml.safe_dump, which accepts only plain values."""
    assert TranscodersConfig().activation is Activation.topk
    tset = dataclasses.replace(_random_set(), activation=Activation.topk)
    assert type(tset.activation) is str
    assert type(TopKTranscoder(8, 24, 3, Activation.relu_topk).activation) is str
    save_transcoder_set(tset, tmp_path)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["activation"] == "topk"


def test_shape_mismatch_errors_name_file_layer_and_shape(
    tmp_path: Path, tiny_model: torch.nn.Module
) -> None:
    from crv.models.adapter import ArchAdapter

    adapter = ArchAdapter.for_model(tiny_model)  # d_model 32
    save_transcoder_set(_random_set(d_model=16), tmp_path)
    tset = load_transcoder_set(tmp_path)
    with pytest.raises(
        ValueError, match=r"layer_0\.safetensors: layer 0 W_enc has shape \[24, 16\].*d_model is 32"
    ):
        tset.check_compatible(adapter)

    path = tmp_path / "layer_1.safetensors"
    tensors = load_file(str(path))
    tensors["b_dec"] = torch.zeros(7)
    save_file(tensors, str(path))
    with pytest.raises(
        ValueError, match=r"layer_1\.safetensors: layer 1 b_dec has shape \[7\], expected \[16\]"
    ):
        load_transcoder_set(tmp_path)


def test_activations_skip_bos_and_padding(tiny_model: torch.nn.Module) -> None:
    from crv.models.adapter import ArchAdapter

    adapter = ArchAdapter.for_model(tiny_model)
    seqs = [[1, 5, 6, 7], [1, 8, 9], [1, 4, 4, 4, 4, 4]]
    chunks = list(model_activations(tiny_model, adapter, batch_sequences(seqs, 2, None), [0, 1]))
    assert sum(x.shape[1] for x, _ in chunks) == sum(len(s) - 1 for s in seqs)
    # Batches hold sequences sorted by length: [seqs[1], seqs[0]], then [seqs[2]]; the
    # shortest comes first and its tokens are unchanged by the padding of the batch.
    alone_x, alone_y = next(model_activations(tiny_model, adapter, [[seqs[1]]], [0, 1]))
    torch.testing.assert_close(chunks[0][0][:, :2], alone_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunks[0][1][:, :2], alone_y, atol=1e-5, rtol=1e-5)


def test_activations_never_compute_logits(tiny_model: torch.nn.Module) -> None:
    """The activation pass stops before the unembedding (a real vocabulary's logits are
    gigabytes per batch) and captures exactly what a full forward's hooks see."""
    from crv.models.adapter import ArchAdapter

    adapter = ArchAdapter.for_model(tiny_model)
    seqs = [[1, 5, 6, 7], [1, 8, 9]]
    heads = []
    handle = tiny_model.get_output_embeddings().register_forward_hook(lambda *_: heads.append(1))
    try:
        x_LND, y_LND = next(model_activations(tiny_model, adapter, [seqs], [0, 1]))
    finally:
        handle.remove()
    assert not heads
    seen = {}
    hooks = [
        adapter.mlp(layer).register_forward_hook(
            lambda _m, i, o, layer=layer: seen.__setitem__(layer, (i[0], o))
        )
        for layer in (0, 1)
    ]
    ids_BT, mask_BT = pad_batch(seqs, "cpu")
    tiny_model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
    for h in hooks:
        h.remove()
    keep_BT = mask_BT.bool()
    keep_BT[:, 0] = False
    for li in (0, 1):
        torch.testing.assert_close(x_LND[li], seen[li][0][keep_BT], rtol=0, atol=0)
        torch.testing.assert_close(y_LND[li], seen[li][1][keep_BT], rtol=0, atol=0)


def test_training_batches_budget_and_cache(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    from crv.models.adapter import ArchAdapter

    adapter = ArchAdapter.for_model(tiny_model)
    gen = torch.Generator().manual_seed(0)
    seqs = [
        torch.randint(1, 50, (12,), generator=gen).tolist() for _ in range(10)
    ]  # 110 tokens per epoch
    cfg = TranscodersConfig(tokens=300, batch_tokens=32, shuffle_buffer_tokens=64)
    cache = ActivationCache(tmp_path / "cache", "float32")
    batches = list(training_batches(cfg, tiny_model, adapter, seqs, [0, 1], gen, cache))
    assert sum(x.shape[1] for x, _ in batches) == 300
    assert all(x.shape[0] == 2 and x.shape[2] == 32 for x, _ in batches)
    assert cache.complete and sum(x.shape[1] for x, _ in cache.read(None)) == 110
