"""The one typed configuration of boxteacher.

Every default lives here, once, with a comment. Recipes in ``configs/`` are small
YAML files that override some fields; the command line overrides further with
dotted ``key=value`` pairs (``solver.base_lr=0.005``). A checkpoint stores the
fully resolved config, so ``eval``, ``export``, ``serve`` and the Label Studio
backend only need the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    # Unknown keys are a mistake in a recipe: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(_Section):
    depth: Literal[18, 34, 50, 101] = 50  # ResNet depth (torchvision ResNet)
    # frozen_bn: for pretrained weights (the paper). bn / gn: trainable norms, needed
    # when training from scratch (frozen identity BN makes a from-scratch net diverge).
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"
    # "imagenet": torchvision's weights API; "none": random init; or a path to a
    # torchvision-style ResNet state dict.
    weights: str = "imagenet"
    freeze_at: int = Field(2, ge=0, le=5)  # 0: nothing frozen; 1: stem; 2: stem+res2 ...
    # detectron2/MSRA bottlenecks put the stride in the first 1x1 conv instead of the 3x3.
    stride_in_1x1: bool = False


class FCOSConfig(_Section):
    num_convs: int = 4  # convs in each of the cls and bbox towers
    prior_prob: float = 0.01  # initial foreground probability of the classifier
    strides: list[int] = [8, 16, 32, 64, 128]  # P3..P7
    sizes_of_interest: list[int] = [64, 128, 256, 512]  # max(l,t,r,b) ranges per level
    center_sample_radius: float = 1.5  # in strides; 0 disables centre sampling
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Training only: the box-side ReLU passes its gradient straight through, so a side that
    # went negative everywhere can recover (training.model.fcos.relu_straight_through).
    # False: AdelaiDet's plain ReLU, whose dead side stalls box regression from scratch.
    reg_straight_through: bool = True
    # Inference
    score_threshold: float = 0.05  # on cls*ctr (thresh_with_ctr) before NMS
    pre_nms_topk: int = 1000  # per level
    nms_threshold: float = 0.6  # IoU above which the lower-scored box is dropped
    # False: NMS per class (FCOS, the authors): one object may keep a box for each class a weak
    # model hesitates between. True: one NMS over all classes, so one object keeps one box with
    # the class of its best-scoring box (what a user reading the output expects).
    class_agnostic_nms: bool = False
    max_detections: int = 100  # per image after NMS


class MaskConfig(_Section):
    branch_channels: int = 128  # channels inside the mask branch
    branch_num_convs: int = 4  # tower convs after the P3-P5 fusion
    branch_norm: Literal["bn", "gn", "none"] = "bn"
    out_channels: int = 16  # mask features fed to the dynamic head (8: CondInst, 16: BoxInst)
    head_channels: int = 8  # hidden width of the dynamic mask head
    head_layers: int = 3
    out_stride: int = 4  # masks are predicted at stride 8 then upsampled to this stride
    threshold: float = 0.5  # probability threshold for binary masks and the mask-aware score
    # Mask-loss proposals: BoxInst/BoxTeacher keep the top-k positives per image (per GT
    # at most max(k // #GT, 1)); CondInst samples at most max_proposals at random.
    topk_proposals_per_image: int = 64
    max_proposals: int = 500
    # Gradient the mask losses send back into the detector, as a factor at the two places
    # where the mask path meets it: the controller on the box tower, and the mask branch on
    # P3-P5. 1.0: all of it (the authors); 0.0: none (the mask path learns on the detector's
    # features without moving them). None: 1.0 for condinst, 0.0 for boxinst/boxteacher
    # (Config.mask_grad_scales; docs/method.md, "Box supervision from scratch").
    controller_grad_scale: float | None = Field(None, ge=0.0, le=1.0)
    branch_grad_scale: float | None = Field(None, ge=0.0, le=1.0)


class ModelConfig(_Section):
    num_classes: int = 80
    fpn_channels: int = 256
    backbone: BackboneConfig = BackboneConfig()
    fcos: FCOSConfig = FCOSConfig()
    mask: MaskConfig = MaskConfig()
    # Start from any checkpoint (ours): weights are loaded after the model is built;
    # a classifier with another number of classes is re-initialised.
    weights: str | None = None


class InputConfig(_Section):
    format: Literal["RGB", "BGR"] = "RGB"  # channel order the network sees
    # torchvision ImageNet statistics in 0-255 units. The authors' MSRA weights use
    # BGR, mean [103.53, 116.28, 123.675], std 1.
    pixel_mean: list[float] = [123.675, 116.28, 103.53]
    pixel_std: list[float] = [58.395, 57.12, 57.375]
    min_size_train: list[int] = [640, 672, 704, 736, 768, 800]  # short side, one chosen per image
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    hflip_prob: float = 0.5
    size_divisibility: int = 32  # pad the batch to a multiple of this


class BoxInstConfig(_Section):
    pairwise_size: int = 3
    pairwise_dilation: int = 2
    color_threshold: float = 0.3  # edges with LAB similarity >= this are "same label"
    color_theta: float = 2.0
    pairwise_warmup_iters: int = 10000
    bottom_pixels_removed: int = 10  # COCO's bottom rows are badly annotated; 0 elsewhere
    # Weight of the outside-box background term (training.losses.outside_box_loss; not in
    # BoxInst: 0 is the published method).
    outside_weight: float = Field(1.0, ge=0.0)
    # Weight of the cross-entropy on the max projections (training.losses.projection_bce_loss;
    # not in BoxInst: 0 is the published method).
    projection_bce_weight: float = Field(1.0, ge=0.0)
    # Project masks over the image only, not the padded canvas (training.losses.restrict_to_image;
    # False: BoxInst as published, whose padding a head trained from scratch learns to paint).
    projection_in_image: bool = True
    # Dice towards the filled box, weight falling linearly from box_prior_weight to 0 over
    # box_prior_iters (training.losses.box_prior_loss; not in BoxInst: 0 is the published method).
    # None: over the pairwise term's warm-up, so that the prior hands over as the pairwise term rises.
    # 0.3: 3 seeds on Penn-Fudan gave segm AP 11.5 / 11.4 (BoxInst / BoxTeacher) against 10.2 /
    # 10.6 with weight 1, and no collapse (docs/results.md, "The box prior").
    box_prior_weight: float = Field(0.3, ge=0.0)
    box_prior_iters: int | None = Field(None, ge=0)

    @property
    def prior_iters(self) -> int:
        """``box_prior_iters`` with None resolved to ``pairwise_warmup_iters``."""
        return self.pairwise_warmup_iters if self.box_prior_iters is None else self.box_prior_iters


class BoxTeacherConfig(_Section):
    momentum: float = 0.999  # final EMA momentum; ramp min(m, 1 - 1/(it+1)) before
    iou_threshold: float = 0.5  # Algorithm 1
    score_threshold: float = 0.05  # tau_c on the teacher's detection score
    teacher_min_size: int = 800  # the teacher sees the image re-sized to the test scale
    teacher_max_size: int = 1333
    # Flip test-time augmentation of the teacher: it also labels each image mirrored and the
    # two views' masks are averaged (training.boxteacher.merge_teacher_views). Not in the paper.
    teacher_flip: bool = False
    # Multi-scale test-time augmentation of the teacher: shorter sides it also labels each image
    # at (same max size), each also mirrored with teacher_flip; all views' masks are averaged.
    # Not in the paper. [] : one scale, teacher_min_size.
    teacher_extra_sizes: list[int] = []
    strong_augmentation: Literal["strong", "strongv2", "weak", "none"] = "strong"
    pixel_loss: Literal["dice", "bce", "none"] = "dice"
    pixel_weight: float = 0.5
    use_affinity: bool = True
    affinity_weight: float = 0.1
    affinity_threshold: float = 0.5
    affinity_mode: Literal["paper", "label", "authors"] = "paper"  # see training.boxteacher.affinity_loss
    quality: Literal["none", "cls", "iou", "mean_entropy", "mask_aware", "mask_aware_authors"] = "mask_aware"
    warmup_iters: int = 10000  # linear warm-up of the pseudo-mask losses


class SolverConfig(_Section):
    batch_size: int = 16  # total over all processes
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_iter: int = 90000
    steps: list[int] = [60000, 80000]  # lr x gamma at each
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float | None = None  # None: no clipping
    # "global": one norm over all parameters; "per_group": the detector and the mask path
    # clipped apart (training.train.clip_gradients); "auto": global for condinst, per_group
    # for boxinst/boxteacher (Config.clip_mode).
    clip_grad_mode: Literal["auto", "global", "per_group"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    grad_accum_steps: int = 1
    # Linear scaling rule: when set, lr and batch scale together from this reference.
    reference_world_size: int | None = None
    # Memory format of the networks while training. "auto": channels_last (NHWC) on CPU,
    # where oneDNN's NHWC convolutions are faster (R-50 BoxTeacher step: 3.8 vs 4.4 s);
    # contiguous (NCHW) on GPU.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"


class DataConfig(_Section):
    class_agnostic: bool = False  # every category becomes one "object" class
    num_workers: int = 2


class TrainConfig(_Section):
    seed: int = 0
    eval_period: int = 10000
    checkpoint_period: int = 5000
    log_period: int = 20
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 20  # stop when this many consecutive steps are non-finite


class Config(_Section):
    method: Literal["condinst", "boxinst", "boxteacher"] = "boxteacher"
    model: ModelConfig = ModelConfig()
    input: InputConfig = InputConfig()
    boxinst: BoxInstConfig = BoxInstConfig()
    boxteacher: BoxTeacherConfig = BoxTeacherConfig()
    solver: SolverConfig = SolverConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    class_names: list[str] = []  # filled from the dataset; saved with checkpoints

    @property
    def box_supervised(self) -> bool:
        return self.method != "condinst"

    @property
    def mask_grad_scales(self) -> tuple[float, float]:
        """(controller, mask branch) gradient scales into the detector, "auto" (None) resolved:
        1.0 with mask supervision, 0.0 with box supervision."""
        auto = 0.0 if self.box_supervised else 1.0
        m = self.model.mask
        return (
            auto if m.controller_grad_scale is None else m.controller_grad_scale,
            auto if m.branch_grad_scale is None else m.branch_grad_scale,
        )

    @property
    def clip_mode(self) -> str:
        """``solver.clip_grad_mode`` with "auto" resolved: per_group with box supervision."""
        if self.solver.clip_grad_mode != "auto":
            return self.solver.clip_grad_mode
        return "per_group" if self.box_supervised else "global"

    @model_validator(mode="after")
    def _check(self) -> Config:
        if len(self.input.pixel_mean) != 3 or len(self.input.pixel_std) != 3:
            raise ValueError("input.pixel_mean and input.pixel_std need 3 values each")
        if len(self.model.fcos.sizes_of_interest) != len(self.model.fcos.strides) - 1:
            raise ValueError("model.fcos.sizes_of_interest needs one value less than model.fcos.strides")
        if self.class_names and len(self.class_names) != self.model.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names but model.num_classes is {self.model.num_classes}")
        return self


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message names the key."""


