"""Multi-process training with PyTorch's own tools: torchrun + DistributedDataParallel.

``torchrun`` starts one process per GPU (or per CPU worker) and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. The same code
runs with one process and no environment at all: every helper here degrades to the
identity when no process group is initialised.

- :func:`launch`: the process group from the torchrun environment (NCCL on GPUs,
  gloo on CPU), the per-process device, quieter logging on ranks > 0;
- collectives used by the loop: :func:`reduce_mean` (the number of positives averaged
  over processes, criterion's hook), :func:`all_ranks_true` (every rank agrees to skip a
  non-finite step), :func:`average_buffers_` (the EMA teacher's BN statistics),
  :func:`all_gather_objects`;
- :class:`ResumableDistributedSampler`: torch's ``DistributedSampler`` that can start
  part-way through an epoch (resume without reading the skipped images);
- :func:`evaluate_distributed`: every rank predicts a shard of the split, rank 0 runs
  COCOeval, every rank gets the same metrics.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)

# Evaluation of a large split or a slow checkpoint write on rank 0 keeps the other ranks
# waiting in a collective; torch's default NCCL timeout (10 min) is too short for that.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_environment() -> DistInfo | None:
    """The process's place in a torchrun job, or None when not started by torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def info() -> DistInfo:
    """Rank and world size of the initialised process group (0 / 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        env = torchrun_environment()
        return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank if env else 0)
    return DistInfo()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return info().is_main


def process_device(device: str, local_rank: int) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` (one GPU per process); anything else unchanged."""
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


@contextlib.contextmanager
def launch(device: str) -> Iterator[str]:
    """Join the torchrun job when there is one; yields this process's device.

    NCCL for CUDA devices, gloo otherwise. Without torchrun (or with WORLD_SIZE=1 and
    no group wanted) nothing is initialised. Ranks > 0 log warnings only. The group is
    destroyed on exit, also after an error, so that the other ranks are not left hanging.
    """
    env = torchrun_environment()
    if env is None or env.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    device = process_device(device, env.local_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    if env.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s), this is rank %d on %s", env.world_size, backend, env.rank, device)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (a copy; the identity on one process).

    This is criterion's ``reduce_mean`` hook: the number of positive locations is
    averaged over processes so that sum(loss) / mean(#pos) on each rank, averaged by
    DDP, equals sum over the whole batch / #pos of the whole batch.
    """
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_ranks_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only when ``flag`` is true on every process (one all-reduce of a scalar)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def sum_over_ranks(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of a list of floats over all processes."""
    if not is_distributed() or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def average_buffers_(module: torch.nn.Module) -> None:
    """Average floating-point buffers over processes; others (counters) from rank 0.

    The EMA teacher is not wrapped in DDP: its parameters are identical everywhere (an
    EMA of identical student parameters), but BatchNorm running statistics, updated by
    the teacher's own train-mode forwards, are per rank. Averaging them before a
    checkpoint or an evaluation makes every rank hold (and rank 0 save) the same teacher.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)
        else:
            dist.broadcast(buf, src=0)


@torch.no_grad()
def parameter_fingerprint(module: torch.nn.Module) -> tuple[float, float]:
    """Two numbers that change with any parameter: sum_i (i+1) * sum(p_i), sum of squares."""
    a = b = 0.0
    for i, p in enumerate(module.parameters()):
        d = p.detach().double()
        a += (i + 1) * float(d.sum())
        b += float((d * d).sum())
    return a, b


def check_same_on_all_ranks(module: torch.nn.Module, what: str) -> None:
    """Raise when ``module``'s parameters differ between processes (they must not: DDP
    keeps the student in step, the teacher is an EMA of it). A collective."""
    if not is_distributed():
        return
    prints = all_gather_objects(parameter_fingerprint(module))
    if any(p != prints[0] for p in prints[1:]):
        raise RuntimeError(f"the {what}'s parameters differ between processes: {prints}")


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled per epoch with ``seed + epoch``) that can skip the
    first ``skip`` indices of one epoch: a resumed run continues the same data order
    without loading the images it already saw.

    Call :meth:`start_at` once before iterating; :meth:`set_epoch` then works as usual.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._skip_epoch = -1
        self._skip = 0

    def start_at(self, epoch: int, skip: int) -> None:
        self._skip_epoch, self._skip = epoch, skip

    def __iter__(self):
        indices = list(super().__iter__())
        if self.epoch == self._skip_epoch:
            indices = indices[self._skip :]
        return iter(indices)


def start_position(iteration: int, indices_per_epoch: int, batch_per_process: int) -> tuple[int, int]:
    """(epoch, indices to skip in it) after ``iteration`` batches of ``batch_per_process``,
    with ``drop_last`` batching of ``indices_per_epoch`` indices per epoch."""
    batches_per_epoch = indices_per_epoch // batch_per_process
    if batches_per_epoch == 0:
        raise ValueError(
            f"each process gets {indices_per_epoch} images per epoch, fewer than its batch of {batch_per_process}; "
            "use a smaller solver.batch_size or fewer processes"
        )
    return iteration // batches_per_epoch, (iteration % batches_per_epoch) * batch_per_process


@torch.no_grad()
def evaluate_distributed(model, data_dir: str | Path, split: str = "val", mask_mode: str = "mask") -> dict:
    """COCO metrics of ``model`` on DIR/annotations/SPLIT.json, sharing the work.

    Rank r predicts images r, r + W, r + 2W ...; the COCO-format results are gathered
    on rank 0, which runs COCOeval; the metrics are broadcast so every rank returns the
    same dict (same layout as :func:`training.evaluate.evaluate_model`). On one process
    this is exactly ``evaluate_model``.
    """
    from training.data.coco import CocoInstances
    from training.evaluate import coco_metrics, evaluate_model, instances_to_coco

    if not is_distributed():
        return evaluate_model(model, data_dir, split, mask_mode)
    rank, world = dist.get_rank(), dist.get_world_size()
    class_agnostic = bool(model.cfg.data.class_agnostic)
    dataset = CocoInstances(data_dir, split, class_agnostic=class_agnostic)
    model.eval()
    results: dict[int, tuple[list[dict], list[dict]]] = {}
    for i in range(rank, len(dataset), world):
        image, target = dataset[i]
        image_id = int(target["image_id"])
        if image_id in results:  # a corrupt image was replaced by the next one
            continue
        inst = model.predict([image], resize=True)[0]
        results[image_id] = instances_to_coco(inst, image_id, dataset.label_to_category_id, mask_mode)
    gathered = all_gather_objects(results)
    metrics = None
    if rank == 0:
        merged: dict[int, tuple[list[dict], list[dict]]] = {}
        for part in gathered:
            for image_id, res in part.items():
                merged.setdefault(image_id, res)
        ids = sorted(merged)
        bbox = [r for i in ids for r in merged[i][0]]
        segm = [r for i in ids for r in merged[i][1]]
        metrics = {
            "segm": coco_metrics(dataset.coco, segm, "segm", ids, use_cats=not class_agnostic),
            "bbox": coco_metrics(dataset.coco, bbox, "bbox", ids, use_cats=not class_agnostic),
            "num_images": len(ids),
            "mask_mode": mask_mode,
        }
    return broadcast_object(metrics)
