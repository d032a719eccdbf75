"""COCO evaluation (pycocotools) of a model on a dataset folder.

Results: bbox detections ranked by the detection score, segm ranked by the
mask-aware score. ``mask_mode="box"`` replaces every predicted mask with its filled
predicted box: the box-fill baseline on the very same detections.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from training.data.coco import CocoInstances
from training.model.boxes import box_fill_masks  # re-exported: the box-fill rule lives with the other box rules
from training.model.condinst import CondInst, Instances

log = logging.getLogger(__name__)
METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def encode_mask(mask: np.ndarray) -> dict:
    """(H,W) bool -> COCO compressed RLE with ``counts`` as str (JSON-safe)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def instances_to_coco(
    inst: Instances, image_id: int, label_to_category_id: list[int], mask_mode: str = "mask"
) -> tuple[list[dict], list[dict]]:
    """One image's predictions -> (bbox results, segm results) in COCO result format."""
    boxes = inst.boxes.cpu()
    if mask_mode == "box":
        masks = box_fill_masks(boxes, *inst.masks.shape[-2:]).numpy()
    else:
        masks = inst.masks.cpu().numpy()
    bbox, segm = [], []
    for k in range(len(inst)):
        x1, y1, x2, y2 = boxes[k].tolist()
        category_id = int(label_to_category_id[int(inst.labels[k])])
        bbox.append(
            {"image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(inst.det_scores[k])}
        )
        segm.append(
            {"image_id": image_id, "category_id": category_id, "segmentation": encode_mask(masks[k]), "score": float(inst.scores[k])}
        )
    return bbox, segm


def coco_metrics(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int], use_cats: bool = True) -> dict[str, float]:
    """COCOeval summary as {AP, AP50, AP75, APs, APm, APl} in percent (0 when no results)."""
    if not results:
        return {k: 0.0 for k in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = image_ids
        ev.params.useCats = int(use_cats)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: round(max(float(v), 0.0) * 100, 3) for k, v in zip(METRIC_NAMES, ev.stats[:6])}


@torch.no_grad()
def predict_dataset(
    model: CondInst, dataset: CocoInstances, mask_mode: str = "mask", max_images: int | None = None
) -> tuple[list[dict], list[dict], list[int]]:
    """Run the model on every image (original size in, original size out)."""
    model.eval()
    bbox, segm, ids = [], [], []
    seen = set()
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    for i in range(n):
        image, target = dataset[i]
        image_id = int(target["image_id"])
        if image_id in seen:  # a corrupt image was replaced by the next one
            continue
        seen.add(image_id)
        inst = model.predict([image], resize=True)[0]
        b, s = instances_to_coco(inst, image_id, dataset.label_to_category_id, mask_mode)
        bbox += b
        segm += s
        ids.append(image_id)
    return bbox, segm, ids


def evaluate_model(
    model: CondInst, data_dir: str | Path, split: str = "val", mask_mode: str = "mask", max_images: int | None = None
) -> dict:
    """{"segm": {...}, "bbox": {...}, "num_images": n} for the model on DIR/annotations/SPLIT.json."""
    class_agnostic = bool(model.cfg.data.class_agnostic)
    dataset = CocoInstances(data_dir, split, class_agnostic=class_agnostic)
    bbox, segm, ids = predict_dataset(model, dataset, mask_mode, max_images)
    return {
        "segm": coco_metrics(dataset.coco, segm, "segm", ids, use_cats=not class_agnostic),
        "bbox": coco_metrics(dataset.coco, bbox, "bbox", ids, use_cats=not class_agnostic),
        "num_images": len(ids),
        "mask_mode": mask_mode,
        "class_agnostic_nms": model.cfg.model.fcos.class_agnostic_nms,
    }


def write_metrics(metrics: dict, output: str | Path) -> Path:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path
