"""Dataset checks: what is wrong with a COCO split before anything reads it.

One pass over ``DIR/annotations/SPLIT.json`` (and, on request, its image files) that
sorts every problem into one of three severities:

- **fatal**: training cannot proceed (the file is missing or not JSON, a structure that
  cannot be indexed, no categories, an annotation whose category is not declared,
  duplicate image or annotation ids, no usable box in the split). The reader raises
  :class:`DataError` with one line naming the file and the first offending ids.
- **skipped**: the annotation or image is left out (a malformed, non-finite, empty or
  wholly-outside box; an annotation for an image that is not declared; a missing,
  unreadable or wrongly-sized image file; an unusable declared size). One warning gives
  the counts.
- **kept**: used as it is, and said (a box partly outside the image, clamped; two image
  entries for one file; an image whose only annotations are crowd regions, which trains
  as an image without objects; a segmentation that cannot be decoded, dropped: the box
  stays). A missing ``iscrowd`` reads as 0 and a missing or non-numeric ``area`` as the
  box's area, as COCO tools expect (COCOeval reads both), without a word.

:func:`check_split` is what ``boxteacher check-data`` prints and what
:class:`training.data.coco.CocoInstances` runs on construction, so ``train``, ``eval``
and ``pseudo-label`` stop or skip alike. It never raises for bad data; it returns a
:class:`SplitReport`.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FATAL, SKIPPED, KEPT = "fatal", "skipped", "kept"
ImageCheck = Literal["exists", "header", "decode"]

# A box may pass the image border by this much (rounding in converters) without a word.
EDGE_TOLERANCE_PX = 1.0
# How many offending ids a report keeps per problem.
MAX_EXAMPLES = 5
# Problems of the file as a whole: their count says nothing.
FILE_LEVEL = ("unparseable", "malformed_structure", "no_categories", "no_boxes")

# kind -> (severity, what it means); the order is the order of a report.
KINDS: dict[str, tuple[str, str]] = {
    "unparseable": (FATAL, "the annotation file is not a readable JSON object"),
    "malformed_structure": (FATAL, '"images", "annotations" and "categories" must be lists of objects'),
    "no_categories": (FATAL, "no categories declared"),
    "malformed_category": (FATAL, "categories without an integer id and a name, or with a repeated id"),
    "malformed_image": (FATAL, "images without an integer id or a file_name"),
    "duplicate_image_id": (FATAL, "image ids used by more than one image"),
    "malformed_annotation": (FATAL, "annotations without an integer id, image_id or category_id"),
    "duplicate_annotation_id": (FATAL, "annotation ids used by more than one annotation"),
    "unknown_category": (FATAL, 'annotations whose category_id is not in "categories"'),
    "no_boxes": (FATAL, "no usable box in the split (empty split)"),
    "bad_bbox": (SKIPPED, "bbox is not a list of 4 numbers"),
    "nonfinite_bbox": (SKIPPED, "bbox has NaN or infinite values"),
    "empty_bbox": (SKIPPED, "bbox has zero or negative width or height"),
    "bbox_outside": (SKIPPED, "bbox lies entirely outside its image"),
    "orphan_annotation": (SKIPPED, "annotations for an image id that is not declared"),
    "bad_image_size": (SKIPPED, "images whose declared width/height are not positive numbers"),
    "missing_image": (SKIPPED, "image files not found"),
    "unreadable_image": (SKIPPED, "image files that cannot be read as images"),
    "size_mismatch": (SKIPPED, "image files whose size differs from the declared width/height"),
    "bbox_clamped": (KEPT, "bbox partly outside its image (clamped to it)"),
    "duplicate_file_name": (KEPT, "image files named by more than one image entry"),
    "crowd_only": (KEPT, "images whose only annotations are crowd regions (they train as images without objects)"),
    "bad_segmentation": (KEPT, "segmentations that are neither polygons nor RLE (dropped; the box is kept)"),
}


class DataError(ValueError):
    """A dataset that training, evaluation or pseudo-labelling cannot use; the message is
    one line naming the file and the first offending ids."""


@dataclass
class Problem:
    kind: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def severity(self) -> str:
        return KINDS[self.kind][0]

    @property
    def what(self) -> str:
        return KINDS[self.kind][1]

    def line(self) -> str:
        """``"<count> <what> (<examples>[, ...])"`` (no count for a problem of the whole file)."""
        text = self.what if self.kind in FILE_LEVEL else f"{self.count} {self.what}"
        more = ", ..." if self.count > len(self.examples) else ""
        return f"{text} ({', '.join(self.examples)}{more})" if self.examples else text


@dataclass
class SplitReport:
    """What :func:`check_split` found in one split.

    Attributes:
        file: the annotation file.
        images, annotations, categories: entries declared in the file.
        boxes: non-crowd annotations left after skipping (what training learns from).
        without_mask: annotations left after skipping that have no usable segmentation
            (a box-only split: mask AP cannot be measured on it); a few ids in
            ``without_mask_examples``.
        problems: by kind, in :data:`KINDS` order.
        dataset: the COCO dict without the skipped annotations (None when fatal).
        skipped_image_ids: images to leave out (missing, unreadable, wrongly sized ...).
    """

    file: Path
    images: int = 0
    annotations: int = 0
    categories: int = 0
    boxes: int = 0
    without_mask: int = 0
    without_mask_examples: list[str] = field(default_factory=list)
    problems: dict[str, Problem] = field(default_factory=dict)
    dataset: dict | None = None
    skipped_image_ids: list[int] = field(default_factory=list)

    def add(self, kind: str, example: str | None = None) -> None:
        p = self.problems.setdefault(kind, Problem(kind))
        p.count += 1
        if example is not None and len(p.examples) < MAX_EXAMPLES:
            p.examples.append(example)

    def with_severity(self, severity: str) -> list[Problem]:
        return [self.problems[k] for k in KINDS if k in self.problems and KINDS[k][0] == severity]

    @property
    def usable(self) -> bool:
        """True when training (or evaluation) can proceed on this split."""
        return not self.with_severity(FATAL)

    def error_message(self) -> str | None:
        """One line naming the file and its first fatal problem(s); None when usable."""
        fatal = self.with_severity(FATAL)
        if not fatal:
            return None
        return f"{self.file}: " + "; ".join(p.line() for p in fatal) + " (boxteacher check-data lists every problem)"

    def warning_message(self) -> str | None:
        """One line with the counts of what is skipped or kept; None when clean."""
        parts = [f"skipped {p.line()}" for p in self.with_severity(SKIPPED)] + [f"kept {p.line()}" for p in self.with_severity(KEPT)]
        return f"{self.file}: " + "; ".join(parts) if parts else None

    def raise_if_fatal(self) -> SplitReport:
        message = self.error_message()
        if message:
            raise DataError(message)
        return self

    def as_dict(self) -> dict:
        return {
            "file": str(self.file),
            "usable": self.usable,
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
            "boxes": self.boxes,
            "annotations_without_mask": self.without_mask,
            "problems": [
                {"kind": p.kind, "severity": p.severity, "what": p.what, "count": p.count, "examples": p.examples}
                for k, p in self.problems.items()
            ],
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_size(info: dict) -> tuple[float, float] | None:
    """(width, height) when both are declared positive numbers, None when neither is
    declared; ValueError (the values) otherwise."""
    w, h = info.get("width"), info.get("height")
    if w is None and h is None:
        return None
    if _is_number(w) and _is_number(h) and math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0:
        return float(w), float(h)
    raise ValueError(f"{w!r} x {h!r}")


def _segmentation_ok(segm: Any) -> bool:
    """Polygons (lists of >= 6 numbers, an even count), or RLE ({"counts", "size": [h, w]})."""
    if isinstance(segm, list):
        return all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) and math.isfinite(v) for v in p) for p in segm
        )
    if isinstance(segm, dict):
        size = segm.get("size")
        return (
            isinstance(size, list)
            and len(size) == 2
            and all(_is_int(v) and v >= 0 for v in size)
            and isinstance(segm.get("counts"), (str, list))
        )
    return False


def load_annotation_file(path: Path) -> tuple[Any, str | None]:
    """The parsed JSON, or (None, why not)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, "file not found"
    except (OSError, UnicodeDecodeError) as err:
        return None, f"cannot read it: {err}"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON: {err}"


