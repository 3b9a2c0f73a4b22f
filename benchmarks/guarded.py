"""Final-answer accuracy of verifying while generating (`crv-verify generate=true`) against
plain greedy decoding, on held-out problems.

The problems are the test split of the bundle's traces (split by problem: the verifier
never trained on them), a seeded sample of `--problems`. Each prompt is decoded

* plain: `crv.generation.generate_greedy`, no verification (timed: the baseline cost),
* flag only (`correct=none`): every step scored as its line ends (its completion is the
  plain one token for token, tests/test_guard.py),
* `correct=intervention` and `correct=second_choice`, with the bundle's threshold and
  `--max-corrections` per trace.

Every completion is labelled by the traces stage's checker (`crv.tasks.label.label_steps`).
Per policy: final-answer accuracy, its paired difference to plain greedy with a 95%
bootstrap interval over problems, the corrections, how many rewrote a correct step into one
that is not correct ("broke": incorrect, unparseable or gone) and how many an incorrect one
into a correct one ("fixed"), and the seconds per step added over plain decoding. A policy's
run on a problem where the flag-only run flagged no step would be that same run (nothing to
correct, the guard is deterministic), so it is not repeated and the flag-only run's time
counts for it. The flags of the flag-only runs are also tallied against the plain traces'
step labels (steps after a trace's first error have none).

    python benchmarks/guarded.py [--bundle DIR] [--traces DIR] [--problems N]
        [--max-corrections 2] [--threshold T] [--cache outputs/cache] [OVERRIDE ...]

Without `--bundle`, the bundle of the config that `crv OVERRIDE ...` composes (default: the
default run) in the pipeline cache `--cache`. Without `--traces`, the traces the bundle's
verifier was trained on, found through the cache's manifests. Ends with `gain: X` (the
better correcting policy's accuracy minus plain greedy's; picking the better of two favours
a gain slightly) and `gain_ci: [lo, hi]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crv.bundle import Bundle, load_bundle
from crv.check.config import VerifyConfig
from crv.check.guard import Guard, GuardedTrace
from crv.check.inputs import Prompt
from crv.check.scorer import StepVerifier
from crv.generation import generate_greedy
from crv.interventions.measure import paired_bootstrap_diff, wilson_interval
from crv.pipeline import read_manifest
from crv.tasks.label import label_steps
from crv.traces.store import load_traces

POLICIES = ("intervention", "second_choice")
N_BOOTSTRAP = 2000


def default_bundle(cache: Path, overrides: list[str]) -> Path:
    """The bundle artifact of the config `crv OVERRIDES` composes, in `cache`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from crv.cli.main import CONF_DIR
    from crv.config import register_configs
    from crv.pipeline import artifact_keys

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    path = cache / "bundle" / artifact_keys(cfg, cfg.seed)["bundle"]
    if not path.is_dir():
        command = " ".join(["crv", *overrides])
        raise SystemExit(f"no bundle at {path}: run `{command}` first, or pass --bundle DIR")
    return path


def traces_of(bundle_dir: Path) -> Path:
    """The traces artifact the bundle's verifier was trained on (bundle in a pipeline cache)."""
    cache = bundle_dir.parent.parent
    verifier = cache / "verifier" / read_manifest(bundle_dir)["inputs"]["verifier"]
    traces = cache / "traces" / read_manifest(verifier)["inputs"]["traces"]
    if not traces.is_dir():
        raise SystemExit(f"the bundle's traces {traces} are gone: pass --traces DIR")
    return traces


def step_label(row: dict[str, Any], completion: str, index: int, start: int) -> bool | None:
    """The label of the step of `completion` at character `start` (None: no such step, or
    none after an earlier error)."""
    steps, _, _ = label_steps(row, completion)
    if index < len(steps) and steps[index]["start_char"] == start:
        return bool(steps[index]["label"])
    return None


