"""Fixtures shared by every test folder (helpers to import are in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A conditioned tiny checkpoint (3 classes) with student and teacher weights."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", tiny_config())


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset folder (deterministic)."""
    from training.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", train=16, val=8, size=128, seed=0)
