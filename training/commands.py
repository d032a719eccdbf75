"""Training-side subcommands of ``boxteacher``: make-synthetic, check-data, train, eval,
visualize, demo, convert, pseudo-label, benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training.cli import plugins

log = logging.getLogger("boxteacher")


def _image_side(text: str) -> int:
    """argparse type: a shorter side in pixels (a positive integer)."""
    try:
        side = int(text)
    except ValueError:
        side = 0
    if side <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in pixels (a positive integer)")
    return side


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-synthetic", help="write a synthetic instance-segmentation dataset folder")
    p.add_argument("output", help="dataset folder to create (images/, annotations/{train,val}.json)")
    p.add_argument("--train", type=int, default=200, help="number of training images")
    p.add_argument("--val", type=int, default=50, help="number of validation images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("train", help="train CondInst / BoxInst / BoxTeacher on a COCO-format folder")
    p.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    p.add_argument("--data", required=True, help="dataset folder with images/ and annotations/{train,val}.json")
    p.add_argument("--output", required=True, help="folder for checkpoints, logs and metrics")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation on the val split")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest valid checkpoint in --output (a damaged one is skipped with a warning)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. solver.base_lr=0.005")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO evaluation (bbox and segm) -> OUTPUT/metrics.json")
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--output", required=True)
    p.add_argument("--branch", choices=["teacher", "student"], default=None, help="default: teacher when present")
    p.add_argument("--mask-mode", choices=["mask", "box"], default="mask", help="'box': each mask replaced by its filled box")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--device", default="cpu")
    _add_nms_option(p)
    p.set_defaults(func=cmd_eval)

    # Defaults (None here) are training.visualize's constants; not imported at start-up.
    p = sub.add_parser("visualize", help="PNG overlays of predicted masks, boxes, classes and scores")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p.add_argument("--output", required=True)
    p.add_argument("--score-threshold", type=float, default=None, help="minimum mask-aware score drawn (default 0.3)")
    p.add_argument("--top-k", type=int, default=None, help="at most this many detections drawn per image, best first (default 10)")
    p.add_argument("--scale", type=int, default=None, help="integer upscale factor (default: the long side reaches 512 px)")
    p.add_argument("--branch", choices=["teacher", "student"], default=None)
    _add_nms_option(p)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("demo", help="the main job in minutes: synthetic data -> BoxTeacher from boxes -> table, pictures, serving hints")
    p.add_argument("--output", default="demo", help="folder for the data, the run, the metrics and the pictures")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the demo's budget, see training/demo.py)")
    p.add_argument("--train", type=int, default=200, help="synthetic training images")
    p.add_argument("--val", type=int, default=50, help="synthetic val images")
    p.add_argument("--sheets", type=int, default=6, help="val images drawn as comparison sheets")
    p.add_argument("--upper-bound", action="store_true", help="also train mask-supervised CondInst with the same recipe (doubles the time)")
    p.add_argument("--port", type=int, default=8000, help="port named in the serving hints")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="convert the authors' BoxTeacher/AdelaiDet checkpoints to ours")
    p.add_argument("checkpoint", help="their .pth (detectron2 format or a bare state dict)")
    p.add_argument("--from", dest="source", choices=["authors"], default="authors")
    p.add_argument("--output", required=True)
    p.add_argument("--branch", choices=["teacher", "student"], default="teacher")
    p.add_argument("--class-names", default=None, help="JSON list or a file with one name per line (default: COCO's 80 when 80 classes)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.fcos.score_threshold=0.05")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "check-data",
        help="list every problem of a COCO dataset folder; exit 0 when training can proceed, 1 when not",
        description="Exit status: 0 training can proceed (skipped or kept problems are listed), 1 it cannot (fatal problems), 2 no such folder.",
    )
    p.add_argument("data", help="dataset folder with images/ and annotations/*.json")
    p.add_argument(
        "--split",
        action="append",
        default=None,
        help="check this split only (repeatable; default: train and every other annotations/*.json)",
    )
    p.add_argument(
        "--images", choices=["exists", "header", "decode"], default="decode",
        help="how far image files are read: exists, header (size, EXIF rotation), decode (also finds truncated files; default)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser(
        "pseudo-label",
        help="box-only dataset -> COCO file with one pseudo mask per matched box (under torchrun: sharded; a rerun resumes)",
    )
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--output", required=True, help="COCO annotation file to write (e.g. ann.json); parts go to OUTPUT.parts/ meanwhile")
    p.add_argument("--branch", choices=["teacher", "student"], default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: one GPU per process)")
    p.add_argument("--workers", type=int, default=0, help="processes decoding images ahead of the model (per process)")
    p.add_argument(
        "--flip",
        action="store_true",
        help="also label each image mirrored and average the two masks (twice the compute; "
        "Penn-Fudan train boxes: mask IoU 0.625 -> 0.640, docs/results.md)",
    )
    p.add_argument(
        "--extra-sizes",
        type=_image_side,
        nargs="+",
        default=[],
        metavar="SIZE",
        help="also label each image at these shorter sides (mirrored too with --flip) and average all views, "
        "as boxteacher.teacher_extra_sizes does in training (one more forward per view)",
    )
    p.set_defaults(func=cmd_pseudo_label)

    p = sub.add_parser("benchmark", help="quality / speed benchmarks (quality, train, infer, serve)")
    bench = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for add in plugins("boxteacher.benchmarks"):
        add(bench)


def _add_nms_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--class-agnostic-nms",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one box per object (NMS over all classes) or per class (--no-...); default: the checkpoint's model.fcos.class_agnostic_nms",
    )


def _load_model(args):
    """The checkpoint's model, with --class-agnostic-nms applied when given."""
    from training.checkpoint import load_model

    model, cfg = load_model(args.weights, args.branch, device=getattr(args, "device", "cpu"))
    if args.class_agnostic_nms is not None:
        model.cfg.model.fcos.class_agnostic_nms = args.class_agnostic_nms
    return model, cfg


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def cmd_make_synthetic(args) -> int:
    from training.data.synthetic import make_synthetic

    path = make_synthetic(args.output, train=args.train, val=args.val, size=args.size, seed=args.seed)
    print(f"wrote {path} ({args.train} train / {args.val} val images of {args.size}px)")
    return 0


