"""CondInst mask branch and dynamic mask head.

The mask branch turns P3-P5 into ``C`` mask features at stride 8. Each instance owns
a tiny network (1x1 convs) whose weights come from the controller at its FCOS
location; it runs on [relative coordinates, mask features] and gives that
instance's mask logits. Logits are upsampled x2 to stride 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import MaskConfig


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """Upsample (N,C,h,w) -> (N,C,factor*h,factor*w) keeping pixel centres aligned.

    AdelaiDet's rule: replicate-pad one column/row right/bottom, bilinear with
    align_corners=True to (f*h+1, f*w+1), replicate-pad f//2 left/top, crop.
    """
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """Identity forward; the gradient flowing back through it is multiplied by ``factor``.

        forward: y = x        backward: dL/dx = factor * dL/dy

    Written ``x.detach() + factor * (x - x.detach())`` (exactly x in the forward). ``factor``
    1 returns ``x`` itself and 0 returns ``x.detach()``; outside autograd (inference,
    export) it is always ``x``.
    """
    if factor == 1.0 or not torch.is_grad_enabled() or not x.requires_grad:
        return x
    if factor == 0.0:
        return x.detach()
    return x.detach() + factor * (x - x.detach())


def _conv_norm_relu(cin: int, cout: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")]
    if norm == "bn":
        layers.append(nn.BatchNorm2d(cout))
    elif norm == "gn":
        layers.append(nn.GroupNorm(32, cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MaskBranch(nn.Module):
    """P3, P4, P5 (B,F,*) -> mask features (B, out_channels, H/8, W/8).

    ``refine.i`` (conv3x3 + norm + relu) per level; P4/P5 upsampled to P3 with
    aligned_bilinear and summed; then ``tower`` (num_convs x conv3x3 + norm + relu,
    then a 1x1 conv to ``out_channels``). Names follow AdelaiDet's so weights map 1:1.
    """

    def __init__(self, in_channels: int, cfg: MaskConfig):
        super().__init__()
        c = cfg.branch_channels
        self.refine = nn.ModuleList(_conv_norm_relu(in_channels, c, cfg.branch_norm) for _ in range(3))
        tower: list[nn.Module] = [_conv_norm_relu(c, c, cfg.branch_norm) for _ in range(cfg.branch_num_convs)]
        tower.append(nn.Conv2d(c, cfg.out_channels, 1))
        self.tower = nn.Sequential(*tower)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor) -> Tensor:
        x = self.refine[0](p3)
        for i, p in ((1, p4), (2, p5)):
            y = self.refine[i](p)
            factor = x.shape[-2] // y.shape[-2]
            x = x + aligned_bilinear(y, factor)
        return self.tower(x)


def dynamic_param_count(in_channels: int, channels: int, num_layers: int) -> int:
    """Number of controller outputs for a dynamic head on ``in_channels`` mask features.

    Inputs are in_channels + 2 relative coordinates. 8 feats, 8 hidden, 3 layers: 169.
    """
    dims = [in_channels + 2] + [channels] * (num_layers - 1) + [1]
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def split_dynamic_params(params: Tensor, in_channels: int, channels: int, num_layers: int) -> tuple[list[Tensor], list[Tensor]]:
    """Controller output (n, P) -> per-layer weights [(n, out, in)] and biases [(n, out, 1)].

    Layout (AdelaiDet): all weights first (w0, w1, ..., row-major out x in), then all biases.
    """
    dims = [in_channels + 2] + [channels] * (num_layers - 1) + [1]
    n = params.shape[0]
    w_sizes = [a * b for a, b in zip(dims[:-1], dims[1:])]
    b_sizes = dims[1:]
    chunks = torch.split(params, w_sizes + b_sizes, dim=1)
    weights = [w.reshape(n, out, inp) for w, out, inp in zip(chunks[:num_layers], dims[1:], dims[:-1])]
    biases = [b.reshape(n, out, 1) for b, out in zip(chunks[num_layers:], dims[1:])]
    return weights, biases


def relative_coordinates(instance_locations: Tensor, feature_hw: tuple[int, int], stride: int, scale: Tensor) -> Tensor:
    """(n,2) instance (x,y) in input pixels -> (n, 2, h*w) [rel_x, rel_y].

    Mask-feature pixel (i,j) sits at (j*stride + stride//2, i*stride + stride//2);
    rel = (instance - pixel) / scale, scale (n,) = size of interest of the instance's level.
    """
    h, w = feature_hw
    device, dtype = instance_locations.device, instance_locations.dtype
    ys = torch.arange(h, device=device, dtype=dtype) * stride + stride // 2
    xs = torch.arange(w, device=device, dtype=dtype) * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pixels = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=0)  # (2, hw)
    rel = instance_locations[:, :, None] - pixels[None]
    return rel / scale.to(dtype)[:, None, None]


def run_dynamic_head(inputs: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    """Per-instance 1x1-conv MLP, batched: inputs (n, Cin, hw) -> logits (n, 1, hw).

    Each layer is ``bmm(W_k, x) + b_k`` with ReLU between layers. A 1x1 convolution
    with per-instance weights is exactly this product, so it equals AdelaiDet's grouped
    conv (groups = n); bmm is what exports cleanly to ONNX (MatMul) and TensorRT.
    """
    x = inputs
    last = len(weights) - 1
    for k, (w, b) in enumerate(zip(weights, biases)):
        x = torch.baddbmm(b, w, x)
        if k < last:
            x = F.relu(x)
    return x


class DynamicMaskHead(nn.Module):
    """Mask logits for instances: stride-8 dynamic head, aligned_bilinear x2 -> stride 4."""

    def __init__(self, cfg: MaskConfig, sizes_of_interest: list[int], mask_feat_stride: int = 8):
        super().__init__()
        self.in_channels = cfg.out_channels
        self.channels = cfg.head_channels
        self.num_layers = cfg.head_layers
        self.mask_feat_stride = mask_feat_stride
        self.out_stride = cfg.out_stride
        soi = list(sizes_of_interest) + [sizes_of_interest[-1] * 2]
        self.register_buffer("sizes_of_interest", torch.tensor(soi, dtype=torch.float32), persistent=False)
        self.num_params = dynamic_param_count(self.in_channels, self.channels, self.num_layers)

    def forward(self, mask_feats: Tensor, params: Tensor, locations: Tensor, levels: Tensor, image_index: Tensor) -> Tensor:
        """Instance mask logits at stride ``out_stride``.

        mask_feats: (B, C, h, w) stride 8; params: (n, P) controller outputs;
        locations: (n, 2) (x, y) input pixels; levels: (n,) int64 FPN level (0 = P3);
        image_index: (n,) int64 batch index. Returns (n, 1, h*8/out_stride, w*8/out_stride).
        """
        n = params.shape[0]
        b, c, h, w = mask_feats.shape
        scale = self.sizes_of_interest[levels]
        rel = relative_coordinates(locations, (h, w), self.mask_feat_stride, scale)
        feats = mask_feats.reshape(b, c, h * w)[image_index]
        inputs = torch.cat([rel.to(feats.dtype), feats], dim=1)
        weights, biases = split_dynamic_params(params, self.in_channels, self.channels, self.num_layers)
        logits = run_dynamic_head(inputs, weights, biases).reshape(n, 1, h, w)
        return aligned_bilinear(logits, self.mask_feat_stride // self.out_stride)
