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

from training.boxteacher import (
    crop_masks_to_boxes,
    gather_assigned_masks,
    match_teacher_view,
    merge_teacher_views,
    pseudo_mask_targets,
    quality_score,
)
from training.config import Config
from training.criterion import StudentBatch
from training.losses import box_masks
from training.model.condinst import CondInst, InputDetections
from training.model.processing import paste_masks, resize_image, scale_boxes


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


def assigned_teacher_view(
    det: InputDetections,
    gt_boxes: Tensor,
    output_hw: tuple[int, int],
    flipped: bool,
    out_stride: int,
    iou_threshold: float,
    score_threshold: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One teacher view of one image: per GT box, Algorithm 1's match pasted at ``output_hw``
    (the student's input in training, the image's own pixels in ``boxteacher pseudo-label``).

    A ``flipped`` view saw the image mirrored; its boxes and masks are mirrored back here.
    Only the matched detections are pasted. ``out_stride``: the stride of ``det.mask_probs``.
    Returns ``(probs (G, H, W), det_scores (G,), boxes (G, 4), has (G,))``, zeros where unmatched.
    """
    num_gt = gt_boxes.shape[0]
    if det.mask_probs.shape[0] == 0 or num_gt == 0:  # nothing to assign
        zeros = gt_boxes.new_zeros(num_gt)
        return gt_boxes.new_zeros(num_gt, *output_hw), zeros, gt_boxes.new_zeros(num_gt, 4), zeros.bool()
    pred_boxes = scale_boxes(det.dets.boxes, det.input_hw, output_hw)  # clipped to the image, as the authors' postprocess
    pred_boxes, matched = match_teacher_view(pred_boxes, det.scores, gt_boxes, output_hw, flipped, iou_threshold, score_threshold)
    has, sel = matched >= 0, matched.clamp(min=0)
    probs = paste_masks(det.mask_probs[sel], det.input_hw, output_hw, out_stride)
    if flipped:
        probs = probs.flip(-1)
    keep = has.to(probs.dtype)
    return probs * keep.view(-1, 1, 1), det.dets.det_scores[sel] * keep, pred_boxes[sel] * keep.view(-1, 1), has


@torch.no_grad()
def teacher_views(
    teacher: CondInst, images: list[Tensor], sizes: list[int], max_size: int, flip: bool
) -> list[tuple[list[InputDetections], bool]]:
    """The teacher's detections of ``images`` (uint8 RGB) at each test scale in ``sizes``
    (shorter side; the longer at most ``max_size``), and with ``flip`` of their mirrors too.

    One forward per scale, over the images and their mirrors together. Returns one entry per
    (scale, flip) view: (detections per image, whether that view saw the images mirrored).
    """
    flips = [False, True] if flip else [False]
    views = []
    for size in sizes:
        inputs = [resize_image(im, size, max_size) for im in images]
        batch, input_sizes = teacher.preprocess([im.flip(-1) if f else im for f in flips for im in inputs])
        head, mask_feats = teacher(batch)
        dets = teacher.detect(head, mask_feats, input_sizes)
        views += [(dets[v * len(images) : (v + 1) * len(images)], f) for v, f in enumerate(flips)]
    return views


@torch.no_grad()
def teacher_pseudo_masks(
    teacher: CondInst, images: list[Tensor], batch: StudentBatch, cfg: Config
) -> tuple[list[tuple[Tensor, Tensor, Tensor]], dict[str, float]]:
    """Pseudo masks for every GT box of the batch, in the student's geometry.

    The teacher sees the un-jittered images (same flip and scale as the student),
    re-sized to the test scale; its masks are pasted back at the student's input size
    (no flip/scale bookkeeping needed), assigned to GT boxes with Algorithm 1 (ranked by
    the mask-aware score), cropped to their boxes, binarised at 0.5, weighted by the
    configured quality score. With ``boxteacher.teacher_flip`` the teacher also sees each
    image mirrored, with ``boxteacher.teacher_extra_sizes`` also at those test scales, and all
    views are averaged (:func:`teacher_views`, :func:`merge_teacher_views`). Returns per
    image (soft, binary, weights) at stride 4 on the student's padded canvas, and
    statistics (count, mean weight).
    """
    bt, thr, stride = cfg.boxteacher, cfg.model.mask.threshold, cfg.model.mask.out_stride
    views = teacher_views(teacher, images, [bt.teacher_min_size, *bt.teacher_extra_sizes], bt.teacher_max_size, bt.teacher_flip)
    padded_hw = tuple(batch.images.shape[-2:])
    out, num_assigned, weight_sum = [], 0, 0.0
    for i, (student_hw, gt_boxes) in enumerate(zip(batch.image_sizes, batch.boxes)):
        assigned = [
            assigned_teacher_view(dets[i], gt_boxes, student_hw, flipped, stride, bt.iou_threshold, bt.score_threshold)
            for dets, flipped in views
        ]
        probs, det_scores, pred_boxes, has = merge_teacher_views(assigned)
        probs = crop_masks_to_boxes(probs, gt_boxes)
        gt_box_masks = box_masks(gt_boxes, student_hw[0], student_hw[1], stride=1)
        quality = (
            quality_score(bt.quality, det_scores, probs, gt_box_masks, pred_boxes, gt_boxes, thr)
            if has.any()
            else probs.new_zeros(len(has))
        )
        masks, weights = gather_assigned_masks(
            (probs > thr).float(), quality, torch.where(has, torch.arange(len(has), device=has.device), -1)
        )
        soft, binary = pseudo_mask_targets(masks, gt_boxes, padded_hw, stride, thr)
        out.append((soft, binary, weights))
        num_assigned += int(has.sum())
        weight_sum += float(weights[has].sum())
    stats = {"pseudo_masks": float(num_assigned), "pseudo_mask_score": weight_sum / max(num_assigned, 1)}
    return out, stats
