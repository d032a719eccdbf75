"""Synthetic shapes dataset in COCO instance format, for tests and the demo.

``make_synthetic(out)`` writes::

    out/images/000001.png ...            S x S RGB PNGs
    out/annotations/train.json, val.json  COCO instances, masks as compressed RLE

Each image has a textured background (gradient, noise or stripes) and 1-6
textured objects (solid, stripes or noise) of the classes in :data:`SHAPES`,
with diameters from 12% to 60% of S. Later objects occlude earlier ones; the
masks are the visible parts, exact to the pixel. A placement that would leave
an earlier object with less than :data:`MIN_VISIBLE_FRACTION` of its area or
fewer than :data:`MIN_VISIBLE_PIXELS` pixels visible is rejected, so every
painted object is annotated. Object colours are chosen far (in RGB) from the
pixels just around the object, so colour edges mark the object boundaries,
which is what a box-supervised (pairwise colour affinity) model needs.
Several classes are non-convex (ring, crescent, star, cross): their boxes are
poor masks.

Output is a pure function of the arguments: image ``k`` is drawn from
``numpy.random.default_rng([seed, k])`` and files carry no timestamps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "crescent", "star", "cross")
"""Class names; category id = index + 1."""

MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 24
MIN_DIAMETER_FRACTION = 0.12
MAX_DIAMETER_FRACTION = 0.6
MAX_OBJECTS = 6
_PLACEMENT_TRIES = 20
_COLOUR_TRIES = 40
_MIN_CONTRAST = 90.0  # RGB distance between object colours and nearby background


def make_synthetic(
    out_dir: str | os.PathLike[str],
    train: int = 200,
    val: int = 50,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a synthetic shapes dataset and return its folder.

    Args:
        out_dir: dataset folder (created if needed; existing files of the same
            names are overwritten).
        train, val: number of images per split (>= 0).
        size: image side S in pixels (>= 32).
        seed: base seed (>= 0).

    Returns:
        ``Path(out_dir)``, readable by ``training.data.coco.CocoInstances``.
        Image ids are 1..train for train and train+1..train+val for val.
    """
    if train < 0 or val < 0:
        raise ValueError(f"train and val must be >= 0, got {train}, {val}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)]
    grid = _pixel_grid(size)

    image_id, ann_id = 1, 1
    for split, count in (("train", train), ("val", val)):
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for _ in range(count):
            pixels, instances = render_image(np.random.default_rng([seed, image_id]), size, grid)
            file_name = f"{image_id:06d}.png"
            Image.fromarray(pixels).save(out / "images" / file_name, format="PNG", compress_level=6)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for label, mask in instances:
                annotations.append({"id": ann_id, "image_id": image_id, **_mask_annotation(mask, label)})
                ann_id += 1
            image_id += 1
        coco = {
            "info": {"description": "boxteacher synthetic shapes", "size": size, "seed": seed},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        text = json.dumps(coco, separators=(",", ":"))
        (out / "annotations" / f"{split}.json").write_text(text + "\n", encoding="utf-8")
    return out


def render_image(
    rng: np.random.Generator, size: int, grid: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one image.

    Returns:
        ``pixels``: uint8 (S, S, 3) RGB; ``instances``: ``(label, mask)`` in
        painting order, label an index into :data:`SHAPES`, mask bool (S, S) of
        the visible part.
    """
    xx, yy = grid if grid is not None else _pixel_grid(size)
    canvas = _background(rng, xx, yy, size)
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the visible object per pixel
    full_areas: list[int] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        label = int(rng.integers(len(SHAPES)))
        mask = _place(rng, label, owner, full_areas, xx, yy, size)
        if mask is None:
            continue
        _paint(rng, canvas, mask, xx, yy, size)
        owner[mask] = len(labels)
        full_areas.append(int(mask.sum()))
        labels.append(label)
    instances = []
    for k, label in enumerate(labels):
        visible = owner == k
        area = int(visible.sum())
        if area >= MIN_VISIBLE_PIXELS and area >= MIN_VISIBLE_FRACTION * full_areas[k]:
            instances.append((label, visible))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), instances


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(xx, yy)``, float64 (S, S)."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return xx, yy


def _place(
    rng: np.random.Generator,
    label: int,
    owner: np.ndarray,
    full_areas: list[int],
    xx: np.ndarray,
    yy: np.ndarray,
    size: int,
) -> np.ndarray | None:
    """Find a pose for a new object that keeps every earlier object visible
    enough; returns its full mask (bool (S, S)) or None after too many tries."""
    n = len(full_areas)
    log_lo, log_hi = math.log(MIN_DIAMETER_FRACTION), math.log(MAX_DIAMETER_FRACTION)
    for _ in range(_PLACEMENT_TRIES):
        radius = 0.5 * size * math.exp(rng.uniform(log_lo, log_hi))
        cx, cy = rng.uniform(radius, size - radius, size=2)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        mask = _shape_mask(SHAPES[label], rng, xx, yy, cx, cy, radius, angle)
        if mask.sum() < 2 * MIN_VISIBLE_PIXELS:
            continue
        if n:
            after = np.where(mask, -1, owner)
            visible = np.bincount(after.ravel() + 1, minlength=n + 1)[1:]
            needed = np.maximum(MIN_VISIBLE_FRACTION * np.asarray(full_areas), MIN_VISIBLE_PIXELS)
            if np.any(visible < needed):
                continue
        return mask
    return None


def _shape_mask(
    shape: str,
    rng: np.random.Generator,
    xx: np.ndarray,
    yy: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    angle: float,
) -> np.ndarray:
    """Bool (S, S) mask of one shape of outer radius ``r`` centred at (cx, cy),
    rotated by ``angle`` radians."""
    dx, dy = xx - cx, yy - cy
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # object-frame coordinates
    rho2 = u * u + v * v
    if shape == "disc":
        return rho2 <= r * r
    if shape == "ring":
        inner = r * rng.uniform(0.45, 0.65)
        return (rho2 <= r * r) & (rho2 >= inner * inner)
    if shape == "crescent":
        shift, bite = r * rng.uniform(0.35, 0.6), r * rng.uniform(0.75, 0.9)
        return (rho2 <= r * r) & ((u - shift) ** 2 + v * v > bite * bite)
    if shape == "square":
        half = r / math.sqrt(2.0)
        verts = [(half, half), (-half, half), (-half, -half), (half, -half)]
    elif shape == "triangle":
        verts = [(r * math.cos(a), r * math.sin(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    elif shape == "star":
        points, inner = int(rng.integers(5, 7)), r * rng.uniform(0.38, 0.5)
        verts = [
            (
                (r if k % 2 == 0 else inner) * math.cos(math.pi * k / points),
                (r if k % 2 == 0 else inner) * math.sin(math.pi * k / points),
            )
            for k in range(2 * points)
        ]
    elif shape == "cross":
        t = r * rng.uniform(0.25, 0.38)
        verts = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r),
                 (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t), (-t, r)]  # fmt: skip
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return _inside_polygon(u, v, verts)


def _inside_polygon(u: np.ndarray, v: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test for every pixel; bool, same shape as u."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = verts[-1]
    for x1, y1 in verts:
        if y0 != y1:
            crosses = (y1 > v) != (y0 > v)
            x_at = x1 + (v - y1) * (x0 - x1) / (y0 - y1)
            inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """Float64 (S, S, 3) background: a gentle gradient, noise or stripes."""
    base = rng.uniform(20.0, 235.0, size=3)
    kind = int(rng.integers(3))
    if kind == 0:  # gradient between two colours at most ~100 apart
        other = np.clip(base + rng.normal(0.0, 1.0, 3) * 60.0, 0.0, 255.0)
        t = _projection(rng, xx, yy) / size
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        image = base * (1.0 - t[..., None]) + other * t[..., None]
        noise = 4.0
    elif kind == 1:  # flat colour with strong pixel noise
        image = np.broadcast_to(base, (size, size, 3)).copy()
        noise = rng.uniform(8.0, 18.0)
    else:  # stripes of two close colours
        other = np.clip(base + rng.normal(0.0, 1.0, 3) * 25.0, 0.0, 255.0)
        image = _stripes(rng, xx, yy, size, base, other, period=(6.0, 20.0))
        noise = 4.0
    return image + rng.normal(0.0, noise, size=(size, size, 3))


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, xx: np.ndarray, yy: np.ndarray, size: int) -> None:
    """Paint a solid, striped or noisy object into ``canvas`` (in place) in
    colours far from the pixels just around ``mask``."""
    ring = _dilate(mask, max(2, size // 64)) & ~mask
    around = canvas[ring if ring.any() else mask]  # (K, 3)
    kind = int(rng.integers(3))
    best, best_score = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = rng.uniform(0.0, 255.0, size=3)
        second = np.clip(colour + rng.normal(0.0, 1.0, 3) * 30.0, 0.0, 255.0)
        colours = (colour, second) if kind == 1 else (colour,)
        score = min(float(np.percentile(np.linalg.norm(around - c, axis=1), 10)) for c in colours)
        if score > best_score:
            best, best_score = (colour, second), score
        if score >= _MIN_CONTRAST:
            break
    colour, second = best
    if kind == 0:
        texture = np.broadcast_to(colour, (size, size, 3)) + rng.normal(0.0, 3.0, (size, size, 3))
    elif kind == 1:
        texture = _stripes(rng, xx, yy, size, colour, second, period=(3.0, 8.0))
    else:
        texture = colour + rng.normal(0.0, 10.0, (size, size, 3))
    canvas[mask] = texture[mask]


def _projection(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Pixel coordinates projected on a random direction, float64 (S, S)."""
    theta = rng.uniform(0.0, 2.0 * math.pi)
    return xx * math.cos(theta) + yy * math.sin(theta)


def _stripes(
    rng: np.random.Generator,
    xx: np.ndarray,
    yy: np.ndarray,
    size: int,
    first: np.ndarray,
    second: np.ndarray,
    period: tuple[float, float],
) -> np.ndarray:
    """Float64 (S, S, 3) stripes alternating two colours; ``period`` range in
    pixels at S=128, scaled with S."""
    width = rng.uniform(*period) * size / 128.0
    band = np.floor(_projection(rng, xx, yy) / width).astype(np.int64) % 2 == 1
    return np.where(band[..., None], second, first)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1) square, bool (S, S)."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for shift in range(1, radius + 1):
            lead = [slice(None)] * 2
            lag = [slice(None)] * 2
            lead[axis], lag[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(lead)] |= out[tuple(lag)]
            grown[tuple(lag)] |= out[tuple(lead)]
        out = grown
    return out


def _mask_annotation(mask: np.ndarray, label: int) -> dict[str, Any]:
    """COCO annotation fields (no ids) for a bool (S, S) mask: compressed RLE
    with ``counts`` as str, tight ``bbox`` [x, y, w, h], ``area`` = pixel count."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rows, cols = np.nonzero(mask)
    x0, y0 = int(cols.min()), int(rows.min())
    return {
        "category_id": label + 1,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(mask.sum()),
        "bbox": [float(x0), float(y0), float(cols.max() - x0 + 1), float(rows.max() - y0 + 1)],
        "iscrowd": 0,
    }
