"""Step-graph throughput: one forward pass per trace with shared rows vs one pass per step.

Both sides build the same graphs (same config, same model and transcoders) for canonical
traces of >= 5 steps: `shared` attributes every step of a trace from one forward pass and
reuses feature rows between its steps (`crv.graphs.attribute.trace_graphs`); `per-step`
attributes each step from its own prefix with nothing shared. Each path runs `--repeats`
times, interleaved, and its fastest run counts. Prints graphs per second of both, the rows
each computed, whether the graphs agree, the seconds of each part of both paths (from the
attributors' stopwatches), the share of rows reused and Amdahl-style bounds on the ratio
(everything but the rows the shared path does not reuse free; rows free in both paths), and
ends with `ratio: X` (shared over per-step throughput).

Subject: data/crv-tiny when present, else a random 4-layer hidden-128 Llama. Transcoders: a
given transcoder-set directory, else 16x/k=32 TopK transcoders briefly trained here on the
model's activations (`--train-steps`, 0 = data-initialised random ones). Traces: the canonical
solutions of synthetic arithmetic problems (teacher-forced, no generation), each step's graph
at the position the default `graphs.position` rule picks.

    python benchmarks/attribution.py [--traces 6 --complexities 5 7 --threads 1]

Against circuit-tracer: `benchmarks/attribution_circuit_tracer.py` builds one graph of a
random 4-layer hidden-128 Llama with random TopK transcoders with crv and with circuit-tracer 0.5.0 (in its own
venv, `--ct-python`) and prints seconds per graph, `ct_ratio` (crv over circuit-tracer
throughput; 9.83 here on 2026-11-26, 0.121 vs 1.192 s/graph at 128 feature nodes, 100 tokens,
1 thread) and `edge_agreement_max_rel` (3.6e-06 on the same 128 features and 10 logits).

Measured 2026-11-26 (2 cores, 1 thread, 8 traces, 48 step graphs, 64 features, least-confident
positions): `ratio: 1.20`; 0.8% of rows reused; bounds 1.55-1.66 and 2.10.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from crv.graphs.attribute import TraceAttributor
from crv.graphs.config import GraphsConfig
from crv.graphs.graph import StepGraph
from crv.models.adapter import ArchAdapter
from crv.transcoders.module import TranscoderSet

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "crv-tiny"
DEFAULT_PRESET = OmegaConf.load(ROOT / "conf" / "experiment" / "default.yaml")


def load_model(path: Path) -> tuple[Any, Any, str]:
    from crv.models.tiny import build_tokenizer

    if (path / "model.safetensors").is_file():
        from crv.models.loading import load_subject

        model, tokenizer = load_subject(path)
        return model.requires_grad_(False), tokenizer, str(path)
    tokenizer = build_tokenizer()
    return random_llama(tokenizer, seed=0), tokenizer, "random 4-layer hidden-128 Llama"


def random_llama(tokenizer: Any, seed: int) -> Any:
    """A seeded random 4-layer, hidden-128 Llama over `tokenizer` (the benchmarks' stand-in)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def canonical_traces(
    model: Any, tokenizer: Any, complexities: list[int], n: int, seed: int, position: str
) -> list[dict[str, Any]]:
    """Arithmetic problems with their canonical solutions as traces (ids, the positions
    the step graphs explain, chosen by the `position` rule as the graphs stage does)."""
    from crv.graphs.attribute import explained_positions
    from crv.tasks import generate_problems
    from crv.tasks.segment import segment_steps
    from crv.tokens import last_token_index, token_char_ends

    traces = []
    for complexity in complexities:
        for problem in generate_problems("arithmetic", complexity, n, seed):
            completion = problem.solution()
            prompt_ids = tokenizer(problem.prompt).input_ids
            completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
            ends = token_char_ends(tokenizer, completion_ids, completion)
            ids = prompt_ids + completion_ids
            steps = [
                {"last_token": last_token_index(ends, end, len(prompt_ids))}
                for _, end in segment_steps(completion)
            ]
            positions = explained_positions(model, ids, steps, len(prompt_ids), position)
            traces.append({"id": problem.id, "input_ids": ids, "positions": positions})
    return [t for t in traces if len(t["positions"]) >= 5]