def _check_data_first(data: str, splits: list[str]) -> list:
    """The dataset checks before any work (their SplitReports): a fatal problem stops with
    one line (DataError); the reader warns once about what it skips."""
    from training.data.checks import check_split

    return [check_split(data, split).raise_if_fatal() for split in splits]


def cmd_check_data(args) -> int:
    from training.data.checks import check_dataset, format_report

    reports = check_dataset(args.data, args.split, args.images)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        print("\n".join(format_report(r) for r in reports))
    usable = all(r.usable for r in reports)
    print("training can proceed" if usable else "training cannot proceed: fix the fatal problems above", file=sys.stderr)
    return 0 if usable else 1


def cmd_train(args) -> int:
    """Train on one process, or on every process of a torchrun job (DDP); rank 0 prints
    and writes the checkpoints, the logs and one metrics.json."""
    from training.config import load_config
    from training.data.checks import DataError
    from training.distributed import is_main_process, launch
    from training.train import train

    cfg = load_config(args.config, args.overrides)
    evaluates = not args.no_eval or bool(cfg.train.eval_period)
    reports = _check_data_first(args.data, ["train", "val"] if evaluates else ["train"])
    if evaluates and reports[1].without_mask:  # found now, not by COCOeval after the training
        val = reports[1]
        raise DataError(
            f"{val.file}: {val.without_mask} annotations without a mask ({', '.join(val.without_mask_examples)}); "
            "evaluation during and after training measures mask AP: train with --no-eval (and train.eval_period=0), "
            "then `boxteacher eval` gives box AP on a box-only split"
        )
    with launch(args.device) as device:
        final = train(
            cfg, args.data, args.output, device=device, progress=not args.no_progress, resume=args.resume, evaluate=not args.no_eval
        )
        if is_main_process():
            print(f"checkpoint: {final}")
            if not args.no_eval:
                metrics = json.loads((Path(args.output) / "metrics.json").read_text())
                print(f"segm AP {metrics['segm']['AP']:.2f}  bbox AP {metrics['bbox']['AP']:.2f}  ({Path(args.output) / 'metrics.json'})")
    return 0


