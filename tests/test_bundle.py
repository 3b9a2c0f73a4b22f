"""Bundle export and loading: manifest contents, self-containment, refusal of a wrong model."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
from fixtures_bundle import (
    ATTRIBUTION,
    FEATURES,
    N_LAYERS,
    make_bundle,
    write_stage_inputs,
    write_subject,
)

from crv.bundle import (
    MANIFEST_FILE,
    BundleConfig,
    BundleError,
    BundleMismatchError,
    config_hash,
    load_bundle,
    read_manifest,
    run_stage,
)
from crv.features.compute import feature_names
from crv.io import atomic_write_json, read_json
from crv.pipeline import StageContext
from crv.verifier.classifier import load_verifier


def test_manifest_records_everything(tiny_bundle: Path, bundle_parts: dict[str, Path]) -> None:
    manifest = read_json(tiny_bundle / MANIFEST_FILE)
    verifier = load_verifier(bundle_parts["verifier_dir"])
    subject = manifest["subject"]
    assert subject["embedded"] and (tiny_bundle / subject["dir"] / "config.json").is_file()
    assert subject["source"] == {"name": "test-tiny"}
    assert subject["config_hash"] == config_hash(bundle_parts["subject_dir"])
    assert (subject["n_layers"], subject["d_model"], subject["family"]) == (N_LAYERS, 32, "llama")
    assert manifest["verifier"]["threshold"] == verifier.threshold
    assert manifest["verifier"]["feature_names"] == feature_names(N_LAYERS)
    assert manifest["step_pattern"] == BundleConfig().step_pattern
    assert {"crv", "torch", "transformers", "xgboost"} <= set(manifest["versions"])
    assert (tiny_bundle / "verifier" / "model.json").is_file()
    assert (tiny_bundle / "transcoders" / "config.yaml").is_file()


def test_load_restores_settings_and_is_self_contained(tiny_bundle: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(tiny_bundle, moved)  # nothing outside the directory is needed
    bundle = load_bundle(moved)
    assert bundle.graphs == ATTRIBUTION
    assert bundle.features == FEATURES
    assert bundle.transcoders.layers == list(range(N_LAYERS))
    assert bundle.adapter.n_layers == N_LAYERS
    assert bundle.max_context == 96
    assert bundle.method.model.feature_names == bundle.feature_names
    assert (bundle.method.name, bundle.method.kind, bundle.baselines) == ("crv", "xgboost", None)


def test_config_hash_ignores_resaving_but_not_changes(
    tmp_path: Path, bundle_parts: dict[str, Path]
) -> None:
    src = bundle_parts["subject_dir"]
    config = read_json(src / "config.json")
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    atomic_write_json(resaved / "config.json", {**config, "transformers_version": "0.0.1"})
    assert config_hash(resaved) == config_hash(src)
    atomic_write_json(resaved / "config.json", {**config, "rope_theta": 1234.0})
    assert config_hash(resaved) != config_hash(src)


@pytest.mark.parametrize(
    ("field", "shape"),
    [
        ("n_layers", {"num_hidden_layers": 3}),
        ("d_model", {"hidden_size": 48}),
        ("vocab_size", {"vocab_size": 40}),
        ("config_hash", {"rms_norm_eps": 1e-3}),
    ],
)
def test_mismatched_model_is_refused_naming_the_field(
    tiny_bundle: Path, tmp_path: Path, field: str, shape: dict
) -> None:
    other = write_subject(tmp_path / "other", **shape)
    with pytest.raises(BundleMismatchError, match=field) as info:
        load_bundle(tiny_bundle, model=other)
    assert info.value.field == field


def test_other_tokenizer_is_refused(
    tiny_bundle: Path, bundle_parts: dict[str, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(bundle_parts["subject_dir"], other)
    tokenizer = read_json(other / "tokenizer.json")
    vocab = tokenizer["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]  # same size, different token ids
    atomic_write_json(other / "tokenizer.json", tokenizer)
    with pytest.raises(BundleMismatchError, match="tokenizer_hash"):
        load_bundle(tiny_bundle, model=other)


def test_same_model_elsewhere_is_accepted(tiny_bundle: Path, bundle_parts: dict[str, Path]) -> None:
    assert load_bundle(tiny_bundle, model=bundle_parts["subject_dir"]).adapter.d_model == 32


def test_large_subject_is_referenced_not_copied(
    tmp_path: Path, bundle_parts: dict[str, Path]
) -> None:
    parts = {**bundle_parts, "subject_dir": tmp_path / "subject"}
    shutil.copytree(bundle_parts["subject_dir"], parts["subject_dir"])
    out = make_bundle(tmp_path, parts, embed_subject="never")
    assert not (out / "subject").exists()
    assert read_manifest(out)["subject"]["path"] == str(parts["subject_dir"].resolve())
    assert load_bundle(out).adapter.n_layers == N_LAYERS
    shutil.rmtree(parts["subject_dir"])
    with pytest.raises(BundleError, match="model=DIR"):
        load_bundle(out)


def test_a_version_1_bundle_still_loads(tiny_bundle: Path, tmp_path: Path) -> None:
    """Version 1 called the graphs settings `attribution`; such a bundle reads as before."""
    old = tmp_path / "v1"
    shutil.copytree(tiny_bundle, old)
    manifest = read_json(old / MANIFEST_FILE)
    assert manifest["format_version"] == 2 and "attribution" not in manifest
    manifest["attribution"] = manifest.pop("graphs")
    atomic_write_json(old / MANIFEST_FILE, {**manifest, "format_version": 1})
    assert load_bundle(old).graphs == ATTRIBUTION
    atomic_write_json(old / MANIFEST_FILE, {**manifest, "format_version": 2})
    with pytest.raises(BundleError, match="lacks graphs"):  # only version 1 may say so
        load_bundle(old)


def test_not_a_bundle_newer_format_and_incomplete_manifest_are_refused(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path)
    newer = tmp_path / "newer"
    shutil.copytree(tiny_bundle, newer)
    manifest = read_json(newer / MANIFEST_FILE)
    atomic_write_json(newer / MANIFEST_FILE, {**manifest, "format_version": 99})
    with pytest.raises(BundleError, match="upgrade crv"):
        load_bundle(newer)
    del manifest["verifier"], manifest["subject"]["config_hash"]
    atomic_write_json(newer / MANIFEST_FILE, manifest)
    with pytest.raises(BundleError, match="lacks verifier, subject.config_hash"):
        load_bundle(newer)


def test_export_refuses_to_overwrite(tiny_bundle: Path, bundle_parts: dict[str, Path]) -> None:
    with pytest.raises(BundleError, match="already holds a bundle"):
        make_bundle(tiny_bundle.parent, bundle_parts)


def stage_context(
    inputs: dict[str, Path], out: Path, seed: int = 7, cfg: BundleConfig | None = None
) -> StageContext:
    return StageContext(
        "bundle", cfg or BundleConfig(), inputs, out, out.parent / "scratch", seed, "cpu",
        logging.getLogger("test"),
    )  # fmt: skip


def test_run_stage_reads_the_settings_of_its_inputs(
    tmp_path: Path, bundle_parts: dict[str, Path]
) -> None:
    """The stage takes attribution, feature, subject and baseline settings from its inputs'
    manifests."""
    inputs = write_stage_inputs(tmp_path, bundle_parts, "crv")
    out = tmp_path / "out"
    metrics = run_stage(stage_context(inputs, out))
    manifest = read_manifest(out)
    assert metrics["subject_embedded"]
    assert metrics["n_features"] == len(manifest["verifier"]["feature_names"])
    assert manifest["subject"]["source"] == {"name": "crv-tiny"}
    assert manifest["graphs"] == dataclasses.asdict(ATTRIBUTION)
    assert manifest["features"] == {
        "config": dataclasses.asdict(FEATURES),
        "n_layers": N_LAYERS,
        "seed": 7,
    }
    assert not (out / "subject" / "manifest.json").exists()  # the pipeline's file is not copied


@pytest.mark.parametrize("selected", ["crv", "perplexity"])
def test_run_stage_ships_the_method_selected_on_validation(
    tmp_path: Path, bundle_parts: dict[str, Path], selected: str
) -> None:
    """The bundle ships the verifier's `all` selection with its threshold; a method that
    reads baseline scores comes with the baselines' settings and temperature."""
    inputs = write_stage_inputs(tmp_path, bundle_parts, selected)
    out = tmp_path / "out"
    metrics = run_stage(stage_context(inputs, out))
    manifest = read_manifest(out)
    entry = manifest["verifier"]
    assert metrics["method"] == entry["method"] == selected and entry["threshold"] == 0.25
    bundle = load_bundle(out)
    assert bundle.method.name == selected and bundle.threshold == 0.25
    if selected == "perplexity":
        assert entry["needs"] == ["scores"] and entry["kind"] == "fixed"
        meta = read_json(inputs["baselines"] / "baselines.json")
        assert bundle.temperature == meta["temperature"] and bundle.baselines is not None
    else:
        assert entry["needs"] == ["features"] and bundle.baselines is None
        assert entry["feature_names"] == feature_names(N_LAYERS)


