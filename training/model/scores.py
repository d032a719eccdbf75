"""The mask-aware confidence score (BoxTeacher, Sec. 3.3), one definition for all.

It weights pseudo masks during training and ranks detections at inference; every
prediction carries it next to its detection score. training.boxteacher re-exports it;
the model, the export graph and its parity check call :func:`mask_aware_score_from_mean`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mean_foreground_probability(mask_probs: Tensor, box_masks: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """Mean probability of the confident foreground pixels inside the box (mask-aware score core).

        m_bar = sum(1[m > tau] * m * b) / sum(1[m > tau] * b),   0 where the denominator is 0

    Args:
        mask_probs: ``(n, h, w)`` (or ``(n, 1, h, w)``) float mask probabilities.
        box_masks: ``(n, h, w)`` box masks in {0, 1} at the same resolution, or ``None`` for
            the whole map (the authors' inference score).
        threshold: tau_m = 0.5 (strict ``>``).
    Returns:
        ``(n,)`` float32 in [0, 1].
    """
    m = mask_probs.float().flatten(1)
    confident = (m > threshold).float()
    if box_masks is not None:
        confident = confident * box_masks.float().flatten(1)
    numerator = (confident * m).sum(dim=1)
    denominator = confident.sum(dim=1)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), torch.zeros_like(numerator))


def mask_aware_score(det_scores: Tensor, mask_probs: Tensor, box_masks: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """Mask-aware confidence score (paper §3, "mask-aware confidence score"; docs/method.md, "BoxTeacher").

        s = sqrt(c * sum(1[m > tau] * m * b) / sum(1[m > tau] * b)),   s = 0 if the sum is 0

    Used as the pseudo-mask weight and for ranking at inference (``box_masks=None``).

    Args:
        det_scores: ``(n,)`` detection confidence c in [0, 1].
        mask_probs: ``(n, h, w)`` mask probabilities.
        box_masks: ``(n, h, w)`` GT box masks, or ``None`` for the whole map.
    Returns:
        ``(n,)`` float32 in [0, 1].
    """
    return mask_aware_score_from_mean(det_scores, mean_foreground_probability(mask_probs, box_masks, threshold))


def mask_aware_score_from_mean(det_scores: Tensor, m_bar: Tensor) -> Tensor:
    """The last step of :func:`mask_aware_score`, for callers that computed m_bar themselves
    (in chunks, or over the un-padded region of an exported graph's canvas):

        s = sqrt(max(c, 0) * m_bar)

    Args:
        det_scores: ``(n,)`` detection confidence c.
        m_bar: ``(n,)`` :func:`mean_foreground_probability`.
    Returns:
        ``(n,)`` float32 (plain tensor ops: exports to ONNX as Clip/Mul/Sqrt).
    """
    return torch.sqrt(det_scores.float().clamp(min=0.0) * m_bar.float())


def authors_pseudo_weight(det_scores: Tensor, mean_fg_prob: Tensor) -> Tensor:
    """The pseudo-mask weight of the authors' code (``mask_score``; implementation-notes §1.4).

        w = sqrt(sqrt(c) * m_bar)

    (their ranking score is sqrt(c * m_bar) = :func:`mask_aware_score`).

    Args:
        det_scores: ``(n,)`` detection confidence c (FCOS ``sqrt(cls * ctr)``).
        mean_fg_prob: ``(n,)`` :func:`mean_foreground_probability`.
    Returns:
        ``(n,)`` float32.
    """
    c = det_scores.float().clamp(min=0.0)
    return torch.sqrt(torch.sqrt(c) * mean_fg_prob.float().clamp(min=0.0))
