"""The composed configuration: choices and ranges rejected before any stage runs, cache
keys that do not move when only the config's Python types change, and the deprecated
names of the previous release."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import composed
from hydra import compose, initialize_config_dir

from crv.cli.main import rewrite_deprecated
from crv.config import CRVConfig, register_configs
from crv.graphs.config import GraphsConfig, Position
from crv.interventions.config import InterventionsConfig, RankBy
from crv.pipeline import STAGES, artifact_key, artifact_keys
from crv.subject.config import SubjectConfig
from crv.transcoders.config import TranscodersConfig
from crv.verifier.config import VerifierConfig

ROOT = Path(__file__).resolve().parents[1]
KEYS_FILE = Path(__file__).parent / "golden" / "artifact_keys.json"
PRESETS = {"default": [], "smoke": ["experiment=smoke"], "quick": ["experiment=quick"]}


def stage_keys(cfg: CRVConfig) -> dict[str, str]:
    return artifact_keys(cfg, cfg.seed)


def test_artifact_keys_of_the_presets_are_pinned():
    """Cache keys of every stage for the default and smoke presets, as recorded before the
    config fields became enums: a change that moves them recomputes every user's cache.
    After an intended config change: `CRV_UPDATE_GOLDEN=1 pytest tests/test_config.py`."""
    got = {name: stage_keys(composed(overrides)) for name, overrides in PRESETS.items()}
    if os.environ.get("CRV_UPDATE_GOLDEN") == "1":
        KEYS_FILE.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"wrote {KEYS_FILE}")
    assert got == json.loads(KEYS_FILE.read_text())


RUNTIME_OVERRIDES = [
    "transcoders.runtime_log_every=10",
    "transcoders.runtime_cache_dir=/elsewhere",
    "traces.runtime_batch_size=3",
    "cards.runtime_batch_seqs=5",
    "graphs.runtime_row_cache_mb=1",
    "verifier.runtime_n_threads=7",
    "pipeline.cache_dir=/other/cache",
    "device=cpu",
]


def test_fields_that_change_only_speed_or_memory_keep_every_artifact_key():
    """Every `runtime_*` field (and the pipeline's cache directory and device) may change
    between runs that share a cache; a field that changes what is computed moves keys."""
    base = stage_keys(composed(["experiment=smoke"]))
    assert stage_keys(composed(["experiment=smoke", *RUNTIME_OVERRIDES])) == base
    moved = stage_keys(composed(["experiment=smoke", "transcoders.model_batch_seqs=3"]))
    assert moved["traces"] == base["traces"] and moved["transcoders"] != base["transcoders"]
    fields = {
        f"{stage.name}.{f.name}"
        for stage in STAGES
        for f in dataclasses.fields(type(getattr(CRVConfig(), stage.name)))
        if f.name.startswith("runtime_")
    }
    assert fields == {o.split("=")[0] for o in RUNTIME_OVERRIDES if o.count(".") == 1} - {
        "pipeline.cache_dir"
    }


def test_composed_choices_are_enum_members_and_keys_use_their_values():
    cfg = composed(["graphs.position=after", "interventions.rank_by=layer"])
    assert cfg.graphs.position is Position.after
    assert cfg.interventions.rank_by is RankBy.layer
    assert GraphsConfig(position="after").position is Position.after  # built in Python
    plain = dataclasses.replace(cfg.graphs)
    plain.position = "after"  # a str, as before the field was an enum
    graphs = next(s for s in STAGES if s.name == "graphs")
    assert artifact_key(graphs, cfg.graphs, 0, {}) == artifact_key(graphs, plain, 0, {})


@pytest.mark.parametrize(
    "override",
    [
        "graphs.position=middle",
        "transcoders.activation=relu",
        "transcoders.cache_dtype=fp8",
        "subject.source=pip",
        "subject.dtype=int8",
        "verifier.threshold_rule=best",
        "interventions.rank_by=random",
        "interventions.action=flip",
        "interventions.scope=all",
        "interventions.verifier=mine",
        "bundle.embed_subject=sometimes",
    ],
)
def test_a_bad_choice_fails_when_the_config_is_composed(override: str):
    register_configs()
    field = override.split("=")[0].split(".")[-1]
    with (
        initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"),
        pytest.raises(Exception, match=field) as info,
    ):
        compose(config_name="config", overrides=[override])
    assert override.split("=")[1] in str(info.value.__cause__ or info.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GraphsConfig(position="middle"), "graphs.position must be one of after"),
        (lambda: GraphsConfig(node_threshold=1.5), "node_threshold"),
        (lambda: GraphsConfig(logit_cum_prob=0), "logit_cum_prob"),
        (lambda: GraphsConfig(max_feature_nodes=0), "graphs.max_feature_nodes must be >= 1"),
        (lambda: TranscodersConfig(k=0), "transcoders.k must be > 0"),
        (lambda: TranscodersConfig(lr_decay_frac=2), "lr_decay_frac"),
        (lambda: TranscodersConfig(n_latents=8, k=16), "exceeds n_latents"),
        (lambda: VerifierConfig(subsample=0), "verifier.subsample"),
        (lambda: VerifierConfig(val_frac=1), "verifier.val_frac"),
        (lambda: InterventionsConfig(n_proposals=0), "interventions.n_proposals must be >= 1"),
        (lambda: InterventionsConfig(amplify_scale=-1), "amplify_scale"),
        (lambda: SubjectConfig(dtype="int8"), "subject.dtype must be one of"),
    ],
)
def test_bad_values_name_section_and_field(make, message: str):
    with pytest.raises(ValueError, match=message):
        make()


def test_crv_rejects_a_bad_range_before_any_stage_runs(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", "from crv.cli.main import main; main()", "graphs.node_threshold=2",
         f"hydra.run.dir={tmp_path}/run", f"pipeline.cache_dir={tmp_path}/cache"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "crv: error: graphs.node_threshold and edge_threshold must lie in (0, 1]"
    )
    assert not (tmp_path / "cache").exists()


def test_deprecated_names_are_rewritten_with_a_warning(capsys: pytest.CaptureFixture[str]):
    argv = [
        "model=smollm2_135m",
        "transcoder.k=8",
        "+attribution.max_traces=3",
        "intervention.rank_by=layer",
        "transcoders.expansion=4",
        "hydra.run.dir=x",
        "--cfg",
        "modelling=1",
    ]
    assert rewrite_deprecated(argv) == [
        "subject=smollm2_135m",
        "transcoders.k=8",
        "+graphs.max_traces=3",
        "interventions.rank_by=layer",
        "transcoders.expansion=4",
        "hydra.run.dir=x",
        "--cfg",
        "modelling=1",
    ]
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 4
    assert warnings[1] == "crv: warning: 'transcoder.k=8' is deprecated, use 'transcoders.k=8'"


def test_deprecated_names_compose_on_the_command_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", "from crv.cli.main import main; main()", "--cfg", "job",
         "model=smollm2_135m", "transcoder.k=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = proc.stdout
    assert "name: SmolLM2-135M-Instruct" in job and "  k: 8" in job
    assert "deprecated, use 'subject=smollm2_135m'" in proc.stderr


def test_crv_verify_rejects_a_bad_choice_with_exit_two(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "from crv.cli.main import verify_main; verify_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "bundle=nowhere", "rank_by=bogus"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "rank_by" in proc.stderr and "bogus" in proc.stderr


@pytest.mark.parametrize(
    "bad", ["runtime.executor=dask", "runtime.workers=0", "runtime.gpus_per_worker=-1"]
)
def test_bad_runtime_settings_fail_when_composed(bad: str):
    with pytest.raises(Exception, match=bad.split("=")[0].replace(".", r"\.")):
        composed([bad])


def test_runtime_settings_are_not_part_of_any_cache_key():
    base = composed(["experiment=smoke"])
    ray = composed(
        [
            "experiment=smoke",
            "runtime.executor=ray",
            "runtime.workers=8",
            "runtime.gpus_per_worker=0.5",
            "runtime.threads_per_worker=4",
            "runtime.ray_address=ray://head:10001",
        ]
    )
    assert ray.runtime != base.runtime
    assert artifact_keys(ray, 0) == artifact_keys(base, 0)
    changed = composed(["experiment=smoke", "graphs.max_traces=3"])
    assert artifact_keys(changed, 0)["graphs"] != artifact_keys(base, 0)["graphs"]