def mlp_activations(
    adapter: ArchAdapter, traces: list[dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP inputs and outputs of every layer over the traces' tokens, [L, N, D] each."""
    xs: list[list[torch.Tensor]] = [[] for _ in range(adapter.n_layers)]
    ys: list[list[torch.Tensor]] = [[] for _ in range(adapter.n_layers)]

    def hook(layer: int):
        def record(_: Any, inputs: tuple, out: torch.Tensor) -> None:
            xs[layer].append(inputs[0][0])
            ys[layer].append(out[0])

        return record

    handles = [adapter.mlp(i).register_forward_hook(hook(i)) for i in range(adapter.n_layers)]
    with torch.no_grad():
        for trace in traces:
            adapter.model(input_ids=torch.tensor([trace["input_ids"]]))
    for h in handles:
        h.remove()
    return torch.stack([torch.cat(x) for x in xs]), torch.stack([torch.cat(y) for y in ys])


def make_transcoders(adapter: ArchAdapter, tokenizer: Any, steps: int, seed: int) -> TranscoderSet:
    """16x, k=32 TopK transcoders, trained for `steps` steps of 2048 tokens (0: data-initialised)."""
    from crv.transcoders.config import TranscodersConfig
    from crv.transcoders.train import TranscoderTrainer

    x_LND, y_LND = mlp_activations(
        adapter, canonical_traces(adapter.model, tokenizer, [3, 5, 7], 40, seed + 1, "after")
    )
    cfg = TranscodersConfig(batch_tokens=2048, tokens=max(steps, 1) * 2048)
    trainer = TranscoderTrainer(cfg, adapter.d_model, range(adapter.n_layers), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x_LND.shape[1], (cfg.batch_tokens,), generator=gen)
        trainer.step(x_LND[:, idx], y_LND[:, idx])
    if steps == 0:
        for layer in range(adapter.n_layers):
            trainer.tset[layer].init_from_data(x_LND[layer], y_LND[layer])
    tset = trainer.transcoder_set()
    for layer in tset.layers:
        tset[layer].requires_grad_(False)
    return tset


def same_graph(g: StepGraph, h: StepGraph) -> bool:
    cols = ("kind", "layer", "pos", "feature", "src", "dst")
    return all(np.array_equal(getattr(g, c), getattr(h, c)) for c in cols) and np.allclose(
        g.weight, h.weight, atol=1e-4, rtol=1e-3
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=TINY, help="subject model directory")
    parser.add_argument("--transcoders", type=Path, default=None, help="transcoder-set directory")
    parser.add_argument(
        "--train-steps", type=int, default=150, help="quick transcoder training steps"
    )
    parser.add_argument("--traces", type=int, default=4, help="traces per complexity")
    parser.add_argument("--complexities", type=int, nargs="+", default=[5, 7])
    parser.add_argument(
        "--max-feature-nodes",
        type=int,
        default=DEFAULT_PRESET.graphs.max_feature_nodes,
        help="default: the default run's (conf/experiment/default.yaml)",
    )
    parser.add_argument("--batch-size", type=int, default=GraphsConfig.batch_size)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved timed runs per path (fastest kept)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, model_name = load_model(args.model)
    adapter = ArchAdapter.for_model(model)
    start = time.perf_counter()
    if args.transcoders is not None:
        from crv.transcoders.io import load_transcoder_set

        tset = load_transcoder_set(args.transcoders)
        tc_name = str(args.transcoders)
    else:
        tset = make_transcoders(adapter, tokenizer, args.train_steps, args.seed)
        tc_name = f"16x k=32 TopK, {args.train_steps} quick training steps"
    print(f"subject: {model_name}; transcoders: {tc_name} ({time.perf_counter() - start:.0f} s)")
    cfg = GraphsConfig(max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    traces = canonical_traces(
        model, tokenizer, args.complexities, args.traces, args.seed, cfg.position
    )
    n_graphs = sum(len(t["positions"]) for t in traces)
    lengths = [len(t["input_ids"]) for t in traces]
    print(
        f"{len(traces)} traces, {n_graphs} step graphs, {min(lengths)}-{max(lengths)} tokens; "
        f"max_feature_nodes {cfg.max_feature_nodes}, batch_size {cfg.batch_size}, "
        f"position {cfg.position}, threads {args.threads}"
    )

    shared = shared_path(adapter, tset, traces, cfg)
    per_step = per_step_path(adapter, tset, traces, cfg)
    for _ in range(args.repeats - 1):  # interleaved, so both see the same machine load
        shared = min(shared, shared_path(adapter, tset, traces, cfg), key=lambda r: r.seconds)
        per_step = min(per_step, per_step_path(adapter, tset, traces, cfg), key=lambda r: r.seconds)

    agree = sum(same_graph(g, h) for g, h in zip(shared.graphs, per_step.graphs, strict=True))
    print(f"{'':10} {'s/graph':>8} {'graphs/s':>9} {'rows':>7}")
    for name, run in (("shared", shared), ("per-step", per_step)):
        print(
            f"{name:10} {run.seconds / n_graphs:8.3f} {n_graphs / run.seconds:9.2f} {run.rows:7d}"
        )
    print(
        f"identical graphs: {agree}/{n_graphs}; mean nodes "
        f"{np.mean([g.n_nodes for g in shared.graphs]):.0f}, "
        f"edges {np.mean([g.n_edges for g in shared.graphs]):.0f}"
    )
    print_breakdown(shared, per_step)
    print(f"ratio: {per_step.seconds / shared.seconds:.2f}")


@dataclass
class PathRun:
    """One timed pass of a path over all traces: graphs, rows computed, seconds by part."""

    graphs: list[StepGraph]
    rows: int
    seconds: float
    parts: dict[str, float]


def shared_path(
    adapter: ArchAdapter, tset: TranscoderSet, traces: list[dict[str, Any]], cfg: GraphsConfig
) -> PathRun:
    """Every step of a trace from one forward pass, rows shared between its steps."""
    start = time.perf_counter()
    graphs: list[StepGraph] = []
    parts: defaultdict[str, float] = defaultdict(float)
    rows = 0
    for t in traces:
        attributor = TraceAttributor(adapter, tset, t["input_ids"], t["positions"], cfg)
        atts = attributor.attribute_steps(t["positions"], trace_id=t["id"])
        with attributor.stopwatch("prune"):
            graphs += [att.pruned(cfg.node_threshold, cfg.edge_threshold) for att in atts]
        rows += attributor.n_rows_computed
        for part, seconds in attributor.stopwatch.seconds.items():
            parts[part] += seconds
    return PathRun(graphs, rows, time.perf_counter() - start, dict(parts))


def per_step_path(
    adapter: ArchAdapter, tset: TranscoderSet, traces: list[dict[str, Any]], cfg: GraphsConfig
) -> PathRun:
    """Every step from its own prefix, nothing shared."""
    start = time.perf_counter()
    graphs: list[StepGraph] = []
    parts: defaultdict[str, float] = defaultdict(float)
    rows = 0
    for t in traces:
        for s, p in enumerate(t["positions"]):
            attributor = TraceAttributor(adapter, tset, t["input_ids"][: p + 1], [p], cfg)
            att = attributor.attribute_step(p, s, t["id"])
            with attributor.stopwatch("prune"):
                graphs.append(att.pruned(cfg.node_threshold, cfg.edge_threshold))
            rows += attributor.n_rows_computed
            for part, seconds in attributor.stopwatch.seconds.items():
                parts[part] += seconds
    return PathRun(graphs, rows, time.perf_counter() - start, dict(parts))


# Parts the stopwatches time, each second in exactly one; backward and assemble are inside
# the rows (the rest of the rows' time is the cache and batching).
PARTS = ("forward", "encode", "logit rows", "feature rows", "influence", "bookkeeping", "prune")


def print_breakdown(shared: PathRun, per_step: PathRun) -> None:
    """Seconds by part for both paths, the share of rows reused and Amdahl-style bounds."""
    print(f"{'seconds':14} {'shared':>8} {'per-step':>8}")
    for part in (*PARTS, "other"):
        values = []
        for run in (shared, per_step):
            timed = sum(run.parts.get(p, 0.0) for p in PARTS)
            values.append(run.parts.get(part, 0.0) if part != "other" else run.seconds - timed)
        print(f"{part:14} {values[0]:8.3f} {values[1]:8.3f}")
        if part == "feature rows":
            for sub in ("backward", "assemble"):  # of the logit and feature rows
                print(
                    f"{'  ' + sub:14} {shared.parts.get(sub, 0.0):8.3f} "
                    f"{per_step.parts.get(sub, 0.0):8.3f}"
                )
    print(f"{'total':14} {shared.seconds:8.3f} {per_step.seconds:8.3f}")

    def rows_seconds(run: PathRun) -> float:
        return run.parts.get("logit rows", 0.0) + run.parts.get("feature rows", 0.0)

    reused = 1 - shared.rows / per_step.rows
    print(
        f"rows reused: {reused:.1%} ({per_step.rows - shared.rows} of {per_step.rows} rows the "
        f"step graphs need); rows are {rows_seconds(per_step) / per_step.seconds:.0%} of "
        f"per-step and {rows_seconds(shared) / shared.seconds:.0%} of shared time"
    )
    # Amdahl: the shared path must still compute every row it does not reuse; at the
    # per-step cost per row that is rows(per-step) x (1 - reused), everything else free.
    bound = per_step.seconds / (rows_seconds(per_step) * (1 - reused))
    own = per_step.seconds / rows_seconds(shared)
    free_rows = (per_step.seconds - rows_seconds(per_step)) / (
        shared.seconds - rows_seconds(shared)
    )
    print(
        f"ratio bound if all but the non-reused rows were free: {bound:.2f} at the per-step "
        f"cost per row, {own:.2f} at the shared path's measured row seconds; "
        f"ratio if rows were free in both paths: {free_rows:.2f}"
    )


if __name__ == "__main__":
    main()
