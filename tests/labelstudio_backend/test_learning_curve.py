"""The simulated annotation loop (boxteacher benchmark learning-curve) on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from PIL import Image
from pycocotools import mask as mask_utils

from labelstudio_backend.fit import not_worse
from labelstudio_backend.learning_curve import filled_box_iou, format_markdown, run_learning_curve, write_box_subset


def test_box_subsets_drop_masks_and_keep_the_held_out_split(synthetic_dataset: Path, tmp_path: Path) -> None:
    out = write_box_subset(synthetic_dataset, tmp_path / "sub", [3, 1])
    train = json.loads((out / "annotations" / "train.json").read_text())
    assert sorted(im["id"] for im in train["images"]) == [1, 3]
    assert train["annotations"] and all("segmentation" not in a and a["image_id"] in (1, 3) for a in train["annotations"])
    val = json.loads((out / "annotations" / "val.json").read_text())
    assert val == json.loads((synthetic_dataset / "annotations" / "val.json").read_text())
    assert (out / "images").resolve() == (synthetic_dataset / "images").resolve()


def test_filled_box_iou_against_rle_masks(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "images" / "a.png")

    def rle(rows: slice) -> dict:
        mask = np.zeros((10, 10), np.uint8, order="F")
        mask[rows, 2:6] = 1
        encoded = mask_utils.encode(mask)
        return {"size": encoded["size"], "counts": encoded["counts"].decode()}

    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 4, 4], "area": 16, "iscrowd": 0}
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "annotations" / "val.json").write_text(json.dumps(dict(coco, annotations=[dict(ann, segmentation=rle(slice(2, 6)))])))
    assert filled_box_iou(tmp_path) == 1.0  # the mask is its box
    (tmp_path / "annotations" / "val.json").write_text(json.dumps(dict(coco, annotations=[dict(ann, segmentation=rle(slice(2, 4)))])))
    assert filled_box_iou(tmp_path) == 0.5  # the top half of its box


def test_rounds_grow_nested_subsets_and_promote_by_the_rule(synthetic_dataset: Path, tmp_path: Path) -> None:
    result = run_learning_curve(
        synthetic_dataset,
        str(REPO / "configs" / "synthetic-tiny.yaml"),
        [4, 8],
        tmp_path / "curve",
        initial_iters=2,
        fit_iters=1,
        overrides=["method=boxteacher", "solver.batch_size=2", "solver.steps=[]", "solver.warmup_iters=1"],
    )
    first, second = result["rounds"]
    assert (first["round"], first["images"], second["round"], second["images"]) == (0, 4, 1, 8)
    ids = [
        {im["id"] for im in json.loads((tmp_path / "curve" / d / "data/annotations/train.json").read_text())["images"]}
        for d in ("round0-4", "round1-8")
    ]
    assert len(ids[0]) == 4 and len(ids[1]) == 8 and ids[0] < ids[1]  # the boxed images of round 0 stay
    # the fit round's decision is the backend's rule on the served and the new model
    better, why = not_worse(first["serving"], second["new"])
    assert second["promoted"] is better and second["decision"] == why
    assert second["serving"] == (second["new"] if better else first["serving"])
    assert Path(second["checkpoint"]).is_file()
    assert 0 < result["filled_box_iou"] <= 1
    assert json.loads((tmp_path / "curve" / "learning_curve.json").read_text()) == json.loads(json.dumps(result))
    table = format_markdown(result)
    assert table.count("\n| ") == 3  # header + two rounds


def test_round_sizes_must_grow(synthetic_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must grow"):
        run_learning_curve(synthetic_dataset, "configs/synthetic-tiny.yaml", [8, 4], tmp_path, 1, 1)
    with pytest.raises(ValueError, match="fewer than 99"):
        run_learning_curve(synthetic_dataset, "configs/synthetic-tiny.yaml", [4, 99], tmp_path, 1, 1)
