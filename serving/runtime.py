"""Predictors: one small contract, three runtimes, chosen by the model file.

    predictor = load_predictor("model.pth")        # eager PyTorch, teacher weights
    predictor = load_predictor("model.onnx")       # ONNX Runtime (+ model.prompt.onnx next to it)
    predictor = load_predictor("model.engine")     # TensorRT plans + model.engine.json sidecar
    [[Instance, ...], ...] = predictor.predict([rgb_uint8_hwc, ...], boxes=[None | (n,4) xyxy, ...])

**Encode once, prompt many.** A runtime implements two parts: :meth:`Predictor._encode`
(the image part: resized images in, one :class:`serving.prompting.ImageEncoding` each:
detections, their masks and the features box prompts need) and :meth:`Predictor._prompt`
(the prompt part: an encoding and boxes in, a :class:`serving.prompting.PromptOutput` out).
Encodings are cached per (model version, image content hash) in an LRU bounded in bytes
(:mod:`serving.cache`), so a second request for the same image (more boxes, or the
automatic detections again) runs only the prompt part, or nothing of the network. The
cached path runs the very same code as the uncached one on the very same tensors, so its
answers are identical.

Every runtime shares the code around the network (``training.model.processing``):
resize to the test scale, normalise and pad (before); scale boxes back, paste the
stride-4 mask probabilities to the original size and threshold them (after); and the
box-prompt logic of :mod:`serving.prompting`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import nms

from serving.cache import EncodingCache, image_digest
from serving.masks import window_of
from serving.prompting import SOURCE_DETECTION, ImageEncoding, PromptOutput, box_prompted_masks, validate_boxes
from training.model.processing import InputSpec, batch_to_spec, paste_mask_in_box, paste_windows, resize_to_spec, scale_boxes

log = logging.getLogger(__name__)

RUNTIMES = ("pytorch", "onnxruntime", "tensorrt")
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024  # encodings kept per predictor (R-50 at 800x1333: ~40 MB each)
CHECKPOINT_SUFFIXES = (".pth", ".pt")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")


@dataclass(frozen=True)
class Instance:
    """One predicted instance, in the original image's pixels.

    box: (4,) float32 xyxy (for a box prompt: the given box, clipped to the image);
    label: contiguous class index (``class_names[label]`` = label_name);
    det_score: detection confidence sqrt(cls * ctr);
    mask_score: mask-aware score sqrt(det_score * mean confident mask probability)
    (BoxTeacher's ranking / mask-quality score; over the box for a box prompt);
    mask: (H, W) bool; source: "detection", or for a box prompt (mask head at the box
    centre) "matched" (the box matched a detection by Algorithm 1: its class and score) or
    "prompt" (no match: class and score at the box centre);
    window: (x0, y0, x1, y1) integer pixels (x1 / y1 exclusive) outside which the mask is
    all False, or None when unknown: the mask encoders and ``area`` look only there.
    """

    box: np.ndarray
    label: int
    label_name: str
    det_score: float
    mask_score: float
    mask: np.ndarray
    source: str = SOURCE_DETECTION
    window: tuple[int, int, int, int] | None = None

    @property
    def area(self) -> int:
        """Mask area in pixels."""
        return int(np.count_nonzero(window_of(self.mask, self.window)))


@dataclass(frozen=True)
class ImageRef:
    """An image given by its content key instead of its pixels: ``digest`` =
    :func:`serving.cache.image_digest` of the pixels, ``hw`` their (H, W), ``load()`` returns
    the (H, W, 3) uint8 pixels (called only when the encoding is not in the cache). The HTTP
    API passes these for uploads it has decoded before, so a repeated upload is neither
    decoded nor hashed again."""

    digest: str
    hw: tuple[int, int]
    load: Callable[[], np.ndarray]

    @classmethod
    def of(cls, image: np.ndarray, digest: str | None = None) -> ImageRef:
        """Pixels in hand: their digest (computed unless given), their size, and the pixels."""
        return cls(digest or image_digest(image), (int(image.shape[0]), int(image.shape[1])), lambda: image)


PerImage = float | int | None | Sequence[float | int | None]


def _per_image(value: PerImage, n: int, what: str) -> list:
    if value is None or isinstance(value, (int, float)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{what}: got {len(values)} values for {n} images")
    return values


def file_version(path: str | Path) -> str:
    """First 12 hex digits of the file's SHA-256: the model version when none is stored."""
    from training.files import file_sha256

    return file_sha256(path)[:12]


class Predictor(ABC):
    """Instance segmentation over one runtime. Thread-compatible, not thread-safe:
    call :meth:`predict` from one thread at a time (the server has one inference lane)."""

    runtime: str = ""

    def __init__(
        self,
        *,
        name: str,
        version: str,
        class_names: Sequence[str],
        input_spec: InputSpec,
        mask_threshold: float = 0.5,
        mask_stride: int = 4,
        nms_threshold: float = 0.6,
        device: str = "cpu",
        path: str | Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.name = name
        self.version = version
        self.class_names = list(class_names)
        self.input_spec = input_spec
        self.mask_threshold = mask_threshold
        self.mask_stride = mask_stride
        self.nms_threshold = nms_threshold
        # NMS over all classes on the detections (one box, one class); set by the server.
        self.class_agnostic_nms = False
        self.device = device
        self.path = Path(path) if path is not None else None
        self.cache: EncodingCache[ImageEncoding] = EncodingCache(cache_bytes)

    # ---- description -----------------------------------------------------------------
    @property
    def input_size(self) -> dict[str, Any]:
        """The input rule: {"min_size", "max_size", "size_divisibility", "fixed": [H, W] | None}."""
        s = self.input_spec
        return {
            "min_size": s.min_size,
            "max_size": s.max_size,
            "size_divisibility": s.size_divisibility,
            "fixed": list(s.fixed_hw) if s.fixed_hw else None,
        }

    def info(self) -> dict[str, Any]:
        """Name, version, runtime, device, classes and input size (for /v1/model)."""
        return {
            "name": self.name,
            "version": self.version,
            "runtime": self.runtime,
            "device": self.device,
            "class_names": self.class_names,
            "input_size": self.input_size,
            "mask_threshold": self.mask_threshold,
        }

    # ---- the contract ------------------------------------------------------------------
    def predict(
        self,
        images: Sequence[np.ndarray | ImageRef],
        boxes: Sequence[np.ndarray | None] | None = None,
        score_threshold: PerImage = None,
        max_instances: PerImage = None,
        use_cache: bool = True,
    ) -> list[list[Instance]]:
        """Instances for each image.

        Args:
            images: (H, W, 3) uint8 RGB arrays or :class:`ImageRef` instances (any sizes; the images
                not in the cache run as one batch where the runtime can).
            boxes: None, or one entry per image: None (automatic detection) or an
                (n, 4) float array of xyxy boxes in that image's pixels. With boxes the
                result has exactly one instance per box, in the given order, each mask
                clipped to its box; ``score_threshold`` and ``max_instances`` do not apply.
            score_threshold: drop detections whose mask-aware score is below it (a number
                for all images or one per image; None keeps all the model's detections).
            max_instances: keep at most this many detections, best mask-aware score first.
            use_cache: look the images up in the encoding cache and store new encodings
                there (False: neither; batch jobs over many images use it so that they do
                not evict the images annotators are working on).
        Returns:
            per image, its instances sorted by mask-aware score (descending), or in box
            order for box prompts.
        Raises:
            ValueError: an image that is not (H, W, 3) uint8, or a bad box (non-finite,
                x2 <= x1 or y2 <= y1, or outside the image).
        """
        n = len(images)
        if n == 0:
            return []
        box_list = list(boxes) if boxes is not None else [None] * n
        if len(box_list) != n:
            raise ValueError(f"boxes: got {len(box_list)} entries for {n} images")
        thresholds = _per_image(score_threshold, n, "score_threshold")
        limits = _per_image(max_instances, n, "max_instances")
        checked: list[np.ndarray | ImageRef] = []
        sizes, clipped = [], []
        for i, image in enumerate(images):
            if not isinstance(image, ImageRef):
                image = _check_image(image, i)
            hw = image.hw if isinstance(image, ImageRef) else image.shape[:2]
            checked.append(image)
            sizes.append(hw)
            clipped.append(None if box_list[i] is None else validate_boxes(box_list[i], hw))
        encodings = self.encode(checked, use_cache)
        return [self._finish(enc, hw, b, thr, lim) for enc, hw, b, thr, lim in zip(encodings, sizes, clipped, thresholds, limits)]

    def cache_key(self, image: np.ndarray | ImageRef) -> tuple[str, str]:
        """The encoding cache's key of an image: (model version, content digest)."""
        return self.version, image.digest if isinstance(image, ImageRef) else image_digest(image)

    def encode(self, images: Sequence[np.ndarray | ImageRef], use_cache: bool = True) -> list[ImageEncoding]:
        """The image part of each image (an (H, W, 3) uint8 array or an :class:`ImageRef`): from
        the cache, or encoded (the misses together, in one :meth:`_encode` call) and then cached."""
        keys = [self.cache_key(im) if use_cache and self.cache.max_bytes > 0 else None for im in images]
        found = [self.cache.get(k) if k is not None else None for k in keys]
        missing = [i for i, enc in enumerate(found) if enc is None]
        if missing:
            pixels = [_check_image(images[i].load(), i) if isinstance(images[i], ImageRef) else images[i] for i in missing]
            resized = [self._resize(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)) for im in pixels]
            for i, enc in zip(missing, self._encode(resized)):
                found[i] = enc
                if keys[i] is not None:
                    self.cache.put(keys[i], enc)
        return found  # type: ignore[return-value]

    def warm_up(self) -> None:
        """One automatic and one box-prompted prediction on a blank image at the test size
        (not cached)."""
        s = self.input_spec
        h, w = s.fixed_hw or (s.min_size, s.min_size)
        image = np.full((h, w, 3), 114, dtype=np.uint8)
        self.predict([image], use_cache=False)
        self.predict([image], boxes=[np.array([[w * 0.25, h * 0.25, w * 0.75, h * 0.75]], dtype=np.float32)], use_cache=False)

    def close(self) -> None:
        """Release runtime resources (sessions, engines) and the cached encodings."""
        self.cache.clear()

    # ---- what a runtime implements -------------------------------------------------------
    @abstractmethod
    def _encode(self, images: list[Tensor]) -> list[ImageEncoding]:
        """The image part: resized (3, h, w) uint8 RGB tensors (see :meth:`_resize`) -> one
        encoding per image (detections at the input resolution, features for prompts)."""

    @abstractmethod
    def _prompt(self, encoding: ImageEncoding, boxes: Tensor) -> PromptOutput:
        """The prompt part: (P, 4) float32 xyxy boxes in the resized image's pixels, P >= 1."""

    # ---- shared pre / post-processing -------------------------------------------------------
    def _resize(self, image: Tensor) -> Tensor:
        """(3, H, W) -> the network's input size (test-scale rule; fits a fixed canvas)."""
        return resize_to_spec(image, self.input_spec)

    def _normalize(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Resized images -> (B, 3, Hp, Wp) float32 batch (on the images' device) and sizes."""
        return batch_to_spec(images, self.input_spec)

    def _finish(
        self,
        enc: ImageEncoding,
        output_hw: tuple[int, int],
        boxes: np.ndarray | None,
        score_threshold: float | None,
        max_instances: int | None,
    ) -> list[Instance]:
        """One image's encoding (+ the prompt part for its boxes) -> instances in its original pixels."""
        output_hw = (int(output_hw[0]), int(output_hw[1]))
        if boxes is not None:
            in_hw = enc.input_hw
            scale = np.array([in_hw[1] / output_hw[1], in_hw[0] / output_hw[0]] * 2, dtype=np.float32)
            prompt = self._prompt(enc, torch.from_numpy(boxes * scale)) if len(boxes) else _no_prompt(enc)
            pm = box_prompted_masks(torch.from_numpy(boxes), enc, prompt, output_hw, self.mask_threshold, self.mask_stride)
            masks = pm.masks.cpu().numpy()
            labels, det, scores = pm.labels.tolist(), pm.det_scores.tolist(), pm.mask_scores.tolist()
            return [
                self._instance(boxes[k], labels[k], det[k], scores[k], masks[k], pm.sources[k], pm.windows[k])
                for k in range(boxes.shape[0])
            ]

        det_boxes = scale_boxes(enc.boxes.float(), enc.input_hw, output_hw)
        order = torch.argsort(enc.scores.float(), descending=True, stable=True)
        if score_threshold is not None:
            order = order[enc.scores[order].float() >= float(score_threshold)]
        b = det_boxes[order]
        order = order[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
        if self.class_agnostic_nms and len(order) > 1:
            # torchvision's nms keeps indices in descending score order, as ``order`` is
            order = order[nms(det_boxes[order], enc.scores[order].float(), self.nms_threshold)]
        if max_instances is not None:
            order = order[: max(int(max_instances), 0)]
        h, w = output_hw
        probs_s4 = enc.mask_probs[order]
        # Each mask is pasted only on the window it can cover (paste_windows: found on the
        # stride-4 map), not on the whole image: the same pixels, at the cost of the windows.
        windows = paste_windows(probs_s4, self.mask_threshold, enc.input_hw, output_hw, self.mask_stride).tolist()
        masks = np.zeros((len(order), h, w), dtype=bool)
        for k, (x0, y0, x1, y1) in enumerate(windows):
            if x1 > x0:
                probs = paste_mask_in_box(probs_s4[k], (x0, y0, x1, y1), enc.input_hw, output_hw, self.mask_stride)
                masks[k, y0:y1, x0:x1] = (probs > self.mask_threshold).cpu().numpy()
        boxes_np = det_boxes[order].cpu().numpy()
        labels, det, scores = enc.labels[order].tolist(), enc.det_scores[order].tolist(), enc.scores[order].tolist()
        return [
            self._instance(boxes_np[k], labels[k], det[k], scores[k], masks[k], SOURCE_DETECTION, tuple(windows[k]))
            for k in range(len(order))
        ]

    def _instance(self, box, label: int, det: float, score: float, mask: np.ndarray, source: str, window) -> Instance:
        label = int(label)
        name = self.class_names[label] if 0 <= label < len(self.class_names) else str(label)
        return Instance(np.asarray(box, dtype=np.float32).copy(), label, name, float(det), float(score), mask, source, window)


def _check_image(image, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ValueError(f"image {index} must be an (H, W, 3) uint8 RGB array; got {image.dtype} {list(image.shape)}")
    return image


def _no_prompt(enc: ImageEncoding) -> PromptOutput:
    dev = enc.mask_probs.device
    return PromptOutput(
        torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, device=dev), torch.zeros(0, *enc.mask_probs.shape[-2:], device=dev)
    )


# ---------------------------------------------------------------------------------------------
class PyTorchPredictor(Predictor):
    """Eager PyTorch on a checkpoint (teacher weights by default). Images whose padded
    input sizes agree run as one batch (one forward); others in separate forwards, so a
    result never depends on which other images shared the batch."""

    runtime = "pytorch"

    def __init__(self, path: str | Path, device: str = "cpu", branch: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES):
        from training.checkpoint import load_model

        model, cfg = load_model(path, branch=branch, device=device)
        self.model = model
        self.cfg = cfg
        names = cfg.class_names or [f"class_{i}" for i in range(cfg.model.num_classes)]
        super().__init__(
            name=Path(path).stem,
            version=file_version(path),
            class_names=names,
            input_spec=InputSpec.from_config(cfg.input),
            mask_threshold=cfg.model.mask.threshold,
            mask_stride=cfg.model.mask.out_stride,
            nms_threshold=cfg.model.fcos.nms_threshold,
            device=str(device),
            path=path,
            cache_bytes=cache_bytes,
        )

    @torch.inference_mode()
    def _encode(self, images: list[Tensor]) -> list[ImageEncoding]:
        from training.model.fcos import prompt_cells

        div = self.input_spec.size_divisibility
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            key = (-(-im.shape[-2] // div) * div, -(-im.shape[-1] // div) * div)
            groups.setdefault(key, []).append(i)
        outputs: list[ImageEncoding | None] = [None] * len(images)
        dev = self.model.device
        for index in groups.values():
            batch, sizes = self._normalize([images[i].to(dev) for i in index])
            head, feats = self.model(batch)
            for b, (i, d) in enumerate(zip(index, self.model.detect(head, feats, sizes))):
                cells = prompt_cells(head, b)
                features = {
                    "cell_scores": cells.scores,
                    "cell_classes": cells.classes,
                    "cell_params": cells.params,
                    "mask_feats": feats[b : b + 1].clone() if len(index) > 1 else feats,
                }
                outputs[i] = ImageEncoding(d.dets.boxes, d.dets.labels, d.dets.det_scores, d.scores, d.mask_probs, d.input_hw, features)
        return outputs  # type: ignore[return-value]

    @torch.inference_mode()
    def _prompt(self, encoding: ImageEncoding, boxes: Tensor) -> PromptOutput:
        from training.model.fcos import PromptCells

        f = encoding.features
        cells = PromptCells(f["cell_scores"], f["cell_classes"], f["cell_params"])
        return PromptOutput(*self.model.prompt(cells, f["mask_feats"], boxes.to(self.model.device)))


# ---------------------------------------------------------------------------------------------
class _ExportedPredictor(Predictor):
    """Shared by ONNX Runtime and TensorRT: an export's two graphs (``model``: an
    :class:`export.onnx_runtime.OnnxModel` or :class:`export.tensorrt_runtime.TensorRTModel`),
    one image per encoder run (images (1,3,H,W) float32 normalised and padded, image_size
    int64 (2,); fixed-K outputs with -1 labels as padding), the prompt graph on the cached
    encoder features."""

    def __init__(self, model, path: str | Path, device: str, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.exported = model
        meta = model.metadata
        self.metadata = meta
        super().__init__(
            name=Path(path).stem,
            version=meta.model_version or file_version(path),
            class_names=list(meta.class_names),
            input_spec=meta.input_spec(),
            mask_threshold=float(meta.mask_threshold),
            mask_stride=int(meta.mask_stride),
            nms_threshold=float(meta.nms_threshold),
            device=device,
            path=path,
            cache_bytes=cache_bytes,
        )

    def _encode(self, images: list[Tensor]) -> list[ImageEncoding]:
        from export.metadata import IMAGE_FEATURES

        outputs = []
        for image in images:
            batch, sizes = self._normalize([image])
            raw = self.exported.encode(self._feed(batch), np.asarray(sizes[0], dtype=np.int64))
            labels = _tensor(raw["labels"]).reshape(-1)
            count = int(_tensor(raw["num_detections"]).reshape(-1)[0])
            keep = torch.nonzero(labels[:count] >= 0).reshape(-1).to(labels.device)
            features = {k: raw[k] for k in IMAGE_FEATURES}  # as the runtime returned them: fed back unchanged
            outputs.append(
                ImageEncoding(
                    _tensor(raw["boxes"])[keep].float(), labels[keep].long(), _tensor(raw["det_scores"])[keep].float(),
                    _tensor(raw["scores"])[keep].float(), _tensor(raw["masks"])[keep].float(), sizes[0], features,
                )
            )  # fmt: skip
        return outputs

    def _prompt(self, encoding: ImageEncoding, boxes: Tensor) -> PromptOutput:
        raw = self.exported.prompt(encoding.features, self._feed(boxes.float().contiguous()))
        return PromptOutput(
            _tensor(raw["prompt_labels"]).long(), _tensor(raw["prompt_det_scores"]).float(), _tensor(raw["prompt_masks"]).float()
        )

    def _feed(self, t: Tensor):
        """What the runtime takes: numpy for ONNX Runtime (TensorRT takes the tensor)."""
        return t.numpy()


def _tensor(value) -> Tensor:
    """A runtime output as a tensor (numpy arrays are wrapped without copying)."""
    return value if isinstance(value, Tensor) else torch.from_numpy(np.ascontiguousarray(value))


class OnnxPredictor(_ExportedPredictor):
    """ONNX Runtime on an export (``model.onnx`` + ``model.prompt.onnx``; CPU; CUDA / TensorRT
    execution providers when onnxruntime-gpu provides them and ``device`` is cuda)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", cache_bytes: int = DEFAULT_CACHE_BYTES):
        from export.onnx_runtime import OnnxModel

        super().__init__(OnnxModel(path, device), path, device, cache_bytes)


class TensorRTPredictor(_ExportedPredictor):
    """TensorRT plans (``model.engine`` + ``model.prompt.engine``) and the JSON sidecar
    ``model.engine.json``; needs a CUDA GPU. Outputs stay on the GPU: masks are pasted there."""

    runtime = "tensorrt"

    def __init__(self, path: str | Path, device: str = "cuda", cache_bytes: int = DEFAULT_CACHE_BYTES):
        from export.tensorrt_runtime import TensorRTModel

        super().__init__(TensorRTModel(path, device), path, device, cache_bytes)

    def _feed(self, t: Tensor):
        return t


def load_predictor(path: str | Path, device: str = "cpu", branch: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Predictor:
    """The predictor for a model file, by its suffix.

    .pth / .pt: a boxteacher checkpoint, eager PyTorch (``branch``: teacher by default
    when the checkpoint has one, else student); .onnx: ONNX Runtime (with the prompt
    graph ``<name>.prompt.onnx``); .engine / .plan: TensorRT (with the prompt plan and the
    ``<file>.json`` sidecar). ``device``: "cpu", "cuda" or "cuda:N". ``cache_bytes``: size
    of the encoding cache (0: off).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return PyTorchPredictor(path, device, branch, cache_bytes)
    if branch is not None:
        raise ValueError(f"--branch applies to checkpoints only; {path.name} is an exported model")
    if suffix in ONNX_SUFFIXES:
        return OnnxPredictor(path, device, cache_bytes)
    if suffix in ENGINE_SUFFIXES:
        return TensorRTPredictor(path, "cuda" if device == "cpu" else device, cache_bytes)
    raise ValueError(
        f"unknown model file type {suffix!r} ({path.name}); use a checkpoint (.pth/.pt), "
        "an ONNX model (.onnx) or a TensorRT engine (.engine/.plan)"
    )
