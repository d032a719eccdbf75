"""COCO instance-segmentation reader.

A dataset is a folder ``root`` holding ``images/`` and
``annotations/{train,val}.json`` (COCO instance format; ``file_name`` is
relative to ``images/``).

Samples are ``(image, target)``:

- ``image``: uint8 RGB tensor, shape (3, H, W).
- ``target["boxes"]``: float32 (N, 4), XYXY pixels inside the image.
- ``target["labels"]``: int64 (N,), contiguous labels in ``[0, num_classes)``.
- ``target["image_id"]``: int, the COCO image id.
- ``target["orig_size"]``: ``(H, W)`` ints of the image as loaded (before
  transforms).
- ``target["masks"]``: uint8 (N, H, W) in {0, 1}; present only with
  ``with_masks=True``.

All are plain ``torch.Tensor``: the transforms see torchvision's ``tv_tensors`` (so that
boxes and masks move with the image), and :func:`plain_sample` unwraps them once, where a
sample leaves the dataset; nothing downstream sees a tensor subclass.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from training.data.checks import check_split

Target = dict[str, Any]
Transforms = Callable[[tv_tensors.Image, Target], tuple[tv_tensors.Image, Target]]

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# Errors PIL raises on truncated, corrupt or non-image files.
LOAD_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an image file as uint8 RGB, shape (3, H, W).

    The EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so H and W
    are those of the image as displayed. Grayscale, palette, RGBA/LA (alpha
    dropped), CMYK and 16-bit images (scaled 0..65535 -> 0..255) become 8-bit RGB.

    Raises:
        OSError (incl. ``FileNotFoundError``, ``PIL.UnidentifiedImageError``),
        ValueError, SyntaxError: the file is missing or not a readable image.
    """
    with Image.open(path) as pil:
        pil.load()
        pil = ImageOps.exif_transpose(pil)
        if pil.mode in _SIXTEEN_BIT_MODES:
            wide = np.asarray(pil, dtype=np.float64)
            gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
            pil = Image.fromarray(gray)
        elif pil.mode == "F":
            pil = Image.fromarray(np.clip(np.rint(np.asarray(pil)), 0, 255).astype(np.uint8))
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
        array = np.array(pil, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def plain_sample(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """The sample with every ``tv_tensors`` subclass (Image, BoundingBoxes, Mask) unwrapped
    to a plain ``torch.Tensor`` (same storage); other values unchanged."""
    out = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
    return image.as_subclass(torch.Tensor), out


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """DataLoader ``collate_fn``: ``(list of images, list of targets)``, no stacking
    (images differ in size; the model pads)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def remove_degenerate_boxes(target: Target) -> Target:
    """Drop instances whose box has ``x2 <= x1`` or ``y2 <= y1`` (XYXY), keeping
    ``labels`` and ``masks`` in sync. Returns a new dict; other keys unchanged."""
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if bool(keep.all()):
        return target
    out = dict(target)
    out["boxes"] = tv_tensors.wrap(boxes[keep], like=boxes)
    out["labels"] = target["labels"][keep]
    if "masks" in target:
        out["masks"] = tv_tensors.wrap(target["masks"][keep], like=target["masks"])
    return out


class CocoInstances(Dataset):
    """Instance-segmentation dataset in COCO format (see the module docstring
    for the sample layout).

    Args:
        root: dataset folder with ``images/`` and ``annotations/{split}.json``.
        split: annotation file stem, e.g. ``"train"`` or ``"val"``.
        with_masks: decode instance masks (polygons or RLE) into ``target["masks"]``.
        transforms: ``image, target = transforms(image, target)`` (v2 style).
        class_agnostic: one class ``"object"``; every annotation gets label 0
            and label 0 maps back to the smallest category id in the file
            (``label_to_category_id == [min id]``, which is 1 for COCO). A
            class-agnostic evaluation (``useCats=0``) is the caller's job.
        verify_images: decode every image once at construction and drop the
            unreadable ones from ``image_ids`` (slow on big sets; use it for
            evaluation so every image is seen exactly once).

    Attributes:
        coco: the ``pycocotools.coco.COCO`` index of the annotation file.
        image_ids: COCO image ids, sorted, including images without
            annotations, excluding files missing at construction.
        class_names: names by contiguous label (categories sorted by id).
        label_to_category_id: ``label -> COCO category id``.
        category_id_to_label: ``COCO category id -> label``.
        report: the :class:`training.data.checks.SplitReport` of the annotation file.
        skipped_image_ids: ids of images found missing or unreadable so far.
        num_skipped: ``len(skipped_image_ids)``.

    Checks: the annotation file goes through :func:`training.data.checks.check_split`
    first. A fatal problem (not JSON, unknown category ids, duplicate ids, no usable
    box ...) raises :class:`training.data.checks.DataError` with one line naming the
    file and the first offending ids; skipped annotations (malformed, NaN/inf, empty or
    wholly-outside boxes, annotations of undeclared images) and skipped images (file
    missing, unusable declared size) are left out with one warning giving the counts.

    Crowd annotations (``iscrowd=1``) are ignored; boxes are clamped to the image;
    instances whose box is degenerate after the transforms are dropped.

    Unreadable images: a file missing at construction is left out of
    ``image_ids`` (in the checks' warning). A file that fails to decode in
    ``__getitem__``, or whose size (after EXIF rotation) differs from the
    JSON's ``height``/``width``, is recorded in ``skipped_image_ids`` and the next
    loadable image (wrapping around) is returned instead, so a DataLoader never
    crashes; the returned ``target["image_id"]`` says which image it is. Such
    failures are warned about with a running count, not one warning per image: at the
    1st, 2nd, 4th, 8th ... failure (:func:`_count_is_reported`), each warning naming
    the latest file and the total so far. ``verify_images=True`` decodes everything up
    front and gives one warning with the count. With DataLoader workers the counters
    live in each worker's copy of the dataset.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        with_masks: bool = False,
        transforms: Transforms | None = None,
        class_agnostic: bool = False,
        *,
        verify_images: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.with_masks = with_masks
        self.transforms = transforms
        self.class_agnostic = class_agnostic
        self.image_dir = self.root / "images"
        self.annotation_file = self.root / "annotations" / f"{split}.json"
        self.report = check_split(self.root, split).raise_if_fatal()
        if self.report.warning_message():
            warnings.warn(self.report.warning_message(), RuntimeWarning, stacklevel=2)
        self.coco = coco_from_dict(self.report.dataset)

        categories = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        if class_agnostic:
            self.class_names: list[str] = ["object"]
            self.label_to_category_id: list[int] = [int(categories[0]["id"])]
            self.category_id_to_label: dict[int, int] = {int(c["id"]): 0 for c in categories}
        else:
            self.class_names = [str(c["name"]) for c in categories]
            self.label_to_category_id = [int(c["id"]) for c in categories]
            self.category_id_to_label = {cid: label for label, cid in enumerate(self.label_to_category_id)}

        self.skipped_image_ids: list[int] = list(self.report.skipped_image_ids)  # said in the checks' warning
        self._bad_ids: set[int] = set(self.skipped_image_ids)
        self._load_failures = 0  # images that failed to load after construction (warned with a running count)
        present = [i for i in sorted(self.coco.getImgIds()) if i not in self._bad_ids]
        self.image_ids: list[int] = present
        if verify_images:
            self.image_ids = [i for i in present if self.try_load(i, warn=False) is not None]
            kept = set(self.image_ids)
            failed = [i for i in present if i not in kept]
            if failed:
                names = ", ".join(str(self._image_path(i)) for i in failed[:5])
                more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
                warnings.warn(f"skipping {len(failed)} image(s) that fail to load: {names}{more}", RuntimeWarning, stacklevel=2)

    @property
    def num_classes(self) -> int:
        """Number of contiguous labels."""
        return len(self.class_names)

    @property
    def num_skipped(self) -> int:
        """How many images were found missing or unreadable so far."""
        return len(self.skipped_image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        n = len(self.image_ids)
        if n == 0:
            raise IndexError("dataset has no images")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            image_id = self.image_ids[(index + step) % n]
            if image_id in self._bad_ids:
                continue
            image = self.try_load(image_id)
            if image is not None:
                return self._make_sample(image_id, image)
        raise RuntimeError(f"no loadable image in {self.image_dir} ({self.num_skipped} skipped)")

    def _image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def _record_skip(self, image_id: int, reason: str, warn: bool) -> None:
        if image_id in self._bad_ids:
            return
        self._bad_ids.add(image_id)
        self.skipped_image_ids.append(image_id)
        self._load_failures += 1
        if warn and _count_is_reported(self._load_failures):
            warnings.warn(
                f"skipping an image that fails to load ({reason}): {self._image_path(image_id)}; "
                f"{self._load_failures} image(s) of {self.annotation_file.name} skipped so far for this reason or others "
                f"(the next warning comes at {2 * self._load_failures})",
                RuntimeWarning,
                stacklevel=4,
            )

    def try_load(self, image_id: int, *, warn: bool = True) -> torch.Tensor | None:
        """The image with this COCO id as loaded (uint8 (3, H, W)), or None after recording
        it as skipped (unreadable, or its size differs from the declared one)."""
        info = self.coco.imgs[image_id]
        try:
            image = load_image(self._image_path(image_id))
        except LOAD_ERRORS as err:
            self._record_skip(image_id, f"unreadable: {type(err).__name__}: {err}", warn)
            return None
        expected = (info.get("height"), info.get("width"))
        actual = tuple(image.shape[-2:])
        if None not in expected and expected != actual:
            self._record_skip(image_id, f"size {actual} differs from annotation {expected}", warn)
            return None
        return image

    def _make_sample(self, image_id: int, image: torch.Tensor) -> tuple[torch.Tensor, Target]:
        h, w = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]  # boxes checked
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target: Target = {
            "boxes": F.clamp_bounding_boxes(tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))),
            "labels": torch.tensor([self.category_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": int(image_id),
            "orig_size": (int(h), int(w)),
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(self._decode_masks(anns, h, w))
        if self.transforms is not None:
            image, target = self.transforms(tv_tensors.Image(image), target)
            target["boxes"] = F.clamp_bounding_boxes(target["boxes"])
        return plain_sample(image, remove_degenerate_boxes(target))

    def _decode_masks(self, anns: list[dict[str, Any]], h: int, w: int) -> torch.Tensor:
        """Masks (N, H, W) uint8 from polygons, uncompressed or compressed RLE.
        An annotation without a segmentation gets an all-zero mask."""
        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        with warnings.catch_warnings():
            # pycocotools' Cython decode trips a NumPy 2 copy-keyword DeprecationWarning.
            warnings.filterwarnings("ignore", message=".*copy keyword", category=DeprecationWarning)
            for k, ann in enumerate(anns):
                segm = ann.get("segmentation")
                if not segm:
                    continue
                if isinstance(segm, list):
                    rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
                elif isinstance(segm["counts"], list):
                    rle = mask_utils.frPyObjects(segm, h, w)
                else:
                    rle = segm
                masks[k] = mask_utils.decode(rle)
        return torch.from_numpy(masks)


def _count_is_reported(count: int) -> bool:
    """Whether the ``count``-th load failure is warned about: 1, 2, 4, 8 ... (a power of
    two), so that a dataset with thousands of bad files gives a dozen warnings, each with
    the running total, instead of one per file."""
    return count > 0 and count & (count - 1) == 0


def _load_coco_quietly(path: Path) -> COCO:
    """``COCO(path)`` without its print statements."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def coco_from_dict(dataset: dict) -> COCO:
    """A ``pycocotools.coco.COCO`` index of an in-memory COCO dict, without its prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
