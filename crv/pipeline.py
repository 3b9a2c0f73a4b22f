"""The stage graph and its artifact cache.

Each stage is a pure function of (its config section, the artifacts it reads) to one artifact
directory. The cache key of an artifact hashes the stage's resolved config section, the
global seed and the keys of its inputs, so changing `transcoders.k` recomputes transcoders
and everything downstream of them, nothing upstream.

Writes are crash-safe: a stage writes into `<stage>/<key>.tmp-<pid>/` and the directory is
renamed to `<stage>/<key>/` only after `run_stage` returned and the manifest was written, so
a killed run never leaves an artifact that a later run would trust. Work a stage wants to
keep across a crash (per-trace shards) goes to `<stage>/<key>.scratch/`, which survives
until the artifact is complete and is then deleted.

Runs may share one cache (sweep jobs, several users): a run that needs a missing artifact
takes an exclusive lock on `.locks/<stage>-<key>` (flock, released by the kernel if the
process dies) before computing it. A second run that needs the same artifact waits for the
lock and then reuses what the first one committed, so an artifact is computed once, and no
run ever reads a half-written one (they are renamed into place complete).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Generic, TypeVar

from crv.errors import CRVError
from crv.io import atomic_write_json, read_json
from crv.runtime import RuntimeConfig

log = logging.getLogger("crv.pipeline")

MANIFEST = "manifest.json"
METRICS = "metrics.json"
PIPELINE_FILES = frozenset({MANIFEST, METRICS})
"""Files the pipeline adds to every artifact, next to what the stage wrote."""


SectionT = TypeVar("SectionT")


@dataclass
class StageContext(Generic[SectionT]):
    """Everything a stage's `run_stage(ctx) -> dict` may use; see docs/architecture.md.

    `StageContext[GraphsConfig]` is the context of a stage whose section is a GraphsConfig.
    """

    name: str
    cfg: SectionT
    """The stage's own config section."""
    inputs: dict[str, Path]
    """Artifact directory of every stage it depends on; read them with their loaders."""
    out: Path
    scratch: Path
    seed: int
    device: str
    log: logging.Logger
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """How per-trace work runs (`crv.executor`); not part of the cache key."""


@dataclass(frozen=True)
class Stage:
    """A node of the stage graph.

    One name everywhere: the stage's package (`crv/<name>/`), its config section, its
    report.json key and its cache folder. `runner` is "module:function" so that importing
    the pipeline does not import every stage's heavy dependencies.
    """

    name: str
    deps: tuple[str, ...]
    runner: str
    fingerprint: str = ""
    """Optional "module:function" of the section: what else, besides the config, decides
    the artifact (a shipped checkpoint's content hash), so that a new one is not reused."""
    title: str = ""
    """The heading of the stage's report.md section."""
    renderer: str = ""
    """Optional "module:function" turning the stage's report.json entry into its report.md
    section (Markdown); a stage without one has no section."""

    def load_runner(self) -> Callable[[StageContext], dict]:
        return _load(self.runner)

    def load_renderer(self) -> Callable[[dict[str, Any]], str]:
        return _load(self.renderer)

    def data_fingerprint(self, section_cfg: Any) -> str:
        if not self.fingerprint:
            return ""
        return str(_load(self.fingerprint)(section_cfg))


