"""Tiny graphs-stage inputs (a random 2-layer Llama, random transcoders, four traces) and a
stage context, shared by the graphs stage and export tests."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from factories import random_transcoder_set, tiny_llama

from crv.graphs.config import GraphsConfig
from crv.pipeline import StageContext
from crv.transcoders.io import save_transcoder_set

D = 32


N_LAYERS = 2


CFG = GraphsConfig(max_feature_nodes=24, batch_size=8, splits=["test"])


def make_artifacts(root: Path) -> dict[str, Path]:
    from datasets import Dataset

    from crv.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    model = tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=D,
        num_hidden_layers=N_LAYERS,
        num_key_value_heads=4,
        initializer_range=0.1,
    )
    model.save_pretrained(root / "subject")
    tokenizer.save_pretrained(root / "subject")
    save_transcoder_set(
        random_transcoder_set(D, 64, 4, range(N_LAYERS), seed=1), root / "transcoders"
    )
    rng = np.random.default_rng(0)
    rows = []
    for i, split in enumerate(["test", "train", "test", "test"]):
        n = int(rng.integers(14, 24))
        ends = sorted(rng.choice(np.arange(6, n), 3, replace=False).tolist())
        steps = [
            {"index": j, "text": "", "label": True, "last_token": e} for j, e in enumerate(ends)
        ]
        if i == 2:  # a step whose token was cut off: skipped, not fatal
            steps.append({"index": 3, "text": "", "label": None, "last_token": n + 5})
        rows.append(
            {
                "id": f"t/{i}",
                "input_ids": [1] + rng.integers(4, len(tokenizer), n - 1).tolist(),
                "prompt_len": 5,
                "steps": steps,
                "split": split,
            }
        )
    Dataset.from_list(rows).save_to_disk(str(root / "traces" / "dataset"))
    return {
        "subject": root / "subject",
        "traces": root / "traces",
        "transcoders": root / "transcoders",
    }


def context(root: Path, inputs: dict[str, Path], out: str) -> StageContext:
    (root / out).mkdir()
    return StageContext(
        name="graphs",
        cfg=CFG,
        inputs=inputs,
        out=root / out,
        scratch=root / "scratch",
        seed=0,
        device="cpu",
        log=logging.getLogger("test"),
    )
