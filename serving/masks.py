"""Mask encodings for the API: COCO RLE (default), polygons, PNG, or none.

- ``rle``: ``{"size": [H, W], "counts": str}``, pycocotools' compressed RLE
  (column-major), ``counts`` decoded to ASCII; ``pycocotools.mask.decode`` reads it
  back after ``counts.encode()``.
- ``polygon``: a list of outer contours, each ``[x1, y1, x2, y2, ...]`` in pixels
  (COCO polygon layout; lossy; OpenCV ``findContours``).
- ``png``: base64 of a 1-bit PNG of the full-size mask (white = instance).
- ``none``: no mask (boxes and scores only).
"""

from __future__ import annotations

import base64
import functools
import io
from enum import Enum

import numpy as np
from PIL import Image


class MaskFormat(str, Enum):
    rle = "rle"
    polygon = "polygon"
    png = "png"
    none = "none"


def encode_rle(mask: np.ndarray) -> dict:
    """(H, W) bool (or nonzero = inside) -> {"size": [H, W], "counts": str} (COCO compressed RLE)."""
    from pycocotools import mask as mask_utils

    binary = mask if mask.dtype == bool else mask > 0
    rle = mask_utils.encode(np.asfortranarray(binary.view(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@functools.cache
def polygon_available() -> bool:
    """Polygons need OpenCV (opencv-python-headless, in the ``serve`` extra)."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def encode_polygon(mask: np.ndarray) -> list[list[float]]:
    """(H, W) bool -> outer contours [[x1, y1, x2, y2, ...], ...] with >= 3 points each."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def encode_png(mask: np.ndarray) -> str:
    """(H, W) bool -> base64 of a 1-bit PNG (white = instance)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_mask(mask: np.ndarray, fmt: MaskFormat | str):
    """Encode one mask in ``fmt``; None for ``none``."""
    fmt = MaskFormat(fmt)
    if fmt is MaskFormat.rle:
        return encode_rle(mask)
    if fmt is MaskFormat.polygon:
        return encode_polygon(mask)
    if fmt is MaskFormat.png:
        return encode_png(mask)
    return None
