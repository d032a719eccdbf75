"""FCOS: the shared head over P3-P7, its targets, its losses and its decoding.

Boxes are xyxy in input pixels. Regression is (l, t, r, b) distances from a
location, in units of the level's stride. Locations of level s are
(x*s + s//2, y*s + s//2), flattened row-major (y outer, x inner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, sigmoid_focal_loss

from training.config import FCOSConfig
from training.model.mask_head import scale_gradient

INF = 1e8


class Scale(nn.Module):
    """A learnable scalar per FPN level multiplying the box regression."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([value]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def relu_straight_through(x: Tensor) -> Tensor:
    """ReLU in the forward pass, identity in the backward pass (a straight-through estimator).

        forward: max(x, 0)        backward: dL/dx = dL/dy

    FCOS regresses box sides as relu(scale * conv). A side whose pre-activation is negative at
    every positive location outputs 0 and, through a plain ReLU, gets no gradient again: its
    box side is stuck at 0 and the GIoU loss stalls (measured on Penn-Fudan from scratch: the
    left side dead at 100% of positives in every stalled run). The targets are always > 0, so
    the passed-through gradient only ever pushes such a side back up. Training only: the
    forward value, inference and export are unchanged.
    """
    return x + (F.relu(x) - x).detach()


@dataclass
class HeadOutputs:
    """Raw per-level head outputs (lists over P3..P7, each (B, *, h, w)).

    cls_logits: (B, K, h, w) logits; bbox_reg: (B, 4, h, w) ltrb in strides (after
    scale and ReLU); ctrness: (B, 1, h, w) logits; controller: (B, P, h, w).
    """

    cls_logits: list[Tensor]
    bbox_reg: list[Tensor]
    ctrness: list[Tensor]
    controller: list[Tensor]


class FCOSHead(nn.Module):
    """GN towers for classification and boxes; centerness and the CondInst controller
    sit on the box tower. Module names follow AdelaiDet (cls_tower.0 conv, .1 GN ...)."""

    def __init__(self, in_channels: int, num_classes: int, num_params: int, cfg: FCOSConfig, controller_grad_scale: float = 1.0):
        super().__init__()
        self.controller_grad_scale = controller_grad_scale  # gradient from the controller into the box tower
        self.reg_straight_through = cfg.reg_straight_through
        self.cls_tower = _tower(in_channels, cfg.num_convs)
        self.bbox_tower = _tower(in_channels, cfg.num_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.controller = nn.Conv2d(in_channels, num_params, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in cfg.strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - cfg.prior_prob) / cfg.prior_prob))

    def forward(self, features: list[Tensor]) -> HeadOutputs:
        out = HeadOutputs([], [], [], [])
        for level, x in enumerate(features):
            cls_t = self.cls_tower(x)
            box_t = self.bbox_tower(x)
            out.cls_logits.append(self.cls_logits(cls_t))
            reg = self.scales[level](self.bbox_pred(box_t))
            straight = self.reg_straight_through and self.training and torch.is_grad_enabled()
            out.bbox_reg.append(relu_straight_through(reg) if straight else F.relu(reg))
            out.ctrness.append(self.ctrness(box_t))
            out.controller.append(self.controller(scale_gradient(box_t, self.controller_grad_scale)))
        return out


def compute_locations(h: int, w: int, stride: int, device=None, dtype=torch.float32) -> Tensor:
    """(h*w, 2) (x, y) centres of a level's cells, row-major."""
    xs = torch.arange(w, device=device, dtype=dtype) * stride + stride // 2
    ys = torch.arange(h, device=device, dtype=dtype) * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def level_size_ranges(sizes_of_interest: list[int]) -> list[tuple[float, float]]:
    """[64,128,256,512] -> [(-1,64), (64,128), (128,256), (256,512), (512, inf)]."""
    bounds = [-1.0] + [float(s) for s in sizes_of_interest] + [INF]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class FCOSTargets:
    """Targets for all locations of a batch, flattened image-major then level, then row-major.

    labels: (N,) int64, ``num_classes`` = background; reg: (N, 4) ltrb / stride;
    gt_inds: (N,) int64 index into the batch's concatenated GT boxes, -1 = background;
    ctrness: (N,) centerness target (0 for background).
    """

    labels: Tensor
    reg: Tensor
    gt_inds: Tensor
    ctrness: Tensor


