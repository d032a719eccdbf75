"""``boxteacher export {onnx, tensorrt, check}`` (the latency benchmark: ``boxteacher benchmark infer``).

Heavy dependencies (torch, onnx, onnxruntime, tensorrt) are imported by the
handlers when they run. User errors raise ValueError / FileNotFoundError /
RuntimeError with a clear message (the top-level CLI prints it, exit code 2).
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export the student to ONNX / TensorRT; parity check against PyTorch")
    commands = parser.add_subparsers(dest="export_command", metavar="FORMAT", required=True)

    p = commands.add_parser("onnx", help="checkpoint -> encoder graph (network, NMS, masks, mask-aware score) + prompt graph")
    p.add_argument("--weights", required=True, help="boxteacher checkpoint (.pth)")
    p.add_argument(
        "--output", required=True, help="model.onnx to write (encoder, metadata inside); the prompt graph goes to model.prompt.onnx"
    )
    p.add_argument("--branch", choices=["student", "teacher"], default="student", help="weights to export (default: student)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's, 20 with torch 2.12)")
    p.add_argument("--dynamic", action="store_true", help="dynamic input height and width (multiples of 32, 64..4096 px)")
    p.add_argument("--max-detections", type=int, default=None, help="K fixed-size detection rows (default: the config's)")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="padded input size, multiples of 32 (default: min_size_test x max_size_test rounded up); "
        "with --dynamic the size the graph is traced at",
    )
    p.add_argument("--score-threshold", type=float, default=None, help="on cls*ctr (default: the config's)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.set_defaults(func=cmd_onnx)

    p = commands.add_parser("tensorrt", help="model.onnx (+ model.prompt.onnx) -> two TensorRT plans + JSON sidecar (TensorRT 10.x / 11.x)")
    p.add_argument("--onnx", required=True, help="model.onnx from 'boxteacher export onnx'")
    p.add_argument(
        "--output", required=True, help="engine file (plain plan); the prompt plan goes to OUTPUT's .prompt.engine, metadata to OUTPUT.json"
    )
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="TRT 10: builder flag; TRT 11: ModelOpt AutoCast first")
    precision.add_argument("--bf16", action="store_true", help="TRT 10: builder flag; TRT 11: ModelOpt AutoCast first")
    precision.add_argument("--int8", action="store_true", help="TRT 10: entropy calibration on --calib; TRT 11: needs a Q/DQ ONNX")
    p.add_argument("--calib", default=None, help="folder of calibration images for --int8")
    p.add_argument("--calib-images", type=int, default=500, help="at most this many calibration images")
    p.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GB")
    p.add_argument("--min-shape", type=int, nargs=2, metavar=("H", "W"), default=None, help="smallest padded input")
    p.add_argument("--opt-shape", type=int, nargs=2, metavar=("H", "W"), default=None, help="input size tuned for")
    p.add_argument("--max-shape", type=int, nargs=2, metavar=("H", "W"), default=None, help="largest padded input")
    p.set_defaults(func=cmd_tensorrt)

    p = commands.add_parser("check", help="parity of an exported model (encoder and prompt graph) with eager PyTorch on a COCO folder")
    p.add_argument("--weights", required=True, help="the checkpoint the model was exported from")
    p.add_argument("--model", required=True, help="model.onnx or model.engine")
    p.add_argument("--data", required=True, help="dataset folder with images/ and annotations/SPLIT.json")
    p.add_argument("--split", default="val")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--device", default="cpu", help="ONNX Runtime device: cpu or cuda")
    p.add_argument("--no-branches", action="store_true", help="skip the AP of the student and the teacher branch")
    p.add_argument("--output", default=None, help="also write the report as JSON here")
    p.set_defaults(func=cmd_check)


def cmd_onnx(args: argparse.Namespace) -> int:
    from export.metadata import prompt_path, read_onnx_metadata
    from export.onnx_export import export_checkpoint

    path = export_checkpoint(
        args.weights,
        args.output,
        branch=args.branch,
        dynamic=args.dynamic,
        input_size=tuple(args.input_size) if args.input_size else None,
        max_detections=args.max_detections,
        score_threshold=args.score_threshold,
        opset=args.opset,
        simplify=not args.no_simplify,
    )
    meta = read_onnx_metadata(path)
    size = "dynamic H/W" if meta.dynamic else "x".join(str(v) for v in meta.input_size or [])
    print(
        f"wrote {path} and {prompt_path(path).name}: {meta.branch} branch, {len(meta.class_names)} classes, input {size}, "
        f"K={meta.max_detections}, opset {meta.opset}, version {meta.model_version}"
    )
    return 0


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from export.metadata import prompt_path, sidecar_path
    from export.tensorrt_build import build_engine

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "int8" if args.int8 else "fp32"
    if args.calib and precision != "int8":
        raise ValueError("--calib is for --int8 only")
    path = build_engine(
        args.onnx,
        args.output,
        precision=precision,
        calib=args.calib,
        calib_images=args.calib_images,
        workspace_gb=args.workspace,
        min_shape=args.min_shape,
        opt_shape=args.opt_shape,
        max_shape=args.max_shape,
    )
    print(f"wrote {path} ({precision}), {prompt_path(path)} and {sidecar_path(path)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from export.check import check_parity, format_report, write_report

    report = check_parity(
        args.weights,
        args.model,
        args.data,
        split=args.split,
        max_images=args.max_images,
        device=args.device,
        branches_ap=not args.no_branches,
    )
    print(format_report(report))
    if args.output:
        print(f"wrote {write_report(report, args.output)}")
    else:
        print(json.dumps(report["parity"]))
    return 0
