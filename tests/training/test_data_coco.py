"""COCO reader: a hand-made 4-image dataset whose boxes, labels and masks can be
checked by eye, plus load_image's format handling and the Penn-Fudan set."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from training.data.coco import CocoInstances, _count_is_reported, collate, load_image

H, W = 30, 40
RECT_RLE = np.zeros((H, W), dtype=np.uint8)
RECT_RLE[10:20, 20:35] = 1  # ann 11: compressed RLE, box xyxy [20, 10, 35, 20]
BLOCK_RLE = np.zeros((H, W), dtype=np.uint8)
BLOCK_RLE[25:27, 2:5] = 1  # ann 12: uncompressed RLE, box xyxy [2, 25, 5, 27]
EXPECTED_BOXES = [[5, 5, 15, 15], [20, 10, 35, 20], [2, 25, 5, 27], [30, 20, 40, 30]]
EXPECTED_LABELS = [0, 1, 1, 0]  # category 3 -> 0, category 7 -> 1


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major run lengths starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture()
def tiny_coco(tmp_path: Path) -> Path:
    """Images: 1 a.png (40x30 RGB, 4 usable instances), 2 b.png (a text file),
    3 c.png (missing), 4 d.png (20x10 grayscale, no annotations)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(W, dtype=np.uint8)[None, :]  # red = column index
    Image.fromarray(pixels).save(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "b.png").write_text("not an image")
    Image.fromarray(np.full((10, 20), 77, dtype=np.uint8)).save(tmp_path / "images" / "d.png")
    compressed = mask_utils.encode(np.asfortranarray(RECT_RLE))
    compressed["counts"] = compressed["counts"].decode("ascii")
    poly = {"segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]], "bbox": [5, 5, 10, 10]}
    anns = [
        {"id": 10, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 100, **poly},
        {"id": 11, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 150,
         "segmentation": compressed, "bbox": [20, 10, 15, 10]},
        {"id": 12, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 6,
         "segmentation": _uncompressed_rle(BLOCK_RLE), "bbox": [2, 25, 3, 2]},
        {"id": 13, "image_id": 1, "category_id": 3, "iscrowd": 1, "area": 1200,
         "segmentation": _uncompressed_rle(np.ones((H, W), np.uint8)), "bbox": [0, 0, 40, 30]},
        {"id": 14, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 0,
         "segmentation": [[1, 1, 1, 6, 1, 1]], "bbox": [1, 1, 0, 5]},
        {"id": 15, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 81,
         "segmentation": [[30, 20, 39, 20, 39, 29, 30, 29]], "bbox": [30, 20, 20, 20]},  # past the border
        {"id": 20, "image_id": 2, "category_id": 3, "iscrowd": 0, "area": 4,
         "segmentation": [[0, 0, 2, 0, 2, 2]], "bbox": [0, 0, 2, 2]},
    ]  # fmt: skip
    coco = {
        "images": [
            {"id": 4, "file_name": "d.png", "height": 10, "width": 20},
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
            {"id": 3, "file_name": "c.png", "height": H, "width": W},
        ],
        "annotations": anns,
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(coco))
    return tmp_path


def _open(root: Path, **kwargs) -> CocoInstances:
    with pytest.warns(RuntimeWarning, match="c.png"):
        return CocoInstances(root, "train", **kwargs)


def test_categories_map_to_contiguous_labels_and_back(tiny_coco: Path) -> None:
    ds = _open(tiny_coco)
    assert ds.class_names == ["three", "seven"]
    assert ds.label_to_category_id == [3, 7]
    assert ds.category_id_to_label == {3: 0, 7: 1}


def test_class_agnostic_maps_everything_to_label_zero(tiny_coco: Path) -> None:
    ds = _open(tiny_coco, class_agnostic=True)
    assert ds.class_names == ["object"]
    assert ds.label_to_category_id == [3]
    assert ds.category_id_to_label == {3: 0, 7: 0}
    assert ds[0][1]["labels"].tolist() == [0, 0, 0, 0]


def test_boxes_are_xyxy_without_crowd_or_empty_boxes(tiny_coco: Path) -> None:
    ds = _open(tiny_coco)
    assert ds.image_ids == [1, 2, 4]  # sorted; 3 is missing; 4 has no annotations
    image, target = ds[0]
    # plain tensors leave the dataset (tv_tensors only inside the transforms)
    assert type(image) is torch.Tensor and image.dtype == torch.uint8
    assert image.shape == (3, H, W)
    assert image[0, 0].tolist() == list(range(W)) and int(image[1:].max()) == 0
    boxes = target["boxes"]
    assert type(boxes) is torch.Tensor and boxes.dtype == torch.float32
    assert boxes.tolist() == EXPECTED_BOXES  # the last one clamped from [30, 20, 50, 40]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == EXPECTED_LABELS
    assert target["image_id"] == 1 and target["orig_size"] == (H, W)
    assert "masks" not in target


def test_masks_decode_polygons_and_both_rle_forms(tiny_coco: Path) -> None:
    ds = _open(tiny_coco, with_masks=True)
    masks = ds[0][1]["masks"]
    assert type(masks) is torch.Tensor and masks.dtype == torch.uint8 and masks.shape == (4, H, W)
    assert torch.equal(masks[1], torch.from_numpy(RECT_RLE))
    assert torch.equal(masks[2], torch.from_numpy(BLOCK_RLE))
    square = masks[0]
    assert square[10, 10] == 1 and square[0, 0] == 0 and square[20, 20] == 0
    assert 90 <= int(square.sum()) <= 121  # the 10x10 polygon, rasterised
    assert int(masks.max()) == 1


def test_unreadable_images_are_skipped_counted_and_warned(tiny_coco: Path) -> None:
    ds = _open(tiny_coco)
    assert ds.num_skipped == 1 and ds.skipped_image_ids == [3]
    with pytest.warns(RuntimeWarning, match="b.png"):
        image, target = ds[1]  # id 2 is a text file: the next image (id 4) comes back
    assert target["image_id"] == 4 and image.shape == (3, 10, 20)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert ds.num_skipped == 2 and ds.skipped_image_ids == [3, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known-bad files are not retried or re-warned
        assert ds[1][1]["image_id"] == 4
        assert ds[2][1]["image_id"] == 4
    assert ds.num_skipped == 2
    with pytest.raises(IndexError):
        ds[3]


def test_wrap_around_when_the_last_image_is_bad(tiny_coco: Path) -> None:
    (tiny_coco / "images" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = _open(tiny_coco)
    with pytest.warns(RuntimeWarning):
        assert ds[2][1]["image_id"] == 1


def test_verify_images_drops_corrupt_files_up_front(tiny_coco: Path) -> None:
    with pytest.warns(RuntimeWarning, match="b.png"):
        ds = _open(tiny_coco, verify_images=True)
    assert ds.image_ids == [1, 4] and ds.skipped_image_ids == [3, 2]


def test_many_unreadable_images_give_a_few_warnings_with_running_counts(tmp_path: Path) -> None:
    """11 of 12 images fail to load during iteration: warnings come at the 1st, 2nd, 4th
    and 8th failure (not 11), each naming the total so far; the good image still comes back."""
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "images" / "good.png")
    images = [{"id": 1, "file_name": "good.png", "height": 10, "width": 20}]
    for i in range(2, 13):
        (tmp_path / "images" / f"bad{i}.png").write_text("not an image")
        images.append({"id": i, "file_name": f"bad{i}.png", "height": 10, "width": 20})
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0} for i in range(1, 13)]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(coco))
    ds = CocoInstances(tmp_path, "train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        returned = [ds[i][1]["image_id"] for i in range(len(ds))]
    assert returned == [1] * 12 and ds.num_skipped == 11
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert [m.split("; ")[1].split(" ")[0] for m in messages] == ["1", "2", "4", "8"]
    assert all("fails to load" in m and "bad" in m for m in messages)


def test_count_is_reported_at_powers_of_two() -> None:
    assert [n for n in range(0, 40) if _count_is_reported(n)] == [1, 2, 4, 8, 16, 32]


def test_transforms_move_boxes_and_degenerate_boxes_are_dropped(tiny_coco: Path) -> None:
    flipped = _open(tiny_coco, with_masks=True, transforms=v2.RandomHorizontalFlip(p=1.0))
    image, target = flipped[0]
    # the flip moved boxes and masks because it saw tv_tensors; what leaves is unwrapped
    assert {type(image), type(target["boxes"]), type(target["masks"])} == {torch.Tensor}
    assert target["boxes"].tolist() == [[W - x2, y1, W - x1, y2] for x1, y1, x2, y2 in EXPECTED_BOXES]
    assert torch.equal(target["masks"][1], torch.from_numpy(RECT_RLE).flip(-1))

    def keep_left_12_columns(image, target):
        crop = lambda x: F.crop(x, 0, 0, H, 12)  # noqa: E731
        return crop(image), {**target, "boxes": crop(target["boxes"]), "masks": crop(target["masks"])}

    cropped = _open(tiny_coco, with_masks=True, transforms=keep_left_12_columns)
    image, target = cropped[0]
    assert image.shape == (3, H, 12)
    assert target["boxes"].tolist() == [[5, 5, 12, 15], [2, 25, 5, 27]]
    assert target["labels"].tolist() == [0, 1]
    assert target["masks"].shape == (2, H, 12)
    assert torch.equal(target["masks"][1], torch.from_numpy(BLOCK_RLE[:, :12]))
    assert target["orig_size"] == (H, W)


def test_collate_keeps_lists_of_different_sizes(tiny_coco: Path) -> None:
    ds = _open(tiny_coco)
    with pytest.warns(RuntimeWarning, match="b.png"):
        images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert [tuple(i.shape) for i in images] == [(3, H, W), (3, 10, 20), (3, 10, 20)]
    assert [t["image_id"] for t in targets] == [1, 4, 4]


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    raw = np.zeros((2, 4, 3), dtype=np.uint8)  # H=2, W=4, red top-left pixel
    raw[0, 0] = (255, 0, 0)
    pil = Image.fromarray(raw)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    pil.save(tmp_path / "rotated.png", exif=exif.tobytes())
    image = load_image(tmp_path / "rotated.png")
    assert image.shape == (3, 4, 2)
    assert image[:, 0, 1].tolist() == [255, 0, 0]  # top-left went to top-right
    assert int(image.sum()) == 255


def test_load_image_converts_gray_rgba_and_16_bit(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 200]], dtype=np.uint8)).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").tolist() == [[[0, 200]]] * 3

    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").tolist() == [[[10, 40]], [[20, 50]], [[30, 60]]]

    deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image = load_image(tmp_path / "deep.png")
    assert image.dtype == torch.uint8 and image.tolist() == [[[0, 100, 255]]] * 3


def test_load_image_raises_on_text_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("hello")
    with pytest.raises(OSError):
        load_image(tmp_path / "bad.png")


def _pennfudan() -> Path | None:
    repo = REPO
    for candidate in (repo.parent / "shared" / "datasets" / "pennfudan", Path("/work/shared/datasets/pennfudan")):
        if (candidate / "annotations" / "train.json").is_file():
            return candidate
    return None


@pytest.mark.skipif(_pennfudan() is None, reason="Penn-Fudan dataset not present")
def test_reads_pennfudan_train() -> None:
    ds = CocoInstances(_pennfudan(), "train")
    assert len(ds) == 136 and ds.class_names == ["person"] and ds.label_to_category_id == [1]
    assert sum(len(ds[i][1]["labels"]) for i in range(len(ds))) == 337
    assert ds.num_skipped == 0
    masked = CocoInstances(_pennfudan(), "train", with_masks=True)
    image, target = masked[0]
    masks = target["masks"]
    assert masks.shape == (len(target["boxes"]), *image.shape[-2:])
    for mask, (x1, y1, x2, y2) in zip(masks, target["boxes"].round().int().tolist()):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