def centerness_target(reg: Tensor) -> Tensor:
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) for (N,4) ltrb; 0 for empty rows."""
    if reg.numel() == 0:
        return reg.new_zeros(0)
    lr, tb = reg[:, [0, 2]], reg[:, [1, 3]]
    ratio = (lr.min(1).values / lr.max(1).values.clamp(min=1e-12)) * (tb.min(1).values / tb.max(1).values.clamp(min=1e-12))
    return ratio.clamp(min=0).sqrt()


def assign_targets_single(
    locations: Tensor,
    level_of_location: Tensor,
    boxes: Tensor,
    labels: Tensor,
    num_classes: int,
    strides: list[int],
    sizes_of_interest: list[int],
    center_sample_radius: float,
    centers: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """FCOS assignment for one image.

    locations (L,2) xy pixels, level_of_location (L,) int64, boxes (G,4) xyxy, labels (G,).
    A location is positive for a box when it lies inside the box's centre region
    (centre +- radius*stride, clipped to the box; the whole box when radius is 0)
    and max(l,t,r,b) falls in its level's size range. Ambiguity goes to the smallest
    box. ``centers`` (G,2) overrides the box centres (e.g. mask centroids).
    Returns labels (L,) (num_classes = background), ltrb in pixels (L,4), gt index (L,) (-1 bg).
    """
    L = locations.shape[0]
    if boxes.shape[0] == 0:
        return (
            torch.full((L,), num_classes, dtype=torch.int64, device=locations.device),
            locations.new_zeros(L, 4),
            torch.full((L,), -1, dtype=torch.int64, device=locations.device),
        )
    xs, ys = locations[:, 0:1], locations[:, 1:2]
    ltrb = torch.stack([xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys], dim=2)  # (L,G,4)
    if center_sample_radius > 0:
        if centers is None:
            centers = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)
        stride = torch.tensor(strides, dtype=locations.dtype, device=locations.device)[level_of_location]
        radius = (stride * center_sample_radius)[:, None]  # (L,1)
        cx, cy = centers[:, 0][None], centers[:, 1][None]
        x1 = torch.maximum(cx - radius, boxes[:, 0][None])
        y1 = torch.maximum(cy - radius, boxes[:, 1][None])
        x2 = torch.minimum(cx + radius, boxes[:, 2][None])
        y2 = torch.minimum(cy + radius, boxes[:, 3][None])
        inside = torch.stack([xs - x1, ys - y1, x2 - xs, y2 - ys], dim=2).min(dim=2).values > 0
    else:
        inside = ltrb.min(dim=2).values > 0
    ranges = torch.tensor(level_size_ranges(sizes_of_interest), dtype=locations.dtype, device=locations.device)
    lo, hi = ranges[level_of_location, 0:1], ranges[level_of_location, 1:2]
    max_reg = ltrb.max(dim=2).values
    in_level = (max_reg >= lo) & (max_reg <= hi)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(L, -1).clone()
    area[~inside] = INF
    area[~in_level] = INF
    min_area, gt_index = area.min(dim=1)
    positive = min_area < INF
    out_labels = torch.where(positive, labels[gt_index], torch.full_like(gt_index, num_classes))
    out_reg = ltrb[torch.arange(L, device=locations.device), gt_index]
    out_inds = torch.where(positive, gt_index, torch.full_like(gt_index, -1))
    return out_labels, out_reg, out_inds


def fcos_targets(
    feature_hw: list[tuple[int, int]],
    gt_boxes: list[Tensor],
    gt_labels: list[Tensor],
    num_classes: int,
    cfg: FCOSConfig,
    gt_centers: list[Tensor | None] | None = None,
) -> FCOSTargets:
    """Targets for a batch, in the flattening order of :func:`flatten_head_outputs`."""
    device = gt_boxes[0].device if gt_boxes else None
    locs, lvls = [], []
    for level, ((h, w), s) in enumerate(zip(feature_hw, cfg.strides)):
        loc = compute_locations(h, w, s, device=device)
        locs.append(loc)
        lvls.append(torch.full((loc.shape[0],), level, dtype=torch.int64, device=device))
    locations, levels = torch.cat(locs), torch.cat(lvls)
    strides = torch.tensor(cfg.strides, dtype=torch.float32, device=device)[levels]
    all_labels, all_reg, all_inds = [], [], []
    offset = 0
    for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        centers = gt_centers[i] if gt_centers is not None else None
        lab, reg, inds = assign_targets_single(
            locations, levels, boxes.float(), labels, num_classes, cfg.strides, cfg.sizes_of_interest, cfg.center_sample_radius, centers
        )
        all_labels.append(lab)
        all_reg.append(reg / strides[:, None])
        all_inds.append(torch.where(inds >= 0, inds + offset, inds))
        offset += boxes.shape[0]
    labels, reg, inds = torch.cat(all_labels), torch.cat(all_reg), torch.cat(all_inds)
    ctr = torch.zeros_like(reg[:, 0])
    pos = inds >= 0
    ctr[pos] = centerness_target(reg[pos])
    return FCOSTargets(labels, reg, inds, ctr)


def flatten_head_outputs(outputs: HeadOutputs) -> dict[str, Tensor]:
    """Per-level (B, C, h, w) lists -> (B * sum(h*w), C), image-major then level."""

    def cat(tensors: list[Tensor]) -> Tensor:
        b, c = tensors[0].shape[:2]
        flat = [t.permute(0, 2, 3, 1).reshape(b, -1, c) for t in tensors]
        return torch.cat(flat, dim=1).reshape(-1, c)

    return {
        "cls_logits": cat(outputs.cls_logits),
        "bbox_reg": cat(outputs.bbox_reg),
        "ctrness": cat(outputs.ctrness).squeeze(1),
        "controller": cat(outputs.controller),
    }


def giou_loss_ltrb(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Sum of 1 - GIoU between boxes given as (l,t,r,b) from the same location (N,4).

    IoU = (I + 1) / (U + 1) as in FCOS/AdelaiDet; optional per-box weight (N,).
    """
    pl, pt, pr, pb = pred.unbind(1)
    tl, tt, tr, tb = target.unbind(1)
    target_area = (tl + tr) * (tt + tb)
    pred_area = (pl + pr) * (pt + pb)
    w_inter = torch.minimum(pl, tl) + torch.minimum(pr, tr)
    h_inter = torch.minimum(pb, tb) + torch.minimum(pt, tt)
    w_enclose = torch.maximum(pl, tl) + torch.maximum(pr, tr)
    h_enclose = torch.maximum(pb, tb) + torch.maximum(pt, tt)
    enclose = (w_enclose * h_enclose).clamp(min=1e-7)
    inter = w_inter * h_inter
    union = target_area + pred_area - inter
    iou = (inter + 1.0) / (union + 1.0)
    giou = iou - (enclose - union) / enclose
    loss = 1 - giou
    if weight is not None:
        loss = loss * weight
    return loss.sum()


