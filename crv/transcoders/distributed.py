"""Layer-split transcoder training on several processes, launched with torchrun.

    torchrun --nproc_per_node=N -m crv.cli.torchrun [crv overrides ...]

Rank 0 runs `crv` with the overrides, exactly as the console script would; the other
ranks wait. When the `transcoders` stage trains (a cached set needs no training), rank 0
sends the job (subject and traces artifact directories, the section, layers, seed) to
every rank; each rank loads the subject model, runs it over the same token stream, and
trains only its own block of layers (`assign_layers`, like sparsify's
`--distribute_modules`). The trained weights are then sent to rank 0, which saves the set
and goes on with the pipeline. The artifact is the one a single process writes (same
files, same cache key): each layer is trained as in a single process with the same seed
(`train_transcoders(own=...)`: its group's seed, initialisation and buffer), so the
weights agree to float tolerance.

Why layers and not tokens: a layer's transcoder and its Adam state fill the memory
(Llama-3.1-8B: 32 layers x 131,072 latents; 4 GiB of float32 weights per layer, 16 GiB
with gradients and Adam's moments), and layers are
independent, so no gradients are exchanged; the price is that every rank runs the subject
model over the whole corpus. Contiguous blocks keep a rank's layers inside few of the
single-process layer groups, so a rank makes few passes over the corpus.

All communication is gloo on CPU tensors (a job as JSON, the trained weights once), so
the same code runs on CPU-only machines and on GPUs (each rank trains on
`cuda:LOCAL_RANK`); nothing is pickled. Ranks read the artifacts rank 0 names, so they
share its filesystem (one node, or a cache directory on a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from crv.transcoders.activations import ActivationCache, cache_factory, load_token_sequences
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.module import TopKTranscoder, TranscoderSet
from crv.transcoders.train import TrainHistory, train_transcoders

log = logging.getLogger("crv.transcoders.distributed")

WAIT = timedelta(days=7)
"""How long a rank waits for the next message: the other ranks idle while rank 0 runs the
upstream stages (a real model's traces take hours) and the stages after the transcoders."""

STOP = {"stop": True}

busy = False
"""Rank 0 between `announce` and the end of the job. Rank 0 tells the others to stop when
`crv` ends, but not in the middle of a job: the others are then inside collectives, and
torchrun ends them when rank 0 fails."""


def active() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def assign_layers(layers: Sequence[int], world_size: int) -> list[list[int]]:
    """`layers` in contiguous near-equal blocks, one per rank (empty when ranks outnumber
    layers)."""
    bounds = [round(r * len(layers) / world_size) for r in range(world_size + 1)]
    return [list(layers[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def broadcast_json(obj: Any, src: int) -> Any:
    """`obj` of rank `src` on every rank (JSON bytes in a CPU tensor)."""
    if dist.get_rank() == src:
        data_B = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
        size = torch.tensor([data_B.numel()])
    else:
        size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src)
    if dist.get_rank() != src:
        data_B = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data_B, src)
    return json.loads(data_B.numpy().tobytes().decode())


def gather_transcoders(
    own: TranscoderSet | None,
    layers: Sequence[int],
    owners: dict[int, int],
    k: int,
    activation: str,
) -> TranscoderSet | None:
    """The whole set on rank 0 (None elsewhere: a large set fits one host's memory once):
    for each layer its owner broadcasts the tensor shapes, then sends the tensors to rank 0
    (CPU; eval mode without gradients, as `transcoder_set` gives)."""
    rank = dist.get_rank()
    out: dict[int, TopKTranscoder] = {}
    for layer in layers:
        owner = owners[layer]
        tc = own[layer].cpu() if rank == owner else None
        shapes = broadcast_json(
            {name: list(t.shape) for name, t in tc.state_dict().items()} if tc else None, owner
        )
        if rank == owner != 0:
            for value_T in tc.state_dict().values():
                dist.send(value_T.contiguous(), 0)
        elif rank == 0 != owner:
            n_latents, d_model = shapes["W_enc"]
            tc = TopKTranscoder(
                d_model, n_latents, k, activation, torch.Generator(), skip="W_skip" in shapes
            )
            state = {name: torch.empty(shape) for name, shape in shapes.items()}
            for value_T in state.values():
                dist.recv(value_T, owner)
            tc.load_state_dict(state)
        if rank == 0:
            out[layer] = tc.eval().requires_grad_(False)
    return TranscoderSet(out, k=k, activation=activation) if rank == 0 else None


def share_history(own: TrainHistory | None) -> TrainHistory:
    """The ranks' histories as one: per-layer curves merged, the wall time of the slowest
    rank (every rank saw the same tokens)."""
    parts = [
        broadcast_json(own.as_dict() if own and dist.get_rank() == r else None, r)
        for r in range(dist.get_world_size())
    ]
    parts = [p for p in parts if p]
    merged = TrainHistory(steps=parts[0]["steps"], tokens=parts[0]["tokens"])
    for part in parts:
        for name in ("fvu", "auxk", "dead_frac"):
            getattr(merged, name).update({int(k): v for k, v in part[name].items()})
    merged.seconds = max(p["seconds"] for p in parts)
    merged.tokens_per_s = min(p["tokens_per_s"] for p in parts)
    merged.passes = max(p["passes"] for p in parts)
    return merged


def train_layer_split(
    cfg: TranscodersConfig,
    model: torch.nn.Module,
    adapter: Any,
    seqs: Sequence[Sequence[int]],
    layers: Sequence[int],
    device: str | torch.device,
    seed: int,
    cache_for: Callable[[list[int]], ActivationCache | None] = lambda _: None,
    log: logging.Logger | None = None,
    progress: bool = True,
) -> tuple[TranscoderSet | None, TrainHistory]:
    """`train_transcoders` split over the ranks: a collective call, every rank passing the
    same arguments (its own model replica); each trains its block of `layers`. Rank 0
    returns the whole set (on `device`), the others None; all return the merged history."""
    blocks = assign_layers(layers, dist.get_world_size())
    mine = blocks[dist.get_rank()]
    own, history = None, None
    if mine:
        own, history = train_transcoders(
            cfg, model, adapter, seqs, layers, device, seed, cache_for, log, progress, own=mine
        )
    owners = {layer: r for r, block in enumerate(blocks) for layer in block}
    tset = gather_transcoders(own, layers, owners, cfg.k, str(cfg.activation))
    history = share_history(history)
    global busy
    busy = False
    return (tset.to(device) if tset is not None else None), history


def announce(
    subject_dir: str | Path,
    traces_dir: str | Path | None,
    cfg: TranscodersConfig,
    layers: Sequence[int],
    seed: int,
    device: str,
    cache_root: str | Path,
) -> None:
    """Rank 0, in the `transcoders` stage: send the other ranks the job they `serve`."""
    global busy
    busy = True
    job = {
        "subject": str(subject_dir),
        "traces": str(traces_dir) if traces_dir else None,
        "cfg": dataclasses.asdict(cfg),  # choices are str enums: JSON strings
        "layers": list(layers),
        "seed": seed,
        "device": device,
        "cache_root": str(cache_root),
    }
    broadcast_json(job, 0)


def local_device(device: str) -> str:
    """This rank's device for a job that rank 0 runs on `device`."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device.startswith("cuda") else device


def run_job(job: dict[str, Any]) -> None:
    """A rank other than 0: load the subject and the corpus, train this rank's layers."""
    from crv.models.adapter import ArchAdapter
    from crv.models.loading import load_subject

    cfg = TranscodersConfig(**job["cfg"])
    device = local_device(job["device"])
    torch.manual_seed(job["seed"])
    model, tokenizer = load_subject(job["subject"], device)
    model.eval().requires_grad_(False)
    seqs = load_token_sequences(cfg, job["traces"], tokenizer, "train")
    cache_for = cache_factory(cfg, job["subject"], job["traces"], job["cache_root"])
    train_layer_split(
        cfg,
        model,
        ArchAdapter.for_model(model),
        seqs,
        job["layers"],
        device,
        job["seed"],
        cache_for,
        log,
        progress=False,
    )


def serve() -> None:
    """Ranks other than 0: run the jobs rank 0 announces until it says stop."""
    while True:
        job = broadcast_json(None, 0)
        if job == STOP:
            return
        block = assign_layers(job["layers"], dist.get_world_size())[dist.get_rank()]
        log.info("training layers %s of %s", block, job["layers"])
        run_job(job)
