"""One BoxTeacher training step, as named functions (docs/method.md, "BoxTeacher").

1. :func:`student_batch`: the loader's images (geometry already augmented) -> the
   student's input, with the strong photometric augmentation for BoxTeacher;
2. :func:`teacher_pseudo_masks`: the EMA teacher predicts on the un-jittered image at
   the test scale; Algorithm 1 gives each GT box a pseudo mask and its quality;
3. :func:`criterion.compute_losses`: L_det + L_box-sup + L_mask-sup;
4. the optimiser step and the EMA update (in training/train.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from training.boxteacher import assign_pseudo_masks, crop_masks_to_boxes, gather_assigned_masks, pseudo_mask_targets, quality_score
from training.config import Config
from training.criterion import StudentBatch
from training.losses import box_masks
from training.model.condinst import CondInst
from training.model.processing import paste_masks, resize_image


def _pad_uint8(images: list[Tensor], divisibility: int) -> Tensor:
    hp = -(-max(im.shape[-2] for im in images) // divisibility) * divisibility
    wp = -(-max(im.shape[-1] for im in images) // divisibility) * divisibility
    out = torch.zeros(len(images), 3, hp, wp, dtype=torch.uint8)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return out


def student_batch(
    model: CondInst,
    images: list[Tensor],
    targets: list[dict],
    cfg: Config,
    strong_augmentation: Callable[[Tensor], Tensor] | None = None,
) -> StudentBatch:
    """Loader output (uint8 RGB (3,h,w) images + targets with boxes/labels/masks) -> StudentBatch."""
    device = model.device
    student_images = [strong_augmentation(im) if strong_augmentation is not None else im for im in images]
    batch, sizes = model.preprocess([im.to(device) for im in student_images])
    raw = _pad_uint8(list(images), cfg.input.size_divisibility)
    boxes = [t["boxes"].float().to(device) for t in targets]
    labels = [t["labels"].to(device) for t in targets]
    masks = [t["masks"].to(device) for t in targets] if cfg.method == "condinst" else None
    removed = []
    for t, (h, _) in zip(targets, sizes):
        orig_h = t.get("orig_size", (h, 0))[0]
        removed.append(int(cfg.boxinst.bottom_pixels_removed * h / max(orig_h, 1)))
    return StudentBatch(batch, raw.to(device), sizes, boxes, labels, masks, None, removed)


@torch.no_grad()
def teacher_pseudo_masks(
    teacher: CondInst, images: list[Tensor], batch: StudentBatch, cfg: Config
) -> tuple[list[tuple[Tensor, Tensor, Tensor]], dict[str, float]]:
    """Pseudo masks for every GT box of the batch, in the student's geometry.

    The teacher sees the un-jittered images (same flip and scale as the student),
    re-sized to the test scale; its masks are pasted back at the student's input size
    (no flip/scale bookkeeping needed), binarised at 0.5, assigned to GT boxes with
    Algorithm 1 (ranked by the mask-aware score), cropped to their boxes, weighted by
    the configured quality score. Returns per image (soft, binary, weights) at stride 4
    on the student's padded canvas, and statistics (count, mean weight).
    """
    bt, thr = cfg.boxteacher, cfg.model.mask.threshold
    teacher_inputs = [resize_image(im, bt.teacher_min_size, bt.teacher_max_size) for im in images]
    tbatch, tsizes = teacher.preprocess(teacher_inputs)
    head, mask_feats = teacher(tbatch)
    dets = teacher.detect(head, mask_feats, tsizes)
    padded_hw = tuple(batch.images.shape[-2:])
    out, num_assigned, weight_sum = [], 0, 0.0
    for det, student_hw, gt_boxes in zip(dets, batch.image_sizes, batch.boxes):
        sy, sx = student_hw[0] / det.input_hw[0], student_hw[1] / det.input_hw[1]
        pred_boxes = det.dets.boxes * det.dets.boxes.new_tensor([sx, sy, sx, sy])
        matched = assign_pseudo_masks(pred_boxes, det.scores, gt_boxes, bt.iou_threshold, bt.score_threshold)
        has = matched >= 0
        sel = matched.clamp(min=0)
        if det.mask_probs.shape[0] == 0 or gt_boxes.shape[0] == 0:  # nothing to assign
            probs = det.mask_probs.new_zeros(gt_boxes.shape[0], *student_hw)
            sel = torch.zeros(0, dtype=torch.int64, device=matched.device) if det.mask_probs.shape[0] == 0 else sel
        else:
            probs = paste_masks(det.mask_probs[sel], det.input_hw, student_hw, cfg.model.mask.out_stride)
        probs = crop_masks_to_boxes(probs, gt_boxes)
        gt_box_masks = box_masks(gt_boxes, student_hw[0], student_hw[1], stride=1)
        if det.mask_probs.shape[0] == 0:
            quality = probs.new_zeros(gt_boxes.shape[0])
        else:
            quality = quality_score(bt.quality, det.dets.det_scores[sel], probs, gt_box_masks, pred_boxes[sel], gt_boxes, thr)
        masks, weights = gather_assigned_masks(
            (probs > thr).float(), quality, torch.where(has, torch.arange(len(has), device=has.device), -1)
        )
        soft, binary = pseudo_mask_targets(masks, gt_boxes, padded_hw, cfg.model.mask.out_stride, thr)
        out.append((soft, binary, weights))
        num_assigned += int(has.sum())
        weight_sum += float(weights[has].sum())
    stats = {"pseudo_masks": float(num_assigned), "pseudo_mask_score": weight_sum / max(num_assigned, 1)}
    return out, stats
