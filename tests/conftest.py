"""Test-wide settings: one torch thread in every test (tiny models gain nothing from more, a
shared machine makes thread contention dominate, and a test that trains crv-tiny may set
its recipe's thread count), deterministic seeds per test, and the tiny bundle the bundle,
crv-verify and export tests share (built once per session)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_bundle import build_parts, make_bundle

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bundle_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Subject, transcoder and verifier directories of the tiny bundle."""
    return build_parts(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, bundle_parts: dict[str, Path]) -> Path:
    """A bundle with the subject model embedded."""
    return make_bundle(tmp_path_factory.mktemp("embedded"), bundle_parts)
