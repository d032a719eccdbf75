"""Run an exported ``model.onnx`` with ONNX Runtime, and read its metadata.

The graph contract (see :mod:`export.onnx_export`), one image per run:

inputs
  ``images`` float32 (1, 3, H, W): normalised and padded as
  :func:`training.model.processing.normalize_and_pad` does (H, W multiples of 32);
  ``image_size`` int64 (2,): the un-padded (h, w) inside the padded canvas;
  ``prompt_boxes`` float32 (P, 4), P >= 1: xyxy boxes in input pixels (callers
  without prompts pass one dummy box [0, 0, 1, 1] and ignore the prompt outputs).
outputs (K = max_detections in the metadata)
  ``boxes`` (K, 4) float32 xyxy input pixels; ``labels`` (K,) int64, -1 = padding;
  ``det_scores`` (K,) float32; ``scores`` (K,) float32 mask-aware; ``masks``
  (K, H/4, W/4) float32 probabilities on the padded canvas; ``num_detections`` (1,)
  int64: the real detections are the first ``num_detections`` rows, by det score;
  ``prompt_labels`` (P,) int64, ``prompt_det_scores`` (P,), ``prompt_scores`` (P,),
  ``prompt_masks`` (P, H/4, W/4).

Only ``onnx`` (metadata) and ``onnxruntime`` (running) are needed here, not torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INPUT_NAMES = ("images", "image_size", "prompt_boxes")
OUTPUT_NAMES = (
    "boxes",
    "labels",
    "det_scores",
    "scores",
    "masks",
    "num_detections",
    "prompt_labels",
    "prompt_det_scores",
    "prompt_scores",
    "prompt_masks",
)
DUMMY_PROMPT = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The model's ``metadata_props`` as a dict, each value JSON-decoded.

    Keys written by :func:`export.onnx_export.export_onnx`: class_names (list),
    num_classes, min_size_test, max_size_test, pixel_mean, pixel_std, channel_format,
    size_divisibility, mask_threshold, mask_stride, score_threshold, nms_threshold,
    max_detections, dynamic (bool), input_size ([H, W] of a fixed-size graph, else
    null), example_input_size, model_version, checkpoint_sha256, iteration, branch,
    method, boxteacher_version, opset, input_names, output_names. A value that is not
    JSON is returned as the plain string.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    model = onnx.load(str(path), load_external_data=False)
    meta: dict[str, Any] = {}
    for prop in model.metadata_props:
        try:
            meta[prop.key] = json.loads(prop.value)
        except ValueError:
            meta[prop.key] = prop.value
    return meta


def available_providers(device: str = "cpu") -> list[str]:
    """Execution providers to use, best first: TensorRT, CUDA (when onnxruntime-gpu
    offers them and ``device`` is cuda), always CPU last."""
    import onnxruntime as ort

    offered = ort.get_available_providers()
    chosen = []
    if str(device).startswith("cuda"):
        chosen = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in offered]
        if not chosen:
            log.warning(
                "device=%s but onnxruntime offers only %s; running on CPU (pip install boxteacher[gpu] "
                "installs onnxruntime-gpu; never install onnxruntime and onnxruntime-gpu together)",
                device,
                offered,
            )
    return chosen + ["CPUExecutionProvider"]


class OnnxRunner:
    """ONNX Runtime session over an exported model; the stable API serving wraps.

    ``OnnxRunner(path, device="cpu", providers=None, threads=None)``:
    CPUExecutionProvider by default; with ``device="cuda"`` (or "cuda:N") the TensorRT
    and CUDA execution providers when onnxruntime-gpu provides them. ``providers``
    overrides the choice (names or (name, options) pairs); ``threads`` sets the
    intra-op thread count (default: ORT's); ``config`` adds session config entries
    (e.g. ``{"session.intra_op.allow_spinning": "0"}``).

    ``run(images_padded, image_size, prompt_boxes=None) -> dict[str, np.ndarray]``
    with the inputs and outputs of the module docstring; ``prompt_boxes=None`` feeds
    the dummy box.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        providers: list | None = None,
        threads: int | None = None,
        config: dict[str, str] | None = None,
    ):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        self.path = path
        self.device = str(device)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, str(value))
        providers = providers or self._providers(self.device)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.providers = self.session.get_providers()
        names = [i.name for i in self.session.get_inputs()]
        if tuple(names) != INPUT_NAMES:
            raise ValueError(f"{path} is not a boxteacher export: inputs {names}, expected {list(INPUT_NAMES)}")
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = self.session.get_inputs()[0].shape
        self.fixed_hw = tuple(shape[2:]) if all(isinstance(d, int) for d in shape[2:]) else None

    @staticmethod
    def _providers(device: str) -> list:
        chosen = available_providers(device)
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        out: list = []
        for p in chosen:
            if p == "CUDAExecutionProvider":
                out.append((p, {"device_id": index}))
            elif p == "TensorrtExecutionProvider":
                out.append((p, {"device_id": index, "trt_engine_cache_enable": True}))
            else:
                out.append(p)
        return out

    def run(self, images_padded: np.ndarray, image_size, prompt_boxes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """images_padded (1,3,H,W) float32, image_size (h, w) int64, prompt_boxes (P,4)
        float32 or None -> {output name: array} (see the module docstring)."""
        images = np.ascontiguousarray(np.asarray(images_padded, dtype=np.float32))
        if images.ndim != 4 or images.shape[0] != 1 or images.shape[1] != 3:
            raise ValueError(f"images must be (1,3,H,W), got {images.shape}")
        if self.fixed_hw is not None and tuple(images.shape[2:]) != self.fixed_hw:
            raise ValueError(
                f"this ONNX model was exported for a fixed input of {self.fixed_hw[0]}x{self.fixed_hw[1]}, "
                f"got {images.shape[2]}x{images.shape[3]}; pad to that size or export with --dynamic"
            )
        boxes = DUMMY_PROMPT if prompt_boxes is None or len(prompt_boxes) == 0 else np.asarray(prompt_boxes, dtype=np.float32).reshape(-1, 4)
        feeds = {
            "images": images,
            "image_size": np.asarray(image_size, dtype=np.int64).reshape(2),
            "prompt_boxes": np.ascontiguousarray(boxes),
        }
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))
