"""Synthetic shapes: deterministic bytes, valid COCO, exact masks, non-convex
classes, colour contrast at object edges, and the reader on top."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from training.data.coco import CocoInstances
from training.data.synthetic import SHAPES, make_synthetic

SIZE = 64
# pycocotools decode under NumPy 2 (its code, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:.*copy keyword:DeprecationWarning")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "shapes", train=24, val=4, size=SIZE, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _annotations(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def test_same_arguments_give_identical_bytes(synthetic: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", train=24, val=4, size=SIZE, seed=3)
    assert _files(again) == _files(synthetic)
    other = make_synthetic(tmp_path / "other", train=24, val=4, size=SIZE, seed=4)
    assert _files(other)["images/000001.png"] != _files(synthetic)["images/000001.png"]


def test_layout_and_ids(synthetic: Path) -> None:
    train, val = _annotations(synthetic, "train"), _annotations(synthetic, "val")
    assert [i["id"] for i in train["images"]] == list(range(1, 25))
    assert [i["id"] for i in val["images"]] == [25, 26, 27, 28]
    assert [c["name"] for c in train["categories"]] == list(SHAPES)
    assert [c["id"] for c in train["categories"]] == list(range(1, len(SHAPES) + 1))
    for info in train["images"] + val["images"]:
        with Image.open(synthetic / "images" / info["file_name"]) as pil:
            assert pil.mode == "RGB" and pil.size == (SIZE, SIZE) == (info["width"], info["height"])
    per_image = np.bincount([a["image_id"] for a in train["annotations"]], minlength=25)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6


def test_masks_are_exact_visible_parts_matching_bbox_and_area(synthetic: Path) -> None:
    coco = COCO(str(synthetic / "annotations" / "train.json"))
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        cover = np.zeros((SIZE, SIZE), dtype=np.int64)
        for ann in anns:
            assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            assert len(xs) >= 24 and ann["area"] == mask.sum()
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["bbox"] == mask_utils.toBbox(ann["segmentation"]).tolist()
            cover += mask
        assert cover.max() == 1  # visible parts never overlap


def test_object_sizes_span_the_requested_range(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "sizes", train=40, val=0, size=128, seed=0)
    discs = [a["bbox"] for a in _annotations(root)["annotations"] if a["category_id"] == SHAPES.index("disc") + 1]
    sides = [max(w, h) / 128 for _, _, w, h in discs]
    assert min(sides) < 0.2 and max(sides) > 0.4 and max(sides) <= 0.61


def test_non_convex_classes_fill_clearly_less_than_their_box(synthetic: Path) -> None:
    fill: dict[str, list[float]] = {name: [] for name in SHAPES}
    for ann in _annotations(synthetic)["annotations"]:
        _, _, w, h = ann["bbox"]
        fill[SHAPES[ann["category_id"] - 1]].append(ann["area"] / (w * h))
    for name in ("ring", "crescent", "star", "cross"):
        assert fill[name], f"no {name} in the sample"
        assert np.median(fill[name]) < 0.7, name
    assert np.median(fill["disc"]) > 0.7  # pi / 4 when unoccluded


def test_objects_contrast_with_their_surroundings(synthetic: Path) -> None:
    coco = COCO(str(synthetic / "annotations" / "train.json"))
    distances = []
    for image_id in coco.getImgIds():
        pixels = np.asarray(Image.open(synthetic / "images" / coco.imgs[image_id]["file_name"]), dtype=np.float64)
        for ann in coco.imgToAnns[image_id]:
            mask = coco.annToMask(ann).astype(bool)
            grown = mask.copy()  # 1-pixel ring outside the visible mask
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            ring = grown & ~mask
            distances.append(np.linalg.norm(pixels[mask].mean(0) - pixels[ring].mean(0)))
    # Random colours would give ~70 at the 10th percentile and ~40 at the minimum.
    assert np.percentile(distances, 10) > 90 and min(distances) > 50


def test_reader_reads_synthetic(synthetic: Path) -> None:
    ds = CocoInstances(synthetic, "val", with_masks=True)
    assert len(ds) == 4 and ds.class_names == list(SHAPES) and ds.num_skipped == 0
    image, target = ds[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
    for mask, box in zip(target["masks"], target["boxes"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_synthetic(tmp_path, train=-1)
    with pytest.raises(ValueError):
        make_synthetic(tmp_path, size=8)
