"""Transcoder sets on disk, in circuit-tracer's transcoder-set layout.

    <dir>/config.yaml              model_kind: transcoder_set, feature_input_hook: mlp.hook_in,
                                   feature_output_hook: mlp.hook_out, transcoders: [paths],
                                   activation, k (and crv's layers list)
    <dir>/layer_{i}.safetensors    W_enc [F, D], W_dec [F, D], b_enc [F], b_dec [D],
                                   optional activation_function.threshold [F] (JumpReLU)
                                   and W_skip [D, D] (output += input @ W_skip.T)

Published sets (circuit-tracer 0.5.0's layout) load too: `transcoders` entries may be
absolute paths, paths relative to the config, or `hf://owner/name[@revision]/file` URIs;
a set may also be named by hub repo (`owner/name[@revision]`, its `config.yaml` at the
root). Hub files resolve through huggingface_hub's cache, so a cached set loads offline.
Without `activation` in the config a layer is JumpReLU when its file has a threshold and
ReLU otherwise; without `k` the caller's k applies (TopK sets must get one). Loading is
safe: `yaml.safe_load` and safetensors only, never pickle.

`load_subject_with_transcoders` is the one way a stage or command gets the subject model
and its transcoders together, ready for splicing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crv.io import atomic_write, atomic_write_text
from crv.models.adapter import ArchAdapter
from crv.models.loading import load_subject
from crv.transcoders.module import (
    ACTIVATIONS,
    FEATURE_INPUT_HOOK,
    FEATURE_OUTPUT_HOOK,
    TopKTranscoder,
    TranscoderSet,
)

CONFIG_NAME = "config.yaml"
_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")
THRESHOLD = "activation_function.threshold"
SKIP = "W_skip"
_HUB_REPO = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def _config(tset: TranscoderSet, files: list[str]) -> dict[str, Any]:
    """The set's `config.yaml` content, naming `files` per layer."""
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
        for name, value in ((THRESHOLD, tc.threshold), (SKIP, tc.W_skip)):
            if value is not None:
                tensors[name] = value.detach().float().cpu().contiguous()
        name = layer_file(layer)
        atomic_write(directory / name, lambda p, t=tensors: save_file(t, str(p)))
        files.append(name)
    return atomic_write_text(
        directory / CONFIG_NAME, yaml.safe_dump(_config(tset, files), sort_keys=False)
    )


def write_set_config(tset: TranscoderSet, directory: str | Path) -> Path:
    """Write only `config.yaml` into `directory`, naming the files `tset` was loaded from
    (absolute paths): a pretrained set used in place, without copying its weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = [str(Path(tset.files[layer]).resolve()) for layer in tset.layers]
    return atomic_write_text(
        directory / CONFIG_NAME, yaml.safe_dump(_config(tset, files), sort_keys=False)
    )


def absolute_config_for(directory: str | Path) -> dict[str, Any]:
    """The set's config with absolute transcoder paths (what circuit-tracer expects)."""
    directory = Path(directory).resolve()
    cfg = _read_config(directory / CONFIG_NAME)
    cfg["transcoders"] = [str(directory / f) for f in cfg["transcoders"]]
    return cfg


def _hub_file(repo: str, filename: str) -> Path:
    """A file of hub repo `owner/name[@revision]` from huggingface_hub's cache, downloaded
    only when it is not cached yet."""
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = repo.partition("@")
    try:
        return Path(
            hf_hub_download(repo_id, filename, revision=revision or None, local_files_only=True)
        )
    except Exception:  # noqa: BLE001 - not cached (or offline): try the hub once
        pass
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear message
        raise FileNotFoundError(
            f"cannot get {filename!r} of hub repo {repo!r} (not in the huggingface_hub cache "
            f"and the hub is unreachable): {(str(err) or type(err).__name__).splitlines()[0]}"
        ) from None


def split_hf_uri(uri: str) -> tuple[str, str]:
    """`hf://owner/name[@revision]/path/in/repo` -> (`owner/name[@revision]`, path)."""
    parts = uri.removeprefix("hf://").split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"bad hub URI {uri!r}: expected hf://owner/name[@revision]/file")
    return f"{parts[0]}/{parts[1]}", parts[2]


def _locate(source: str | Path) -> tuple[Path, str | None]:
    """The config path of a set given by directory or hub repo, and the repo (None: local)."""
    path = Path(source)
    if path.is_dir():
        return path / CONFIG_NAME, None
    if isinstance(source, str) and _HUB_REPO.match(source) and not path.exists():
        return _hub_file(source, CONFIG_NAME), source
    raise FileNotFoundError(f"no transcoder set at {source}: not a directory nor a hub repo")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no transcoder set at {path.parent}: {CONFIG_NAME} missing")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or cfg.get("model_kind") != "transcoder_set":
        raise ValueError(f"{path}: model_kind must be 'transcoder_set'")
    if not isinstance(cfg.get("transcoders"), list) or not cfg["transcoders"]:
        raise ValueError(f"{path}: field 'transcoders' must be a non-empty list of files")
    return cfg


