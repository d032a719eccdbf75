"""One rank of the 2-process gloo test (tests/training/test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/training/distributed_worker.py DATA OUT

1. ``run``: the real loop through :func:`training.distributed.launch` (the torchrun
   environment), DistributedSampler, total batch 4 = 2 processes x 2 images as 2
   micro-batches (no_sync), a periodic and a final checkpoint, evaluation shared over
   the ranks; each rank saves its student and teacher to OUT/rank{r}-run.pt.
2. ``fixed``: 3 steps on fixed data, rank r gets image r of a pair (an image and its
   mirror: both ranks have the same number of positives and mask proposals, see the
   test); saves OUT/rank{r}-fixed.pt.
3. ``nan``: a NaN injected into rank 1's loss only: both ranks skip that step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

from helpers import tiny_config  # noqa: E402

import training.train as train_module  # noqa: E402
from training import distributed as dist_utils  # noqa: E402
from training.train import Trainer  # noqa: E402

SMALL = ["input.min_size_train=[64]", "input.max_size_train=96", "input.min_size_test=64", "input.max_size_test=96",
         "boxteacher.teacher_min_size=64", "boxteacher.teacher_max_size=96"]  # fmt: skip
# Fixed-data comparisons run contiguous: with channels_last, oneDNN picks other kernels for
# a batch of 1 and of 2, whose last-bit differences can flip a top-k choice of mask
# proposals by the third step (gradients then differ by ~1e-4 relative).
FIXED = SMALL + ["method=boxteacher", "boxteacher.strong_augmentation=none", "solver.warmup_iters=0", "solver.base_lr=0.01",
                 "solver.batch_size=2", "solver.memory_format=contiguous"]  # fmt: skip


def mirrored_pair(data_dir: str | Path):
    """Image 0 of the train split at its own size, and its horizontal mirror, with targets."""
    from training.data.coco import CocoInstances

    image, target = CocoInstances(data_dir, "train")[0]
    h, w = image.shape[-2:]
    boxes = target["boxes"].float()
    flipped = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([w, 0.0, w, 0.0])

    def tgt(b):
        return {"boxes": b, "labels": target["labels"].clone(), "image_id": 1, "orig_size": (h, w)}

    return [image, image.flip(-1)], [tgt(boxes), tgt(flipped)]


def states(trainer: Trainer) -> dict:
    return {
        "student": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "teacher": {k: v.clone() for k, v in trainer.teacher.state_dict().items()},
    }


def main(data_dir: str, out: str) -> None:
    out_dir = Path(out)
    torch.set_num_threads(1)
    with dist_utils.launch("cpu") as device:
        rank = dist_utils.info().rank
        assert dist_utils.info().world_size == 2

        # 1. the loop, with gradient accumulation under DDP
        cfg = tiny_config(overrides=SMALL + ["method=boxteacher", "solver.batch_size=4", "solver.grad_accum_steps=2", "solver.max_iter=2",
                                             "train.checkpoint_period=1", "train.log_period=1"])  # fmt: skip
        trainer = Trainer(cfg, data_dir, out_dir / "run", device)
        assert trainer.batch_per_process == 2 and trainer.ddp is not None
        trainer.run(progress=False)
        metrics = trainer.evaluate()
        if rank == 0:
            from training.evaluate import write_metrics

            write_metrics(metrics, out_dir / "run")
        torch.save(
            {**states(trainer), "metrics": metrics, "sampler_indices": list(iter(trainer.loader.sampler))}, out_dir / f"rank{rank}-run.pt"
        )

        # 2. fixed data: rank r steps on image r of the mirrored pair
        images, targets = mirrored_pair(data_dir)
        fixed = Trainer(tiny_config(overrides=FIXED + ["solver.max_iter=3"]), data_dir, out_dir / "fixed", device)
        records = [fixed.step([images[rank]], [targets[rank]]) for _ in range(3)]
        torch.save({**states(fixed), "records": records}, out_dir / f"rank{rank}-fixed.pt")

        # 3. a NaN on rank 1 only, at the second of three steps
        real = train_module.losses_from_outputs

        def poisoned(model, head, mask_feats, batch, iteration, *rest):
            losses = real(model, head, mask_feats, batch, iteration, *rest)
            if rank == 1 and iteration == 1:
                losses["loss_fcos_cls"] = losses["loss_fcos_cls"] * float("nan")
            return losses

        train_module.losses_from_outputs = poisoned
        nan_run = Trainer(tiny_config(overrides=FIXED + ["solver.max_iter=3"]), data_dir, out_dir / "nan", device)
        nan_states = []
        for _ in range(3):
            nan_run.step([images[rank]], [targets[rank]])
            nan_states.append({k: v.clone() for k, v in nan_run.model.state_dict().items()})
        train_module.losses_from_outputs = real
        torch.save(
            {"states": nan_states, "skipped": nan_run.skipped_steps, "teacher": nan_run.teacher.state_dict()},
            out_dir / f"rank{rank}-nan.pt",
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
