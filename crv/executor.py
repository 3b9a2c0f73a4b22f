"""Runs a stage's per-item work (one trace, one generation batch) locally or on Ray.

A stage hands `run_sharded` its items, the file each item's result goes to (in the stage's
scratch directory) and a `work([(item, file), ...])` function that loads its own model
replica once and writes each item's result to its file atomically (`crv.io.atomic_write*`). The executor
skips items whose file exists (finished by an earlier, killed run), splits the rest into
`runtime.workers` round-robin shards and runs them:

- `executor=local`: `work` on every pending item in this process, one shard, as crv always did;
- `executor=ray`: one Ray task per shard (`runtime.threads_per_worker` CPUs and
  `runtime.gpus_per_worker` GPUs each, torch limited to that many threads). A worker that
  dies is retried by Ray (`max_retries`), and the retry skips the items its predecessor
  already wrote, so a death costs at most one item's work.

Results merge through the file system: the stage reads every item's file afterwards, in its
own order, exactly as it would after a local run. Nothing is shared between items (each
item's work depends only on the item, the config and the model), so a sharded run computes
the same results as a local one: bit-identical with the same torch thread count, within
float reduction order otherwise. A file is only there once its item is complete, and the
executor checks that every item has one before it returns.

Ray is optional (`pip install -e ".[ray]"`); cluster nodes need crv installed and the cache
directory on a file system they share with the driver (inputs, scratch and artifacts are
paths).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from crv.errors import ConfigError, CRVError
from crv.runtime import Executor, RuntimeConfig

log = logging.getLogger("crv.executor")

T = TypeVar("T")
Work = Callable[[list[tuple[T, Path]]], None]
"""`work([(item, file), ...])`: compute each item and write its result to its file atomically."""

MAX_RETRIES = 3
"""Times Ray reruns a shard whose worker process died."""

INSTALL_HINT = 'runtime.executor=ray needs Ray: pip install -e ".[ray]"'


def run_sharded(
    items: Sequence[T],
    files: Sequence[Path],
    work: Work[T],
    runtime: RuntimeConfig,
    device: str = "cpu",
    unit: str = "items",
    stage_log: logging.Logger | None = None,
) -> int:
    """Make sure every `files[i]` holds `items[i]`'s result; returns how many were already
    there (reused from a killed run), which it logs on `stage_log` ("resumed 40 of 100
    traces from scratch": `unit` names the items). `work` must be picklable for
    `executor=ray` (a module-level function, or a `functools.partial` of one)."""
    if len(items) != len(files):
        raise ValueError(f"{len(items)} items but {len(files)} result files")
    pending = [
        (item, Path(f)) for item, f in zip(items, files, strict=True) if not Path(f).is_file()
    ]
    if len(pending) < len(items):
        (stage_log or log).info(
            "resumed %d of %d %s from scratch (%s); computing the other %d",
            len(items) - len(pending),
            len(items),
            unit,
            Path(files[0]).parent,
            len(pending),
        )
    if pending:
        if runtime.executor is Executor.ray:
            _run_on_ray(pending, work, runtime, device)
        else:
            _run_shard(work, pending)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise CRVError(f"work finished without writing {len(missing)} results, e.g. {missing[0]}")
    return len(items) - len(pending)


def _run_shard(work: Work[T], shard: list[tuple[T, Path]], threads: int | None = None) -> None:
    """Run `work` on the items of `shard` that have no result yet (a retried shard skips
    what its dead predecessor finished), with `threads` torch threads if given."""
    todo = [(item, file) for item, file in shard if not file.is_file()]
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if todo:
        work(todo)


def shards(pending: list[T], n: int) -> list[list[T]]:
    """`pending` dealt round-robin into at most `n` non-empty shards (long and short items
    of a sorted list spread evenly)."""
    return [pending[i::n] for i in range(min(n, len(pending)))]


def check_runtime(runtime: RuntimeConfig, device: str) -> None:
    """ConfigError, before any stage runs, when `runtime` cannot work here: Ray missing,
    or CUDA without GPUs for the workers."""
    if runtime.executor is not Executor.ray:
        return
    if device.startswith("cuda") and runtime.gpus_per_worker <= 0:
        raise ConfigError(
            f"device={device} with runtime.executor=ray needs runtime.gpus_per_worker > 0"
        )
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


def _run_on_ray(
    pending: list[tuple[T, Path]], work: Work[T], runtime: RuntimeConfig, device: str
) -> None:
    check_runtime(runtime, device)
    import ray

    if not ray.is_initialized():
        log.info("connecting to Ray (%s)", runtime.ray_address or "a new local cluster")
        ray.init(address=runtime.ray_address, include_dashboard=False)
    task = ray.remote(_run_shard).options(
        num_cpus=runtime.threads_per_worker,
        num_gpus=runtime.gpus_per_worker,
        max_retries=MAX_RETRIES,
    )
    parts = shards(pending, runtime.workers)
    log.info("running %d items as %d Ray tasks", len(pending), len(parts))
    work_ref = ray.put(work)
    refs = [task.remote(work_ref, part, runtime.threads_per_worker) for part in parts]
    try:
        ray.get(refs)
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
        raise CRVError(
            f"a Ray worker died {MAX_RETRIES + 1} times running a shard ({type(exc).__name__}); "
            "finished items are kept in the stage's scratch directory, rerun to resume"
        ) from None
