"""The checkpoints of one run folder: names, the latest valid one, pruning, RNG states.

A run folder holds ``model_NNNNNNN.pth`` (periodic, NNNNNNN = iterations done) and
``model_final.pth``. Each is written atomically (:func:`training.checkpoint.save_checkpoint`),
so a crash leaves at most a stray ``.model_*.tmp`` file, never a half-written
checkpoint under a real name; a file damaged afterwards (disk full, copy cut short) is
detected by :func:`latest_valid_checkpoint`, which warns and falls back to the one before.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

FINAL_NAME = "model_final.pth"
_PERIODIC = re.compile(r"^model_(\d{7,})\.pth$")
# What a checkpoint must hold to continue training from it.
TRAINING_KEYS = ("config", "student", "iteration", "optimizer", "scheduler")


def periodic_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def periodic_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the periodic checkpoints in ``output``, oldest first."""
    out = []
    for p in Path(output).glob("model_*.pth"):
        m = _PERIODIC.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def candidate_checkpoints(output: str | Path) -> list[Path]:
    """Checkpoints to resume from, most recent first: the final one, then periodic ones."""
    output = Path(output)
    final = [output / FINAL_NAME] if (output / FINAL_NAME).is_file() else []
    return final + [p for _, p in reversed(periodic_checkpoints(output))]


def latest_valid_checkpoint(output: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The most recent checkpoint in ``output`` that reads back and holds a training
    state, with its contents; None when there is none. A damaged one is skipped with a
    warning naming it."""
    for path in candidate_checkpoints(output):
        try:
            ckpt = read_checkpoint(path)
            missing = [k for k in TRAINING_KEYS if ckpt.get(k) is None]
            if missing:
                raise CheckpointError(f"checkpoint {path} has no training state ({', '.join(missing)} missing)")
        except CheckpointError as err:
            log.warning("resume: skipping %s: %s; falling back to the previous checkpoint", path.name, err)
            continue
        return path, ckpt
    return None


def prune_checkpoints(output: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recent periodic checkpoints (``keep <= 0``: keep
    all); the final checkpoint is never deleted. Returns the deleted paths."""
    if keep <= 0:
        return []
    old = [p for _, p in periodic_checkpoints(output)][:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def remove_stale_temporaries(output: str | Path) -> None:
    """Temp files left by a process killed while writing a checkpoint."""
    for p in Path(output).glob(".model_*.tmp"):
        p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """This process's random generators: python, numpy, torch CPU (and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
