"""Pictures: upscale factor, outlines, grey backdrop, which detections are drawn, where tags
go (never on a mask), panel and sheet sizes, the visualize command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import conditioned_model, tiny_config, write_checkpoint
from PIL import Image

from training.cli import main
from training.model.condinst import Instances
from training.visualize import (
    ALPHA,
    TEXT,
    backdrop,
    display_scale,
    draw_overlay,
    mask_outline,
    palette,
    save_comparison_sheets,
    select_instances,
    tag_position,
    text_colour,
    truth_vs_prediction,
    upscale,
)


def _instances(scores: list[float], boxes: list[list[float]] | None = None, hw: tuple[int, int] = (8, 8)) -> Instances:
    n = len(scores)
    boxes_t = torch.tensor(boxes, dtype=torch.float32) if boxes else torch.zeros(n, 4)
    s = torch.tensor(scores)
    return Instances(boxes_t, torch.arange(n), s, s, torch.zeros(n, *hw, dtype=torch.bool), s)


def test_display_scale_reaches_512_on_the_long_side():
    assert display_scale(128, 128) == 4  # 512
    assert display_scale(100, 200) == 3  # 512 / 200 = 2.56 -> 3 (600 px)
    assert display_scale(640, 480) == 1
    assert display_scale(10, 512) == 1


def test_upscale_repeats_each_pixel_as_a_block():
    a = np.array([[1, 2], [3, 4]])
    assert upscale(a, 2).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    assert upscale(rgb, 4).shape == (8, 12, 3)


def test_mask_outline_is_a_band_along_the_edge():
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True  # 5x5 square
    ring = mask_outline(mask, 1)
    assert int(ring.sum()) == 16  # 25 - the inner 3x3
    assert not ring[2:5, 2:5].any()
    assert int(mask_outline(mask, 2).sum()) == 24  # 25 - the centre pixel
    full = np.ones((3, 3), dtype=bool)  # the image border counts as outside
    assert int(mask_outline(full, 1).sum()) == 8
    assert not mask_outline(np.zeros((4, 4), dtype=bool), 1).any()


def test_backdrop_is_dimmed_grey():
    pixels = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], dtype=np.uint8)
    out = backdrop(pixels)
    assert out.shape == (1, 3, 3)
    assert out[0, :, 0] == pytest.approx([40 + 0.6 * 255, 40.0, 40 + 0.6 * 0.299 * 255], abs=1e-3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_text_colour_contrasts_with_its_tag():
    assert text_colour((255, 255, 0)) == TEXT  # yellow: luma 225.9
    assert text_colour((0, 240, 0)) == TEXT  # luma 140.9
    assert text_colour((0, 200, 0)) == (255, 255, 255)  # luma 117.4
    assert text_colour((0, 0, 255)) == (255, 255, 255)  # blue: luma 29.1


def test_select_instances_threshold_and_top_k_best_first():
    inst = _instances([0.2, 0.9, 0.5, 0.7])
    assert select_instances(inst, 0.3, 2).labels.tolist() == [1, 3]
    assert select_instances(inst, 0.3, None).labels.tolist() == [1, 3, 2]
    assert select_instances(inst, 0.95, None).labels.tolist() == []
    tied = _instances([0.5, 0.8, 0.5])
    assert select_instances(tied, 0.0, None).labels.tolist() == [1, 0, 2]  # ties keep their order


def test_tag_position_above_below_inside_and_clamped():
    canvas = (512, 512)
    assert tag_position((40, 30, 100, 80), (50, 17), canvas) == (40, 13)  # above the box
    assert tag_position((40, 5, 100, 80), (50, 17), canvas) == (40, 81)  # no room above: below
    assert tag_position((0, 5, 512, 500), (50, 17), canvas) == (0, 5)  # neither: inside the top edge
    assert tag_position((480, 30, 510, 80), (50, 17), canvas) == (462, 13)  # kept inside the canvas
    assert tag_position((-6, 30, 20, 80), (50, 17), canvas) == (0, 13)


def test_draw_overlay_fill_outline_and_tags_off_the_mask():
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    mask = np.zeros((1, 16, 16), dtype=bool)
    mask[0, 8:14, 4:12] = True  # rows 8-13, cols 4-11
    box = torch.tensor([[2.0, 6.0, 14.0, 15.0]])  # drawn at x 8..55, y 24..59 once upscaled 4x
    colour = palette(1)[0]
    tagged = np.asarray(draw_overlay(image, box, mask, ["disc 0.87"], scale=4)).astype(int)
    plain = np.asarray(draw_overlay(image, box, mask, [""], scale=4)).astype(int)
    assert tagged.shape == (64, 64, 3)
    grey = 40 + 0.6 * 100
    assert np.abs(tagged[63, 63] - grey).max() <= 1  # away from the instance: the grey backdrop
    inside = grey * (1 - ALPHA) + np.array(colour) * ALPHA
    assert np.abs(tagged[41, 33] - inside).max() <= 1  # mask interior: pixel (10, 8) -> block rows 40-43, cols 32-35
    assert tagged[32, 20].tolist() == list(colour)  # the mask's top edge (row 8 -> 32): opaque outline
    assert tagged[24, 30].tolist() == list(colour)  # the box's top edge
    changed = (tagged != plain).any(axis=-1)
    assert changed.any()  # the tag is drawn ...
    assert not (changed & upscale(mask[0], 4)).any()  # ... nowhere on the mask ...
    assert changed[:24].any() and not changed[25:].any()  # ... above the box


def test_truth_vs_prediction_panels_are_upscaled_side_by_side():
    image = torch.zeros(3, 128, 128, dtype=torch.uint8)
    masks = torch.zeros(1, 128, 128, dtype=torch.bool)
    masks[0, 10:40, 10:40] = True
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([0]), "masks": masks}
    inst = Instances(target["boxes"], target["labels"], torch.tensor([0.9]), torch.tensor([0.8]), masks, torch.tensor([0.9]))
    sheet = truth_vs_prediction(image, target, inst, ["disc"], "BoxTeacher")
    assert sheet.width == 4 * 512 + 5 * 8  # image | true masks | filled boxes | predicted, 8-px gaps
    assert sheet.height >= 512


def test_comparison_sheets_and_contact_sheet(synthetic_dataset, tmp_path):
    cfg = tiny_config(num_classes=7, overrides=[f"class_names={['disc', 'square', 'triangle', 'ring', 'crescent', 'star', 'cross']}"])
    model = conditioned_model(cfg)
    paths, contact = save_comparison_sheets(
        model, synthetic_dataset, tmp_path / "sheets", "val", count=2, method="BoxTeacher", score_threshold=0.0, top_k=3
    )
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    sizes = [Image.open(p).size for p in paths]
    assert all(w == 4 * 512 + 5 * 8 and h >= 512 for w, h in sizes)
    contact_size = Image.open(contact).size
    assert contact_size[0] == sizes[0][0] and contact_size[1] > sum(h for _, h in sizes)  # both sheets under a title


def test_visualize_command_upscales_and_limits_detections(synthetic_dataset, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pth", tiny_config(num_classes=7))
    image = sorted((synthetic_dataset / "images").iterdir())[0]
    args = [
        "visualize",
        "--weights",
        str(ckpt),
        "--images",
        str(image),
        "--output",
        str(tmp_path / "viz"),
        "--score-threshold",
        "0",
        "--top-k",
        "2",
    ]
    assert main(args + ["--class-agnostic-nms"]) == 0
    out = Image.open(tmp_path / "viz" / f"{image.stem}.png")
    assert out.size == (512, 512)  # the 128-px image, 4x
    assert main(args + ["--scale", "2"]) == 0
    assert Image.open(tmp_path / "viz" / f"{image.stem}.png").size == (256, 256)
