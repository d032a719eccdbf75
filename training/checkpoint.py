"""Checkpoint files: what they hold, atomic writes, loading a model from one.

A checkpoint is a ``torch.save`` dict:
  format: "boxteacher", version: 1,
  config: the fully resolved Config (dict), class names included,
  student: state dict of the trained network,
  teacher: state dict of the EMA teacher (BoxTeacher only; what eval uses by default),
  iteration, optimizer, scheduler, scaler, rng, nonfinite, world_size (training state, optional),
  meta: free-form provenance (e.g. converted from the authors' checkpoint).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from training.config import Config
from training.model.condinst import CondInst, build_model

log = logging.getLogger(__name__)

FORMAT = "boxteacher"
VERSION = 1
Branch = Literal["teacher", "student"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message says why."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically: a temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on CPU; a truncated or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a boxteacher checkpoint; convert the authors' checkpoints with 'boxteacher convert --from authors'"
        )
    return ckpt


def config_of(ckpt: dict[str, Any]) -> Config:
    return Config.model_validate(ckpt["config"])


def default_branch(ckpt: dict[str, Any]) -> Branch:
    """The teacher when there is one (what BoxTeacher evaluates), else the student."""
    return "teacher" if ckpt.get("teacher") is not None else "student"


def load_model(path: str | Path, branch: Branch | None = None, device: str | torch.device = "cpu") -> tuple[CondInst, Config]:
    """Build the network from a checkpoint's config and load one branch, in eval mode."""
    ckpt = read_checkpoint(path)
    cfg = config_of(ckpt)
    branch = branch or default_branch(ckpt)
    state = ckpt.get(branch)
    if state is None:
        raise CheckpointError(f"{path} has no '{branch}' weights (it has: {[k for k in ('teacher', 'student') if ckpt.get(k)]})")
    cfg_no_download = cfg.model_copy(deep=True)
    cfg_no_download.model.backbone.weights = "none"  # the checkpoint holds every weight
    model = build_model(cfg_no_download)
    model.load_state_dict(state)
    model.cfg = cfg
    return model.to(device).eval(), cfg


def load_weights_into(model: CondInst, path: str | Path, branch: Branch | None = None) -> None:
    """Start training from any of our checkpoints (``model.weights=PATH``).

    Tensors whose shape differs (the classifier when the number of classes changed)
    keep their fresh initialisation, with a message naming them.
    """
    ckpt = read_checkpoint(path)
    state = ckpt.get(branch or default_branch(ckpt))
    ours = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
    skipped = sorted(k for k in state if k in ours and ours[k].shape != state[k].shape)
    if skipped:
        log.warning("model.weights: re-initialised %s (shapes differ: another number of classes?)", ", ".join(skipped))
    missing, unexpected = model.load_state_dict(fitting, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise CheckpointError(f"model.weights {path} does not fit this model: missing {missing}, unexpected {unexpected}")


def conditioned_model(cfg: Config, seed: int = 0) -> CondInst:
    """A random model whose head biases are set so that it predicts many non-trivial
    instances (plain initialisation predicts nothing above 0.05): for tests and for timing
    benchmarks of models nobody trained (e.g. an R-50-FPN with ``model.backbone.weights=none``)."""
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


def write_random_checkpoint(path: str | Path, cfg: Config, seed: int = 0, with_teacher: bool = True) -> Path:
    """A checkpoint of :func:`conditioned_model` weights (student seed, teacher seed + 100)."""
    student = conditioned_model(cfg, seed).state_dict()
    teacher = conditioned_model(cfg, seed + 100).state_dict() if with_teacher else None
    return save_checkpoint(path, {"config": cfg.model_dump(), "student": student, "teacher": teacher, "iteration": 0})
