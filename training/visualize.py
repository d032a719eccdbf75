"""PNG overlays of predictions: masks, boxes, class names, both scores."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from training.model.condinst import Instances


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct, bright colours (golden-ratio hues)."""
    return [tuple(int(c * 255) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0)) for i in range(n)]


def draw_instances(image: torch.Tensor | np.ndarray, inst: Instances, class_names: list[str], alpha: float = 0.45) -> Image.Image:
    """Overlay on a (3,H,W) uint8 tensor or (H,W,3) array; returns an RGB PIL image."""
    array = image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    out = array.astype(np.float32).copy()
    colours = palette(max(len(inst), 1))
    masks = inst.masks.cpu().numpy()
    for k in range(len(inst)):
        out[masks[k]] = out[masks[k]] * (1 - alpha) + np.array(colours[k], dtype=np.float32) * alpha
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for k in range(len(inst)):
        x1, y1, x2, y2 = inst.boxes[k].tolist()
        draw.rectangle([x1, y1, x2, y2], outline=colours[k], width=2)
        label = int(inst.labels[k])
        name = class_names[label] if label < len(class_names) else str(label)
        text = f"{name} {float(inst.det_scores[k]):.2f}/{float(inst.scores[k]):.2f}"
        tw = draw.textlength(text)
        draw.rectangle([x1, max(y1 - 11, 0), x1 + tw + 4, max(y1 - 11, 0) + 11], fill=colours[k])
        draw.text((x1 + 2, max(y1 - 11, 0)), text, fill=(0, 0, 0))
    return canvas


def save_overlays(model, images: list[tuple[str, torch.Tensor]], output: str | Path, score_threshold: float = 0.3) -> list[Path]:
    """Predict each (name, image) and write OUTPUT/<name>.png; keeps instances whose
    mask-aware score >= ``score_threshold``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in images:
        inst = model.predict([image])[0]
        keep = inst.scores >= score_threshold
        inst = Instances(inst.boxes[keep], inst.labels[keep], inst.det_scores[keep], inst.scores[keep], inst.masks[keep], inst.mean_mask_prob[keep])
        path = output / f"{Path(name).stem}.png"
        draw_instances(image, inst, model.cfg.class_names).save(path)
        paths.append(path)
    return paths
