"""Label Studio's JSON export -> a box-only COCO dataset folder for BoxTeacher.

Layout (what :class:`training.data.coco.CocoInstances` reads)::

    DIR/images/task_<id>.png              the task's image, EXIF orientation applied
    DIR/annotations/train.json, val.json  COCO instances: boxes, and a mask where the annotator drew one

Per task, the rectangles of its newest non-cancelled annotation are used (the same rule
as batch predictions). A brush mask of the same annotation (drawn, or a prediction the
annotator accepted) goes with the rectangle whose box it fits best (box IoU >= 0.5, one
each): fine-tuning does not read it (BoxTeacher learns from boxes), the evaluation of a
fine-tuned model does (box-prompted mask IoU, labelstudio_backend.fit).

Categories: the model's classes in order (category id = class
index + 1), so the classifier keeps its weights; a Label Studio label that maps to no
class (see :func:`labelstudio_backend.label_config.label_to_class_map`) becomes a new
category after them (the classifier is then re-initialised by ``model.weights``, with a
warning). ``val_fraction`` of the tasks (chosen by task id, so stable between runs) are
held out for evaluation when there are at least ``min_val_tasks`` of them; otherwise the
evaluation runs on the training images and the summary says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from labelstudio_backend.images import ImageFetcher
from labelstudio_backend.label_config import LabelConfig, label_to_class_map
from labelstudio_backend.regions import masks_in, rectangles_in

log = logging.getLogger(__name__)
MIN_VAL_TASKS = 2
MIN_TASKS_FOR_VAL = 5


@dataclass
class DatasetSummary:
    path: Path
    tasks: int = 0  # tasks with at least one usable rectangle
    boxes: int = 0
    masks: int = 0  # boxes that carry the annotator's mask
    train_images: int = 0
    val_images: int = 0
    eval_split: str = "val"  # "train" when too few tasks to hold some out
    class_names: list[str] = field(default_factory=list)
    new_labels: list[str] = field(default_factory=list)  # labels that became new classes
    skipped: dict[str, str] = field(default_factory=dict)  # task id -> reason

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "tasks": self.tasks,
            "boxes": self.boxes,
            "masks": self.masks,
            "train_images": self.train_images,
            "val_images": self.val_images,
            "eval_split": self.eval_split,
            "class_names": self.class_names,
            "new_labels": self.new_labels,
            "skipped_tasks": len(self.skipped),
        }


def newest_annotation(task: dict) -> dict | None:
    """The newest non-cancelled annotation of an exported task."""
    items = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not items:
        return None
    return max(items, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def _held_out(task_id: object, fraction: float) -> bool:
    digest = hashlib.sha256(str(task_id).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def build_box_dataset(
    tasks: list[dict],
    config: LabelConfig,
    class_names: list[str],
    fetcher: ImageFetcher,
    out_dir: str | Path,
    val_fraction: float = 0.2,
) -> DatasetSummary:
    """Write the dataset folder from exported tasks (see the module docstring)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    summary = DatasetSummary(out)
    label_map = label_to_class_map(class_names, config.rectangle) if config.rectangle else {}
    names = list(class_names)

    def category_of(label: str | None) -> int | None:
        if not label:
            return None
        if label in label_map:
            return label_map[label] + 1
        known = {n.lower(): i for i, n in enumerate(names)}
        if label.lower() in known:
            return known[label.lower()] + 1
        names.append(label)
        summary.new_labels.append(label)
        log.warning("label %r maps to no model class: it becomes class %d (the classifier is re-initialised)", label, len(names) - 1)
        return len(names)

    samples = []  # (task id, file name, width, height, [(bbox, category)])
    for task in tasks:
        tid = task.get("id")
        ann = newest_annotation(task)
        if ann is None:
            continue
        data = task.get("data") or {}
        try:
            image = fetcher.load(data.get(config.image_key), tid)
        except Exception as err:  # noqa: BLE001 - a bad task is skipped, not fatal
            summary.skipped[str(tid)] = f"{type(err).__name__}: {err}"
            log.warning("training data: task %s skipped: %s", tid, err)
            continue
        h, w = image.shape[:2]
        boxes = []
        for rect in rectangles_in(ann.get("result"), w, h, config.image_name):
            x0, y0 = max(rect.box[0], 0.0), max(rect.box[1], 0.0)
            x1, y1 = min(rect.box[2], float(w)), min(rect.box[3], float(h))
            category = category_of(rect.label)
            if category is None or x1 - x0 < 1 or y1 - y0 < 1:
                continue
            boxes.append(([x0, y0, x1 - x0, y1 - y0], category))
        if not boxes:
            continue
        boxes = _with_masks(boxes, masks_in(ann.get("result"), w, h, config.image_name))
        name = f"task_{tid}.png"
        Image.fromarray(image).save(out / "images" / name, compress_level=1)
        samples.append((tid, name, w, h, boxes))

    summary.tasks = len(samples)
    summary.boxes = sum(len(s[4]) for s in samples)
    summary.masks = sum(1 for s in samples for b in s[4] if b[2] is not None)
    val = [s for s in samples if _held_out(s[0], val_fraction)] if len(samples) >= MIN_TASKS_FOR_VAL else []
    if len(val) < MIN_VAL_TASKS or len(val) == len(samples):
        val, summary.eval_split = [], "train"
    train = [s for s in samples if s not in val]
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    for split, items in (("train", train), ("val", val if val else train)):
        _write_coco(out / "annotations" / f"{split}.json", items, categories)
    summary.train_images, summary.val_images = len(train), len(val)
    summary.class_names = names
    return summary


def _with_masks(boxes: list, masks: list) -> list:
    """``[(bbox xywh, category)]`` -> ``[(bbox, category, COCO RLE or None)]``: each mask
    goes with the free box that its own box overlaps most (IoU >= 0.5), best pairs first."""
    from pycocotools import mask as mask_utils

    if not masks:
        return [(bbox, category, None) for bbox, category in boxes]
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    mask_boxes = mask_utils.toBbox(rles).tolist()
    ious = mask_utils.iou(mask_boxes, [b for b, _ in boxes], [0] * len(boxes))
    pairs = sorted(((float(ious[i, j]), i, j) for i in range(len(masks)) for j in range(len(boxes))), reverse=True)
    by_box: dict[int, dict] = {}
    used: set[int] = set()
    for iou, i, j in pairs:
        if iou < 0.5:
            break
        if i not in used and j not in by_box:
            used.add(i)
            by_box[j] = {"size": rles[i]["size"], "counts": rles[i]["counts"].decode("ascii")}
    return [(bbox, category, by_box.get(j)) for j, (bbox, category) in enumerate(boxes)]


def _write_coco(path: Path, samples: list, categories: list[dict]) -> None:
    images, annotations = [], []
    for k, (tid, name, w, h, boxes) in enumerate(samples, start=1):
        images.append({"id": k, "file_name": name, "width": w, "height": h, "label_studio_task": tid})
        for bbox, category, segmentation in boxes:
            ann = {
                "id": len(annotations) + 1,
                "image_id": k,
                "category_id": category,
                "bbox": [round(v, 3) for v in bbox],
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
            if segmentation is not None:
                ann["segmentation"] = segmentation
            annotations.append(ann)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
