"""Test-wide settings: one torch thread in every test (tiny models gain nothing from more, a
shared machine makes thread contention dominate, and a test that trains crv-tiny may set
its recipe's thread count) and deterministic seeds per test."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