def test_bundle_method_ships_a_named_method_with_its_own_threshold(
    tmp_path: Path, bundle_parts: dict[str, Path]
) -> None:
    """`bundle.method=perplexity` ships that saved method (not the validation winner `crv`)
    with the threshold chosen for it; an unknown name is one line listing the saved ones."""
    inputs = write_stage_inputs(tmp_path, bundle_parts, "crv")
    out = tmp_path / "out"
    run_stage(stage_context(inputs, out, cfg=BundleConfig(method="perplexity")))
    entry = read_manifest(out)["verifier"]
    assert entry["method"] == "perplexity" and entry["threshold"] == 0.5  # its spec's, not 0.25
    assert load_bundle(out).method.name == "perplexity"
    with pytest.raises(BundleError, match="saved: crv, perplexity"):
        run_stage(stage_context(inputs, tmp_path / "out2", cfg=BundleConfig(method="crv+x")))


def test_run_stage_refuses_an_input_without_manifest(
    tmp_path: Path, bundle_parts: dict[str, Path]
) -> None:
    """A missing input manifest is an error naming the directory, never default settings."""
    from crv.pipeline import MissingArtifactError

    inputs = write_stage_inputs(tmp_path / "in", bundle_parts, "crv")
    shutil.rmtree(inputs["graphs"])
    with pytest.raises(MissingArtifactError, match=f"{inputs['graphs']} is not a complete"):
        run_stage(stage_context(inputs, tmp_path / "out"))


def test_load_subject_with_transcoders(tmp_path: Path, bundle_parts: dict[str, Path]) -> None:
    from crv.transcoders.io import load_subject_with_transcoders

    loaded = load_subject_with_transcoders(
        bundle_parts["subject_dir"], bundle_parts["transcoders_dir"]
    )
    assert loaded.adapter.model is loaded.model and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.transcoders.layers == list(range(N_LAYERS))
    wider = write_subject(tmp_path / "wider", hidden_size=48)
    with pytest.raises(ValueError, match="d_model"):
        load_subject_with_transcoders(wider, bundle_parts["transcoders_dir"])
    seen = []
    with pytest.raises(FileNotFoundError):  # the check ran first, then the missing set failed
        load_subject_with_transcoders(
            wider, tmp_path / "none", check_subject=lambda a, t: seen.append(a.d_model)
        )
    assert seen == [48]
