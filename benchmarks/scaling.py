"""Scaling of the per-trace stages over Ray workers: 1 worker against 2, side by side.

Runs the traces stage's generation and the graphs stage of a preset (the default one
unless `--experiment` says otherwise) through `crv.executor` on a local Ray cluster, once
with 1 worker and once with 2, each worker at 1 torch thread, on a fresh scratch directory
each time. Both Ray workers are started before anything is timed; model loading counts
(each shard loads its replica). The
subject, traces and transcoders come from the cache (computed first if missing). Checks
that both runs wrote the same traces and the same graph tensors, prints a table and ends with
`speedup: X` (graphs, 1-worker seconds over 2-worker seconds; `traces_speedup` is printed
before it). Only meaningful on idle cores: the load average is printed with the table.

    python benchmarks/scaling.py [--experiment default] [--graph-traces 400]
        [--trace-problems 24] [--cache outputs/cache]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.numpy import load_file

from crv.config import register_configs
from crv.graphs.stage import run_stage as run_graphs
from crv.graphs.store import GRAPH_DIR
from crv.pipeline import StageContext, run_pipeline
from crv.runtime import RuntimeConfig
from crv.traces.stage import run_stage as run_traces
from crv.traces.store import load_traces

CONF = Path(__file__).resolve().parents[1] / "conf"


def timed_stage(
    run, name: str, cfg, inputs: dict[str, Path], workers: int, root: Path
) -> tuple[float, dict]:
    """Seconds and metrics of one stage run with `workers` Ray workers into
    `root/<name>-<workers>`."""
    out, scratch = root / f"{name}-{workers}", root / f"{name}-{workers}.scratch"
    out.mkdir()
    ctx = StageContext(
        name=name,
        cfg=cfg,
        inputs=inputs,
        out=out,
        scratch=scratch,
        seed=0,
        device="cpu",
        log=logging.getLogger(f"crv.{name}"),
        runtime=RuntimeConfig(executor="ray", workers=workers, threads_per_worker=1),
    )
    start = time.perf_counter()
    metrics = run(ctx)
    return time.perf_counter() - start, metrics


@ray.remote(num_cpus=1)
def _import_stages() -> int:
    """Import what a shard imports, so that both workers exist before anything is timed."""
    import crv.graphs.stage  # noqa: F401
    import crv.traces.stage  # noqa: F401

    time.sleep(1.0)  # hold the CPU so the other call starts a second worker
    return os.getpid()


def same_output(name: str, a: Path, b: Path) -> bool:
    """Whether two runs of a stage wrote the same traces / the same graph tensors."""
    if name == "traces":
        return load_traces(a).to_list() == load_traces(b).to_list()
    files = sorted(p.name for p in (a / GRAPH_DIR).iterdir())
    if files != sorted(p.name for p in (b / GRAPH_DIR).iterdir()):
        return False
    for file in files:
        x, y = load_file(a / GRAPH_DIR / file), load_file(b / GRAPH_DIR / file)
        if x.keys() != y.keys() or not all(np.array_equal(x[k], y[k]) for k in x):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="default")
    parser.add_argument("--graph-traces", type=int, default=400, help="traces attributed")
    parser.add_argument(
        "--trace-problems", type=int, default=24, help="problems per task and complexity generated"
    )
    parser.add_argument("--cache", default="outputs/cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(
            compose(config_name="config", overrides=[f"experiment={args.experiment}"])
        )
    sections = {name: getattr(cfg, name) for name in vars(cfg)}
    done = {r.name: r.path for r in run_pipeline(sections, ["transcoders"], args.cache, 0, "cpu")}

    graphs_cfg = dataclasses.replace(cfg.graphs, max_traces=args.graph_traces)
    traces_cfg = dataclasses.replace(
        cfg.traces,
        n_per_complexity=args.trace_problems,
        n_test_per_complexity={},
        test_frac=0.5,
        runtime_batch_size=4,
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert len(set(ray.get([_import_stages.remote() for _ in range(2)]))) == 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, run, stage_cfg, deps in (
            ("traces", run_traces, traces_cfg, ("subject",)),
            ("graphs", run_graphs, graphs_cfg, ("subject", "traces", "transcoders")),
        ):
            inputs = {d: done[d] for d in deps}
            (one, m1), (two, m2) = (
                timed_stage(run, name, stage_cfg, inputs, w, root) for w in (1, 2)
            )
            same = same_output(name, root / f"{name}-1", root / f"{name}-2")
            rows.append((name, one, two, same))
            if name == "traces":  # the sharded part alone (labelling and saving are serial)
                rows.append(
                    ("  generation", m1["generation_seconds"], m2["generation_seconds"], same)
                )
    ray.shutdown()

    load = os.getloadavg()
    print(f"\n{'stage':<12} {'1 worker s':>11} {'2 workers s':>12} {'speedup':>8}  same output")
    for name, one, two, same in rows:
        print(f"{name:<12} {one:>11.1f} {two:>12.1f} {one / two:>8.2f}  {same}")
    print(f"load average during the run (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"traces_speedup: {rows[0][1] / rows[0][2]:.2f}")
    print(f"speedup: {rows[2][1] / rows[2][2]:.2f}")


if __name__ == "__main__":
    main()
