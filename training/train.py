"""The training loop: data, model (+ EMA teacher), optimiser, schedule, checkpoints, eval.

One process or many (``torchrun``; see :mod:`training.distributed`): the same code.

- ``solver.batch_size`` is the total batch over all processes; each process loads
  ``batch_size / world_size`` images per iteration and, with
  ``solver.grad_accum_steps = k``, runs them as k micro-batches before one optimiser
  step (an iteration is one optimiser step either way).
- ``solver.reference_world_size``: the linear scaling rule (:func:`scale_to_world_size`).
- ``solver.amp``: bf16 / fp16 autocast (fp16 with a gradient scaler).
- A non-finite loss or gradient skips the step on every rank and is counted; after
  ``train.max_nonfinite_steps`` in a row training stops with a message.
- Checkpoints every ``train.checkpoint_period`` iterations and at the end (rank 0,
  atomic; the last ``train.keep_checkpoints`` periodic ones kept); ``resume=True``
  continues from the latest valid one (:mod:`training.resume`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from training import distributed as dist_utils
from training.boxteacher import ema_momentum, ema_update_
from training.checkpoint import save_checkpoint
from training.config import Config
from training.criterion import losses_from_outputs
from training.data.coco import CocoInstances, collate
from training.data.transforms import build_strong_augmentation, build_train_transforms
from training.engine import student_batch, teacher_pseudo_masks
from training.health import HEALTH_KEYS, CollapseDetector, detector_parameters, loss_group_gradient_norms
from training.model.condinst import CondInst, build_model
from training.resume import (
    FINAL_NAME,
    latest_valid_checkpoint,
    periodic_name,
    prune_checkpoints,
    remove_stale_temporaries,
    rng_state,
    seed_everything,
    set_rng_state,
)
from training.train_log import TrainingLog

log = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_factor(iteration: int, cfg: Config) -> float:
    """Linear warm-up from ``warmup_factor`` then x ``gamma`` at each step."""
    s = cfg.solver
    factor = s.gamma ** sum(iteration >= step for step in s.steps)
    if iteration < s.warmup_iters:
        alpha = iteration / s.warmup_iters
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


def scale_to_world_size(cfg: Config, world_size: int) -> Config:
    """The linear scaling rule (Goyal et al. 2017; detectron2's REFERENCE_WORLD_SIZE).

    When ``solver.reference_world_size`` = R is set, the recipe's batch size and
    learning rate are those of R processes. On W processes both are multiplied by W / R
    (the batch per process stays ``batch_size / R``) and every length counted in
    iterations (max_iter, steps, warm-ups, checkpoint and eval periods, the BoxInst and
    BoxTeacher loss warm-ups) is divided by W / R, so the run sees the same number of
    images. The EMA momentum is per iteration and is left as it is. The returned config
    holds the scaled values literally, with ``reference_world_size = None``: scaling it
    again changes nothing, and a checkpoint's config reused elsewhere (fine-tuning from
    it, the Label Studio backend) means what it says.
    """
    ref = cfg.solver.reference_world_size
    if ref is None:
        return cfg
    if ref == world_size:
        c = cfg.model_copy(deep=True)
        c.solver.reference_world_size = None
        return c
    if cfg.solver.batch_size % ref:
        raise ValueError(f"solver.batch_size={cfg.solver.batch_size} is not divisible by solver.reference_world_size={ref}")
    scale = world_size / ref
    c = cfg.model_copy(deep=True)
    s = c.solver

    def its(n: int) -> int:
        return max(int(round(n / scale)), 1) if n > 0 else n

    s.batch_size = cfg.solver.batch_size // ref * world_size
    s.base_lr = cfg.solver.base_lr * scale
    s.max_iter = its(s.max_iter)
    s.steps = [its(x) for x in s.steps]
    s.warmup_iters = its(s.warmup_iters)
    c.train.checkpoint_period = its(c.train.checkpoint_period)
    c.train.eval_period = its(c.train.eval_period)
    c.boxinst.pairwise_warmup_iters = its(c.boxinst.pairwise_warmup_iters)
    c.boxteacher.warmup_iters = its(c.boxteacher.warmup_iters)
    s.reference_world_size = None
    log.info(
        "linear scaling rule: %d processes instead of %d -> batch %d, lr %g, %d iterations (steps %s)",
        world_size, ref, s.batch_size, s.base_lr, s.max_iter, s.steps,
    )  # fmt: skip
    return c


def per_process_batch(cfg: Config, world_size: int) -> int:
    """Images each process loads per iteration: batch_size / world_size, itself a
    multiple of ``solver.grad_accum_steps``."""
    total, accum = cfg.solver.batch_size, cfg.solver.grad_accum_steps
    if accum < 1:
        raise ValueError(f"solver.grad_accum_steps must be >= 1, got {accum}")
    if total % world_size:
        raise ValueError(
            f"solver.batch_size={total} (the total over all processes) is not divisible by the "
            f"number of processes ({world_size}); choose a batch size that is, or set "
            "solver.reference_world_size to scale it with the number of processes"
        )
    per = total // world_size
    if per % accum:
        raise ValueError(f"the batch per process ({per}) is not divisible by solver.grad_accum_steps={accum}")
    return per


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    """``solver.memory_format``: "auto" is channels_last on CPU only."""
    fmt = cfg.solver.memory_format
    return fmt == "channels_last" or (fmt == "auto" and device.type == "cpu")


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD over every trainable parameter, one weight decay for all (as the authors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.solver.base_lr, momentum=cfg.solver.momentum, weight_decay=cfg.solver.weight_decay)


def infinite(loader: DataLoader, start_epoch: int | None = None):
    """Batches forever, epoch after epoch (the sampler reshuffles per epoch)."""
    epoch = getattr(loader.sampler, "start_epoch", 0) if start_epoch is None else start_epoch
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def build_train_loader(
    data_dir: str | Path,
    cfg: Config,
    generator: torch.Generator | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    start_iteration: int = 0,
) -> tuple[CocoInstances, DataLoader]:
    """The training split, sharded over processes, positioned after ``start_iteration``
    iterations (same order as an uninterrupted run). ``loader.sampler.start_epoch`` is
    the epoch to start from."""
    transforms = build_train_transforms(cfg.input.min_size_train, cfg.input.max_size_train, cfg.input.hflip_prob)
    dataset = CocoInstances(
        data_dir, "train", with_masks=cfg.method == "condinst", transforms=transforms, class_agnostic=cfg.data.class_agnostic
    )
    batch = per_process_batch(cfg, world_size)
    sampler = dist_utils.ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=cfg.train.seed)
    epoch, skip = dist_utils.start_position(start_iteration, len(sampler), batch)
    sampler.start_at(epoch, skip)
    sampler.start_epoch = epoch
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
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


def _split(items: list, parts: int) -> list[list]:
    n = len(items)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0)


def clip_gradients(model: CondInst, max_norm: float | None, mode: str = "global") -> torch.Tensor:
    """Clip the gradients in place; returns the total norm before clipping.

    ``global``: one norm over all parameters (detectron2's "norm" clipping): when the mask
    path's gradient is large, the detector's own gradient is scaled down with it.
    ``per_group``: the detector (:func:`training.health.detector_parameters`) and the mask
    path (controller, mask branch, dynamic head) are each clipped to ``max_norm`` on their
    own, so neither can shrink the other's step. ``max_norm`` None: no clipping.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    total = _total_norm(params)
    if not max_norm:
        return total
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return total
    detector = {id(p) for p in detector_parameters(model)}
    groups = ([p for p in params if id(p) in detector], [p for p in params if id(p) not in detector])
    for group in groups:
        if group:
            torch.nn.utils.clip_grad_norm_(group, max_norm)
    return total


class Trainer:
    """Holds the state of a run; :meth:`step` is one iteration, :meth:`run` the loop.

    In a torchrun job (process group initialised, see :func:`training.distributed.launch`)
    every rank builds one Trainer; the student is wrapped in DDP, the teacher is an
    identical EMA copy on every rank, only rank 0 writes files.
    """

    def __init__(self, cfg: Config, data_dir: str | Path, output: str | Path, device: str = "cpu", resume: bool = False):
        self.dist = dist_utils.info()
        rank, world = self.dist.rank, self.dist.world_size
        cfg = scale_to_world_size(cfg, world)
        self.batch_per_process = per_process_batch(cfg, world)
        self.output = Path(output)
        if self.dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.output)
        self.data_dir = Path(data_dir)
        self.device = torch.device(device)

        # The checkpoint to continue from: rank 0 chooses, every rank reads the same file.
        ckpt, ckpt_path = None, None
        if resume:
            found = latest_valid_checkpoint(self.output) if self.dist.is_main else None
            ckpt_path = dist_utils.broadcast_object(str(found[0]) if found else None)
            if ckpt_path is None:
                log.warning("--resume: no valid checkpoint in %s; starting from iteration 0", self.output)
            else:
                ckpt = found[1] if found else _read_on_this_rank(ckpt_path)
        start = int(ckpt["iteration"]) if ckpt else 0

        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        seed_everything(cfg.train.seed)
        g = torch.Generator().manual_seed(cfg.train.seed + rank)
        self.dataset, self.loader = build_train_loader(data_dir, cfg, g, rank=rank, world_size=world, start_iteration=start)
        self.cfg = resolve_classes(cfg, self.dataset)
        build_cfg = self.cfg
        if ckpt is not None or self.cfg.model.weights:
            build_cfg = self.cfg.model_copy(deep=True)
            build_cfg.model.backbone.weights = "none"  # every weight comes from the checkpoint: no download
        self.model: CondInst = build_model(build_cfg).to(self.device)
        self.model.cfg = self.cfg
        if use_channels_last(self.cfg, self.device):
            self.model.to(memory_format=torch.channels_last)
        if self.cfg.model.weights and ckpt is None:
            from training.checkpoint import load_weights_into

            load_weights_into(self.model, self.cfg.model.weights)
            log.info("model.weights: initialised from %s", self.cfg.model.weights)
        self.teacher: CondInst | None = None
        if self.cfg.method == "boxteacher":
            self.teacher = copy.deepcopy(self.model)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, self.cfg))
        self.amp_dtype = AMP_DTYPES[self.cfg.solver.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.solver.amp == "fp16")
        self.strong_aug = build_strong_augmentation(self.cfg.boxteacher.strong_augmentation) if self.cfg.method == "boxteacher" else None
        self.iteration = 0
        self.nonfinite_steps = 0  # consecutive
        self.skipped_steps = 0  # in all
        self.history: list[dict] = []
        # Warns once when the mask head dies; watched once the learning rate has warmed up.
        self.collapse = CollapseDetector(start_iteration=self.cfg.solver.warmup_iters)
        if ckpt is not None:
            self._load_training_state(ckpt, ckpt_path)
        else:
            seed_everything(cfg.train.seed + rank)  # different augmentation on every rank

        self.ddp: DistributedDataParallel | None = None
        if dist_utils.is_distributed():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)

    # ---- state ---------------------------------------------------------------------
    def _load_training_state(self, ckpt: dict, path: str) -> None:
        self.model.load_state_dict(ckpt["student"])
        if self.teacher is not None:
            if ckpt.get("teacher") is not None:
                self.teacher.load_state_dict(ckpt["teacher"])
            else:
                log.warning("%s has no teacher: the teacher starts as a copy of the student", path)
                self.teacher.load_state_dict(ckpt["student"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        counters = ckpt.get("nonfinite") or {}
        self.nonfinite_steps = int(counters.get("consecutive", 0))
        self.skipped_steps = int(counters.get("skipped", 0))
        # The learning rate follows this run's config (it may scale with the world size).
        self.scheduler.base_lrs = [self.cfg.solver.base_lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.solver.base_lr * lr_factor(self.iteration, self.cfg)
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            if rngs:
                log.warning(
                    "resume: the checkpoint has RNG states of %d processes, this run has %d: reseeding", len(rngs), self.dist.world_size
                )
            seed_everything(self.cfg.train.seed + self.dist.rank + 1000 * self.iteration)
        log.info("resumed from %s at iteration %d (lr %.6g)", path, self.iteration, self.optimizer.param_groups[0]["lr"])

    def checkpoint_payload(self, rng_states: list | None = None) -> dict:
        return {
            "config": self.cfg.model_dump(),
            "student": self.model.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states if rng_states is not None else [rng_state()],
            "nonfinite": {"consecutive": self.nonfinite_steps, "skipped": self.skipped_steps},
            "world_size": self.dist.world_size,
        }

    def save(self, name: str) -> Path:
        """Write OUTPUT/name (rank 0; a collective: every rank must call it)."""
        dist_utils.check_same_on_all_ranks(self.model, "student")
        if self.teacher is not None:
            dist_utils.check_same_on_all_ranks(self.teacher, "teacher")
            dist_utils.average_buffers_(self.teacher)
        rngs = dist_utils.all_gather_objects(rng_state())
        path = self.output / name
        if self.dist.is_main:
            save_checkpoint(path, self.checkpoint_payload(rngs))
        return path

    # ---- one iteration -------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _cpu_amp_guard(self):
        """CPU autocast only (tests, no GPU): oneDNN's bf16 convolution backward gives
        garbage weight gradients (1e13, NaN) on 1x1 feature maps -- P7 of any image up to
        128 px -- in torch 2.12 (cf. pytorch/pytorch#163347); torch's native kernels do not.
        So oneDNN is switched off around the step, for CPU mixed precision only."""
        if self.amp_dtype is None or self.device.type != "cpu":
            return contextlib.nullcontext()
        mkldnn = torch.backends.mkldnn
        return mkldnn.flags(enabled=False, deterministic=mkldnn.deterministic, allow_tf32=mkldnn.allow_tf32)

    def _micro_step(self, images, targets, measure_health: bool = False) -> tuple[dict, dict]:
        """Forward of one micro-batch: (loss terms, statistics: pseudo masks and, with
        ``measure_health``, :mod:`training.health`'s mask statistics and gradient norms)."""
        cfg, model = self.cfg, self.model
        stats: dict[str, float] = {}
        health: dict | None = {} if measure_health else None
        with self._autocast():
            batch = student_batch(model, images, targets, cfg, self.strong_aug)
            if self.teacher is not None:
                batch.pseudo, stats = teacher_pseudo_masks(self.teacher, list(images), batch, cfg)
            head, mask_feats = (self.ddp or model)(batch.images)
            losses = losses_from_outputs(model, head, mask_feats, batch, self.iteration, cfg, dist_utils.reduce_mean, health)
        if health is not None:
            health.update(loss_group_gradient_norms(losses, detector_parameters(model)))
            stats = {**stats, **health}
        return losses, stats

    def step(self, images, targets) -> dict[str, float]:
        """One optimiser step on this process's share of the batch (all ranks together).

        Returns the loss terms (averaged over micro-batches), ``loss``, ``lr``,
        ``grad_norm``, pseudo-mask statistics and ``skipped`` (1.0 if the step was skipped).
        """
        cfg, model = self.cfg, self.model
        (self.ddp or model).train()
        if self.teacher is not None:
            # EMA before the forward, momentum min(0.999, 1 - 1/(it+1)): teacher := student at it 0.
            ema_update_(self.teacher, model, ema_momentum(self.iteration, cfg.boxteacher.momentum))
            self.teacher.train()  # like the authors: BN (if any) uses batch statistics
        parts = cfg.solver.grad_accum_steps
        chunks = list(zip(_split(list(images), parts), _split(list(targets), parts)))
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        pseudo_count, pseudo_score = 0.0, 0.0
        health: dict[str, float] = {}
        finite = True
        bad: dict[str, float] = {}
        logged = (self.iteration + 1) % cfg.train.log_period == 0 or self.iteration + 1 == cfg.solver.max_iter
        for k, (ims, tgs) in enumerate(chunks):
            last = k == len(chunks) - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync, self._cpu_amp_guard():
                losses, stats = self._micro_step(ims, tgs, measure_health=logged and last)
                health.update({key: v for key, v in stats.items() if key in HEALTH_KEYS})
                total = sum(v.float() for v in losses.values()) / len(chunks)
                # Every rank must take the same decision, else DDP's all-reduce would hang.
                finite = dist_utils.all_ranks_true(bool(torch.isfinite(total)), self.device)
                if not finite:
                    bad = {k2: float(v.detach()) for k2, v in losses.items()}
                    break
                self.scaler.scale(total).backward()
            for name, v in losses.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach()) / len(chunks)
            if "pseudo_masks" in stats:
                pseudo_count += stats["pseudo_masks"]
                pseudo_score += stats["pseudo_mask_score"] * stats["pseudo_masks"]

        grad_norm = float("nan")
        if finite:
            # After DDP's all-reduce the gradients are the same on every rank: so is this decision.
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(clip_gradients(model, cfg.solver.clip_grad_norm, cfg.clip_mode))
            if self.scaler.is_enabled():
                # fp16: the scaler skips steps with inf/NaN gradients and lowers its scale
                # (normal while it calibrates; not counted as a non-finite step).
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                bad = {"grad_norm": grad_norm}
                finite = False
        if finite:
            self.nonfinite_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
            self.skipped_steps += 1
            log.warning(
                "non-finite loss or gradient at iteration %d (on this process: %s): step skipped on every process (%d in a row)",
                self.iteration, bad, self.nonfinite_steps,
            )  # fmt: skip
            if self.nonfinite_steps >= cfg.train.max_nonfinite_steps:
                raise RuntimeError(
                    f"training stopped at iteration {self.iteration}: the loss or its gradients were NaN/inf for "
                    f"{self.nonfinite_steps} iterations in a row (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). "
                    "Lower solver.base_lr, set solver.clip_grad_norm, use solver.amp=bf16 or none instead of fp16, "
                    "or check the data; then continue with --resume from the last checkpoint."
                )
        self.scheduler.step()
        self.iteration += 1
        if finite or not any(name.startswith("loss") for name in bad):  # the losses were finite
            out = dict(sums)
            out["loss"] = sum(sums.values())
        else:
            out = {name: float("nan") for name in bad if name.startswith("loss")}
            out["loss"] = float("nan")
        out.update(lr=self.optimizer.param_groups[0]["lr"], grad_norm=grad_norm, skipped=0.0 if finite else 1.0)
        if self.teacher is not None:
            out.update(pseudo_masks=pseudo_count, pseudo_mask_score=pseudo_score / max(pseudo_count, 1.0))
        out.update(health)
        return out

    # ---- the loop ----------------------------------------------------------------
    def _reduce_record(self, record: dict[str, float]) -> dict[str, float]:
        """Loss terms averaged over processes, pseudo-mask counts summed (a collective)."""
        if not dist_utils.is_distributed():
            return dict(record)
        keys = sorted(record)
        count = record.get("pseudo_masks", 0.0)
        values = [record[k] for k in keys] + [record.get("pseudo_mask_score", 0.0) * count]
        sums = dist_utils.sum_over_ranks(values, self.device)
        world = self.dist.world_size
        out = {k: v / world for k, v in zip(keys, sums)}
        if "pseudo_masks" in record:
            out["pseudo_masks"] = sums[keys.index("pseudo_masks")]
            out["pseudo_mask_score"] = sums[-1] / max(out["pseudo_masks"], 1.0)
        for k in ("lr", "grad_norm", "skipped"):  # the same on every rank
            if k in record:
                out[k] = record[k]
        return out

    def run(self, progress: bool = True) -> Path:
        """Train up to ``solver.max_iter``; returns OUTPUT/model_final.pth."""
        from tqdm import tqdm

        cfg, main = self.cfg, self.dist.is_main
        if self.iteration >= cfg.solver.max_iter:
            log.info("nothing to do: already at iteration %d of %d", self.iteration, cfg.solver.max_iter)
            final = self.output / FINAL_NAME
            return final if final.is_file() else self.save(FINAL_NAME)
        data = infinite(self.loader)
        logger = TrainingLog(self.output, enabled=main, start_iteration=self.iteration)
        bar = tqdm(total=cfg.solver.max_iter, initial=self.iteration, disable=not (progress and main), dynamic_ncols=True)
        images_per_iter = self.batch_per_process * self.dist.world_size
        window_start, window_iters = time.perf_counter(), 0
        try:
            while self.iteration < cfg.solver.max_iter:
                images, targets = next(data)
                record = self.step(images, targets)
                window_iters += 1
                it = self.iteration
                if it % cfg.train.log_period == 0 or it == cfg.solver.max_iter:
                    record = self._reduce_record(record)
                    elapsed = time.perf_counter() - window_start
                    record.update(
                        iteration=it,
                        s_per_iter=elapsed / window_iters,
                        images_per_s=images_per_iter * window_iters / elapsed,
                        skipped_steps=float(self.skipped_steps),
                    )
                    warning = self.collapse.update(record, it)
                    if warning:
                        record["warning"] = warning
                    logger.scalars(record, it)
                    self.history.append(record)
                    window_start, window_iters = time.perf_counter(), 0
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                bar.update(1)
                if cfg.train.checkpoint_period and it % cfg.train.checkpoint_period == 0 and it < cfg.solver.max_iter:
                    self.save(periodic_name(it))
                    if main:
                        prune_checkpoints(self.output, cfg.train.keep_checkpoints)
                if cfg.train.eval_period and it % cfg.train.eval_period == 0 and it < cfg.solver.max_iter:
                    logger.evaluation(self.evaluate(), it)
        finally:
            bar.close()
            logger.close()
        return self.save(FINAL_NAME)

    def evaluate(self) -> dict:
        """COCO metrics of the teacher (BoxTeacher) or the student on the val split,
        shared over processes; the same dict on every rank."""
        model = self.teacher if self.teacher is not None else self.model
        if self.teacher is not None:
            dist_utils.average_buffers_(self.teacher)
        metrics = dist_utils.evaluate_distributed(model.eval(), self.data_dir, "val")
        log.info("iteration %d: segm AP %.2f, bbox AP %.2f", self.iteration, metrics["segm"]["AP"], metrics["bbox"]["AP"])
        return metrics


def _read_on_this_rank(path: str) -> dict:
    from training.checkpoint import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (multi-node resume needs --output on a filesystem every node can read)") from err


def train(
    cfg: Config,
    data_dir: str | Path,
    output: str | Path,
    device: str = "cpu",
    progress: bool = True,
    resume: bool = False,
    evaluate: bool = False,
) -> Path:
    """Train and return the final checkpoint's path.

    With ``evaluate`` the final teacher (or student) is evaluated on the val split
    (shared over processes) and rank 0 writes OUTPUT/metrics.json.
    """
    trainer = Trainer(cfg, data_dir, output, device, resume=resume)
    log.info(
        "training %s on %s: %d images, %d classes, %d iterations, batch %d (%d per process x %d processes)",
        cfg.method, data_dir, len(trainer.dataset), trainer.cfg.model.num_classes, trainer.cfg.solver.max_iter,
        trainer.cfg.solver.batch_size, trainer.batch_per_process, trainer.dist.world_size,
    )  # fmt: skip
    final = trainer.run(progress)
    if evaluate:
        from training.evaluate import write_metrics

        metrics = trainer.evaluate()
        if trainer.dist.is_main:
            write_metrics(metrics, output)
    return final
