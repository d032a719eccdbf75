"""The teacher side of BoxTeacher, one equation or step per function.

docs/method.md, "BoxTeacher" (and where the authors' code differs from the paper: "Where we differ"):
- :func:`ema_momentum`, :func:`ema_update_`: the EMA teacher;
- :func:`mean_foreground_probability`, :func:`mask_aware_score`, :func:`authors_pseudo_weight`,
  :func:`quality_score`: pseudo-mask quality;
- :func:`assign_pseudo_masks` (Algorithm 1, defined in :mod:`training.model.assignment`
  next to the model's post-processing; re-exported here), :func:`gather_assigned_masks`,
  :func:`crop_masks_to_boxes`, :func:`pseudo_mask_targets`: pseudo-mask targets;
- :func:`refine_pseudo_masks`, :func:`pseudo_affinity`, :func:`affinity_loss`,
  :func:`noise_aware_pseudo_mask_loss`: the student's pseudo-mask losses.

Boxes are ``(n, 4)`` float ``xyxy`` pixels of the student's (padded) input; stride-4 maps
use the sampling rule of :func:`training.model.boxes.box_masks`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou
from torchvision.transforms.v2.functional import horizontal_flip_bounding_boxes
from torchvision.tv_tensors import BoundingBoxFormat

from training.losses import (
    dice_loss,
    log_fg_bg_probabilities,
    log_same_label_probability,
    unfold_neighbours,
)
from training.model.assignment import assign_pseudo_masks  # re-exported (Algorithm 1 lives with the model)
from training.model.boxes import box_masks as rasterize_boxes
from training.model.scores import authors_pseudo_weight, mask_aware_score, mean_foreground_probability  # re-exported

__all__ = [
    "ema_momentum",
    "ema_update_",
    "mean_foreground_probability",
    "mask_aware_score",
    "authors_pseudo_weight",
    "QUALITY_SCORE_KINDS",
    "quality_score",
    "assign_pseudo_masks",
    "gather_assigned_masks",
    "match_teacher_view",
    "merge_teacher_views",
    "crop_masks_to_boxes",
    "pseudo_mask_targets",
    "refine_pseudo_masks",
    "pseudo_affinity",
    "AFFINITY_MODES",
    "affinity_loss",
    "PIXEL_LOSSES",
    "noise_aware_pseudo_mask_loss",
]


# --------------------------------------------------------------------------------------
# EMA teacher
# --------------------------------------------------------------------------------------


def ema_momentum(iteration: int, final: float = 0.999) -> float:
    """EMA momentum with the authors' ramp (``BoxTeacherEMAHook``, warmup = 0).

        m(t) = min(final, 1 - 1 / (t + 1))

    0 at t = 0 (teacher := student), 0.5 at 1, 0.9 at 9, 0.99 at 99, ``final`` = 0.999
    from t = 999 on. ``iteration`` is the 0-based index of the step about to run.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return float(min(final, 1.0 - 1.0 / (iteration + 1)))


def _unwrap(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    return module


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In-place EMA of the student's parameters into the teacher's (docs/method.md, "BoxTeacher").

        theta_t <- m * theta_t + (1 - m) * theta_s       (as lerp: theta_t + (1-m)(theta_s - theta_t))

    Parameters only: buffers (BatchNorm running statistics, iteration counters) are **not**
    averaged, as in the authors' hook. The teacher's BN running statistics therefore come
    from the teacher's own train-mode forwards (as in the authors' code); copy the
    whole state dict once at iteration 0 if the teacher must start from the student's buffers.

    Either module may be wrapped in ``DistributedDataParallel``/``DataParallel`` (``.module``
    is unwrapped). Parameters are paired by name; a mismatch raises ``ValueError``.
    The student's gradients are untouched; the teacher gets no gradient.

    Args:
        teacher, student: modules with identical parameter names and shapes.
        momentum: m in [0, 1] (:func:`ema_momentum`).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    teacher_params = dict(_unwrap(teacher).named_parameters())
    student_params = dict(_unwrap(student).named_parameters())
    if teacher_params.keys() != student_params.keys():
        missing = sorted(set(teacher_params) ^ set(student_params))[:5]
        raise ValueError(f"teacher and student parameters differ, e.g. {missing}")
    names = list(teacher_params)
    if not names:
        return
    t = [teacher_params[k].data for k in names]
    s = [student_params[k].detach().to(dtype=teacher_params[k].dtype) for k in names]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


