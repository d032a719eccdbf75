"""Label Studio regions <-> pixels: rectangles in percent, masks as brush RLE.

Label Studio stores a rectangle as percentages of the original (EXIF-corrected) image
size, top-left origin, ``rotation`` in degrees clockwise about the top-left corner::

    x0 = x / 100 * W,  y0 = y / 100 * H,  x1 = (x + width) / 100 * W,  y1 = (y + height) / 100 * H

A mask travels as Label Studio's *brush RLE* (not COCO RLE): the H x W mask repeated into
RGBA bytes, run-length packed (``label_studio_sdk.converter.brush``). The encoder wants
uint8 0/255 (a bool mask is refused, and 0/1 draws an invisible alpha of 1).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rectangle:
    """An annotator's rectangle in pixels (xyxy, axis-aligned), with its label and origin."""

    box: tuple[float, float, float, float]
    label: str | None
    region_id: str | None = None
    from_name: str | None = None


def percent_to_pixels(value: dict, width: int, height: int) -> tuple[float, float, float, float]:
    """A rectangle's ``value`` (x, y, width, height in percent; rotation in degrees) ->
    xyxy pixels of the image ``width`` x ``height``.

    For a rotated rectangle, the axis-aligned box around its four corners.
    """
    x = float(value["x"]) / 100.0 * width
    y = float(value["y"]) / 100.0 * height
    w = float(value["width"]) / 100.0 * width
    h = float(value["height"]) / 100.0 * height
    rotation = float(value.get("rotation") or 0.0)
    if rotation % 360 == 0:
        return x, y, x + w, y + h
    t = math.radians(rotation)
    c, s = math.cos(t), math.sin(t)
    corners = [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    return min(xs), min(ys), max(xs), max(ys)


def pixels_to_percent(box: Sequence[float], width: int, height: int) -> dict:
    """xyxy pixels -> a rectangle ``value`` (percent, rotation 0)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return {
        "x": x0 / width * 100.0,
        "y": y0 / height * 100.0,
        "width": (x1 - x0) / width * 100.0,
        "height": (y1 - y0) / height * 100.0,
        "rotation": 0,
    }


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool (or 0/1, or 0/255) -> Label Studio brush RLE bytes, as ints.

    Byte for byte what label-studio-sdk's ``converter.brush.mask2rle`` gives for the mask as
    0/255 (tested), computed from the runs of the mask's bounding crop instead of the full
    RGBA array: label-studio-sdk repeats every pixel 4 times (RGBA) and run-length encodes
    the whole W*H*4 array (~20-35 ms for 1920x1080, per mask); here the work grows with the
    crop (:func:`_row_major_runs`) and the bit layout is :func:`_brush_bits`.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W); got shape {list(m.shape)}")
    lengths, first_value = _row_major_runs(m > 0)
    bits = _brush_bits([4 * n for n in lengths], first_value, total=m.size * 4)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def _row_major_runs(binary: np.ndarray) -> tuple[list[int], int]:
    """Run lengths of ``binary`` flattened row by row, and the value (0 or 255) of the first
    run; the runs alternate between the two values."""
    from serving.masks import alternating_run_lengths, bounding_crop

    lengths = alternating_run_lengths(binary, bounding_crop(binary))
    first_value = 0
    if lengths[0] == 0:  # the mask starts with a run of ones
        lengths, first_value = lengths[1:], 255
    if lengths[-1] == 0:
        lengths = lengths[:-1]
    return lengths.tolist(), first_value


def _brush_bits(lengths: list[int], first_value: int, total: int) -> str:
    """Label Studio's brush RLE bit string (header: 32-bit length, word size 8, run sizes
    3/4/8/16 bits; then per run a "1" flag, the size index, length - 1 and the 8-bit value;
    runs over 2**16 in 2**16 pieces), padded with zeros to whole bytes as label-studio-sdk
    pads (a whole zero byte when already aligned). Runs here are always longer than 1."""
    out = [f"{total:032b}", f"{7:05b}", "".join(f"{x - 1:04b}" for x in (3, 4, 8, 16))]
    value = first_value
    for n in lengths:
        v = f"{value:08b}"
        if n <= 8:
            out.append(f"100{n - 1:03b}{v}")
        elif n <= 16:
            out.append(f"101{n - 1:04b}{v}")
        elif n <= 256:
            out.append(f"110{n - 1:08b}{v}")
        else:
            while n > 2**16:
                out.append(f"111{2**16 - 1:016b}{v}")
                n -= 2**16
            out.append(f"111{n - 1:016b}{v}")
        value = 255 - value
    bits = "".join(out)
    return bits + "0" * (8 - len(bits) % 8)


def rle_to_mask(rle: Sequence[int], width: int, height: int) -> np.ndarray:
    """Brush RLE -> (H, W) bool (alpha > 0), with label-studio-sdk's decoder."""
    from label_studio_sdk.converter.brush import decode_rle

    flat = decode_rle(list(rle))
    if flat.size != width * height * 4:
        raise ValueError(f"the RLE holds {flat.size} values; {width}x{height} RGBA needs {width * height * 4}")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def region_id() -> str:
    return uuid.uuid4().hex[:10]


