"""The `bundle` stage: everything `crv-verify` needs, in one self-contained directory.

A trained verifier is only meaningful together with the exact model, transcoders and
settings that produced its training graphs: a graph feature computed with other
transcoders, another pruning threshold or another model has a different distribution, and
the verifier's scores would be silently wrong. The bundle therefore pins all of them and
refuses, when loaded, a subject model that does not match what it was built for.

Layout (the bundle is the stage's artifact directory)::

    bundle.json        manifest: format, versions, subject reference, settings, the
                       shipped method (name, kind, inputs, threshold, validation AUROCs)
    subject/           the subject model (HF directory), when embedded (small models)
    transcoders/       the transcoder set (circuit-tracer layout, safetensors)
    verifier/          the shipped method's directory as the verifier stage saved it
                       (`crv.verifier.methods`: spec.json, model.json or logistic.json)
    cards/             the feature cards (`crv.cards`), for naming features; optional

The shipped method is the one the verifier stage selected on validation for all tasks
(`crv.shipped`), not always `crv`; when it reads more than graph features, the manifest's
`baselines` entry holds the baselines stage's settings and fitted temperature, so that
`crv-verify` computes them for a user's trace with the baselines stage's own code. Format
version 1 (before: always `crv`, no `baselines` entry) still loads and scores as before.

`bundle.json` is written last, so a directory without it is not a bundle. A large subject
model is not copied: the manifest records its name, source settings (hub name, GGUF file),
artifact path and a hash of its config, and `load_bundle(..., model=DIR)` can point at
another copy of it. Loading compares family, layer count, width, vocabulary size, config
hash and tokenizer vocabulary hash and refuses a mismatch with a `BundleMismatchError` naming the field.

Everything is read with safe loaders only: JSON, YAML (`safe_load`), safetensors and
xgboost's JSON model format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import crv
from crv.errors import CRVError
from crv.io import atomic_write_json, read_json
from crv.options import Choice, check_choices
from crv.tasks.segment import CANONICAL_STEP_PATTERN

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from crv.baselines.config import BaselinesConfig
    from crv.cards.store import FeatureCards
    from crv.features.config import FeaturesConfig
    from crv.graphs.config import GraphsConfig
    from crv.models.adapter import ArchAdapter
    from crv.pipeline import StageContext
    from crv.shipped import V1Method
    from crv.transcoders.module import TranscoderSet
    from crv.verifier.methods import SavedMethod

MANIFEST_FILE = "bundle.json"
FORMAT_NAME = "crv-bundle"
FORMAT_VERSION = 2
"""2: the verifier entry names the shipped method (`crv.shipped`) and, when it reads baseline
scores, a `baselines` entry; the graphs settings' section is `graphs` (version 1 called it
`attribution`, always shipped `crv`; still read and scored as before)."""
SUBJECT_DIR, TRANSCODERS_DIR, VERIFIER_DIR, CARDS_DIR = (
    "subject",
    "transcoders",
    "verifier",
    "cards",
)

VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype"}
)
"""config.json keys left out of the config hash: they change when the same model is
re-saved by another transformers version or in another dtype, not when the model does."""

SUBJECT_FIELDS = ("family", "n_layers", "d_model", "vocab_size", "config_hash", "tokenizer_hash")
"""Subject properties a bundle pins; a loaded model must match every one of them."""

_SECTIONS = ("subject", "transcoders", "verifier", "graphs", "features", "step_pattern")
"""Top-level entries every manifest has."""


class Embed(Choice):
    """Whether the bundle copies the subject model (see `BundleConfig.embed_subject`)."""

    auto = "auto"
    always = "always"
    never = "never"


@dataclass
class BundleConfig:
    """What the `bundle` stage exports besides the artifacts it depends on."""

    step_pattern: str = CANONICAL_STEP_PATTERN
    """Regex (re.MULTILINE) splitting a completion into steps for `crv-verify`; the default
    is the canonical task format's (every non-empty line except `Answer:`)."""

    embed_subject: Embed = Embed.auto
    """auto | always | never: copy the subject model into the bundle. auto copies it when
    it is at most `embed_max_mb` (the embedded crv-tiny is a few MB)."""

    embed_max_mb: float = 100.0
    """Largest subject model (MiB on disk) that `embed_subject=auto` copies."""

    method: str = "selected"
    """Verifier method to ship: `selected` = the one the verifier stage chose on validation
    for all tasks together (selected.json), or the name of a saved method (`crv`,
    `crv+confidence`, `perplexity`, `probe`, ...; the verifier artifact's
    methods/all/ lists them), shipped with the threshold chosen for it on validation."""

    def __post_init__(self) -> None:
        check_choices(self, "bundle")
        if self.embed_max_mb < 0:
            raise ValueError(f"bundle.embed_max_mb must be >= 0, got {self.embed_max_mb}")
        try:
            re.compile(self.step_pattern)
        except re.error as exc:
            raise ValueError(f"bundle.step_pattern is not a valid regex: {exc}") from None


