"""A tiny but complete bundle for the bundle and crv-verify tests, built offline in seconds.

The parts are random (a 2-layer Llama with crv-tiny's tokenizer, random TopK transcoders, an
xgboost verifier fitted to random feature rows with the right feature names), so scores
mean nothing, but every code path (tokenising, attribution, features, scoring,
interventions) runs exactly as with a trained bundle.

The session fixtures `bundle_parts` and `tiny_bundle` (tests/conftest.py) are built from
these once per test session.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
from factories import random_transcoder_set, tiny_llama

from crv.bundle import BundleConfig, export_bundle
from crv.features.compute import feature_names
from crv.features.config import FeaturesConfig
from crv.graphs.config import GraphsConfig
from crv.models.tiny import build_tokenizer
from crv.transcoders.io import save_transcoder_set
from crv.verifier.classifier import XGBVerifier
from crv.verifier.config import VerifierConfig
from crv.verifier.methods import SavedMethod, save_method

N_LAYERS, D_MODEL, CONTEXT = 2, 32, 96
ATTRIBUTION = GraphsConfig(max_logits=3, max_feature_nodes=12, batch_size=16)
FEATURES = FeaturesConfig()

PROMPT = "Q: Evaluate (5+9)*(2+3)\n"
STEPS = ["Step 1: 5+9=14, so 14*(2+3)", "Step 2: 2+3=5, so 14*5", "Step 3: 14*5=70, so 70"]


def write_subject(out: Path, seed: int = 0, **shape: int | float) -> Path:
    """A random Llama with crv-tiny's tokenizer, saved as a subject artifact directory."""
    tokenizer = build_tokenizer()
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = tiny_llama(seed, **{**config, **shape}).float()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_transcoders(out: Path, seed: int = 0) -> Path:
    save_transcoder_set(random_transcoder_set(D_MODEL, 64, 4, range(N_LAYERS), seed=seed), out)
    return out


def write_verifier(out: Path, seed: int = 0, n_layers: int = N_LAYERS) -> Path:
    """An xgboost verifier fitted to random rows whose label depends on many features,
    saved as the verifier stage saves a method (`crv.verifier.methods.save_method`).

    Feature values are drawn over the ranges real graphs of the tiny model span (0 to
    ~100), so different graphs land in different leaves and their scores differ.
    """
    names = feature_names(n_layers)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 100.0, size=(400, len(names))) * rng.uniform(0.0, 1.0, size=(400, 1))
    y = ((x - x.mean(0)) @ rng.normal(size=len(names)) > 0).astype(np.int64)
    cfg = VerifierConfig(n_estimators=20, max_depth=3, runtime_n_threads=1)
    fitted = XGBVerifier(cfg, names, seed).fit(x, y, np.arange(len(y)))
    save_method(out, "crv", {"features": names}, fitted)
    return out


def build_parts(root: Path) -> dict[str, Path]:
    """Subject, transcoder and verifier directories under `root`."""
    return {
        "subject_dir": write_subject(root / "subject"),
        "transcoders_dir": write_transcoders(root / "transcoders"),
        "verifier_dir": write_verifier(root / "verifier"),
    }


def make_bundle(
    root: Path,
    parts: dict[str, Path],
    n_layers: int = N_LAYERS,
    graphs: GraphsConfig = ATTRIBUTION,
    **cfg: str | float,
) -> Path:
    """Export a bundle of `parts` (a subject with `n_layers` layers, graphs built with
    `graphs`) into `root / "bundle"`."""
    out = root / "bundle"
    export_bundle(
        out,
        BundleConfig(**cfg),
        subject_dir=parts["subject_dir"],
        transcoders_dir=parts["transcoders_dir"],
        method_dir=parts["verifier_dir"],
        threshold=SavedMethod(parts["verifier_dir"]).threshold,
        graphs=dataclasses.asdict(graphs),
        features=dataclasses.asdict(FEATURES),
        n_layers=n_layers,
        seed=0,
        subject_source={"name": "test-tiny"},
    )
    return out


def fixed_method(out: Path, column: str, temperature: float | None = None) -> Path:
    """A saved `fixed` method (a baseline score column) as the verifier stage writes one."""
    from crv.io import atomic_write_json
    from crv.verifier.methods import FORMAT_VERSION, SPEC_FILE

    spec = {
        "format_version": FORMAT_VERSION,
        "name": column,
        "kind": "fixed",
        "threshold": 0.5,
        "val_auroc": 0.9,
        "inputs": {"features": [], "scores": [column], "hidden": None, "latents": [], "parts": []},
        "temperature": temperature,
        "info": {},
    }
    atomic_write_json(out / SPEC_FILE, spec)
    return out


def write_stage_inputs(root: Path, parts: dict[str, Path], selected: str) -> dict[str, Path]:
    """The bundle stage's input artifacts: manifests, the features' and baselines' metadata,
    and a verifier artifact with two saved methods for all tasks (`crv`, `perplexity`),
    `selected` named in its selected.json."""
    from crv.baselines.config import BaselinesConfig
    from crv.io import atomic_write_json
    from crv.verifier.methods import SELECTED_FILE

    dirs = {
        name: root / name for name in ("subject", "graphs", "features", "baselines", "verifier")
    }
    shutil.copytree(parts["subject_dir"], dirs["subject"])
    for name, cfg in (
        ("subject", {"name": "crv-tiny"}),
        ("graphs", dataclasses.asdict(ATTRIBUTION)),
        ("features", dataclasses.asdict(FEATURES)),
        ("baselines", dataclasses.asdict(BaselinesConfig())),
        ("verifier", dataclasses.asdict(VerifierConfig())),
    ):
        atomic_write_json(dirs[name] / "manifest.json", {"config": cfg})
    atomic_write_json(
        dirs["features"] / "features.json",
        {"n_layers": N_LAYERS, "feature_names": feature_names(N_LAYERS)},
    )
    temperature = BaselinesConfig().temperature_grid[10]
    atomic_write_json(dirs["baselines"] / "baselines.json", {"temperature": temperature})
    methods = dirs["verifier"] / "methods" / "all"
    shutil.copytree(parts["verifier_dir"], methods / "crv")
    (methods / "perplexity").mkdir(parents=True)
    fixed_method(methods / "perplexity", "perplexity", temperature)
    entry = {"method": selected, "dir": f"methods/all/{selected}", "threshold": 0.25}
    atomic_write_json(
        dirs["verifier"] / SELECTED_FILE, {"format_version": 1, "tasks": {"all": entry}}
    )
    return {**dirs, "transcoders": parts["transcoders_dir"]}
