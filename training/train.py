"""The training loop: data, model (+ EMA teacher), optimiser, schedule, checkpoints, eval."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.boxteacher import ema_momentum, ema_update_
from training.checkpoint import save_checkpoint
from training.config import Config
from training.criterion import compute_losses
from training.data.coco import CocoInstances, collate
from training.data.transforms import build_strong_augmentation, build_train_transforms
from training.engine import student_batch, teacher_pseudo_masks
from training.model.condinst import CondInst, build_model

log = logging.getLogger(__name__)


def lr_factor(iteration: int, cfg: Config) -> float:
    """Linear warm-up from ``warmup_factor`` then x ``gamma`` at each step."""
    s = cfg.solver
    factor = s.gamma ** sum(iteration >= step for step in s.steps)
    if iteration < s.warmup_iters:
        alpha = iteration / s.warmup_iters
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD over every trainable parameter, one weight decay for all (as the authors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.solver.base_lr, momentum=cfg.solver.momentum, weight_decay=cfg.solver.weight_decay)


def infinite(loader: DataLoader):
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def build_train_loader(data_dir: str | Path, cfg: Config, generator: torch.Generator | None = None) -> tuple[CocoInstances, DataLoader]:
    transforms = build_train_transforms(cfg.input.min_size_train, cfg.input.max_size_train, cfg.input.hflip_prob)
    dataset = CocoInstances(data_dir, "train", with_masks=cfg.method == "condinst", transforms=transforms, class_agnostic=cfg.data.class_agnostic)
    loader = DataLoader(
        dataset,
        batch_size=cfg.solver.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        generator=generator,
        persistent_workers=cfg.data.num_workers > 0,
    )
    return dataset, loader


def resolve_classes(cfg: Config, dataset: CocoInstances) -> Config:
    """Take the number of classes and their names from the dataset."""
    cfg = cfg.model_copy(deep=True)
    cfg.class_names = []
    cfg.model.num_classes = len(dataset.class_names)
    cfg.class_names = list(dataset.class_names)
    return cfg


class Trainer:
    """Holds the state of a run; :meth:`step` is one iteration, :meth:`run` the loop."""

    def __init__(self, cfg: Config, data_dir: str | Path, output: str | Path, device: str = "cpu"):
        torch.manual_seed(cfg.train.seed)
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(cfg.train.seed)
        self.dataset, self.loader = build_train_loader(data_dir, cfg, g)
        self.cfg = resolve_classes(cfg, self.dataset)
        self.data_dir = Path(data_dir)
        self.device = torch.device(device)
        self.model: CondInst = build_model(self.cfg).to(self.device)
        if self.cfg.model.weights:
            from training.checkpoint import load_weights_into

            load_weights_into(self.model, self.cfg.model.weights)
        self.teacher: CondInst | None = None
        if self.cfg.method == "boxteacher":
            self.teacher = copy.deepcopy(self.model)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, self.cfg))
        self.strong_aug = build_strong_augmentation(self.cfg.boxteacher.strong_augmentation) if self.cfg.method == "boxteacher" else None
        self.iteration = 0
        self.nonfinite_steps = 0
        self.history: list[dict] = []

    def step(self, images, targets) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        model.train()
        batch = student_batch(model, images, targets, cfg, self.strong_aug)
        stats: dict[str, float] = {}
        if self.teacher is not None:
            # EMA before the forward, momentum min(0.999, 1 - 1/(it+1)): teacher := student at it 0.
            ema_update_(self.teacher, model, ema_momentum(self.iteration, cfg.boxteacher.momentum))
            self.teacher.train()  # like the authors: BN (if any) uses batch statistics
            batch.pseudo, stats = teacher_pseudo_masks(self.teacher, [im.as_subclass(torch.Tensor) for im in images], batch, cfg)
        losses = compute_losses(model, batch, self.iteration, cfg)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(total):
            self.nonfinite_steps += 1
            log.warning("non-finite loss at iteration %d (%s): step skipped", self.iteration, {k: float(v) for k, v in losses.items()})
            if self.nonfinite_steps >= cfg.train.max_nonfinite_steps:
                raise RuntimeError(f"loss was non-finite for {self.nonfinite_steps} consecutive steps; lower solver.base_lr or check the data")
        else:
            self.nonfinite_steps = 0
            total.backward()
            if cfg.solver.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.clip_grad_norm)
            self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out.update(loss=float(total.detach()), lr=self.optimizer.param_groups[0]["lr"], **stats)
        return out

    def checkpoint_payload(self) -> dict:
        return {
            "config": self.cfg.model_dump(),
            "student": self.model.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def save(self, name: str) -> Path:
        return save_checkpoint(self.output / name, self.checkpoint_payload())

    def run(self, progress: bool = True) -> Path:
        from tqdm import tqdm

        cfg = self.cfg
        data = infinite(self.loader)
        log_file = open(self.output / "log.jsonl", "a")
        bar = tqdm(total=cfg.solver.max_iter, initial=self.iteration, disable=not progress, dynamic_ncols=True)
        start, seen = time.perf_counter(), 0
        try:
            while self.iteration < cfg.solver.max_iter:
                images, targets = next(data)
                record = self.step(images, targets)
                seen += len(images)
                record["images_per_s"] = seen / (time.perf_counter() - start)
                record["iteration"] = self.iteration
                if self.iteration % cfg.train.log_period == 0 or self.iteration == cfg.solver.max_iter:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    self.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{record['images_per_s']:.1f}")
                bar.update(1)
                if cfg.train.checkpoint_period and self.iteration % cfg.train.checkpoint_period == 0 and self.iteration < cfg.solver.max_iter:
                    self.save(f"model_{self.iteration:07d}.pth")
                if cfg.train.eval_period and self.iteration % cfg.train.eval_period == 0 and self.iteration < cfg.solver.max_iter:
                    self.evaluate()
        finally:
            bar.close()
            log_file.close()
        return self.save("model_final.pth")

    def evaluate(self) -> dict:
        from training.evaluate import evaluate_model

        model = self.teacher if self.teacher is not None else self.model
        metrics = evaluate_model(model.eval(), self.data_dir, "val")
        log.info("iteration %d: segm AP %.2f, bbox AP %.2f", self.iteration, metrics["segm"]["AP"], metrics["bbox"]["AP"])
        return metrics


def train(cfg: Config, data_dir: str | Path, output: str | Path, device: str = "cpu", progress: bool = True) -> Path:
    """Train and return the final checkpoint's path."""
    trainer = Trainer(cfg, data_dir, output, device)
    log.info("training %s on %s: %d images, %d classes, %d iterations", cfg.method, data_dir, len(trainer.dataset), trainer.cfg.model.num_classes, cfg.solver.max_iter)
    return trainer.run(progress)
