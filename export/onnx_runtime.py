"""Run an exported model (encoder + prompt graph) with ONNX Runtime.

The graph contract (see :mod:`export.onnx_export`; names in :mod:`export.metadata`), one
image per run:

encoder ``model.onnx``
  inputs: ``images`` float32 (1, 3, H, W), normalised and padded as
  :func:`training.model.processing.batch_to_spec` does (H, W multiples of 32);
  ``image_size`` int64 (2,): the un-padded (h, w) inside the padded canvas.
  outputs (K = max_detections in the metadata): ``boxes`` (K, 4) float32 xyxy input pixels;
  ``labels`` (K,) int64, -1 = padding; ``det_scores`` (K,) float32; ``scores`` (K,) float32
  mask-aware; ``masks`` (K, H/4, W/4) float32 probabilities on the padded canvas;
  ``num_detections`` (1,) int64: the real detections are the first ``num_detections`` rows,
  by det score; and the image features box prompts read: ``cell_scores`` (N,) float32,
  ``cell_classes`` (N,) int64, ``cell_params`` (N, P) float32 (every FPN cell, P3..P7) and
  ``mask_feats`` (1, C, H/8, W/8) float32.
prompt graph ``model.prompt.onnx``
  inputs: ``prompt_boxes`` float32 (B, 4), B >= 1, xyxy in input pixels, and the encoder's
  four feature outputs; outputs: ``prompt_labels`` (B,) int64, ``prompt_det_scores`` (B,)
  float32, ``prompt_masks`` (B, H/4, W/4) float32.

Only ``onnx`` (metadata) and ``onnxruntime`` (running) are needed here, not torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export.metadata import ENCODER_INPUTS, IMAGE_FEATURES, PROMPT_INPUTS, ExportMetadata, prompt_path, read_onnx_metadata

log = logging.getLogger(__name__)


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
    """One ONNX Runtime session: ``run(feeds) -> {output name: array}``.

    ``OnnxRunner(path, device="cpu", providers=None, threads=None, config=None, inputs=None)``:
    CPUExecutionProvider by default; with ``device="cuda"`` (or "cuda:N") the TensorRT
    and CUDA execution providers when onnxruntime-gpu provides them. ``providers``
    overrides the choice (names or (name, options) pairs); ``threads`` sets the
    intra-op thread count (default: ORT's); ``config`` adds session config entries
    (e.g. ``{"session.intra_op.allow_spinning": "0"}``); ``inputs``: the input names the
    graph must have (ValueError otherwise).
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        providers: list | None = None,
        threads: int | None = None,
        config: dict[str, str] | None = None,
        inputs: tuple[str, ...] | None = None,
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
        self.input_names = [i.name for i in self.session.get_inputs()]
        if inputs is not None and tuple(self.input_names) != tuple(inputs):
            raise ValueError(
                f"{path} is not a boxteacher export of this version: inputs {self.input_names}, expected {list(inputs)} "
                "(export it again with 'boxteacher export onnx')"
            )
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = self.session.get_inputs()[0].shape
        self.fixed_hw = tuple(shape[2:]) if len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]) else None

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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{input name: array} -> {output name: array}."""
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class OnnxModel:
    """An export's two sessions: :meth:`encode` (the encoder) and :meth:`prompt` (the prompt
    graph, found next to the encoder by :func:`export.metadata.prompt_path`), and its
    :class:`export.metadata.ExportMetadata`. Arguments as :class:`OnnxRunner`."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, config: dict[str, str] | None = None):
        path = Path(path)
        self.metadata: ExportMetadata = read_onnx_metadata(path)
        second = prompt_path(path)
        if not second.is_file():
            raise FileNotFoundError(
                f"{path.name} needs its prompt graph {second.name} next to it (both are written by 'boxteacher export onnx')"
            )
        self.encoder = OnnxRunner(path, device, threads=threads, config=config, inputs=ENCODER_INPUTS)
        self.prompter = OnnxRunner(second, device, threads=threads, config=config, inputs=PROMPT_INPUTS)
        version = read_onnx_metadata(second).model_version
        if version != self.metadata.model_version:
            raise ValueError(
                f"{second.name} (model {version}) does not belong to {path.name} (model {self.metadata.model_version}); export again"
            )
        self.path = path
        self.device = str(device)
        self.providers = self.encoder.providers
        self.fixed_hw = self.encoder.fixed_hw

    def encode(self, images_padded: np.ndarray, image_size) -> dict[str, np.ndarray]:
        """images_padded (1,3,H,W) float32, image_size (h, w) -> the encoder's 10 outputs."""
        images = np.ascontiguousarray(np.asarray(images_padded, dtype=np.float32))
        if images.ndim != 4 or images.shape[0] != 1 or images.shape[1] != 3:
            raise ValueError(f"images must be (1,3,H,W), got {images.shape}")
        if self.fixed_hw is not None and tuple(images.shape[2:]) != self.fixed_hw:
            raise ValueError(
                f"this ONNX model was exported for a fixed input of {self.fixed_hw[0]}x{self.fixed_hw[1]}, "
                f"got {images.shape[2]}x{images.shape[3]}; pad to that size or export with --dynamic"
            )
        return self.encoder.run({"images": images, "image_size": np.asarray(image_size, dtype=np.int64).reshape(2)})

    def prompt(self, features: dict[str, np.ndarray], prompt_boxes: np.ndarray) -> dict[str, np.ndarray]:
        """features: the encoder's :data:`export.metadata.IMAGE_FEATURES` outputs; prompt_boxes
        (B, 4) float32, B >= 1 -> prompt_labels, prompt_det_scores, prompt_masks."""
        boxes = np.ascontiguousarray(np.asarray(prompt_boxes, dtype=np.float32).reshape(-1, 4))
        if boxes.shape[0] == 0:
            raise ValueError("the prompt graph needs at least one box")
        return self.prompter.run({"prompt_boxes": boxes, **{k: features[k] for k in IMAGE_FEATURES}})
