"""What a training run reports: ``log.jsonl`` (one JSON object per logged iteration or
evaluation) and TensorBoard scalars under ``OUTPUT/tensorboard``. Rank 0 only.

TensorBoard tags: ``loss/<term>`` for every loss term and ``loss/total``; ``train/lr``,
``train/images_per_s`` (all processes together), ``train/s_per_iter``,
``train/grad_norm``, ``train/skipped_steps``; ``pseudo/count`` (pseudo masks assigned
per iteration, all processes) and ``pseudo/mean_score`` (their mean mask-aware score);
``health/<key>`` for :data:`training.health.HEALTH_KEYS` (mask statistics, gradient norms);
``eval/segm_AP``, ``eval/bbox_AP`` ... after each evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from training.health import HEALTH_KEYS

log = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _tag(key: str) -> str:
    if key == "loss":
        return "loss/total"
    if key.startswith("loss_"):
        return f"loss/{key[5:]}"
    if key == "pseudo_masks":
        return "pseudo/count"
    if key == "pseudo_mask_score":
        return "pseudo/mean_score"
    if key in HEALTH_KEYS:
        return f"health/{key}"
    return f"train/{key}"


def truncate_log(path: Path, last_iteration: int) -> None:
    """Drop the records past ``last_iteration`` (logged by a run that crashed after its
    last checkpoint and is now resumed from it)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iteration", 0) <= last_iteration:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class TrainingLog:
    """JSON lines + TensorBoard. ``enabled=False`` (ranks > 0) makes every call a no-op.

    ``start_iteration`` > 0 (a resumed run) drops what a crashed run logged after it.
    """

    def __init__(self, output: str | Path, enabled: bool = True, start_iteration: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        output = Path(output)
        path = output / LOG_NAME
        if start_iteration > 0:
            truncate_log(path, start_iteration)
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSON log only
                log.warning("tensorboard is not installed: logging to %s only", path)
            else:
                # purge_step: a resumed run hides what the crashed one wrote after its checkpoint
                self.writer = SummaryWriter(str(output / TENSORBOARD_DIR), purge_step=start_iteration or None)

    def scalars(self, record: dict, iteration: int) -> None:
        """One training record (numbers only are sent to TensorBoard)."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(_tag(key), value, iteration)

    def evaluation(self, metrics: dict, iteration: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"iteration": iteration, "eval": {k: metrics[k] for k in ("segm", "bbox") if k in metrics}}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for kind in ("segm", "bbox"):
                for name, value in metrics.get(kind, {}).items():
                    self.writer.add_scalar(f"eval/{kind}_{name}", value, iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
