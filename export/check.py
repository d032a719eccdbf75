"""Parity of an exported model (ONNX Runtime or TensorRT; encoder and prompt graph) with eager PyTorch.

:func:`eager_outputs` runs the checkpoint's model on the same padded input as the
exported graphs and returns the same named outputs (real rows only);
:func:`exported_outputs` runs the two exported graphs (the prompt graph on the encoder's
own features, as serving does); :func:`compare_outputs` measures the differences of one
image; :func:`check_parity` (``boxteacher export check``) does this over a COCO folder,
with the dataset's true boxes as prompts, and adds segm/bbox AP of the exported and the
eager predictions on the same images, and the eager AP of the student and the teacher branch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from export.metadata import IMAGE_FEATURES, read_metadata
from training.model.condinst import CondInst, InputDetections
from training.model.fcos import Detections, prompt_cells
from training.model.processing import InputSpec, batch_to_spec, resize_to_spec

log = logging.getLogger(__name__)


# ---- one image ------------------------------------------------------------------------
@torch.no_grad()
def eager_outputs(
    model: CondInst,
    images: Tensor,
    image_size: tuple[int, int],
    prompt_boxes: Tensor | None = None,
    max_detections: int | None = None,
    score_threshold: float | None = None,
) -> dict[str, np.ndarray]:
    """Eager ``model.detect`` (+ prompts) on a padded batch (1,3,H,W), as numpy arrays named
    like the graphs' outputs, with only the real detection rows (at most ``max_detections``)."""
    head, feats = model(images.to(model.device))
    hw = (int(image_size[0]), int(image_size[1]))
    k = int(max_detections or model.cfg.model.fcos.max_detections)
    cfg = model.cfg
    if k > cfg.model.fcos.max_detections:  # let detect keep K (the graph's) detections
        model.cfg = cfg.model_copy(deep=True)
        model.cfg.model.fcos.max_detections = k
    try:
        det = model.detect(head, feats, [hw], score_threshold)[0]
    finally:
        model.cfg = cfg
    out = {
        "boxes": det.dets.boxes[:k],
        "labels": det.dets.labels[:k],
        "det_scores": det.dets.det_scores[:k],
        "scores": det.scores[:k],
        "masks": det.mask_probs[:k],
        "num_detections": torch.tensor([min(k, len(det.dets.labels))]),
    }
    if prompt_boxes is not None and len(prompt_boxes):
        labels, det_scores, probs = model.prompt(prompt_cells(head, 0), feats[:1], prompt_boxes.to(model.device).float())
        out.update(prompt_labels=labels, prompt_det_scores=det_scores, prompt_masks=probs)
    return {name: value.detach().cpu().numpy() for name, value in out.items()}


