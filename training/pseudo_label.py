"""Offline pseudo-labelling: a frozen model + Algorithm 1 turn a box-only dataset
into a mask dataset (the paper's "naive self-training" baseline, and a product feature).

Every ground-truth box that a prediction matches (IoU >= 0.5, one-to-one, greedy by the
mask-aware score) gets that prediction's mask, cropped to the box, and the mask-aware
score of that mask inside the box (``"score"`` in the annotation).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from training.boxteacher import assign_pseudo_masks, crop_masks_to_boxes
from training.data.coco import CocoInstances
from training.evaluate import box_fill_masks, encode_mask
from training.losses import box_masks
from training.model.condinst import CondInst
from training.model.scores import mask_aware_score

log = logging.getLogger(__name__)


@torch.no_grad()
def pseudo_label_dataset(model: CondInst, data_dir: str | Path, split: str = "train", iou_threshold: float = 0.5, score_threshold: float = 0.05) -> dict:
    """A COCO dict: the split's images and categories, one annotation per matched GT box."""
    dataset = CocoInstances(data_dir, split)
    coco = dataset.coco
    annotations, seen, total_boxes = [], set(), 0
    for i in range(len(dataset)):
        image, target = dataset[i]
        image_id = int(target["image_id"])
        if image_id in seen:
            continue
        seen.add(image_id)
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        total_boxes += len(anns)
        if not anns:
            continue
        gt = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns])
        inst = model.predict([image.as_subclass(torch.Tensor)], return_probs=True)[0]
        matched = assign_pseudo_masks(inst.boxes, inst.scores, gt, iou_threshold, score_threshold)
        for g in torch.nonzero(matched >= 0).squeeze(1).tolist():
            k = int(matched[g])
            probs = crop_masks_to_boxes(inst.mask_probs[k : k + 1], gt[g : g + 1])
            h, w = probs.shape[-2:]
            score = mask_aware_score(inst.det_scores[k : k + 1], probs, box_masks(gt[g : g + 1], h, w, stride=1), model.cfg.model.mask.threshold)
            mask = (probs[0] > model.cfg.model.mask.threshold).numpy()
            if not mask.any():
                continue
            ann = dict(anns[g])
            ann.update(segmentation=encode_mask(mask), area=float(mask.sum()), score=float(score[0]), pseudo=True)
            annotations.append(ann)
    log.info("pseudo masks for %d of %d boxes in %d images", len(annotations), total_boxes, len(seen))
    return {
        "info": {"description": f"pseudo masks from a frozen model on {Path(data_dir).name}/{split}"},
        "images": coco.loadImgs(sorted(seen)),
        "categories": coco.loadCats(coco.getCatIds()),
        "annotations": annotations,
    }


def pseudo_mask_quality(pseudo: dict, data_dir: str | Path, split: str = "train") -> dict[str, float] | None:
    """How good are the pseudo masks, measured against the split's hidden true masks.

    Training never reads these masks; this is a diagnostic (the integration test, the
    ``pseudo-label`` command on a split that has masks). Over every GT box (not crowd,
    non-empty) that has a true mask: ``coverage`` = share of boxes with a pseudo mask,
    ``matched_iou`` = mean mask IoU over those, ``mean_iou`` = mean over all boxes with
    0 for a box without one, ``boxfill_iou`` = the same mean for the filled boxes (what
    box-only labels give). ``None`` when the split holds no masks.
    """
    dataset = CocoInstances(data_dir, split)
    coco = dataset.coco
    by_id = {a["id"]: a for a in pseudo["annotations"]}
    image_ids = {im["id"] for im in pseudo["images"]}
    ious, box_ious, matched = [], [], 0
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=sorted(image_ids), iscrowd=False)):
        if not ann.get("segmentation") or ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
            continue
        true = coco.annToRLE(ann)
        if not mask_utils.area(true):
            continue
        x, y, w, h = ann["bbox"]
        box = box_fill_masks(torch.tensor([[x, y, x + w, y + h]]), *true["size"])[0].numpy()
        box_ious.append(_iou(mask_utils.encode(np.asfortranarray(box.astype(np.uint8))), true))
        p = by_id.get(ann["id"])
        if p is None:
            ious.append(0.0)
            continue
        matched += 1
        ious.append(_iou(p["segmentation"], true))
    if not ious:
        return None
    n = len(ious)
    return {
        "boxes": float(n),
        "coverage": matched / n,
        "matched_iou": sum(ious) / max(matched, 1),
        "mean_iou": sum(ious) / n,
        "boxfill_iou": sum(box_ious) / n,
    }


def _iou(a: dict, b: dict) -> float:
    """Mask IoU of two COCO RLEs (pycocotools)."""
    return float(mask_utils.iou([a], [b], [0])[0, 0])


def write_pseudo_labels(model: CondInst, data_dir: str | Path, split: str, output: str | Path) -> tuple[Path, dict]:
    """Write the pseudo-label file; returns its path and the pseudo-label dict."""
    result = pseudo_label_dataset(model, data_dir, split)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result))
    return output, result
