"""Shared test helpers: the tiny config, a deterministic "conditioned" checkpoint,
paths to the shared fixtures. One place, so every test module builds models alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.checkpoint import conditioned_model, write_random_checkpoint  # noqa: F401 - conditioned_model: re-exported for tests
from training.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BOXTEACHER_SHARED", REPO.parent / "shared"))
PENNFUDAN = SHARED / "datasets" / "pennfudan"
AUTHORS_FIXTURE = SHARED / "fixtures" / "authors-boxteacher-r18"

torch.set_num_threads(2)


def tiny_config(num_classes: int = 3, overrides: list[str] | None = None) -> Config:
    """configs/synthetic-tiny.yaml with ``num_classes`` classes named class_0..."""
    names = [f"class_{i}" for i in range(num_classes)]
    return load_config(REPO / "configs" / "synthetic-tiny.yaml", [f"model.num_classes={num_classes}", f"class_names={names}"] + list(overrides or []))


def write_checkpoint(path: Path, cfg: Config, seed: int = 0, with_teacher: bool = True) -> Path:
    """A conditioned random checkpoint (training.checkpoint.write_random_checkpoint)."""
    return write_random_checkpoint(path, cfg, seed, with_teacher)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A conditioned tiny checkpoint (3 classes) with student and teacher weights."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", tiny_config())


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset folder (deterministic)."""
    from training.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", train=16, val=8, size=128, seed=0)
