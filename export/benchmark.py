"""Inference latency of eager PyTorch, ONNX Runtime and TensorRT on the same inputs.

Each runtime does the same work per image: the network, decoding, NMS, the dynamic
mask head and the mask-aware score, on one padded (1, 3, H, W) input (batch size 1);
host pre-processing (resize, normalise, pad), identical for all, is done once
beforehand and not timed. ONNX Runtime and TensorRT times include copying the
outputs to the host. Ratios are to eager PyTorch on the same device.

The encoder graph is timed (the image part; box prompts are timed by ``boxteacher benchmark
serve``). ``boxteacher benchmark infer`` comes from :func:`register` (entry point group
``boxteacher.benchmarks`` in pyproject.toml).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_calls(fn: Callable[[int], Any], iters: int, warmup: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds per call of ``fn(i)`` for ``iters`` calls after ``warmup`` untimed ones."""
    for i in range(warmup):
        fn(i)
    if sync:
        sync()
    times = []
    for i in range(iters):
        start = time.perf_counter()
        fn(i)
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return times


def _summary(name: str, device: str, times: list[float]) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "runtime": name,
        "device": device,
        "median_ms": median * 1e3,
        "p95_ms": _percentile(times, 95) * 1e3,
        "images_per_s": 1.0 / median,
        "iters": len(times),
    }


