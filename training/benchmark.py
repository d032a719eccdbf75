"""``boxteacher benchmark``: quality and training-speed benchmarks (not tests).

- ``quality``: condinst (mask-supervised), boxinst and boxteacher trained with the same
  schedule and seed, plus the box-fill baseline, in one table (segm AP/AP50/AP75, bbox
  AP), and the Spearman correlation between each predicted instance's IoU with its true
  mask and (a) its detection score, (b) its mask-aware score;
- ``train``: seconds/iteration, images/s and peak memory of training steps;
- ``infer`` / ``serve``: in export/benchmark.py and serving/benchmark.py, added through the
  ``boxteacher.benchmarks`` entry points.
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


def register(bench: argparse._SubParsersAction) -> None:
    """The training benchmarks, under ``boxteacher benchmark`` (entry point group
    ``boxteacher.benchmarks``; export and serving add ``infer`` and ``serve`` there)."""
    q = bench.add_parser("quality", help="condinst vs boxinst vs boxteacher vs box-fill on one dataset")
    q.add_argument("--data", required=True)
    q.add_argument("--config", required=True)
    q.add_argument("--output", required=True)
    q.add_argument("--methods", default="condinst,boxinst,boxteacher")
    q.add_argument("--device", default="cpu")
    q.add_argument("--seeds", type=int, default=1, help="train each method with N seeds; cells show mean (min-max)")
    q.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the seeds are FIRST..FIRST+N-1 (default 0): add seeds to a table without training the first ones again "
        "(finished runs in --output are read back, not retrained)",
    )
    q.add_argument("--variants", default=None, help="YAML file: variant name -> list of key=value overrides (an ablation table)")
    q.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many runs at once, each in its own process with an equal share of the CPU threads "
        "(on a small CPU, 2 runs of 1 thread finish sooner than 2 runs one after the other)",
    )
    q.add_argument("overrides", nargs="*", help="key=value overrides applied to every method")
    q.set_defaults(func=cmd_quality)

    t = bench.add_parser("train", help="seconds/iteration, images/s, peak memory of training steps")
    t.add_argument("--config", help="YAML recipe (not needed with --authors-setting)")
    t.add_argument("--data", help="dataset folder (not needed with --authors-setting)")
    t.add_argument(
        "--authors-setting",
        choices=sorted(AUTHORS_SETTINGS),
        default=None,
        help="the setting measured with the authors' code: R-50 from scratch, 2 classes, one 512x512 image "
        "with 3 boxes per batch, strong augmentation, teacher at short side 800 (512 for boxteacher-512); "
        "makes its own image; 2 threads unless --threads",
    )
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--iters", type=int, default=20)
    t.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    t.add_argument("--device", default="cpu")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(func=cmd_train_speed)


def instance_iou_and_scores(model, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every prediction: best mask IoU with a same-class GT mask, det score,
    mask-aware score, and the share of its mask pixels outside its own box (a mask head
    that collapsed to whole-image masks shows up there: box-supervised heads can)."""
    from pycocotools import mask as mask_utils

    from training.evaluate import box_fill_masks

    ious, det, mask_aware, outside = [], [], [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        inst = model.predict([image])[0]
        if len(inst) == 0:
            continue
        masks = inst.masks.cpu()
        gt_masks = target["masks"].numpy().astype(np.uint8)
        pred = np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8))
        if gt_masks.shape[0]:
            gt = np.asfortranarray(gt_masks.transpose(1, 2, 0))
            iou = mask_utils.iou(mask_utils.encode(pred), mask_utils.encode(gt), [0] * gt.shape[2])
            same = inst.labels.cpu().numpy()[:, None] == target["labels"].numpy()[None, :]
            best = np.where(same, iou, 0.0).max(axis=1)
        else:
            best = np.zeros(len(inst))
        inside = box_fill_masks(inst.boxes.cpu(), *masks.shape[-2:])
        area = masks.flatten(1).sum(1).clamp(min=1)
        outside.append(((masks & ~inside).flatten(1).sum(1) / area).numpy())
        ious.append(best)
        det.append(inst.det_scores.cpu().numpy())
        mask_aware.append(inst.scores.cpu().numpy())
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    return cat(ious), cat(det), cat(mask_aware), cat(outside)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def quality_run(method: str, overrides: list[str], args, run_dir: Path) -> dict:
    """Train one method with ``overrides``, then measure it: one row of the quality table.

    A run whose ``row.json`` exists is read back instead of trained again, so a long
    benchmark that was interrupted continues where it stopped."""
    from training.checkpoint import load_model
    from training.config import load_config
    from training.data.coco import CocoInstances
    from training.evaluate import evaluate_model
    from training.pseudo_label import pseudo_label_dataset, pseudo_mask_quality
    from training.train import train

    done = run_dir / "row.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(args.config, [f"method={method}"] + list(overrides))
    t0 = time.perf_counter()
    ckpt = train(cfg, args.data, run_dir, device=args.device, progress=False)
    train_s = time.perf_counter() - t0
    model, _ = load_model(ckpt, device=args.device)
    m = evaluate_model(model, args.data, "val")
    dataset = CocoInstances(args.data, "val", with_masks=True, class_agnostic=bool(model.cfg.data.class_agnostic))
    ious, det, ma, outside = instance_iou_and_scores(model, dataset)
    boxfill = evaluate_model(model, args.data, "val", mask_mode="box")["segm"]["AP"]
    # Algorithm 1 with this model on the training split, against the hidden true masks.
    pseudo = pseudo_mask_quality(pseudo_label_dataset(model, args.data, "train"), args.data, "train") or {}
    row = {
        "method": method,
        "seed": cfg.train.seed,
        **_row(m),
        "boxfill_segm_AP": boxfill,
        "rho_cls": spearman(ious, det),
        "rho_mask_aware": spearman(ious, ma),
        "outside_box": float(outside.mean()) if len(outside) else float("nan"),
        "pseudo_iou": pseudo.get("mean_iou", float("nan")),
        "pseudo_boxfill_iou": pseudo.get("boxfill_iou", float("nan")),
        "collapse": collapse_warning(run_dir),
        "train_s": train_s,
    }
    done.write_text(json.dumps(row, indent=2))
    return row


