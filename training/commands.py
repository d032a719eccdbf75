"""Training-side subcommands of ``boxteacher``: make-synthetic, train, eval,
visualize, convert, pseudo-label, benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("boxteacher")


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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("visualize", help="PNG overlays of predicted masks, boxes, classes and scores")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p.add_argument("--output", required=True)
    p.add_argument("--score-threshold", type=float, default=0.3, help="minimum mask-aware score drawn")
    p.add_argument("--branch", choices=["teacher", "student"], default=None)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("convert", help="convert the authors' BoxTeacher/AdelaiDet checkpoints to ours")
    p.add_argument("checkpoint", help="their .pth (detectron2 format or a bare state dict)")
    p.add_argument("--from", dest="source", choices=["authors"], default="authors")
    p.add_argument("--output", required=True)
    p.add_argument("--branch", choices=["teacher", "student"], default="teacher")
    p.add_argument("--class-names", default=None, help="JSON list or a file with one name per line (default: COCO's 80 when 80 classes)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.fcos.score_threshold=0.05")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("pseudo-label", help="box-only dataset -> COCO file with one pseudo mask per matched box")
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--output", required=True, help="COCO annotation file to write (e.g. ann.json)")
    p.add_argument("--branch", choices=["teacher", "student"], default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_pseudo_label)

    from training.benchmark import register_benchmarks

    register_benchmarks(sub)


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


def cmd_train(args) -> int:
    """Train on one process, or on every process of a torchrun job (DDP); rank 0 prints
    and writes the checkpoints, the logs and one metrics.json."""
    from training.config import load_config
    from training.distributed import is_main_process, launch
    from training.train import train

    cfg = load_config(args.config, args.overrides)
    with launch(args.device) as device:
        final = train(cfg, args.data, args.output, device=device, progress=not args.no_progress, resume=args.resume, evaluate=not args.no_eval)
        if is_main_process():
            print(f"checkpoint: {final}")
            if not args.no_eval:
                metrics = json.loads((Path(args.output) / "metrics.json").read_text())
                print(f"segm AP {metrics['segm']['AP']:.2f}  bbox AP {metrics['bbox']['AP']:.2f}  ({Path(args.output) / 'metrics.json'})")
    return 0


def cmd_eval(args) -> int:
    from training.checkpoint import load_model
    from training.evaluate import evaluate_model, write_metrics

    model, _ = load_model(args.weights, args.branch, device=args.device)
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


def cmd_visualize(args) -> int:
    from training.checkpoint import load_model
    from training.data.coco import load_image
    from training.visualize import save_overlays

    model, _ = load_model(args.weights, args.branch)
    images = [(str(f), load_image(f).as_subclass(__import__("torch").Tensor)) for f in _image_files(args.images)]
    paths = save_overlays(model, images, args.output, args.score_threshold)
    print(f"wrote {len(paths)} overlays to {args.output}")
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
    from training.checkpoint import load_model
    from training.pseudo_label import pseudo_mask_quality, write_pseudo_labels

    model, _ = load_model(args.weights, args.branch, device=args.device)
    path, result = write_pseudo_labels(model, args.data, args.split, args.output)
    print(f"wrote {path}: {len(result['annotations'])} pseudo masks")
    quality = pseudo_mask_quality(result, args.data, args.split)
    if quality is not None:  # the split also has true masks: say how close the pseudo masks are
        print(
            f"against the split's true masks ({int(quality['boxes'])} boxes): coverage {quality['coverage']:.3f}, "
            f"mask IoU {quality['matched_iou']:.3f} where matched, {quality['mean_iou']:.3f} over all boxes "
            f"(filled boxes: {quality['boxfill_iou']:.3f})"
        )
    return 0