def _parse_value(text: str) -> Any:
    """Parse an override's value as YAML (numbers, lists, booleans, null)."""
    return yaml.safe_load(text) if text != "" else ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Validate a config tree plus ``key=value`` overrides into a :class:`Config`."""
    tree: dict = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_value(value.strip()))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {_format_errors(err)}") from None


BASE_KEY = "base"
"""A recipe may name one base recipe (a path relative to its own folder) and override it."""


def _read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def merge_recipes(base: dict, override: dict) -> dict:
    """``override`` over ``base``: sections (mappings) merge key by key, any other value
    (numbers, strings, lists) replaces the base's."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge_recipes(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_recipe(path: str | Path) -> dict:
    """A YAML recipe as a dict, with its ``base:`` recipe merged under it (one level: a base
    that names a base of its own is an error, so a recipe is readable from two files)."""
    path = Path(path)
    data = _read_yaml_mapping(path)
    base_name = data.pop(BASE_KEY, None)
    if base_name is None:
        return data
    base_path = path.parent / str(base_name)
    base = _read_yaml_mapping(base_path)
    if BASE_KEY in base:
        raise ConfigError(f"{path}: its base {base_path} names a base of its own; recipes allow one level of base")
    return merge_recipes(base, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply overrides."""
    data = read_recipe(path) if path is not None else {}
    return build_config(data, overrides)