class BundleError(CRVError):
    """A bundle that cannot be used: missing, unreadable, incomplete or from a newer crv."""


class BundleMismatchError(BundleError):
    """The subject model does not match the one the bundle was built for."""

    def __init__(self, field: str, expected: Any, got: Any, model: str) -> None:
        self.field, self.expected, self.got = field, expected, got
        super().__init__(
            f"subject model {model} does not match the bundle: {field} is {got!r}, "
            f"the bundle was built for {expected!r}"
        )


def _sha256_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def config_hash(model_dir: str | Path) -> str:
    """sha256 of a model directory's config.json, canonicalised (sorted keys, no
    `VOLATILE_CONFIG_KEYS`), so re-saving the same model keeps the hash."""
    path = Path(model_dir) / "config.json"
    config = {k: v for k, v in read_json(path).items() if k not in VOLATILE_CONFIG_KEYS}
    return _sha256_json(config)


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id), independent of its file format."""
    return _sha256_json(tokenizer.get_vocab())


def subject_properties(
    adapter: ArchAdapter, tokenizer: PreTrainedTokenizerBase, model_dir: str | Path
) -> dict[str, Any]:
    """The `SUBJECT_FIELDS` of a loaded subject model (its `ArchAdapter`, tokenizer and
    directory), plus its context length."""
    return {
        "family": adapter.family,
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "vocab_size": adapter.vocab_size,
        "config_hash": config_hash(model_dir),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "max_context": getattr(adapter.model.config, "max_position_embeddings", None),
    }


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _should_embed(cfg: BundleConfig, subject_dir: Path) -> bool:
    if cfg.embed_subject == "auto":
        return _dir_mb(subject_dir) <= cfg.embed_max_mb
    return cfg.embed_subject == "always"


def export_bundle(
    out: str | Path,
    cfg: BundleConfig,
    *,
    subject_dir: str | Path,
    transcoders_dir: str | Path,
    method_dir: str | Path,
    threshold: float,
    graphs: dict[str, Any],
    features: dict[str, Any],
    n_layers: int,
    seed: int,
    subject_source: dict[str, Any] | None = None,
    cards_dir: str | Path | None = None,
    baselines: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a bundle into `out` (created; must not already hold one); returns the manifest.

    `method_dir` is the saved verifier method it ships (`crv.verifier.methods`: spec.json
    and model files), flagged at `threshold`. `graphs` and `features` are the settings
    (config sections, as dicts) the verifier's training graphs and features were computed
    with; `n_layers` and `seed` are the feature computation's layer-histogram size and
    seed. `subject_source` is the subject's model config section (name, GGUF file, ...),
    recorded for provenance. `cards_dir`, a `cards` artifact, is copied so that crv-verify
    can label features. `baselines` (`crv.shipped.baselines_section`) is required when the
    method reads more than graph features. The subject is checked against the transcoders
    before anything is written.
    """
    from crv.pipeline import PIPELINE_FILES, library_versions
    from crv.shipped import manifest_entry
    from crv.transcoders.io import load_subject_with_transcoders, save_transcoder_set
    from crv.verifier.methods import MethodError, SavedMethod

    out, subject_dir = Path(out), Path(subject_dir).resolve()
    if (out / MANIFEST_FILE).exists():
        raise BundleError(f"{out} already holds a bundle; export into a new directory")
    try:
        method = SavedMethod(method_dir)
    except (MethodError, OSError, ValueError) as exc:
        raise BundleError(f"cannot ship the verifier method {method_dir}: {exc}") from None
    needs_baselines = bool(method.needs - {"features"})
    if needs_baselines and baselines is None:
        raise BundleError(f"method {method.name} reads the baselines' scores: pass `baselines`")
    loaded = load_subject_with_transcoders(subject_dir, transcoders_dir)
    props = subject_properties(loaded.adapter, loaded.tokenizer, subject_dir)
    tset = loaded.transcoders
    del loaded

    embed = _should_embed(cfg, subject_dir)
    if embed:
        shutil.copytree(
            subject_dir,
            out / SUBJECT_DIR,
            ignore=lambda _, names: [n for n in names if n in PIPELINE_FILES],
        )
    save_transcoder_set(tset, out / TRANSCODERS_DIR)
    shutil.copytree(method_dir, out / VERIFIER_DIR)
    if cards_dir is not None:
        from crv.cards.store import copy_cards

        copy_cards(cards_dir, out / CARDS_DIR)
    first = tset[tset.layers[0]]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"crv": crv.__version__, **library_versions()},
        "subject": {
            **props,
            "embedded": embed,
            "dir": SUBJECT_DIR if embed else None,
            "path": str(subject_dir),
            "source": subject_source or {},
        },
        "transcoders": {
            "dir": TRANSCODERS_DIR,
            "layers": tset.layers,
            "k": tset.k,
            "activation": tset.activation,
            "n_latents": first.n_latents,
        },
        "verifier": {
            "dir": VERIFIER_DIR,
            **manifest_entry(method.spec, threshold, method.needs),
        },
        "baselines": baselines if needs_baselines else None,
        "graphs": graphs,
        "features": {"config": features, "n_layers": int(n_layers), "seed": int(seed)},
        "step_pattern": cfg.step_pattern,
        "cards": {"dir": CARDS_DIR} if cards_dir is not None else None,
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return manifest