def _load(target: str) -> Callable[..., Any]:
    """The function a "module:function" string names, imported now."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


STAGES: tuple[Stage, ...] = (
    Stage("subject", (), "crv.subject.stage:run_stage", "crv.subject.stage:shipped_fingerprint"),
    Stage(
        "traces",
        ("subject",),
        "crv.traces.stage:run_stage",
        title="Traces",
        renderer="crv.traces.stage:traces_markdown",
    ),
    Stage(
        "transcoders",
        ("subject", "traces"),
        "crv.transcoders.stage:run_stage",
        title="Transcoders",
        renderer="crv.transcoders.stage:transcoders_markdown",
    ),
    Stage(
        "cards",
        ("subject", "traces", "transcoders"),
        "crv.cards.stage:run_stage",
        title="Feature cards",
        renderer="crv.cards.stage:cards_markdown",
    ),
    Stage(
        "graphs",
        ("subject", "traces", "transcoders"),
        "crv.graphs.stage:run_stage",
        title="Attribution graphs",
        renderer="crv.graphs.stage:graphs_markdown",
    ),
    Stage("features", ("traces", "graphs"), "crv.features.stage:run_stage"),
    Stage("baselines", ("subject", "traces", "transcoders"), "crv.baselines.stage:run_stage"),
    Stage(
        "verifier",
        ("traces", "features", "baselines"),
        "crv.verifier.stage:run_stage",
        title="Error detection",
        renderer="crv.verifier.metrics:detection_markdown",
    ),
    Stage(
        "mechanisms",
        ("traces", "graphs", "cards"),
        "crv.mechanisms.stage:run_stage",
        title="Error mechanisms",
        renderer="crv.mechanisms.render:mechanisms_markdown",
    ),
    Stage(
        "interventions",
        ("subject", "traces", "transcoders", "graphs", "features", "verifier"),
        "crv.interventions.stage:run_stage",
        title="Interventions",
        renderer="crv.interventions.measure:interventions_markdown",
    ),
    Stage(
        "bundle",
        ("subject", "transcoders", "cards", "graphs", "features", "baselines", "verifier"),
        "crv.bundle:run_stage",
    ),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def stage_closure(requested: Iterable[str], stages: tuple[Stage, ...] = STAGES) -> list[Stage]:
    """The requested stages and everything they depend on, in pipeline order."""
    by_name = {s.name: s for s in stages}
    wanted: set[str] = set()

    def visit(name: str) -> None:
        if name not in by_name:
            raise ValueError(f"unknown stage {name!r} in pipeline.stages; known: {list(by_name)}")
        if name not in wanted:
            wanted.add(name)
            for dep in by_name[name].deps:
                visit(dep)

    for name in requested:
        visit(name)
    return [s for s in stages if s.name in wanted]


def _plain(obj: Any) -> Any:
    """A JSON-able view of a config section (dataclass, DictConfig or plain value); an
    enum member becomes its value, so typing a field as a choice keeps the cache keys."""
    if isinstance(obj, Enum):
        return obj.value
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def artifact_key(stage: Stage, section_cfg: Any, seed: int, input_keys: dict[str, str]) -> str:
    """Hash of what determines the artifact: config section, seed, and input keys.

    Fields whose name starts with `runtime_` (batch sizes for memory, progress options)
    would not change the result and are left out of the key. The stage's data fingerprint,
    where it has one, is in it.
    """
    cfg = {k: v for k, v in _plain(section_cfg).items() if not k.startswith("runtime_")}
    what = {"stage": stage.name, "cfg": cfg, "seed": seed, "inputs": input_keys}
    data = stage.data_fingerprint(section_cfg)
    if data:
        what["data"] = data
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def artifact_keys(cfg: Any, seed: int, stages: tuple[Stage, ...] = STAGES) -> dict[str, str]:
    """Every stage's cache key for a config (`cfg.<stage>` is each section), as
    `run_pipeline` computes them: where a run of that config finds its artifacts."""
    keys: dict[str, str] = {}
    for stage in stages:
        inputs = {dep: keys[dep] for dep in stage.deps}
        keys[stage.name] = artifact_key(stage, getattr(cfg, stage.name), seed, inputs)
    return keys


class MissingArtifactError(CRVError, FileNotFoundError):
    """An artifact directory without its manifest: not a complete artifact of any stage."""


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """The manifest of a complete artifact (stage, key, config, seed, inputs, versions).

    MissingArtifactError naming the directory when it has none: a stage never falls back
    to defaults for an input it cannot read.
    """
    file = Path(artifact_dir) / MANIFEST
    if not file.is_file():
        raise MissingArtifactError(
            f"{artifact_dir} is not a complete artifact: it has no {MANIFEST}"
        )
    return read_json(file)


def artifact_config(artifact_dir: str | Path) -> dict[str, Any]:
    """The config section an artifact was made with, as plain JSON values."""
    return dict(read_manifest(artifact_dir)["config"])


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    # xgboost's CPU-only build is the distribution xgboost-cpu (pyproject.toml)
    names = {"xgboost": ("xgboost", "xgboost-cpu")}
    for pkg in ("crv", "torch", "transformers", "xgboost", "networkx", "datasets"):
        for dist in names.get(pkg, (pkg,)):
            try:
                out[pkg] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so a stage is reproducible from its config alone."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb() -> float:
    """Peak resident memory of this process and its finished children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


