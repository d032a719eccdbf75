"""Predictors: one small contract, three runtimes, chosen by the model file.

    predictor = load_predictor("model.pth")        # eager PyTorch, teacher weights
    predictor = load_predictor("model.onnx")       # ONNX Runtime (CUDA/TensorRT EPs when present)
    predictor = load_predictor("model.engine")     # TensorRT plan + model.engine.json sidecar
    [[Instance, ...], ...] = predictor.predict([rgb_uint8_hwc, ...], boxes=[None | (n,4) xyxy, ...])

Every runtime shares the same code around the network (``training.model.processing``):
resize to the test scale, normalise and pad (before); scale boxes back, paste the
stride-4 mask probabilities to the original size and threshold them (after); and the
box-prompt logic of :mod:`serving.prompting`. A runtime only implements
:meth:`Predictor._infer`: resized images in, :class:`NetworkOutput` (input resolution) out.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from serving.prompting import SOURCE_DETECTION, box_prompted_masks, chunk_slices, validate_boxes
from training.model.processing import fit_long_side, normalize_and_pad, pad_to_canvas, paste_masks, resize_image, scale_boxes

log = logging.getLogger(__name__)

RUNTIMES = ("pytorch", "onnxruntime", "tensorrt")
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
    mask: (H, W) bool; source: "detection", "matched" (a box matched to a detection
    by Algorithm 1) or "prompt" (a box without a match: mask head at the box centre).
    """

    box: np.ndarray
    label: int
    label_name: str
    det_score: float
    mask_score: float
    mask: np.ndarray
    source: str = SOURCE_DETECTION

    @property
    def area(self) -> int:
        """Mask area in pixels."""
        return int(np.count_nonzero(self.mask))


@dataclass
class NetworkOutput:
    """One image's network outputs at the input resolution (what a runtime returns).

    boxes (K,4) xyxy input pixels; labels (K,) int64; det_scores (K,); scores (K,)
    mask-aware; mask_probs (K, hp/4, wp/4) stride-4 probabilities on the padded canvas;
    prompt_labels / prompt_det_scores (P,) and prompt_mask_probs (P, hp/4, wp/4) for the
    prompt boxes (P = 0 without prompts); input_hw: the resized, un-padded input size.
    """

    boxes: Tensor
    labels: Tensor
    det_scores: Tensor
    scores: Tensor
    mask_probs: Tensor
    prompt_labels: Tensor
    prompt_det_scores: Tensor
    prompt_mask_probs: Tensor
    input_hw: tuple[int, int]


