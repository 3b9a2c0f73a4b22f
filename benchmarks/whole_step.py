"""Cost of whole-step graphs against one graph per token and one graph per step.

For the first `--traces` test traces of a `traces` artifact, with the subject and transcoder
artifacts of the same run, builds every step's graph three ways, interleaved, `--repeats`
times (the fastest run of each counts):

- `least_confident`: one graph per step, at its least confident prediction (the default);
- `step`: one whole-step graph per step (every prediction of the step, `graphs.position=step`);
- `per_token`: one graph per prediction of the step (what a whole-step view costs without
  sharing targets), all from one forward pass per trace with the row cache.

Prints seconds per step and rows computed per step of each, and `ratio_per_token_over_step`.

    python benchmarks/whole_step.py --run RUN_CACHE_DIR [--traces 20 --threads 1]

(RUN_CACHE_DIR: a cache holding exactly one subject, traces and transcoders artifact, e.g.
the crv-tiny-bugs cache `pipeline.cache_dir=/work/cache/bugs`.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from crv.graphs.attribute import TraceAttributor, explained_positions, span_of
from crv.graphs.config import GraphsConfig, Position


def artifact(cache: Path, stage: str) -> Path:
    dirs = [d for d in (cache / stage).iterdir() if d.is_dir() and "." not in d.name]
    if len(dirs) != 1:
        raise SystemExit(f"expected one {stage} artifact in {cache / stage}, found {len(dirs)}")
    return dirs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="artifact cache directory")
    parser.add_argument("--traces", type=int, default=20)
    parser.add_argument("--max-feature-nodes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from crv.traces.store import load_traces
    from crv.transcoders.io import load_subject_with_transcoders

    loaded = load_subject_with_transcoders(
        artifact(args.run, "subject"), artifact(args.run, "transcoders")
    )
    traces = load_traces(artifact(args.run, "traces"))
    rows = [r for r in traces if r["split"] == "test" and r["steps"]][: args.traces]
    ways = {
        "least_confident": Position.least_confident,
        "step": Position.step,
        "per_token": Position.step,
    }
    best = {w: float("inf") for w in ways}
    n_rows = dict.fromkeys(ways, 0)
    n_steps = sum(len(r["steps"]) for r in rows)
    for _ in range(args.repeats):
        for way, position in ways.items():
            cfg = GraphsConfig(max_feature_nodes=args.max_feature_nodes, position=position)
            start, computed = time.perf_counter(), 0
            for r in rows:
                ids = r["input_ids"]
                targets = explained_positions(
                    loaded.model, ids, r["steps"], r["prompt_len"], position
                )
                if way == "per_token":  # every prediction its own graph
                    targets = [p for t in targets for p in span_of(t)]
                attributor = TraceAttributor(loaded.adapter, loaded.transcoders, ids, targets, cfg)
                for att in attributor.attribute_steps(targets):
                    att.pruned(cfg.node_threshold, cfg.edge_threshold)
                computed += attributor.n_rows_computed
            best[way] = min(best[way], time.perf_counter() - start)
            n_rows[way] = computed
    print(f"traces {len(rows)}, steps {n_steps}, max_feature_nodes {args.max_feature_nodes}")
    for way in ways:
        print(f"{way:16s} {best[way] / n_steps:.4f} s/step  {n_rows[way] / n_steps:8.1f} rows/step")
    print(f"ratio_per_token_over_step: {best['per_token'] / best['step']:.2f}")


if __name__ == "__main__":
    main()