def brush_result(
    mask: np.ndarray, label: str | None, score: float, from_name: str, to_name: str, width: int, height: int, rid: str | None = None
) -> dict:
    """One ``brushlabels`` result item (what Label Studio stores in a prediction)."""
    return {
        "id": rid or region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label] if label else []},
        "score": _finite(score),
        "readonly": False,
    }


def rectangle_result(
    box: Sequence[float], label: str, score: float, from_name: str, to_name: str, width: int, height: int, rid: str | None = None
) -> dict:
    """One ``rectanglelabels`` result item, box in xyxy pixels."""
    value = pixels_to_percent(box, width, height)
    value["rectanglelabels"] = [label]
    return {
        "id": rid or region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": "rectanglelabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
        "score": _finite(score),
        "readonly": False,
    }


def rectangles_in(results: Sequence[dict] | None, width: int, height: int, to_name: str | None = None) -> list[Rectangle]:
    """The ``rectanglelabels`` / ``rectangle`` items of a result list (annotation, draft or
    interactive context) as pixel boxes of a ``width`` x ``height`` image; items on another
    image than ``to_name`` are skipped."""
    rects = []
    for item in results or []:
        if not isinstance(item, dict) or item.get("type") not in ("rectanglelabels", "rectangle"):
            continue
        if to_name is not None and item.get("to_name") not in (None, to_name):
            continue
        value = item.get("value") or {}
        if not all(k in value for k in ("x", "y", "width", "height")):
            continue
        labels = value.get("rectanglelabels") or []
        rects.append(
            Rectangle(percent_to_pixels(value, width, height), labels[0] if labels else None, item.get("id"), item.get("from_name"))
        )
    return rects


def masks_in(results: Sequence[dict] | None, width: int, height: int, to_name: str | None = None) -> list[np.ndarray]:
    """The non-empty masks of the ``brushlabels`` items (brush RLE) of a result list, as
    (height, width) bool arrays; items on another image, of another size or that do not
    decode are skipped."""
    masks = []
    for item in results or []:
        if not isinstance(item, dict) or item.get("type") != "brushlabels":
            continue
        if to_name is not None and item.get("to_name") not in (None, to_name):
            continue
        value = item.get("value") or {}
        if value.get("format") != "rle" or not value.get("rle"):
            continue
        if (item.get("original_width", width), item.get("original_height", height)) != (width, height):
            continue
        try:
            mask = rle_to_mask(value["rle"], width, height)
        except (ValueError, TypeError):
            continue
        if mask.any():
            masks.append(mask)
    return masks


def has_rectangles(results: Sequence[dict] | None) -> bool:
    return any(isinstance(r, dict) and r.get("type") in ("rectanglelabels", "rectangle") for r in results or [])


def _finite(x: float) -> float:
    x = float(x)
    return round(x, 4) if math.isfinite(x) else 0.0
