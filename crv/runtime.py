"""Where and how a run's work executes (the `runtime` config section).

These settings change how fast an artifact is made, never what it holds, so they live in a
section of their own that no stage's cache key hashes (`crv.pipeline.artifact_key` hashes
only each stage's own section): a run on a Ray cluster reuses the artifacts of a local run
and the other way round. `crv.executor` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from crv.options import Choice, check_choices


class Executor(Choice):
    """Who runs the per-trace work of a stage (see `RuntimeConfig.executor`)."""

    local = "local"
    ray = "ray"


@dataclass
class RuntimeConfig:
    """How per-item stages (traces generation, graphs, features, baselines, interventions)
    run; never part of a cache key."""

    executor: Executor = Executor.local
    """`local`: in this process, as one shard; `ray`: shards run as Ray tasks, one model
    replica each (needs `pip install -e ".[ray]"`)."""

    workers: int = 2
    """Shards a stage's pending traces are split into with `executor=ray` (Ray tasks that
    run at the same time when the cluster has the CPUs / GPUs for them)."""

    gpus_per_worker: float = 0.0
    """GPUs each Ray task asks for (fractions share a GPU); needed for `device=cuda`."""

    threads_per_worker: int = 1
    """Torch threads of each Ray task; it also asks Ray for that many CPUs."""

    ray_address: str | None = None
    """Address of a running Ray cluster (`ray start --head` prints it, or `auto`); null
    starts a local cluster in this process."""

    def __post_init__(self) -> None:
        check_choices(self, "runtime")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ValueError("runtime.workers and runtime.threads_per_worker must be >= 1")
        if self.gpus_per_worker < 0:
            raise ValueError("runtime.gpus_per_worker must be >= 0")
