"""Published transcoder sets: circuit-tracer's layouts load, act as their formulas say, and
are checked against the subject model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from factories import tiny_llama
from safetensors.torch import save_file

from crv.errors import CRVError
from crv.models.adapter import ArchAdapter
from crv.transcoders import io
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.io import load_transcoder_set, save_transcoder_set, write_set_config
from crv.transcoders.stage import load_pretrained

D, F, N_LAYERS = 32, 40, 2


def _layer_tensors(gen: torch.Generator, jump: bool, skip: bool) -> dict[str, torch.Tensor]:
    tensors = {
        "W_enc": torch.randn(F, D, generator=gen) / D**0.5,
        "W_dec": torch.randn(F, D, generator=gen) / D**0.5,
        "b_enc": 0.1 * torch.randn(F, generator=gen),
        "b_dec": 0.1 * torch.randn(D, generator=gen),
    }
    if jump:
        tensors["activation_function.threshold"] = 0.3 * torch.rand(F, generator=gen)
    if skip:
        tensors["W_skip"] = 0.1 * torch.randn(D, D, generator=gen)
    return tensors


def write_set(
    directory: Path,
    *,
    jump: bool = False,
    skip: bool = False,
    extra: dict | None = None,
    absolute: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, torch.Tensor]]:
    """A tiny random set in circuit-tracer's layout (no crv fields unless `extra`)."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(3)
    layers, files = [], []
    for layer in range(N_LAYERS):
        tensors = _layer_tensors(gen, jump, skip)
        name = f"layer_{layer}.safetensors"
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(directory / name))
        layers.append(tensors)
        files.append(str(directory / name) if absolute else name)
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": "tiny",
        "transcoders": files,
        **(extra or {}),
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return layers


def reference_output(t: dict[str, torch.Tensor], x_ND: torch.Tensor, act: str, k: int):
    """The set's formula computed densely: TopK of the activation, decode, bias, skip."""
    pre_NF = x_ND @ t["W_enc"].T + t["b_enc"]
    if act == "jumprelu":
        f_NF = pre_NF * (pre_NF > t["activation_function.threshold"])
    elif act == "relu":
        f_NF = pre_NF.clamp_min(0)
    else:
        f_NF = pre_NF
    vals, idx = f_NF.topk(k, dim=1)
    kept_NF = torch.zeros_like(f_NF).scatter(1, idx, vals)
    y_ND = kept_NF @ t["W_dec"] + t["b_dec"]
    return y_ND + x_ND @ t["W_skip"].T if "W_skip" in t else y_ND


@pytest.mark.parametrize(
    ("jump", "skip", "extra", "act", "k"),
    [
        (False, False, {}, "relu", F),  # ReLU: every active latent kept (k capped at F)
        (True, False, {}, "jumprelu", F),  # threshold tensor -> JumpReLU
        (True, True, {}, "jumprelu", F),  # skip transcoder
        (False, False, {"activation": "topk"}, "topk", 6),  # TopK without k: transcoders.k
        (False, True, {"activation": "topk", "k": 5}, "topk", 5),  # the config's k wins
    ],
)
def test_layouts_load_and_compute_their_formula(tmp_path: Path, jump, skip, extra, act, k) -> None:
    tensors = write_set(tmp_path, jump=jump, skip=skip, extra=extra)
    tset = load_transcoder_set(tmp_path, k=6 if act == "topk" else 10_000)
    assert tset.activation == act and tset.k == k and tset.layers == list(range(N_LAYERS))
    x_ND = torch.randn(50, D, generator=torch.Generator().manual_seed(4))
    for layer in range(N_LAYERS):
        expected = reference_output(tensors[layer], x_ND, act, k)
        torch.testing.assert_close(tset[layer](x_ND), expected, atol=1e-5, rtol=1e-5)
    if jump:  # the threshold really removes latents that plain ReLU would keep
        plain = reference_output(tensors[0], x_ND, "relu", F)
        assert (tset[0](x_ND) - plain).abs().max() > 1e-3


def test_relu_cap_leaves_the_rest_to_the_error(tmp_path: Path) -> None:
    tensors = write_set(tmp_path)
    tset = load_transcoder_set(tmp_path, k=3)
    x_ND = torch.randn(20, D, generator=torch.Generator().manual_seed(4))
    acts_NK, _ = tset[0].encode(x_ND)
    assert acts_NK.shape == (20, 3) and (acts_NK >= 0).all()
    torch.testing.assert_close(tset[0](x_ND), reference_output(tensors[0], x_ND, "relu", 3))


