"""Rasterising a box: the three rules of the project, side by side.

A box ``(x1, y1, x2, y2)`` (float xyxy pixels) is turned into a pixel mask in three
places, and the three places need three different rules. Each is written once, here:

======================== ======================================= ====================================
function                 pixel (row r, col c) is inside when     used for
======================== ======================================= ====================================
:func:`box_masks`        int(y1) <= r < int(y2 + 1), same for c; BoxInst targets (projection and
                         sampled at ``stride`` (offset s // 2)   pairwise losses), pseudo-mask crops
:func:`box_fill_masks`   y1 <= r + 0.5 <= y2, same for c         the box-fill baseline (evaluation,
                         (pixel centre inside, inclusive)        pseudo-label quality)
:func:`box_pixel_masks`  floor(y1) <= r < ceil(y2), same for c   clipping a served mask to its box
                         (every pixel the box touches)
======================== ======================================= ====================================

Why they differ (behaviour the tests and published numbers rely on):
- :func:`box_masks` is the authors' ``add_bitmasks_from_boxes`` (slices ``int(y1):int(y2 + 1)``,
  so an integer ``y2`` *includes* row y2), evaluated directly at the stride-4 sample points
  ``(4r + 2, 4c + 2)``. Training targets must match the authors' to reproduce BoxInst and
  BoxTeacher (tests/training/test_authors_parity.py), so this rule cannot change.
- :func:`box_fill_masks` is the box as a polygon rasterised at pixel centres: its mask area
  equals the box area up to the border pixels, which makes the box-fill baseline comparable to
  the bbox AP of the same detections. At full resolution it is *not* :func:`box_masks` with
  stride 1: for ``y2 = 3.0`` the box-fill mask stops at row 2, the BoxInst one at row 3.
- :func:`box_pixel_masks` is conservative: a served mask is clipped to the pixels a prompt box
  touches at all, so a box drawn through the middle of a pixel never cuts that pixel off the
  object (``y2 = 3.2`` keeps row 3, which the centre rule drops), while an edge on a pixel
  border (``y2 = 3.0``) keeps nothing beyond it (half-open pixel coordinates).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_masks", "box_fill_masks", "box_pixel_bounds", "box_pixel_masks"]


def box_masks(boxes: Tensor, height: int, width: int, stride: int = 4) -> Tensor:
    """Rasterised box masks at ``stride``, BoxInst's rule (authors' ``add_bitmasks_from_boxes``).

    At full resolution a box ``(x1, y1, x2, y2)`` fills rows ``int(y1):int(y2 + 1)`` and
    columns ``int(x1):int(x2 + 1)`` (``int`` truncates); the stride-``s`` mask is that full
    mask sampled at ``[s // 2 :: s, s // 2 :: s]`` (offset 2 at stride 4, offset 0 at stride
    1). It is computed directly at the sampled pixels, without the full-resolution mask.

    Negative lower bounds are clamped to 0 (the authors' boxes are clipped to the image, so
    Python's negative-index slicing never happens there). A sub-pixel box covers exactly
    one full-resolution pixel and may therefore be empty at stride 4.

    Args:
        boxes: ``(n, 4)`` float ``xyxy`` in full-resolution (padded input) pixels.
        height, width: full-resolution (padded) size; a multiple of ``stride`` gives
            ``(height // stride, width // stride)`` maps.
        stride: sampling stride (1 = full resolution).
    Returns:
        ``(n, len(range(s//2, height, s)), len(range(s//2, width, s)))`` float32 in {0, 1},
        on ``boxes.device``.
    """
    start = stride // 2
    device = boxes.device
    boxes = boxes.float().reshape(-1, 4)
    ys = torch.arange(start, height, stride, device=device, dtype=torch.float32)
    xs = torch.arange(start, width, stride, device=device, dtype=torch.float32)
    x_lo = torch.trunc(boxes[:, 0]).clamp(min=0)
    y_lo = torch.trunc(boxes[:, 1]).clamp(min=0)
    x_hi = torch.trunc(boxes[:, 2] + 1)
    y_hi = torch.trunc(boxes[:, 3] + 1)
    in_rows = (ys[None, :] >= y_lo[:, None]) & (ys[None, :] < y_hi[:, None])  # (n, h)
    in_cols = (xs[None, :] >= x_lo[:, None]) & (xs[None, :] < x_hi[:, None])  # (n, w)
    return (in_rows[:, :, None] & in_cols[:, None, :]).float()


def box_fill_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """(n, 4) xyxy -> (n, H, W) bool on the CPU: pixels whose centre lies inside the box
    (``x1 <= c + 0.5 <= x2`` and ``y1 <= r + 0.5 <= y2``); the box-fill baseline's mask."""
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5
    b = boxes.float().cpu()[:, :, None, None]
    return (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])


def box_pixel_bounds(boxes: Tensor, height: int, width: int) -> Tensor:
    """(n, 4) xyxy pixels -> (n, 4) int64 windows (x0, y0, x1, y1), x1 / y1 exclusive, of the
    pixels :func:`box_pixel_masks` marks: floor(x1) <= c < ceil(x2), floor(y1) <= r < ceil(y2),
    clipped to the ``height`` x ``width`` image (a box prompt's mask is computed on its window)."""
    limits = boxes.new_tensor([width, height, width, height])
    corners = torch.cat([boxes[:, :2].floor(), boxes[:, 2:].ceil()], dim=1)
    return torch.minimum(corners.clamp(min=0), limits).long()


def box_pixel_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """(n, 4) xyxy pixels -> (n, H, W) bool on ``boxes.device``: pixel (row r, col c) is
    inside a box when floor(x1) <= c < ceil(x2) and floor(y1) <= r < ceil(y2) (the pixels
    the box touches)."""
    cols = torch.arange(width, device=boxes.device)
    rows = torch.arange(height, device=boxes.device)
    x0, y0, x1, y1 = box_pixel_bounds(boxes, height, width).T[:, :, None]
    in_cols = (cols[None] >= x0) & (cols[None] < x1)  # (n, W)
    in_rows = (rows[None] >= y0) & (rows[None] < y1)  # (n, H)
    return in_rows[:, :, None] & in_cols[:, None, :]
