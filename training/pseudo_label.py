"""Offline pseudo-labelling: a frozen model + Algorithm 1 turn a box-only dataset
into a mask dataset (the paper's "naive self-training" baseline, and a product feature).

Every ground-truth box that a prediction matches (IoU >= 0.5, one-to-one, greedy by the
mask-aware score) gets that prediction's mask, cropped to the box, and the mask-aware
score of that mask inside the box (``"score"`` in the annotation). A box without a match
(or whose cropped mask is empty) is listed as unmatched.

At any scale (:func:`pseudo_label_to_file`): the images are sharded over the processes of
a torchrun job (one process without torchrun); each process streams one JSON line per
image to its part file ``OUTPUT.parts/part-RRRRR.jsonl`` as it goes, so a run killed at
any point (even ``kill -9``) loses at most the image in flight, and a rerun of the same
command skips every image already written (``OUTPUT.parts/run.json`` says what the parts
were made with; a rerun with another checkpoint, split or thresholds stops instead of
mixing them). At the end rank 0 merges the parts, in image id order, into one COCO file,
written atomically, then removes the parts. So the output does not depend on the number
of processes, and a process holds the input's annotation index and one image, never the
output. The merged file holds:

- ``images``, ``categories``: the labelled images and the split's categories;
- ``annotations``: one pseudo mask per matched box: the box's own annotation with
  ``segmentation`` (COCO RLE), ``area``, ``score`` (mask-aware) and ``pseudo: true``;
- ``unmatched_boxes``: the box annotations (no segmentation) that got no pseudo mask;
- ``review_order``: annotation ids, worst first: the unmatched boxes (by id), then the
  pseudo masks by increasing score (ties by id);
- ``info``: the settings and counts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset

from training import distributed as dist_utils
from training.boxteacher import crop_masks_to_boxes, merge_teacher_views
from training.data.coco import CocoInstances
from training.engine import assigned_teacher_view, teacher_views
from training.evaluate import encode_mask
from training.model.boxes import box_fill_masks, box_masks
from training.model.condinst import CondInst
from training.model.scores import mask_aware_score

log = logging.getLogger(__name__)

MANIFEST = "run.json"


@torch.no_grad()
def pseudo_label_image(
    model: CondInst,
    image: torch.Tensor,
    anns: list[dict],
    iou_threshold: float = 0.5,
    score_threshold: float = 0.05,
    flip: bool = False,
    extra_sizes: Sequence[int] = (),
) -> tuple[list[dict], list[int]]:
    """One image: (pseudo-mask annotations, ids of the boxes left without one).

    The model labels the image as BoxTeacher's teacher does in training
    (:func:`training.engine.teacher_views`, :func:`training.engine.assigned_teacher_view`,
    :func:`training.boxteacher.merge_teacher_views`), at the model's test scale and in the
    image's own pixels.

    Args:
        image: RGB (3, H, W) uint8 at the size the annotations' boxes refer to.
        anns: the image's non-crowd COCO box annotations (``bbox`` xywh pixels).
        flip: also label the image mirrored and average the views' masks.
        extra_sizes: also label it at these shorter sides (``input.max_size_test`` for the
            longer), each mirrored too with ``flip``. Every view costs one more forward.
    Returns:
        each matched annotation copied with ``segmentation`` (COCO RLE of the mask cropped
        to its box), ``area``, ``score`` (mask-aware score inside the box), ``pseudo``;
        and the ids of the others, in the order of ``anns``.
    """
    if not anns:
        return [], []
    gt = torch.tensor(
        [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
        dtype=torch.float32,
        device=model.device,
    )
    h, w = image.shape[-2:]
    inp, stride, threshold = model.cfg.input, model.cfg.model.mask.out_stride, model.cfg.model.mask.threshold
    views = teacher_views(model, [image], [inp.min_size_test, *extra_sizes], inp.max_size_test, flip)
    assigned = [assigned_teacher_view(dets[0], gt, (h, w), f, stride, iou_threshold, score_threshold) for dets, f in views]
    probs, det_scores, _, has = merge_teacher_views(assigned)
    probs = crop_masks_to_boxes(probs, gt)
    scores = mask_aware_score(det_scores, probs, box_masks(gt, h, w, stride=1), threshold).tolist()
    masks = (probs > threshold).cpu().numpy()
    pseudo, unmatched = [], []
    for ann, matched, mask, score in zip(anns, has.tolist(), masks, scores):
        if matched and mask.any():
            pseudo.append({**ann, "segmentation": encode_mask(mask), "area": float(mask.sum()), "score": float(score), "pseudo": True})
        else:
            unmatched.append(int(ann["id"]))
    return pseudo, unmatched


# ---- part files ---------------------------------------------------------------------------------
def parts_dir(output: str | Path) -> Path:
    """Where the part files of ``output`` live while it is being made."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


