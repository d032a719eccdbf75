"""CondInst -> two ONNX graphs: the encoder (network, NMS, detections' masks, mask-aware
score, the features box prompts need) and a small prompt graph (those features + boxes ->
one mask per box), as SAM's ONNX export splits image encoder and prompt decoder.

:class:`EncoderWrapper` and :class:`PromptWrapper` are the whole export "mode": tensor-only
``forward`` methods that call the model's own functions (``CondInst.forward``,
``decode_detections``, ``prompt_cells``, ``CondInst.prompt``, ``CondInst.mask_logits``,
``aligned_bilinear``, ``mean_foreground_probability``, ``mask_aware_score_from_mean``) and
pad the detections to a fixed K. Nothing of the network or of its post-processing is
written again here. Serving caches the encoder's outputs per image, so each new box on the
same image runs only the prompt graph.

Graph contract (inputs, outputs, padding): :mod:`export.onnx_runtime`; metadata (written
into the encoder's ``metadata_props``): :mod:`export.metadata`. Resize / normalise / pad
before the graphs and paste-back / threshold after them are :mod:`training.model.processing`,
shared with training and serving.

Export facts this relies on (measured, see the design notes):
- ``torch.onnx.export(..., dynamo=True)``; the legacy TorchScript exporter bakes
  data-dependent counts into constants and gives wrong outputs;
- torchvision's ``batched_nms`` becomes an ONNX ``NonMaxSuppression`` node, which
  returns the kept indices the mask head needs to gather controller parameters.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from export.metadata import (
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    PROMPT_INPUTS,
    PROMPT_OUTPUTS,
    ExportMetadata,
    build_metadata,
    prompt_path,
    read_onnx_metadata,
    write_onnx_metadata,
)
from training.config import Config
from training.model.condinst import CondInst
from training.model.fcos import PromptCells, decode_detections, prompt_cells
from training.model.mask_head import aligned_bilinear
from training.model.scores import mask_aware_score_from_mean, mean_foreground_probability

log = logging.getLogger(__name__)

__all__ = [
    "EncoderWrapper",
    "PromptWrapper",
    "export_onnx",
    "export_checkpoint",
    "build_metadata",
    "read_onnx_metadata",
    "count_ops",
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


class EncoderWrapper(nn.Module):
    """The image part, tensor-only, one image (batch size 1).

    forward(images (1,3,H,W) float32 normalised+padded, image_size (2,) int64 (h, w)
    un-padded) -> the 10 outputs of :data:`export.metadata.ENCODER_OUTPUTS` in that order
    (shapes in :mod:`export.onnx_runtime`).

    Equals, row for row, ``model.detect`` (first ``max_detections`` detections); padded rows
    have label -1, zero boxes, scores and masks. The mask-aware score counts only the
    un-padded region, built as a mask from ``image_size`` (no data-dependent slicing). The
    last four outputs are :func:`training.model.fcos.prompt_cells` and the mask features.
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

    def forward(self, images: Tensor, image_size: Tensor) -> tuple[Tensor, ...]:
        k = self.max_detections
        head, mask_feats = self.model(images)
        dets = decode_detections(head, 0, self.fcos)  # n <= k rows, sorted, valid first
        valid = _pad_rows(dets.valid, k, False)
        det_scores = _pad_rows(dets.det_scores, k, 0.0) * valid
        boxes = _pad_rows(dets.boxes, k, 0.0) * valid[:, None]
        labels = torch.where(valid, _pad_rows(dets.labels, k, 0), torch.full_like(valid, -1, dtype=torch.int64))
        params = _pad_rows(dets.params, k, 0.0)
        locations = _pad_rows(dets.locations, k, 0.0)
        levels = _pad_rows(dets.levels, k, 0)
        probs = self.model.mask_logits(mask_feats, params, locations, levels, torch.zeros_like(levels)).sigmoid()[:, 0]

        # Mask-aware score (CondInst.mean_mask_prob): full input resolution, un-padded region only.
        hp, wp = images.shape[-2:]
        rows = torch.arange(hp, device=images.device)[:, None] < image_size[0]
        cols = torch.arange(wp, device=images.device)[None, :] < image_size[1]
        full = aligned_bilinear(probs[:, None], self.mask_stride)[:, 0]
        m_bar = mean_foreground_probability(full, (rows & cols)[None], self.mask_threshold)
        scores = mask_aware_score_from_mean(det_scores, m_bar)

        cells = prompt_cells(head, 0)
        masks = probs * valid[:, None, None]
        num_detections = valid.sum().reshape(1)
        return boxes, labels, det_scores, scores, masks, num_detections, cells.scores, cells.classes, cells.params, mask_feats


