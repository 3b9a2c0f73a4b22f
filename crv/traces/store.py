"""The public loader of a `traces` artifact (its `dataset/` folder, a Hugging Face dataset)."""

from __future__ import annotations

from pathlib import Path


def load_traces(path: str | Path):
    """The traces dataset of a `traces` artifact, held in memory: a memory-mapped one would
    write `datasets`' cache files for every `filter` or `select` into the artifact, which
    would then fail its integrity check and be recomputed."""
    from datasets import load_from_disk

    return load_from_disk(str(Path(path) / "dataset"), keep_in_memory=True)
