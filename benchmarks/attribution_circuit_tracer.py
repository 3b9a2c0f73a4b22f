"""crv's step-graph attribution against circuit-tracer's: speed and edge agreement.

Why: circuit-tracer (the public reference implementation of Ameisen et al. 2025's graphs) is
the yardstick for both the graphs crv builds and the time it takes to build them. It needs
transformers <= 4.57.3 and nnsight 0.6.x, so it lives in its own virtualenv and runs in a
subprocess: this same file, started with that venv's python and `--child SPEC.json` (the
child imports only torch, numpy and circuit_tracer, never crv).

What it does: builds (seeded) a random 4-layer hidden-128 Llama with crv's offline tokenizer
(vocab 33, BOS id 1) and a random TopK transcoder set (2,048 latents per layer, k=32,
activation `topk`, small biases) in a temporary directory, in circuit-tracer's
transcoder-set layout with absolute paths (the tokenizer's class is renamed
PreTrainedTokenizerFast for transformers 4.57), and a ~100-token prompt (BOS + random non-special
tokens; BOS is special, so circuit-tracer prepends nothing and both sides see the same ids).
Both sides explain the next-token logits at the last position with the same settings
(max_feature_nodes 128, max_logits 10, logit_cum_prob 0.95, batch 32, update_interval 2,
position 0 excluded), one torch thread each, fp32 on the CPU:
- crv: `attribute_trace` (forward + rows), unpruned `StepAttribution.dense_adjacency()`;
- circuit-tracer 0.5.0: `attribute` on `ReplacementModel.from_pretrained(model_dir,
  transcoder_dir, backend="nnsight")`, except that its loader builds ReLU transcoders from
  files, so the set is read with the same loader (`load_transcoder_from_hub` on the absolute
  directory, no hub call), each layer's activation replaced by its `TopK(k)`, and passed to
  `from_pretrained_and_transcoders` (what `from_pretrained` does inside).
With `--run RUN_DIR` both sides instead use a crv run's subject (crv-tiny), its trained
transcoders (activation `topk`) and its real test traces: the `--graphs` test steps whose
explained prediction was least confident (lowest top-logit probability, where the influence
ranking is least one-sided), each prompt cut after the explained position, at the run's graph
settings (`--max-feature-nodes` etc. override them). The subject and transcoders are copied
to a temporary directory in the layout circuit-tracer reads.
Timings: seconds per graph, the median of `--repeats` graphs per prompt after one warm-up
graph, model loading excluded. `ct_ratio` = crv graphs/s over circuit-tracer graphs/s.
Agreement: nodes are matched by (layer, pos, latent) for features, (layer, pos) for errors,
pos for tokens and token id for logits (circuit-tracer orders them [selected features |
errors of every (layer, pos) incl. pos 0 | tokens | logits]; both use the demeaned
unembedding W_U[t] - mean_v W_U[v]). Over the target rows and source columns present in both
graphs, `edge_agreement_max_rel` = max |a - b| / max(|b|, 1e-6) over edges with |b| above 1%
of the largest |b| (a = crv, b = circuit-tracer). Both graphs hold the BOS token node
(position 0); the line per graph gives its largest |edge| over the graph's largest.
`same_selected_features` counts the graphs where both sides select exactly the same features.

    python3 -m venv /tmp/ctvenv && /tmp/ctvenv/bin/pip install torch==2.13.0 \\
        circuit-tracer==0.5.0 "transformers<=4.57.3" "nnsight>=0.6,<0.7"
    .venv/bin/python benchmarks/attribution_circuit_tracer.py --ct-python /tmp/ctvenv/bin/python

Measured here 2026-11-26 (2 CPU cores, nothing else running, 1 thread each side, 100 tokens,
median of 3 graphs each; circuit-tracer 0.5.0 + nnsight 0.6.3 + transformers 4.57.3):

    random 4-layer hidden-128 Llama, 2048 latents/layer k=32 topk; 100 tokens; ...
                      s/graph  graphs/s  features
    crv                 0.121      8.25       128
    circuit-tracer      1.192      0.84       128
    shared features 128, same logit set: True; compared edges 7737 (max |w| 167.67, ...)
    ct_ratio: 9.83
    edge_agreement_max_rel: 3.64e-06

Both sides pick the same 128 features and 10 logits; the edges agree to float32 rounding.
Rerun 2026-11-30 (machine heavily shared, so slower on both sides), BOS column compared too:
crv 0.543 s, circuit-tracer 4.285 s per graph, `ct_ratio: 7.89`, 128 shared features,
`edge_agreement_max_rel: 3.28e-06`.

On real traces (2026-11-30; `--run` on a `crv experiment=smoke` run: crv-tiny, its trained
512-latent k=16 topk transcoders; 30 least confident test steps of 21-133 tokens; the run's
graph settings but `--max-feature-nodes 128 --batch-size 32`, `--repeats 1`):
`same_selected_features: 30/30` (128 of 128 in each, the same logit sets),
`edge_agreement_max_rel: 1.02e-05` (max abs diff 1.5e-05 on edges up to 57), the BOS token
node's largest edge 4.5-100% (median 13%) of the graph's largest; 30/30 too at the run's own
24 feature nodes (10 graphs). crv's code before it kept the BOS token node also selected the
same features on these 30 graphs (its graphs simply lacked the BOS column), so this set does
not show the disagreement issue #13 measured with the default run's 2,048-latent
transcoders (127 of 128 shared in two of three graphs); the default run was not available to
rerun here.
ct_ratio varies with the load on the shared cores: 7.47-8.55 over three runs on 2026-11-25
(crv 0.150-0.176 s, circuit-tracer 1.21-1.34 s per graph, before crv's shorter forward
segments).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# -- circuit-tracer side (runs under --ct-python) -------------------------------------------


def child(spec_path: str) -> None:
    """Build circuit-tracer graphs as `spec` says; write them to spec['out'] (.npz)."""
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    cpu = torch.device("cpu")
    start = time.perf_counter()
    tset, _ = load_transcoder_from_hub(spec["transcoders"], device=cpu, dtype=torch.float32)
    for tc in tset:  # the loader builds ReLU transcoders; ours are TopK
        tc.activation_function = TopK(spec["k"])
    model = ReplacementModel.from_pretrained_and_transcoders(
        spec["model"], tset, backend="nnsight", device=cpu, dtype=torch.float32
    )
    load_s = time.perf_counter() - start
    settings = dict(
        max_n_logits=spec["max_logits"],
        desired_logit_prob=spec["logit_cum_prob"],
        batch_size=spec["batch_size"],
        max_feature_nodes=spec["max_feature_nodes"],
        update_interval=spec["update_interval"],
    )
    attribute(spec["prompts"][0], model, **settings)  # warm-up
    for i, ids in enumerate(spec["prompts"]):
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            graph = attribute(ids, model, **settings)
            times.append(time.perf_counter() - start)
        np.savez(
            Path(spec["out"]) / f"ct_{i}.npz",
            adjacency=graph.adjacency_matrix.float().numpy(),
            features=graph.active_features[graph.selected_features].numpy(),  # layer, pos, latent
            logit_tokens=graph.logit_token_ids.numpy(),
            input_ids=graph.input_tokens.cpu().numpy(),
            n_layers=np.int64(graph.cfg.n_layers),
            times=np.array(times),
            load_s=np.float64(load_s),
        )


# -- crv side ---------------------------------------------------------------------------------


def build_inputs(root: Path, args: argparse.Namespace) -> tuple[object, object, list[int]]:
    """Random Llama (+ tokenizer) and TopK transcoder set saved under `root`; the prompt ids."""
    import yaml
    from attribution import random_llama  # benchmarks/attribution.py (same folder)

    from crv.models.tiny import build_tokenizer
    from crv.transcoders.io import absolute_config_for, save_transcoder_set
    from crv.transcoders.module import TopKTranscoder, TranscoderSet

    tokenizer = build_tokenizer()
    model = random_llama(tokenizer, args.seed)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    # transformers 5 names the class TokenizersBackend; circuit-tracer's 4.57 knows it as
    tok_cfg = root / "model" / "tokenizer_config.json"  # PreTrainedTokenizerFast
    tok_json = json.loads(tok_cfg.read_text())
    tok_json["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.write_text(json.dumps(tok_json))

    gen = torch.Generator().manual_seed(args.seed + 1)
    transcoders = {}
    for layer in range(model.config.num_hidden_layers):
        tc = TopKTranscoder(128, args.latents, args.k, "topk", generator=gen)
        with torch.no_grad():
            tc.b_enc.copy_(0.01 * torch.randn(args.latents, generator=gen))
            tc.b_dec.copy_(0.01 * torch.randn(128, generator=gen))
        transcoders[layer] = tc.requires_grad_(False)
    tset = TranscoderSet(transcoders, k=args.k, activation="topk")
    save_transcoder_set(tset, root / "transcoders")
    # circuit-tracer wants absolute paths in config.yaml
    (root / "transcoders" / "config.yaml").write_text(
        yaml.safe_dump(absolute_config_for(root / "transcoders"), sort_keys=False)
    )
    special = set(tokenizer.all_special_ids)
    body = [i for i in range(len(tokenizer)) if i not in special]
    picks = torch.randint(0, len(body), (args.tokens - 1,), generator=gen).tolist()
    return model, tset, [tokenizer.bos_token_id] + [body[i] for i in picks]


def crv_graphs(model, tset, prompts: list[list[int]], cfg, repeats: int):
    """crv's unpruned graph of each prompt's last position, and seconds per graph (after one
    warm-up graph), as circuit-tracer's side runs them."""
    from crv.graphs.attribute import attribute_trace
    from crv.models.adapter import ArchAdapter

    adapter = ArchAdapter.for_model(model)
    attribute_trace(adapter, tset, prompts[0], [len(prompts[0]) - 1], cfg)  # warm-up
    atts, times = [], []
    for ids in prompts:
        for _ in range(repeats):
            start = time.perf_counter()
            (att,) = attribute_trace(adapter, tset, ids, [len(ids) - 1], cfg)
            times.append(time.perf_counter() - start)
        atts.append(att)
    return atts, times