# --------------------------------------------------------------------------------------
# Pseudo-mask quality
# --------------------------------------------------------------------------------------


def _aligned_box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU of ``boxes_a[k]`` with ``boxes_b[k]``; 0 for degenerate pairs. ``(n,)``."""
    if boxes_a.shape[0] == 0:
        return boxes_a.new_zeros(0, dtype=torch.float32)
    iou = box_iou(boxes_a.float(), boxes_b.float()).diagonal()
    return torch.nan_to_num(iou, nan=0.0)


def _mean_entropy_quality(mask_probs: Tensor, box_masks: Tensor | None, eps: float = 1e-6) -> Tensor:
    """1 - mean_{pixels in box} H(m) / log 2, with H the binary entropy; 0 for an empty box."""
    m = mask_probs.float().flatten(1).clamp(eps, 1.0 - eps)
    entropy = -(m * m.log() + (1.0 - m) * (1.0 - m).log()) / math.log(2.0)
    if box_masks is None:
        inside = torch.ones_like(m)
    else:
        inside = box_masks.float().flatten(1)
    count = inside.sum(dim=1)
    mean_entropy = (entropy * inside).sum(dim=1) / count.clamp(min=1e-12)
    return torch.where(count > 0, 1.0 - mean_entropy, torch.zeros_like(mean_entropy)).clamp(0.0, 1.0)


QUALITY_SCORE_KINDS = ("none", "cls", "iou", "mean_entropy", "mask_aware", "mask_aware_authors")


def quality_score(
    kind: str,
    det_scores: Tensor,
    mask_probs: Tensor | None = None,
    box_masks: Tensor | None = None,
    pred_boxes: Tensor | None = None,
    gt_boxes: Tensor | None = None,
    mask_threshold: float = 0.5,
) -> Tensor:
    """Pseudo-mask quality score for the quality-score ablation (paper Table 5; docs/method.md, "BoxTeacher").

    kinds:
    - ``"none"``: 1;
    - ``"cls"``: c, the detection score;
    - ``"iou"``: IoU(pred_box_k, gt_box_k) of the matched pair;
    - ``"mean_entropy"``: 1 - mean_{pixels in box} H(m) / log 2 (H: binary entropy);
      0 for an empty box;
    - ``"mask_aware"``: :func:`mask_aware_score` (the paper's score), inside the GT box;
    - ``"mask_aware_authors"``: :func:`authors_pseudo_weight` with m_bar over the whole map,
      as the authors' ``postprocess`` computes it (``box_masks`` is ignored).

    Args:
        kind: one of :data:`QUALITY_SCORE_KINDS`.
        det_scores: ``(n,)`` detection scores of the matched predictions.
        mask_probs: ``(n, h, w)`` their mask probabilities (mean_entropy, mask_aware*).
        box_masks: ``(n, h, w)`` GT box masks at the same resolution, or ``None`` = whole map.
        pred_boxes, gt_boxes: ``(n, 4)`` xyxy, matched pairwise (iou).
    Returns:
        ``(n,)`` float32 in [0, 1].
    Raises:
        ValueError: unknown kind, or an input the kind needs is missing.
    """
    if kind not in QUALITY_SCORE_KINDS:
        raise ValueError(f"unknown quality score kind {kind!r}; allowed: {', '.join(QUALITY_SCORE_KINDS)}")
    if kind == "none":
        return torch.ones_like(det_scores, dtype=torch.float32)
    if kind == "cls":
        return det_scores.float()
    if kind == "iou":
        if pred_boxes is None or gt_boxes is None:
            raise ValueError("quality score 'iou' needs pred_boxes and gt_boxes")
        return _aligned_box_iou(pred_boxes, gt_boxes)
    if mask_probs is None:
        raise ValueError(f"quality score {kind!r} needs mask_probs")
    if kind == "mean_entropy":
        return _mean_entropy_quality(mask_probs, box_masks)
    if kind == "mask_aware":
        return mask_aware_score(det_scores, mask_probs, box_masks, mask_threshold)
    # mask_aware_authors
    return authors_pseudo_weight(det_scores, mean_foreground_probability(mask_probs, None, mask_threshold))


# --------------------------------------------------------------------------------------
# Pseudo-mask targets (Algorithm 1 itself: training.model.assignment)
# --------------------------------------------------------------------------------------


def gather_assigned_masks(pred_masks: Tensor, pred_weights: Tensor, matched_index: Tensor) -> tuple[Tensor, Tensor]:
    """Per-GT pseudo masks and weights from the assignment (authors' ``gt_bitmasks``, ``gt_masks_flags``).

    Args:
        pred_masks: ``(M, H, W)`` teacher masks (probabilities or 0/1).
        pred_weights: ``(M,)`` their quality scores.
        matched_index: ``(N,)`` int64 from :func:`assign_pseudo_masks`.
    Returns:
        ``masks (N, H, W)`` (zeros where unmatched, dtype of ``pred_masks``) and
        ``weights (N,)`` float32 (0 where unmatched).
    """
    has = matched_index >= 0
    safe = matched_index.clamp(min=0)
    num_gt = matched_index.shape[0]
    if pred_masks.shape[0] == 0:
        masks = pred_masks.new_zeros((num_gt, *pred_masks.shape[1:]))
        return masks, torch.zeros(num_gt, dtype=torch.float32, device=pred_masks.device)
    masks = pred_masks[safe] * has.to(pred_masks.dtype).view(-1, 1, 1)
    weights = pred_weights.float()[safe] * has.float()
    return masks, weights


def match_teacher_view(
    boxes: Tensor,
    scores: Tensor,
    gt_boxes: Tensor,
    image_hw: tuple[int, int],
    flipped: bool,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """One teacher view's detections matched to the GT boxes (Algorithm 1).

    ``boxes`` (N, 4) xyxy at the image's size ``image_hw`` and their mask-aware ``scores``
    (N,); a ``flipped`` view saw the image mirrored, so its boxes are mirrored back first
    (its masks the caller mirrors with ``.flip(-1)``). Returns the boxes in the image's frame
    and the matched detection's index per GT box (-1: none).
    """
    if flipped:
        boxes = horizontal_flip_bounding_boxes(boxes, format=BoundingBoxFormat.XYXY, canvas_size=image_hw)
    return boxes, assign_pseudo_masks(boxes, scores, gt_boxes, iou_threshold, score_threshold)


def merge_teacher_views(views: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Average the teacher's views of the same GT boxes (the flip test-time augmentation).

    Each view gives, per GT box g, a mask m_v,g (probabilities in the student's geometry,
    un-flipped), the matched detection's score c_v,g and box b_v,g, and whether it matched
    (h_v,g, Algorithm 1 in that view). Per GT box, over the views that matched it:

        m_g = sum_v h_v,g m_v,g / sum_v h_v,g   (the same for c_g and b_g),   h_g = OR_v h_v,g

    and zeros where no view matched. One view is returned unchanged.

    Args:
        views: ``(probs (G, H, W), det_scores (G,), boxes (G, 4), has (G,) bool)`` per view.
    Returns:
        the merged ``(probs, det_scores, boxes, has)``.
    """
    if len(views) == 1:
        return views[0]
    weights = torch.stack([has.float() for *_, has in views])  # (V, G)
    count = weights.sum(0).clamp(min=1)

    def mean(index: int) -> Tensor:
        parts = torch.stack([view[index].float() for view in views])  # (V, G, ...)
        w = weights.view(*weights.shape, *[1] * (parts.dim() - 2))
        return (parts * w).sum(0) / count.view(-1, *[1] * (parts.dim() - 2))

    return mean(0), mean(1), mean(2), weights.sum(0) > 0


def crop_masks_to_boxes(masks: Tensor, boxes: Tensor) -> Tensor:
    """Zero each mask outside its box (docs/method.md, "BoxTeacher": the pseudo mask is cropped to its box).

        out_k(y, x) = m_k(y, x) * B_k(y, x),   B_k: :func:`training.model.boxes.box_masks` at stride 1

    Args:
        masks: ``(N, H, W)`` any dtype.
        boxes: ``(N, 4)`` xyxy pixels of the same image.
    Returns:
        ``(N, H, W)``, dtype of ``masks``.
    """
    height, width = masks.shape[-2:]
    inside = rasterize_boxes(boxes.to(masks.device), height, width, stride=1).bool()
    return torch.where(inside, masks, torch.zeros_like(masks))


def pseudo_mask_targets(
    masks: Tensor,
    gt_boxes: Tensor,
    padded_size: tuple[int, int],
    stride: int = 4,
    mask_threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Stride-4 student targets from pseudo masks at the student's input size (impl-notes §1.6).

        padded = zero-pad(masks) to padded_size
        soft   = padded[:, s//2::s, s//2::s] * B^(s)          (B^(s): stride-s GT box masks)
        binary = 1[soft > mask_threshold]

    ``soft`` feeds the affinity targets, ``binary`` the pixel (dice) loss.

    Args:
        masks: ``(N, H, W)`` float (probabilities or 0/1) per GT box, at the student's
            un-padded input size; zeros for GTs without a pseudo mask.
        gt_boxes: ``(N, 4)`` xyxy GT boxes in the student's input pixels.
        padded_size: ``(H_pad, W_pad)`` of the student's padded batch.
    Returns:
        ``soft (N, h, w)`` and ``binary (N, h, w)``, float32, ``h = H_pad // s``.
    """
    pad_h, pad_w = padded_size
    height, width = masks.shape[-2:]
    if height > pad_h or width > pad_w:
        raise ValueError(f"masks {height}x{width} larger than the padded size {pad_h}x{pad_w}")
    padded = F.pad(masks.float(), (0, pad_w - width, 0, pad_h - height))
    start = stride // 2
    sampled = padded[:, start::stride, start::stride]
    box = rasterize_boxes(gt_boxes.to(masks.device), pad_h, pad_w, stride)
    soft = sampled * box
    binary = (soft > mask_threshold).float()
    return soft, binary


# --------------------------------------------------------------------------------------
# Noise-reduced mask affinity and the noise-aware pseudo-mask loss
# --------------------------------------------------------------------------------------


def refine_pseudo_masks(pseudo: Tensor) -> Tensor:
    """Noise-reduced pseudo probabilities (paper, refinement before eq. 5; authors' ``get_instance_masks_affinity``).

        g~_i = (g_i + mean_{j in 3x3(i)} g_j) / 2       (zero padding counted in the mean)

    Args:
        pseudo: ``(K, 1, h, w)`` float pseudo masks (0/1 or soft).
    Returns:
        ``(K, 1, h, w)`` float32.
    """
    p = pseudo.float()
    return (F.avg_pool2d(p, kernel_size=3, stride=1, padding=1, count_include_pad=True) + p) / 2.0


def pseudo_affinity(refined: Tensor, valid: Tensor | None = None, kernel_size: int = 3, dilation: int = 2) -> Tensor:
    """Pseudo affinity mu_ij of each pixel with its 8 dilated neighbours (paper, the affinity used in eq. 5).

        A_ij = g~_i g~_j + (1 - g~_i)(1 - g~_j),   times valid_j

    Args:
        refined: ``(K, 1, h, w)`` :func:`refine_pseudo_masks` output.
        valid: ``(K or 1, 1, h, w)`` (or ``(K or 1, h, w)``) neighbour validity at the same
            stride (image pixels 1, padding / removed rows 0), or ``None`` = every pixel of
            the map valid. Neighbours outside the map are always invalid.
    Returns:
        ``(K, k*k - 1, h, w)`` float32 in [0, 1].
    """
    g = refined.float()
    g_j = unfold_neighbours(g, kernel_size, dilation)[:, 0]  # (K, 8, h, w)
    g_i = g  # (K, 1, h, w) broadcasts over the 8 neighbours
    affinity = g_i * g_j + (1.0 - g_i) * (1.0 - g_j)
    if valid is None:
        valid = torch.ones_like(g[:1])
    elif valid.dim() == 3:
        valid = valid[:, None]
    valid_j = unfold_neighbours(valid.float(), kernel_size, dilation)[:, 0]
    return affinity * valid_j


AFFINITY_MODES = ("paper", "label", "authors")


def affinity_loss(
    mask_logits: Tensor,
    affinity: Tensor,
    box_masks: Tensor,
    threshold: float = 0.5,
    mode: str = "paper",
    kernel_size: int = 3,
    dilation: int = 2,
    refined: Tensor | None = None,
) -> Tensor:
    """Noise-reduced mask affinity loss per instance (paper eq. 5), mean over selected edges.

        E_k  = {(i, j): A_ij > tau_a and i inside box_k}          (tau_a = 0.5, strict)
        L_k  = sum_{(i,j) in E_k} l_ij / max(|E_k|, 1)            (0 if E_k is empty)

    modes:
    - ``"paper"``: eq. 5 read literally, l_ij = -[log(p_i p_j) + log((1-p_i)(1-p_j))],
      with log-probabilities floored at -100 (probabilities clamped). Note: this term does
      not depend on the pseudo labels except through E_k and is minimal at p = 0.5.
    - ``"label"``: only the term that matches the pseudo label pair: l_ij = -log(p_i p_j)
      on a foreground pair (g~_i > 0.5), -log((1-p_i)(1-p_j)) on a background pair. On a
      selected edge both ends lie on the same side of 0.5, since
      A_ij = 1/2 + (2 g~_i - 1)(2 g~_j - 1) / 2 > 1/2. Needs ``refined``.
    - ``"authors"``: l_ij = -log(p_i p_j + (1-p_i)(1-p_j)), the same-label probability
      used by the authors' ``loss_mask_affinity`` (the BoxInst pairwise term on these edges).

    The normalisation is the authors' (edges of the instance), not a per-pixel mean of
    per-pixel means. The authors select ``A >= tau_a``; we use ``>`` as the paper writes.

    Args:
        mask_logits: ``(K, 1, h, w)`` student logits.
        affinity: ``(K, 8, h, w)`` :func:`pseudo_affinity`.
        box_masks: ``(K, h, w)`` GT box masks at the same stride (centre pixel).
        refined: ``(K, 1, h, w)`` :func:`refine_pseudo_masks` output (mode ``"label"``).
    Returns:
        ``(K,)`` float32.
    """
    if mode == "label" and refined is None:
        raise ValueError("affinity mode 'label' needs the refined pseudo masks (refined=...)")
    if mode not in AFFINITY_MODES:
        raise ValueError(f"unknown affinity mode {mode!r}; allowed: {', '.join(AFFINITY_MODES)}")
    edges = (affinity > threshold).float() * box_masks.float()[:, None]  # (K, 8, h, w)
    if mode == "authors":
        per_edge = -log_same_label_probability(mask_logits, kernel_size, dilation)
    else:
        log_fg, log_bg = log_fg_bg_probabilities(mask_logits)  # (K, 1, h, w)
        log_fg_j = unfold_neighbours(log_fg, kernel_size, dilation)[:, 0]
        log_bg_j = unfold_neighbours(log_bg, kernel_size, dilation)[:, 0]
        if mode == "label":
            foreground = refined.float() > 0.5  # (K, 1, h, w): the label of the pair (edge selected)
            per_edge = -torch.where(foreground, log_fg + log_fg_j, log_bg + log_bg_j)
        else:  # "paper"
            per_edge = -(log_fg + log_bg + log_fg_j + log_bg_j)
    total = (per_edge * edges).flatten(1).sum(dim=1)
    count = edges.flatten(1).sum(dim=1)
    return total / count.clamp(min=1.0)


PIXEL_LOSSES = ("dice", "bce", "none")


def noise_aware_pseudo_mask_loss(
    mask_logits: Tensor,
    pseudo_binary: Tensor,
    pseudo_soft: Tensor,
    weights: Tensor,
    box_masks: Tensor,
    valid: Tensor | None = None,
    pixel_loss: str = "dice",
    use_affinity: bool = True,
    pixel_weight: float = 0.5,
    affinity_weight: float = 0.1,
    affinity_mode: str = "paper",
    affinity_threshold: float = 0.5,
    warmup: float = 1.0,
    kernel_size: int = 3,
    dilation: int = 2,
) -> dict[str, Tensor]:
    """Noise-aware pseudo-mask loss ``L_mask-sup`` (paper §3, "noise-aware pseudo mask loss"; docs/method.md, "BoxTeacher").

        L = (1 / N_p) * sum_k s_k * (lambda_p * L_pixel,k + lambda_a * L_aff,k) * warmup
        N_p = max(#{k : s_k > 0}, 1)

    returned as its two parts, each already weighted and warmed up:
        loss_pseudo_pixel    = warmup * lambda_p * sum_k s_k L_pixel,k / N_p
        loss_pseudo_affinity = warmup * lambda_a * sum_k s_k L_aff,k / N_p

    L_pixel: ``"dice"`` = :func:`training.losses.dice_loss` of sigmoid(x_k) vs the binary
    pseudo mask over the whole stride-4 map (paper default); ``"bce"`` = mean BCE over the
    map (log-probabilities floored at -100); ``"none"`` = 0. L_aff: :func:`affinity_loss` on :func:`pseudo_affinity` of
    :func:`refine_pseudo_masks` of the soft pseudo mask. Proposals with s_k = 0 (no pseudo
    mask) contribute nothing; ``weights`` are detached (they come from the teacher).

    Args:
        mask_logits: ``(K, 1, h, w)`` student logits of the kept proposals, stride 4.
        pseudo_binary: ``(K, h, w)`` {0, 1} pseudo mask of each proposal's GT.
        pseudo_soft: ``(K, h, w)`` box-cropped soft (or 0/1) pseudo mask, for the affinity.
        weights: ``(K,)`` quality s_k (0 = no pseudo mask).
        box_masks: ``(K, h, w)`` GT box masks at stride 4.
        valid: ``(K or 1, 1, h, w)`` neighbour validity at stride 4, or ``None``.
        warmup: factor from :func:`training.losses.linear_warmup`.
    Returns:
        ``{"loss_pseudo_pixel": scalar, "loss_pseudo_affinity": scalar}`` float32; zeros
        attached to the graph for K == 0 or disabled terms.
    """
    if pixel_loss not in PIXEL_LOSSES:
        raise ValueError(f"unknown pixel loss {pixel_loss!r}; allowed: {', '.join(PIXEL_LOSSES)}")
    zero = mask_logits.float().sum() * 0.0
    num = mask_logits.shape[0]
    if num == 0:
        return {"loss_pseudo_pixel": zero, "loss_pseudo_affinity": zero.clone()}
    s = weights.detach().float().reshape(num)
    num_pseudo = (s > 0).sum().clamp(min=1).float()

    if pixel_loss == "dice":
        per_pixel = dice_loss(mask_logits.float().sigmoid(), pseudo_binary)
    elif pixel_loss == "bce":
        # BCE from the floored log-probabilities: equals BCE-with-logits, finite for any logits
        log_fg, log_bg = log_fg_bg_probabilities(mask_logits.reshape(pseudo_binary.shape))
        y = pseudo_binary.float()
        per_pixel = (-(y * log_fg + (1.0 - y) * log_bg)).flatten(1).mean(dim=1)
    else:
        per_pixel = None
    loss_pixel = zero.clone() if per_pixel is None else (s * per_pixel).sum() / num_pseudo

    if use_affinity:
        refined = refine_pseudo_masks(pseudo_soft.reshape(num, 1, *pseudo_soft.shape[-2:]))
        affinity = pseudo_affinity(refined, valid, kernel_size, dilation)
        per_aff = affinity_loss(mask_logits, affinity, box_masks, affinity_threshold, affinity_mode, kernel_size, dilation, refined)
        loss_aff = (s * per_aff).sum() / num_pseudo
    else:
        loss_aff = zero.clone()

    return {
        "loss_pseudo_pixel": loss_pixel * (pixel_weight * warmup),
        "loss_pseudo_affinity": loss_aff * (affinity_weight * warmup),
    }
