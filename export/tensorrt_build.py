"""``model.onnx`` (+ ``model.prompt.onnx``) -> two plain TensorRT plans (encoder and prompt
graph: ``model.engine``, ``model.prompt.engine``) + the ``model.engine.json`` sidecar
(TensorRT 10.x and 11.x).

Precision, by TensorRT major version (NVIDIA "Migrating from TensorRT 10.x to 11.x":
11.x networks are always strongly typed; the FP16/BF16/INT8 builder flags, the
INT8 calibrator and ``platform_has_fast_fp16`` are gone):

======== ====================================== =============================================
         TensorRT 10.x                          TensorRT 11.x
======== ====================================== =============================================
fp32     default                                default
fp16     ``BuilderFlag.FP16``                   ONNX converted first with ModelOpt AutoCast
bf16     ``BuilderFlag.BF16``                   (``modelopt.onnx.autocast``), then built
int8     ``BuilderFlag.INT8`` + entropy         explicit Q/DQ only: quantise the ONNX with
         calibration on ``--calib`` images      ModelOpt first (error otherwise)
======== ====================================== =============================================

With reduced precision on 10.x, layers with outputs of rank <= 2 (scores, boxes,
top-k, NMS and its class-offset arithmetic, the mask-score reductions) are pinned
to FP32: FP16 would overflow the NMS class offsets (num_classes x image size).

The engine is a plain plan (``trtexec --loadEngine`` reads it); its metadata lives
in the JSON sidecar, never in a header. Engines are tied to the GPU and the
TensorRT version that built them: build on the target machine.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from export.metadata import ExportMetadata, prompt_path, read_onnx_metadata, sidecar_path, write_engine_sidecar

log = logging.getLogger(__name__)

NOT_INSTALLED = (
    "TensorRT is not installed: pip install boxteacher[tensorrt] (the 'tensorrt' wheel pulls its "
    "libraries from NVIDIA's index, pypi.nvidia.com; a CUDA GPU is needed to build and run engines), "
    "or use NVIDIA's TensorRT container"
)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
MAX_PROMPTS = 256  # upper bound of the prompt_boxes profile (P)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class TensorRTNotInstalled(RuntimeError):
    """``import tensorrt`` failed; the message says how to install it."""


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTNotInstalled` with install instructions."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as err:  # also the PyPI stub without its libraries
        raise TensorRTNotInstalled(f"{NOT_INSTALLED} ({err})") from err
    return trt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _shape_triplet(
    meta: ExportMetadata, min_hw: Sequence[int] | None, opt_hw: Sequence[int] | None, max_hw: Sequence[int] | None
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """min/opt/max (H, W) of the images profile: the fixed size of a fixed graph; for a
    dynamic graph the given shapes, defaulting to the test scale around the example size."""
    fixed_hw = meta.fixed_hw
    if fixed_hw:
        for name, hw in (("min", min_hw), ("opt", opt_hw), ("max", max_hw)):
            if hw is not None and tuple(int(v) for v in hw) != fixed_hw:
                raise ValueError(f"the ONNX model has a fixed input {fixed_hw}; --{name}-shape {tuple(hw)} does not fit it")
        return fixed_hw, fixed_hw, fixed_hw
    d = int(meta.size_divisibility)

    def ceil(x: int) -> int:
        return -(-int(x) // d) * d

    lo, hi = int(meta.min_size_test), int(meta.max_size_test)
    example = meta.example_input_size or [ceil(lo), ceil(hi)]
    opt = tuple(int(v) for v in (opt_hw or example))
    mx = tuple(int(v) for v in max_hw) if max_hw else (max(ceil(hi), opt[0]), max(ceil(hi), opt[1]))
    low = max(64, ceil(lo // 2))
    mn = tuple(int(v) for v in min_hw) if min_hw else (min(low, opt[0]), min(low, opt[1]))
    for name, hw in (("min", mn), ("opt", opt), ("max", mx)):
        if hw[0] % d or hw[1] % d:
            raise ValueError(f"--{name}-shape {hw} must be multiples of {d}")
    if not (mn[0] <= opt[0] <= mx[0] and mn[1] <= opt[1] <= mx[1]):
        raise ValueError(f"need min <= opt <= max per side, got min {mn}, opt {opt}, max {mx}")
    return mn, opt, mx


def prompt_profile(image_hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Shapes of the prompt graph's feature inputs for a padded input of ``image_hw``:
    cells N = sum of the P3..P7 cell counts, mask features at stride 8 (without the batch
    and channel dims, which the caller adds)."""
    from training.model.fcos import level_sizes  # noqa: PLC0415

    p3 = (image_hw[0] // 8, image_hw[1] // 8)
    cells = sum(h * w for h, w in level_sizes(p3, 5))
    return {"cells": (cells,), "mask_feats": p3}


def _autocast(onnx_path: Path, precision: str, workdir: Path) -> Path:
    """TensorRT 11 reduced precision: ModelOpt AutoCast the ONNX (fp32 I/O kept)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision  # noqa: PLC0415
    except ImportError as err:
        raise RuntimeError(
            f"--{precision} on TensorRT 11 needs ModelOpt AutoCast (TensorRT 11 removed the FP16/BF16 builder "
            "flags): pip install nvidia-modelopt[onnx] --extra-index-url https://pypi.nvidia.com, or convert "
            f"yourself with 'python -m modelopt.onnx.autocast --onnx_path {onnx_path} --low_precision_type "
            f"{precision} --keep_io_types' and build that ONNX without --{precision}"
        ) from err
    import onnx  # noqa: PLC0415

    converted = convert_to_mixed_precision(
        onnx_path=str(onnx_path),
        low_precision_type=precision,
        keep_io_types=True,
        # NMS, top-k and the score reductions stay FP32 (class offsets overflow FP16).
        op_types_to_exclude=["NonMaxSuppression", "TopK", "ReduceSum", "ReduceMean", "ReduceMax"],
    )
    out = workdir / f"{onnx_path.stem}.{precision}.onnx"
    onnx.save(converted, str(out))
    return out


def _pin_fp32(trt, network) -> int:
    """TensorRT 10 reduced precision: layers with an output of rank <= 2 run in FP32."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if any(0 <= len(o.shape) <= 2 for o in outs if o is not None) and all(
            o.dtype in (trt.float32, trt.float16, trt.bfloat16) for o in outs if o is not None
        ):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def _calibration_images(calib_dir: str | Path, limit: int) -> list[Path]:
    folder = Path(calib_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--calib folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--calib folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(files) < 100:
        log.warning("INT8 calibration on %d images; a few hundred representative images are recommended", len(files))
    return files[:limit]


def _make_calibrator(trt, files: list[Path], meta: ExportMetadata, opt_hw: tuple[int, int], cache: Path):
    """IInt8EntropyCalibrator2 fed one image at a time through the export pre-processing
    (test-scale resize fitted into the calibration (opt) shape, normalise, pad)."""
    import torch  # noqa: PLC0415

    from training.data.coco import load_image  # noqa: PLC0415
    from training.model.processing import batch_to_spec, resize_to_spec  # noqa: PLC0415

    spec = meta.replace(dynamic=False, input_size=list(opt_hw)).input_spec()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.buffers: dict[str, torch.Tensor] = {}

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):
            if self.index >= len(files):
                return None
            image = load_image(files[self.index])
            self.index += 1
            batch, sizes = batch_to_spec([resize_to_spec(image, spec)], spec)
            feeds = {"images": batch.contiguous(), "image_size": torch.tensor(sizes[0], dtype=torch.int64)}
            self.buffers = {k: v.cuda() for k, v in feeds.items()}
            return [int(self.buffers[n].data_ptr()) for n in names]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()