def exported_outputs(
    model, batch: np.ndarray, image_size: tuple[int, int], prompt_boxes: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The encoder's detection outputs and, with prompt boxes, the prompt graph's outputs on the
    encoder's own features (``model``: an :class:`export.onnx_runtime.OnnxModel` or
    :class:`export.tensorrt_runtime.TensorRTModel`), as numpy arrays."""
    encoded = model.encode(batch, np.asarray(image_size, dtype=np.int64))
    out = {name: _numpy(v) for name, v in encoded.items() if name not in IMAGE_FEATURES}
    if prompt_boxes is not None and len(prompt_boxes):
        out.update({name: _numpy(v) for name, v in model.prompt(encoded, np.asarray(prompt_boxes, dtype=np.float32)).items()})
    return out


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two (n, h, w) boolean stacks (1.0 where both are empty)."""
    a = a.reshape(a.shape[0], int(np.prod(a.shape[1:])))
    b = b.reshape(b.shape[0], int(np.prod(b.shape[1:])))
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,4) x (m,4) xyxy -> (n,m) IoU."""
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clip(0).prod(2)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def match_detections(exported: dict[str, np.ndarray], eager: dict[str, np.ndarray], iou: float = 0.5) -> list[tuple[int, int]]:
    """(exported row, eager row) pairs of the same detection.

    Row by row where label and box agree (rows are sorted by score); the rest greedily
    by box IoU >= ``iou`` within the same class, in eager score order. Detections with
    exactly tied scores (flat image regions) may come in another order from another
    runtime; this pairs them anyway.
    """
    n_x = int(exported["num_detections"].reshape(-1)[0])
    n_e = int(eager["num_detections"].reshape(-1)[0])
    bx, be = exported["boxes"][:n_x].astype(np.float64), eager["boxes"][:n_e].astype(np.float64)
    lx, le = exported["labels"][:n_x], eager["labels"][:n_e]
    pairs, used_x, used_e = [], set(), set()
    for i in range(min(n_x, n_e)):
        if lx[i] == le[i] and np.abs(bx[i] - be[i]).max() <= 1e-3 * max(np.abs(be[i]).max(), 1.0):
            pairs.append((i, i))
            used_x.add(i)
            used_e.add(i)
    rest_e = [e for e in range(n_e) if e not in used_e]
    rest_x = [x for x in range(n_x) if x not in used_x]
    if rest_e and rest_x:
        ious = box_iou(be[rest_e], bx[rest_x])
        for a, e in enumerate(rest_e):
            best, best_iou = None, iou
            for b, x in enumerate(rest_x):
                if x not in used_x and lx[x] == le[e] and ious[a, b] >= best_iou:
                    best, best_iou = x, ious[a, b]
            if best is not None:
                used_x.add(best)
                pairs.append((best, e))
    return sorted(pairs, key=lambda p: p[1])


def compare_outputs(exported: dict[str, np.ndarray], eager: dict[str, np.ndarray], mask_threshold: float = 0.5) -> dict[str, Any]:
    """Differences of one image's outputs (exported vs eager, see :func:`eager_outputs`).

    Keys: num_exported, num_eager, same_detections (the same set: every detection paired
    with an identical one), same_order (and in the same order), matched, box_max_abs,
    box_max_rel (|d| / max(|eager|, 1)), det_score_max_abs, score_max_abs, mask_ious
    (np.ndarray over matched rows), padding_ok (labels -1 and zero scores past
    num_detections), and for prompts: prompt_labels_equal, prompt_det_score_max_abs,
    prompt_mask_ious.
    """
    n_x = int(exported["num_detections"].reshape(-1)[0])
    n_e = int(eager["num_detections"].reshape(-1)[0])
    pairs = match_detections(exported, eager)
    xi = np.array([p[0] for p in pairs], dtype=np.int64)
    ei = np.array([p[1] for p in pairs], dtype=np.int64)
    bx, be = exported["boxes"][xi].astype(np.float64), eager["boxes"][ei].astype(np.float64)
    diff = np.abs(bx - be)
    labels = exported["labels"]
    report: dict[str, Any] = {
        "num_exported": n_x,
        "num_eager": n_e,
        # the same set: every detection paired with an (almost) identical box of the same class
        "same_detections": n_x == n_e == len(pairs) and (not len(pairs) or bool(np.all(diff <= 1e-3 * np.maximum(np.abs(be), 1.0)))),
        "same_order": n_x == n_e == len(pairs) and all(x == e for x, e in pairs),
        "matched": len(pairs),
        "box_max_abs": float(diff.max()) if diff.size else 0.0,
        "box_max_rel": float((diff / np.maximum(np.abs(be), 1.0)).max()) if diff.size else 0.0,
        "det_score_max_abs": float(np.abs(exported["det_scores"][xi] - eager["det_scores"][ei]).max()) if len(pairs) else 0.0,
        "score_max_abs": float(np.abs(exported["scores"][xi] - eager["scores"][ei]).max()) if len(pairs) else 0.0,
        "mask_ious": mask_iou(exported["masks"][xi] > mask_threshold, eager["masks"][ei] > mask_threshold),
        "padding_ok": bool(
            np.all(labels[n_x:] == -1)
            and np.all(exported["det_scores"][n_x:] == 0)
            and np.all(exported["scores"][n_x:] == 0)
            and np.all(exported["masks"][n_x:] == 0)
        ),
    }
    if "prompt_labels" in eager:
        report.update(
            prompt_labels_equal=bool(np.array_equal(exported["prompt_labels"], eager["prompt_labels"])),
            prompt_det_score_max_abs=float(np.abs(exported["prompt_det_scores"] - eager["prompt_det_scores"]).max()),
            prompt_mask_ious=mask_iou(exported["prompt_masks"] > mask_threshold, eager["prompt_masks"] > mask_threshold),
        )
    return report


def outputs_to_input_detections(out: dict[str, np.ndarray], input_hw: tuple[int, int]) -> InputDetections:
    """Graph outputs (padded, numpy) -> the model's InputDetections of the real rows, so that
    ``CondInst.to_instances`` pastes them back exactly as eager inference does."""
    n = int(np.asarray(out["num_detections"]).reshape(-1)[0])
    keep = np.flatnonzero(np.asarray(out["labels"])[:n] >= 0)

    def t(name: str) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(out[name])[keep]))

    boxes, labels, det_scores = t("boxes").float(), t("labels").long(), t("det_scores").float()
    m = len(keep)
    dets = Detections(
        boxes, det_scores, labels, torch.zeros(m, 2), torch.zeros(m, dtype=torch.int64), torch.zeros(m, 0), torch.ones(m, dtype=torch.bool)
    )
    return InputDetections(dets, t("masks").float(), t("scores").float(), torch.zeros(m), input_hw)


# ---- runners ----------------------------------------------------------------------------
def load_exported(path: str | Path, device: str = "cpu"):
    """The two graphs of an export: .onnx -> :class:`export.onnx_runtime.OnnxModel`,
    .engine / .plan -> :class:`export.tensorrt_runtime.TensorRTModel` (metadata as ``.metadata``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    read_metadata(path)  # the suffix is known and the metadata readable, before any runtime loads
    if path.suffix.lower() == ".onnx":
        from export.onnx_runtime import OnnxModel

        return OnnxModel(path, device)
    from export.tensorrt_runtime import TensorRTModel

    return TensorRTModel(path, "cuda" if device == "cpu" else device)


def prepare_image(image: Tensor, spec: InputSpec) -> tuple[Tensor, tuple[int, int]]:
    """Original RGB (3,H,W) uint8 -> the exported graph's padded input (1,3,Hp,Wp) and the
    un-padded (h, w): :func:`training.model.processing.resize_to_spec` + ``batch_to_spec``."""
    batch, sizes = batch_to_spec([resize_to_spec(image, spec)], spec)
    return batch, sizes[0]


# ---- a dataset ----------------------------------------------------------------------------
def _dataset(data_dir: str | Path, split: str, class_agnostic: bool):
    from training.data.coco import CocoInstances

    return CocoInstances(data_dir, split, class_agnostic=class_agnostic)


def check_parity(
    weights: str | Path,
    model_path: str | Path,
    data_dir: str | Path,
    *,
    split: str = "val",
    max_images: int | None = None,
    device: str = "cpu",
    branch: str | None = None,
    branches_ap: bool = True,
) -> dict[str, Any]:
    """``boxteacher export check``: exported vs eager on the images of a COCO folder.

    Both run on the same padded input (the exported graph's pre-processing); the image's true
    boxes (scaled to the input) are the prompts of the prompt graph. Returns {"images",
    "branch", "runtime", "parity": {box_max_abs, box_max_rel, det_score_max_abs,
    score_max_abs, mask_iou_mean, mask_iou_min, matched, same_detections_images,
    num_exported, num_eager}, "prompt_parity": {prompts, labels_equal_images,
    det_score_max_abs, mask_iou_mean, mask_iou_min}, "exported": {segm, bbox}, "eager":
    {segm, bbox}, "branches": {student/teacher: {segm, bbox}}} (AP in percent).
    """
    from training.checkpoint import load_model, read_checkpoint
    from training.evaluate import coco_metrics, evaluate_model, instances_to_coco

    exported_model = load_exported(model_path, device)
    meta = exported_model.metadata
    spec = meta.input_spec()
    branch = branch or meta.branch
    model, cfg = load_model(weights, branch=branch, device="cpu")
    k, thr = meta.max_detections, meta.score_threshold
    dataset = _dataset(data_dir, split, bool(cfg.data.class_agnostic))
    if cfg.model.num_classes > dataset.num_classes:
        raise ValueError(
            f"the model has {cfg.model.num_classes} classes but {data_dir} ({split}) has {dataset.num_classes}: "
            "check the checkpoint against the dataset it was trained for"
        )
    if cfg.model.num_classes < dataset.num_classes:
        log.warning(
            "the model has %d classes, %s has %d: AP counts the missing ones as 0", cfg.model.num_classes, data_dir, dataset.num_classes
        )
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n == 0:
        raise ValueError(f"no readable images in {data_dir} ({split})")
    results: dict[str, tuple[list, list]] = {"exported": ([], []), "eager": ([], [])}
    ids: list[int] = []
    box_abs = box_rel = det_abs = score_abs = 0.0
    ious: list[np.ndarray] = []
    same = matched = n_x = n_e = 0
    prompt_ious: list[np.ndarray] = []
    prompts = labels_equal = 0
    prompt_det_abs = 0.0
    for i in range(n):
        image, target = dataset[i]
        image_id = int(target["image_id"])
        if image_id in ids:
            continue
        ids.append(image_id)
        batch, hw = prepare_image(image, spec)
        scale = torch.tensor([hw[1] / image.shape[-1], hw[0] / image.shape[-2]] * 2)
        boxes = (target["boxes"].float().reshape(-1, 4) * scale).numpy()
        exported = exported_outputs(exported_model, batch.numpy(), hw, boxes)
        eager = eager_outputs(model, batch, hw, torch.from_numpy(boxes), k, thr)
        r = compare_outputs(exported, eager, cfg.model.mask.threshold)
        if "prompt_labels_equal" in r:
            prompts += len(boxes)
            labels_equal += r["prompt_labels_equal"]
            prompt_det_abs = max(prompt_det_abs, r["prompt_det_score_max_abs"])
            prompt_ious.append(r["prompt_mask_ious"])
        box_abs, box_rel = max(box_abs, r["box_max_abs"]), max(box_rel, r["box_max_rel"])
        det_abs, score_abs = max(det_abs, r["det_score_max_abs"]), max(score_abs, r["score_max_abs"])
        ious.append(r["mask_ious"])
        same += r["same_detections"]
        matched += r["matched"]
        n_x += r["num_exported"]
        n_e += r["num_eager"]
        out_hw = (int(image.shape[-2]), int(image.shape[-1]))
        for name, out in (("exported", exported), ("eager", eager)):
            inst = model.to_instances(outputs_to_input_detections(out, hw), out_hw)
            b, s = instances_to_coco(inst, image_id, dataset.label_to_category_id)
            results[name][0].extend(b)
            results[name][1].extend(s)
    all_ious = np.concatenate(ious) if ious else np.zeros(0)
    all_prompt_ious = np.concatenate(prompt_ious) if prompt_ious else np.zeros(0)
    use_cats = not cfg.data.class_agnostic
    report: dict[str, Any] = {
        "images": len(ids),
        "branch": branch,
        "runtime": "tensorrt" if Path(model_path).suffix.lower() in (".engine", ".plan") else "onnxruntime",
        "parity": {
            "box_max_abs": box_abs,
            "box_max_rel": box_rel,
            "det_score_max_abs": det_abs,
            "score_max_abs": score_abs,
            "mask_iou_mean": float(all_ious.mean()) if all_ious.size else None,
            "mask_iou_min": float(all_ious.min()) if all_ious.size else None,
            "matched": matched,
            "num_exported": n_x,
            "num_eager": n_e,
            "same_detections_images": same,
        },
        "prompt_parity": {
            "prompts": prompts,
            "labels_equal_images": labels_equal,
            "images_with_prompts": len(prompt_ious),
            "det_score_max_abs": prompt_det_abs,
            "mask_iou_mean": float(all_prompt_ious.mean()) if all_prompt_ious.size else None,
            "mask_iou_min": float(all_prompt_ious.min()) if all_prompt_ious.size else None,
        },
    }
    for name, (bbox, segm) in results.items():
        report[name] = {
            "segm": coco_metrics(dataset.coco, segm, "segm", ids, use_cats),
            "bbox": coco_metrics(dataset.coco, bbox, "bbox", ids, use_cats),
        }
    if branches_ap:
        ckpt = read_checkpoint(weights)
        present = [b for b in ("student", "teacher") if ckpt.get(b) is not None]
        del ckpt
        report["branches"] = {}
        for b in present:
            m, _ = load_model(weights, branch=b, device="cpu")
            metrics = evaluate_model(m, data_dir, split, max_images=max_images)
            report["branches"][b] = {"segm": metrics["segm"], "bbox": metrics["bbox"]}
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of :func:`check_parity`."""
    p = report["parity"]
    iou_mean = "n/a" if p["mask_iou_mean"] is None else f"{p['mask_iou_mean']:.4f}"
    iou_min = "n/a" if p["mask_iou_min"] is None else f"{p['mask_iou_min']:.4f}"
    lines = [
        f"{report['runtime']} vs eager PyTorch ({report['branch']} branch), {report['images']} images",
        f"  detections: exported {p['num_exported']}, eager {p['num_eager']}, matched {p['matched']}; "
        f"the same detections on {p['same_detections_images']}/{report['images']} images",
        f"  boxes: max |d| {p['box_max_abs']:.3g} px (relative {p['box_max_rel']:.3g}); "
        f"det scores max |d| {p['det_score_max_abs']:.3g}; mask-aware scores max |d| {p['score_max_abs']:.3g}",
        f"  mask IoU of matched instances: mean {iou_mean}, min {iou_min}",
        _prompt_line(report.get("prompt_parity")),
        f"  segm AP: exported {report['exported']['segm']['AP']:.2f}, eager {report['eager']['segm']['AP']:.2f}; "
        f"bbox AP: exported {report['exported']['bbox']['AP']:.2f}, eager {report['eager']['bbox']['AP']:.2f}",
    ]
    for b, m in report.get("branches", {}).items():
        lines.append(f"  eager {b} (test-scale predict): segm AP {m['segm']['AP']:.2f}, bbox AP {m['bbox']['AP']:.2f}")
    return "\n".join(lines)


def _prompt_line(p: dict[str, Any] | None) -> str:
    if not p or not p["prompts"]:
        return "  prompt graph: no boxes to prompt with"
    return (
        f"  prompt graph ({p['prompts']} true boxes as prompts): labels equal on {p['labels_equal_images']}/{p['images_with_prompts']} images; "
        f"det scores max |d| {p['det_score_max_abs']:.3g}; mask IoU mean {p['mask_iou_mean']:.4f}, min {p['mask_iou_min']:.4f}"
    )


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
