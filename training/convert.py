"""Convert the authors' BoxTeacher / AdelaiDet (BoxInst, CondInst) checkpoints to ours.

Their checkpoints are detectron2 dicts (``{"model": state_dict, ...}``, keys prefixed
``teacher.`` / ``student.`` for BoxTeacher, unprefixed for AdelaiDet) or bare state
dicts. Every key is mapped; an unknown, missing or mis-shaped key is an error that
lists them. The resolved config reproduces their architecture: BGR input with their
mean and std 1, frozen BN, detectron2 ResNet (stride in the 1x1 conv for bottlenecks),
mask-branch and dynamic-head widths read from the weights.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import save_checkpoint
from training.config import Config, build_config
from training.model.condinst import build_model

log = logging.getLogger(__name__)

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip

# Buffers of theirs that are not weights: checked or recorded, never dropped silently.
_SIZES_OF_INTEREST = "mask_head.sizes_of_interest"
_ITER = "mask_head._iter"

_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^backbone\.bottom_up\.stem\.conv1\.weight$"), "backbone.body.conv1.weight"),
    (re.compile(r"^backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)$"), r"backbone.body.bn1.\1"),
    (re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight$"), "{layer}.{1}.conv{2}.weight"),
    (re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)$"), "{layer}.{1}.bn{2}.{3}"),
    (re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight$"), "{layer}.{1}.downsample.0.weight"),
    (re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)$"), "{layer}.{1}.downsample.1.{2}"),
    (re.compile(r"^backbone\.fpn_lateral([345])\.(\w+)$"), "backbone.fpn.inner_blocks.{lvl}.0.{1}"),
    (re.compile(r"^backbone\.fpn_output([345])\.(\w+)$"), "backbone.fpn.layer_blocks.{lvl}.0.{1}"),
    (re.compile(r"^backbone\.top_block\.(p6|p7)\.(\w+)$"), r"backbone.fpn.extra_blocks.\1.\2"),
    (re.compile(r"^proposal_generator\.fcos_head\.(.+)$"), r"head.\1"),
    (re.compile(r"^controller\.(\w+)$"), r"head.controller.\1"),
    (re.compile(r"^mask_branch\.(.+)$"), r"mask_branch.\1"),
]


class ConversionError(ValueError):
    """The checkpoint does not fit our model; the message lists the keys."""


def map_key(key: str) -> str | None:
    """Their key -> ours, or None for a key no rule knows."""
    for pattern, target in _RULES:
        m = pattern.match(key)
        if not m:
            continue
        if "{layer}" in target:
            layer = f"backbone.body.layer{int(m.group(1)) - 1}"
            return target.format(None, *m.groups()[1:], layer=layer)
        if "{lvl}" in target:
            return target.format(None, *m.groups()[1:], lvl=int(m.group(1)) - 3)
        return m.expand(target)
    return None


def read_authors_state(path: str | Path, branch: str = "teacher") -> tuple[dict[str, torch.Tensor], str]:
    """Load their file and pick the branch: returns (float32 state dict, source kind)."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=False)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path}: expected a state dict or a detectron2 checkpoint with a 'model' entry")
    prefixes = {k.split(".", 1)[0] for k in state if k.startswith(("teacher.", "student."))}
    if prefixes:
        if branch not in prefixes:
            raise ConversionError(f"{path}: no '{branch}.' weights (found {sorted(prefixes)})")
        state = {k[len(branch) + 1 :]: v for k, v in state.items() if k.startswith(branch + ".")}
        kind = "boxteacher"
    else:
        kind = "adelaidet"
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)  # detectron2 .pkl files hold numpy arrays
        out[k] = v.float() if v.is_floating_point() else v
    return out, kind


def _infer_depth(state: dict[str, torch.Tensor]) -> int:
    blocks = []
    for stage in range(2, 6):
        ids = {int(m.group(1)) for k in state for m in [re.match(rf"backbone\.bottom_up\.res{stage}\.(\d+)\.", k)] if m}
        blocks.append(len(ids))
    bottleneck = any(".conv3." in k for k in state if k.startswith("backbone.bottom_up"))
    table = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50, (3, 4, 23, 3, True): 101}
    depth = table.get((*blocks, bottleneck))
    if depth is None:
        raise ConversionError(f"unsupported ResNet: blocks per stage {blocks}, bottleneck={bottleneck}")
    return depth