def correction_outcomes(row: dict[str, Any], trace: GuardedTrace) -> list[tuple[Any, Any]]:
    """(label before, label after) of each correction of a guarded trace."""
    out = []
    for c in trace.corrections:
        start = c["start_char"]
        before = trace.completion[:start] + c["before"]["text"] + "\n"
        out.append(
            (
                step_label(row, before, c["step"], start),
                step_label(row, trace.completion, c["step"], start) if c["after"] else None,
            )
        )
    return out


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """fn(*args, **kwargs) and its wall-clock seconds."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="crv config overrides for the default bundle")
    parser.add_argument("--bundle", type=Path, help="bundle directory")
    parser.add_argument("--traces", type=Path, help="traces artifact (default: the bundle's)")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems")
    parser.add_argument("--max-corrections", type=int, default=2)
    parser.add_argument("--threshold", type=float, help="flag threshold (default: the bundle's)")
    parser.add_argument("--cache", type=Path, default=Path("outputs/cache"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)

    bundle_dir = args.bundle or default_bundle(args.cache, args.overrides)
    traces_dir = args.traces or traces_of(bundle_dir)
    bundle = load_bundle(bundle_dir, args.device)
    test = load_traces(traces_dir).filter(lambda r: r["split"] == "test")
    order = np.random.default_rng(args.seed).permutation(len(test))[: args.problems]
    rows = [test[int(i)] for i in sorted(order)]
    tasks = {t: sum(r["task"] == t for r in rows) for t in sorted({r["task"] for r in rows})}
    print(f"bundle: {bundle_dir}\ntraces: {traces_dir}")
    threshold = bundle.threshold if args.threshold is None else args.threshold
    print(f"{len(rows)} of {len(test)} held-out problems {tasks}, threshold {threshold:.4g}")
    results = run_all(
        bundle, rows, VerifyConfig(max_corrections=args.max_corrections, threshold=args.threshold)
    )
    report(results, args.seed)


def run_all(bundle: Bundle, rows: list[dict[str, Any]], cfg: VerifyConfig) -> dict[str, Any]:
    """Every problem decoded plain, flag-only and with each policy; labels and seconds."""
    guards = {
        p: Guard(StepVerifier(bundle, dataclasses.replace(cfg, correct=p)))
        for p in ("none", *POLICIES)
    }
    guards["none"].generate(Prompt(0, "warm-up", rows[0]["prompt"]))
    out: dict[str, Any] = {
        "correct": {p: [] for p in ("plain", "none", *POLICIES)},
        "seconds": {p: 0.0 for p in ("plain", "none", *POLICIES)},
        "outcomes": {p: [] for p in POLICIES},
        "n_steps": 0,
        "flags": {True: [0, 0], False: [0, 0]},  # step label -> [flagged, steps]
        "mismatch": 0,
    }
    for n, row in enumerate(rows, 1):
        prompt = Prompt(n, row["id"], row["prompt"])
        [plain], seconds = timed(
            generate_greedy, bundle.model, bundle.tokenizer, [row["prompt"]],
            cfg.max_new_tokens, progress=False, stop_patterns=cfg.stop,
        )  # fmt: skip
        out["seconds"]["plain"] += seconds
        out["correct"]["plain"].append(label_steps(row, plain.completion)[2])
        flagged, flag_seconds = timed(guards["none"].generate, prompt)
        out["mismatch"] += flagged.completion_ids != plain.completion_ids
        out["seconds"]["none"] += flag_seconds
        out["correct"]["none"].append(label_steps(row, flagged.completion)[2])
        labels = [s["label"] for s in label_steps(row, plain.completion)[0]]
        out["n_steps"] += len(flagged.steps)
        for step, label in zip(flagged.steps, labels, strict=False):
            if label is not None:
                out["flags"][bool(label)][0] += step["flagged"]
                out["flags"][bool(label)][1] += 1
        for policy in POLICIES:
            trace, seconds = flagged, flag_seconds  # nothing flagged: the same run
            if any(s["flagged"] for s in flagged.steps):
                trace, seconds = timed(guards[policy].generate, prompt)
                out["outcomes"][policy] += correction_outcomes(row, trace)
            out["seconds"][policy] += seconds
            out["correct"][policy].append(label_steps(row, trace.completion)[2])
        print(f"{n}/{len(rows)} {row['id']}: {len(flagged.steps)} steps", flush=True)
    return out


def report(out: dict[str, Any], seed: int) -> None:
    """The table, the flag tallies and the closing `gain` lines."""
    plain = np.array(out["correct"]["plain"], dtype=np.float64)
    n, n_steps = len(plain), max(out["n_steps"], 1)
    names = {"plain": "plain greedy", "none": "flag only", **{p: p for p in POLICIES}}
    print(
        f"\n{'policy':<14} {'accuracy [95% CI]':<24} {'diff vs plain [95% CI]':<28} "
        f"{'corrections':>11} {'fixed':>5} {'broke':>5} {'s/step added':>12}"
    )
    for key, name in names.items():
        correct = np.array(out["correct"][key], dtype=np.float64)
        low, high = wilson_interval(int(correct.sum()), n) or [float("nan")] * 2
        accuracy = f"{correct.mean():.3f} [{low:.3f}, {high:.3f}]"
        diff = "-"
        if key != "plain":
            ci = paired_bootstrap_diff(correct, plain, N_BOOTSTRAP, seed)
            diff = f"{(correct - plain).mean():+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        outcomes = out["outcomes"].get(key, [])
        fixed = sum(before is False and after is True for before, after in outcomes)
        broke = sum(before is True and after is not True for before, after in outcomes)
        added = (out["seconds"][key] - out["seconds"]["plain"]) / n_steps
        counts = f"{len(outcomes):>11} {fixed:>5} {broke:>5}" if key in POLICIES else " " * 23
        extra = f"{added:>12.4f}" if key != "plain" else f"{'-':>12}"
        print(f"{name:<14} {accuracy:<24} {diff:<28} {counts} {extra}")
    (flag_ok, n_ok), (flag_bad, n_bad) = out["flags"][True], out["flags"][False]
    print(
        f"\nflag-only runs: {flag_ok} of {n_ok} correct steps flagged, {flag_bad} of {n_bad} "
        f"incorrect steps flagged; {n_steps} steps; plain decoding "
        f"{out['seconds']['plain'] / n_steps:.4f} s/step; {out['mismatch']} flag-only "
        "completions differ from plain greedy"
    )
    gains = {p: float(np.mean(out["correct"][p]) - plain.mean()) for p in POLICIES}
    best = max(POLICIES, key=lambda p: (gains[p], p == POLICIES[0]))
    ci = paired_bootstrap_diff(
        np.array(out["correct"][best], dtype=np.float64), plain, N_BOOTSTRAP, seed
    )
    print(f"best policy: {best}")
    print(f"gain: {gains[best]:.4f}")
    print(f"gain_ci: [{ci[0]:.4f}, {ci[1]:.4f}]")


if __name__ == "__main__":
    main()
