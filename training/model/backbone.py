"""ResNet + FPN (P3-P7) from torchvision parts.

The ResNet is torchvision's, so ImageNet weights load through torchvision's weights
API. Options cover the authors' detectron2 variant too: frozen BN, and the MSRA
"stride in the 1x1 conv" bottleneck (``stride_in_1x1``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from training.config import BackboneConfig

log = logging.getLogger(__name__)

_RESNETS = {
    18: (resnet.resnet18, resnet.ResNet18_Weights),
    34: (resnet.resnet34, resnet.ResNet34_Weights),
    50: (resnet.resnet50, resnet.ResNet50_Weights),
    101: (resnet.resnet101, resnet.ResNet101_Weights),
}


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could not be fetched (no network) and no local file was given."""


def _norm_layer(kind: str):
    if kind == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=1e-5)
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"unknown backbone norm '{kind}' (frozen_bn, bn, gn)")


def _move_stride_to_1x1(net: resnet.ResNet) -> None:
    """MSRA/detectron2 bottlenecks stride in conv1 (1x1) instead of conv2 (3x3)."""
    for layer in (net.layer2, net.layer3, net.layer4):
        block = layer[0]
        if isinstance(block, resnet.Bottleneck):
            stride = block.conv2.stride
            block.conv1.stride, block.conv2.stride = stride, (1, 1)


def _load_resnet_weights(net: resnet.ResNet, cfg: BackboneConfig) -> None:
    if cfg.weights == "none":
        return
    if cfg.weights == "imagenet":
        weights = _RESNETS[cfg.depth][1].DEFAULT
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as err:  # no network, proxy, certificate ...
            raise WeightsUnavailableError(
                f"could not download ImageNet weights for ResNet-{cfg.depth} ({err}). "
                "Point model.backbone.weights=PATH at a local torchvision ResNet state dict, "
                "or train from scratch with model.backbone.weights=none model.backbone.norm=gn."
            ) from err
    else:
        path = Path(cfg.weights)
        if not path.is_file():
            raise FileNotFoundError(f"model.backbone.weights: no such file {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"backbone weights do not fit ResNet-{cfg.depth}: missing {missing}, unexpected {unexpected}")


def _freeze(net: resnet.ResNet, freeze_at: int) -> None:
    stages = [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4]
    for stage in stages[:freeze_at]:
        for p in stage.parameters():
            p.requires_grad_(False)


class ResNetFPN(nn.Module):
    """ResNet C3-C5 -> FPN P3-P5, plus P6 (stride-2 conv on P5) and P7 (on relu(P6)).

    forward(x: (B,3,H,W) float, H and W multiples of 32) -> OrderedDict
    {"p3": (B,C,H/8,W/8), ..., "p7": (B,C,H/128,W/128)}, C = ``out_channels``.
    """

    def __init__(self, cfg: BackboneConfig, out_channels: int = 256):
        super().__init__()
        builder = _RESNETS[cfg.depth][0]
        body = builder(weights=None, norm_layer=_norm_layer(cfg.norm))
        if cfg.stride_in_1x1:
            _move_stride_to_1x1(body)
        _load_resnet_weights(body, cfg)
        _freeze(body, cfg.freeze_at)
        del body.fc, body.avgpool
        self.body = body
        expansion = 4 if cfg.depth >= 50 else 1
        in_channels = [128 * expansion, 256 * expansion, 512 * expansion]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels))
        self.out_channels = out_channels

    def bottom_up(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """ResNet features res3, res4, res5 (strides 8, 16, 32)."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return OrderedDict(res3=c3, res4=c4, res5=c5)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.fpn(self.bottom_up(x))
        return OrderedDict((f"p{i + 3}", f) for i, f in enumerate(feats.values()))
