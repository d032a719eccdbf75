"""COCO evaluation: ground truth fed back as predictions scores AP 100; the
metrics.json contract; the box-fill baseline; overlays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_config, write_checkpoint

from training.cli import main
from training.data.coco import CocoInstances
from training.evaluate import METRIC_NAMES, coco_metrics, instances_to_coco
from training.model.condinst import Instances


def _gt_instances(dataset: CocoInstances, i: int) -> tuple[int, Instances]:
    image, target = dataset[i]
    n = target["labels"].shape[0]
    masks = target["masks"].bool()
    ones = torch.ones(n)
    inst = Instances(target["boxes"], target["labels"], ones, ones, masks, ones)
    return int(target["image_id"]), inst


def test_ground_truth_as_predictions_gives_ap_100(synthetic_dataset):
    dataset = CocoInstances(synthetic_dataset, "val", with_masks=True)
    bbox, segm, ids = [], [], []
    for i in range(len(dataset)):
        image_id, inst = _gt_instances(dataset, i)
        b, s = instances_to_coco(inst, image_id, dataset.label_to_category_id)
        bbox += b
        segm += s
        ids.append(image_id)
    segm_m = coco_metrics(dataset.coco, segm, "segm", ids)
    bbox_m = coco_metrics(dataset.coco, bbox, "bbox", ids)
    assert segm_m["AP"] == 100.0 and segm_m["AP50"] == 100.0 and segm_m["AP75"] == 100.0
    assert bbox_m["AP"] == 100.0
    # Box-filled masks of non-convex shapes are far from AP 100.
    boxfill = []
    for i in range(len(dataset)):
        image_id, inst = _gt_instances(dataset, i)
        boxfill += instances_to_coco(inst, image_id, dataset.label_to_category_id, mask_mode="box")[1]
    assert coco_metrics(dataset.coco, boxfill, "segm", ids)["AP"] < 60.0


def test_empty_results_give_zero_ap(synthetic_dataset):
    dataset = CocoInstances(synthetic_dataset, "val")
    assert coco_metrics(dataset.coco, [], "segm", dataset.image_ids) == {k: 0.0 for k in METRIC_NAMES}


def test_eval_and_visualize_commands(synthetic_dataset, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pth", tiny_config(num_classes=7))
    assert (
        main(["eval", "--weights", str(ckpt), "--data", str(synthetic_dataset), "--output", str(tmp_path / "ev"), "--max-images", "3"]) == 0
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["segm"]) == set(METRIC_NAMES) and set(metrics["bbox"]) == set(METRIC_NAMES)
    assert (
        main(["visualize", "--weights", str(ckpt), "--images", str(synthetic_dataset / "images"), "--output", str(tmp_path / "viz")]) == 0
    )
    pngs = list((tmp_path / "viz").glob("*.png"))
    assert len(pngs) == len(list((synthetic_dataset / "images").iterdir()))


def test_eval_class_agnostic_nms_flag_overrides_the_checkpoint(synthetic_dataset, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pth", tiny_config(num_classes=7))  # class_agnostic_nms: False (the default)
    base = ["eval", "--weights", str(ckpt), "--data", str(synthetic_dataset), "--max-images", "1"]
    for flag, expected in ((None, False), ("--class-agnostic-nms", True), ("--no-class-agnostic-nms", False)):
        out = tmp_path / str(flag)
        assert main(base + ["--output", str(out)] + ([flag] if flag else [])) == 0
        assert json.loads((out / "metrics.json").read_text())["class_agnostic_nms"] is expected


def test_eval_reports_missing_checkpoint_clearly(tmp_path, capsys):
    assert main(["eval", "--weights", str(tmp_path / "nope.pth"), "--data", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_pseudo_label_command_writes_one_mask_per_matched_box(synthetic_dataset, tmp_path, capsys):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    ckpt = write_checkpoint(tmp_path / "m.pth", tiny_config(num_classes=7))
    out = tmp_path / "ann.json"
    assert main(["pseudo-label", "--weights", str(ckpt), "--data", str(synthetic_dataset), "--split", "val", "--output", str(out)]) == 0
    assert "against the split's true masks" in capsys.readouterr().out  # the synthetic split has masks
    result = json.loads(out.read_text())
    gt = COCO(str(synthetic_dataset / "annotations" / "val.json"))
    assert len(result["images"]) == len(gt.getImgIds())
    ids = [a["id"] for a in result["annotations"]]
    assert ids, "the conditioned model matches some boxes at IoU >= 0.5"
    assert len(ids) == len(set(ids))  # at most one pseudo mask per GT box
    for ann in result["annotations"]:
        src = gt.anns[ann["id"]]
        assert ann["bbox"] == src["bbox"] and ann["category_id"] == src["category_id"] and 0 <= ann["score"] <= 1
        m = mask_utils.decode(ann["segmentation"])
        ys, xs = m.nonzero()
        x, y, w, h = src["bbox"]
        assert xs.min() >= int(x) and xs.max() <= int(x + w) and ys.min() >= int(y) and ys.max() <= int(y + h)


def test_pseudo_mask_quality_against_hidden_true_masks(tmp_path):
    """Hand-made: A (4x4 square) gets a pseudo mask of its top half -> IoU 8/16 = 0.5;
    B (its 4x2 box minus two corners: 6 px) gets none -> 0. Box fill: A 1, B 6/8."""
    from PIL import Image

    from training.evaluate import encode_mask
    from training.pseudo_label import pseudo_mask_quality

    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    a = np.zeros((8, 8), bool)
    a[0:4, 0:4] = True
    b = np.zeros((8, 8), bool)
    b[4:6, 4:8] = True
    b[4, 4] = b[5, 7] = False
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 16, "bbox": [0, 0, 4, 4], "segmentation": encode_mask(a)},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 6, "bbox": [4, 4, 4, 2], "segmentation": encode_mask(b)},
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(coco))
    half = np.zeros((8, 8), bool)
    half[0:2, 0:4] = True
    pseudo = {"images": coco["images"], "annotations": [dict(anns[0], segmentation=encode_mask(half), score=0.9)]}

    q = pseudo_mask_quality(pseudo, tmp_path, "train")
    assert q == pytest.approx({"boxes": 2.0, "coverage": 0.5, "matched_iou": 0.5, "mean_iou": 0.25, "boxfill_iou": 0.875})

    for ann in coco["annotations"]:  # a box-only split: nothing to compare with
        ann.pop("segmentation")
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(coco))
    assert pseudo_mask_quality(pseudo, tmp_path, "train") is None
