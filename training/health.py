"""Training health: is the mask head alive, and how hard does each loss group pull on the
shared detector?

Box supervision from scratch can fail in two ways (docs/results.md): the mask losses
drown the detector's own gradient in the shared towers (box regression stalls), or the
mask head collapses (empty masks, or saturated masks that fill the whole box or image and
no longer get a gradient). These numbers make both visible while a run trains; they are
logged every ``train.log_period`` iterations to ``log.jsonl`` and TensorBoard
(``health/...``), and :class:`CollapseDetector` warns once when the head dies.

Mask statistics are taken on the training proposals' stride-4 logits against their GT
boxes, over the image pixels only (padding excluded):

- ``mask_outside_box``: share of predicted foreground pixels outside the GT box;
- ``mask_box_area``: mean predicted mask area / GT box area;
- ``mask_saturated``: share of logits with ``|x| > SATURATION_LOGIT`` (sigmoid gradient
  below 1e-5: such pixels no longer learn).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

SATURATION_LOGIT = 12.0
"""|logit| above which a mask pixel counts as saturated: sigmoid'(12) = 6.1e-6."""

DETECTION_LOSSES = ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr")
"""The detector's own loss terms; every other ``loss_*`` term is a mask loss."""

HEALTH_KEYS = ("mask_outside_box", "mask_box_area", "mask_saturated", "grad_det", "grad_mask")
"""What a training record carries on logged iterations (TensorBoard: ``health/<key>``)."""