class PromptWrapper(nn.Module):
    """The prompt part, tensor-only: forward(prompt_boxes (P,4) float32 xyxy input pixels,
    cell_scores, cell_classes, cell_params, mask_feats: the encoder's last four outputs) ->
    (prompt_labels (P,) int64, prompt_det_scores (P,), prompt_masks (P, H/4, W/4)).

    It is :meth:`training.model.condinst.CondInst.prompt`, what eager serving runs.
    """

    def __init__(self, model: CondInst):
        super().__init__()
        self.model = model

    def forward(self, prompt_boxes: Tensor, cell_scores: Tensor, cell_classes: Tensor, cell_params: Tensor, mask_feats: Tensor):
        return self.model.prompt(PromptCells(cell_scores, cell_classes, cell_params), mask_feats, prompt_boxes)


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
    metadata: ExportMetadata | None = None,
    branch: str = "student",
) -> Path:
    """Export ``model`` (eval mode, CPU) to the encoder graph ``output`` and the prompt graph
    next to it (:func:`export.metadata.prompt_path`: ``model.onnx`` -> ``model.prompt.onnx``),
    each a single self-contained file.

    dynamic: H and W are dynamic (multiples of 32, 64..4096 px); the graph is traced
    at ``input_size`` (each side raised to >= 160). Otherwise the encoder has the fixed
    input ``input_size`` (default :func:`default_input_size`); the prompt graph is always
    dynamic in its feature sizes. max_detections: K (default: the config's).
    score_threshold: on cls*ctr (default: the config's). opset: ONNX opset (default:
    torch's). simplify: run onnxslim (the unsimplified graph is kept, with a warning, when
    it fails). metadata: stored in the encoder's ``metadata_props`` (default:
    :func:`build_metadata` without checkpoint info). Returns the encoder's path.
    Raises RuntimeError when the encoder lost its NonMaxSuppression node or a dynamic
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
    encoder = EncoderWrapper(model.eval(), max_detections, score_threshold).eval()
    prompt = PromptWrapper(model.eval()).eval()
    k = encoder.max_detections
    thr = encoder.fcos.score_threshold
    device = model.device
    images = torch.zeros(1, 3, h, w, device=device)
    image_size = torch.tensor([h, w], dtype=torch.int64, device=device)
    if dynamic:
        side = {
            2: 32 * Dim("h32", min=DYNAMIC_MIN_SIDE // 32, max=DYNAMIC_MAX_SIDE // 32),
            3: 32 * Dim("w32", min=DYNAMIC_MIN_SIDE // 32, max=DYNAMIC_MAX_SIDE // 32),
        }
        encoder_shapes = {"images": side, "image_size": None}
    else:
        encoder_shapes = {"images": None, "image_size": None}

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), coordinate_trick_nms(), _quiet_exporter_logs(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ep = torch.export.export(encoder, (images, image_size), dynamic_shapes=encoder_shapes, strict=False)
        if dynamic:
            _check_dynamic_ranges(ep, DYNAMIC_MIN_SIDE, DYNAMIC_MAX_SIDE)
        encoder_proto = _to_onnx(ep, (images, image_size), ENCODER_INPUTS, ENCODER_OUTPUTS, opset)
        # the prompt graph, traced on the encoder's own outputs for this example
        features = encoder(images, image_size)[-4:]
        boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2], [0.0, 0.0, 1.0, 1.0]], device=device)
        cells, fh, fw = (
            Dim("cells", min=2, max=1 << 20),
            Dim("fh", min=2, max=DYNAMIC_MAX_SIDE // 8),
            Dim("fw", min=2, max=DYNAMIC_MAX_SIDE // 8),
        )
        prompt_shapes = {
            "prompt_boxes": {0: Dim("prompts", min=1, max=4096)},
            "cell_scores": {0: cells},
            "cell_classes": {0: cells},
            "cell_params": {0: cells},
            "mask_feats": {2: fh, 3: fw},
        }
        args = (boxes, *features)
        prompt_ep = torch.export.export(prompt, args, dynamic_shapes=prompt_shapes, strict=False)
        prompt_proto = _to_onnx(prompt_ep, args, PROMPT_INPUTS, PROMPT_OUTPUTS, opset)
    if count_ops(encoder_proto, "NonMaxSuppression") < 1:
        raise RuntimeError("the exported graph has no NonMaxSuppression node (NMS left the graph)")
    if simplify:
        with _quiet_exporter_logs():
            encoder_proto = _simplify(encoder_proto, needs_nms=True)
            prompt_proto = _simplify(prompt_proto, needs_nms=False)
    meta = metadata or build_metadata(
        cfg,
        branch=branch,
        max_detections=k,
        score_threshold=thr,
        dynamic=dynamic,
        input_size=(h, w),
        dynamic_side_range=(DYNAMIC_MIN_SIDE, DYNAMIC_MAX_SIDE),
    )
    opset_used = next((o.version for o in encoder_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    meta = meta.replace(
        opset=opset_used,
        max_detections=k,
        score_threshold=thr,
        dynamic=bool(dynamic),
        input_size=None if dynamic else [h, w],
        example_input_size=[h, w],
    )
    write_onnx_metadata(encoder_proto, meta)
    # the prompt graph carries the same version, so a mismatched pair is refused when loading
    write_onnx_metadata(prompt_proto, meta)
    for proto, path in ((encoder_proto, output), (prompt_proto, prompt_path(output))):
        proto.producer_name = "boxteacher"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
    log.info(
        "wrote %s (%.1f MB, K=%d, %s) and %s (%.2f MB)",
        output, output.stat().st_size / 1e6, k, "dynamic H/W" if dynamic else f"{h}x{w}", prompt_path(output).name, prompt_path(output).stat().st_size / 1e6,
    )  # fmt: skip
    return output


def _to_onnx(ep, args: tuple, input_names: tuple[str, ...], output_names: tuple[str, ...], opset: int | None):
    program = torch.onnx.export(
        ep,
        args,
        input_names=list(input_names),
        output_names=list(output_names),
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    import onnx

    onnx.checker.check_model(proto)
    return proto


def _simplify(proto, needs_nms: bool):
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
        if needs_nms and count_ops(slim, "NonMaxSuppression") < 1:
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
    """``boxteacher export onnx``: one branch of a checkpoint -> ``output`` (the encoder, .onnx)
    and its prompt graph next to it."""
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
    meta = build_metadata(
        cfg, branch=branch, max_detections=k, score_threshold=thr, dynamic=dynamic, input_size=size,
        dynamic_side_range=(DYNAMIC_MIN_SIDE, DYNAMIC_MAX_SIDE), checkpoint=weights, iteration=iteration,
    )  # fmt: skip
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