def build_engine(
    onnx_path: str | Path,
    output: str | Path,
    *,
    precision: str = "fp32",
    calib: str | Path | None = None,
    calib_images: int = 500,
    workspace_gb: float = 4.0,
    min_shape: Sequence[int] | None = None,
    opt_shape: Sequence[int] | None = None,
    max_shape: Sequence[int] | None = None,
    max_prompts: int = MAX_PROMPTS,
) -> Path:
    """Build the TensorRT plans of a boxteacher ONNX export: ``output`` from the encoder, its
    prompt plan (:func:`export.metadata.prompt_path`) from the prompt graph, and the sidecar.

    precision: fp32 | fp16 | bf16 | int8 (int8 needs ``calib``, a folder of images, on
    TensorRT 10; on 11 it needs an ONNX quantised with Q/DQ nodes); the small prompt plan
    is always built in fp32. min/opt/max_shape: (H, W) of the ``images`` optimisation
    profile (a fixed-size ONNX fixes all three); the prompt plan's profile follows from it.
    Raises TensorRTNotInstalled, FileNotFoundError, ValueError or RuntimeError.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    onnx_path, output = Path(onnx_path), Path(output)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    if not prompt_path(onnx_path).is_file():
        raise FileNotFoundError(f"{onnx_path.name} needs its prompt graph {prompt_path(onnx_path).name} next to it")
    meta = read_onnx_metadata(onnx_path)
    mn, opt, mx = _shape_triplet(meta, min_shape, opt_shape, max_shape)
    trt = import_tensorrt()
    major = trt_major(trt)
    if major < 10:
        raise RuntimeError(f"TensorRT {trt.__version__} is too old: boxteacher builds with TensorRT 10.x or 11.x")
    if precision == "int8" and major >= 11:
        raise RuntimeError(
            "INT8 on TensorRT 11 means explicit quantisation: quantise the ONNX with Q/DQ nodes first "
            "(ModelOpt: python -m modelopt.onnx.quantization --onnx_path model.onnx --quantize_mode int8 "
            "--calibration_data ...) and build that ONNX without --int8 (TensorRT 11 removed implicit INT8 "
            "calibration)"
        )
    if precision == "int8" and calib is None:
        raise ValueError("--int8 needs --calib DIR (a folder of representative images) for calibration")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    shapes = {"min": prompt_profile(mn), "opt": prompt_profile(opt), "max": prompt_profile(mx)}
    prompt_shapes = {
        "prompt_boxes": [(1, 4), (1, 4), (int(max_prompts), 4)],
        **{name: [shapes[k]["cells"] for k in ("min", "opt", "max")] for name in ("cell_scores", "cell_classes")},
        "cell_params": [(shapes[k]["cells"][0], _controller_params(onnx_path)) for k in ("min", "opt", "max")],
        "mask_feats": [(1, _mask_channels(onnx_path), *shapes[k]["mask_feats"]) for k in ("min", "opt", "max")],
    }
    with tempfile.TemporaryDirectory(prefix="boxteacher-trt-") as tmp:
        source = onnx_path
        if major >= 11 and precision in ("fp16", "bf16"):
            source = _autocast(onnx_path, precision, Path(tmp))
        calibrate = None
        if precision == "int8":
            files = _calibration_images(calib, calib_images)  # type: ignore[arg-type]
            cache = output.with_suffix(output.suffix + ".calib")
            calibrate = lambda: _make_calibrator(trt, files, meta, opt, cache)  # noqa: E731
        plan = _build(
            trt,
            builder,
            logger,
            source,
            {"images": [(1, 3, *mn), (1, 3, *opt), (1, 3, *mx)]},
            workspace_gb,
            precision if major == 10 else "fp32",
            calibrate,
        )
        prompt_plan = _build(trt, builder, logger, prompt_path(onnx_path), prompt_shapes, workspace_gb, "fp32", None)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(bytes(plan))
    prompt_path(output).write_bytes(bytes(prompt_plan))
    extra = dict(meta.extra)
    extra.update(
        engine=output.name,
        prompt_engine=prompt_path(output).name,
        onnx=str(onnx_path),
        precision=precision,
        tensorrt_version=str(trt.__version__),
        profile={"min": list(mn), "opt": list(opt), "max": list(mx), "max_prompts": int(max_prompts)},
    )
    write_engine_sidecar(output, meta.replace(dynamic=mn != mx, input_size=None if mn != mx else list(opt), extra=extra))
    log.info(
        "wrote %s, %s (TensorRT %s, %s) and %s", output, prompt_path(output).name, trt.__version__, precision, sidecar_path(output).name
    )
    return output


def _build(trt, builder, logger, source: Path, profile_shapes: dict, workspace_gb: float, precision: str, calibrator):
    """One serialized plan of ``source`` with one optimisation profile {input: [min, opt, max]}."""
    network = builder.create_network(0)  # explicit batch (10.x); always strongly typed (11.x)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {source}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile_shapes.items():
        profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(profile)
    if precision != "fp32":  # TensorRT 10 builder flags
        flag = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}[precision]
        config.set_flag(getattr(trt.BuilderFlag, flag))
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.FP16)  # layers INT8 cannot take fall back to FP16, not FP32
        pinned = _pin_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info("%s build: %d layers pinned to FP32 (rank <= 2 outputs: scores, boxes, NMS)", precision, pinned)
        if calibrator is not None:
            config.int8_calibrator = calibrator()
            config.set_calibration_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {source} (see the TensorRT log above)")
    return plan


def _graph_input_dim(onnx_path: Path, name: str, axis: int) -> int:
    """A static dimension of an input of the prompt graph (controller params, mask channels)."""
    import onnx  # noqa: PLC0415

    graph = onnx.load(str(prompt_path(onnx_path)), load_external_data=False).graph
    value = next(v for v in graph.input if v.name == name)
    return int(value.type.tensor_type.shape.dim[axis].dim_value)


def _controller_params(onnx_path: Path) -> int:
    return _graph_input_dim(onnx_path, "cell_params", 1)


def _mask_channels(onnx_path: Path) -> int:
    return _graph_input_dim(onnx_path, "mask_feats", 1)
