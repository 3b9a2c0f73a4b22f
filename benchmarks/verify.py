"""Seconds per 6-step trace for `crv-verify` on a bundle.

Verification cost is what a user of crv-verify pays per trace: tokenising, the one shared
forward pass, the attribution backward passes of all steps, graph pruning, features and
the verifier. Bundle loading is excluded (paid once per run), and one warm-up trace runs
first. The traces are canonical arithmetic solutions with six operators (six steps),
given as `steps` so that every bundle's step pattern sees six steps.

    python benchmarks/verify.py [BUNDLE] [--traces 5] [--device cpu]

BUNDLE defaults to the newest bundle in the pipeline cache under outputs/. Ends with the
line `seconds_per_trace: X`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from crv.bundle import MANIFEST_FILE, load_bundle
from crv.check.config import VerifyConfig
from crv.check.inputs import parse_trace
from crv.check.scorer import StepVerifier
from crv.tasks import generate_problems

N_STEPS = 6


def newest_bundle(root: Path) -> Path:
    """The most recently written bundle below `root` (SystemExit when there is none)."""
    found = sorted(root.glob(f"**/bundle/*/{MANIFEST_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"no bundle under {root}: run `crv` with the bundle stage or pass a bundle path")
    return found[-1].parent


def six_step_traces(n: int) -> list[bytes]:
    """`n` + 1 input lines (one warm-up), each a problem whose solution has six steps."""
    lines = []
    for problem in generate_problems("arithmetic", N_STEPS, n + 1, seed=123):
        steps = [line for line in problem.solution().splitlines() if line.startswith("Step ")]
        assert len(steps) == N_STEPS, steps
        lines.append(
            json.dumps({"id": problem.id, "prompt": problem.prompt, "steps": steps}).encode()
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path, help="bundle directory")
    parser.add_argument("--traces", type=int, default=5, help="timed traces (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--cache", type=Path, default=Path("outputs"), help="where to look for bundles"
    )
    args = parser.parse_args()

    path = args.bundle or newest_bundle(args.cache)
    print(f"bundle: {path}")
    bundle = load_bundle(path, args.device)
    verifier = StepVerifier(bundle, VerifyConfig(device=args.device))
    traces = [
        parse_trace(raw, i + 1, bundle.step_pattern)
        for i, raw in enumerate(six_step_traces(args.traces))
    ]
    verifier.verify(traces[0])
    seconds = []
    for trace in traces[1:]:
        start = time.perf_counter()
        steps = verifier.verify(trace)
        seconds.append(time.perf_counter() - start)
        n_tokens = len(verifier.encode(trace).input_ids)
        print(f"{trace.id}: {len(steps)} steps, {n_tokens} tokens, {seconds[-1]:.3f} s")
    print(
        f"median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s over {len(seconds)} traces"
    )
    print(f"seconds_per_trace: {statistics.mean(seconds):.4f}")


if __name__ == "__main__":
    main()
