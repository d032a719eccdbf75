"""The student's losses for one batch: FCOS + the mask losses of the chosen method.

- ``condinst``: dice on ground-truth masks at stride 4 (the mask-supervised upper bound);
- ``boxinst``: projection + colour pairwise losses from boxes only (L_box-sup);
- ``boxteacher``: BoxInst's losses + the noise-aware pseudo-mask loss (L_mask-sup).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.boxteacher import noise_aware_pseudo_mask_loss
from training.config import Config
from training.health import mask_health
from training.losses import box_masks, boxinst_losses, dice_loss, image_color_similarity, image_valid_mask, linear_warmup
from training.model.condinst import CondInst
from training.model.fcos import FCOSTargets, HeadOutputs, compute_locations, fcos_losses, fcos_targets, flatten_head_outputs


@dataclass
class StudentBatch:
    """What the student sees for one step.

    images: (B,3,Hp,Wp) normalised padded input (after strong augmentation for BoxTeacher);
    raw_images: (B,3,Hp,Wp) uint8 RGB, zero-padded, un-jittered (colour similarity);
    image_sizes: un-padded (h, w) per image; boxes/labels: per image (n_i,4) xyxy input
    pixels and (n_i,); masks: per image (n_i,h,w) GT masks (condinst only);
    pseudo: per image (soft (n_i,Hp/4,Wp/4), binary (same), weights (n_i,)) (boxteacher only).
    """

    images: Tensor
    raw_images: Tensor
    image_sizes: list[tuple[int, int]]
    boxes: list[Tensor]
    labels: list[Tensor]
    masks: list[Tensor] | None = None
    pseudo: list[tuple[Tensor, Tensor, Tensor]] | None = None
    removed_rows: list[int] | None = None  # bottom rows left out of the colour similarity


def select_mask_proposals(targets: FCOSTargets, flat: dict[str, Tensor], num_images: int, cfg: Config, generator=None) -> Tensor:
    """Indices of the positive locations that get mask losses.

    condinst: at most ``mask.max_proposals`` at random (AdelaiDet MAX_PROPOSALS);
    boxinst/boxteacher: per image, each GT keeps at most max(k // #GTs-with-positives, 1)
    locations ranked by max_c sigmoid(cls) * sigmoid(ctr) (TOPK_PROPOSALS_PER_IM = k).
    """
    pos = torch.nonzero(targets.gt_inds >= 0).squeeze(1)
    if cfg.method == "condinst":
        limit = cfg.model.mask.max_proposals
        if pos.numel() > limit:
            pos = pos[torch.randperm(pos.numel(), generator=generator, device=pos.device)[:limit]]
        return pos
    k = cfg.model.mask.topk_proposals_per_image
    quality = flat["cls_logits"][pos].detach().sigmoid().max(dim=1).values * flat["ctrness"][pos].detach().sigmoid()
    per_image = targets.labels.shape[0] // num_images
    image_of = pos // per_image
    keep = []
    for b in range(num_images):
        on = image_of == b
        idx, q, gts = pos[on], quality[on], targets.gt_inds[pos[on]]
        if idx.numel() == 0:
            continue
        unique = gts.unique()
        per_gt = max(k // unique.numel(), 1)
        for g in unique:
            sel = gts == g
            top = q[sel].topk(min(per_gt, int(sel.sum()))).indices
            keep.append(idx[sel][top])
    return torch.cat(keep) if keep else pos[:0]


def _stride4(masks: Tensor, padded_hw: tuple[int, int], stride: int) -> Tensor:
    """(n,h,w) masks at the input size -> zero-padded to ``padded_hw`` -> sampled [s//2::s]."""
    h, w = masks.shape[-2:]
    padded = F.pad(masks.float(), (0, padded_hw[1] - w, 0, padded_hw[0] - h))
    return padded[:, stride // 2 :: stride, stride // 2 :: stride]


def compute_losses(model: CondInst, batch: StudentBatch, iteration: int, cfg: Config, reduce_mean=None) -> dict[str, Tensor]:
    """All loss terms (already weighted and warmed up); their sum is the training loss."""
    head, mask_feats = model(batch.images)
    return losses_from_outputs(model, head, mask_feats, batch, iteration, cfg, reduce_mean)


def losses_from_outputs(
    model: CondInst,
    head: HeadOutputs,
    mask_feats: Tensor,
    batch: StudentBatch,
    iteration: int,
    cfg: Config,
    reduce_mean=None,
    health: dict | None = None,
) -> dict[str, Tensor]:
    """All loss terms from the network's outputs. When ``health`` is a dict it also
    receives :func:`training.health.mask_health` of the training proposals."""
    num_classes = cfg.model.num_classes
    feature_hw = [tuple(t.shape[-2:]) for t in head.cls_logits]
    targets = fcos_targets(
        feature_hw,
        [b.to(batch.images.device) for b in batch.boxes],
        [labels.to(batch.images.device) for labels in batch.labels],
        num_classes,
        cfg.model.fcos,
    )
    flat = flatten_head_outputs(head)
    losses = fcos_losses(flat, targets, num_classes, cfg.model.fcos, reduce_mean)

    num_images = batch.images.shape[0]
    chosen = select_mask_proposals(targets, flat, num_images, cfg)
    per_image = targets.labels.shape[0] // num_images
    image_index = chosen // per_image
    gt_index = targets.gt_inds[chosen]
    # Locations and levels of the chosen proposals, from the flattened layout.
    locations, levels = [], []
    for level, (h, w) in enumerate(feature_hw):
        stride = cfg.model.fcos.strides[level]
        locations.append(compute_locations(h, w, stride, device=batch.images.device))
        levels.append(torch.full((h * w,), level, dtype=torch.int64, device=batch.images.device))
    loc_all, lvl_all = torch.cat(locations), torch.cat(levels)
    within = chosen % per_image
    logits = model.mask_logits(mask_feats, flat["controller"][chosen], loc_all[within], lvl_all[within], image_index)

    stride = cfg.model.mask.out_stride
    padded_hw = tuple(batch.images.shape[-2:])
    all_boxes = torch.cat([b.to(logits.device) for b in batch.boxes]) if batch.boxes else logits.new_zeros(0, 4)
    removed = batch.removed_rows or [0] * num_images
    valid = torch.stack(
        [image_valid_mask(h, w, padded_hw[0], padded_hw[1], r, device=logits.device) for (h, w), r in zip(batch.image_sizes, removed)]
    )
    valid_s4 = valid[:, None, stride // 2 :: stride, stride // 2 :: stride][image_index]
    boxes_s4 = box_masks(all_boxes, padded_hw[0], padded_hw[1], stride)[gt_index]
    if health is not None:
        health.update(mask_health(logits.detach(), boxes_s4, valid_s4[:, 0], cfg.model.mask.threshold))
    if cfg.method == "condinst":
        gt_masks = torch.cat([_stride4(m.to(logits.device), padded_hw, stride) for m in batch.masks]) if batch.masks else None
        if chosen.numel() == 0 or gt_masks is None:
            losses["loss_mask"] = logits.sum() * 0.0
        else:
            losses["loss_mask"] = dice_loss(logits.sigmoid()[:, 0], gt_masks[gt_index]).mean()
        return losses

    bi = cfg.boxinst
    similarity = image_color_similarity(
        batch.raw_images.to(logits.device), valid, stride, bi.pairwise_size, bi.pairwise_dilation, bi.color_theta
    )
    losses.update(
        boxinst_losses(
            logits,
            boxes_s4,
            similarity[image_index],
            iteration,
            bi.pairwise_warmup_iters,
            bi.color_threshold,
            bi.pairwise_size,
            bi.pairwise_dilation,
            bi.outside_weight,
            valid_s4[:, 0],
            bi.projection_bce_weight,
            bi.projection_in_image,
            bi.box_prior_weight,
            bi.prior_iters,
        )  # fmt: skip
    )
    if cfg.method == "boxteacher":
        bt = cfg.boxteacher
        soft = torch.cat([p[0] for p in batch.pseudo]).to(logits.device)[gt_index]
        binary = torch.cat([p[1] for p in batch.pseudo]).to(logits.device)[gt_index]
        weights = torch.cat([p[2] for p in batch.pseudo]).to(logits.device)[gt_index]
        losses.update(
            noise_aware_pseudo_mask_loss(
                logits, binary, soft, weights, boxes_s4, valid_s4,
                pixel_loss=bt.pixel_loss, use_affinity=bt.use_affinity, pixel_weight=bt.pixel_weight,
                affinity_weight=bt.affinity_weight, affinity_mode=bt.affinity_mode,
                affinity_threshold=bt.affinity_threshold, warmup=linear_warmup(iteration, bt.warmup_iters),
                kernel_size=bi.pairwise_size, dilation=bi.pairwise_dilation,
            )
        )  # fmt: skip
    return losses
