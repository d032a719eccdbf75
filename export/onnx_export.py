"""CondInst -> one ONNX graph: network, NMS, dynamic mask head and mask-aware score.

:class:`ExportWrapper` is the whole export "mode": a tensor-only ``forward`` that
calls the model's own functions (``CondInst.forward``, ``decode_detections``,
``prompt_detections``, ``CondInst.mask_logits``, ``aligned_bilinear``,
``mean_foreground_probability``) and pads the detections to a fixed K. Nothing of
the network or of its post-processing is written again here.

Graph contract (inputs, outputs, padding): see :mod:`export.onnx_runtime`.
Resize / normalise / pad before the graph and paste-back / threshold after it are
:mod:`training.model.processing`, shared with training and serving.

Export facts this relies on (measured, see the design notes):
- ``torch.onnx.export(..., dynamo=True)``; the legacy TorchScript exporter bakes
  data-dependent counts into constants and gives wrong outputs;
- torchvision's ``batched_nms`` becomes an ONNX ``NonMaxSuppression`` node, which
  returns the kept indices the mask head needs to gather controller parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from export.onnx_runtime import INPUT_NAMES, OUTPUT_NAMES, read_onnx_metadata
from training.config import Config
from training.model.condinst import CondInst
from training.model.fcos import decode_detections, prompt_detections
from training.model.mask_head import aligned_bilinear
from training.model.scores import mask_aware_score_from_mean, mean_foreground_probability

log = logging.getLogger(__name__)

__all__ = [
    "ExportWrapper",
    "export_onnx",
    "export_checkpoint",
    "build_metadata",
    "read_onnx_metadata",
    "count_ops",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
]

# Each side of the padded input of a --dynamic graph; traced at an example size whose
# every FPN level (P7 = stride 128) is at least 2 cells, so that no level is
# specialised to size 1 by torch.export.
DYNAMIC_MIN_SIDE = 64
DYNAMIC_MAX_SIDE = 4096
MIN_EXAMPLE_SIDE = 160


def _pad_rows(x: Tensor, k: int, value: float | int | bool) -> Tensor:
    """(n, ...) with n <= k data-dependent -> (k, ...), rows n.. filled with ``value``."""
    return torch.cat([x, x.new_full((k, *x.shape[1:]), value)])[:k]


class ExportWrapper(nn.Module):
    """Tensor-only inference of one image for export (batch size 1).

    forward(images (1,3,H,W) float32 normalised+padded, image_size (2,) int64 (h, w)
    un-padded, prompt_boxes (P,4) float32 xyxy input pixels) -> the 10 outputs of
    :data:`OUTPUT_NAMES` in that order (shapes in :mod:`export.onnx_runtime`).

    Equals, row for row, ``model.detect`` (first ``max_detections`` detections) plus
    ``prompt_detections`` + ``mask_logits`` for the prompts; padded rows have label -1,
    zero boxes, scores and masks. The mask-aware score counts only the un-padded
    region, built as a mask from ``image_size`` (no data-dependent slicing).
    """

    def __init__(self, model: CondInst, max_detections: int | None = None, score_threshold: float | None = None):
        super().__init__()
        self.model = model
        fcos = model.cfg.model.fcos
        k = int(max_detections or fcos.max_detections)
        if k < 1:
            raise ValueError(f"max_detections must be >= 1, got {k}")
        update: dict[str, Any] = {"max_detections": k}
        if score_threshold is not None:
            update["score_threshold"] = float(score_threshold)
        self.fcos = fcos.model_copy(update=update)
        self.max_detections = k
        self.mask_stride = model.cfg.model.mask.out_stride
        self.mask_threshold = model.cfg.model.mask.threshold

    def forward(self, images: Tensor, image_size: Tensor, prompt_boxes: Tensor) -> tuple[Tensor, ...]:
        k = self.max_detections
        head, mask_feats = self.model(images)
        dets = decode_detections(head, 0, self.fcos)  # n <= k rows, sorted, valid first
        valid = _pad_rows(dets.valid, k, False)
        det_scores = _pad_rows(dets.det_scores, k, 0.0) * valid
        boxes = _pad_rows(dets.boxes, k, 0.0) * valid[:, None]
        labels = torch.where(valid, _pad_rows(dets.labels, k, 0), torch.full_like(valid, -1, dtype=torch.int64))
        prompts = prompt_detections(head, prompt_boxes, 0, self.fcos)

        # One dynamic-head run for the K detections and the P prompts.
        params = torch.cat([_pad_rows(dets.params, k, 0.0), prompts.params])
        locations = torch.cat([_pad_rows(dets.locations, k, 0.0), prompts.locations])
        levels = torch.cat([_pad_rows(dets.levels, k, 0), prompts.levels])
        probs = self.model.mask_logits(mask_feats, params, locations, levels, torch.zeros_like(levels)).sigmoid()[:, 0]

        # Mask-aware score (CondInst.mean_mask_prob): full input resolution, un-padded region only.
        hp, wp = images.shape[-2:]
        rows = torch.arange(hp, device=images.device)[:, None] < image_size[0]
        cols = torch.arange(wp, device=images.device)[None, :] < image_size[1]
        full = aligned_bilinear(probs[:, None], self.mask_stride)[:, 0]
        m_bar = mean_foreground_probability(full, (rows & cols)[None], self.mask_threshold)
        all_det = torch.cat([det_scores, prompts.det_scores])
        scores = mask_aware_score_from_mean(all_det, m_bar)

        masks = probs[:k] * valid[:, None, None]
        num_detections = valid.sum().reshape(1)
        return (
            boxes,
            labels,
            det_scores,
            scores[:k],
            masks,
            num_detections,
            prompts.labels,
            prompts.det_scores,
            scores[k:],
            probs[k:],
        )


@contextlib.contextmanager
def coordinate_trick_nms() -> Iterator[None]:
    """Make torchvision's ``batched_nms`` take its one-NMS "coordinate trick" path.

    On CPU with more than 1000 candidate boxes ``batched_nms`` loops over
    ``torch.unique(labels)`` (a data-dependent Python loop that cannot be exported)
    unless ``torchvision._is_tracing()``; the dynamo exporter is not the legacy
    tracer, so we say so for the duration of the export. Both paths give the same
    kept set for class-aware NMS.
    """
    import torchvision

    original = torchvision._is_tracing
    torchvision._is_tracing = lambda: True
    try:
        yield
    finally:
        torchvision._is_tracing = original


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter's passes log every rewrite at INFO; keep them for --verbose (DEBUG) runs."""
    names = ("onnx_ir", "onnxscript", "torch.onnx", "onnxslim")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    if not log.isEnabledFor(logging.DEBUG):
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _ceil(x: int, d: int) -> int:
    return -(-int(x) // d) * d


def default_input_size(cfg: Config) -> tuple[int, int]:
    """Fixed canvas when no --input-size is given: (min_size_test, max_size_test) padded
    to the size divisibility (landscape; serving fits portrait images into it)."""
    d = cfg.input.size_divisibility
    return _ceil(cfg.input.min_size_test, d), _ceil(cfg.input.max_size_test, d)


def build_metadata(
    cfg: Config,
    *,
    branch: str,
    max_detections: int,
    score_threshold: float,
    dynamic: bool,
    input_size: tuple[int, int],
    checkpoint: str | Path | None = None,
    iteration: int | None = None,
) -> dict[str, Any]:
    """Everything a runtime needs besides the graph: classes, pre-processing, thresholds, version."""
    from importlib import metadata as importlib_metadata

    try:
        package_version = importlib_metadata.version("boxteacher")
    except importlib_metadata.PackageNotFoundError:
        package_version = "unknown"
    sha = None
    if checkpoint is not None:
        digest = hashlib.sha256()
        with open(checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        sha = digest.hexdigest()
    names = list(cfg.class_names) or [f"class_{i}" for i in range(cfg.model.num_classes)]
    version = f"{sha[:12] if sha else 'unsaved'}-{branch}" + (f"-it{iteration}" if iteration is not None else "")
    return {
        "producer": "boxteacher",
        "class_names": names,
        "num_classes": cfg.model.num_classes,
        "method": cfg.method,
        "branch": branch,
        "model_version": version,
        "checkpoint_sha256": sha,
        "iteration": iteration,
        "boxteacher_version": package_version,
        "min_size_test": cfg.input.min_size_test,
        "max_size_test": cfg.input.max_size_test,
        "pixel_mean": list(cfg.input.pixel_mean),
        "pixel_std": list(cfg.input.pixel_std),
        "channel_format": cfg.input.format,
        "size_divisibility": cfg.input.size_divisibility,
        "dynamic": bool(dynamic),
        "input_size": None if dynamic else list(input_size),
        "example_input_size": list(input_size),
        "dynamic_side_range": [DYNAMIC_MIN_SIDE, DYNAMIC_MAX_SIDE] if dynamic else None,
        "mask_threshold": cfg.model.mask.threshold,
        "mask_stride": cfg.model.mask.out_stride,
        "score_threshold": score_threshold,
        "nms_threshold": cfg.model.fcos.nms_threshold,
        "max_detections": max_detections,
        "input_names": list(INPUT_NAMES),
        "output_names": list(OUTPUT_NAMES),
    }


def count_ops(model, op_type: str) -> int:
    """Nodes of ``op_type`` in an onnx.ModelProto, subgraphs (If/Loop bodies) included."""

    def walk(graph) -> int:
        n = 0
        for node in graph.node:
            n += node.op_type == op_type
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    n += walk(attr.g)
                for g in attr.graphs:
                    n += walk(g)
        return n

    return walk(model.graph)


def _check_dynamic_ranges(ep, min_side: int, max_side: int) -> None:
    """Refuse a dynamic export that torch.export silently narrowed or specialised.

    torch.export refines the range of a dynamic dimension when traced code guards on
    it (a Python ``min``/``if`` on a shape); the graph is then wrong outside the
    refined range. A refined *minimum* is expected (levels of size 1 are assumed not
    to occur at the example size) and harmless here; a refined maximum is not.
    """
    name = ep.graph_signature.user_inputs[0]
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name)
    shape = node.meta["val"].shape
    problems = []
    for axis, label in ((2, "height"), (3, "width")):
        dim = shape[axis]
        if not isinstance(dim, torch.SymInt):
            problems.append(f"the {label} was fixed to {int(dim)}")
            continue
        expr = dim.node.expr
        for sym in expr.free_symbols:
            vr = ep.range_constraints.get(sym)
            if vr is None or str(vr.upper) in ("int_oo", "oo"):
                continue
            upper = int(expr.subs(sym, int(vr.upper)))
            if upper < max_side:
                problems.append(f"the {label} was limited to <= {upper} px")
    if problems:
        raise RuntimeError(
            "torch.export narrowed the dynamic input size ("
            + "; ".join(problems)
            + "): traced code branches on a shape at the example size. Trace at a larger "
            "--input-size (every FPN level >= 2 cells) or export a fixed size (no --dynamic)."
        )


def export_onnx(
    model: CondInst,
    output: str | Path,
    *,
    dynamic: bool = False,
    input_size: tuple[int, int] | None = None,
    max_detections: int | None = None,
    score_threshold: float | None = None,
    opset: int | None = None,
    simplify: bool = True,
    metadata: dict[str, Any] | None = None,
    branch: str = "student",
) -> Path:
    """Export ``model`` (eval mode, CPU) to a single-file ONNX graph at ``output``.

    dynamic: H and W are dynamic (multiples of 32, 64..4096 px); the graph is traced
    at ``input_size`` (each side raised to >= 160). Otherwise the graph has the fixed
    input ``input_size`` (default :func:`default_input_size`). max_detections: K
    (default: the config's). score_threshold: on cls*ctr (default: the config's).
    opset: ONNX opset (default: torch's). simplify: run onnxslim (the unsimplified
    graph is kept, with a warning, when it fails). metadata: stored as JSON strings in
    ``metadata_props`` (default: :func:`build_metadata` without checkpoint info).
    Raises RuntimeError when the graph lost its NonMaxSuppression node or a dynamic
    export was narrowed.
    """
    import onnx
    from torch.export import Dim

    cfg = model.cfg
    d = cfg.input.size_divisibility
    if d != 32:
        raise ValueError(f"export assumes input.size_divisibility 32, the config has {d}")
    h, w = input_size or default_input_size(cfg)
    if h % 32 or w % 32:
        raise ValueError(f"--input-size must be multiples of 32 (padded canvas), got {h}x{w}")
    if dynamic and min(h, w) < MIN_EXAMPLE_SIDE:
        log.info("tracing the dynamic graph at %dx%d instead of %dx%d (each side >= %d)", max(h, 160), max(w, 160), h, w, MIN_EXAMPLE_SIDE)
        h, w = max(h, MIN_EXAMPLE_SIDE), max(w, MIN_EXAMPLE_SIDE)
    wrapper = ExportWrapper(model.eval(), max_detections, score_threshold).eval()
    k = wrapper.max_detections
    thr = wrapper.fcos.score_threshold
    device = model.device
    images = torch.zeros(1, 3, h, w, device=device)
    image_size = torch.tensor([h, w], dtype=torch.int64, device=device)
    prompt_boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2], [0.0, 0.0, 1.0, 1.0]], device=device)
    prompts_dim = {0: Dim("prompts", min=1, max=4096)}
    if dynamic:
        side = {2: 32 * Dim("h32", min=DYNAMIC_MIN_SIDE // 32, max=DYNAMIC_MAX_SIDE // 32), 3: 32 * Dim("w32", min=DYNAMIC_MIN_SIDE // 32, max=DYNAMIC_MAX_SIDE // 32)}
        shapes = {"images": side, "image_size": None, "prompt_boxes": prompts_dim}
    else:
        shapes = {"images": None, "image_size": None, "prompt_boxes": prompts_dim}

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), coordinate_trick_nms(), _quiet_exporter_logs(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ep = torch.export.export(wrapper, (images, image_size, prompt_boxes), dynamic_shapes=shapes, strict=False)
        if dynamic:
            _check_dynamic_ranges(ep, DYNAMIC_MIN_SIDE, DYNAMIC_MAX_SIDE)
        program = torch.onnx.export(
            ep,
            (images, image_size, prompt_boxes),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    onnx.checker.check_model(proto)
    if count_ops(proto, "NonMaxSuppression") < 1:
        raise RuntimeError("the exported graph has no NonMaxSuppression node (NMS left the graph)")
    if simplify:
        with _quiet_exporter_logs():
            proto = _simplify(proto)
    meta = dict(metadata or build_metadata(cfg, branch=branch, max_detections=k, score_threshold=thr, dynamic=dynamic, input_size=(h, w)))
    meta["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    meta.update({"max_detections": k, "score_threshold": thr, "dynamic": bool(dynamic), "input_size": None if dynamic else [h, w], "example_input_size": [h, w]})
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    proto.producer_name = "boxteacher"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(output))
    log.info("wrote %s (%.1f MB, K=%d, %s)", output, output.stat().st_size / 1e6, k, "dynamic H/W" if dynamic else f"{h}x{w}")
    return output


def _simplify(proto):
    """onnxslim where it works; else the graph as exported, with a warning."""
    import onnx

    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim is not installed (pip install boxteacher[export]); keeping the unsimplified graph")
        return proto
    try:
        slim = onnxslim.slim(proto)
        onnx.checker.check_model(slim)
        if count_ops(slim, "NonMaxSuppression") < 1:
            raise RuntimeError("onnxslim removed the NonMaxSuppression node")
        return slim
    except Exception as err:  # any failure of the optional simplifier keeps the valid graph
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", err)
        return proto


def export_checkpoint(
    weights: str | Path,
    output: str | Path,
    *,
    branch: str = "student",
    dynamic: bool = False,
    input_size: tuple[int, int] | None = None,
    max_detections: int | None = None,
    score_threshold: float | None = None,
    opset: int | None = None,
    simplify: bool = True,
) -> Path:
    """``boxteacher export onnx``: one branch of a checkpoint -> ``output`` (.onnx)."""
    from training.checkpoint import load_model, read_checkpoint

    ckpt = read_checkpoint(weights)
    if ckpt.get(branch) is None:
        have = [b for b in ("student", "teacher") if ckpt.get(b) is not None]
        hint = f"; export it with --branch {have[0]}" if have else ""
        raise ValueError(f"{weights} has no '{branch}' weights (it has: {have}){hint}")
    iteration = ckpt.get("iteration")
    del ckpt
    model, cfg = load_model(weights, branch=branch, device="cpu")
    k = int(max_detections or cfg.model.fcos.max_detections)
    thr = cfg.model.fcos.score_threshold if score_threshold is None else float(score_threshold)
    size = input_size or default_input_size(cfg)
    meta = build_metadata(cfg, branch=branch, max_detections=k, score_threshold=thr, dynamic=dynamic, input_size=size, checkpoint=weights, iteration=iteration)
    return export_onnx(
        model,
        output,
        dynamic=dynamic,
        input_size=size,
        max_detections=k,
        score_threshold=thr,
        opset=opset,
        simplify=simplify,
        metadata=meta,
        branch=branch,
    )