def check_split(root: str | Path, split: str, images: ImageCheck = "exists") -> SplitReport:
    """Check ``root/annotations/{split}.json`` and its images (see the module docstring).

    Args:
        images: ``"exists"`` only looks for each file (what the reader does at start-up);
            ``"header"`` also opens it and compares its size (after EXIF rotation) with the
            declared one; ``"decode"`` decodes every image (finds truncated files; slow).
    """
    root = Path(root)
    report = SplitReport(root / "annotations" / f"{split}.json")
    data, why = load_annotation_file(report.file)
    if data is None:
        report.add("unparseable", why)
        return report
    if not isinstance(data, dict):
        report.add("unparseable", f"the top level is a {type(data).__name__}, not an object")
        return report
    sections = {k: data.get(k, []) for k in ("images", "annotations", "categories")}
    for key, items in sections.items():
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            report.add("malformed_structure", f'"{key}"')
    if not report.usable:
        return report
    images_, anns, cats = sections["images"], sections["annotations"], sections["categories"]
    report.images, report.annotations, report.categories = len(images_), len(anns), len(cats)

    # categories
    if not cats:
        report.add("no_categories")
    cat_ids = Counter(c.get("id") for c in cats)
    for c in cats:
        if not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            report.add("malformed_category", f"category {c.get('id')!r}")
        elif cat_ids[c["id"]] > 1:
            report.add("malformed_category", f"category id {c['id']} repeated")
            cat_ids[c["id"]] = 1  # say it once

    # images
    by_id: dict[int, dict] = {}
    sizes: dict[int, tuple[float, float] | None] = {}
    file_names: dict[str, int] = {}
    for k, info in enumerate(images_):
        image_id, name = info.get("id"), info.get("file_name")
        if not _is_int(image_id) or not isinstance(name, str) or not name:
            report.add("malformed_image", f"images[{k}] (id {image_id!r}, file_name {name!r})")
            continue
        if image_id in by_id:
            report.add("duplicate_image_id", f"image {image_id}")
            continue
        by_id[image_id] = info
        try:
            sizes[image_id] = _positive_size(info)
        except ValueError as err:
            report.add("bad_image_size", f"image {image_id}: {err}")
            report.skipped_image_ids.append(image_id)
        if name in file_names:
            report.add("duplicate_file_name", f"{name} (images {file_names[name]} and {image_id})")
        else:
            file_names[name] = image_id

    # annotations
    kept: list[dict] = []
    ann_ids: set[int] = set()
    known_cats = {c["id"] for c in cats if _is_int(c.get("id"))}
    crowd_by_image: dict[int, list[bool]] = defaultdict(list)
    for k, ann in enumerate(anns):
        ann_id, image_id, cat = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        if not (_is_int(ann_id) and _is_int(image_id) and _is_int(cat)):
            report.add("malformed_annotation", f"annotations[{k}] (id {ann_id!r})")
            continue
        if ann_id in ann_ids:
            report.add("duplicate_annotation_id", f"annotation {ann_id}")
            continue
        ann_ids.add(ann_id)
        if cat not in known_cats:
            report.add("unknown_category", f"annotation {ann_id}: category {cat}")
            continue
        if image_id not in by_id:
            report.add("orphan_annotation", f"annotation {ann_id}: image {image_id}")
            continue
        kind = _bbox_problem(ann.get("bbox"), sizes.get(image_id))
        if kind is not None and KINDS[kind][0] == SKIPPED:
            report.add(kind, f"annotation {ann_id}: bbox {ann.get('bbox')!r}")
            continue
        if kind is not None:
            report.add(kind, f"annotation {ann_id}: bbox {ann.get('bbox')!r}")
        if "segmentation" in ann and ann["segmentation"] not in (None, [], {}) and not _segmentation_ok(ann["segmentation"]):
            report.add("bad_segmentation", f"annotation {ann_id}")
            ann = {key: v for key, v in ann.items() if key != "segmentation"}
        if "iscrowd" not in ann or not (_is_number(ann.get("area")) and math.isfinite(ann["area"])):
            ann = {
                "iscrowd": 0,
                **ann,
                "area": ann["area"]
                if _is_number(ann.get("area")) and math.isfinite(ann["area"])
                else float(ann["bbox"][2] * ann["bbox"][3]),
            }
        kept.append(ann)
        crowd_by_image[image_id].append(bool(ann.get("iscrowd", 0)))

    # image files
    image_dir = root / "images"
    skipped = set(report.skipped_image_ids)
    for image_id, info in by_id.items():
        if image_id in skipped:
            continue
        kind, detail = _image_problem(image_dir / info["file_name"], sizes.get(image_id), images)
        if kind is not None:
            report.add(kind, f"image {image_id}: {info['file_name']}{detail}")
            report.skipped_image_ids.append(image_id)
    skipped = set(report.skipped_image_ids)
    for image_id, crowd in crowd_by_image.items():
        if all(crowd) and image_id not in skipped:
            report.add("crowd_only", f"image {image_id}")

    report.boxes = sum(1 for a in kept if not a.get("iscrowd", 0) and a["image_id"] not in skipped)
    for a in kept:
        if not a.get("segmentation") and a["image_id"] not in skipped:
            report.without_mask += 1
            if len(report.without_mask_examples) < MAX_EXAMPLES:
                report.without_mask_examples.append(f"annotation {a['id']}")
    if report.boxes == 0 and report.usable:
        report.add("no_boxes", f"{len(by_id) - len(skipped)} usable images, {len(anns)} annotations")
    if report.usable:
        report.dataset = {**data, "annotations": kept}
    return report


