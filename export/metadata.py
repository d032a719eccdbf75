"""Export metadata: everything a runtime needs besides the graphs, written and read here only.

An export is two ONNX graphs (:mod:`export.onnx_export`): the **encoder** ``model.onnx``
(image -> detections and the image features box prompts need) and the small **prompt**
graph ``model.prompt.onnx`` next to it (those features + boxes -> one mask per box).
The encoder's ``metadata_props`` hold :class:`ExportMetadata` as JSON values, one key per
field; a TensorRT plan keeps the same fields in its JSON sidecar ``<engine>.json`` (plus the
engine's own: precision, TensorRT version, profile). Export, serving and the benchmarks read
it through :func:`read_metadata`; nobody looks keys up by hand.

Only the standard library at import time (``onnx`` when reading or writing a graph).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.files import file_sha256

# ---- the graph contract -------------------------------------------------------------------------
ENCODER_INPUTS = ("images", "image_size")
DETECTION_OUTPUTS = ("boxes", "labels", "det_scores", "scores", "masks", "num_detections")
IMAGE_FEATURES = ("cell_scores", "cell_classes", "cell_params", "mask_feats")
ENCODER_OUTPUTS = DETECTION_OUTPUTS + IMAGE_FEATURES
PROMPT_INPUTS = ("prompt_boxes",) + IMAGE_FEATURES
PROMPT_OUTPUTS = ("prompt_labels", "prompt_det_scores", "prompt_masks")
PROMPT_SUFFIX = ".prompt"  # model.onnx -> model.prompt.onnx, model.engine -> model.prompt.engine


def prompt_path(encoder: str | Path) -> Path:
    """The prompt graph (or engine) that belongs to an encoder file: ``x.onnx`` -> ``x.prompt.onnx``."""
    encoder = Path(encoder)
    return encoder.with_name(encoder.stem + PROMPT_SUFFIX + encoder.suffix)


def sidecar_path(engine: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    return Path(str(engine) + ".json")


@dataclass(frozen=True)
class ExportMetadata:
    """What a runtime needs besides the graphs (see the module docstring).

    Pre-processing: min/max_size_test, pixel_mean/std, channel_format, size_divisibility;
    input_size [H, W] of a fixed-size graph (None: dynamic, sides in dynamic_side_range);
    post-processing: mask_threshold, mask_stride; the graph's own: score_threshold (on
    cls * ctr), nms_threshold, max_detections (K rows); provenance: model_version,
    checkpoint_sha256, iteration, branch, method, boxteacher_version, opset. ``extra``: the
    TensorRT sidecar's own fields (precision, tensorrt_version, profile, ...).
    """

    class_names: list[str]
    num_classes: int
    min_size_test: int
    max_size_test: int
    pixel_mean: list[float]
    pixel_std: list[float]
    channel_format: str
    size_divisibility: int
    mask_threshold: float
    mask_stride: int
    score_threshold: float
    nms_threshold: float
    max_detections: int
    dynamic: bool
    input_size: list[int] | None
    example_input_size: list[int]
    model_version: str
    branch: str = "student"
    method: str = ""
    checkpoint_sha256: str | None = None
    iteration: int | None = None
    boxteacher_version: str = "unknown"
    dynamic_side_range: list[int] | None = None
    opset: int | None = None
    producer: str = "boxteacher"
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- reading back ----------------------------------------------------------------------
    @property
    def fixed_hw(self) -> tuple[int, int] | None:
        """(H, W) of a fixed-size graph, None for a dynamic one."""
        if self.dynamic or not self.input_size:
            return None
        return int(self.input_size[0]), int(self.input_size[1])

    def input_spec(self):
        """The :class:`training.model.processing.InputSpec` the graph was exported for."""
        from training.model.processing import InputSpec

        return InputSpec(
            int(self.min_size_test),
            int(self.max_size_test),
            tuple(float(v) for v in self.pixel_mean),
            tuple(float(v) for v in self.pixel_std),
            str(self.channel_format),
            int(self.size_divisibility),
            self.fixed_hw,
        )

    def replace(self, **changes: Any) -> ExportMetadata:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict: every field, ``extra`` merged in at the top level."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the metadata") -> ExportMetadata:
        """The inverse of :meth:`to_dict`; unknown keys go to ``extra``. Raises ValueError naming
        the missing keys (a graph that was not written by :func:`write_onnx_metadata`)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = {
            f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(values))
        if missing:
            raise ValueError(f"{source} lacks the boxteacher export metadata {missing}; export it again with 'boxteacher export onnx'")
        known = {k: v for k, v in values.items() if k in names}
        return cls(**known, extra={k: v for k, v in values.items() if k not in names})


