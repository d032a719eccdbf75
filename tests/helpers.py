"""Shared test helpers, imported by name (``from helpers import ...``; pytest puts tests/ on
sys.path): the tiny config, a deterministic "conditioned" checkpoint, paths to the shared
fixtures, mask IoU. One place, so every test module builds models alike. Fixtures live in
the conftest.py files (tests/conftest.py: shared; one per folder for its own)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from training.checkpoint import conditioned_model, write_random_checkpoint
from training.config import Config, load_config

__all__ = ["AUTHORS_FIXTURE", "PENNFUDAN", "REPO", "SHARED", "conditioned_model", "iou", "tiny_config", "write_checkpoint"]

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BOXTEACHER_SHARED", REPO.parent / "shared"))
PENNFUDAN = SHARED / "datasets" / "pennfudan"
AUTHORS_FIXTURE = SHARED / "fixtures" / "authors-boxteacher-r18"


def tiny_config(num_classes: int = 3, overrides: list[str] | None = None) -> Config:
    """configs/synthetic-tiny.yaml with ``num_classes`` classes named class_0..."""
    names = [f"class_{i}" for i in range(num_classes)]
    return load_config(
        REPO / "configs" / "synthetic-tiny.yaml", [f"model.num_classes={num_classes}", f"class_names={names}"] + list(overrides or [])
    )


def write_checkpoint(path: Path, cfg: Config, seed: int = 0, with_teacher: bool = True) -> Path:
    """A conditioned random checkpoint (training.checkpoint.write_random_checkpoint)."""
    return write_random_checkpoint(path, cfg, seed, with_teacher)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