def run_stage(ctx: StageContext[BundleConfig]) -> dict[str, Any]:
    """`bundle` stage: export the subject, transcoders, the verifier method that won on
    validation for all tasks together (`crv.shipped`) and the settings of this run."""
    from crv.baselines.config import BaselinesConfig
    from crv.baselines.scores import load_baseline_meta
    from crv.features.table import load_feature_meta
    from crv.pipeline import artifact_config
    from crv.shipped import SHIPPED_TASK, baselines_section
    from crv.verifier.methods import (
        SPEC_FILE,
        MethodError,
        load_method,
        selected_method,
        task_methods_dir,
    )

    try:
        if ctx.cfg.method == "selected":
            method, threshold = selected_method(ctx.inputs["verifier"], SHIPPED_TASK)
        else:
            saved = task_methods_dir(ctx.inputs["verifier"], SHIPPED_TASK)
            names = sorted(read_json(f)["name"] for f in saved.glob(f"*/{SPEC_FILE}"))
            if ctx.cfg.method not in names:
                raise BundleError(
                    f"bundle.method={ctx.cfg.method!r} is not a saved verifier method; "
                    f"saved: {', '.join(names) or 'none'}"
                )
            method = load_method(ctx.inputs["verifier"], SHIPPED_TASK, ctx.cfg.method)
            threshold = method.threshold
    except MethodError as exc:
        raise BundleError(f"bundle: no verifier to ship: {exc}") from None
    baselines = ctx.inputs["baselines"]
    section = baselines_section(
        BaselinesConfig(**artifact_config(baselines)),
        load_baseline_meta(baselines)["temperature"],
    )
    manifest = export_bundle(
        ctx.out,
        ctx.cfg,
        subject_dir=ctx.inputs["subject"],
        transcoders_dir=ctx.inputs["transcoders"],
        method_dir=method.path,
        threshold=threshold,
        graphs=artifact_config(ctx.inputs["graphs"]),
        features=artifact_config(ctx.inputs["features"]),
        n_layers=int(load_feature_meta(ctx.inputs["features"])["n_layers"]),
        seed=ctx.seed,
        subject_source=artifact_config(ctx.inputs["subject"]),
        cards_dir=ctx.inputs.get("cards"),
        baselines=section,
    )
    entry = manifest["verifier"]
    ctx.log.info(
        "bundle exported: method %s (validation AUROC %s), subject embedded: %s",
        entry["method"],
        entry["val_auroc"],
        manifest["subject"]["embedded"],
    )
    return {
        "subject_embedded": manifest["subject"]["embedded"],
        "size_mb": round(_dir_mb(Path(ctx.out)), 2),
        "method": entry["method"],
        "threshold": entry["threshold"],
        "n_features": len(entry["feature_names"]),
        "validation_auroc": entry["val_auroc"],
    }