def fcos_losses(flat: dict[str, Tensor], targets: FCOSTargets, num_classes: int, cfg: FCOSConfig, reduce_mean=None) -> dict[str, Tensor]:
    """Focal classification, centerness-weighted GIoU and centerness BCE.

    Normalised like AdelaiDet: cls and ctr by the mean number of positives across
    processes (>= 1), loc by the mean sum of centerness targets. ``reduce_mean``
    averages a scalar tensor across processes (identity when None).
    """
    reduce_mean = reduce_mean or (lambda t: t)
    logits = flat["cls_logits"]
    pos = torch.nonzero(targets.labels != num_classes).squeeze(1)
    num_pos = reduce_mean(torch.tensor(float(pos.numel()), device=logits.device)).clamp(min=1.0)
    onehot = torch.zeros_like(logits)
    onehot[pos, targets.labels[pos]] = 1.0
    loss_cls = sigmoid_focal_loss(logits, onehot, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="sum") / num_pos
    if pos.numel() > 0:
        ctr_t = targets.ctrness[pos]
        ctr_denorm = reduce_mean(ctr_t.sum().detach()).clamp(min=1e-6)
        loss_loc = giou_loss_ltrb(flat["bbox_reg"][pos], targets.reg[pos], ctr_t) / ctr_denorm
        loss_ctr = F.binary_cross_entropy_with_logits(flat["ctrness"][pos], ctr_t, reduction="sum") / num_pos
    else:
        ctr_denorm = reduce_mean(logits.new_zeros(())).clamp(min=1e-6)  # keep collectives in step across ranks
        loss_loc = flat["bbox_reg"].sum() * 0.0
        loss_ctr = flat["ctrness"].sum() * 0.0
    return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}


