"""pseudo_label_image (training/pseudo_label.py) by hand: one box, a model whose views (the
image and its mirror, at the test scale and at twice it) are written out, so the merged mask
and its score are known."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_config
from pycocotools import mask as mask_utils

from training.model.condinst import InputDetections
from training.model.fcos import Detections
from training.pseudo_label import pseudo_label_image

H, W = 8, 10
BOX = [2.0, 1.0, 8.0, 7.0]  # xyxy, its own mirror in a 10 px wide image: cols 2..7, rows 1..6
# Per (shorter side, mirrored): the detection score and the mask's values on cols 2..4 and 5..7
# of rows 1..6, in that view's own frame (a mirrored view's cols 2..4 are the image's 5..7).
VIEWS = {
    (8, False): (0.9, 0.9, 0.45),
    (8, True): (0.7, 0.65, 0.7),
    (16, False): (0.6, 0.5, 0.2),
    (16, True): (0.8, 0.3, 0.5),
}


def _detection(side: int, mirrored: bool) -> InputDetections:
    """BOX and the mask of VIEWS[(side, mirrored)] at an input of side x 1.25 side, stride 1."""
    det_score, left, right = VIEWS[(side, mirrored)]
    f = side // H
    mask = torch.zeros(1, H, W)
    mask[0, 1:7, 2:5], mask[0, 1:7, 5:8] = left, right
    mask = mask.repeat_interleave(f, 1).repeat_interleave(f, 2)  # bilinear back to 8x10 gives it again
    dets = Detections(
        boxes=torch.tensor([BOX]) * f, det_scores=torch.tensor([det_score]), labels=torch.zeros(1, dtype=torch.int64),
        locations=torch.zeros(1, 2), levels=torch.zeros(1, dtype=torch.int64), params=torch.zeros(1, 1), valid=torch.ones(1, dtype=torch.bool),
    )  # fmt: skip
    return InputDetections(dets, mask, torch.tensor([0.9]), torch.tensor([0.5]), (side, W * f))


class WrittenViews:
    """A stand-in CondInst (preprocess, forward, detect) whose detections are VIEWS. With one
    image, a forward's inputs are the image and then, when flipped, its mirror."""

    def __init__(self):
        self.cfg = tiny_config(overrides=["model.mask.out_stride=1", "input.min_size_test=8", "input.max_size_test=20"])
        self.device = torch.device("cpu")
        self.seen: list[list[torch.Tensor]] = []  # the inputs of each forward

    def preprocess(self, images):
        self.seen.append(list(images))
        return images, [tuple(im.shape[-2:]) for im in images]

    def __call__(self, images):
        return None, images

    def detect(self, head, images, sizes):
        return [_detection(hw[0], mirrored=k == 1) for k, hw in enumerate(sizes)]


ANN = {"id": 5, "image_id": 1, "category_id": 1, "bbox": [2.0, 1.0, 6.0, 6.0], "area": 36.0, "iscrowd": 0}


def _columns(segmentation: dict) -> list[int]:
    mask = mask_utils.decode(segmentation)
    assert mask.shape == (H, W) and mask[1:7].any(0).tolist() == mask.any(0).tolist()
    return [c for c in range(W) if mask[:, c].any()]


@pytest.mark.parametrize(
    "flip, extra_sizes, columns, score",
    [
        # the test scale alone: cols 2..4 (0.9), 0.45 stays out; s = sqrt(c * m_bar)
        (False, [], [2, 3, 4], math.sqrt(0.9 * 0.9)),
        # and its mirror: cols 2..4 (0.9 + 0.7) / 2 = 0.8, cols 5..7 (0.45 + 0.65) / 2 = 0.55;
        # c = (0.9 + 0.7) / 2, m_bar = (18 * 0.8 + 18 * 0.55) / 36
        (True, [], [2, 3, 4, 5, 6, 7], math.sqrt(0.8 * 0.675)),
        # the test scale and twice it: cols 2..4 (0.9 + 0.5) / 2 = 0.7, cols 5..7 (0.45 + 0.2) / 2
        (False, [16], [2, 3, 4], math.sqrt(0.75 * 0.7)),
        # four views: cols 2..4 (0.9 + 0.7 + 0.5 + 0.5) / 4 = 0.65, cols 5..7 (0.45 + 0.65 + 0.2 + 0.3) / 4 = 0.4;
        # c = (0.9 + 0.7 + 0.6 + 0.8) / 4
        (True, [16], [2, 3, 4], math.sqrt(0.75 * 0.65)),
    ],
    ids=["one-view", "flip", "two-scales", "flip-two-scales"],
)
def test_pseudo_label_image_merges_the_mirrored_and_rescaled_views(flip, extra_sizes, columns, score):
    model, image = WrittenViews(), torch.randint(0, 255, (3, H, W), dtype=torch.uint8)
    (pseudo,), unmatched = pseudo_label_image(model, image, [ANN], flip=flip, extra_sizes=extra_sizes)
    assert unmatched == []
    # one forward per scale, over the image and (flip) its mirror
    assert [[tuple(im.shape[-2:]) for im in inputs] for inputs in model.seen] == [
        [(side, side * W // H)] * (2 if flip else 1) for side in [8, *extra_sizes]
    ]
    assert torch.equal(model.seen[0][0], image) and (not flip or torch.equal(model.seen[0][1], image.flip(-1)))
    assert _columns(pseudo["segmentation"]) == columns and pseudo["area"] == 6.0 * len(columns)
    assert pseudo["score"] == pytest.approx(score, abs=1e-6)
    written = ("segmentation", "area", "score", "pseudo")
    assert {k: v for k, v in pseudo.items() if k not in written} == {k: v for k, v in ANN.items() if k not in written}


def test_a_box_no_view_matches_is_unmatched():
    model, image = WrittenViews(), torch.randint(0, 255, (3, H, W), dtype=torch.uint8)
    far = {**ANN, "id": 6, "bbox": [0.0, 0.0, 2.0, 1.0]}  # IoU with BOX 0
    pseudo, unmatched = pseudo_label_image(model, image, [ANN, far], flip=True, extra_sizes=[16])
    assert [p["id"] for p in pseudo] == [5] and unmatched == [6]