def test_absolute_paths_bf16_and_round_trip(tmp_path: Path) -> None:
    write_set(tmp_path / "pub", jump=True, skip=True, absolute=True, dtype=torch.bfloat16)
    tset = load_transcoder_set(tmp_path / "pub")
    assert tset[0].W_enc.dtype == torch.float32  # float32 on the CPU, whatever is stored
    x_ND = torch.randn(8, D)
    write_set_config(tset, tmp_path / "used")  # a pretrained set used in place
    again = load_transcoder_set(tmp_path / "used")
    save_transcoder_set(tset, tmp_path / "copy")
    copied = load_transcoder_set(tmp_path / "copy")
    for other in (again, copied):
        assert other.activation == "jumprelu" and other[1].W_skip is not None
        torch.testing.assert_close(other[1](x_ND), tset[1](x_ND))


def test_hub_uris_resolve_through_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hf://owner/name@rev/file` entries and a set named by repo go through
    hf_hub_download (cache first); here a fake hub serves a local directory."""
    import huggingface_hub

    write_set(tmp_path / "repo", extra={"activation": "topk", "k": 4})
    config = yaml.safe_load((tmp_path / "repo" / "config.yaml").read_text())
    config["transcoders"] = [f"hf://me/set@v1/{name}" for name in config["transcoders"]]
    (tmp_path / "repo" / "config.yaml").write_text(yaml.safe_dump(config))
    calls = []

    def fake_download(repo_id, filename, revision=None, local_files_only=False):
        calls.append((repo_id, filename, revision, local_files_only))
        return str(tmp_path / "repo" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    tset = load_transcoder_set("me/set@v1")
    assert tset.k == 4 and len(tset) == N_LAYERS
    assert calls[0] == ("me/set", "config.yaml", "v1", True)
    assert ("me/set", "layer_1.safetensors", "v1", True) in calls
    with pytest.raises(ValueError, match="bad hub URI 'hf://me/file'"):
        io.split_hf_uri("hf://me/file")


def test_bad_sets_name_file_and_field(tmp_path: Path) -> None:
    write_set(tmp_path / "topk", extra={"activation": "topk"})
    with pytest.raises(ValueError, match=r"topk/config\.yaml: no field 'k'"):
        load_transcoder_set(tmp_path / "topk")
    write_set(tmp_path / "act", extra={"activation": "gelu"})
    with pytest.raises(ValueError, match=r"act/config\.yaml: field 'activation' is 'gelu'"):
        load_transcoder_set(tmp_path / "act")
    write_set(tmp_path / "skip", skip=True)
    save_file(
        {**_layer_tensors(torch.Generator(), False, False), "W_skip": torch.zeros(D, 3)},
        str(tmp_path / "skip" / "layer_1.safetensors"),
    )
    with pytest.raises(
        ValueError, match=r"layer_1\.safetensors: layer 1 W_skip has shape \[32, 3\]"
    ):
        load_transcoder_set(tmp_path / "skip")
    with pytest.raises(FileNotFoundError, match="not a directory nor a hub repo"):
        load_transcoder_set(tmp_path / "nowhere" / "x")
    (tmp_path / "skip" / "config.yaml").write_text("transcoders: [a, b")
    with pytest.raises(ValueError, match=r"skip/config\.yaml: not valid YAML"):
        load_transcoder_set(tmp_path / "skip")


def test_pretrained_set_is_checked_against_the_subject(tmp_path: Path) -> None:
    write_set(tmp_path / "ok")
    adapter = ArchAdapter.for_model(tiny_llama())  # 2 layers, width 32
    cfg = TranscodersConfig(pretrained=str(tmp_path / "ok"))
    assert load_pretrained(cfg, adapter, "cpu").layers == [0, 1]
    wide = ArchAdapter.for_model(tiny_llama(hidden_size=48))
    with pytest.raises(CRVError, match=r"layer_0\.safetensors: layer 0 W_enc .* d_model is 48"):
        load_pretrained(cfg, wide, "cpu")
    (tmp_path / "ok" / "layer_1.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CRVError, match=r"^transcoders\.pretrained: .*header"):
        load_pretrained(cfg, adapter, "cpu")
    write_set(tmp_path / "ok")
    deep = ArchAdapter.for_model(tiny_llama(num_hidden_layers=3))
    with pytest.raises(CRVError, match=r"ok/config\.yaml: field 'transcoders' .*missing \[2\]"):
        load_pretrained(cfg, deep, "cpu")