@dataclass
class Bundle:
    """A loaded bundle: the subject model with its adapter, transcoders, shipped verifier
    method, settings."""

    path: Path
    manifest: dict[str, Any]
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ArchAdapter
    transcoders: TranscoderSet
    method: SavedMethod | V1Method
    """The verifier it ships (`crv.shipped`): `score(StepInputs)`, `needs`, `name`."""
    graphs: GraphsConfig
    """Settings the training graphs were built with (the manifest's `graphs`)."""
    features: FeaturesConfig
    """Settings the training features were computed with."""
    baselines: BaselinesConfig | None = None
    """The baselines stage's settings, when the method reads its scores (else None)."""
    cards: FeatureCards | None = None
    """Feature cards of the transcoders (None in a bundle exported without them)."""

    @property
    def threshold(self) -> float:
        """Decision threshold chosen on validation data: flag a step when score >= it."""
        return float(self.manifest["verifier"]["threshold"])

    @property
    def feature_names(self) -> list[str]:
        """The graph feature columns the shipped method reads (empty: it reads none)."""
        return list(self.manifest["verifier"]["feature_names"])

    @property
    def temperature(self) -> float | None:
        """The baselines' fitted temperature (None when the method reads no baseline)."""
        entry = self.manifest.get("baselines")
        return float(entry["temperature"]) if entry else None

    @property
    def step_pattern(self) -> str:
        return str(self.manifest["step_pattern"])

    @property
    def n_layers_features(self) -> int:
        return int(self.manifest["features"]["n_layers"])

    @property
    def feature_seed(self) -> int:
        return int(self.manifest["features"]["seed"])

    @property
    def max_context(self) -> int | None:
        """Longest token sequence the subject model accepts (None: unknown)."""
        value = self.manifest["subject"].get("max_context")
        return int(value) if value is not None else None


V1_VERIFIER = {"method": "crv", "kind": "xgboost", "needs": ["features"], "val_auroc": None}
"""What a format-1 manifest's verifier entry leaves implicit: it always shipped `crv`."""


def _upgrade(manifest: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest in the current form (the verifier entry made explicit)."""
    if manifest["format_version"] >= 2:
        return manifest
    return {**manifest, "verifier": {**V1_VERIFIER, **manifest["verifier"]}, "baselines": None}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the bundle at `path`; BundleError if it is not a usable bundle."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise BundleError(f"{path} is not a crv bundle: {MANIFEST_FILE} is missing")
    try:
        manifest = read_json(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {file}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{file} is not a crv bundle manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"{file} has bundle format version {version!r}; this crv reads up to "
            f"{FORMAT_VERSION}: upgrade crv"
        )
    if version < 2 and "attribution" in manifest:  # a version-1 bundle
        manifest["graphs"] = manifest.pop("attribution")
    missing = [key for key in _SECTIONS if key not in manifest]
    missing += [
        f"subject.{key}" for key in SUBJECT_FIELDS if key not in manifest.get("subject", {})
    ]
    if missing:
        raise BundleError(f"{file} is incomplete: it lacks {', '.join(missing)}")
    manifest = _upgrade(manifest)
    method = manifest["verifier"]
    lacking = [k for k in ("threshold", "feature_names", *V1_VERIFIER) if k not in method]
    if lacking or set(method["needs"]) - {"features"} and not manifest.get("baselines"):
        what = f"verifier.{lacking[0]}" if lacking else "baselines"
        raise BundleError(f"{file} is incomplete: it lacks {what}")
    return manifest


def resolve_subject_dir(path: Path, manifest: dict[str, Any], model: str | Path | None) -> Path:
    """Where to load the subject from: `model` if given, else the embedded copy, else the
    artifact path recorded at export."""
    subject = manifest["subject"]
    if model is not None:
        candidate = Path(model)
        if not (candidate / "config.json").is_file():
            raise BundleError(f"model={model} is not a model directory (no config.json)")
        return candidate
    if subject.get("embedded"):
        return path / subject["dir"]
    recorded = Path(subject["path"])
    if not (recorded / "config.json").is_file():
        name = subject.get("source", {}).get("name", "?")
        raise BundleError(
            f"the bundle does not embed its subject model ({name}) and the recorded copy "
            f"{recorded} is missing; pass model=DIR (that model's HF directory)"
        )
    return recorded


def check_subject(manifest: dict[str, Any], props: dict[str, Any], model: str) -> None:
    """Raise BundleMismatchError naming the first `SUBJECT_FIELDS` entry that differs."""
    expected = manifest["subject"]
    for name in SUBJECT_FIELDS:
        if props[name] != expected[name]:
            raise BundleMismatchError(name, expected[name], props[name], model)


def _settings(cls: type, values: dict[str, Any], section: str) -> Any:
    """A config dataclass from a manifest section; BundleError naming an unknown field."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BundleError(
            f"bundle {section} settings have fields this crv does not know: {unknown}; "
            "upgrade crv or rebuild the bundle"
        )
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle {section} settings are invalid: {exc}") from None


