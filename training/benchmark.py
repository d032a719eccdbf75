"""``boxteacher benchmark``: quality and training-speed benchmarks (not tests).

- ``quality``: condinst (mask-supervised), boxinst and boxteacher trained with the same
  schedule and seed, plus the box-fill baseline, in one table (segm AP/AP50/AP75, bbox
  AP), and the Spearman correlation between each predicted instance's IoU with its true
  mask and (a) its detection score, (b) its mask-aware score;
- ``train``: seconds/iteration, images/s and peak memory of training steps;
- ``infer`` / ``serve``: delegated to export and serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def register_benchmarks(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    p = sub.add_parser("benchmark", help="quality / speed benchmarks (quality, train, infer, serve)")
    bench = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)

    q = bench.add_parser("quality", help="condinst vs boxinst vs boxteacher vs box-fill on one dataset")
    q.add_argument("--data", required=True)
    q.add_argument("--config", required=True)
    q.add_argument("--output", required=True)
    q.add_argument("--methods", default="condinst,boxinst,boxteacher")
    q.add_argument("--device", default="cpu")
    q.add_argument("overrides", nargs="*", help="key=value overrides applied to every method")
    q.set_defaults(func=cmd_quality)

    t = bench.add_parser("train", help="seconds/iteration, images/s, peak memory of training steps")
    t.add_argument("--config", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--iters", type=int, default=20)
    t.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    t.add_argument("--device", default="cpu")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(func=cmd_train_speed)
    return bench


def instance_iou_and_scores(model, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every prediction: best mask IoU with a same-class GT mask, det score, mask-aware score."""
    from pycocotools import mask as mask_utils

    ious, det, mask_aware = [], [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        inst = model.predict([image.as_subclass(torch.Tensor)])[0]
        if len(inst) == 0:
            continue
        gt_masks = target["masks"].as_subclass(torch.Tensor).numpy().astype(np.uint8)
        pred = np.asfortranarray(inst.masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
        if gt_masks.shape[0]:
            gt = np.asfortranarray(gt_masks.transpose(1, 2, 0))
            iou = mask_utils.iou(mask_utils.encode(pred), mask_utils.encode(gt), [0] * gt.shape[2])
            same = inst.labels.cpu().numpy()[:, None] == target["labels"].numpy()[None, :]
            best = np.where(same, iou, 0.0).max(axis=1)
        else:
            best = np.zeros(len(inst))
        ious.append(best)
        det.append(inst.det_scores.cpu().numpy())
        mask_aware.append(inst.scores.cpu().numpy())
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    return cat(ious), cat(det), cat(mask_aware)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def cmd_quality(args) -> int:
    from training.checkpoint import load_model
    from training.config import load_config
    from training.data.coco import CocoInstances
    from training.evaluate import evaluate_model
    from training.train import train

    out = Path(args.output)
    rows = []
    started = time.perf_counter()
    for method in args.methods.split(","):
        cfg = load_config(args.config, [f"method={method}"] + list(args.overrides))
        t0 = time.perf_counter()
        ckpt = train(cfg, args.data, out / method, device=args.device, progress=False)
        train_s = time.perf_counter() - t0
        model, _ = load_model(ckpt, device=args.device)
        m = evaluate_model(model, args.data, "val")
        dataset = CocoInstances(args.data, "val", with_masks=True, class_agnostic=bool(model.cfg.data.class_agnostic))
        ious, det, ma = instance_iou_and_scores(model, dataset)
        boxfill = evaluate_model(model, args.data, "val", mask_mode="box")["segm"]["AP"]
        row = {"method": method, **_row(m), "boxfill_segm_AP": boxfill, "rho_cls": spearman(ious, det), "rho_mask_aware": spearman(ious, ma), "train_s": train_s}
        rows.append(row)
        print(json.dumps(row))
    table = format_quality_table(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - started}, indent=2))
    (out / "quality.md").write_text(table + "\n")
    return 0


def _row(metrics: dict) -> dict:
    s, b = metrics["segm"], metrics["bbox"]
    return {"segm_AP": s["AP"], "segm_AP50": s["AP50"], "segm_AP75": s["AP75"], "bbox_AP": b["AP"]}


def format_quality_table(rows: list[dict]) -> str:
    lines = [
        "| method | segm AP | AP50 | AP75 | bbox AP | box-fill segm AP (same detections) | Spearman(IoU, cls) | Spearman(IoU, mask-aware) | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['segm_AP']:.1f} | {r['segm_AP50']:.1f} | {r['segm_AP75']:.1f} | {r['bbox_AP']:.1f} | {r['boxfill_segm_AP']:.1f} "
            f"| {r['rho_cls']:.3f} | {r['rho_mask_aware']:.3f} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def cmd_train_speed(args) -> int:
    from training.config import load_config
    from training.train import Trainer, infinite

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, list(args.overrides))
    trainer = Trainer(cfg, args.data, Path("/tmp") / "boxteacher-bench-train", args.device)
    data = infinite(trainer.loader)
    batches = [next(data) for _ in range(args.warmup + args.iters)]
    for images, targets in batches[: args.warmup]:
        trainer.step(images, targets)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for images, targets in batches[args.warmup :]:
        trainer.step(images, targets)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.iters
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"method": cfg.method, "s_per_iter": dt, "images_per_s": cfg.solver.batch_size / dt, "peak_rss_gib": peak_rss_gib, "threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result))
    return 0
