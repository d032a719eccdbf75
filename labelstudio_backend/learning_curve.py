"""The annotation loop as a team sees it, simulated on a COCO dataset that has true masks.

``boxteacher benchmark learning-curve --data DIR --config RECIPE --images 34,68,136``:

- round 0: a model trained from boxes only (``RECIPE``'s method, ``--initial-iters``) on the
  first 34 training images of a seeded order, as if the team had boxed 34 images;
- each next round: the annotators have boxed more images (68, then 136, nested: the earlier
  ones stay). The backend's own fit step learns from all boxes so far
  (:func:`labelstudio_backend.fit.fine_tune`: BoxTeacher from the served model, the backend's
  settings, ``--fit-iters`` iterations), and :func:`labelstudio_backend.fit.evaluate_and_decide`
  compares the new model with the served one on the held-out split (``val``: box AP and the
  box-prompted mask IoU against its true masks, as for tasks where annotators accepted or
  drew masks). The promoted model serves the next round; a worse one is kept as a candidate.

The training split's masks are never read (the subsets are written without segmentations).
Reported per round: what serves after the round (box AP, AP50, box-prompted mean IoU on the
held-out split: what an annotator gets from a rectangle), the fine-tuned model's own
numbers and the decision; the filled box's IoU is the floor to beat.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

log = logging.getLogger(__name__)


def write_box_subset(source: Path, out: Path, image_ids: list[int]) -> Path:
    """A COCO folder at ``out`` with the ``train`` split reduced to ``image_ids`` and their
    boxes only (segmentations removed), the source's ``val`` split as it is (the held-out
    tasks, with masks), and ``images`` linked to the source's."""
    data = json.loads((source / "annotations" / "train.json").read_text())
    keep = set(image_ids)
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [{k: v for k, v in a.items() if k != "segmentation"} for a in data["annotations"] if a["image_id"] in keep]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / "train.json").write_text(json.dumps(data))
    (out / "annotations" / "val.json").write_text((source / "annotations" / "val.json").read_text())
    if not (out / "images").exists():
        (out / "images").symlink_to((source / "images").resolve(), target_is_directory=True)
    return out