def _resolve_file(entry: str, config_path: Path, repo: str | None) -> Path:
    """A `transcoders` entry as a local file: hub URI, absolute path, or relative to the
    config (inside the hub repo when the set came from one)."""
    if entry.startswith("hf://"):
        return _hub_file(*split_hf_uri(entry))
    if Path(entry).is_absolute():
        return Path(entry)
    return _hub_file(repo, entry) if repo is not None else config_path.parent / entry


def _layer_of(path: str, position: int) -> int:
    stem = Path(path).stem
    return int(stem.removeprefix("layer_")) if stem.startswith("layer_") else position


def _transcoder_from(
    tensors: dict[str, torch.Tensor], k: int, activation: str, where: str
) -> TopKTranscoder:
    """A transcoder holding `tensors` (checked against each other); no random init."""
    missing = [n for n in _TENSORS if n not in tensors]
    if activation == "jumprelu" and THRESHOLD not in tensors:
        missing.append(THRESHOLD)
    if missing:
        raise ValueError(f"{where} lacks tensors {missing}")
    n_latents, d_model = tensors["W_enc"].shape
    expected = {"W_dec": (n_latents, d_model), "b_enc": (n_latents,), "b_dec": (d_model,)}
    if activation == "jumprelu":
        expected[THRESHOLD] = (n_latents,)
    if SKIP in tensors:
        expected[SKIP] = (d_model, d_model)
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{where} {name} has shape {list(tensors[name].shape)}, expected "
                f"{list(shape)} (W_enc is {[n_latents, d_model]})"
            )
    if activation in ("relu", "jumprelu"):
        k = min(k, n_latents)  # a cap on the code, see module docstring
    if not 0 < k <= n_latents:
        raise ValueError(f"{where}: k={k} must be in 1..{n_latents} (the number of latents)")
    with torch.device("meta"):
        tc = TopKTranscoder(d_model, n_latents, k, activation, skip=SKIP in tensors)
    attributes = {name: name for name in _TENSORS} | {"threshold": THRESHOLD, SKIP: SKIP}
    for attr, name in attributes.items():
        if getattr(tc, attr) is not None:  # the parameters the constructor made, all in `tensors`
            setattr(tc, attr, nn.Parameter(tensors[name], requires_grad=False))
    return tc


def load_transcoder_set(
    source: str | Path, device: str | torch.device = "cpu", k: int | None = None
) -> TranscoderSet:
    """Read a transcoder set: a directory (`save_transcoder_set`'s or circuit-tracer's
    layout) or a hub repo `owner/name[@revision]`.

    `k` applies when the config names none. On CUDA tensors keep their stored dtype (a
    bf16 set stays bf16); elsewhere they are float32. Raises ValueError naming the file
    and field when the config or a layer's tensors are malformed.
    """
    config_path, repo = _locate(source)
    cfg = _read_config(config_path)
    k = cfg.get("k", k)
    activation = cfg.get("activation")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"{config_path}: field 'activation' is {activation!r}, expected one of {ACTIVATIONS}"
        )
    if k is None and activation in ("topk", "relu_topk"):
        raise ValueError(f"{config_path}: no field 'k' for a TopK set; give one (transcoders.k)")
    paths = [str(p) for p in cfg["transcoders"]]
    layers = cfg.get("layers") or [_layer_of(p, i) for i, p in enumerate(paths)]
    if len(layers) != len(paths):
        raise ValueError(f"{config_path}: fields 'layers' and 'transcoders' differ in length")
    dtype = None if torch.device(device).type == "cuda" else torch.float32
    transcoders, files = {}, {}
    for layer, entry in zip(layers, paths, strict=True):
        path = _resolve_file(entry, config_path, repo)
        if not path.is_file():
            raise FileNotFoundError(f"{config_path}: field 'transcoders' names {entry}, missing")
        tensors = load_file(str(path))
        layer_act = activation or ("jumprelu" if THRESHOLD in tensors else "relu")
        n_latents = tensors["W_enc"].shape[0] if "W_enc" in tensors else 0
        tc = _transcoder_from(tensors, int(k or n_latents), layer_act, f"{path}: layer {layer}")
        transcoders[int(layer)] = tc.to(device, dtype).eval().requires_grad_(False)
        files[int(layer)] = str(path)
    kinds = {tc.activation for tc in transcoders.values()}
    if len(kinds) > 1:
        raise ValueError(f"{config_path}: layers mix activations {sorted(kinds)}")
    return TranscoderSet(
        transcoders,
        k=next(iter(transcoders.values())).k,
        activation=kinds.pop(),
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
