"""Inference latency (batch 1) and throughput (batch 8) of an R-50-FPN CondInst on one GPU.

    python benchmarks/gpu_check.py --output report.json [--size 800 1333] [--iters 20]

Variants, each on the same random conditioned R-50 (recipe configs/coco-r50-1x.yaml,
backbone weights none: timing only): eager fp32, bf16 and fp16 autocast, channels_last, and
torch.compile; then ONNX Runtime's CUDA provider and TensorRT when they are installed (each
skipped with its reason when not: the GPU machine may have PyTorch only). The timed work is
the image part (backbone, FPN, heads, mask branch, decoding, NMS, detection masks: one
``model(batch)`` + ``model.detect``) on a padded (B, 3, H, W) input; one box prompt
(``CondInst.prompt``) is timed on top. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _times(fn, iters: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def _row(name: str, batch: int, times: list[float]) -> dict:
    med = statistics.median(times)
    ordered = sorted(times)
    return {
        "variant": name,
        "batch": batch,
        "median_ms": round(med * 1000, 2),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 2),
        "images_per_s": round(batch / med, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="gpu-inference.json")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--recipe", default=str(REPO / "configs" / "coco-r50-1x.yaml"))
    args = p.parse_args(argv)

    import torch

    report: dict = {"torch": torch.__version__, "machine": platform.machine(), "rows": [], "skipped": {}}
    if not torch.cuda.is_available():
        report["skipped"]["all"] = "no CUDA GPU (torch.cuda.is_available() is False): this check needs one"
        print("gpu_check: this check needs a CUDA GPU; none here, nothing measured")
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    from training.checkpoint import conditioned_model
    from training.config import load_config
    from training.model.fcos import prompt_cells

    report["gpu"] = torch.cuda.get_device_name()
    cfg = load_config(args.recipe, ["model.backbone.weights=none"])
    model = conditioned_model(cfg).cuda()
    d = cfg.input.size_divisibility
    h, w = (-(-v // d) * d for v in args.size)
    report["input"] = [h, w]
    sync = torch.cuda.synchronize

    def variant(name: str, net, dtype=None, memory_format=torch.contiguous_format):
        for batch in (1, 8):
            x = torch.randn(batch, 3, h, w, device="cuda").contiguous(memory_format=memory_format)

            @torch.inference_mode()
            def run(x=x, batch=batch, dtype=dtype):
                with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                    head, feats = net(x)
                    model.detect(head, feats, [(h, w)] * batch)

            try:
                report["rows"].append(_row(name, batch, _times(run, args.iters, args.warmup, sync)))
            except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
                report["skipped"][f"{name} batch {batch}"] = f"{type(err).__name__}: {err}"[:300]
            print(json.dumps(report["rows"][-1] if report["rows"] else {}), flush=True)

    variant("eager fp32", model)
    variant("autocast bf16", model, torch.bfloat16)
    variant("autocast fp16", model, torch.float16)
    variant("channels_last fp32", model.to(memory_format=torch.channels_last), memory_format=torch.channels_last)
    model.to(memory_format=torch.contiguous_format)
    try:
        compiled = torch.compile(model)
        variant("torch.compile fp32", compiled)
    except Exception as err:  # noqa: BLE001
        report["skipped"]["torch.compile"] = f"{type(err).__name__}: {err}"[:300]

    # one box prompt on a cached encoding (the annotator's next box)
    with torch.inference_mode():
        x = torch.randn(1, 3, h, w, device="cuda")
        head, feats = model(x)
        cells = prompt_cells(head, 0)
        box = torch.tensor([[100.0, 100.0, 400.0, 300.0]], device="cuda")
        report["rows"].append(
            _row(
                "box prompt (CondInst.prompt, cached encoding)",
                1,
                _times(lambda: model.prompt(cells, feats, box), args.iters, args.warmup, sync),
            )
        )

    _exported(report, model, cfg, h, w, args)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


def _exported(report: dict, model, cfg, h: int, w: int, args) -> None:
    """ONNX Runtime CUDA and TensorRT, each when installed (skipped with the reason otherwise)."""
    import numpy as np

    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ImportError(f"onnxruntime offers {ort.get_available_providers()} (the CUDA provider needs onnxruntime-gpu)")
    except ImportError as err:
        report["skipped"]["onnxruntime-cuda"] = str(err)
        ort = None
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        report["skipped"]["tensorrt"] = f"tensorrt is not installed ({err})"
        tensorrt = None
    if ort is None and tensorrt is None:
        return
    from export.onnx_export import export_checkpoint
    from training.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(
            Path(tmp) / "r50.pth",
            {"config": cfg.model_dump(), "student": model.float().cpu().state_dict(), "teacher": None, "iteration": 0},
        )
        onnx_path = export_checkpoint(ckpt, Path(tmp) / "r50.onnx", input_size=(h, w))
        x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
        size = np.array([h, w], dtype=np.int64)
        if ort is not None:
            from export.onnx_runtime import OnnxModel

            m = OnnxModel(onnx_path, "cuda")
            report["rows"].append(
                _row(f"onnxruntime {m.providers[0]}", 1, _times(lambda: m.encode(x, size), args.iters, args.warmup, lambda: None))
            )
        if tensorrt is not None:
            import torch

            from export.tensorrt_build import build_engine
            from export.tensorrt_runtime import TensorRTModel

            for precision in ("fp32", "fp16"):
                engine = build_engine(onnx_path, Path(tmp) / f"r50.{precision}.engine", precision=precision)
                m = TensorRTModel(engine)
                xt = torch.from_numpy(x).cuda()
                report["rows"].append(
                    _row(
                        f"tensorrt {precision}",
                        1,
                        _times(lambda m=m, xt=xt: m.encode(xt, size), args.iters, args.warmup, torch.cuda.synchronize),
                    )
                )


if __name__ == "__main__":
    sys.exit(main())