def _infer_head_channels(num_params: int, in_channels: int, layers: int = 3) -> int:
    for hidden in range(1, 257):
        dims = [in_channels + 2] + [hidden] * (layers - 1) + [1]
        if sum(a * b + b for a, b in zip(dims[:-1], dims[1:])) == num_params:
            return hidden
    raise ConversionError(f"controller outputs {num_params} parameters: no 3-layer dynamic head on {in_channels} mask channels fits")


def authors_config(
    state: dict[str, torch.Tensor], kind: str, class_names: list[str] | None = None, overrides: list[str] | None = None
) -> Config:
    """A Config that reproduces the architecture the weights come from."""
    num_classes = state["proposal_generator.fcos_head.cls_logits.weight"].shape[0]
    mask_out = state["mask_branch.tower.4.weight"].shape[0]
    num_params = state["controller.weight"].shape[0]
    depth = _infer_depth(state)
    tower_convs = len([k for k in state if re.match(r"proposal_generator\.fcos_head\.cls_tower\.\d+\.weight$", k)]) // 2
    branch_convs = len({k.split(".")[2] for k in state if k.startswith("mask_branch.tower.")}) - 1
    if class_names is None:
        class_names = COCO_CLASSES if num_classes == 80 else [f"class_{i}" for i in range(num_classes)]
    method = "boxteacher" if kind == "boxteacher" else ("condinst" if mask_out == 8 else "boxinst")
    data = {
        "method": method,
        "class_names": list(class_names),
        "model": {
            "num_classes": num_classes,
            "fpn_channels": state["backbone.fpn_lateral3.weight"].shape[0],
            "backbone": {"depth": depth, "norm": "frozen_bn", "weights": "none", "stride_in_1x1": depth >= 50},
            "fcos": {"num_convs": tower_convs},
            "mask": {
                "branch_channels": state["mask_branch.refine.0.0.weight"].shape[0],
                "branch_num_convs": branch_convs,
                "branch_norm": "bn",
                "out_channels": mask_out,
                "head_channels": _infer_head_channels(num_params, mask_out),
            },
        },
        "input": {"format": "BGR", "pixel_mean": [103.530, 116.280, 123.675], "pixel_std": [1.0, 1.0, 1.0]},
    }
    return build_config(data, overrides)


def convert_state(state: dict[str, torch.Tensor], cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map every key; raise ConversionError listing unknown, missing and mis-shaped keys."""
    model = build_model(cfg)
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unknown, bad_shape, meta = [], [], {}
    for key, value in state.items():
        if key == _SIZES_OF_INTEREST:
            expected = cfg.model.fcos.sizes_of_interest + [cfg.model.fcos.sizes_of_interest[-1] * 2]
            if [int(v) for v in value.tolist()] != expected:
                bad_shape.append(f"{key}: {value.tolist()} != {expected}")
            continue
        if key == _ITER:
            meta["authors_iter"] = float(value.reshape(-1)[0])
            continue
        target = map_key(key)
        if target is None or target not in ours:
            unknown.append(key)
            continue
        if tuple(ours[target].shape) != tuple(value.shape):
            bad_shape.append(f"{key}: {tuple(value.shape)} (ours {target}: {tuple(ours[target].shape)})")
            continue
        mapped[target] = value.to(ours[target].dtype)
    missing = [k for k in ours if k not in mapped and not k.endswith("num_batches_tracked")]
    problems = []
    if unknown:
        problems.append(f"unknown keys ({len(unknown)}): {', '.join(unknown)}")
    if bad_shape:
        problems.append(f"wrong shapes ({len(bad_shape)}): {'; '.join(bad_shape)}")
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if problems:
        raise ConversionError("checkpoint does not fit the model: " + " | ".join(problems))
    for k in ours:
        if k.endswith("num_batches_tracked") and k not in mapped:
            mapped[k] = ours[k]
    return mapped, meta


def convert_authors_checkpoint(
    src: str | Path,
    output: str | Path,
    branch: str = "teacher",
    class_names: list[str] | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Read their checkpoint, convert, and write ours (weights stored as 'student'
    and, for a BoxTeacher teacher, as 'teacher' too so eval/serve pick it by default)."""
    state, kind = read_authors_state(src, branch)
    cfg = authors_config(state, kind, class_names, overrides)
    mapped, meta = convert_state(state, cfg)
    payload = {
        "config": cfg.model_dump(),
        # BoxTeacher: stored under the branch it came from; AdelaiDet: the trained network.
        (branch if kind == "boxteacher" else "student"): mapped,
        "meta": {"converted_from": str(src), "source": kind, "branch": branch, **meta},
    }
    log.info("converted %d tensors from %s (%s, %s branch)", len(mapped), src, kind, branch)
    return save_checkpoint(output, payload)