# ---- writing -----------------------------------------------------------------------------------------
def build_metadata(
    cfg,
    *,
    branch: str,
    max_detections: int,
    score_threshold: float,
    dynamic: bool,
    input_size: tuple[int, int],
    dynamic_side_range: tuple[int, int] | None = None,
    checkpoint: str | Path | None = None,
    iteration: int | None = None,
) -> ExportMetadata:
    """The metadata of an export of a model with config ``cfg`` (a :class:`training.config.Config`)."""
    from importlib import metadata as importlib_metadata

    try:
        package_version = importlib_metadata.version("boxteacher")
    except importlib_metadata.PackageNotFoundError:
        package_version = "unknown"
    sha = file_sha256(checkpoint) if checkpoint is not None else None
    version = f"{sha[:12] if sha else 'unsaved'}-{branch}" + (f"-it{iteration}" if iteration is not None else "")
    return ExportMetadata(
        class_names=list(cfg.class_names) or [f"class_{i}" for i in range(cfg.model.num_classes)],
        num_classes=cfg.model.num_classes,
        min_size_test=cfg.input.min_size_test,
        max_size_test=cfg.input.max_size_test,
        pixel_mean=list(cfg.input.pixel_mean),
        pixel_std=list(cfg.input.pixel_std),
        channel_format=cfg.input.format,
        size_divisibility=cfg.input.size_divisibility,
        mask_threshold=cfg.model.mask.threshold,
        mask_stride=cfg.model.mask.out_stride,
        score_threshold=float(score_threshold),
        nms_threshold=cfg.model.fcos.nms_threshold,
        max_detections=int(max_detections),
        dynamic=bool(dynamic),
        input_size=None if dynamic else [int(v) for v in input_size],
        example_input_size=[int(v) for v in input_size],
        dynamic_side_range=list(dynamic_side_range) if dynamic and dynamic_side_range else None,
        model_version=version,
        branch=branch,
        method=cfg.method,
        checkpoint_sha256=sha,
        iteration=iteration,
        boxteacher_version=package_version,
    )


def write_onnx_metadata(proto, meta: ExportMetadata) -> None:
    """Replace ``proto.metadata_props`` with ``meta``, one JSON value per key."""
    del proto.metadata_props[:]
    for key, value in meta.to_dict().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def write_engine_sidecar(engine: str | Path, meta: ExportMetadata) -> Path:
    path = sidecar_path(engine)
    path.write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
    return path


# ---- reading -----------------------------------------------------------------------------------------
def read_onnx_metadata(path: str | Path) -> ExportMetadata:
    """The :class:`ExportMetadata` in an encoder graph's ``metadata_props``."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    model = onnx.load(str(path), load_external_data=False)
    values: dict[str, Any] = {}
    for prop in model.metadata_props:
        try:
            values[prop.key] = json.loads(prop.value)
        except ValueError:
            values[prop.key] = prop.value
    return ExportMetadata.from_dict(values, str(path))


def read_engine_metadata(engine: str | Path) -> ExportMetadata:
    """The :class:`ExportMetadata` in a TensorRT plan's JSON sidecar ``<engine>.json``."""
    path = sidecar_path(engine)
    if not path.is_file():
        raise FileNotFoundError(f"TensorRT engine {engine} has no metadata sidecar {path}")
    return ExportMetadata.from_dict(json.loads(path.read_text()), str(path))


def read_metadata(path: str | Path) -> ExportMetadata:
    """By suffix: ``.onnx`` -> :func:`read_onnx_metadata`, ``.engine`` / ``.plan`` -> the sidecar."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return read_onnx_metadata(path)
    if suffix in (".engine", ".plan"):
        return read_engine_metadata(path)
    raise ValueError(f"unknown exported model type {suffix!r} ({Path(path).name}): use .onnx, .engine or .plan")