def collapse_warning(run_dir: Path) -> str | None:
    """The collapse detector's warning from a run's log.jsonl, or None if it stayed silent."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("warning"):
            return record["warning"]
    return None


def dead_mask_head(row: dict) -> str | None:
    """Why a finished run's mask head counts as collapsed, or None.

    The collapse detector watches the student while it trains; a head can also end up
    producing masks no better than filling the boxes, with the detector silent (in a
    Penn-Fudan run: segm AP 0.0, 26% of mask pixels outside their box). So a run also counts
    when its masks are no better than filled boxes by either measure of the row: segm AP at
    most box-fill's on the same detections, or pseudo masks below the filled boxes' IoU.
    """
    if row.get("collapse"):
        return row["collapse"]
    segm, fill = row.get("segm_AP"), row.get("boxfill_segm_AP")
    if segm is not None and fill is not None and segm <= fill:
        return f"final masks no better than filled boxes: segm AP {segm:.1f}, box-fill {fill:.1f} on the same detections"
    pseudo, filled = row.get("pseudo_iou"), row.get("pseudo_boxfill_iou")
    if pseudo is not None and filled is not None and pseudo < filled:
        return f"final pseudo masks worse than filled boxes: IoU {pseudo:.3f} against {filled:.3f}"
    return None


def load_variants(path: str | None) -> dict[str, list[str]]:
    """``--variants FILE``: a YAML mapping of variant name -> list of ``key=value`` overrides
    (a list inside the list, e.g. a YAML alias ``[*base, key=value]``, is spliced in).
    Without a file: one unnamed variant with no overrides."""
    if not path:
        return {"": []}
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, list) or v is None for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of variant name -> list of key=value overrides")

    def flat(items: list) -> list[str]:
        return [str(y) for x in items for y in (flat(x) if isinstance(x, list) else [x])]

    return {str(name): flat(overrides or []) for name, overrides in data.items()}


def quality_jobs(args) -> list[tuple[str, str, list[str], Path]]:
    """Every run of the table, in table order: (variant, method, overrides, run folder)."""
    out = Path(args.output)
    jobs = []
    for variant, extra in load_variants(args.variants).items():
        for method in args.methods.split(","):
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                name = "-".join(x for x in (variant, method, f"seed{seed}") if x)
                jobs.append((variant, method, [*extra, *args.overrides, f"train.seed={seed}"], out / name))
    return jobs


def threads_per_job(jobs: int, cpus: int | None = None) -> int:
    """The torch threads each of ``jobs`` parallel runs gets: an equal share, at least 1."""
    import os

    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, jobs))


def _quality_worker(threads: int, method: str, overrides: list[str], args, run_dir: Path) -> dict:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return quality_run(method, overrides, args, run_dir)


def cmd_quality(args) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    jobs = quality_jobs(args)
    rows: list[dict | None] = [None] * len(jobs)
    started = time.perf_counter()

    def record(i: int, row: dict) -> None:
        row["variant"] = jobs[i][0]
        rows[i] = row
        print(json.dumps(row), flush=True)
        done = [r for r in rows if r is not None]
        (out / "quality.json").write_text(json.dumps({"rows": done, "seconds": time.perf_counter() - started}, indent=2))

    if args.jobs == 1:
        for i, (_, method, overrides, run_dir) in enumerate(jobs):
            record(i, quality_run(method, overrides, args, run_dir))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = threads_per_job(args.jobs)
        log.info("quality: %d runs, %d at a time, %d torch thread(s) each", len(jobs), args.jobs, threads)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_quality_worker, threads, m, o, args, d): i for i, (_, m, o, d) in enumerate(jobs)}
            for future in as_completed(futures):
                record(futures[future], future.result())
    table = format_quality_table(summarize_rows(rows))
    print(table)
    (out / "quality.md").write_text(table + "\n")
    return 0


def _row(metrics: dict) -> dict:
    s, b = metrics["segm"], metrics["bbox"]
    return {"segm_AP": s["AP"], "segm_AP50": s["AP50"], "segm_AP75": s["AP75"], "bbox_AP": b["AP"]}


NUMERIC_COLUMNS = (
    "segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "boxfill_segm_AP", "rho_cls", "rho_mask_aware",
    "outside_box", "pseudo_iou", "pseudo_boxfill_iou", "train_s",
)  # fmt: skip


def summarize_rows(rows: list[dict]) -> list[dict]:
    """One summary per (variant, method), in first-seen order: for every numeric column its
    mean, min and max over the seeds (NaNs left out), ``seeds``, and ``collapsed``, the
    number of seeds whose mask head died (:func:`dead_mask_head`)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("variant", ""), r["method"]), []).append(r)
    out = []
    for (variant, method), members in groups.items():
        summary: dict = {"variant": variant, "method": method, "seeds": len(members)}
        for key in NUMERIC_COLUMNS:
            values = np.array([m[key] for m in members if m.get(key) is not None], dtype=float)
            values = values[~np.isnan(values)]
            summary[key] = (float(values.mean()), float(values.min()), float(values.max())) if len(values) else (float("nan"),) * 3
        summary["collapsed"] = sum(1 for m in members if dead_mask_head(m))
        out.append(summary)
    return out


