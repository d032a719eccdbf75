"""Box-prompted masks: exactly one instance per given box, in the given order.

A runtime's network work for one image is split in two (:mod:`serving.runtime`): the image
part, an :class:`ImageEncoding` (detections and the features box prompts read; cached per
image), and the prompt part, a :class:`PromptOutput` per set of boxes. Written once, used by
every runtime (PyTorch, ONNX Runtime, TensorRT):

1. every box's mask is the "prompt" output: the dynamic mask head run with the controller
   parameters at the box centre on the FPN level its size falls into
   (:meth:`training.model.condinst.CondInst.prompt`). The given box is the truth, so its own
   location draws a better mask than a detection's nearby one: on Penn-Fudan val's true boxes
   0.003-0.009 IoU more on all four models measured (docs/results.md, "A longer schedule");
2. the model's own detections are matched to the boxes with Algorithm 1
   (:func:`training.model.assignment.assign_pseudo_masks`: greedy, one-to-one, IoU >= 0.5,
   predictions visited by descending mask-aware score); a matched box takes that detection's
   class and detection score, a box without a match the class / detection score at its
   prompt cell;
3. every mask is pasted on its box alone (:func:`training.model.processing.paste_mask_in_box`:
   the work grows with the box, not the image), so it is clipped to the box, and scored with
   the mask-aware score (:func:`training.model.scores.mask_aware_score`) over the box.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from training.model.assignment import assign_pseudo_masks
from training.model.boxes import box_pixel_bounds
from training.model.processing import paste_mask_in_box, scale_boxes
from training.model.scores import mask_aware_score_from_mean, mean_foreground_probability

# ``Instance.source`` values
SOURCE_DETECTION = "detection"  # the model's own detection (no boxes given)
SOURCE_MATCHED = "matched"  # a given box matched to a detection (Algorithm 1): its class and score
SOURCE_PROMPT = "prompt"  # a given box without a match: class and score at the box centre


def validate_boxes(boxes: np.ndarray | list, image_hw: tuple[int, int]) -> np.ndarray:
    """Check prompt boxes and clip them to the image.

    boxes: (n, 4) xyxy in the image's pixels. Returns (n, 4) float32 clipped to
    [0, W] x [0, H]. Raises ValueError naming the first bad box: not (n, 4),
    non-finite, x2 <= x1 or y2 <= y1, or nothing left after clipping (outside the image).
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4) as [[x1, y1, x2, y2], ...]; got shape {list(arr.shape)}")
    h, w = image_hw
    for i, (x1, y1, x2, y2) in enumerate(arr):
        if not np.all(np.isfinite([x1, y1, x2, y2])):
            raise ValueError(f"box {i} has a non-finite coordinate: {[float(v) for v in (x1, y1, x2, y2)]}")
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"box {i} is empty or inverted (needs x2 > x1 and y2 > y1): {[float(v) for v in (x1, y1, x2, y2)]}")
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
        if cx2 <= cx1 or cy2 <= cy1:
            raise ValueError(f"box {i} lies outside the {w}x{h} image: {[float(v) for v in (x1, y1, x2, y2)]}")
    clipped = arr.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, w)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, h)
    return clipped.astype(np.float32)