def filled_box_iou(data_dir: Path, split: str = "val") -> float:
    """Mean IoU of each box filled as its mask against the true mask (the floor)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from training.data.coco import CocoInstances

    coco = CocoInstances(data_dir, split).coco
    ious = []
    for ann in coco.dataset["annotations"]:
        if not ann.get("segmentation") or ann.get("iscrowd"):
            continue
        info = coco.imgs[ann["image_id"]]
        true = coco.annToRLE(ann)
        box = mask_utils.frPyObjects(np.asarray([ann["bbox"]], dtype=np.float64), info["height"], info["width"])
        ious.append(float(mask_utils.iou(box, [true], [0])[0, 0]))
    return round(sum(ious) / len(ious), 4) if ious else float("nan")


def run_learning_curve(
    data: Path,
    recipe: str,
    image_counts: list[int],
    output: Path,
    initial_iters: int,
    fit_iters: int,
    fit_batch_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    overrides: list[str] | None = None,
) -> dict:
    """Round 0 trained on ``image_counts[0]`` images, then one fit round per further count.
    Returns {"setup", "filled_box_iou", "rounds": [...]} and writes OUTPUT/learning_curve.json."""
    from labelstudio_backend.fit import evaluate_and_decide, evaluate_checkpoint, fine_tune
    from labelstudio_backend.settings import BackendSettings
    from training.config import load_config
    from training.train import train

    if sorted(image_counts) != image_counts or len(set(image_counts)) != len(image_counts):
        raise ValueError(f"--images must grow from round to round, got {image_counts}")
    train_json = json.loads((data / "annotations" / "train.json").read_text())
    with_boxes = sorted({a["image_id"] for a in train_json["annotations"] if not a.get("iscrowd")})
    if image_counts[-1] > len(with_boxes):
        raise ValueError(f"{data}/annotations/train.json has {len(with_boxes)} images with boxes, fewer than {image_counts[-1]}")
    order = list(with_boxes)
    random.Random(seed).shuffle(order)
    output.mkdir(parents=True, exist_ok=True)
    batch = {} if fit_batch_size is None else {"train_batch_size": fit_batch_size}
    settings = BackendSettings(train_iters=fit_iters, train_device=device, device=device, **batch)
    rounds = []

    n0 = image_counts[0]
    round_dir = output / f"round0-{n0}"
    data_dir = write_box_subset(data, round_dir / "data", order[:n0])
    cfg = load_config(recipe, [f"solver.max_iter={initial_iters}", f"train.seed={seed}", *(overrides or [])])
    started = time.time()
    serving = train(cfg, data_dir, round_dir, device, progress=False)
    served_eval = evaluate_checkpoint(serving, data_dir, "val", device, settings.branch)
    rounds.append(
        {
            "round": 0,
            "images": n0,
            "iterations": initial_iters,
            "step": f"{cfg.method} from the recipe",
            "serving": served_eval,
            "new": served_eval,
            "decision": "first model",
            "promoted": True,
            "seconds": round(time.time() - started, 1),
            "checkpoint": str(serving),
        }  # fmt: skip
    )
    log.info("round 0 (%d images): %s", n0, served_eval)

    for k, n in enumerate(image_counts[1:], start=1):
        round_dir = output / f"round{k}-{n}"
        data_dir = write_box_subset(data, round_dir / "data", order[:n])
        started = time.time()
        new, _ = fine_tune(serving, data_dir, round_dir, settings, n)
        decision = evaluate_and_decide(serving, new, data_dir, "val", device, settings)
        if decision["better"]:
            serving, served_eval = new, decision["eval_after"]
        rounds.append(
            {
                "round": k,
                "images": n,
                "iterations": fit_iters,
                "step": "fit (BoxTeacher from the served model)",
                "serving": served_eval,
                "new": decision["eval_after"],
                "decision": decision["decision"],
                "promoted": decision["better"],
                "seconds": round(time.time() - started, 1),
                "checkpoint": str(serving),
            }  # fmt: skip
        )
        log.info("round %d (%d images): %s", k, n, decision["decision"])

    result = {
        "setup": {
            "data": str(data),
            "recipe": recipe,
            "method": cfg.method,
            "overrides": list(overrides or []),
            "seed": seed,
            "initial_iters": initial_iters,
            "fit_iters": fit_iters,
            "fit_lr": settings.train_base_lr or cfg.solver.base_lr * 0.1,
            "fit_batch_size": settings.train_batch_size,
            "promotion_rule": "box AP and box-prompted mask IoU on val not lower (tolerances "
            f"{settings.train_promote_ap_tolerance:g} AP, {settings.train_promote_iou_tolerance:g} IoU)",
            "device": device,
        },  # fmt: skip
        "filled_box_iou": filled_box_iou(data_dir),
        "rounds": rounds,
    }
    (output / "learning_curve.json").write_text(json.dumps(result, indent=2))
    return result


def format_markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"Simulated annotation project on `{s['data']}` ({s['recipe']}, seed {s['seed']}): round 0 = {s['method']} "
        f"for {s['initial_iters']} iterations on the first boxed images; each next round = the backend's fit "
        f"({s['fit_iters']} BoxTeacher iterations at lr {s['fit_lr']:g}, batch {s['fit_batch_size']}, from the served model) on all boxes so far, "
        f"promoted only if not worse on val. Filled-box IoU on val: {result['filled_box_iou']:.3f}.",
        "",
        "| round | boxed images | step | new model: box AP / prompted IoU | decision | serving after: box AP / AP50 / prompted IoU | minutes |",
        "|---:|---:|---|---|---|---|---:|",
    ]
    for r in result["rounds"]:
        new, srv = r["new"], r["serving"]
        lines.append(
            f"| {r['round']} | {r['images']} | {r['step']}, {r['iterations']} it | {new['AP']:.1f} / {new['mask_iou']:.3f} | "
            f"{'promoted' if r['promoted'] else 'kept the old model'}: {r['decision']} | "
            f"{srv['AP']:.1f} / {srv['AP50']:.1f} / {srv['mask_iou']:.3f} | {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def register(bench: argparse._SubParsersAction) -> None:
    """``boxteacher benchmark learning-curve`` (entry point group ``boxteacher.benchmarks``)."""
    p = bench.add_parser("learning-curve", help="the Label Studio fit loop simulated on a COCO dataset: quality per round")
    p.add_argument("--data", required=True, help="COCO folder with train and val splits; val needs true masks")
    p.add_argument("--config", required=True, help="recipe of the round-0 model (its method: boxteacher or boxinst)")
    p.add_argument("--images", default="34,68,136", help="boxed training images per round, growing (default 34,68,136)")
    p.add_argument("--initial-iters", type=int, default=400, help="iterations of the round-0 training")
    p.add_argument("--fit-iters", type=int, default=300, help="iterations of each fit round (the backend's train_iters)")
    p.add_argument("--fit-batch-size", type=int, default=None, help="batch of each fit round (default: the backend's train_batch_size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="bench/learning-curve")
    p.add_argument("overrides", nargs="*", help="config overrides of the round-0 training, key=value")
    p.set_defaults(func=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> int:
    result = run_learning_curve(
        Path(args.data),
        args.config,
        [int(v) for v in str(args.images).split(",") if v.strip()],
        Path(args.output),
        args.initial_iters,
        args.fit_iters,
        args.fit_batch_size,
        args.device,
        args.seed,
        args.overrides,
    )
    print(format_markdown(result), flush=True)
    return 0