def read_part(path: Path) -> Iterator[tuple[dict, int]]:
    """The complete records of a part file with their byte offsets; a last line cut short by
    a kill (no newline, or not JSON) is left out."""
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if line.endswith(b"\n"):
                try:
                    yield json.loads(line), offset
                except ValueError:
                    pass
            offset += len(line)


class PartWriter:
    """Appends one JSON line per image to a part file, flushed after each line (so a killed
    process leaves whole lines, and at most one cut one, which is cut off on reopening)."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists():
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                with open(path, "r+b") as f:
                    f.truncate(end)
        self._file = open(path, "ab")
        self.written = 0

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        self.written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prepare_parts(parts: Path, run_key: dict) -> str | None:
    """Create the parts folder with its manifest, or check that the one there matches;
    the reason it does not, else None."""
    manifest = parts / MANIFEST
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text())
        except ValueError:
            found = None
        if found != run_key:
            differ = sorted(k for k in set(run_key) | set(found or {}) if (found or {}).get(k) != run_key.get(k))
            return f"{parts} holds the parts of another run (differs in {', '.join(differ) or 'its manifest'}); delete it to start again, or choose another --output"
        return None
    parts.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(run_key, indent=1))
    tmp.replace(manifest)
    return None


def remove_parts(parts: Path) -> None:
    """Delete a parts folder, its manifest last: a kill part-way leaves either the manifest
    (a rerun merges again) or nothing that a run with another key would resume from."""
    for path in parts.glob("part-*.jsonl"):
        path.unlink()
    (parts / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(parts, ignore_errors=True)


def _index_parts(parts: Path) -> dict[int, tuple[Path, int]]:
    """image id -> (part file, byte offset) of its record (the first one when repeated)."""
    index: dict[int, tuple[Path, int]] = {}
    for path in sorted(parts.glob("part-*.jsonl")):
        for record, offset in read_part(path):
            index.setdefault(int(record["image_id"]), (path, offset))
    return index


def _read_at(path: Path, offset: int) -> dict:
    with open(path, "rb") as f:
        f.seek(offset)
        return json.loads(f.readline())


# ---- the run -----------------------------------------------------------------------------------------
class _Images(Dataset):
    """(image id, image or None) of a list of ids, for a DataLoader that decodes ahead."""

    def __init__(self, dataset: CocoInstances, image_ids: list[int]):
        self.dataset, self.image_ids = dataset, image_ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, k: int):
        image_id = self.image_ids[k]
        return image_id, self.dataset.try_load(image_id)


def _box_annotations(dataset: CocoInstances, image_id: int) -> list[dict]:
    return [a for a in dataset.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]


@dataclass
class _Collective:
    """The few collectives of a run; identities on one process."""

    rank: int
    world: int

    def share(self, obj: Any) -> Any:
        return dist_utils.broadcast_object(obj) if self.world > 1 else obj

    def barrier(self) -> None:
        if self.world > 1:
            dist_utils.barrier()


def pseudo_label_to_file(
    model: CondInst,
    data_dir: str | Path,
    split: str,
    output: str | Path,
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.05,
    flip: bool = False,
    extra_sizes: Sequence[int] = (),
    workers: int = 0,
    run_key: dict | None = None,
    distributed: bool = True,
) -> dict:
    """Pseudo-label ``split`` into the COCO file ``output`` (see the module docstring).

    In a torchrun job (``distributed`` and a process group) every rank calls this; the
    images are shared out, rank 0 merges. Returns the summary on every rank: counts, and
    ``quality`` (:class:`MaskQuality`) when the split has true masks.

    Args:
        flip, extra_sizes: the teacher's views of each image (:func:`pseudo_label_image`).
        workers: DataLoader processes decoding images ahead of the model (0: in line).
        run_key: what identifies the run (checkpoint digest, thresholds ...); parts made
            with another key are not resumed from.
    """
    rank, world = (dist_utils.info().rank, dist_utils.info().world_size) if distributed else (0, 1)
    group = _Collective(rank, world)
    output = Path(output)
    parts = parts_dir(output)
    dataset = CocoInstances(data_dir, split)
    key = {"split": split, "iou_threshold": iou_threshold, "score_threshold": score_threshold, **(run_key or {})}
    if flip:  # only when on, so that runs begun before the option existed still resume
        key["flip"] = True
    if extra_sizes:
        key["extra_sizes"] = [int(size) for size in extra_sizes]

    # rank 0 prepares the folder and says what is left to do; every rank takes its share
    todo: list[int] | str = []
    if rank == 0:
        problem = _prepare_parts(parts, key)
        if problem is None:
            done = set(_index_parts(parts))
            todo = [i for i in dataset.image_ids if i not in done]
            log.info(
                "pseudo-labelling %s/%s: %d images, %d already in %s, %d processes",
                data_dir,
                split,
                len(dataset.image_ids),
                len(done),
                parts,
                world,
            )
        else:
            todo = problem
    todo = group.share(todo)
    if isinstance(todo, str):
        raise RuntimeError(todo)
    mine = todo[rank::world]

    model.eval()
    parts.mkdir(parents=True, exist_ok=True)  # a node whose filesystem rank 0 does not share
    loader = DataLoader(_Images(dataset, mine), batch_size=None, num_workers=workers)
    with PartWriter(parts / f"part-{rank:05d}.jsonl") as writer:
        for image_id, image in loader:
            if image is None:
                writer.write({"image_id": int(image_id), "skipped": "unreadable or wrongly sized image"})
                continue
            pseudo, unmatched = pseudo_label_image(
                model, image, _box_annotations(dataset, image_id), iou_threshold, score_threshold, flip, extra_sizes
            )
            writer.write({"image_id": int(image_id), "annotations": pseudo, "unmatched": unmatched})
    group.barrier()

    summary: dict | str | None = None
    if rank == 0:
        try:
            summary = merge_parts(parts, dataset, output, key)
            remove_parts(parts)
        except Exception as err:  # noqa: BLE001 - said on every rank, so none waits for rank 0
            summary = f"merging {parts} into {output} failed: {type(err).__name__}: {err}"
    summary = group.share(summary)
    if isinstance(summary, str):
        raise RuntimeError(summary)
    return summary


def merge_parts(parts: Path, dataset: CocoInstances, output: Path, run_key: dict) -> dict:
    """Write the COCO file from the part files (image id order; streamed: one record in
    memory at a time, plus the ids and scores for the review order). Atomic."""
    coco = dataset.coco
    index = _index_parts(parts)
    missing = [i for i in dataset.image_ids if i not in index]
    if missing:
        raise RuntimeError(
            f"the part files in {parts} lack {len(missing)} image(s) (first: {missing[:5]}); "
            "with several nodes the output folder must be on a filesystem every node writes to"
        )
    ids = sorted(index)
    quality = MaskQuality()
    has_masks = False
    # a few numbers per box and per image: what grows with the dataset
    review_ids, review_scores, unmatched, labelled = array("q"), array("d"), array("q"), array("q")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write('{"categories":' + json.dumps(coco.loadCats(coco.getCatIds())) + ',"annotations":[')
            first = True
            for image_id in ids:
                record = _read_at(*index[image_id])
                if "skipped" in record:
                    continue
                labelled.append(image_id)
                by_ann = {}
                for ann in record["annotations"]:
                    f.write(("" if first else ",") + json.dumps(ann))
                    first = False
                    by_ann[ann["id"]] = ann["segmentation"]
                    review_ids.append(ann["id"])
                    review_scores.append(ann["score"])
                unmatched.extend(record["unmatched"])
                for true in _box_annotations(dataset, image_id):
                    has_masks |= quality.add(coco, true, by_ann.get(true["id"]))
            f.write('],"unmatched_boxes":[')
            f.write(",".join(json.dumps({k: v for k, v in coco.anns[i].items() if k != "segmentation"}) for i in unmatched))
            f.write('],"images":[' + ",".join(json.dumps(coco.imgs[i]) for i in labelled))
            order = review_order(review_ids, review_scores, unmatched)
            boxes = len(review_ids) + len(unmatched)
            summary = {
                "images": len(labelled),
                "skipped_images": len(ids) - len(labelled) + len(dataset.report.skipped_image_ids),
                "boxes": boxes,
                "pseudo_masks": len(review_ids),
                "unmatched_boxes": len(unmatched),
                "quality": quality.result() if has_masks else None,
            }
            info = {
                "description": f"pseudo masks from a frozen model on {Path(dataset.root).name}/{dataset.split}",
                "settings": run_key,
                **summary,
            }
            f.write('],"review_order":' + json.dumps(order) + ',"info":' + json.dumps(info) + "}")
        tmp.replace(output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("pseudo masks for %d of %d boxes in %d images -> %s", summary["pseudo_masks"], boxes, len(labelled), output)
    return summary


def review_order(pseudo_ids: Sequence[int], scores: Sequence[float], unmatched_ids: Sequence[int]) -> list[int]:
    """Annotation ids worst first: unmatched boxes by id, then pseudo masks by increasing
    score (ties by id)."""
    ids = np.asarray(pseudo_ids, dtype=np.int64)
    order = np.lexsort((ids, np.asarray(scores, dtype=np.float64))) if len(ids) else np.zeros(0, dtype=np.int64)
    return sorted(int(i) for i in unmatched_ids) + ids[order].tolist()


# ---- quality against hidden true masks ---------------------------------------------------------------
class MaskQuality:
    """Running means of pseudo-mask IoU against true masks, box by box (see
    :func:`pseudo_mask_quality` for the numbers)."""

    def __init__(self) -> None:
        self.n = 0
        self.matched = 0
        self.iou_sum = 0.0
        self.boxfill_sum = 0.0

    def add(self, coco, true: dict, pseudo_segmentation: dict | None) -> bool:
        """One GT box annotation (``coco``: its split's index); False (and nothing counted)
        when it has no non-empty true mask."""
        if not true.get("segmentation") or true["bbox"][2] <= 0 or true["bbox"][3] <= 0:
            return False
        rle = coco.annToRLE(true)
        if not mask_utils.area(rle):
            return False
        x, y, w, h = true["bbox"]
        box = box_fill_masks(torch.tensor([[x, y, x + w, y + h]]), *rle["size"])[0].numpy()
        self.boxfill_sum += _iou(mask_utils.encode(np.asfortranarray(box.astype(np.uint8))), rle)
        self.n += 1
        if pseudo_segmentation is not None:
            self.matched += 1
            self.iou_sum += _iou(pseudo_segmentation, rle)
        return True

    def result(self) -> dict[str, float] | None:
        if not self.n:
            return None
        return {
            "boxes": float(self.n),
            "coverage": self.matched / self.n,
            "matched_iou": self.iou_sum / max(self.matched, 1),
            "mean_iou": self.iou_sum / self.n,
            "boxfill_iou": self.boxfill_sum / self.n,
        }


def pseudo_mask_quality(pseudo: dict, data_dir: str | Path, split: str = "train") -> dict[str, float] | None:
    """How good are the pseudo masks, measured against the split's hidden true masks.

    Training never reads these masks; this is a diagnostic (the integration test, the
    ``pseudo-label`` command on a split that has masks). Over every GT box (not crowd,
    non-empty) that has a true mask: ``coverage`` = share of boxes with a pseudo mask,
    ``matched_iou`` = mean mask IoU over those, ``mean_iou`` = mean over all boxes with
    0 for a box without one, ``boxfill_iou`` = the same mean for the filled boxes (what
    box-only labels give). ``None`` when the split holds no masks.
    """
    dataset = CocoInstances(data_dir, split)
    by_id = {a["id"]: a["segmentation"] for a in pseudo["annotations"]}
    quality = MaskQuality()
    for image_id in sorted({im["id"] for im in pseudo["images"]}):
        for true in _box_annotations(dataset, image_id):
            quality.add(dataset.coco, true, by_id.get(true["id"]))
    return quality.result()


def _iou(a: dict, b: dict) -> float:
    """Mask IoU of two COCO RLEs (pycocotools)."""
    return float(mask_utils.iou([a], [b], [0])[0, 0])


def pseudo_label_dataset(
    model: CondInst, data_dir: str | Path, split: str = "train", iou_threshold: float = 0.5, score_threshold: float = 0.05
) -> dict:
    """The pseudo-label COCO dict of ``split`` in memory (one process; small splits: tests,
    benchmarks). The same file :func:`pseudo_label_to_file` writes, read back."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pseudo.json"
        pseudo_label_to_file(model, data_dir, split, out, iou_threshold=iou_threshold, score_threshold=score_threshold, distributed=False)
        return json.loads(out.read_text())
