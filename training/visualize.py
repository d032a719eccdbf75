"""Pictures of predictions: readable overlays and side-by-side comparison sheets.

One drawing path for ``boxteacher visualize`` and ``boxteacher demo``:

- :func:`select_instances`: only the detections worth drawing (mask-aware score at or above
  a threshold, at most ``top_k``), best first.
- :func:`draw_overlay`: the image upscaled by an integer factor (nearest neighbour: each
  source pixel becomes a square block, so a mask still covers exactly its pixels) until its
  long side reaches :data:`MIN_SIDE`, in dimmed grey so that coloured masks stand out on any
  image (:func:`backdrop`); each mask filled translucent with an opaque outline, its box a
  thin rectangle, and a small tag (class, score) just outside the box's top-left corner, so
  that no text covers the mask it names.
- :func:`comparison_sheet`: titled panels side by side (the demo: image | true masks | filled
  boxes | predicted masks); :func:`contact_sheet`: sheets one under another.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from training.model.boxes import box_fill_masks
from training.model.condinst import Instances

MIN_SIDE = 512
"""Pictures are upscaled until their long side is at least this many pixels."""
DEFAULT_SCORE_THRESHOLD = 0.3
"""Minimum mask-aware score of a drawn detection."""
DEFAULT_TOP_K = 10
"""At most this many detections drawn per image."""
ALPHA = 0.5  # opacity of a mask's fill
FONT_SIZE = 13  # tag and title text, in pixels of the upscaled picture
BACKGROUND = (255, 255, 255)  # around and between panels
TEXT = (20, 20, 20)


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct, bright colours (golden-ratio hues)."""
    return [tuple(int(c * 255) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0)) for i in range(n)]


def display_scale(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """The integer upscale factor that brings the long side to at least ``min_side`` (1 when
    it is there already): 4 for a 128x128 image, 3 for 100x200, 1 for 640x480."""
    return max(1, math.ceil(min_side / max(height, width, 1)))


def upscale(array: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of the first two axes, (H, W, ...) -> (H*scale, W*scale, ...)."""
    return array if scale == 1 else np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def backdrop(array: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32 grey, dimmed: 40 + 0.6 * luma (ITU-R 601),
    in [40, 193]: light enough to read the image, dark and colourless enough for the masks."""
    luma = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat((40.0 + 0.6 * luma)[..., None], 3, axis=-1)


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool -> the mask's pixels within ``width`` 4-neighbour steps of a pixel outside
    it (outside the image counts as outside): a band ``width`` pixels thick along its edge."""
    inner = mask.astype(bool)
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask.astype(bool) & ~inner


def select_instances(inst: Instances, score_threshold: float = DEFAULT_SCORE_THRESHOLD, top_k: int | None = DEFAULT_TOP_K) -> Instances:
    """The instances with mask-aware score >= ``score_threshold``, best score first (ties in
    the given order), at most ``top_k`` of them (None: all)."""
    order = torch.argsort(inst.scores, descending=True, stable=True)
    order = order[inst.scores[order] >= score_threshold][:top_k]
    return Instances(
        inst.boxes[order], inst.labels[order], inst.det_scores[order], inst.scores[order], inst.masks[order],
        inst.mean_mask_prob[order], None if inst.mask_probs is None else inst.mask_probs[order],
    )  # fmt: skip


def tag_position(box: tuple[float, float, float, float], tag_size: tuple[int, int], canvas_size: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner (x, y) of a tag for ``box`` (xyxy, canvas pixels): just above the box,
    left-aligned with it; below the box when there is no room above; inside its top edge when
    there is room neither above nor below. Always inside the canvas (width, height) when the
    tag fits in it."""
    x1, y1, x2, y2 = box
    tw, th = tag_size
    cw, ch = canvas_size
    x = int(min(max(x1, 0), max(cw - tw, 0)))
    if y1 - th >= 0:
        return x, int(y1 - th)
    if y2 + 1 + th <= ch:
        return x, int(y2 + 1)
    return x, int(min(max(y1, 0), max(ch - th, 0)))


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Dark text on a light tag, white on a dark one (luma, ITU-R 601, above or below 128)."""
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return TEXT if luma >= 128 else (255, 255, 255)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 tensor or (H, W, 3) array -> (H, W, 3) uint8 array."""
    if isinstance(image, torch.Tensor):
        return image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)


def draw_overlay(
    image: torch.Tensor | np.ndarray,
    boxes: torch.Tensor,
    masks: torch.Tensor | np.ndarray,
    tags: list[str],
    scale: int | None = None,
    colours: list[tuple[int, int, int]] | None = None,
) -> Image.Image:
    """The image upscaled by ``scale`` (default :func:`display_scale`) with instance k drawn in
    ``colours[k]``: mask ``masks[k]`` ((H, W) bool, the image's pixels) filled at opacity
    :data:`ALPHA` with an opaque outline, box ``boxes[k]`` (xyxy image pixels) as a 1-px
    rectangle, and ``tags[k]`` as a small label outside the box (:func:`tag_position`)."""
    array = _hwc(image)
    h, w = array.shape[:2]
    s = scale or display_scale(h, w)
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    colours = colours or palette(len(tags))
    out = upscale(backdrop(array), s)
    big = [upscale(masks[k].astype(bool), s) for k in range(len(tags))]
    for m, colour in zip(big, colours):
        out[m] = out[m] * (1 - ALPHA) + np.array(colour, dtype=np.float32) * ALPHA
    for m, colour in zip(big, colours):
        out[mask_outline(m, max(1, s // 2))] = colour
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for k, tag in enumerate(tags):
        x1, y1, x2, y2 = (float(v) * s for v in boxes[k].tolist())
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=colours[k], width=1)
        if not tag:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        size = (int(right - left) + 4, int(bottom - top) + 4)
        x, y = tag_position((x1, y1, x2, y2), size, canvas.size)
        draw.rectangle([x, y, x + size[0] - 1, y + size[1] - 1], fill=colours[k])
        draw.text((x + 2 - left, y + 2 - top), tag, fill=text_colour(colours[k]), font=font)
    return canvas


def instance_tags(inst: Instances, class_names: list[str], with_scores: bool = True) -> list[str]:
    """One tag per instance: its class name, and its mask-aware score with ``with_scores``."""
    tags = []
    for k in range(len(inst)):
        label = int(inst.labels[k])
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        tags.append(f"{name} {float(inst.scores[k]):.2f}" if with_scores else name)
    return tags


def draw_instances(image: torch.Tensor | np.ndarray, inst: Instances, class_names: list[str], scale: int | None = None) -> Image.Image:
    """Predicted masks and boxes with class and mask-aware score tags (:func:`draw_overlay`)."""
    return draw_overlay(image, inst.boxes, inst.masks, instance_tags(inst, class_names), scale)


def comparison_sheet(panels: list[tuple[str, Image.Image]], gap: int = 8) -> Image.Image:
    """(title, picture) panels side by side on a white sheet, each title above its panel."""
    font = _font()
    title_h = FONT_SIZE + 8
    width = sum(p.width for _, p in panels) + gap * (len(panels) + 1)
    height = max(p.height for _, p in panels) + title_h + 2 * gap
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    x = gap
    for title, picture in panels:
        draw.text((x, gap), title, fill=TEXT, font=font)
        sheet.paste(picture, (x, gap + title_h))
        x += picture.width + gap
    return sheet


def contact_sheet(sheets: list[Image.Image], title: str = "") -> Image.Image:
    """Sheets one under another (left-aligned) on one white picture, under an optional title."""
    title_h = FONT_SIZE + 12 if title else 0
    sheet = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets) + title_h), BACKGROUND)
    if title:
        ImageDraw.Draw(sheet).text((8, 6), title, fill=TEXT, font=_font())
    y = title_h
    for s in sheets:
        sheet.paste(s, (0, y))
        y += s.height
    return sheet