def nbytes(value: Any) -> int:
    """Bytes of a tensor or array (0 for anything else)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    return int(getattr(value, "nbytes", 0))


@dataclass
class ImageEncoding:
    """The image part of one image's network run, at the input resolution: what the cache holds.

    boxes (K,4) xyxy input pixels; labels (K,) int64; det_scores (K,); scores (K,) mask-aware;
    mask_probs (K, hp/4, wp/4) stride-4 probabilities on the padded canvas; input_hw the
    resized, un-padded input size; features: what the runtime's prompt part reads (the
    encoder outputs cell_scores, cell_classes, cell_params, mask_feats, as the runtime holds
    them: torch tensors or numpy arrays).
    """

    boxes: Tensor
    labels: Tensor
    det_scores: Tensor
    scores: Tensor
    mask_probs: Tensor
    input_hw: tuple[int, int]
    features: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        own = (self.boxes, self.labels, self.det_scores, self.scores, self.mask_probs)
        return sum(nbytes(t) for t in own) + sum(nbytes(v) for v in self.features.values())


@dataclass
class PromptOutput:
    """The prompt part for P boxes: labels (P,) int64 and det_scores (P,) at each box's prompt
    location, mask_probs (P, hp/4, wp/4) from the dynamic head there."""

    labels: Tensor
    det_scores: Tensor
    mask_probs: Tensor


@dataclass
class PromptedMasks:
    """One row per given box, in order (original image pixels).

    labels (P,) int64; det_scores (P,) float; mask_scores (P,) mask-aware score over
    the box; masks (P, H, W) bool, clipped to the box; sources: list of
    ``"matched"`` / ``"prompt"``; matched_index (P,) detection index or -1; windows: per box
    its pixel window (x0, y0, x1, y1), outside which its mask is all False.
    """

    labels: Tensor
    det_scores: Tensor
    mask_scores: Tensor
    masks: Tensor
    sources: list[str]
    matched_index: Tensor
    windows: list[tuple[int, int, int, int]]


def box_prompted_masks(
    boxes: Tensor,
    encoding: ImageEncoding,
    prompt: PromptOutput,
    output_hw: tuple[int, int],
    mask_threshold: float = 0.5,
    mask_stride: int = 4,
    iou_threshold: float = 0.5,
    match_score_threshold: float = 0.05,
) -> PromptedMasks:
    """Exactly one mask per box (the shared box-prompt logic of every runtime).

    Args:
        boxes: (P, 4) xyxy in original pixels, already validated and clipped.
        encoding: the image's detections (input resolution) and features.
        prompt: the prompt part's outputs for these boxes (scaled to the input).
        output_hw: the original image size.
    Returns:
        :class:`PromptedMasks`.
    """
    num = boxes.shape[0]
    h, w = output_hw
    device = encoding.mask_probs.device
    boxes = boxes.to(device=device, dtype=torch.float32)
    det_boxes = scale_boxes(encoding.boxes.float().to(device), encoding.input_hw, output_hw)
    matched = assign_pseudo_masks(
        det_boxes, encoding.scores.to(device), boxes, iou_threshold=iou_threshold, score_threshold=match_score_threshold
    )
    if num == 0:
        empty = torch.zeros(0, device=device)
        return PromptedMasks(empty.long(), empty, empty, torch.zeros(0, h, w, dtype=torch.bool, device=device), [], matched, [])
    has = matched >= 0
    probs_s4 = prompt.mask_probs.to(device)
    # class and detection score: the matched detection's, else the prompt cell's
    labels = prompt.labels.to(device).long().clone()
    det = prompt.det_scores.to(device).float().clone()
    labels[has] = encoding.labels.to(device)[matched[has]].long()
    det[has] = encoding.det_scores.to(device)[matched[has]].float()
    masks = torch.zeros(num, h, w, dtype=torch.bool, device=device)
    m_bar = torch.zeros(num, device=device)
    # Only the box's pixels (those box_pixel_masks marks) are pasted: the mask is zero
    # outside its box, so m_bar over the box is m_bar over the image.
    windows = [tuple(b) for b in box_pixel_bounds(boxes, h, w).tolist()]
    for k, (x0, y0, x1, y1) in enumerate(windows):
        probs = paste_mask_in_box(probs_s4[k], (x0, y0, x1, y1), encoding.input_hw, output_hw, mask_stride)
        m_bar[k] = mean_foreground_probability(probs[None], None, mask_threshold)[0]
        masks[k, y0:y1, x0:x1] = probs > mask_threshold
    scores = mask_aware_score_from_mean(det, m_bar)
    sources = [SOURCE_MATCHED if m else SOURCE_PROMPT for m in has.tolist()]
    return PromptedMasks(labels, det, scores, masks, sources, matched, windows)