@dataclass(frozen=True)
class InputSpec:
    """How images are fed to the network: shortest side -> min_size, long side <=
    max_size, channels in ``channel_format``, (x - mean) / std, padded to a multiple of
    ``size_divisibility``; ``fixed_hw`` (H, W) when the exported graph has a fixed size."""

    min_size: int
    max_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    channel_format: str = "RGB"
    size_divisibility: int = 32
    fixed_hw: tuple[int, int] | None = None


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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


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
        device: str = "cpu",
        path: str | Path | None = None,
    ):
        self.name = name
        self.version = version
        self.class_names = list(class_names)
        self.input_spec = input_spec
        self.mask_threshold = mask_threshold
        self.mask_stride = mask_stride
        self.device = device
        self.path = Path(path) if path is not None else None

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
        images: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray | None] | None = None,
        score_threshold: PerImage = None,
        max_instances: PerImage = None,
    ) -> list[list[Instance]]:
        """Instances for each image.

        Args:
            images: (H, W, 3) uint8 RGB arrays (any sizes; run as one batch where the
                runtime can).
            boxes: None, or one entry per image: None (automatic detection) or an
                (n, 4) float array of xyxy boxes in that image's pixels. With boxes the
                result has exactly one instance per box, in the given order, each mask
                clipped to its box; ``score_threshold`` and ``max_instances`` do not apply.
            score_threshold: drop detections whose mask-aware score is below it (a number
                for all images or one per image; None keeps all the model's detections).
            max_instances: keep at most this many detections, best mask-aware score first.
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

        tensors, originals, resized, prompts, clipped = [], [], [], [], []
        for i, image in enumerate(images):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
                raise ValueError(f"image {i} must be an (H, W, 3) uint8 RGB array; got {image.dtype} {list(image.shape)}")
            hw = (int(image.shape[0]), int(image.shape[1]))
            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            small = self._resize(chw)
            in_hw = (int(small.shape[-2]), int(small.shape[-1]))
            tensors.append(small)
            originals.append(hw)
            resized.append(in_hw)
            if box_list[i] is None:
                clipped.append(None)
                prompts.append(None)
            else:
                b = validate_boxes(box_list[i], hw)
                clipped.append(b)
                scale = np.array([in_hw[1] / hw[1], in_hw[0] / hw[0]] * 2, dtype=np.float32)
                prompts.append(torch.from_numpy(b * scale))

        outputs = self._infer(tensors, prompts)
        return [
            self._finish(out, hw, b, thr, lim)
            for out, hw, b, thr, lim in zip(outputs, originals, clipped, thresholds, limits)
        ]

    def warm_up(self) -> None:
        """One automatic and one box-prompted prediction on a blank image at the test size."""
        s = self.input_spec
        h, w = s.fixed_hw or (s.min_size, s.min_size)
        image = np.full((h, w, 3), 114, dtype=np.uint8)
        self.predict([image])
        self.predict([image], boxes=[np.array([[w * 0.25, h * 0.25, w * 0.75, h * 0.75]], dtype=np.float32)])

    def close(self) -> None:
        """Release runtime resources (sessions, engines)."""

    # ---- what a runtime implements -------------------------------------------------------
    @abstractmethod
    def _infer(self, images: list[Tensor], prompts: list[Tensor | None]) -> list[NetworkOutput]:
        """Run the network.

        images: resized (3, h, w) uint8 RGB tensors (see :meth:`_resize`); prompts: per
        image None or (P, 4) float32 xyxy boxes in the resized image's pixels.
        """

    # ---- shared pre / post-processing -------------------------------------------------------
    def _resize(self, image: Tensor) -> Tensor:
        """(3, H, W) -> the network's input size (test-scale rule; fits a fixed canvas)."""
        s = self.input_spec
        long_cap = fit_long_side(int(image.shape[-2]), int(image.shape[-1]), s.max_size, s.fixed_hw)
        return resize_image(image, s.min_size, long_cap)

    def _normalize(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Resized images -> (B, 3, Hp, Wp) float32 batch (on the images' device) and sizes."""
        s = self.input_spec
        batch, sizes = normalize_and_pad(images, list(s.pixel_mean), list(s.pixel_std), s.channel_format, s.size_divisibility)
        return pad_to_canvas(batch, s.fixed_hw), sizes

    def _finish(
        self,
        out: NetworkOutput,
        output_hw: tuple[int, int],
        boxes: np.ndarray | None,
        score_threshold: float | None,
        max_instances: int | None,
    ) -> list[Instance]:
        """Network outputs of one image -> instances in its original pixels."""
        det_boxes = scale_boxes(out.boxes.float(), out.input_hw, output_hw)
        if boxes is not None:
            pm = box_prompted_masks(
                torch.from_numpy(boxes),
                det_boxes,
                out.labels,
                out.det_scores,
                out.scores,
                out.mask_probs,
                out.prompt_labels,
                out.prompt_det_scores,
                out.prompt_mask_probs,
                out.input_hw,
                output_hw,
                self.mask_threshold,
                self.mask_stride,
            )
            masks = pm.masks.cpu().numpy()
            labels, det, scores = pm.labels.tolist(), pm.det_scores.tolist(), pm.mask_scores.tolist()
            return [
                self._instance(boxes[k], labels[k], det[k], scores[k], masks[k], pm.sources[k]) for k in range(boxes.shape[0])
            ]

        order = torch.argsort(out.scores.float(), descending=True, stable=True)
        if score_threshold is not None:
            order = order[out.scores[order].float() >= float(score_threshold)]
        b = det_boxes[order]
        order = order[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
        if max_instances is not None:
            order = order[: max(int(max_instances), 0)]
        h, w = output_hw
        masks = np.zeros((len(order), h, w), dtype=bool)
        for sl in chunk_slices(len(order), h * w):
            probs = paste_masks(out.mask_probs[order[sl]].float(), out.input_hw, output_hw, self.mask_stride)
            masks[sl] = (probs > self.mask_threshold).cpu().numpy()
        boxes_np = det_boxes[order].cpu().numpy()
        labels, det, scores = out.labels[order].tolist(), out.det_scores[order].tolist(), out.scores[order].tolist()
        return [self._instance(boxes_np[k], labels[k], det[k], scores[k], masks[k], SOURCE_DETECTION) for k in range(len(order))]

    def _instance(self, box, label: int, det: float, score: float, mask: np.ndarray, source: str) -> Instance:
        label = int(label)
        name = self.class_names[label] if 0 <= label < len(self.class_names) else str(label)
        return Instance(np.asarray(box, dtype=np.float32).copy(), label, name, float(det), float(score), mask, source)


# ---------------------------------------------------------------------------------------------
class PyTorchPredictor(Predictor):
    """Eager PyTorch on a checkpoint (teacher weights by default). Images whose padded
    input sizes agree run as one batch (one forward); others in separate forwards, so a
    result never depends on which other images shared the batch."""

    runtime = "pytorch"

    def __init__(self, path: str | Path, device: str = "cpu", branch: str | None = None):
        from training.checkpoint import load_model

        model, cfg = load_model(path, branch=branch, device=device)
        self.model = model
        self.cfg = cfg
        inp = cfg.input
        names = cfg.class_names or [f"class_{i}" for i in range(cfg.model.num_classes)]
        super().__init__(
            name=Path(path).stem,
            version=file_version(path),
            class_names=names,
            input_spec=InputSpec(
                inp.min_size_test,
                inp.max_size_test,
                tuple(inp.pixel_mean),
                tuple(inp.pixel_std),
                inp.format,
                inp.size_divisibility,
            ),
            mask_threshold=cfg.model.mask.threshold,
            mask_stride=cfg.model.mask.out_stride,
            device=str(device),
            path=path,
        )

    @torch.inference_mode()
    def _infer(self, images: list[Tensor], prompts: list[Tensor | None]) -> list[NetworkOutput]:
        from training.model.fcos import prompt_detections

        div = self.input_spec.size_divisibility
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            key = (-(-im.shape[-2] // div) * div, -(-im.shape[-1] // div) * div)
            groups.setdefault(key, []).append(i)
        outputs: list[NetworkOutput | None] = [None] * len(images)
        dev = self.model.device
        for index in groups.values():
            batch, sizes = self._normalize([images[i].to(dev) for i in index])
            head, feats = self.model(batch)
            detections = self.model.detect(head, feats, sizes)
            hp, wp = feats.shape[-2] * 2, feats.shape[-1] * 2  # stride 8 -> stride 4
            for b, i in enumerate(index):
                d = detections[b]
                p = prompts[i]
                if p is None or p.shape[0] == 0:
                    pl, ps = torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, device=dev)
                    pp = torch.zeros(0, hp, wp, device=dev)
                else:
                    pd = prompt_detections(head, p.to(dev), b, self.cfg.model.fcos)
                    image_index = torch.full_like(pd.labels, b)
                    pp = self.model.mask_logits(feats, pd.params, pd.locations, pd.levels, image_index).sigmoid()[:, 0]
                    pl, ps = pd.labels, pd.det_scores
                outputs[i] = NetworkOutput(
                    d.dets.boxes, d.dets.labels, d.dets.det_scores, d.scores, d.mask_probs, pl, ps, pp, d.input_hw
                )
        return outputs  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
def _metadata_spec(meta: dict[str, Any]) -> InputSpec:
    """InputSpec from exported-model metadata (ONNX metadata_props or the engine sidecar)."""

    def pick(*keys, default=None):
        for k in keys:
            if k in meta and meta[k] is not None:
                return meta[k]
        return default

    fixed = pick("fixed_input_hw", "input_hw", "input_size")
    dynamic = pick("dynamic", default=True)
    if isinstance(dynamic, str):
        dynamic = dynamic.lower() in ("1", "true", "yes")
    fixed_hw = tuple(int(v) for v in fixed) if (fixed and not dynamic and len(fixed) == 2) else None
    return InputSpec(
        int(pick("min_size_test", "min_size", default=800)),
        int(pick("max_size_test", "max_size", default=1333)),
        tuple(float(v) for v in pick("pixel_mean", default=[123.675, 116.28, 103.53])),
        tuple(float(v) for v in pick("pixel_std", default=[58.395, 57.12, 57.375])),
        str(pick("format", "channel_format", default="RGB")),
        int(pick("size_divisibility", default=32)),
        fixed_hw,
    )


class _ExportedPredictor(Predictor):
    """Shared by ONNX Runtime and TensorRT: one image per run of the exported graph
    (images (1,3,H,W) float32 normalised and padded, image_size int64 (2,), prompt
    boxes float32 (P,4) in input pixels; fixed-K outputs with -1 labels as padding)."""

    DUMMY_PROMPT = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)

    def __init__(self, runner, meta: dict[str, Any], path: str | Path, device: str):
        self.runner = runner
        self.metadata = meta
        names = list(meta.get("class_names") or [])
        super().__init__(
            name=str(meta.get("name") or Path(path).stem),
            version=str(meta.get("version") or meta.get("model_version") or file_version(path)),
            class_names=names,
            input_spec=_metadata_spec(meta),
            mask_threshold=float(meta.get("mask_threshold", 0.5)),
            mask_stride=int(meta.get("mask_stride", 4)),
            device=device,
            path=path,
        )

    def _infer(self, images: list[Tensor], prompts: list[Tensor | None]) -> list[NetworkOutput]:
        outputs = []
        for image, prompt in zip(images, prompts):
            batch, sizes = self._normalize([image])
            has_prompt = prompt is not None and prompt.shape[0] > 0
            boxes = prompt.float().contiguous() if has_prompt else torch.from_numpy(self.DUMMY_PROMPT)
            raw = self._run(batch, sizes[0], boxes)
            outputs.append(self._network_output(raw, sizes[0], has_prompt))
        return outputs

    def _run(self, batch: Tensor, input_hw: tuple[int, int], boxes: Tensor) -> dict[str, Tensor]:
        """One run of the graph -> {output name: tensor} (numpy outputs become CPU tensors)."""
        raw = self.runner.run(batch.numpy(), np.asarray(input_hw, dtype=np.int64), boxes.numpy())
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}

    @staticmethod
    def _network_output(raw: dict[str, Tensor], input_hw: tuple[int, int], has_prompt: bool) -> NetworkOutput:
        labels = raw["labels"].reshape(-1)
        count = int(raw["num_detections"].reshape(-1)[0]) if "num_detections" in raw else labels.shape[0]
        keep = torch.nonzero(labels[:count] >= 0).reshape(-1).to(labels.device)
        masks = raw["masks"][keep].float()
        if has_prompt:
            pl, ps, pp = raw["prompt_labels"].long(), raw["prompt_det_scores"].float(), raw["prompt_masks"].float()
        else:
            pl = torch.zeros(0, dtype=torch.int64, device=masks.device)
            ps = torch.zeros(0, device=masks.device)
            pp = torch.zeros(0, *masks.shape[-2:], device=masks.device)
        return NetworkOutput(
            raw["boxes"][keep].float(), labels[keep].long(), raw["det_scores"][keep].float(), raw["scores"][keep].float(),
            masks, pl, ps, pp, input_hw,
        )  # fmt: skip


class OnnxPredictor(_ExportedPredictor):
    """ONNX Runtime on an exported model (CPU; CUDA / TensorRT execution providers
    when onnxruntime-gpu provides them and ``device`` is cuda)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu"):
        from export.onnx_runtime import OnnxRunner, read_onnx_metadata

        super().__init__(OnnxRunner(str(path), device), read_onnx_metadata(str(path)), path, device)


class TensorRTPredictor(_ExportedPredictor):
    """A TensorRT plan plus its JSON sidecar (``model.engine.json``); needs a CUDA GPU."""

    runtime = "tensorrt"

    def __init__(self, path: str | Path, device: str = "cuda"):
        from export.tensorrt_runtime import TensorRTRunner, read_engine_metadata

        meta = read_engine_metadata(path)
        super().__init__(TensorRTRunner(str(path), device), meta, path, device)

    def _run(self, batch: Tensor, input_hw: tuple[int, int], boxes: Tensor) -> dict[str, Tensor]:
        # outputs stay on the GPU: masks are pasted there
        return self.runner.run_torch(batch, torch.tensor(input_hw, dtype=torch.int64), boxes)


def load_predictor(path: str | Path, device: str = "cpu", branch: str | None = None) -> Predictor:
    """The predictor for a model file, by its suffix.

    .pth / .pt: a boxteacher checkpoint, eager PyTorch (``branch``: teacher by default
    when the checkpoint has one, else student); .onnx: ONNX Runtime; .engine / .plan:
    TensorRT (with the ``<file>.json`` sidecar). ``device``: "cpu", "cuda" or "cuda:N".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return PyTorchPredictor(path, device, branch)
    if branch is not None:
        raise ValueError(f"--branch applies to checkpoints only; {path.name} is an exported model")
    if suffix in ONNX_SUFFIXES:
        return OnnxPredictor(path, device)
    if suffix in ENGINE_SUFFIXES:
        return TensorRTPredictor(path, "cuda" if device == "cpu" else device)
    raise ValueError(
        f"unknown model file type {suffix!r} ({path.name}); use a checkpoint (.pth/.pt), "
        "an ONNX model (.onnx) or a TensorRT engine (.engine/.plan)"
    )