@dataclass
class Detections:
    """Detections of one image, sorted by detection score (descending).

    boxes (n,4) xyxy input pixels (unclipped); det_scores (n,) sqrt(cls*ctr);
    labels (n,) int64; locations (n,2); levels (n,) int64; params (n,P) controller
    outputs; valid (n,) bool (False for padding candidates under the threshold).
    """

    boxes: Tensor
    det_scores: Tensor
    labels: Tensor
    locations: Tensor
    levels: Tensor
    params: Tensor
    valid: Tensor

    def select(self, index: Tensor) -> Detections:
        return Detections(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def non_max_suppression(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, class_agnostic: bool = False) -> Tensor:
    """Greedy NMS: indices (int64) of the kept boxes, by decreasing score.

    boxes (n,4) xyxy; scores (n,); labels (n,) int64. A box is dropped when a higher-scored
    kept box overlaps it with IoU > ``iou_threshold`` and, class-aware, has the same label;
    class-agnostic, any label (one box per object, with its best box's class). One
    ``batched_nms`` either way (all labels 0 when class-agnostic), so both export to ONNX alike.
    """
    return batched_nms(boxes, scores, torch.zeros_like(labels) if class_agnostic else labels, iou_threshold)


def decode_detections(outputs: HeadOutputs, image_index: int, cfg: FCOSConfig, score_threshold: float | None = None) -> Detections:
    """FCOS inference for image ``image_index`` of the batch: per-level top-k on
    cls*ctr, NMS (per class, or over all classes with ``cfg.class_agnostic_nms``), keep the
    best ``max_detections``.

    Shape-static where it can be: candidates under the threshold are kept with score
    0 (they sort last and cannot suppress a real detection) and marked invalid, so
    the same code exports to ONNX; eager callers drop ``~valid``.
    """
    thr = cfg.score_threshold if score_threshold is None else score_threshold
    boxes, scores, labels, locs, lvls, params = [], [], [], [], [], []
    for level, stride in enumerate(cfg.strides):
        cls = outputs.cls_logits[level][image_index]  # (C,h,w)
        c, h, w = cls.shape
        prob = (cls.sigmoid() * outputs.ctrness[level][image_index].sigmoid()).permute(1, 2, 0).reshape(-1)  # (h*w*C)
        prob = torch.where(prob > thr, prob, torch.zeros_like(prob))
        k = min(cfg.pre_nms_topk, prob.shape[0])
        top, idx = prob.topk(k, sorted=False)
        loc_idx, cls_idx = idx // c, idx % c
        loc = compute_locations(h, w, stride, device=cls.device, dtype=cls.dtype)[loc_idx]
        reg = outputs.bbox_reg[level][image_index].permute(1, 2, 0).reshape(h * w, 4)[loc_idx] * stride
        boxes.append(torch.stack([loc[:, 0] - reg[:, 0], loc[:, 1] - reg[:, 1], loc[:, 0] + reg[:, 2], loc[:, 1] + reg[:, 3]], dim=1))
        scores.append(top.sqrt())
        labels.append(cls_idx)
        locs.append(loc)
        lvls.append(torch.full_like(cls_idx, level))
        ctl = outputs.controller[level][image_index]
        params.append(ctl.permute(1, 2, 0).reshape(h * w, ctl.shape[0])[loc_idx])
    boxes_t, scores_t, labels_t = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = non_max_suppression(boxes_t, scores_t, labels_t, cfg.nms_threshold, cfg.class_agnostic_nms)[: cfg.max_detections]
    dets = Detections(boxes_t, scores_t, labels_t, torch.cat(locs), torch.cat(lvls), torch.cat(params), scores_t > math.sqrt(max(thr, 0.0)))
    return dets.select(keep)


@dataclass
class PromptCells:
    """What box prompts need from the FCOS head of one image: every cell of P3..P7, level
    after level, each level row-major (N cells in all).

    scores (N,) max over classes of cls * ctr probability; classes (N,) int64 its class;
    params (N, P) controller outputs. The image part of box prompting: computed once per
    image, then any number of boxes read it (:func:`prompt_detections`).
    """

    scores: Tensor
    classes: Tensor
    params: Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scores, self.classes, self.params))