def node_keys_crv(att) -> list[tuple]:
    from crv.graphs.graph import ERROR, FEATURE, LOGIT, TOKEN

    n = att.nodes
    keys = []
    for kind, layer, pos, feat in zip(n["kind"], n["layer"], n["pos"], n["feature"], strict=True):
        kind, layer, pos, feat = int(kind), int(layer), int(pos), int(feat)
        keys.append(
            {
                FEATURE: ("F", layer, pos, feat),
                ERROR: ("E", layer, pos),
                TOKEN: ("T", pos),
                LOGIT: ("L", feat),
            }[kind]
        )
    return keys


def node_keys_ct(ct: dict) -> list[tuple]:
    n_pos, n_layers = len(ct["input_ids"]), int(ct["n_layers"])
    keys = [("F", int(lay), int(p), int(f)) for lay, p, f in ct["features"]]
    keys += [("E", lay, p) for lay in range(n_layers) for p in range(n_pos)]
    keys += [("T", p) for p in range(n_pos)]
    keys += [("L", int(t)) for t in ct["logit_tokens"]]
    return keys


def compare(att, ct: dict) -> dict:
    """Edge agreement on the target rows and source columns both graphs have."""
    a_full, b_full = att.dense_adjacency(), ct["adjacency"]
    ka, kb = node_keys_crv(att), node_keys_ct(ct)
    ia, ib = {k: i for i, k in enumerate(ka)}, {k: i for i, k in enumerate(kb)}
    common = [k for k in ka if k in ib]
    rows = [k for k in common if k[0] in ("F", "L")]
    ra, rb = [ia[k] for k in rows], [ib[k] for k in rows]
    ca, cb = [ia[k] for k in common], [ib[k] for k in common]
    a, b = a_full[np.ix_(ra, ca)], b_full[np.ix_(rb, cb)]
    big = np.abs(b) > 0.01 * np.abs(b).max()
    rel = np.abs(a - b)[big] / np.maximum(np.abs(b)[big], 1e-6)
    bos_b = np.abs(b_full[:, ib[("T", 0)]]).max()
    feats_a = {k for k in ka if k[0] == "F"}
    feats_b = {k for k in kb if k[0] == "F"}
    return {
        "shared_features": len(feats_a & feats_b),
        "features": (len(feats_a), len(feats_b)),
        "same_logits": {k for k in ka if k[0] == "L"} == {k for k in kb if k[0] == "L"},
        "edges": int(big.sum()),
        "max_rel": float(rel.max()),
        "max_abs": float(np.abs(a - b).max()),
        "max_edge": float(np.abs(b).max()),
        "bos_share": float(bos_b / np.abs(b_full).max()),
        "bos_in_crv": ("T", 0) in ia,
    }