@dataclass
class StageResult:
    name: str
    key: str
    path: Path
    reused: bool
    seconds: float
    metrics: dict = field(default_factory=dict)


SMALL_FILE_BYTES = 1 << 20
"""Files up to this size are always hashed when an artifact is reused (metrics, configs)."""


class CacheDamageError(CRVError):
    """A cached artifact's files do not match its manifest (and `on_damage=fail`)."""


def artifact_files(directory: Path) -> list[str]:
    """Every file under `directory` except its manifest, as sorted relative paths."""
    rels = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(rel for rel in rels if rel != MANIFEST)


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> size and blake2b of every file of an artifact (its manifest's list)."""
    return {
        rel: {"size": (directory / rel).stat().st_size, "blake2b": file_digest(directory / rel)}
        for rel in artifact_files(directory)
    }


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def damage(directory: Path, hash_all: bool) -> str | None:
    """What is wrong with a committed artifact, or None when it matches its manifest.

    Checks that every listed file exists with its recorded size, that no file was added,
    and the content hash of small files (of every file when `hash_all`).
    """
    manifest_file = directory / MANIFEST
    try:
        listed = read_json(manifest_file)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest_file} is unreadable or lists no files"
    for rel, entry in listed.items():
        path = directory / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path} has {size} bytes, the manifest says {entry['size']}"
        if (hash_all or size <= SMALL_FILE_BYTES) and file_digest(path) != entry["blake2b"]:
            return f"{path} does not match its content hash"
    extra = sorted(set(artifact_files(directory)) - set(listed))
    return f"{directory / extra[0]} is not in the manifest" if extra else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactCache:
    """Directory layout `<root>/<stage>/<key>/` with a manifest per artifact.

    The manifest lists every file of the artifact with its size and blake2b hash. Reuse
    checks the list, the sizes and the hashes of small files (all hashes with
    `verify=True`); a damaged artifact is never used: it is recomputed, or, with
    `on_damage="fail"`, the run stops with a `CacheDamageError` naming the file.
    """

    def __init__(
        self, root: str | Path, verify: bool = False, on_damage: str = "recompute"
    ) -> None:
        self.root = Path(root).resolve()
        self.verify = verify
        self.on_damage = on_damage

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_complete(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MANIFEST).is_file()

    def clean_stale(self) -> list[Path]:
        """Remove `<key>.tmp-<pid>` folders of dead processes, and scratch folders whose
        artifact is complete. Scratch of an unfinished artifact is kept: it is what a
        rerun resumes from. Returns what was removed."""
        removed = []
        for tmp in self.root.glob("*/*.tmp-*"):
            pid = tmp.name.rsplit(".tmp-", 1)[1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        for scratch in self.root.glob("*/*.scratch"):
            if (scratch.with_suffix("") / MANIFEST).is_file():
                shutil.rmtree(scratch, ignore_errors=True)
                removed.append(scratch)
        return removed

    @contextmanager
    def _lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold the exclusive lock of artifact `stage/key`, waiting while another run has it."""
        import fcntl

        path = self.root / ".locks" / f"{stage}-{key}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("stage %s: waiting for another run computing %s", stage, key)
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _reusable(self, stage: str, key: str) -> bool:
        final = self.path(stage, key)
        if not self.is_complete(stage, key):
            return False
        problem = damage(final, self.verify)
        if problem is None:
            return True
        message = f"cached artifact {stage}/{key} is damaged: {problem}"
        if self.on_damage == "fail":
            raise CacheDamageError(message + " (pipeline.on_damage=fail)")
        log.warning("%s; recomputing it", message)
        aside = final.with_name(f"{key}.damaged-{os.getpid()}")
        os.replace(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
        return False

    def run(
        self,
        stage: Stage,
        key: str,
        make_ctx: Callable[[Path, Path], StageContext],
        manifest: dict,
    ) -> StageResult:
        """Reuse the artifact under `key`, or run the stage and commit it atomically."""
        reused = self._reuse(stage.name, key)
        if reused is not None:
            return reused
        with self._lock(stage.name, key):  # a run we waited for may have committed it
            return self._reuse(stage.name, key) or self._compute(stage, key, make_ctx, manifest)

    def _reuse(self, stage: str, key: str) -> StageResult | None:
        """The complete, undamaged artifact `stage/key` as a reused result, else None."""
        if not self._reusable(stage, key):
            return None
        final = self.path(stage, key)
        return StageResult(stage, key, final, True, 0.0, read_json(final / METRICS))

    def _compute(
        self,
        stage: Stage,
        key: str,
        make_ctx: Callable[[Path, Path], StageContext],
        manifest: dict,
    ) -> StageResult:
        """Run the stage into `<key>.tmp-<pid>` and rename it into place when complete."""
        final = self.path(stage.name, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{key}.tmp-{os.getpid()}"
        scratch = final.parent / f"{key}.scratch"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        scratch.mkdir(exist_ok=True)
        start = time.perf_counter()
        try:
            seed_everything(manifest.get("seed", 0))
            metrics = stage.load_runner()(make_ctx(tmp, scratch)) or {}
            seconds = time.perf_counter() - start
            atomic_write_json(tmp / METRICS, metrics)
            atomic_write_json(
                tmp / MANIFEST,
                {
                    **manifest,
                    "seconds": seconds,
                    "versions": library_versions(),
                    "files": file_table(tmp),
                },
            )
            if final.exists():  # a concurrent run finished first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(scratch, ignore_errors=True)
        return StageResult(stage.name, key, final, False, seconds, metrics)


def run_pipeline(
    sections: dict[str, Any],
    requested: Iterable[str],
    cache_root: str | Path,
    seed: int,
    device: str,
    stages: tuple[Stage, ...] = STAGES,
    verify_cache: bool = False,
    on_damage: str = "recompute",
    runtime: RuntimeConfig | None = None,
) -> list[StageResult]:
    """Ensure every requested stage's artifact exists (reusing cached ones); in order.
    `runtime` says how stages run their per-trace work; no key depends on it."""
    runtime = runtime or RuntimeConfig()
    cache = ArtifactCache(cache_root, verify_cache, on_damage)
    for stale in cache.clean_stale():
        log.info("removed stale %s", stale)
    keys: dict[str, str] = {}
    paths: dict[str, Path] = {}
    results: list[StageResult] = []
    for stage in stage_closure(requested, stages):
        section_cfg = sections[stage.name]
        input_keys = {d: keys[d] for d in stage.deps}
        key = artifact_key(stage, section_cfg, seed, input_keys)
        stage_log = logging.getLogger(f"crv.{stage.name}")

        def make_ctx(
            out: Path,
            scratch: Path,
            stage: Stage = stage,
            cfg: Any = section_cfg,
            stage_log: logging.Logger = stage_log,
        ) -> StageContext:
            return StageContext(
                name=stage.name,
                cfg=cfg,
                inputs={d: paths[d] for d in stage.deps},
                out=out,
                scratch=scratch,
                seed=seed,
                device=device,
                log=stage_log,
                runtime=runtime,
            )

        manifest = {
            "stage": stage.name,
            "key": key,
            "config": _plain(section_cfg),
            "seed": seed,
            "inputs": input_keys,
        }
        if not cache.is_complete(stage.name, key):
            log.info("stage %s: running (key %s)", stage.name, key)
        result = cache.run(stage, key, make_ctx, manifest)
        if result.reused:
            log.info("stage %s: reusing cached artifact %s", stage.name, result.path)
        else:
            log.info(
                "stage %s: done in %.1f s (peak memory so far %.0f MiB) -> %s",
                stage.name,
                result.seconds,
                peak_memory_mb(),
                result.path,
            )
        keys[stage.name] = key
        paths[stage.name] = result.path
        results.append(result)
    return results
