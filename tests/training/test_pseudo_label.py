"""pseudo_label_image (training/pseudo_label.py) by hand: one box, a model whose two views
(the image and its mirror) are written out, so the merged mask and its score are known."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_config
from pycocotools import mask as mask_utils

from training.model.condinst import Instances
from training.pseudo_label import pseudo_label_image

H, W = 8, 10
BOX = [2.0, 1.0, 8.0, 7.0]  # xyxy, its own mirror in a 10 px wide image: cols 2..7, rows 1..6


def _instances(probs: torch.Tensor, det_score: float) -> Instances:
    return Instances(
        boxes=torch.tensor([BOX]), labels=torch.zeros(1, dtype=torch.int64), det_scores=torch.tensor([det_score]),
        scores=torch.tensor([0.9]), masks=probs > 0.5, mean_mask_prob=torch.tensor([0.5]), mask_probs=probs,
    )  # fmt: skip


class TwoViews:
    """predict() -> the plain view, and the mirrored view when given the image mirrored."""

    def __init__(self):
        self.cfg = tiny_config()
        self.seen: list[torch.Tensor] = []
        plain = torch.zeros(1, H, W)
        plain[0, 1:7, 2:5], plain[0, 1:7, 5:8] = 0.9, 0.45
        mirrored = torch.zeros(1, H, W)  # in the mirrored image: cols 2..4 are the plain view's 5..7
        mirrored[0, 1:7, 2:5], mirrored[0, 1:7, 5:8] = 0.65, 0.7
        self.views = [_instances(plain, 0.9), _instances(mirrored, 0.7)]

    def predict(self, images, return_probs=False):
        assert return_probs
        self.seen = list(images)
        return self.views[: len(images)]


ANN = {"id": 5, "image_id": 1, "category_id": 1, "bbox": [2.0, 1.0, 6.0, 6.0], "area": 36.0, "iscrowd": 0}


def _columns(segmentation: dict) -> list[int]:
    mask = mask_utils.decode(segmentation)
    assert mask.shape == (H, W) and mask[1:7].any(0).tolist() == mask.any(0).tolist()
    return [c for c in range(W) if mask[:, c].any()]


@pytest.mark.parametrize("flip", [False, True])
def test_pseudo_label_image_with_and_without_the_mirrored_view(flip):
    model, image = TwoViews(), torch.randint(0, 255, (3, H, W), dtype=torch.uint8)
    (pseudo,), unmatched = pseudo_label_image(model, image, [ANN], flip=flip)
    assert unmatched == []
    if flip:
        assert len(model.seen) == 2 and torch.equal(model.seen[1], image.flip(-1))
        # cols 2..4: (0.9 + 0.7) / 2 = 0.8; cols 5..7: (0.45 + 0.65) / 2 = 0.55 > 0.5
        assert _columns(pseudo["segmentation"]) == [2, 3, 4, 5, 6, 7] and pseudo["area"] == 36.0
        # s = sqrt(c * m_bar), c = (0.9 + 0.7) / 2, m_bar = (18 * 0.8 + 18 * 0.55) / 36
        assert pseudo["score"] == pytest.approx(math.sqrt(0.8 * 0.675), abs=1e-6)
    else:
        assert len(model.seen) == 1
        assert _columns(pseudo["segmentation"]) == [2, 3, 4] and pseudo["area"] == 18.0  # 0.45 stays out
        assert pseudo["score"] == pytest.approx(math.sqrt(0.9 * 0.9), abs=1e-6)
