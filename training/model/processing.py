"""Pre- and post-processing around the network, written once.

Training, evaluation, export (outside the ONNX graph) and every serving runtime use
these functions, so they agree to the pixel:
- :func:`resized_size` / :func:`resize_image`: shortest-edge resize with a long-side cap;
- :func:`normalize_and_pad`: channel order, (x - mean) / std, zero-pad to a multiple of 32;
- :func:`paste_masks`: stride-4 probabilities -> the original image size;
- :func:`paste_mask_in_box`: the same, computed only inside one box (box prompts);
- :func:`scale_boxes`: boxes from the resized input back to the original image;
- :class:`InputSpec`, :func:`resize_to_spec`, :func:`batch_to_spec`: the same rules for a
  model known only by its input description (an exported graph's metadata, a checkpoint's
  config), as serving and the export parity check feed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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


@lru_cache(maxsize=32)
def paste_taps(length_s: int, stride: int, input_len: int, output_len: int) -> tuple[Tensor, Tensor]:
    """:func:`paste_masks` along one axis as taps: output pixel i = sum_k weight[i, k] *
    stride-``stride`` value index[i, k].

    The paste is linear and separable (aligned_bilinear, crop to ``input_len``, bilinear
    to ``output_len``), so its weights along one axis are the paste of unit impulses: the
    rows of that matrix have at most a few non-zeros, kept here as (output_len, K) index
    and weight tensors (K = the most non-zeros of any row; unused taps weigh 0).
    """
    eye = torch.eye(length_s)[:, None]  # (n, 1, n): impulse j in row j
    x = eye
    if stride != 1:
        x = F.pad(x, (0, 1), mode="replicate")
        x = F.interpolate(x, size=stride * length_s + 1, mode="linear", align_corners=True)
        x = F.pad(x, (stride // 2, 0), mode="replicate")[..., : stride * length_s]
    x = x[..., :input_len]
    if input_len != output_len:
        x = F.interpolate(x, size=output_len, mode="linear", align_corners=False)
    matrix = x[:, 0].T.contiguous()  # (output_len, n)
    k = max(int((matrix != 0).sum(dim=1).max()), 1)
    weight, index = matrix.abs().topk(k, dim=1)
    return index, matrix.gather(1, index) * (weight != 0)


def paste_mask_in_box(
    mask_probs: Tensor, box: tuple[int, int, int, int], input_hw: tuple[int, int], output_hw: tuple[int, int], stride: int = 4
) -> Tensor:
    """:func:`paste_masks` of one mask, only on the pixels ``box`` = (x0, y0, x1, y1) covers
    (integers, x1 / y1 exclusive): (hp, wp) stride-``stride`` probabilities -> (y1 - y0, x1 - x0).

    Equal to ``paste_masks(mask_probs[None], ...)[0, y0:y1, x0:x1]`` up to float rounding
    (the same weights, summed in another order), at the cost of the box instead of the
    image: a box prompt on a 1920x1080 image needs only its box.
    """
    x0, y0, x1, y1 = box
    rows_i, rows_w = (t.to(mask_probs.device) for t in paste_taps(mask_probs.shape[0], stride, input_hw[0], output_hw[0]))
    cols_i, cols_w = (t.to(mask_probs.device) for t in paste_taps(mask_probs.shape[1], stride, input_hw[1], output_hw[1]))
    rows_i, rows_w, cols_i, cols_w = rows_i[y0:y1], rows_w[y0:y1], cols_i[x0:x1], cols_w[x0:x1]
    if rows_i.numel() == 0 or cols_i.numel() == 0:
        return mask_probs.new_zeros(max(y1 - y0, 0), max(x1 - x0, 0))
    first, last = int(cols_i.min()), int(cols_i.max()) + 1
    band = mask_probs[:, first:last].float()
    by_rows = (band[rows_i] * rows_w[..., None]).sum(dim=1)  # (h, band width)
    return (by_rows[:, cols_i - first] * cols_w[None]).sum(dim=-1)


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