def run_inputs(root: Path, args: argparse.Namespace):
    """A crv run's subject, transcoders, graph settings and the `--graphs` test-step prompts
    with the least confident explained prediction (lowest top-logit probability), each cut
    after its explained position; copies of the subject and transcoders under `root` in the
    layout circuit-tracer reads."""
    import shutil

    import yaml

    from crv.graphs.config import GraphsConfig
    from crv.graphs.store import iter_step_graphs
    from crv.io import read_json
    from crv.models.loading import load_subject
    from crv.pipeline import MANIFEST
    from crv.traces.store import load_traces
    from crv.transcoders.io import absolute_config_for, load_transcoder_set

    artifacts = {k: Path(v) for k, v in read_json(Path(args.run) / "artifacts.json").items()}
    cfg = GraphsConfig(**read_json(artifacts["graphs"] / MANIFEST)["config"])
    traces = load_traces(artifacts["traces"])
    test = {
        t: i
        for i, (t, split) in enumerate(zip(traces["id"], traces["split"], strict=True))
        if split == "test"
    }
    graphs = [g for g in iter_step_graphs(artifacts["graphs"]) if g.trace_id in test]
    graphs.sort(key=lambda g: g.scores["top_logit_prob"])
    prompts = [
        traces[test[g.trace_id]]["input_ids"][: g.position + 1] for g in graphs[: args.graphs]
    ]
    shutil.copytree(artifacts["subject"], root / "model")
    tok_cfg = root / "model" / "tokenizer_config.json"  # see build_inputs
    tok_cfg.write_text(
        json.dumps(
            {**json.loads(tok_cfg.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}
        )
    )
    shutil.copytree(artifacts["transcoders"], root / "transcoders")
    (root / "transcoders" / "config.yaml").write_text(
        yaml.safe_dump(absolute_config_for(root / "transcoders"), sort_keys=False)
    )
    model, _ = load_subject(artifacts["subject"])
    model.requires_grad_(False)
    tset = load_transcoder_set(artifacts["transcoders"])
    if tset.activation != "topk":
        sys.exit(f"circuit-tracer has TopK, not {tset.activation!r}: compare topk transcoders")
    for layer in tset.layers:
        tset[layer].requires_grad_(False)
    return model, tset, prompts, cfg


SETTINGS = {"max_feature_nodes": 128, "max_logits": 10, "batch_size": 32, "update_interval": 2}
"""Graph settings of the random comparison (GraphsConfig fields)."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ct-python", default="/tmp/ctvenv/bin/python")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run", help="a crv run directory: its subject, transcoders, test traces")
    parser.add_argument("--graphs", type=int, default=3, help="with --run: graphs compared")
    parser.add_argument("--tokens", type=int, default=100, help="prompt length incl. BOS")
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    for name in SETTINGS:  # with --run, given ones replace the run's graph settings
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed graphs per prompt and side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    torch.set_num_threads(args.threads)
    from crv.graphs.config import GraphsConfig

    with tempfile.TemporaryDirectory(prefix="crv_vs_ct_") as tmp:
        root = Path(tmp)
        given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
        if args.run:
            model, tset, prompts, cfg = run_inputs(root, args)
            cfg = dataclasses.replace(cfg, **given)
            title = (
                f"run {args.run}: {tset[0].n_latents} latents/layer "
                f"transcoders k={tset.k}; {len(prompts)} least confident test steps, "
                f"{', '.join(str(len(p)) for p in prompts)} tokens"
            )
        else:
            model, tset, ids = build_inputs(root, args)
            prompts = [ids]
            cfg = GraphsConfig(**{**SETTINGS, **given})
            title = (
                f"random 4-layer hidden-128 Llama, {args.latents} latents/layer k={args.k} topk; "
                f"{len(ids)} tokens"
            )
        spec = {
            "model": str(root / "model"),
            "transcoders": str((root / "transcoders").resolve()),
            "prompts": prompts,
            "k": tset.k,
            "max_logits": cfg.max_logits,
            "logit_cum_prob": cfg.logit_cum_prob,
            "batch_size": cfg.batch_size,
            "max_feature_nodes": cfg.max_feature_nodes,
            "update_interval": cfg.update_interval,
            "repeats": args.repeats,
            "threads": args.threads,
            "out": str(root),
        }
        (root / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        env["CIRCUIT_TRACER_CACHE_DIR"] = str(root / "ct_cache")  # absolute paths bypass it
        env.pop("PYTHONPATH", None)  # the child imports circuit_tracer, never crv
        proc = subprocess.run(
            [args.ct_python, str(Path(__file__).resolve()), "--child", str(root / "spec.json")],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(
                f"circuit-tracer subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        cts = [dict(np.load(root / f"ct_{i}.npz")) for i in range(len(prompts))]
        atts, crv_times = crv_graphs(model, tset, prompts, cfg, args.repeats)

    for ids, ct in zip(prompts, cts, strict=True):
        if list(ct["input_ids"]) != list(ids):
            sys.exit("circuit-tracer attributed a different token sequence")
    cmps = [compare(att, ct) for att, ct in zip(atts, cts, strict=True)]
    s_crv = statistics.median(crv_times)
    s_ct = statistics.median([t for ct in cts for t in ct["times"].tolist()])
    print(
        f"{title}; max_feature_nodes {cfg.max_feature_nodes}, max_logits {cfg.max_logits}, "
        f"batch {cfg.batch_size}, update_interval {cfg.update_interval}, threads {args.threads}"
    )
    print(f"{'':16} {'s/graph':>8} {'graphs/s':>9}")
    print(f"{'crv':16} {s_crv:8.3f} {1 / s_crv:9.2f}")
    print(f"{'circuit-tracer':16} {s_ct:8.3f} {1 / s_ct:9.2f}")
    for i, cmp in enumerate(cmps):
        print(
            f"graph {i}: features crv/ct {cmp['features'][0]}/{cmp['features'][1]}, shared "
            f"{cmp['shared_features']}, same logit set: {cmp['same_logits']}; compared edges "
            f"{cmp['edges']} (max |w| {cmp['max_edge']:.2f}, max abs diff {cmp['max_abs']:.1e}, "
            f"max rel {cmp['max_rel']:.1e}); BOS token node in crv: {cmp['bos_in_crv']}, its "
            f"largest edge / largest edge {cmp['bos_share']:.3f}"
        )
    same = sum(c["shared_features"] == c["features"][0] == c["features"][1] for c in cmps)
    print(f"ct_ratio: {s_ct / s_crv:.2f}")
    print(f"same_selected_features: {same}/{len(cmps)}")
    print(f"edge_agreement_max_rel: {max(c['max_rel'] for c in cmps):.2e}")


if __name__ == "__main__":
    main()
