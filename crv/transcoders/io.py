"""Transcoder sets on disk, in circuit-tracer's transcoder-set layout.

    <dir>/config.yaml              model_kind: transcoder_set, feature_input_hook: mlp.hook_in,
                                   feature_output_hook: mlp.hook_out, transcoders: [paths],
                                   activation, k (and crv's layers list)
    <dir>/layer_{i}.safetensors    W_enc [F, D], W_dec [F, D], b_enc [F], b_dec [D]

Paths in `transcoders` are relative to the directory here (circuit-tracer resolves
absolute or repo-relative paths; `absolute_config_for` writes a copy with absolute paths
for it). Loading is safe: `yaml.safe_load` and safetensors only, never pickle.

`load_subject_with_transcoders` is the one way a stage or command gets the subject model
and its transcoders together, ready for splicing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crv.io import atomic_write, atomic_write_text
from crv.models.adapter import ArchAdapter
from crv.models.loading import load_subject
from crv.transcoders.module import (
    FEATURE_INPUT_HOOK,
    FEATURE_OUTPUT_HOOK,
    TopKTranscoder,
    TranscoderSet,
)

CONFIG_NAME = "config.yaml"
_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def _config(tset: TranscoderSet, files: list[str]) -> dict[str, Any]:
    return {
        "model_kind": "transcoder_set",
        "feature_input_hook": tset.feature_input_hook,
        "feature_output_hook": tset.feature_output_hook,
        "transcoders": files,
        "layers": tset.layers,
        "activation": tset.activation,
        "k": tset.k,
    }


def save_transcoder_set(tset: TranscoderSet, directory: str | Path) -> Path:
    """Write `tset` into `directory` (created if needed); returns the config path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for layer in tset.layers:
        tc = tset[layer]
        tensors = {name: getattr(tc, name).detach().float().cpu().contiguous() for name in _TENSORS}
        name = layer_file(layer)
        atomic_write(directory / name, lambda p, t=tensors: save_file(t, str(p)))
        files.append(name)
    return atomic_write_text(
        directory / CONFIG_NAME, yaml.safe_dump(_config(tset, files), sort_keys=False)
    )


def absolute_config_for(directory: str | Path) -> dict[str, Any]:
    """The set's config with absolute transcoder paths (what circuit-tracer expects)."""
    directory = Path(directory).resolve()
    cfg = _read_config(directory)
    cfg["transcoders"] = [str(directory / f) for f in cfg["transcoders"]]
    return cfg


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no transcoder set at {directory}: {CONFIG_NAME} missing")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict) or cfg.get("model_kind") != "transcoder_set":
        raise ValueError(f"{path}: model_kind must be 'transcoder_set'")
    return cfg


def _layer_of(path: str, position: int) -> int:
    stem = Path(path).stem
    return int(stem.removeprefix("layer_")) if stem.startswith("layer_") else position


def load_transcoder_set(directory: str | Path, device: str | torch.device = "cpu") -> TranscoderSet:
    """Read a transcoder set written by `save_transcoder_set` (or in the same layout).

    Raises ValueError naming the file when a layer's tensors are missing or their shapes
    disagree with each other.
    """
    directory = Path(directory)
    cfg = _read_config(directory)
    k, activation = int(cfg["k"]), cfg.get("activation", "relu_topk")
    if activation not in ("topk", "relu_topk"):
        raise ValueError(f"{directory / CONFIG_NAME}: unsupported activation {activation!r}")
    paths = list(cfg["transcoders"])
    layers = cfg.get("layers") or [_layer_of(p, i) for i, p in enumerate(paths)]
    transcoders, files = {}, {}
    for layer, rel in zip(layers, paths, strict=True):
        path = Path(rel) if Path(rel).is_absolute() else directory / rel
        tensors = load_file(str(path))
        missing = [n for n in _TENSORS if n not in tensors]
        if missing:
            raise ValueError(f"{path}: layer {layer} lacks tensors {missing}")
        n_latents, d_model = tensors["W_enc"].shape
        expected = {"W_dec": (n_latents, d_model), "b_enc": (n_latents,), "b_dec": (d_model,)}
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"{path}: layer {layer} {name} has shape {list(tensors[name].shape)}, "
                    f"expected {list(shape)} (W_enc is {[n_latents, d_model]})"
                )
        tc = TopKTranscoder(d_model, n_latents, k, activation)
        with torch.no_grad():
            for name in _TENSORS:
                getattr(tc, name).copy_(tensors[name])
        transcoders[int(layer)] = tc.to(device).eval().requires_grad_(False)
        files[int(layer)] = str(path)
    return TranscoderSet(
        transcoders,
        k=k,
        activation=activation,
        feature_input_hook=cfg.get("feature_input_hook", FEATURE_INPUT_HOOK),
        feature_output_hook=cfg.get("feature_output_hook", FEATURE_OUTPUT_HOOK),
        files=files,
    )


@dataclass
class SubjectWithTranscoders:
    """The subject model (eval mode, frozen), its adapter, and a transcoder set checked to
    fit it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ArchAdapter
    transcoders: TranscoderSet


def load_subject_with_transcoders(
    subject_dir: str | Path,
    transcoders_dir: str | Path,
    device: str | torch.device = "cpu",
    check_subject: Callable[[ArchAdapter, PreTrainedTokenizerBase], None] | None = None,
) -> SubjectWithTranscoders:
    """Load a subject artifact and a transcoder set on `device`; ValueError when the set does
    not fit the model. `check_subject` runs on the loaded model before the transcoders are
    read (a bundle compares the model with the one it was built for there)."""
    model, tokenizer = load_subject(subject_dir, str(device))
    model.requires_grad_(False)
    adapter = ArchAdapter.for_model(model)
    if check_subject is not None:
        check_subject(adapter, tokenizer)
    tset = load_transcoder_set(transcoders_dir, device)
    tset.check_compatible(adapter)
    return SubjectWithTranscoders(model, tokenizer, adapter, tset)
