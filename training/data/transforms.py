"""Geometric and photometric augmentation (torchvision.transforms.v2).

Geometric transforms act jointly on a ``tv_tensors.Image`` (uint8, (3, H, W)),
its ``tv_tensors.BoundingBoxes`` (XYXY pixels) and ``tv_tensors.Mask``
((N, H, W)); the v2 kernels move boxes and masks with the image.
Photometric transforms (the BoxTeacher student's strong augmentation) act on
the image only.

The resize rule is detectron2's ``ResizeShortestEdge``, written once in
:func:`resize_shortest_edge_size` so that training, the teacher's test-scale
view, evaluation and serving agree to the pixel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

STRONG_AUGMENTATION_KINDS: tuple[str, ...] = ("strong", "strongv2", "weak", "none")


def resize_shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """Output size of a shortest-edge resize with a long-side cap.

    detectron2 ``ResizeShortestEdge.get_output_shape``: the short side becomes
    ``short``; if the long side would then exceed ``max_size``, the image is
    instead scaled so that the long side equals ``max_size``. Both sides are
    rounded with ``int(x + 0.5)``.

    Args:
        h, w: input height and width in pixels (> 0).
        short: target length of the shorter side (> 0).
        max_size: cap on the longer side (> 0).

    Returns:
        ``(new_h, new_w)`` in pixels.

    Example: ``(480, 640, 800, 1333) -> (800, 1067)``;
    ``(100, 1000, 800, 1333) -> (133, 1333)``.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got h={h}, w={w}")
    if short <= 0 or max_size <= 0:
        raise ValueError(f"short and max_size must be positive, got short={short}, max_size={max_size}")
    scale = short / min(h, w)
    if h < w:
        new_h, new_w = float(short), scale * w
    else:
        new_h, new_w = scale * h, float(short)
    longest = max(new_h, new_w)
    if longest > max_size:
        scale = max_size / longest
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


class ResizeShortestEdge(v2.RandomShortestSize):
    """Resize so the short side is one of ``min_sizes`` (chosen uniformly per
    sample with ``torch.randint``), long side capped at ``max_size``.

    Same sampling as ``v2.RandomShortestSize`` but the output size follows
    :func:`resize_shortest_edge_size` (rounding, not truncation). Images are
    resized bilinearly with antialiasing (dtype preserved: uint8 stays uint8),
    masks with nearest neighbour, boxes scaled.
    """

    def __init__(self, min_sizes: int | Sequence[int], max_size: int) -> None:
        sizes = [min_sizes] if isinstance(min_sizes, int) else list(min_sizes)
        if not sizes:
            raise ValueError("min_sizes must not be empty")
        super().__init__(min_size=sizes, max_size=max_size, antialias=True)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        short = self.min_size[int(torch.randint(len(self.min_size), ()))]
        return {"size": resize_shortest_edge_size(h, w, short, self.max_size)}


def build_train_transforms(min_sizes: Sequence[int], max_size: int, hflip_prob: float = 0.5) -> v2.Compose:
    """Training geometry: horizontal flip with probability ``hflip_prob``, then a
    multi-scale shortest-edge resize (short side drawn from ``min_sizes``,
    long side <= ``max_size``).

    Called as ``image, target = t(image, target)`` on a uint8 ``tv_tensors.Image``
    and a target dict holding ``BoundingBoxes`` (XYXY) and optionally ``Mask``;
    the image stays uint8.
    """
    return v2.Compose([v2.RandomHorizontalFlip(p=hflip_prob), ResizeShortestEdge(min_sizes, max_size)])


def build_test_transforms(min_size: int, max_size: int) -> ResizeShortestEdge:
    """Deterministic shortest-edge resize to ``min_size`` with the long-side cap."""
    return ResizeShortestEdge([min_size], max_size)


def build_strong_augmentation(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Photometric augmentation for the BoxTeacher student (no geometry).

    Input and output: uint8 RGB image tensor (3, H, W) (or (B, 3, H, W), one
    draw for the whole batch). Recipes (BoxTeacher ``INPUT.AUG_TYPE``):

    - ``"strong"``: ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``
      then ``RandomGrayscale(p=0.2)``
    - ``"strongv2"``: ``"strong"`` then
      ``RandomApply([GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5)``
    - ``"weak"``: ``RandomApply([ColorJitter(0.2, 0.2, 0.2, 0.1)], p=0.2)``
    - ``"none"``: identity

    Raises:
        ValueError: ``kind`` is not one of :data:`STRONG_AUGMENTATION_KINDS`.
    """
    if kind == "none":
        return v2.Identity()
    strong = [
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if kind == "strong":
        return v2.Compose(strong)
    if kind == "strongv2":
        return v2.Compose([*strong, v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 2.0))], p=0.5)])
    if kind == "weak":
        return v2.Compose([v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.1)], p=0.2)])
    raise ValueError(f"unknown augmentation kind {kind!r}; allowed: {', '.join(STRONG_AUGMENTATION_KINDS)}")