def prompt_cells(outputs: HeadOutputs, image_index: int) -> PromptCells:
    """:class:`PromptCells` of image ``image_index`` of the batch (shape-static; exports)."""
    scores, classes, params = [], [], []
    for level in range(len(outputs.cls_logits)):
        cls = outputs.cls_logits[level][image_index]  # (C, h, w)
        prob = cls.sigmoid() * outputs.ctrness[level][image_index].sigmoid()
        best, best_cls = prob.flatten(1).max(dim=0)  # (h*w,)
        scores.append(best)
        classes.append(best_cls)
        ctl = outputs.controller[level][image_index]
        params.append(ctl.flatten(1).T)
    return PromptCells(torch.cat(scores), torch.cat(classes), torch.cat(params))


def level_sizes(p3_hw: tuple, num_levels: int) -> list[tuple]:
    """(h, w) of P3..P7 from P3's: each level halves the previous one, rounding up (stride-2
    3x3 convolutions with padding 1; exact for inputs padded to a multiple of 32)."""
    h, w = p3_hw
    sizes = [(h, w)]
    for _ in range(num_levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def prompt_detections(cells: PromptCells, boxes: Tensor, p3_hw: tuple, cfg: FCOSConfig) -> Detections:
    """One detection per given box (n,4) xyxy input pixels, for box-prompted masks.

    Each box takes the FCOS location best suited to it: the level whose size range
    holds max(w, h) / 2 (the regression a location at the box centre would need),
    and on it the cell containing the box centre. The controller parameters there
    drive the dynamic mask head; the class is the best class at that cell and the
    detection score sqrt(cls * ctr) of that class. ``cells`` from :func:`prompt_cells`;
    ``p3_hw`` the (h, w) of P3 (= the mask features'). Shape-static (exports to ONNX).
    """
    n = boxes.shape[0]
    device, dtype = boxes.device, boxes.dtype
    half = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    bounds = torch.tensor([float(s) for s in cfg.sizes_of_interest], dtype=dtype, device=device)
    level = (half[:, None] > bounds[None]).sum(dim=1)  # (n,) 0..num_levels-1
    index = torch.zeros(n, dtype=torch.int64, device=device)
    locations = torch.zeros(n, 2, dtype=dtype, device=device)
    offset = 0
    for lvl, (stride, (h, w)) in enumerate(zip(cfg.strides, level_sizes(p3_hw, len(cfg.strides)))):
        ix = (cx / stride).floor().clamp(0, w - 1).long()
        iy = (cy / stride).floor().clamp(0, h - 1).long()
        on = level == lvl
        index = torch.where(on, offset + iy * w + ix, index)
        loc = torch.stack([ix * stride + stride // 2, iy * stride + stride // 2], dim=1).to(dtype)
        locations = torch.where(on[:, None], loc, locations)
        offset = offset + h * w
    valid = torch.ones(n, dtype=torch.bool, device=device)
    return Detections(boxes, cells.scores[index].sqrt(), cells.classes[index], locations, level, cells.params[index], valid)