def cmd_eval(args) -> int:
    from training.evaluate import evaluate_model, write_metrics

    model, _ = _load_model(args)  # a missing checkpoint is named before the data's problems
    (report,) = _check_data_first(args.data, [args.split])
    if report.without_mask:
        metrics = _evaluate_boxes_only(model, args, report)
    else:
        metrics = evaluate_model(model, args.data, args.split, args.mask_mode, args.max_images)
    path = write_metrics(metrics, args.output)
    print(json.dumps({k: metrics[k] for k in ("segm", "bbox")}))
    print(f"wrote {path}")
    return 0


def _image_files(items: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    return files


def _evaluate_boxes_only(model, args, report) -> dict:
    """evaluate_model's dict with ``"segm": None``: the split has annotations without a
    mask (COCOeval's segm needs one on every annotation), so box AP only, said once."""
    from training.data.coco import CocoInstances
    from training.evaluate import coco_metrics, predict_dataset

    print(
        f"{report.file}: {report.without_mask} annotations without a mask ({', '.join(report.without_mask_examples)}): box AP only",
        file=sys.stderr,
    )
    class_agnostic = bool(model.cfg.data.class_agnostic)
    dataset = CocoInstances(args.data, args.split, class_agnostic=class_agnostic)
    bbox, _, ids = predict_dataset(model, dataset, args.mask_mode, args.max_images)
    return {
        "segm": None,
        "bbox": coco_metrics(dataset.coco, bbox, "bbox", ids, use_cats=not class_agnostic),
        "num_images": len(ids),
        "mask_mode": args.mask_mode,
        "class_agnostic_nms": model.cfg.model.fcos.class_agnostic_nms,
    }


def cmd_visualize(args) -> int:

    from training.data.coco import load_image
    from training.visualize import DEFAULT_SCORE_THRESHOLD, DEFAULT_TOP_K, save_overlays

    model, _ = _load_model(args)
    images = [(str(f), load_image(f)) for f in _image_files(args.images)]
    threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
    top_k = DEFAULT_TOP_K if args.top_k is None else args.top_k
    paths = save_overlays(model, images, args.output, threshold, top_k, args.scale)
    print(f"wrote {len(paths)} overlays to {args.output}")
    return 0


def cmd_demo(args) -> int:
    from training.demo import DEFAULT_ITERS, run_demo

    run_demo(
        args.output, iters=args.iters or DEFAULT_ITERS, train_images=args.train, val_images=args.val, sheets=args.sheets,
        upper_bound=args.upper_bound, port=args.port, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    return 0


def cmd_convert(args) -> int:
    from training.convert import convert_authors_checkpoint

    names = None
    if args.class_names:
        p = Path(args.class_names)
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()] if p.is_file() else json.loads(args.class_names)
    out = convert_authors_checkpoint(args.checkpoint, args.output, args.branch, names, args.overrides)
    print(f"wrote {out}")
    return 0


def cmd_pseudo_label(args) -> int:
    """One process, or every process of a torchrun job: the images are shared out, rank 0
    merges and prints; rerunning the same command after a crash resumes."""
    from training.checkpoint import load_model
    from training.distributed import info, launch
    from training.files import file_sha256
    from training.pseudo_label import pseudo_label_to_file

    _check_data_first(args.data, [args.split])
    with launch(args.device) as device:
        model, _ = load_model(args.weights, args.branch, device=device)
        annotations = Path(args.data) / "annotations" / f"{args.split}.json"
        key = {"checkpoint_sha256": file_sha256(args.weights), "branch": args.branch, "annotations_sha256": file_sha256(annotations)}
        summary = pseudo_label_to_file(
            model, args.data, args.split, args.output, flip=args.flip, extra_sizes=args.extra_sizes, workers=args.workers, run_key=key
        )
        main = info().is_main
    if not main:
        return 0
    print(
        f"wrote {args.output}: {summary['pseudo_masks']} pseudo masks for {summary['boxes']} boxes in {summary['images']} images "
        f"({summary['unmatched_boxes']} boxes without one, under unmatched_boxes; review_order lists the worst first)"
    )
    quality = summary["quality"]
    if quality is not None:  # the split also has true masks: say how close the pseudo masks are
        print(
            f"against the split's true masks ({int(quality['boxes'])} boxes): coverage {quality['coverage']:.3f}, "
            f"mask IoU {quality['matched_iou']:.3f} where matched, {quality['mean_iou']:.3f} over all boxes "
            f"(filled boxes: {quality['boxfill_iou']:.3f})"
        )
    return 0