def _cell(stat: tuple[float, float, float], fmt: str, spread: bool) -> str:
    mean, lo, hi = stat
    if not spread:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(lo, fmt)}-{format(hi, fmt)})"


def format_quality_table(summaries: list[dict]) -> str:
    """Markdown: one row per (variant, method); with several seeds each cell is
    ``mean (min-max)``."""
    named = any(s["variant"] for s in summaries)
    lines = [
        ("| variant " if named else "")
        + "| method | seeds | segm AP | AP50 | AP75 | bbox AP | box-fill segm AP (same detections) | Spearman(IoU, cls) "
        "| Spearman(IoU, mask-aware) | mask outside its box | pseudo-mask IoU, train boxes (filled boxes) | collapsed | train s |",
        ("|---" if named else "") + "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        many = s["seeds"] > 1
        c = lambda key, fmt, s=s, many=many: _cell(s[key], fmt, many)  # noqa: E731
        lines.append(
            (f"| {s['variant']} " if named else "")
            + f"| {s['method']} | {s['seeds']} | {c('segm_AP', '.1f')} | {c('segm_AP50', '.1f')} | {c('segm_AP75', '.1f')} "
            f"| {c('bbox_AP', '.1f')} | {c('boxfill_segm_AP', '.1f')} | {c('rho_cls', '.3f')} | {c('rho_mask_aware', '.3f')} "
            f"| {c('outside_box', '.1%')} | {c('pseudo_iou', '.3f')} ({s['pseudo_boxfill_iou'][0]:.3f}) "
            f"| {s['collapsed']}/{s['seeds']} | {s['train_s'][0]:.0f} |"
        )
    return "\n".join(lines)


# The authors' own training loop (detectron2/AdelaiDet, BoxTeacher repo) measured on a
# 2-core machine with torch.set_num_threads(2), 3 warm-up then 20 timed iterations, in
# the setting of :func:`authors_setting_overrides`.
AUTHORS_SETTINGS: dict[str, dict] = {
    "boxteacher": {"method": "boxteacher", "teacher_min_size": 800, "s_per_iter": 4.69, "peak_rss_gib": 2.45},
    "boxteacher-512": {"method": "boxteacher", "teacher_min_size": 512, "s_per_iter": 3.36, "peak_rss_gib": None},
    "boxinst": {"method": "boxinst", "teacher_min_size": 800, "s_per_iter": 2.30, "peak_rss_gib": 2.03},
}


def authors_setting_overrides(name: str) -> list[str]:
    """R-50 from scratch (frozen BN, stem+res2 frozen, as detectron2 without weights), 2
    classes, batch 1, the 512x512 image kept at 512 (no resize), strong augmentation on,
    the teacher at the test scale; no clipping, no workers (data on the training thread)."""
    s = AUTHORS_SETTINGS[name]
    return [
        f"method={s['method']}", "model.backbone.depth=50", "model.backbone.weights=none", "model.backbone.norm=frozen_bn",
        "model.backbone.freeze_at=2", "model.mask.out_channels=16", "input.min_size_train=[512]", "input.max_size_train=1333",
        "boxteacher.strong_augmentation=strong", f"boxteacher.teacher_min_size={s['teacher_min_size']}",
        "boxteacher.teacher_max_size=1333", "solver.batch_size=1", "solver.grad_accum_steps=1", "solver.amp=none",
        "data.num_workers=0", "train.checkpoint_period=0", "train.eval_period=0",
        # the authors' losses and coupling (our defaults add terms for box supervision from scratch)
        "model.mask.controller_grad_scale=1.0", "model.mask.branch_grad_scale=1.0", "model.fcos.reg_straight_through=false",
        "boxinst.outside_weight=0", "boxinst.projection_bce_weight=0", "boxinst.projection_in_image=false", "solver.clip_grad_mode=global",
    ]  # fmt: skip


def write_authors_image(folder: str | Path, seed: int = 0) -> Path:
    """A one-image COCO folder: 512x512 RGB (smooth background, 3 textured ellipses), 3
    boxes of 2 categories (masks too, unused by box-supervised training)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32)
    image = np.stack([96 + 60 * np.sin(xx / 70 + c) * np.cos(yy / 90 - c) for c in range(3)], axis=-1)
    boxes = [(60, 80, 260, 300, 1), (300, 40, 470, 220, 2), (220, 300, 460, 480, 1)]
    anns = []
    for k, (x1, y1, x2, y2, cat) in enumerate(boxes):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        colour = rng.uniform(30, 230, size=3)
        image[inside] = colour + 25 * np.sin(xx[inside, None] / 6.0)
        rle = mask_utils.encode(np.asfortranarray(inside.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append(
            {
                "id": k + 1,
                "image_id": 1,
                "category_id": cat,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(inside.sum()),
                "iscrowd": 0,
                "segmentation": rle,
            }
        )
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "images" / "bench.png")
    coco = {
        "images": [{"id": 1, "file_name": "bench.png", "height": 512, "width": 512}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing_a"}, {"id": 2, "name": "thing_b"}],
    }
    for split in ("train", "val"):
        (folder / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    return folder


def cmd_train_speed(args) -> int:
    import tempfile

    from training.config import load_config
    from training.train import Trainer, infinite

    threads = args.threads or (2 if args.authors_setting else None)
    if threads:
        torch.set_num_threads(threads)
    workdir = Path(tempfile.mkdtemp(prefix="boxteacher-bench-train-"))
    if args.authors_setting:
        data = write_authors_image(workdir / "data")
        cfg = load_config(None, authors_setting_overrides(args.authors_setting) + list(args.overrides))
    else:
        if not (args.config and args.data):
            raise ValueError("benchmark train needs --config and --data (or --authors-setting)")
        data = args.data
        cfg = load_config(args.config, list(args.overrides))
    trainer = Trainer(cfg, data, workdir / "run", args.device)
    stream = infinite(trainer.loader)
    cuda = args.device.startswith("cuda")
    for _ in range(args.warmup):
        trainer.step(*next(stream))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.iters):  # data loading included, as in the authors' loop
        trainer.step(*next(stream))
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.iters
    cpu = (time.process_time() - c0) / args.iters  # CPU seconds of all threads: less sensitive to a shared machine
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "method": trainer.cfg.method,
        "setting": args.authors_setting or args.config,
        "s_per_iter": round(dt, 4),
        "cpu_s_per_iter": round(cpu, 3),
        "images_per_s": round(trainer.cfg.solver.batch_size / dt, 3),
        "peak_rss_gib": round(peak_rss_gib, 3),
        "threads": torch.get_num_threads(),
        "amp": trainer.cfg.solver.amp,
        "skipped_steps": trainer.skipped_steps,
    }
    if cuda:
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if args.authors_setting:
        theirs = AUTHORS_SETTINGS[args.authors_setting]
        result["authors_s_per_iter"] = theirs["s_per_iter"]
        result["authors_peak_rss_gib"] = theirs["peak_rss_gib"]
        result["speedup_vs_authors"] = round(theirs["s_per_iter"] / dt, 2)
    print(json.dumps(result))
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    return 0
