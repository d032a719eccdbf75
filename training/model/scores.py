"""The mask-aware confidence score (BoxTeacher, Sec. 3.3), one definition for all.

It weights pseudo masks during training and ranks detections at inference; every
prediction carries it next to its detection score.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mean_foreground_probability(mask_probs: Tensor, box_masks: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """m_bar = sum(1[m > tau] * m * b) / sum(1[m > tau] * b), 0 where the denominator is 0.

    mask_probs: (n, h, w) probabilities; box_masks: (n, h, w) 0/1 or None (whole image).
    Returns (n,) float: the mean probability of the confident foreground pixels.
    """
    confident = (mask_probs > threshold).to(mask_probs.dtype)
    if box_masks is not None:
        confident = confident * box_masks.to(mask_probs.dtype)
    num = (confident * mask_probs).flatten(1).sum(1)
    den = confident.flatten(1).sum(1)
    return torch.where(den > 0, num / den.clamp(min=1.0), torch.zeros_like(num))


def mask_aware_score(det_scores: Tensor, mask_probs: Tensor, box_masks: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """BoxTeacher eq. (3): s = sqrt(c * m_bar), c the detection confidence (n,).

    0 for an empty mask (no pixel over ``threshold`` inside the box). (n,) float.
    """
    m = mean_foreground_probability(mask_probs, box_masks, threshold)
    return (det_scores.clamp(min=0) * m).sqrt()


def authors_pseudo_weight(det_scores: Tensor, mean_fg_prob: Tensor) -> Tensor:
    """The authors' code weights pseudo masks with sqrt(sqrt(c) * m_bar) (an option)."""
    return (det_scores.clamp(min=0).sqrt() * mean_fg_prob).sqrt()
