"""Layer-split transcoder training (`crv.transcoders.distributed`): a layer's transcoder
is the same whichever process trains it; two gloo ranks on CPU give the single-process set;
`torchrun -m crv.cli.torchrun` writes the artifact a single-process run writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from factories import tiny_llama

from crv.models.adapter import ArchAdapter
from crv.transcoders.activations import layer_groups
from crv.transcoders.config import TranscodersConfig
from crv.transcoders.distributed import assign_layers, train_layer_split
from crv.transcoders.io import load_transcoder_set, save_transcoder_set
from crv.transcoders.module import TranscoderSet
from crv.transcoders.train import train_transcoders

BIN = Path(sys.executable).parent


def _setup(n_layers: int, **cfg: object) -> tuple[TranscodersConfig, torch.nn.Module, list]:
    model = tiny_llama(seed=3, num_hidden_layers=n_layers).requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    seqs = [
        torch.randint(1, 50, (int(n),), generator=gen).tolist()
        for n in [*range(4, 17), *range(6, 16)]
    ]
    base = dict(expansion=4, k=8, tokens=1500, batch_tokens=128, lr_warmup_steps=2)
    base.update(model_batch_seqs=4, max_seq_len=16, dead_tokens=300, runtime_log_every=2)
    base.update(shuffle_buffer_tokens=512)
    return TranscodersConfig(**{**base, **cfg}), model, seqs


def _assert_same(a: TranscoderSet, b: TranscoderSet, layers: list[int]) -> None:
    for layer in layers:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(
                getattr(a[layer], name), getattr(b[layer], name), rtol=1e-5, atol=1e-6
            )


def test_assign_layers_contiguous_blocks() -> None:
    assert assign_layers([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3, 4]]
    assert assign_layers([5, 7], 3) == [[5], [], [7]]
    blocks = assign_layers(list(range(32)), 5)
    assert sum(blocks, []) == list(range(32)) and {len(b) for b in blocks} == {6, 7}


def test_owned_layers_train_as_in_the_full_run() -> None:
    # 1 MiB of float32 holds 2 layers' min_shuffle_tokens but not 4: groups [0, 1], [2, 3].
    cfg, model, seqs = _setup(
        4, buffer_mb=1, buffer_dtype="float32", shuffle_buffer_tokens=1500, min_shuffle_tokens=1500
    )
    adapter = ArchAdapter.for_model(model)
    assert layer_groups(cfg, [0, 1, 2, 3], adapter.d_model) == [[0, 1], [2, 3]]
    full, full_hist = train_transcoders(cfg, model, adapter, seqs, [0, 1, 2, 3], "cpu", 7)
    # Layer 1 starts after layer 0's draw in group 0; layer 2 is group 1's first (seed + 1).
    part, part_hist = train_transcoders(
        cfg, model, adapter, seqs, [0, 1, 2, 3], "cpu", 7, progress=False, own=[1, 2]
    )
    assert part.layers == [1, 2] and part_hist.passes == 2
    _assert_same(full, part, [1, 2])
    assert part_hist.fvu == {layer: full_hist.fvu[layer] for layer in (1, 2)}
    other, _ = train_transcoders(cfg, model, adapter, seqs, [0, 1, 2, 3], "cpu", 8, own=[1])
    assert not torch.allclose(other[1].W_enc, full[1].W_enc)  # the seed matters


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg, model, seqs = _setup(3)
        adapter = ArchAdapter.for_model(model)
        tset, history = train_layer_split(
            cfg, model, adapter, seqs, [0, 1, 2], "cpu", 7, progress=False
        )
        if rank == 0:
            save_transcoder_set(tset, Path(out))
        else:
            assert tset is None  # only rank 0 holds the whole set
        (Path(out) / f"history{rank}.json").write_text(json.dumps(history.as_dict()))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_give_the_single_process_set(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    cfg, model, seqs = _setup(3)
    single, history = train_transcoders(
        cfg, model, ArchAdapter.for_model(model), seqs, [0, 1, 2], "cpu", 7, progress=False
    )
    tset = load_transcoder_set(tmp_path, "cpu")  # rank 0 trained layers 0 and 1, rank 1 layer 2
    assert tset.layers == [0, 1, 2] and tset.k == cfg.k
    _assert_same(single, tset, [0, 1, 2])
    for rank in (0, 1):
        merged = json.loads((tmp_path / f"history{rank}.json").read_text())
        assert merged["fvu"] == {str(k): v for k, v in history.fvu.items()}
        assert merged["steps"] == history.steps


@pytest.mark.slow
def test_torchrun_writes_the_single_process_artifact(tmp_path: Path) -> None:
    """The torchrun entry point on crv-tiny: the transcoders artifact lands under the key
    a single-process `crv` uses, with the same weights."""
    overrides = [
        "experiment=smoke",
        "pipeline.stages=[transcoders]",
        "traces.n_per_complexity=4",
        "traces.complexities=[3]",
        "transcoders.tokens=6000",
        "transcoders.shuffle_buffer_tokens=2048",
        "transcoders.eval_tokens=512",
        "transcoders.per_layer_ce=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    proc = subprocess.run(
        [*torchrun, "--nproc_per_node=2", "-m", "crv.cli.torchrun", *overrides,
         f"hydra.run.dir={tmp_path}/run2", f"pipeline.cache_dir={tmp_path}/cache2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "run2" / "artifacts.json").read_text())["transcoders"]
    # The same upstream artifacts, transcoders trained again by one process.
    shutil.copytree(tmp_path / "cache2", tmp_path / "cache1")
    shutil.rmtree(tmp_path / "cache1" / "transcoders")
    proc = subprocess.run(
        [str(BIN / "crv"), *overrides,
         f"hydra.run.dir={tmp_path}/run1", f"pipeline.cache_dir={tmp_path}/cache1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = json.loads((tmp_path / "run1" / "artifacts.json").read_text())["transcoders"]
    assert Path(one).name == Path(two).name  # the same cache key
    a, b = load_transcoder_set(one, "cpu"), load_transcoder_set(two, "cpu")
    assert a.layers == b.layers == [0, 1, 2, 3]
    _assert_same(a, b, a.layers)
    history = json.loads((Path(two) / "train_history.json").read_text())
    assert sorted(history["fvu"]) == ["0", "1", "2", "3"]


def test_without_torchrun_it_says_how_to_start() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "crv.cli.torchrun", "experiment=smoke"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "torchrun --nproc_per_node=2 -m crv.cli.torchrun" in proc.stderr
