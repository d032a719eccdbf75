"""The three box-rasterising rules of training/model/boxes.py, by hand and side by side."""

from __future__ import annotations

import numpy as np
import torch

import training.evaluate
import training.losses
from training.model.boxes import box_fill_masks, box_masks, box_pixel_bounds, box_pixel_masks


def test_training_modules_re_export_the_one_definition():
    assert training.losses.box_masks is box_masks
    assert training.evaluate.box_fill_masks is box_fill_masks


def test_the_three_rules_differ_where_the_docstring_says():
    # rows of a 1-pixel-wide box from y1 = 1.0 to y2 (columns 0..1), on a 6x2 image
    def rows(y2: float) -> dict[str, list[int]]:
        b = torch.tensor([[0.0, 1.0, 1.0, y2]])
        return {
            "boxinst": box_masks(b, 6, 2, stride=1)[0, :, 0].nonzero().flatten().tolist(),
            "fill": box_fill_masks(b, 6, 2)[0, :, 0].nonzero().flatten().tolist(),
            "pixel": box_pixel_masks(b, 6, 2)[0, :, 0].nonzero().flatten().tolist(),
        }

    # integer edge y2 = 3: BoxInst slices int(1):int(4) -> rows 1..3; centres 1.5, 2.5 <= 3 -> rows 1, 2;
    # touched pixels floor(1) <= r < ceil(3) -> rows 1, 2
    assert rows(3.0) == {"boxinst": [1, 2, 3], "fill": [1, 2], "pixel": [1, 2]}
    # y2 = 3.2: BoxInst int(4.2) = 4 -> rows 1..3; centre 3.5 > 3.2 -> rows 1, 2; ceil(3.2) = 4 -> rows 1..3
    assert rows(3.2) == {"boxinst": [1, 2, 3], "fill": [1, 2], "pixel": [1, 2, 3]}
    # y2 = 3.6: centre 3.5 <= 3.6 -> the fill rule takes row 3 too
    assert rows(3.6) == {"boxinst": [1, 2, 3], "fill": [1, 2, 3], "pixel": [1, 2, 3]}


def test_box_fill_masks_by_hand():
    m = box_fill_masks(torch.tensor([[1.0, 0.0, 3.0, 2.0]]), 3, 4)
    # pixel centres x+0.5 in [1,3] -> columns 1,2; y+0.5 in [0,2] -> rows 0,1
    assert m[0].int().tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_box_pixel_masks_cover_the_pixels_a_box_touches():
    m = box_pixel_masks(torch.tensor([[1.5, 2.0, 4.0, 3.2]]), 5, 6)[0]
    expected = np.zeros((5, 6), bool)
    expected[2:4, 1:4] = True
    assert np.array_equal(m.numpy(), expected)


def test_box_pixel_bounds_are_the_window_of_box_pixel_masks():
    boxes = torch.tensor([[1.5, 2.0, 4.0, 3.2], [-3.0, 0.2, 2.5, 9.0], [0.0, 0.0, 6.0, 5.0]])
    # floor / ceil, then clipped to the 6 x 5 image
    assert box_pixel_bounds(boxes, 5, 6).tolist() == [[1, 2, 4, 4], [0, 0, 3, 5], [0, 0, 6, 5]]
    for (x0, y0, x1, y1), m in zip(box_pixel_bounds(boxes, 5, 6).tolist(), box_pixel_masks(boxes, 5, 6)):
        window = np.zeros((5, 6), bool)
        window[y0:y1, x0:x1] = True
        assert np.array_equal(m.numpy(), window)
