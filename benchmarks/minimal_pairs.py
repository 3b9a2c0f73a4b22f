"""Minimal pairs: does a score put the corrupted step above the correct one?

From a run's test traces, each pair is one of the model's own correct steps (every step
before it correct too) and the same step corrupted in one of two ways, after the same
prefix:

- `carried`: a wrong result, carried on into the restatement (`7*21=147, so 147` ->
  `7*21=157, so 157`: the result plus one of -10, -2, -1, 1, 2, 10 that keeps its sign;
  on Boolean steps the result is negated). Only steps whose result appears once in the
  restatement, so that the carried copy is the one replaced.
- `miscopied`: the right result, but one binary operator of the restatement outside the
  result changed (`3+4=7, so 7*(2-8)` -> `3+4=7, so 7*(2+8)`; `and` <-> `or` on Boolean).

Per task and kind `--n-per-cell` pairs are drawn (seeded), one per trace, so the pairs are
independent and a Wilson interval applies. Each pair is scored three ways: the bundle's
verdict (`crv-verify`'s step score, whatever method the bundle ships), the subject's token
perplexity over the step and MaxProb (both `crv.baselines.scores.trace_step_scores`, the
baselines stage's own code, over the step's tokens as that stage counts them). Printed:
the share of pairs where each scores the corrupted step strictly higher (ties are not
"higher"), with 95% Wilson intervals, per task and kind and over all pairs.

    python benchmarks/minimal_pairs.py BUNDLE TRACES [--n-per-cell 40] [--seed 0] [--json OUT]

TRACES is a `traces` artifact directory (the run's `artifacts.json` lists it). Ends with
the line `bundle_higher: X`, the share over all pairs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from crv.baselines.config import BaselinesConfig
from crv.baselines.scores import trace_step_scores
from crv.bundle import load_bundle
from crv.check.config import VerifyConfig
from crv.check.inputs import Trace
from crv.check.scorer import StepVerifier
from crv.interventions.measure import wilson_interval
from crv.shipped import baseline_spans

KINDS = ("carried", "miscopied")
SCORERS = ("bundle", "perplexity", "maxprob")
STEP = re.compile(r"^(Step \d+: )(.*)=([^=,]+), so (.*)$")
ARITH_OP = re.compile(r"(?<=[\d)])[+*-]")
BOOL_OP = re.compile(r"\b(and|or)\b")


@dataclass
class Pair:
    task: str
    kind: str
    trace_id: str
    prompt: str
    prefix: list[str]
    correct: str
    corrupted: str


def _carried(task: str, head: str, lhs: str, result: str, rest: str, rng: random.Random):
    """The step with a wrong result carried on, or None when the result's copy in the
    restatement is not unique."""
    if task == "boolean":
        if result not in ("True", "False"):
            return None
        where = [m.start() for m in re.finditer(rf"\b{result}\b", rest)]
        wrong = "False" if result == "True" else "True"
    else:
        try:
            value = int(result)
        except ValueError:
            return None
        where = [m.start() for m in re.finditer(rf"(?<![\d]){re.escape(result)}(?!\d)", rest)]
        # same sign, so the restatement keeps its form (a negative is written `(-5)`)
        deltas = [d for d in (-10, -2, -1, 1, 2, 10) if (value + d) * value > 0]
        if not deltas:
            return None
        wrong = str(value + rng.choice(deltas))
    if len(where) != 1:
        return None
    i = where[0]
    return f"{head}{lhs}={wrong}, so {rest[:i]}{wrong}{rest[i + len(result) :]}"


def _miscopied(task: str, head: str, lhs: str, result: str, rest: str, rng: random.Random):
    """The step with one operator of the restatement changed, or None when it has none."""
    ops = list((BOOL_OP if task == "boolean" else ARITH_OP).finditer(rest))
    if not ops:
        return None
    op = rng.choice(ops)
    if task == "boolean":
        new = "or" if op.group() == "and" else "and"
    else:
        new = rng.choice([c for c in "+-*" if c != op.group()])
    return f"{head}{lhs}={result}, so {rest[: op.start()]}{new}{rest[op.end() :]}"


def build_pairs(traces, n_per_cell: int, seed: int, split: str = "test") -> list[Pair]:
    """`n_per_cell` pairs per task and kind from the traces of `split` (see the module
    docstring; `train` to choose what a bundle ships without looking at test steps)."""
    rng = random.Random(seed)
    candidates: dict[tuple[str, str], list[Pair]] = {}
    for tr in traces.select_columns(["id", "task", "split", "prompt", "steps"]):
        if tr["split"] != split:
            continue
        for kind in KINDS:
            options = []
            for i, step in enumerate(tr["steps"]):
                if step["label"] is not True:
                    break  # only steps after a correct prefix
                m = STEP.match(step["text"])
                if m is None:
                    continue
                make = _carried if kind == "carried" else _miscopied
                corrupted = make(tr["task"], *m.groups(), rng)
                if corrupted is not None and corrupted != step["text"]:
                    prefix = [s["text"] for s in tr["steps"][:i]]
                    options.append(
                        Pair(
                            tr["task"],
                            kind,
                            tr["id"],
                            tr["prompt"],
                            prefix,
                            step["text"],
                            corrupted,
                        )
                    )
            if options:  # one pair per trace and kind: independent pairs
                candidates.setdefault((tr["task"], kind), []).append(rng.choice(options))
    pairs = []
    for key in sorted(candidates):
        pool = candidates[key]
        pairs += rng.sample(pool, min(n_per_cell, len(pool)))
    return pairs


def score_step(v: StepVerifier, pair: Pair, step: str, cfg: BaselinesConfig) -> dict[str, float]:
    """The three scores of the last step of prompt + prefix + `step`."""
    steps = [*pair.prefix, step]
    spans, start = [], 0
    for s in steps:
        spans.append((start, start + len(s)))
        start += len(s) + 1
    trace = Trace(0, pair.trace_id, pair.prompt, "\n".join(steps), spans)
    verdict = v.verify(trace)[-1]["score"]
    enc = v.encode(trace)
    token_spans = baseline_spans(enc.prompt_len, enc.last_tokens)
    scores = trace_step_scores(v.bundle.model, enc.input_ids, token_spans, cfg).scores
    return {
        "bundle": float(verdict),
        "perplexity": float(scores["perplexity"][-1]),
        "maxprob": float(scores["maxprob"][-1]),
    }


def share(higher: list[bool]) -> dict:
    k, n = int(sum(higher)), len(higher)
    return {"n": n, "higher": k, "share": k / n if n else None, "ci": wilson_interval(k, n)}


def summarise(results: list[dict]) -> dict:
    """Share of pairs where each scorer puts the corrupted step higher, per cell and all."""
    cells = sorted({(r["task"], r["kind"]) for r in results}) + [("all", "all")]
    out = {}
    for task, kind in cells:
        rows = [r for r in results if task == "all" or (r["task"], r["kind"]) == (task, kind)]
        out[f"{task}/{kind}"] = {
            s: share([r["corrupted"][s] > r["correct"][s] for r in rows]) for s in SCORERS
        }
    return out


def markdown(summary: dict, method: str) -> str:
    def cell(e: dict) -> str:
        lo, hi = e["ci"] or (float("nan"), float("nan"))
        return f"{e['share']:.3f} [{lo:.3f}, {hi:.3f}]"

    rows = [
        f"| pairs | n | bundle ({method}) | token perplexity | MaxProb |",
        "|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        rows.append(
            f"| {name} | {entry['bundle']['n']} | "
            + " | ".join(cell(entry[s]) for s in SCORERS)
            + " |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("traces", type=Path, help="a traces artifact directory")
    parser.add_argument("--n-per-cell", type=int, default=40, help="pairs per task and kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", help="trace split the pairs come from")
    parser.add_argument("--json", type=Path, help="also write pairs, scores and summary here")
    args = parser.parse_args()

    from tqdm.auto import tqdm

    from crv.traces.store import load_traces

    bundle = load_bundle(args.bundle)
    # nothing flagged: no interventions are proposed, only scores are read
    v = StepVerifier(bundle, VerifyConfig(bundle=str(args.bundle), threshold=float("inf")))
    cfg = bundle.baselines or BaselinesConfig()
    pairs = build_pairs(load_traces(args.traces), args.n_per_cell, args.seed, args.split)
    results = [
        {
            **vars(p),
            "correct": score_step(v, p, p.correct, cfg),
            "corrupted": score_step(v, p, p.corrupted, cfg),
        }
        for p in tqdm(pairs, desc="pairs", file=sys.stderr)
    ]
    summary = summarise(results)
    print(
        f"bundle {args.bundle}: method {bundle.method.name}; {len(pairs)} pairs, seed {args.seed}"
    )
    print(markdown(summary, bundle.method.name))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "pairs": results}, indent=1))
    print(f"bundle_higher: {summary['all/all']['bundle']['share']:.4f}")


if __name__ == "__main__":
    main()