def _bbox_problem(bbox: Any, size: tuple[float, float] | None) -> str | None:
    """The kind of problem of a COCO ``[x, y, w, h]`` box, or None."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return "bad_bbox"
    if not all(math.isfinite(v) for v in bbox):
        return "nonfinite_bbox"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "empty_bbox"
    if size is None:
        return None
    width, height = size
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "bbox_outside"
    t = EDGE_TOLERANCE_PX
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return "bbox_clamped"
    return None


def _image_problem(path: Path, declared: tuple[float, float] | None, mode: ImageCheck) -> tuple[str | None, str]:
    """(kind, detail) of an image file's problem, or (None, "")."""
    if not path.is_file():
        return "missing_image", ""
    if mode == "exists":
        return None, ""
    from PIL import Image

    from training.data.coco import LOAD_ERRORS, load_image

    try:
        if mode == "decode":
            h, w = load_image(path).shape[-2:]
        else:
            with Image.open(path) as pil:
                w, h = pil.size
                if pil.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation: a quarter turn
                    w, h = h, w
    except LOAD_ERRORS as err:
        return "unreadable_image", f" ({type(err).__name__}: {err})"
    if declared is not None and (float(w), float(h)) != declared:
        return "size_mismatch", f" (file {w}x{h}, declared {declared[0]:g}x{declared[1]:g})"
    return None, ""


