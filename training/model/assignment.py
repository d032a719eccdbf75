"""Algorithm 1 of BoxTeacher: one-to-one assignment of predictions to boxes.

An inference-time rule as much as a training one, so it lives with the model's other
post-processing: the teacher's pseudo masks are assigned to the ground-truth boxes with
it (training.engine, training.pseudo_label), and box prompts are matched to the model's
own detections with it (serving.prompting).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["assign_pseudo_masks"]


def assign_pseudo_masks(
    pred_boxes: Tensor,
    pred_scores: Tensor,
    gt_boxes: Tensor,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.05,
) -> Tensor:
    """Box-based pseudo-mask assignment (paper Algorithm 1), one image.

    Keep the predictions with ``score >= score_threshold``; visit them in descending score
    (ties: lower index first); each takes the not-yet-assigned GT box with the highest
    IoU, if that IoU ``>= iou_threshold`` (ties: lower GT index). One-to-one: each GT gets at
    most one prediction and each prediction at most one GT. Classes are not compared.

    The authors' code marks a GT as taken with ``gtm[j] > 0`` on 0-based indices, so a GT
    taken by the highest-scoring prediction can be re-matched later; that off-by-one is
    deliberately **not** reproduced.

    Args:
        pred_boxes: ``(M, 4)`` xyxy teacher boxes.
        pred_scores: ``(M,)`` their scores (the mask-aware score, or the detection score).
        gt_boxes: ``(N, 4)`` xyxy GT boxes in the same coordinates.
    Returns:
        ``(N,)`` int64 index into the predictions, -1 where a GT has no pseudo mask; on
        ``gt_boxes.device``. All -1 when M == 0 or N == 0.
    """
    num_gt = gt_boxes.shape[0]
    matched = torch.full((num_gt,), -1, dtype=torch.int64)
    if num_gt == 0 or pred_boxes.shape[0] == 0:
        return matched.to(gt_boxes.device)
    iou = torch.nan_to_num(box_iou(pred_boxes.float(), gt_boxes.float()), nan=0.0).cpu()
    scores = pred_scores.detach().float().cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] >= score_threshold].tolist()
    iou_rows = iou.tolist()
    result = [-1] * num_gt
    for p in order:
        best_gt, best_iou = -1, iou_threshold
        for g, value in enumerate(iou_rows[p]):
            if result[g] == -1 and value >= best_iou and (best_gt == -1 or value > best_iou):
                best_gt, best_iou = g, value
        if best_gt >= 0:
            result[best_gt] = p
    return torch.tensor(result, dtype=torch.int64, device=gt_boxes.device)
