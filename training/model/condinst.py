"""CondInst: ResNet-FPN + FCOS head + controller + mask branch + dynamic mask head.

The one model definition that training, evaluation, export, serving and the Label
Studio backend use. ``forward`` gives raw outputs; :meth:`CondInst.predict` is the
inference path (resize, detect, masks, mask-aware score, paste back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from training.config import Config
from training.model.backbone import ResNetFPN
from training.model.fcos import Detections, FCOSHead, HeadOutputs, PromptCells, decode_detections, prompt_detections
from training.model.mask_head import DynamicMaskHead, MaskBranch, aligned_bilinear, dynamic_param_count, scale_gradient
from training.model.processing import normalize_and_pad, paste_masks, resize_image, scale_boxes
from training.model.scores import mask_aware_score_from_mean, mean_foreground_probability


@dataclass
class Instances:
    """Predictions for one image, in the original image's pixels.

    boxes (n,4) float xyxy; labels (n,) int64 contiguous class index; det_scores (n,)
    detection confidence sqrt(cls*ctr); scores (n,) mask-aware score (ranking and
    mask quality); masks (n,H,W) bool; mask_probs (n,H,W) float when asked;
    mean_mask_prob (n,) the m_bar inside the score.
    """

    boxes: Tensor
    labels: Tensor
    det_scores: Tensor
    scores: Tensor
    masks: Tensor
    mean_mask_prob: Tensor
    mask_probs: Tensor | None = None
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class InputDetections:
    """Detections of one image at the network's input resolution (before paste-back).

    ``dets`` as decoded (valid only); mask_probs (n, hp/4, wp/4) on the padded canvas;
    scores (n,) mask-aware; mean_mask_prob (n,); input_hw the un-padded input size.
    """

    dets: Detections
    mask_probs: Tensor
    scores: Tensor
    mean_mask_prob: Tensor
    input_hw: tuple[int, int]


class CondInst(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.backbone = ResNetFPN(m.backbone, m.fpn_channels)
        num_params = dynamic_param_count(m.mask.out_channels, m.mask.head_channels, m.mask.head_layers)
        self.head = FCOSHead(m.fpn_channels, m.num_classes, num_params, m.fcos, cfg.mask_grad_scales[0])
        self.mask_branch = MaskBranch(m.fpn_channels, m.mask)
        self.mask_head = DynamicMaskHead(m.mask, m.fcos.sizes_of_interest)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- raw network -------------------------------------------------------------
    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """RGB (3,H,W) images -> normalised padded batch (B,3,Hp,Wp) and their sizes."""
        i = self.cfg.input
        return normalize_and_pad([im.to(self.device) for im in images], i.pixel_mean, i.pixel_std, i.format, i.size_divisibility)

    def forward(self, batch: Tensor) -> tuple[HeadOutputs, Tensor]:
        """batch (B,3,Hp,Wp) normalised -> (per-level head outputs, mask feats (B,C,Hp/8,Wp/8))."""
        feats = self.backbone(batch)
        head = self.head([feats[f"p{k}"] for k in range(3, 8)])
        branch_in = [scale_gradient(feats[f"p{k}"], self.cfg.mask_grad_scales[1]) for k in (3, 4, 5)]
        mask_feats = self.mask_branch(*branch_in)
        return head, mask_feats

    def mask_logits(self, mask_feats: Tensor, params: Tensor, locations: Tensor, levels: Tensor, image_index: Tensor) -> Tensor:
        """Dynamic head for n instances -> logits (n,1,Hp/4,Wp/4) (see DynamicMaskHead)."""
        return self.mask_head(mask_feats, params, locations, levels, image_index)

    # ---- inference -----------------------------------------------------------------
    def detect(
        self, head: HeadOutputs, mask_feats: Tensor, image_sizes: list[tuple[int, int]], score_threshold: float | None = None
    ) -> list[InputDetections]:
        """Detections, stride-4 masks and mask-aware scores at the input resolution."""
        results = []
        for b, hw in enumerate(image_sizes):
            dets = decode_detections(head, b, self.cfg.model.fcos, score_threshold)
            dets = dets.select(dets.valid)
            index = torch.full_like(dets.labels, b)
            probs = self.mask_logits(mask_feats, dets.params, dets.locations, dets.levels, index).sigmoid()[:, 0]
            m_bar = self.mean_mask_prob(probs, hw)
            scores = mask_aware_score_from_mean(dets.det_scores, m_bar)
            results.append(InputDetections(dets, probs, scores, m_bar, hw))
        return results

    def prompt(self, cells: PromptCells, mask_feats: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Box prompts on one image's encoded features: the part of box prompting that depends
        on the boxes (serving runs it per request; the image part, ``forward`` +
        :func:`training.model.fcos.prompt_cells`, is computed once per image).

        cells: the image's :class:`PromptCells`; mask_feats (1, C, Hp/8, Wp/8); boxes (P, 4)
        xyxy input pixels. Returns labels (P,) int64, det_scores (P,) and mask probabilities
        (P, Hp/4, Wp/4) from the dynamic head at each box's prompt location.
        """
        pd = prompt_detections(cells, boxes, tuple(mask_feats.shape[-2:]), self.cfg.model.fcos)
        probs = self.mask_logits(mask_feats, pd.params, pd.locations, pd.levels, torch.zeros_like(pd.levels)).sigmoid()[:, 0]
        return pd.labels, pd.det_scores, probs

    def mean_mask_prob(self, probs_s4: Tensor, input_hw: tuple[int, int]) -> Tensor:
        """m_bar of each mask at the input resolution (the score's resolution)."""
        if probs_s4.shape[0] == 0:
            return probs_s4.new_zeros(0)
        # In chunks: the full-resolution maps of 100 detections would dominate peak memory.
        out = []
        for chunk in probs_s4.split(16):
            full = aligned_bilinear(chunk[:, None], self.cfg.model.mask.out_stride)[:, 0, : input_hw[0], : input_hw[1]]
            out.append(mean_foreground_probability(full, None, self.cfg.model.mask.threshold))
        return torch.cat(out)

    @torch.no_grad()
    def predict(
        self,
        images: list[Tensor],
        resize: bool = True,
        score_threshold: float | None = None,
        return_probs: bool = False,
    ) -> list[Instances]:
        """Instances for RGB images (3,H,W) uint8, in each image's own pixels.

        With ``resize`` each image is first resized to the test scale
        (``input.min_size_test`` / ``max_size_test``); masks and boxes come back at
        the given size either way.
        """
        inp = self.cfg.input
        originals = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        if resize:
            images = [resize_image(im, inp.min_size_test, inp.max_size_test) for im in images]
        batch, sizes = self.preprocess(images)
        head, mask_feats = self(batch)
        outs = []
        for det, out_hw in zip(self.detect(head, mask_feats, sizes, score_threshold), originals):
            outs.append(self.to_instances(det, out_hw, return_probs))
        return outs

    def to_instances(self, det: InputDetections, output_hw: tuple[int, int], return_probs: bool = False) -> Instances:
        """Paste one image's detections back to ``output_hw`` and drop empty boxes."""
        boxes = scale_boxes(det.dets.boxes, det.input_hw, output_hw)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        probs = paste_masks(det.mask_probs[keep], det.input_hw, output_hw, self.cfg.model.mask.out_stride)
        return Instances(
            boxes=boxes[keep],
            labels=det.dets.labels[keep],
            det_scores=det.dets.det_scores[keep],
            scores=det.scores[keep],
            masks=probs > self.cfg.model.mask.threshold,
            mean_mask_prob=det.mean_mask_prob[keep],
            mask_probs=probs if return_probs else None,
        )


def build_model(cfg: Config) -> CondInst:
    """The network for ``cfg`` (weights: backbone per cfg.model.backbone.weights)."""
    return CondInst(cfg)
