"""The verifier a bundle ships: crv-verify gives a user's trace the baselines stage's
numbers, a graph + confidence method reads both, and a format-1 bundle scores as before."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from fixtures_bundle import (
    ATTRIBUTION,
    FEATURES,
    N_LAYERS,
    PROMPT,
    STEPS,
    fixed_method,
)

from crv.baselines.config import BaselinesConfig
from crv.baselines.stage import baseline_table
from crv.bundle import MANIFEST_FILE, BundleConfig, BundleError, export_bundle, load_bundle
from crv.check.config import VerifyConfig
from crv.check.inputs import parse_trace
from crv.check.scorer import StepVerifier
from crv.io import atomic_write_json, read_json
from crv.shipped import baselines_section
from crv.verifier.classifier import XGBVerifier, load_verifier
from crv.verifier.config import VerifierConfig
from crv.verifier.methods import save_method

TRACE = {"id": "t", "prompt": PROMPT, "steps": STEPS}


def verifier_for(path: Path) -> StepVerifier:
    return StepVerifier(load_bundle(path), VerifyConfig(bundle=str(path)))


def user_trace(v: StepVerifier):
    import json

    return parse_trace(json.dumps(TRACE).encode(), 1, v.bundle.step_pattern)


def baselines_of(v: StepVerifier, cfg: BaselinesConfig):
    """The baselines stage's result for the user's trace, as a one-trace traces dataset
    whose steps are labelled (so that the temperature is fitted on them)."""
    from datasets import Dataset

    enc = v.encode(user_trace(v))
    steps = [
        {"index": i, "text": s, "label": i != 1, "parsed": True, "last_token": t}
        for i, (s, t) in enumerate(zip(STEPS, enc.last_tokens, strict=True))
    ]
    traces = Dataset.from_list(
        [
            {
                "id": "t",
                "task": "arithmetic",
                "complexity": 3,
                "split": "train",
                "prompt_len": enc.prompt_len,
                "input_ids": enc.input_ids,
                "steps": steps,
            }
        ]
    )
    return baseline_table(v.bundle.model, traces, cfg)


def export(root: Path, parts: dict[str, Path], method_dir: Path, baselines: dict | None) -> Path:
    out = root / "bundle"
    export_bundle(
        out,
        BundleConfig(),
        subject_dir=parts["subject_dir"],
        transcoders_dir=parts["transcoders_dir"],
        method_dir=method_dir,
        threshold=0.5,
        graphs=dataclasses.asdict(ATTRIBUTION),
        features=dataclasses.asdict(FEATURES),
        n_layers=N_LAYERS,
        seed=0,
        baselines=baselines,
    )
    return out


@pytest.mark.parametrize("column", ["perplexity", "temperature", "maxprob"])
def test_a_confidence_method_scores_as_the_baselines_stage(
    tmp_path: Path, tiny_bundle: Path, bundle_parts: dict[str, Path], column: str
) -> None:
    """crv-verify's score of each step of a user's trace is the baselines stage's number for
    the same trace (temperature: at the temperature that stage fitted), to float precision."""
    cfg = BaselinesConfig(temperature_grid=[0.5, 1.0, 2.0, 4.0])
    result = baselines_of(verifier_for(tiny_bundle), cfg)
    t_star = result.meta["temperature"]
    (tmp_path / "m").mkdir()
    method = fixed_method(tmp_path / "m", column, t_star)
    v = verifier_for(export(tmp_path, bundle_parts, method, baselines_section(cfg, t_star)))
    scores = [s["score"] for s in v.verify(user_trace(v))]
    np.testing.assert_allclose(scores, result.table[column].to_numpy(), rtol=1e-6)
    assert len(set(scores)) == len(scores)  # per-step numbers, not one value repeated
    enc = v.encode(user_trace(v))
    inputs = v.step_inputs(enc.input_ids, enc.prompt_len, enc.last_tokens)
    columns = list(result.meta["score_columns"])
    np.testing.assert_allclose(
        inputs.scores[columns].to_numpy(), result.table[columns].to_numpy(), rtol=1e-6
    )
    np.testing.assert_array_equal(inputs.hidden.hidden, result.hidden)


def test_crv_plus_confidence_reads_graph_features_then_confidence(
    tmp_path: Path, tiny_bundle: Path, bundle_parts: dict[str, Path]
) -> None:
    """An xgboost method on graph features + confidence gets both: its score is the model's
    on the step's graph features next to the baselines stage's columns."""
    from crv.features.compute import feature_names

    cfg = BaselinesConfig(temperature_grid=[0.5, 1.0, 2.0])
    result = baselines_of(verifier_for(tiny_bundle), cfg)
    graph_names, conf = feature_names(N_LAYERS), ["maxprob", "energy"]
    rng = np.random.default_rng(0)
    x = np.c_[rng.uniform(0, 100, (300, len(graph_names))), rng.random((300, 2)) * 3 - [0, 3]]
    y = (x[:, -2] > 0.6).astype(int)  # the label follows maxprob only
    xgb = XGBVerifier(VerifierConfig(n_estimators=20, runtime_n_threads=1), [*graph_names, *conf])
    xgb.fit(x, y, np.arange(len(y)))
    method = tmp_path / "m"
    save_method(method, "crv+confidence", {"features": graph_names, "scores": conf}, xgb, 1.0)
    section = baselines_section(cfg, result.meta["temperature"])
    v = verifier_for(export(tmp_path, bundle_parts, method, section))
    trace = user_trace(v)
    graphs = v.graphs(trace, v.encode(trace))
    expected = xgb.predict_proba(np.c_[v.feature_frame(graphs).to_numpy(), result.table[conf]])
    scores = [s["score"] for s in v.verify(trace)]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_a_confidence_method_needs_the_baselines_settings(
    tmp_path: Path, bundle_parts: dict[str, Path]
) -> None:
    (tmp_path / "m").mkdir()
    method = fixed_method(tmp_path / "m", "maxprob")
    with pytest.raises(BundleError, match="reads the baselines' scores"):
        export(tmp_path, bundle_parts, method, None)


def test_a_format_1_bundle_loads_and_scores_as_before(
    tmp_path: Path, tiny_bundle: Path, bundle_parts: dict[str, Path]
) -> None:
    """A bundle written before the shipped method was recorded (format 1: the verifier
    entry has only dir, threshold and feature names) is the `crv` bundle it always was."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    (old / "verifier" / "spec.json").unlink()  # format 1 had none
    manifest = read_json(old / MANIFEST_FILE)
    entry = manifest["verifier"]
    manifest["verifier"] = {k: entry[k] for k in ("dir", "threshold", "feature_names")}
    manifest["format_version"] = 1
    del manifest["baselines"]
    atomic_write_json(old / MANIFEST_FILE, manifest)
    v_old, v_new = verifier_for(old), verifier_for(tiny_bundle)
    assert (v_old.bundle.method.name, v_old.bundle.method.kind) == ("crv", "xgboost")
    assert v_old.bundle.baselines is None and v_old.threshold == v_new.threshold
    trace = user_trace(v_old)
    old_scores = [s["score"] for s in v_old.verify(trace)]
    graphs = v_new.graphs(trace, v_new.encode(trace))
    direct = load_verifier(bundle_parts["verifier_dir"]).predict_proba(v_new.feature_frame(graphs))
    np.testing.assert_allclose(old_scores, direct, rtol=1e-7)
    assert old_scores == [s["score"] for s in v_new.verify(trace)]