def check_dataset(root: str | Path, splits: list[str] | None = None, images: ImageCheck = "header") -> list[SplitReport]:
    """Reports of the named splits, or of every ``annotations/*.json`` (train first).

    Raises:
        FileNotFoundError: ``root`` or ``root/annotations`` is not a folder.
    """
    root = Path(root)
    if not (root / "annotations").is_dir():
        raise FileNotFoundError(f"not a dataset folder (no {root / 'annotations'}/): {root}")
    if not splits:
        found = sorted(p.stem for p in (root / "annotations").glob("*.json"))
        splits = ["train"] + [s for s in found if s != "train"]
    return [check_split(root, s, images) for s in splits]


def format_report(report: SplitReport) -> str:
    """The text ``boxteacher check-data`` prints for one split."""
    lines = [
        f"{report.file}: {report.images} images, {report.annotations} annotations, {report.categories} categories, "
        f"{report.boxes} usable boxes -> {'usable' if report.usable else 'NOT usable'}"
    ]
    for severity in (FATAL, SKIPPED, KEPT):
        for p in report.with_severity(severity):
            lines.append(f"  {severity:<7} {'' if p.kind in FILE_LEVEL else p.count:>6}  {p.what}")
            lines += [f"                  {e}" for e in p.examples]
            if p.count > len(p.examples):
                lines.append(f"                  ... and {p.count - len(p.examples)} more")
    if len(lines) == 1:
        lines.append("  no problems found")
    if report.without_mask:
        lines.append(f"  note: {report.without_mask} annotations without a mask (box-only): eval measures box AP only")
    return "\n".join(lines)