def _valid_pixels(like: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.ones_like(like)
    return valid.float().reshape(like.shape[0] if valid.shape[0] == like.shape[0] else 1, *like.shape[1:]).expand_as(like)


def mask_outside_box_share(mask_probs: Tensor, box_masks: Tensor, valid: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """Share of the predicted foreground pixels that lie outside their GT box, pooled over instances.

        outside = sum_k sum_i 1[p_ki > t] (1 - B_ki) v_i / sum_k sum_i 1[p_ki > t] v_i   (0 if no foreground)

    Args:
        mask_probs: ``(n, h, w)`` probabilities; box_masks: ``(n, h, w)`` in {0, 1};
        valid: ``(n or 1, h, w)`` image pixels (1) vs padding (0), or None = all.
    Returns:
        scalar float32 in [0, 1].
    """
    fg = (mask_probs.float() > threshold).float() * _valid_pixels(mask_probs.float(), valid)
    total = fg.sum()
    outside = (fg * (1.0 - box_masks.float())).sum()
    return torch.where(total > 0, outside / total.clamp(min=1.0), total.new_zeros(()))


def mask_box_area_ratio(mask_probs: Tensor, box_masks: Tensor, valid: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """Mean over instances of predicted mask area / GT box area (instances whose box covers no pixel are left out).

        r = mean_{k: A_k > 0} ( sum_i 1[p_ki > t] v_i / A_k ),   A_k = sum_i B_ki v_i;   0 if no such k

    Returns:
        scalar float32 >= 0 (1.0: masks as large as their boxes; > 1: masks spill out).
    """
    v = _valid_pixels(mask_probs.float(), valid)
    area = (box_masks.float() * v).flatten(1).sum(1)
    fg = ((mask_probs.float() > threshold).float() * v).flatten(1).sum(1)
    has = area > 0
    if not bool(has.any()):
        return area.new_zeros(())
    return (fg[has] / area[has]).mean()


def saturated_logit_fraction(mask_logits: Tensor, valid: Tensor | None = None, limit: float = SATURATION_LOGIT) -> Tensor:
    """Share of valid pixels whose logit is beyond +-``limit``.

    f = sum_i 1[|x_i| > limit] v_i / sum_i v_i    (0 if no valid pixel)
    """
    x = mask_logits.float().reshape(mask_logits.shape[0], *mask_logits.shape[-2:])
    v = _valid_pixels(x, valid)
    total = v.sum()
    return torch.where(total > 0, ((x.abs() > limit).float() * v).sum() / total.clamp(min=1.0), total.new_zeros(()))


@torch.no_grad()
def mask_health(mask_logits: Tensor, box_masks: Tensor, valid: Tensor | None = None, threshold: float = 0.5) -> dict[str, float]:
    """The three mask statistics of one batch of training proposals.

    Args:
        mask_logits: ``(n, 1, h, w)`` stride-4 logits; box_masks: ``(n, h, w)`` GT boxes at
            the same stride; valid: ``(n or 1, h, w)`` image pixels.
    Returns:
        ``{"mask_outside_box", "mask_box_area", "mask_saturated"}`` floats; NaN when n == 0.
    """
    if mask_logits.shape[0] == 0:  # NaN (not 0: that would read as empty masks); same keys on every rank
        return dict.fromkeys(("mask_outside_box", "mask_box_area", "mask_saturated"), float("nan"))
    probs = mask_logits.float().sigmoid().reshape(box_masks.shape)
    return {
        "mask_outside_box": float(mask_outside_box_share(probs, box_masks, valid, threshold)),
        "mask_box_area": float(mask_box_area_ratio(probs, box_masks, valid, threshold)),
        "mask_saturated": float(saturated_logit_fraction(mask_logits, valid)),
    }


def detector_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters detection and masks share: backbone + FPN + the FCOS towers and
    predictors (everything but the controller, the mask branch and the dynamic head)."""
    shared = [p for p in model.backbone.parameters() if p.requires_grad]
    shared += [p for name, p in model.head.named_parameters() if p.requires_grad and not name.startswith("controller.")]
    return shared


def loss_group_gradient_norms(losses: dict[str, Tensor], params: list[Tensor]) -> dict[str, float]:
    """L2 norm of the gradient that the detection losses and the mask losses each send into ``params``.

        g_group = || d(sum_{t in group} L_t) / d params ||_2

    Groups: ``DETECTION_LOSSES`` vs every other ``loss_*`` term. Uses ``autograd.grad``
    with ``retain_graph=True``, so the training backward is unchanged (and ``.grad`` is
    not touched). Costs one extra backward per group: call it on logged iterations only.

    Returns:
        ``{"grad_det": ..., "grad_mask": ...}`` (a group without a term that reaches the
        parameters reports 0).
    """
    groups = {
        "grad_det": [v for k, v in losses.items() if k in DETECTION_LOSSES],
        "grad_mask": [v for k, v in losses.items() if k not in DETECTION_LOSSES],
    }
    out = {}
    for name, terms in groups.items():
        attached = [t for t in terms if t.requires_grad]
        if not attached:
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(sum(t.float() for t in attached), params, retain_graph=True, allow_unused=True)
        sq = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
        out[name] = sq**0.5
    return out


@dataclass
class CollapseDetector:
    """Warns once, with the iteration and what it saw, when the mask head dies.

    After ``start_iteration`` (let the head warm up first), ``patience`` logged records in
    a row must show one of:

    - **empty masks**: ``mask_box_area < min_area`` (the head predicts almost nothing);
    - **flooding masks**: ``mask_outside_box > max_outside`` (masks spill over their box,
      towards whole-image masks);
    - **saturation**: ``mask_saturated > max_saturated`` (logits so large that the mask
      losses no longer reach the head).
    """

    start_iteration: int = 0
    patience: int = 3
    min_area: float = 0.05
    max_outside: float = 0.5
    max_saturated: float = 0.9
    fired: str | None = None  # the warning, once given
    _streak: int = 0

    def symptoms(self, record: dict) -> list[str]:
        """What in one record looks like a collapse (empty list: healthy or not measured)."""
        found = []
        area, outside, saturated = record.get("mask_box_area"), record.get("mask_outside_box"), record.get("mask_saturated")
        if area is not None and area < self.min_area:
            found.append(f"masks cover {area:.1%} of their boxes (empty masks)")
        if outside is not None and outside > self.max_outside:
            found.append(f"{outside:.0%} of mask pixels lie outside their boxes (flooding masks)")
        if saturated is not None and saturated > self.max_saturated:
            found.append(f"{saturated:.0%} of mask logits are saturated (|x| > {SATURATION_LOGIT:g}: no gradient)")
        return found

    def update(self, record: dict, iteration: int) -> str | None:
        """Feed one logged record; returns the warning the first time it fires, else None."""
        if self.fired is not None or iteration < self.start_iteration:
            return None
        found = self.symptoms(record)
        self._streak = self._streak + 1 if found else 0
        if self._streak < self.patience:
            return None
        self.fired = (
            f"mask head collapse at iteration {iteration}: " + "; ".join(found) + f" for {self.patience} log periods in a row. "
            "The switches against it (model.mask.controller_grad_scale/branch_grad_scale, boxinst.outside_weight, "
            "boxinst.projection_bce_weight, boxinst.projection_in_image, boxinst.box_prior_weight) are in docs/method.md, 'Box supervision from scratch: "
            "what we added'; with them on it can still happen (docs/results.md)."
        )
        log.warning(self.fired)
        return self.fired