def _load_cards(path: Path, manifest: dict[str, Any]) -> FeatureCards | None:
    """The bundle's feature cards, or None for a bundle exported without them."""
    entry = manifest.get("cards")
    if not entry:
        return None
    from crv.cards.store import load_feature_cards

    return load_feature_cards(path / entry["dir"])


def _load_method(path: Path, manifest: dict[str, Any]) -> SavedMethod | V1Method:
    """The shipped method: a saved verifier method, or a format-1 bundle's `crv`."""
    from crv.shipped import V1Method
    from crv.verifier.classifier import load_verifier
    from crv.verifier.methods import SavedMethod

    entry = manifest["verifier"]
    if manifest["format_version"] >= 2:
        return SavedMethod(path / entry["dir"])
    verifier = load_verifier(path / entry["dir"])
    if list(verifier.feature_names) != list(entry["feature_names"]):
        raise ValueError("the verifier's feature names differ from the manifest's")
    return V1Method(verifier, float(entry["threshold"]))


def load_bundle(path: str | Path, device: str = "cpu", model: str | Path | None = None) -> Bundle:
    """Load a bundle for verification, checking the subject model against it.

    `model` overrides where the subject is loaded from (a HF directory of the same
    model). Raises BundleError for an unusable bundle and BundleMismatchError (naming the
    field) when the subject model differs from the one the bundle was built for.
    """
    from crv.baselines.config import BaselinesConfig
    from crv.features.config import FeaturesConfig
    from crv.graphs.config import GraphsConfig
    from crv.transcoders.io import load_subject_with_transcoders

    path = Path(path)
    manifest = read_manifest(path)
    subject_dir = resolve_subject_dir(path, manifest, model)

    def check(adapter: ArchAdapter, tokenizer: PreTrainedTokenizerBase) -> None:
        props = subject_properties(adapter, tokenizer, subject_dir)
        check_subject(manifest, props, str(subject_dir))

    try:
        loaded = load_subject_with_transcoders(
            subject_dir, path / manifest["transcoders"]["dir"], device, check
        )
        cards = _load_cards(path, manifest)
    except BundleError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(
            f"cannot load bundle {path} with the subject model {subject_dir}: {exc}"
        ) from None
    from crv.verifier.methods import MethodError

    try:
        method = _load_method(path, manifest)
    except (MethodError, OSError, ValueError, KeyError) as exc:
        raise BundleError(f"bundle {path} is damaged: its verifier: {exc}") from None
    baselines = manifest.get("baselines")
    return Bundle(
        path=path,
        manifest=manifest,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        adapter=loaded.adapter,
        transcoders=loaded.transcoders,
        method=method,
        graphs=_settings(GraphsConfig, manifest["graphs"], "graphs"),
        features=_settings(FeaturesConfig, manifest["features"]["config"], "features"),
        baselines=_settings(BaselinesConfig, baselines["config"], "baselines")
        if baselines
        else None,
        cards=cards,
    )
