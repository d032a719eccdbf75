"""Reproduce the inference benchmark (eager PyTorch vs ONNX Runtime [vs TensorRT]).

    python benchmarks/bench_infer.py --arch tiny --workdir /tmp/bench
    python benchmarks/bench_infer.py --arch r50 --input-size 800 1088 --iters 10 --workdir /tmp/bench

Writes a random "conditioned" checkpoint (the test suite's recipe: random weights,
head biases set so the model predicts many instances; ``--arch r50`` is the
default ResNet-50 CondInst with 80 classes, weights=none), exports it to a
fixed-size ONNX, optionally builds a TensorRT engine (``--tensorrt``, needs a GPU),
and prints the table of ``export.benchmark.benchmark_inference``. The same
measurement on your own checkpoint: ``boxteacher export benchmark-infer``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["tiny", "r50"], default="tiny")
    p.add_argument("--workdir", default="bench-infer")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None, help="fixed export size")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tensorrt", choices=["fp32", "fp16", "bf16"], default=None, help="also build and time an engine")
    args = p.parse_args(argv)

    from conftest import tiny_config, write_checkpoint  # the tests' conditioned random model

    from export.benchmark import benchmark_inference, format_table
    from export.onnx_export import export_checkpoint
    from training.config import load_config

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config() if args.arch == "tiny" else load_config(None, ["model.backbone.weights=none"])
    ckpt = work / f"{args.arch}.pth"
    if not ckpt.is_file():
        write_checkpoint(ckpt, cfg)
    size = tuple(args.input_size) if args.input_size else None
    onnx_path = work / f"{args.arch}-{'x'.join(map(str, size)) if size else 'default'}.onnx"
    if not onnx_path.is_file():
        export_checkpoint(ckpt, onnx_path, input_size=size)
    engine = None
    if args.tensorrt:
        from export.tensorrt_build import build_engine

        engine = build_engine(onnx_path, onnx_path.with_suffix(f".{args.tensorrt}.engine"), precision=args.tensorrt)
    device = "cpu"
    result = benchmark_inference(ckpt, onnx_path, engine, iters=args.iters, warmup=args.warmup, threads=args.threads, device=device)
    print(format_table(result))
    (work / f"bench-{args.arch}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
