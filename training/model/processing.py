"""Pre- and post-processing around the network, written once.

Training, evaluation, export (outside the ONNX graph) and every serving runtime use
these functions, so they agree to the pixel:
- :func:`resized_size` / :func:`resize_image`: shortest-edge resize with a long-side cap;
- :func:`normalize_and_pad`: channel order, (x - mean) / std, zero-pad to a multiple of 32;
- :func:`paste_masks`: stride-4 probabilities -> the original image size;
- :func:`paste_mask_in_box`: the same, computed only inside one box, and :func:`paste_windows`:
  the window each mask can cover (serving pastes each mask there alone);
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
def paste_matrix(length_s: int, stride: int, input_len: int, output_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`paste_masks` along one axis as a matrix: output pixel i = sum_j matrix[i, j] *
    stride-``stride`` value j; also, per output pixel, the first and last j it reads (its
    non-zero weights lie between them).

    The paste is linear and separable (aligned_bilinear, crop to ``input_len``, bilinear to
    ``output_len``), so its matrix along one axis is the paste of unit impulses. Each row holds
    a few non-negative weights that sum to 1 (both interpolations are convex), so a pasted
    pixel is never above every value it reads.
    Returns: matrix (output_len, length_s), first (output_len,), last (output_len,) int64.
    """
    x = torch.eye(length_s)[:, None]  # (n, 1, n): impulse j in row j
    if stride != 1:
        x = F.pad(x, (0, 1), mode="replicate")
        x = F.interpolate(x, size=stride * length_s + 1, mode="linear", align_corners=True)
        x = F.pad(x, (stride // 2, 0), mode="replicate")[..., : stride * length_s]
    x = x[..., :input_len]
    if input_len != output_len:
        x = F.interpolate(x, size=output_len, mode="linear", align_corners=False)
    matrix = x[:, 0].T.contiguous()  # (output_len, n)
    reads = matrix != 0
    first = reads.int().argmax(dim=1)
    last = length_s - 1 - reads.flip(1).int().argmax(dim=1)
    return matrix, first, last


def paste_mask_in_box(
    mask_probs: Tensor, box: tuple[int, int, int, int], input_hw: tuple[int, int], output_hw: tuple[int, int], stride: int = 4
) -> Tensor:
    """:func:`paste_masks` of one mask, only on the pixels ``box`` = (x0, y0, x1, y1) covers
    (integers, x1 / y1 exclusive): (hp, wp) stride-``stride`` probabilities -> (y1 - y0, x1 - x0).

    Equal to ``paste_masks(mask_probs[None], ...)[0, y0:y1, x0:x1]`` up to float rounding
    (the same weights, summed in another order): rows @ probs @ columns.T with the
    :func:`paste_matrix` of each axis, restricted to the box and to the stride-``stride``
    cells it reads, so the work grows with the box, not the image.
    """
    x0, y0, x1, y1 = box
    if y1 <= y0 or x1 <= x0:
        return mask_probs.new_zeros(max(y1 - y0, 0), max(x1 - x0, 0), dtype=torch.float32)
    rows, row_first, row_last = paste_matrix(mask_probs.shape[0], stride, input_hw[0], output_hw[0])
    cols, col_first, col_last = paste_matrix(mask_probs.shape[1], stride, input_hw[1], output_hw[1])
    r0, r1 = int(row_first[y0]), int(row_last[y1 - 1]) + 1  # first/last grow with the pixel
    c0, c1 = int(col_first[x0]), int(col_last[x1 - 1]) + 1
    dev = mask_probs.device
    band = mask_probs[r0:r1, c0:c1].float()
    return rows[y0:y1, r0:r1].to(dev) @ band @ cols[x0:x1, c0:c1].to(dev).T


# Margin under the threshold for :func:`paste_windows`: the paste's weights sum to 1 only up to
# float rounding, so a pixel may land a few ulps above the largest value it reads.
_WINDOW_MARGIN = 1e-4


def paste_windows(mask_probs: Tensor, threshold: float, input_hw: tuple[int, int], output_hw: tuple[int, int], stride: int = 4) -> Tensor:
    """(n, hp, wp) stride-``stride`` probabilities -> (n, 4) int64 windows (x0, y0, x1, y1) of the
    original image outside which ``paste_masks(mask_probs, ...) > threshold`` is False; (0, 0,
    0, 0) for a mask with no pixel above it.

    A pasted pixel is a convex combination of the cells it reads (:func:`paste_matrix`), so
    it can exceed the threshold only if one of them does: the window spans the output rows
    that read a row holding such a cell, and the same for columns. Found on the small
    stride-``stride`` maps, it spares pasting and scanning the rest of the image.
    """
    n = mask_probs.shape[0]
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.long)
    live = mask_probs.float() > threshold - _WINDOW_MARGIN  # (n, hp, wp)
    spans = []
    for axis, length_out in ((1, output_hw[0]), (2, output_hw[1])):
        matrix = paste_matrix(mask_probs.shape[axis], stride, input_hw[axis - 1], length_out)[0].to(mask_probs.device)
        cells = live.any(dim=3 - axis).float()  # rows (axis 1) or columns (axis 2) with a live cell
        reads = (cells @ (matrix != 0).float().T) > 0  # (n, length_out)
        index = torch.arange(length_out, device=mask_probs.device)
        start = torch.where(reads, index, length_out).min(dim=1).values
        end = torch.where(reads, index + 1, 0).max(dim=1).values
        spans.append((start, end))
    (y0, y1), (x0, x1) = spans
    windows = torch.stack([x0, y0, x1, y1], dim=1)
    empty = (x1 <= x0) | (y1 <= y0)
    return torch.where(empty[:, None], torch.zeros_like(windows), windows).cpu()


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