def truth_vs_prediction(
    image: torch.Tensor,
    target: dict,
    inst: Instances,
    class_names: list[str],
    method: str = "predicted",
    scale: int | None = None,
) -> Image.Image:
    """Four panels for one image: the image | its true masks (``target`` with ``boxes``,
    ``labels``, ``masks``) | the predicted boxes filled (the box-fill baseline on the same
    detections) | the predicted masks with their mask-aware scores. One colour per detection
    in the last two."""
    h, w = image.shape[-2:]
    s = scale or display_scale(h, w)
    truth_tags = [class_names[int(label)] for label in target["labels"]]
    colours = palette(len(inst))
    names = instance_tags(inst, class_names, with_scores=False)
    return comparison_sheet(
        [
            ("image", Image.fromarray(upscale(_hwc(image), s))),
            ("true masks (never used in training)", draw_overlay(image, target["boxes"], target["masks"], truth_tags, s)),
            ("filled boxes (box-only baseline)", draw_overlay(image, inst.boxes, box_fill_masks(inst.boxes, h, w), names, s, colours)),
            (
                f"{method} masks, mask-aware score",
                draw_overlay(image, inst.boxes, inst.masks, instance_tags(inst, class_names), s, colours),
            ),
        ]
    )


def save_comparison_sheets(
    model,
    data_dir: str | Path,
    output: str | Path,
    split: str = "val",
    count: int = 6,
    method: str = "predicted",
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    top_k: int | None = DEFAULT_TOP_K,
) -> tuple[list[Path], Path]:
    """:func:`truth_vs_prediction` for the first ``count`` images of a split that has masks:
    OUTPUT/<image>.png each, and OUTPUT/contact_sheet.png with all of them."""
    from training.data.coco import CocoInstances

    dataset = CocoInstances(data_dir, split, with_masks=True)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths, sheets = [], []
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        inst = select_instances(model.predict([image])[0], score_threshold, top_k)
        sheet = truth_vs_prediction(image, target, inst, dataset.class_names, method)
        name = Path(dataset.coco.imgs[int(target["image_id"])]["file_name"]).stem
        paths.append(output / f"{name}.png")
        sheet.save(paths[-1])
        sheets.append(sheet)
    contact = output / "contact_sheet.png"
    title = f"{split} images: image | true masks | filled boxes | {method} masks (mask-aware score >= {score_threshold}, at most {top_k})"
    contact_sheet(sheets, title).save(contact)
    return paths, contact


def save_overlays(
    model,
    images: list[tuple[str, torch.Tensor]],
    output: str | Path,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    top_k: int | None = DEFAULT_TOP_K,
    scale: int | None = None,
) -> list[Path]:
    """Predict each (name, (3, H, W) uint8 image) and write OUTPUT/<name>.png with the
    detections :func:`select_instances` keeps (:func:`draw_instances`)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in images:
        inst = select_instances(model.predict([image])[0], score_threshold, top_k)
        path = output / f"{Path(name).stem}.png"
        draw_instances(image, inst, model.cfg.class_names, scale).save(path)
        paths.append(path)
    return paths
