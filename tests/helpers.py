"""Shared test helpers, imported by name (``from helpers import ...``; pytest puts tests/ on
sys.path): the tiny config, a deterministic "conditioned" checkpoint, paths to the shared
fixtures, mask IoU. One place, so every test module builds models alike. Fixtures live in
the conftest.py files (tests/conftest.py: shared; one per folder for its own)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from training.checkpoint import conditioned_model, write_random_checkpoint
from training.config import Config, load_config
from training.data.synthetic import render_image

__all__ = [
    "AUTHORS_FIXTURE",
    "PENNFUDAN",
    "REPO",
    "SHARED",
    "SMALL_SCALE",
    "conditioned_model",
    "iou",
    "local_server",
    "logit",
    "shapes_image",
    "tiny_config",
    "write_checkpoint",
]

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BOXTEACHER_SHARED", REPO.parent / "shared"))
PENNFUDAN = SHARED / "datasets" / "pennfudan"
AUTHORS_FIXTURE = SHARED / "fixtures" / "authors-boxteacher-r18"
SMALL_SCALE = ["input.min_size_test=64", "input.max_size_test=96"]
"""Overrides of the tiny config for serving tests: images resized to at most 64x96."""


def tiny_config(num_classes: int = 3, overrides: list[str] | None = None) -> Config:
    """configs/synthetic-tiny.yaml with ``num_classes`` classes named class_0..."""
    names = [f"class_{i}" for i in range(num_classes)]
    return load_config(
        REPO / "configs" / "synthetic-tiny.yaml", [f"model.num_classes={num_classes}", f"class_names={names}"] + list(overrides or [])
    )


def write_checkpoint(path: Path, cfg: Config, seed: int = 0, with_teacher: bool = True) -> Path:
    """A conditioned random checkpoint (training.checkpoint.write_random_checkpoint)."""
    return write_random_checkpoint(path, cfg, seed, with_teacher)


def logit(p: float) -> float:
    """The inverse sigmoid, for hand-computed loss values."""
    return math.log(p / (1.0 - p))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def shapes_image(seed: int, k: int, h: int = 96, w: int | None = None) -> np.ndarray:
    """A deterministic synthetic-shapes image (h, w, 3) uint8: the ``k``-th of stream ``seed``
    (rendered at max(h, w), then cropped)."""
    w = w or h
    pixels, _ = render_image(np.random.default_rng([seed, k]), max(h, w))
    return np.ascontiguousarray(pixels[:h, :w])


@contextlib.contextmanager
def local_server(checkpoint: Path, headers: dict | None = None, **settings) -> Iterator:
    """The HTTP API on a free local port (serving.local.LocalServer) for ``checkpoint``, with
    ``ServeSettings(**settings)``."""
    from serving.app import create_app
    from serving.local import LocalServer
    from serving.settings import ServeSettings

    with LocalServer(create_app(ServeSettings(model=checkpoint, **settings)), headers=headers) as server:
        yield server