def synthetic_inputs(n: int, hw: tuple[int, int], seed: int = 0) -> list:
    """``n`` (padded input (1,3,H,W), (H, W)) of smooth random images filling the canvas."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        small = torch.rand(1, 3, max(hw[0] // 16, 1), max(hw[1] // 16, 1), generator=g) * 4 - 2
        x = torch.nn.functional.interpolate(small, size=hw, mode="bilinear", align_corners=False)
        x = x + 0.3 * torch.randn(1, 3, *hw, generator=g)
        out.append((x.contiguous(), hw))
    return out


def folder_inputs(folder: str | Path, spec, n: int) -> list:
    """Up to ``n`` images of a folder, pre-processed for ``spec`` (an InputSpec)."""

    from export.check import prepare_image
    from export.tensorrt_build import IMAGE_SUFFIXES
    from training.data.coco import load_image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return [prepare_image(load_image(f), spec) for f in files]


def benchmark_inference(
    weights: str | Path,
    onnx_model: str | Path | None = None,
    engine: str | Path | None = None,
    *,
    branch: str | None = None,
    images: str | Path | None = None,
    num_images: int = 8,
    input_size: tuple[int, int] | None = None,
    iters: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Latency table: eager PyTorch on ``device`` (and on cuda when an engine is given),
    ONNX Runtime on ``device``, TensorRT on cuda; all on the same inputs.

    Inputs: the images of ``images`` (a folder) or synthetic ones, at the exported
    graph's fixed size, else ``input_size``, else the graph's example size.
    """
    import numpy as np
    import torch

    from export.check import load_exported
    from training.checkpoint import load_model
    from training.model.processing import InputSpec

    if threads:
        torch.set_num_threads(int(threads))
    meta = None
    runners = []
    if onnx_model is not None:
        from export.onnx_runtime import OnnxModel

        # No spin-waiting of idle ORT threads: it would steal the CPUs of the next contender.
        spin = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
        exported = OnnxModel(onnx_model, device, threads=threads, config=spin)
        meta = exported.metadata
        runners.append(("onnxruntime", device, exported))
    if engine is not None:
        exported = load_exported(engine, "cuda")
        meta = meta or exported.metadata
        runners.append(("tensorrt", "cuda", exported))
    branch = branch or (meta.branch if meta else None)
    model, cfg = load_model(weights, branch=branch, device="cpu")
    fixed = meta.fixed_hw if meta else None
    hw = tuple(int(v) for v in (fixed or input_size or (meta.example_input_size if meta else None) or (800, 1088)))
    if fixed and input_size and tuple(input_size) != hw:
        raise ValueError(f"the exported model has a fixed input {hw}; --input-size {tuple(input_size)} does not fit")
    spec = meta.input_spec() if meta else InputSpec.from_config(cfg.input)
    inputs = folder_inputs(images, spec, num_images) if images else synthetic_inputs(num_images, hw)  # type: ignore[arg-type]
    k = meta.max_detections if meta else cfg.model.fcos.max_detections
    thr = meta.score_threshold if meta else None
    # Round robin: one call of each runtime per iteration, so that a change of machine
    # load (other processes on shared CPUs) hits every runtime alike.
    contenders: list[tuple[str, str, Callable[[int], Any], Callable[[], None] | None]] = []
    eager_devices = [device] + (["cuda"] if engine is not None and not device.startswith("cuda") else [])
    for dev in eager_devices:
        m = model if dev == "cpu" else copy.deepcopy(model).to(dev)
        batches = [(x.to(dev), s) for x, s in inputs]

        @torch.inference_mode()
        def eager(i: int, m=m, batches=batches) -> None:
            x, s = batches[i % len(batches)]
            head, feats = m(x)
            m.detect(head, feats, [s], thr)

        contenders.append(("pytorch-eager", dev, eager, torch.cuda.synchronize if dev.startswith("cuda") else None))
    arrays = [(x.numpy(), np.asarray(s, dtype=np.int64)) for x, s in inputs]
    for name, dev, runner in runners:

        def run(i: int, runner=runner) -> None:
            x, s = arrays[i % len(arrays)]
            runner.encode(x, s)

        contenders.append((name, dev, run, None))
    for _, _, fn, sync in contenders:
        time_calls(fn, 0, warmup, sync)
    times: list[list[float]] = [[] for _ in contenders]
    for i in range(iters):
        for j, (_, _, fn, sync) in enumerate(contenders):
            times[j] += time_calls(lambda _i, fn=fn, i=i: fn(i), 1, 0, sync)
    rows = [_summary(name, dev, t) for (name, dev, _, _), t in zip(contenders, times)]
    for row in rows:
        base = next(r for r in rows if r["runtime"] == "pytorch-eager" and r["device"] == row["device"])
        row["speedup_vs_eager"] = base["median_ms"] / row["median_ms"]
    return {
        "input_size": list(hw),
        "max_detections": k,
        "num_images": len(inputs),
        "batch_size": 1,
        "threads": threads or torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "torch": torch.__version__,
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`benchmark_inference`."""
    h, w = result["input_size"]
    lines = [
        f"input {h}x{w}, batch 1, K={result['max_detections']}, {result['num_images']} images, "
        f"{result['threads']} threads; {result['machine']}",
        "",
        "| runtime | device | median ms | p95 ms | images/s | x eager |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['runtime']} | {r['device']} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['images_per_s']:.2f} | {r['speedup_vs_eager']:.2f} |"
        )
    return "\n".join(lines)


def register(bench: argparse._SubParsersAction) -> None:
    """``boxteacher benchmark infer`` (entry point group ``boxteacher.benchmarks``)."""
    p = bench.add_parser("infer", help="latency of eager PyTorch vs ONNX Runtime (vs TensorRT)")
    add_infer_arguments(p)
    p.set_defaults(func=run_infer_benchmark)


def add_infer_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``boxteacher benchmark infer``."""
    p.add_argument("--weights", required=True, help="checkpoint (eager PyTorch baseline)")
    p.add_argument("--model", default=None, help="exported model.onnx (ONNX Runtime)")
    p.add_argument("--engine", default=None, help="TensorRT plan (needs tensorrt and a GPU)")
    p.add_argument("--branch", choices=["student", "teacher"], default=None, help="default: the exported model's branch")
    p.add_argument("--images", default=None, help="folder of images (default: synthetic inputs)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None, help="padded input for a dynamic graph")
    p.add_argument("--iters", type=int, default=30, help="timed runs per runtime")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime (default: all)")
    p.add_argument("--device", default="cpu", help="device of eager PyTorch and ONNX Runtime: cpu or cuda")
    p.add_argument("--output", default=None, help="also write the result as JSON here")


def run_infer_benchmark(args: argparse.Namespace) -> int:
    """Handler: print the latency table (and write JSON with --output)."""
    if args.model is None and args.engine is None:
        raise ValueError("give --model model.onnx and/or --engine model.engine to compare with eager PyTorch")
    result = benchmark_inference(
        args.weights,
        args.model,
        args.engine,
        branch=args.branch,
        images=args.images,
        num_images=args.num_images,
        input_size=tuple(args.input_size) if args.input_size else None,
        iters=args.iters,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
    )
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0
