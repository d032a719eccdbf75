"""COCO evaluation: ground truth fed back as predictions scores AP 100; the
metrics.json contract; the box-fill baseline; overlays."""

from __future__ import annotations

import json

import torch

from conftest import write_checkpoint, tiny_config
from training.cli import main
from training.data.coco import CocoInstances
from training.evaluate import METRIC_NAMES, box_fill_masks, coco_metrics, instances_to_coco
from training.model.condinst import Instances


def _gt_instances(dataset: CocoInstances, i: int) -> tuple[int, Instances]:
    image, target = dataset[i]
    n = target["labels"].shape[0]
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    ones = torch.ones(n)
    inst = Instances(target["boxes"].as_subclass(torch.Tensor), target["labels"], ones, ones, masks, ones)
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


def test_box_fill_masks_by_hand():
    m = box_fill_masks(torch.tensor([[1.0, 0.0, 3.0, 2.0]]), 3, 4)
    # pixel centres x+0.5 in [1,3] -> columns 1,2; y+0.5 in [0,2] -> rows 0,1
    assert m[0].int().tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_empty_results_give_zero_ap(synthetic_dataset):
    dataset = CocoInstances(synthetic_dataset, "val")
    assert coco_metrics(dataset.coco, [], "segm", dataset.image_ids) == {k: 0.0 for k in METRIC_NAMES}


def test_eval_and_visualize_commands(synthetic_dataset, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pth", tiny_config(num_classes=7))
    assert main(["eval", "--weights", str(ckpt), "--data", str(synthetic_dataset), "--output", str(tmp_path / "ev"), "--max-images", "3"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["segm"]) == set(METRIC_NAMES) and set(metrics["bbox"]) == set(METRIC_NAMES)
    assert main(["visualize", "--weights", str(ckpt), "--images", str(synthetic_dataset / "images"), "--output", str(tmp_path / "viz")]) == 0
    pngs = list((tmp_path / "viz").glob("*.png"))
    assert len(pngs) == len(list((synthetic_dataset / "images").iterdir()))


def test_eval_reports_missing_checkpoint_clearly(tmp_path, capsys):
    assert main(["eval", "--weights", str(tmp_path / "nope.pth"), "--data", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_pseudo_label_command_writes_one_mask_per_matched_box(synthetic_dataset, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    ckpt = write_checkpoint(tmp_path / "m.pth", tiny_config(num_classes=7))
    out = tmp_path / "ann.json"
    assert main(["pseudo-label", "--weights", str(ckpt), "--data", str(synthetic_dataset), "--split", "val", "--output", str(out)]) == 0
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
