"""The whole configuration tree, assembled from each room's own config dataclass.

Each stage owns its config dataclass next to its code (sparsify style); this module only
puts them together under the section names the pipeline uses and registers the result
with Hydra's ConfigStore as the schema `crv_schema`, which `conf/config.yaml` extends.

Field docstrings (a string literal right under a field) are the help text; `crv --help`
prints them through `crv.options.options_help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crv.baselines.config import BaselinesConfig
from crv.bundle import BundleConfig
from crv.cards.config import CardsConfig
from crv.device import check_device_name
from crv.features.config import FeaturesConfig
from crv.graphs.config import GraphsConfig
from crv.interventions.config import InterventionsConfig
from crv.mechanisms.config import MechanismsConfig
from crv.options import Choice, check_names
from crv.pipeline import STAGES
from crv.runtime import RuntimeConfig
from crv.subject.config import SubjectConfig
from crv.traces.config import TracesConfig
from crv.transcoders.config import TranscodersConfig
from crv.verifier.config import VerifierConfig


class OnDamage(Choice):
    """What a damaged cached artifact leads to (see `PipelineConfig.on_damage`)."""

    recompute = "recompute"
    fail = "fail"


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: [s.name for s in STAGES])
    """Stages to run, e.g. [subject,traces]; their dependencies run (or are reused) too."""
    cache_dir: str = "outputs/cache"
    """Artifact cache shared by runs and sweeps; relative paths start at the launch directory."""
    verify_cache: bool = False
    """Hash every file of a cached artifact before reusing it (by default sizes are checked
    for every file and hashes for files up to 1 MiB)."""
    on_damage: OnDamage = OnDamage.recompute
    """What a damaged cached artifact leads to: `recompute` it (with a warning naming the
    file), or `fail` with that message."""

    def __post_init__(self) -> None:
        check_names(self.stages, [s.name for s in STAGES], "pipeline.stages")


@dataclass
class CRVConfig:
    subject: SubjectConfig = field(default_factory=SubjectConfig)
    traces: TracesConfig = field(default_factory=TracesConfig)
    transcoders: TranscodersConfig = field(default_factory=TranscodersConfig)
    cards: CardsConfig = field(default_factory=CardsConfig)
    graphs: GraphsConfig = field(default_factory=GraphsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    mechanisms: MechanismsConfig = field(default_factory=MechanismsConfig)
    interventions: InterventionsConfig = field(default_factory=InterventionsConfig)
    bundle: BundleConfig = field(default_factory=BundleConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    seed: int = 0
    """Global seed: every stage is seeded with it and it is part of every cache key."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda" or "cuda:N"."""

    def __post_init__(self) -> None:
        check_device_name(self.device, "device")


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="crv_schema", node=CRVConfig)
