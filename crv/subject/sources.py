"""Turning any supported source into crv's subject artifact (a plain Hugging Face
directory that `crv.models.loading.load_subject` reads). `export_subject` resolves where a
model comes from exactly once: a hub name, a local HF directory, a GGUF file, or a GGUF
file shipped inside pip packages (the only way real pretrained weights reach machines
without hub access).

Pip-shipped GGUF files are treated as data, never as code: their packages are located
through installed-distribution metadata (nothing of theirs is imported), a pinned
version is checked, multi-part files are concatenated in order, and the result must
match the configured sha256 before transformers dequantises it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crv.errors import CRVError
from crv.io import atomic_write, read_json
from crv.models.adapter import ArchAdapter
from crv.subject.config import SubjectConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


GGUF_SUFFIXES = (".gguf", ".bin")  # multi-part repacks ship raw .bin parts


_CHUNK = 1 << 24


def resolve_source(cfg: SubjectConfig) -> str:
    """The concrete source (hf | gguf | pip_gguf) that `cfg.source` stands for."""
    if cfg.source != "auto":
        return str(cfg.source)
    if cfg.pip_packages:
        return "pip_gguf"
    if cfg.gguf_file or cfg.name.endswith(".gguf"):
        return "gguf"
    return "hf"


def export_subject(cfg: SubjectConfig, out_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Load the model `cfg` names and write it into `out_dir` as a subject artifact.

    `cache_dir` holds the concatenation of multi-part pip GGUF files. Fails before
    writing anything if the model's family has no `ArchAdapter`. Returns what was
    exported: family, sizes, parameter count and the sha256 of the written config.json.
    """
    source = resolve_source(cfg)
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
    if source == "hf":
        location = cfg.name
        kwargs["trust_remote_code"] = cfg.trust_remote_code
    else:
        gguf_path = (
            pip_gguf_file(cfg, Path(cache_dir)) if source == "pip_gguf" else local_gguf_file(cfg)
        )
        if gguf_path is None:  # a GGUF file inside a hub repository
            location, kwargs["gguf_file"] = cfg.name, cfg.gguf_file
        else:
            location, kwargs["gguf_file"] = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:  # not a directory, not in the hub cache, hub unreachable
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CRVError(
            f"subject.name={cfg.name!r} cannot be loaded: {first} (a local directory, a cached "
            "hub model, or a hub name with network access is needed)"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(
        location,
        gguf_file=kwargs.get("gguf_file"),
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )
    adapter = ArchAdapter.for_model(model)
    if "gguf_file" in kwargs:  # dequantised weights: save as a plain model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "source": source,
        "family": adapter.family,
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "vocab_size": adapter.vocab_size,
        "n_params": sum(p.numel() for p in model.parameters()),
        "config_sha256": _sha256([out_dir / "config.json"]),
    }


def local_gguf_file(cfg: SubjectConfig) -> Path | None:
    """The GGUF file `cfg` names on disk, or None when it names one inside a hub repo."""
    if cfg.name.endswith(".gguf"):
        path = Path(cfg.name)
    elif cfg.gguf_file and Path(cfg.name).is_dir():
        path = Path(cfg.name) / cfg.gguf_file
    elif cfg.gguf_file:
        return None
    else:
        raise ValueError("source gguf needs subject.gguf_file, or subject.name ending in .gguf")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    _check_sha256([path], cfg.sha256)
    return path


def pip_gguf_file(cfg: SubjectConfig, cache_dir: Path) -> Path:
    """The GGUF file held by `cfg.pip_packages`, concatenated into `cache_dir` if in parts.

    A single-part file is used where it is installed. The file is checked against
    `cfg.sha256` when it is set; a verified concatenation in the cache is reused.
    """
    if not cfg.pip_packages:
        raise ValueError("source pip_gguf needs subject.pip_packages")
    if cfg.gguf_file and len(cfg.pip_packages) > 1:
        raise ValueError("subject.gguf_file names the file of a single package; parts have none")
    parts = [_package_gguf_part(spec, cfg.gguf_file) for spec in cfg.pip_packages]
    if len(parts) == 1:
        _check_sha256(parts, cfg.sha256)
        return parts[0]
    target = Path(cache_dir) / f"{cfg.sha256 or 'unverified'}.gguf"
    if cfg.sha256 and target.is_file() and _sha256([target]) == cfg.sha256.lower():
        return target
    atomic_write(target, lambda tmp: _check_sha256(parts, cfg.sha256, _concatenate(parts, tmp)))
    return target


def _package_gguf_part(spec: str, gguf_file: str | None) -> Path:
    """The one GGUF file (or part) that installed package `spec` holds; imports nothing."""
    name, _, version = spec.partition("==")
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"package {name!r} is not installed: pip install --no-deps {spec!r}"
        ) from None
    if version and dist.version != version:
        raise ValueError(f"package {name!r} is version {dist.version}, the config pins {version}")
    files = [Path(str(dist.locate_file(f))) for f in dist.files or ()]
    if gguf_file is None:
        candidates = [f for f in files if f.suffix in GGUF_SUFFIXES]
        wanted = f"exactly one GGUF file or part ({' or '.join(GGUF_SUFFIXES)})"
    else:
        candidates = [f for f in files if f.name == gguf_file]
        wanted = f"the file {gguf_file!r}"
    if len(candidates) != 1:
        found = ", ".join(sorted(f.name for f in candidates)) or "none"
        raise ValueError(f"package {name!r} must hold {wanted}; found: {found}")
    if not candidates[0].is_file():
        raise FileNotFoundError(f"{candidates[0]} is listed by {name!r} but missing on disk")
    return candidates[0]


def _concatenate(parts: list[Path], out: Path) -> str:
    """Write `parts` one after the other into `out`; the sha256 of what was written."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for part in parts:
            with part.open("rb") as source:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    sink.write(chunk)
    return digest.hexdigest()


def _sha256(paths: list[Path]) -> str:
    """sha256 of the concatenated contents of `paths`."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(paths: list[Path], expected: str | None, actual: str | None = None) -> None:
    """Raise unless the concatenation of `paths` (whose hash may be given) has sha256 `expected`."""
    if expected is None:
        return
    actual = actual or _sha256(paths)
    if actual != expected.lower():
        shown = ", ".join(str(p) for p in paths)
        raise ValueError(
            f"sha256 mismatch for the GGUF file from {shown}: expected {expected}, got {actual}. "
            "Refusing to load it: reinstall the pinned package versions or fix subject.sha256."
        )


DATA_DIR = Path(__file__).resolve().parents[2] / "data"


SHIPPED = ("crv-tiny", "crv-tiny-bugs")
"""Models crv trains itself and ships in data/<name> (their recipes: `crv.models.tiny`)."""


def shipped_tiny_dir(name: str = "crv-tiny") -> Path:
    """The checkpoint of a shipped model (`SHIPPED`) in the repository's data/ folder."""
    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not a shipped model; expected one of {SHIPPED}")
    path = DATA_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded model is missing at {path}: install crv from a git clone "
            "(pip install -e .) or retrain it with subject.retrain=true"
        )
    return path


def trained_with_planted_rules(subject_dir: str | Path) -> bool:
    """Whether a subject artifact was trained with crv.tasks.bugs's planted rules (its
    crv-tiny training record says `planted`): only then does a step's `planted_rule` name
    a planted error rather than a step a rule would have touched."""
    record = Path(subject_dir) / "crv_tiny.json"
    if not record.is_file():
        return False
    return bool(read_json(record).get("config", {}).get("planted", False))
