"""Transforms: the resize rule on hand-computed sizes, exact flips, boxes and
masks following the image, and the student's photometric recipes."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from training.data.transforms import (
    STRONG_AUGMENTATION_KINDS,
    build_strong_augmentation,
    build_test_transforms,
    build_train_transforms,
    resize_shortest_edge_size,
)


@pytest.mark.parametrize(
    ("h", "w", "short", "max_size", "expected"),
    [
        (480, 640, 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67
        (640, 480, 800, 1333, (1067, 800)),
        (100, 1000, 800, 1333, (133, 1333)),  # capped: 100 * 1333 / 1000 = 133.3
        (800, 800, 800, 1333, (800, 800)),
        (1000, 2000, 600, 1000, (500, 1000)),  # 1200 > 1000: long side capped
        (3, 5, 4, 100, (4, 7)),  # 5 * 4 / 3 = 6.67 rounds up
        (128, 128, 64, 64, (64, 64)),
    ],
)
def test_resize_rule(h: int, w: int, short: int, max_size: int, expected: tuple[int, int]) -> None:
    assert resize_shortest_edge_size(h, w, short, max_size) == expected


def test_resize_rule_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        resize_shortest_edge_size(0, 10, 800, 1333)


def _sample(h: int, w: int, box: list[float]) -> tuple[tv_tensors.Image, dict]:
    """Random uint8 image, one box and the filled-box mask."""
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    mask[0, y1:y2, x1:x2] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([box]), format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(mask),
        "labels": torch.tensor([2]),
        "image_id": 5,
    }
    return image, target


def test_test_transform_scales_image_boxes_and_masks_together() -> None:
    image, target = _sample(480, 640, [64.0, 48.0, 320.0, 240.0])
    out, t = build_test_transforms(800, 1333)(image, target)
    assert out.shape == (3, 800, 1067) and out.dtype == torch.uint8
    assert tuple(t["boxes"].canvas_size) == (800, 1067) and t["masks"].shape == (1, 800, 1067)
    sx, sy = 1067 / 640, 800 / 480
    assert torch.allclose(t["boxes"], torch.tensor([[64 * sx, 48 * sy, 320 * sx, 240 * sy]]))
    ys, xs = torch.nonzero(t["masks"][0], as_tuple=True)
    mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert (mask_box - t["boxes"][0]).abs().max() <= 1.0
    assert t["labels"].tolist() == [2] and t["image_id"] == 5


def test_capped_resize_on_a_wide_image() -> None:
    image, target = _sample(100, 1000, [0.0, 0.0, 1000.0, 100.0])
    out, t = build_test_transforms(800, 1333)(image, target)
    assert out.shape == (3, 133, 1333)
    assert torch.allclose(t["boxes"], torch.tensor([[0.0, 0.0, 1333.0, 133.0]]))


def test_flip_moves_boxes_exactly() -> None:
    image, target = _sample(30, 40, [5.0, 6.0, 15.0, 20.0])
    flip = build_train_transforms([30], 1333, hflip_prob=1.0)  # short side already 30: no resize
    out, t = flip(image, target)
    assert t["boxes"].tolist() == [[40 - 15, 6, 40 - 5, 20]]
    assert torch.equal(out, image.flip(-1))
    assert torch.equal(t["masks"], target["masks"].flip(-1))
    out, t = build_train_transforms([30], 1333, hflip_prob=0.0)(image, target)
    assert torch.equal(out, image) and t["boxes"].tolist() == [[5, 6, 15, 20]]


def test_multi_scale_draws_every_listed_short_side() -> None:
    image, target = _sample(30, 40, [5.0, 6.0, 15.0, 20.0])
    transform = build_train_transforms([20, 60], 1333)
    torch.manual_seed(0)
    seen = {tuple(transform(image, target)[0].shape[-2:]) for _ in range(30)}
    assert seen == {(20, 27), (60, 80)}  # 40 * 20 / 30 = 26.67 -> 27


def test_unknown_augmentation_kind_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="strongv2"):
        build_strong_augmentation("heavy")


def test_strong_augmentation_recipes() -> None:
    strong = build_strong_augmentation("strong")
    jitter_apply, gray = strong.transforms
    assert jitter_apply.p == 0.8 and gray.p == 0.2
    jitter = jitter_apply.transforms[0]
    assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
    assert jitter.saturation == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
    blur_apply = build_strong_augmentation("strongv2").transforms[-1]
    assert blur_apply.p == 0.5
    blur = blur_apply.transforms[0]
    assert list(blur.kernel_size) == [3, 3] and list(blur.sigma) == [0.1, 2.0]
    (weak,) = build_strong_augmentation("weak").transforms
    assert weak.p == 0.2 and weak.transforms[0].brightness == (0.8, 1.2)
    assert isinstance(build_strong_augmentation("none"), v2.Identity)


@pytest.mark.parametrize("kind", STRONG_AUGMENTATION_KINDS)
def test_augmentation_keeps_uint8_shape_and_changes_colours_only(kind: str) -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8)
    augment = build_strong_augmentation(kind)
    outputs = [augment(image) for _ in range(20)]
    assert all(o.dtype == torch.uint8 and o.shape == image.shape for o in outputs)
    changed = sum(not torch.equal(o, image) for o in outputs)
    if kind == "none":
        assert changed == 0
    elif kind == "weak":
        assert 0 < changed < 20  # applied with p = 0.2
    else:
        assert changed >= 10  # jitter applied with p = 0.8
