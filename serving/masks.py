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
    """(H, W) bool (or nonzero = inside) -> {"size": [H, W], "counts": str} (COCO compressed RLE).

    Byte for byte what ``pycocotools.mask.encode`` gives for the full mask. A mask whose
    bounding crop is small next to the image (a box-prompted mask on a 1920x1080 image) is
    encoded from the crop: its column-major runs are shifted to full-image indices (runs that
    continue from the bottom of one column to the top of the next are joined) and pycocotools
    compresses the counts, so the work grows with the crop. A mask whose crop covers more than
    :data:`CROP_FRACTION` of the image goes to pycocotools' C encoder whole, which is faster there.
    """
    from pycocotools import mask as mask_utils

    h, w = (int(v) for v in mask.shape)
    binary = mask if mask.dtype == bool else mask > 0
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        counts = [h * w]
    else:
        cols = np.flatnonzero(binary[rows[0] : rows[-1] + 1].any(axis=0))
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        ch = r1 - r0
        if ch * (c1 - c0) > CROP_FRACTION * h * w:
            rle = mask_utils.encode(np.asfortranarray(binary, dtype=np.uint8))
            return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        # the crop column by column, each column followed by one 0 so that runs end in their column
        padded = np.zeros((c1 - c0, ch + 1), bool)
        padded[:, :ch] = binary[r0:r1, c0:c1].T
        flat = padded.reshape(-1)
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # rises and falls alternate; the end is a 0
        if flat[0]:
            changes = np.r_[0, changes]
        starts, ends = changes[0::2], changes[1::2]
        starts = (c0 + starts // (ch + 1)) * h + r0 + starts % (ch + 1)
        ends = (c0 + ends // (ch + 1)) * h + r0 + ends % (ch + 1)
        apart = starts[1:] != ends[:-1]  # False: a run continues into the next column
        starts, ends = starts[np.r_[True, apart]], ends[np.r_[apart, True]]
        edges = np.empty(2 * len(starts) + 2, np.int64)
        edges[0], edges[-1] = 0, h * w
        edges[1:-1:2], edges[2:-1:2] = starts, ends
        counts = np.diff(edges).tolist()
        if counts[-1] == 0:  # pycocotools ends on the last run of ones
            counts.pop()
    rle = mask_utils.frPyObjects({"counts": counts, "size": [h, w]}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


CROP_FRACTION = 0.25  # measured: the crop path is ~2x slower per pixel than pycocotools' C encoder


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
