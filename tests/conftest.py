"""Shared test helpers: the tiny config, a deterministic "conditioned" checkpoint,
paths to the shared fixtures. One place, so every test module builds models alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.checkpoint import save_checkpoint
from training.config import Config, load_config
from training.model.condinst import build_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BOXTEACHER_SHARED", REPO.parent / "shared"))
PENNFUDAN = SHARED / "datasets" / "pennfudan"
AUTHORS_FIXTURE = SHARED / "fixtures" / "authors-boxteacher-r18"

torch.set_num_threads(2)


def tiny_config(num_classes: int = 3, overrides: list[str] | None = None) -> Config:
    """configs/synthetic-tiny.yaml with ``num_classes`` classes named class_0..."""
    names = [f"class_{i}" for i in range(num_classes)]
    return load_config(REPO / "configs" / "synthetic-tiny.yaml", [f"model.num_classes={num_classes}", f"class_names={names}"] + list(overrides or []))


def conditioned_model(cfg: Config, seed: int = 0):
    """A random tiny model whose biases are set so it predicts many non-trivial
    instances (like the authors' fixture): plain init predicts nothing above 0.05."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.head.cls_logits.bias.copy_(torch.randn(cfg.model.num_classes, generator=g) * 0.3 - 1.0)
        model.head.bbox_pred.bias.copy_(1.0 + torch.randn(4, generator=g) * 0.1)
        model.head.ctrness.weight.normal_(0, 0.05, generator=g)
        model.head.controller.weight.normal_(0, 0.02, generator=g)
        model.head.controller.bias.normal_(0, 0.05, generator=g)
    return model.eval()


def write_checkpoint(path: Path, cfg: Config, seed: int = 0, with_teacher: bool = True) -> Path:
    model = conditioned_model(cfg, seed)
    state = model.state_dict()
    teacher = conditioned_model(cfg, seed + 100).state_dict() if with_teacher else None
    return save_checkpoint(path, {"config": cfg.model_dump(), "student": state, "teacher": teacher, "iteration": 0})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A conditioned tiny checkpoint (3 classes) with student and teacher weights."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", tiny_config())


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset folder (deterministic)."""
    from training.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", train=16, val=8, size=128, seed=0)
