"""Pre- and post-processing around the network, written once.

Training, evaluation, export (outside the ONNX graph) and every serving runtime use
these functions, so they agree to the pixel:
- :func:`resized_size` / :func:`resize_image`: shortest-edge resize with a long-side cap;
- :func:`normalize_and_pad`: channel order, (x - mean) / std, zero-pad to a multiple of 32;
- :func:`paste_masks`: stride-4 probabilities -> the original image size;
- :func:`scale_boxes`: boxes from the resized input back to the original image;
- :class:`InputSpec`, :func:`resize_to_spec`, :func:`batch_to_spec`: the same rules for a
  model known only by its input description (an exported graph's metadata, a checkpoint's
  config), as serving and the export parity check feed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.model.mask_head import aligned_bilinear


def resized_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge rule: short side -> ``short``, long side <= ``max_size``."""
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: Tensor, short: int, max_size: int) -> Tensor:
    """Resize a (3,H,W) uint8/float image (bilinear, antialiased) by :func:`resized_size`."""
    h, w = image.shape[-2:]
    nh, nw = resized_size(h, w, short, max_size)
    if (nh, nw) == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    if image.dtype == torch.uint8:
        out = out.round().clamp(0, 255).to(torch.uint8)
    return out


def normalize_and_pad(
    images: list[Tensor],
    pixel_mean: list[float],
    pixel_std: list[float],
    channel_format: str = "RGB",
    size_divisibility: int = 32,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """List of (3,H_i,W_i) RGB images (uint8 or float 0-255) -> batch and sizes.

    Returns (B,3,Hp,Wp) float32: channels in ``channel_format``, normalised with
    mean/std given in that order, zero-padded bottom/right AFTER normalisation so
    Hp, Wp are multiples of ``size_divisibility``; and the list of (H_i, W_i).
    """
    if not images:
        raise ValueError("normalize_and_pad needs at least one image")
    device = images[0].device
    mean = torch.tensor(pixel_mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(pixel_std, dtype=torch.float32, device=device)[:, None, None]
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    d = max(size_divisibility, 1)
    hp = -(-max(h for h, _ in sizes) // d) * d
    wp = -(-max(w for _, w in sizes) // d) * d
    batch = torch.zeros(len(images), 3, hp, wp, dtype=torch.float32, device=device)
    for i, im in enumerate(images):
        x = im.float()
        if channel_format == "BGR":
            x = x.flip(0)
        batch[i, :, : x.shape[1], : x.shape[2]] = (x - mean) / std
    return batch, sizes


def paste_masks(mask_probs: Tensor, input_hw: tuple[int, int], output_hw: tuple[int, int], stride: int = 4) -> Tensor:
    """Stride-``stride`` probabilities on the padded canvas (n,hp,wp) -> (n,H,W) at the original size.

    aligned_bilinear x stride to the padded input, crop to the resized (un-padded)
    input ``input_hw``, bilinear (align_corners=False) to ``output_hw``. Threshold
    the result yourself (``> 0.5``).
    """
    if mask_probs.shape[0] == 0:
        return mask_probs.new_zeros(0, *output_hw)
    x = aligned_bilinear(mask_probs[:, None], stride)[:, :, : input_hw[0], : input_hw[1]]
    if tuple(x.shape[-2:]) != tuple(output_hw):
        x = F.interpolate(x, size=output_hw, mode="bilinear", align_corners=False)
    return x[:, 0]


def scale_boxes(boxes: Tensor, input_hw: tuple[int, int], output_hw: tuple[int, int]) -> Tensor:
    """xyxy boxes (n,4) on the resized input -> the original image, clipped to it."""
    sy = output_hw[0] / input_hw[0]
    sx = output_hw[1] / input_hw[1]
    out = boxes * boxes.new_tensor([sx, sy, sx, sy])
    out[:, 0::2] = out[:, 0::2].clamp(0, output_hw[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, output_hw[0])
    return out


def fit_long_side(height: int, width: int, max_size: int, fixed_hw: tuple[int, int] | None) -> int:
    """The long-side cap that makes a test-scale resize also fit a fixed canvas
    (an ONNX/TensorRT graph exported at one size); ``max_size`` when there is none."""
    if fixed_hw is None:
        return max_size
    fh, fw = fixed_hw
    return max(1, min(max_size, int(min(fh / height, fw / width) * max(height, width))))


def pad_to_canvas(batch: Tensor, fixed_hw: tuple[int, int] | None) -> Tensor:
    """Zero-pad (or crop) a (B,3,Hp,Wp) batch to a fixed (H, W) canvas; unchanged without one."""
    if fixed_hw is None or tuple(batch.shape[-2:]) == tuple(fixed_hw):
        return batch
    canvas = batch.new_zeros(batch.shape[0], batch.shape[1], *fixed_hw)
    h, w = min(batch.shape[2], fixed_hw[0]), min(batch.shape[3], fixed_hw[1])
    canvas[:, :, :h, :w] = batch[:, :, :h, :w]
    return canvas


@dataclass(frozen=True)
class InputSpec:
    """How images are fed to a network: shortest side -> ``min_size``, long side <=
    ``max_size``, channels in ``channel_format``, (x - mean) / std, padded to a multiple of
    ``size_divisibility``; ``fixed_hw`` (H, W) when an exported graph has a fixed size."""

    min_size: int
    max_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    channel_format: str = "RGB"
    size_divisibility: int = 32
    fixed_hw: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, inp) -> InputSpec:
        """From a :class:`training.config.InputConfig` (test scale, no fixed canvas)."""
        return cls(inp.min_size_test, inp.max_size_test, tuple(inp.pixel_mean), tuple(inp.pixel_std), inp.format, inp.size_divisibility)


def resize_to_spec(image: Tensor, spec: InputSpec) -> Tensor:
    """(3, H, W) uint8 -> the network's input size: test-scale resize, fitted into a fixed canvas."""
    long_cap = fit_long_side(int(image.shape[-2]), int(image.shape[-1]), spec.max_size, spec.fixed_hw)
    return resize_image(image, spec.min_size, long_cap)


def batch_to_spec(images: list[Tensor], spec: InputSpec) -> tuple[Tensor, list[tuple[int, int]]]:
    """Resized (3, h, w) images -> the (B, 3, Hp, Wp) float32 batch (normalised, padded, on the
    fixed canvas if any) and their un-padded sizes."""
    batch, sizes = normalize_and_pad(images, list(spec.pixel_mean), list(spec.pixel_std), spec.channel_format, spec.size_divisibility)
    return pad_to_canvas(batch, spec.fixed_hw), sizes
