"""Box-supervised mask losses (BoxInst), one equation per function.

These are the ``L_box-sup`` terms of BoxTeacher (docs/method.md, "Box supervision: BoxInst's losses"),
written as pure tensor functions so that each one can be checked by hand on tiny tensors.

Conventions used throughout:
- boxes are ``(n, 4)`` float ``xyxy`` in pixels of the (padded) network input;
- mask maps live at ``stride`` 4 of the padded input, sampled at offset ``stride // 2``
  (pixel ``(r, c)`` of a stride-4 map is input pixel ``(4r + 2, 4c + 2)``);
- the 8 neighbours of a pixel are the off-centre taps of a 3x3 kernel with dilation 2, in
  row-major kernel order (see :func:`unfold_neighbours`);
- losses are computed in float32 whatever the input dtype (AMP safe); log-probabilities come
  from ``logsigmoid`` of the logits, floored at ``LOG_PROB_FLOOR`` (= -100, the
  ``torch.nn.BCELoss`` convention, i.e. probabilities clamped at e^-100), so no loss is
  ever inf/NaN, even for probabilities that are exactly 0 or 1;
- zero instances give a zero loss that is still attached to the autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.model.boxes import box_masks  # re-exported: the BoxInst rasterising rule lives with the model

__all__ = [
    "LOG_PROB_FLOOR",
    "dice_loss",
    "box_masks",
    "projection_loss",
    "rgb_to_lab",
    "unfold_neighbours",
    "color_similarity",
    "image_valid_mask",
    "image_color_similarity",
    "log_fg_bg_probabilities",
    "log_same_label_probability",
    "pairwise_weights",
    "pairwise_loss",
    "outside_box_loss",
    "projection_bce_loss",
    "restrict_to_image",
    "linear_warmup",
    "boxinst_losses",
    "box_prior_loss",
    "linear_cooldown",
]

LOG_PROB_FLOOR = -100.0
"""Lower bound on every log-probability (as ``torch.nn.BCELoss`` clamps ``log`` at -100)."""


# --------------------------------------------------------------------------------------
# Dice and projection (BoxInst)
# --------------------------------------------------------------------------------------


def dice_loss(probs: Tensor, targets: Tensor, eps: float = 1e-5) -> Tensor:
    """Dice loss per instance (BoxInst / CondInst; authors' ``dice_coefficient``).

        L_k = 1 - 2 * sum(a_k * b_k) / (sum(a_k^2) + sum(b_k^2) + eps)

    Args:
        probs: ``(n, ...)`` float probabilities in [0, 1]; flattened per instance.
        targets: ``(n, ...)`` float/bool targets in [0, 1], same number of elements per
            instance as ``probs``.
        eps: added to the denominator; two all-zero maps give a loss of 1.
    Returns:
        ``(n,)`` float32 loss (``(0,)`` for ``n == 0``).
    """
    a = probs.float().flatten(1) if probs.dim() > 1 else probs.float()[:, None]
    b = targets.float().flatten(1) if targets.dim() > 1 else targets.float()[:, None]
    numerator = 2.0 * (a * b).sum(dim=1)
    denominator = (a * a).sum(dim=1) + (b * b).sum(dim=1) + eps
    return 1.0 - numerator / denominator


def projection_loss(mask_probs: Tensor, box_masks: Tensor) -> Tensor:
    """BoxInst projection term per instance (authors' ``compute_project_term``).

        L_proj = dice(max_y P, max_y B) + dice(max_x P, max_x B)

    ``max_y`` projects onto the x axis (a ``(n, w)`` profile), ``max_x`` onto the y axis.

    Args:
        mask_probs: predicted **probabilities** (sigmoid already applied), ``(n, 1, h, w)``
            or ``(n, h, w)``, float.
        box_masks: ``(n, h, w)`` or ``(n, 1, h, w)`` box masks in {0, 1}
            (:func:`box_masks` at the same stride).
    Returns:
        ``(n,)`` float32 loss.
    """
    n = mask_probs.shape[0]
    h, w = mask_probs.shape[-2:]
    p = mask_probs.float().reshape(n, h, w)
    b = box_masks.float().reshape(n, h, w)
    loss_x = dice_loss(p.amax(dim=1), b.amax(dim=1))  # max over y -> (n, w)
    loss_y = dice_loss(p.amax(dim=2), b.amax(dim=2))  # max over x -> (n, h)
    return loss_x + loss_y


# --------------------------------------------------------------------------------------
# Colour similarity (BoxInst pairwise term)
# --------------------------------------------------------------------------------------

_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB -> CIE LAB (D65), the formula of ``skimage.color.rgb2lab`` (authors' ``rgb2lab``).

        linear = ((c + 0.055) / 1.055)^2.4  if c > 0.04045  else  c / 12.92
        (X, Y, Z) = M_sRGB->XYZ @ linear / (0.95047, 1.0, 1.08883)
        f(t) = t^(1/3)  if t > 0.008856  else  7.787 t + 16/116
        L = 116 f(Y) - 16,  a = 500 (f(X) - f(Y)),  b = 200 (f(Y) - f(Z))

    Args:
        rgb: ``(3, H, W)`` or ``(B, 3, H, W)``, RGB channel order; uint8 in [0, 255] or
            float in [0, 1].
    Returns:
        Same shape, float32 (float64 if the input is float64): L in [0, 100], a and b
        roughly in [-128, 127].
    """
    if rgb.shape[-3] != 3:
        raise ValueError(f"expected 3 channels at dim -3, got shape {tuple(rgb.shape)}")
    if rgb.dtype == torch.uint8:
        x = rgb.float() / 255.0
    elif rgb.dtype == torch.float64:
        x = rgb
    else:
        x = rgb.float()
    # Both torch.where branches are evaluated: clamp the pow branches so that they never see
    # values outside their domain (keeps the backward free of NaN too).
    linear = torch.where(
        x > 0.04045,
        ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4,
        x / 12.92,
    )
    m = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    white = torch.tensor(_D65_WHITE, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,...jhw->...ihw", m, linear) / white[:, None, None]
    f = torch.where(
        xyz > 0.008856,
        xyz.clamp(min=0.008856) ** (1.0 / 3.0),
        7.787 * xyz + 16.0 / 116.0,
    )
    fx, fy, fz = f.unbind(dim=-3)
    lab_l = 116.0 * fy - 16.0
    lab_a = 500.0 * (fx - fy)
    lab_b = 200.0 * (fy - fz)
    return torch.stack((lab_l, lab_a, lab_b), dim=-3)


def unfold_neighbours(x: Tensor, kernel_size: int = 3, dilation: int = 2) -> Tensor:
    """The off-centre taps of a dilated ``k x k`` window, zero padded (BoxInst ``unfold_wo_center``).

    Output index ``j`` enumerates the kernel taps in row-major order with the centre removed;
    for k=3 the offsets ``(dy, dx)`` in units of ``dilation`` are
    ``(-1,-1), (-1,0), (-1,1), (0,-1), (0,1), (1,-1), (1,0), (1,1)``. Neighbours that fall
    outside the map read 0 ("SAME" zero padding).

    Args:
        x: ``(B, C, H, W)`` float tensor.
        kernel_size: odd kernel size k.
        dilation: spacing between taps.
    Returns:
        ``(B, C, k*k - 1, H, W)``, same dtype as ``x``; ``out[:, :, j, y, x]`` is
        ``x[:, :, y + dy_j, x + dx_j]``.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    radius = kernel_size // 2
    pad = dilation * radius
    height, width = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    taps = []
    for i in range(kernel_size):
        for j in range(kernel_size):
            if i == radius and j == radius:
                continue
            dy, dx = i * dilation, j * dilation
            taps.append(padded[:, :, dy : dy + height, dx : dx + width])
    return torch.stack(taps, dim=2)


def color_similarity(lab: Tensor, kernel_size: int = 3, dilation: int = 2, theta: float = 2.0) -> Tensor:
    """Colour similarity of each pixel with its neighbours (BoxInst).

        S_ij = exp(-||LAB_i - LAB_j||_2 / theta)      (authors: ``exp(-norm * 0.5)``, theta = 2)

    Neighbours outside the map compare with LAB (0, 0, 0); mask them with the neighbour
    validity (:func:`image_color_similarity` does).

    Args:
        lab: ``(B, 3, H, W)`` float LAB image (:func:`rgb_to_lab`).
    Returns:
        ``(B, k*k - 1, H, W)`` float in (0, 1].
    """
    neighbours = unfold_neighbours(lab, kernel_size, dilation)  # (B, 3, 8, H, W)
    distance = torch.linalg.vector_norm(lab[:, :, None] - neighbours, dim=1)
    return torch.exp(-distance / theta)


def image_valid_mask(
    image_height: int,
    image_width: int,
    padded_height: int,
    padded_width: int,
    bottom_rows_removed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Pixels of the padded input that hold image content (BoxInst ``image_masks``).

    1 inside the un-padded ``image_height x image_width`` image, 0 in the padding and in
    the bottom ``bottom_rows_removed`` rows. The authors remove
    ``int(BOTTOM_PIXELS_REMOVED * resized_height / original_height)`` rows
    (``BOTTOM_PIXELS_REMOVED = 10`` on COCO, 0 suggested for VOC); pass that number here.

    Returns:
        ``(padded_height, padded_width)`` float32 in {0, 1}.
    """
    mask = torch.zeros(padded_height, padded_width, dtype=torch.float32, device=device)
    keep_rows = max(image_height - max(int(bottom_rows_removed), 0), 0)
    mask[:keep_rows, :image_width] = 1.0
    return mask


def image_color_similarity(
    images: Tensor,
    valid_mask: Tensor,
    stride: int = 4,
    kernel_size: int = 3,
    dilation: int = 2,
    theta: float = 2.0,
) -> Tensor:
    """Per-image colour similarity at the mask stride, BoxInst's full pipeline (once per image).

        pooled = floor(avg_pool2d(image, kernel=stride, stride=stride))     (uint8 cast)
        S_ij   = exp(-||LAB(pooled)_i - LAB(pooled)_j|| / theta) * valid_j

    where ``valid_j`` is the validity of neighbour j, sampled from ``valid_mask`` at
    ``[stride//2 :: stride]``. The centre pixel's validity is not applied (as in the
    authors' code); the box mask of the centre pixel does that job in
    :func:`pairwise_weights`.

    Args:
        images: ``(B, 3, H, W)`` **RGB**, the un-normalised, un-jittered, zero-padded input;
            uint8, or float holding 0..255 values. ``H`` and ``W`` multiples of ``stride``.
        valid_mask: ``(B, H, W)`` or ``(H, W)`` in {0, 1} (:func:`image_valid_mask`).
    Returns:
        ``(B, k*k - 1, H // stride, W // stride)`` float32.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(f"image size {height}x{width} is not a multiple of stride {stride}")
    pooled = F.avg_pool2d(images.float(), kernel_size=stride, stride=stride)
    pooled = pooled.floor().clamp(0, 255).to(torch.uint8)
    lab = rgb_to_lab(pooled)
    similarity = color_similarity(lab, kernel_size, dilation, theta)
    if valid_mask.dim() == 2:
        valid_mask = valid_mask[None]
    start = stride // 2
    valid = valid_mask[:, None, start::stride, start::stride].float()  # (B, 1, h, w)
    valid_neighbours = unfold_neighbours(valid, kernel_size, dilation)[:, 0]  # (B, 8, h, w)
    return similarity * valid_neighbours


# --------------------------------------------------------------------------------------
# Pairwise term
# --------------------------------------------------------------------------------------


def log_fg_bg_probabilities(mask_logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p, log (1 - p))`` with ``p = sigmoid(logits)``, stable and floored.

        log p = logsigmoid(x),   log(1 - p) = logsigmoid(-x),   both >= LOG_PROB_FLOOR

    Args:
        mask_logits: any shape, any float dtype.
    Returns:
        two float32 tensors of the input shape, finite even for infinite logits.
    """
    x = mask_logits.float()
    return (
        F.logsigmoid(x).clamp(min=LOG_PROB_FLOOR),
        F.logsigmoid(-x).clamp(min=LOG_PROB_FLOOR),
    )


def log_same_label_probability(mask_logits: Tensor, kernel_size: int = 3, dilation: int = 2) -> Tensor:
    """log P(y_i = y_j) for each pixel and its neighbours (BoxInst pairwise term).

        P(same) = p_i p_j + (1 - p_i)(1 - p_j)
        log P(same) = logaddexp(log p_i + log p_j, log(1-p_i) + log(1-p_j))

    Computed in log space from logits. Neighbours outside the map read log-probabilities
    0 (zero padding), which gives log P = 0 there; weight them out.

    Args:
        mask_logits: ``(n, 1, h, w)`` logits.
    Returns:
        ``(n, k*k - 1, h, w)`` float32, <= 0 (up to rounding).
    """
    log_fg, log_bg = log_fg_bg_probabilities(mask_logits)
    log_fg_j = unfold_neighbours(log_fg, kernel_size, dilation)  # (n, 1, 8, h, w)
    log_bg_j = unfold_neighbours(log_bg, kernel_size, dilation)
    log_same = torch.logaddexp(log_fg[:, :, None] + log_fg_j, log_bg[:, :, None] + log_bg_j)
    return log_same[:, 0]


def pairwise_weights(similarity: Tensor, box_masks: Tensor, threshold: float = 0.3) -> Tensor:
    """Edges supervised by the pairwise term (BoxInst).

        w_ij = 1[S_ij >= threshold] * B_i        (B_i: box mask at the centre pixel i)

    Args:
        similarity: ``(n or 1, 8, h, w)`` colour similarity (gathered per instance, or one
            image's map broadcast to all its instances).
        box_masks: ``(n, h, w)`` box masks at the same stride.
        threshold: ``COLOR_THRESH`` (0.3).
    Returns:
        ``(n, 8, h, w)`` float32 in {0, 1}.
    """
    return (similarity >= threshold).float() * box_masks.float()[:, None]


def pairwise_loss(mask_logits: Tensor, weights: Tensor, kernel_size: int = 3, dilation: int = 2) -> Tensor:
    """BoxInst pairwise loss, a weighted mean over edges.

        L_pair = sum_ij w_ij * (-log P(y_i = y_j)) / max(sum_ij w_ij, 1)

    Args:
        mask_logits: ``(n, 1, h, w)`` logits.
        weights: ``(n, 8, h, w)`` edge weights (:func:`pairwise_weights`).
    Returns:
        scalar float32; 0 (attached to the graph) when n == 0 or no edge has weight.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.float().sum() * 0.0
    loss = -log_same_label_probability(mask_logits, kernel_size, dilation)
    w = weights.float()
    return (loss * w).sum() / w.sum().clamp(min=1.0)


OFF_IMAGE_LOGIT = -1e4
"""The logit padding gets in :func:`restrict_to_image`: sigmoid 0, zero gradient."""


def restrict_to_image(mask_logits: Tensor, valid: Tensor) -> Tensor:
    """Mask logits with every padding pixel set to ``OFF_IMAGE_LOGIT``, for the projections.

    BoxInst projects the mask over the whole padded canvas. A box's row (column) then also
    counts as covered when the mask is on in the padding beside (below) the image, where no
    other loss looks: a head trained from scratch learns to paint the padding instead of the
    object (measured: masks empty in the image, projection loss low). With this, the
    projections see the image only, exactly as if the canvas were cropped to it.

    Args:
        mask_logits: ``(n, 1, h, w)`` or ``(n, h, w)`` logits; valid: ``(n or 1, h, w)`` image
            pixels (1) vs padding (0).
    Returns:
        same shape and dtype as ``mask_logits``.
    """
    keep = valid.reshape(-1, *mask_logits.shape[-2:]).bool()
    keep = keep.reshape(keep.shape[0], *([1] * (mask_logits.dim() - 3)), *keep.shape[-2:])
    return mask_logits.masked_fill(~keep, OFF_IMAGE_LOGIT)


def projection_bce_loss(mask_logits: Tensor, box_masks: Tensor, valid: Tensor | None = None) -> Tensor:
    """Binary cross-entropy on the max projections, from logits, per instance (our addition;
    the multiple-instance form of the tightness prior, as in BBTP, Hsu et al. 2019).

        L_bce,k = mean_x BCE(max_y x_k, max_y B_k) + mean_y BCE(max_x x_k, max_x B_k)
        BCE(m, t) = softplus(m) - t * m

    max commutes with the sigmoid, so ``max_y x`` is the logit of BoxInst's projection
    ``max_y p``. Unlike the dice on probabilities (:func:`projection_loss`), its gradient
    sigmoid(m) - t does not vanish when a mask is confidently wrong: a head whose masks
    have saturated to empty boxes (or to whole images) is pulled back.

    With ``valid`` the means run over the columns and rows that hold image pixels (a
    canvas padded to the right and bottom then gives the loss of the image alone, with
    :func:`restrict_to_image`).

    Args:
        mask_logits: ``(n, 1, h, w)`` or ``(n, h, w)`` logits.
        box_masks: ``(n, h, w)`` box masks at the same stride.
        valid: ``(n or 1, h, w)`` image pixels, or None = every column and row.
    Returns:
        ``(n,)`` float32.
    """
    n = box_masks.shape[0]
    h, w = box_masks.shape[-2:]
    x = mask_logits.float().reshape(n, h, w)
    b = box_masks.float().reshape(n, h, w)
    v = torch.ones(1, h, w, device=x.device) if valid is None else valid.float().reshape(-1, h, w)
    cols, rows = v.amax(dim=1).expand(n, w), v.amax(dim=2).expand(n, h)
    along_x = F.binary_cross_entropy_with_logits(x.amax(dim=1), b.amax(dim=1), reduction="none")
    along_y = F.binary_cross_entropy_with_logits(x.amax(dim=2), b.amax(dim=2), reduction="none")
    return (along_x * cols).sum(1) / cols.sum(1).clamp(min=1.0) + (along_y * rows).sum(1) / rows.sum(1).clamp(min=1.0)


def outside_box_loss(mask_logits: Tensor, box_masks: Tensor, valid: Tensor | None = None) -> Tensor:
    """Background outside the box, per instance: a tight box says every pixel outside it is
    not the object (our addition to BoxInst; docs/method.md, "Where we differ").

        L_out,k = sum_i softplus(x_ki) (1 - B_ki) v_i / max(sum_i (1 - B_ki) v_i, 1)

    softplus(x) = -log(1 - sigmoid(x)), the binary cross-entropy towards 0, whose gradient
    sigmoid(x) does not vanish when a pixel is confidently wrong. The projection term
    enforces the same prior through one max per row and column only, and through a
    sigmoid: once masks flood the image with saturated logits it no longer pulls them back.

    Args:
        mask_logits: ``(n, 1, h, w)`` logits at stride 4.
        box_masks: ``(n, h, w)`` box masks at the same stride.
        valid: ``(n or 1, h, w)`` image pixels (1) vs padding (0), or None = all pixels.
    Returns:
        ``(n,)`` float32 (0 for an instance whose box covers the whole valid map).
    """
    n, h, w = box_masks.shape
    x = mask_logits.float().reshape(n, h, w)
    outside = 1.0 - box_masks.float()
    if valid is not None:
        outside = outside * valid.float().reshape(-1, h, w)
    return (F.softplus(x) * outside).flatten(1).sum(1) / outside.flatten(1).sum(1).clamp(min=1.0)


def box_prior_loss(mask_logits: Tensor, box_masks: Tensor) -> Tensor:
    """Dice between each mask and its filled box: a box-shaped target that teaches the dynamic
    head *where* each instance is before the projection and pairwise terms teach its shape
    (our addition for training from scratch; docs/method.md, "Box supervision from scratch").

        L_prior,k = dice(sigmoid(x_k), B_k)

    Used with a weight that falls to 0 (:func:`linear_cooldown`): the filled box is not the
    object, only a start that every instance's mask can reach from its own location.

    Args:
        mask_logits: ``(n, 1, h, w)`` logits at stride 4.
        box_masks: ``(n, h, w)`` box masks at the same stride.
    Returns:
        ``(n,)`` float32.
    """
    return dice_loss(mask_logits.float().sigmoid().flatten(1), box_masks.float().flatten(1))


def linear_cooldown(iteration: int, cooldown_iters: int) -> float:
    """Linear fall of a weight from 1 to 0 (the box prior).

    cool(t) = 1 - warm(t) = max(1 - t / cooldown_iters, 0),   0 if cooldown_iters <= 0
    """
    return 1.0 - linear_warmup(iteration, cooldown_iters)


def linear_warmup(iteration: int, warmup_iters: int) -> float:
    """Linear warm-up factor (BoxInst pairwise loss; BoxTeacher pseudo-mask losses).

    warm(t) = min(t / warmup_iters, 1),   1 if warmup_iters <= 0,   0 for t < 0
    """
    if warmup_iters <= 0:
        return 1.0
    return float(min(max(iteration, 0) / warmup_iters, 1.0))


def boxinst_losses(
    mask_logits: Tensor,
    box_masks: Tensor,
    similarity: Tensor,
    iteration: int,
    warmup_iters: int = 10000,
    color_threshold: float = 0.3,
    kernel_size: int = 3,
    dilation: int = 2,
    outside_weight: float = 0.0,
    valid: Tensor | None = None,
    projection_bce_weight: float = 0.0,
    projection_in_image: bool = False,
    box_prior_weight: float = 0.0,
    box_prior_iters: int = 0,
) -> dict[str, Tensor]:
    """``L_box-sup`` for the kept proposals (BoxInst; docs/method.md, "Box supervision").

        loss_prj      = mean_k L_proj(sigmoid(x_k), B_k)
        loss_pairwise = L_pair(x, 1[S >= 0.3] * B) * warm(iteration)
        loss_outside  = outside_weight * mean_k L_out,k          (only when outside_weight > 0)
        loss_prj_bce  = projection_bce_weight * mean_k L_bce,k   (only when projection_bce_weight > 0)
        loss_box_prior = box_prior_weight * cool(iteration) * mean_k L_prior,k
                                                   (only when box_prior_weight > 0 and box_prior_iters > 0)

    Args:
        mask_logits: ``(n, 1, h, w)`` student mask logits at stride 4.
        box_masks: ``(n, h, w)`` box masks of each proposal's GT box at stride 4.
        similarity: ``(n, 8, h, w)`` colour similarity of each proposal's image.
        iteration: training iteration for the pairwise warm-up.
        outside_weight: weight of :func:`outside_box_loss` (0: BoxInst as published).
        valid: ``(n or 1, h, w)`` image pixels, for the outside term and the projections.
        projection_in_image: project over the image only (:func:`restrict_to_image`), not
            over the padded canvas as BoxInst does; needs ``valid``.
        box_prior_weight, box_prior_iters: :func:`box_prior_loss`'s weight at iteration 0 and
            the iterations over which it falls to 0 (0: BoxInst as published).
    Returns:
        ``{"loss_prj", "loss_pairwise"[, "loss_outside"]}`` float32 scalars; zeros attached
        to the graph when n == 0.
    """
    if mask_logits.shape[0] == 0:
        zero = mask_logits.float().sum() * 0.0
        out = {"loss_prj": zero, "loss_pairwise": zero.clone()}
        if outside_weight > 0:
            out["loss_outside"] = zero.clone()
        if projection_bce_weight > 0:
            out["loss_prj_bce"] = zero.clone()
        if box_prior_weight > 0 and box_prior_iters > 0:
            out["loss_box_prior"] = zero.clone()
        return out
    projected = restrict_to_image(mask_logits, valid) if projection_in_image and valid is not None else mask_logits
    loss_prj = projection_loss(projected.float().sigmoid(), box_masks).mean()
    weights = pairwise_weights(similarity, box_masks, color_threshold)
    loss_pairwise = pairwise_loss(mask_logits, weights, kernel_size, dilation)
    out = {
        "loss_prj": loss_prj,
        "loss_pairwise": loss_pairwise * linear_warmup(iteration, warmup_iters),
    }
    if outside_weight > 0:
        out["loss_outside"] = outside_weight * outside_box_loss(mask_logits, box_masks, valid).mean()
    if projection_bce_weight > 0:
        in_image = valid if projection_in_image else None
        out["loss_prj_bce"] = projection_bce_weight * projection_bce_loss(projected, box_masks, in_image).mean()
    if box_prior_weight > 0 and box_prior_iters > 0:
        prior = box_prior_weight * linear_cooldown(iteration, box_prior_iters)
        out["loss_box_prior"] = prior * box_prior_loss(mask_logits, box_masks).mean()
    return out
