"""``boxteacher demo``: the product's main job end to end, in minutes on a CPU.

1. :func:`training.data.synthetic.make_synthetic`: shapes with exact masks (the masks are
   the hidden truth: only the evaluation and the pictures read them);
2. BoxTeacher trained from the boxes alone (the training loader decodes no mask for a
   box-supervised method; :func:`train_method` checks it and says so);
3. COCO evaluation of the teacher on the val split, next to the box-fill baseline on the very
   same detections (:func:`training.evaluate.evaluate_model`, ``mask_mode="box"``);
4. pseudo masks for the training boxes (Algorithm 1) measured against the hidden true masks,
   next to the filled boxes (:mod:`training.pseudo_label`);
5. a table (:func:`format_table`), comparison sheets and a contact sheet
   (:func:`training.visualize.save_comparison_sheets`), and the commands to serve and query
   the model (:func:`serve_instructions`; ``make demo`` then serves it).

Optionally (``upper_bound``) mask-supervised CondInst with the same recipe, as the ceiling.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from training.config import Config, load_config

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic-tiny.yaml"
DEFAULT_ITERS = 600
"""Training iterations of the demo: 6.4 min of BoxTeacher on 2 CPU cores alone (measured on
2026-12-02: 0.53 s per iteration of batch 8, the teacher's forward included; the whole demo
6.6 min)."""
TABLE_HEADER = ("method", "trained on", "segm AP", "AP50", "box-fill segm AP", "pseudo-mask IoU", "filled-box IoU")
"""The demo table's columns. Box-fill: the same detections with each mask replaced by its
filled box. The two IoUs: over the training boxes, against their hidden true masks."""


@dataclass
class MethodResult:
    """One trained method: val metrics (segm and bbox, and segm with box-filled masks) and
    the quality of its pseudo masks on the training boxes (training.pseudo_label.pseudo_mask_quality)."""

    method: str
    checkpoint: Path
    segm: dict[str, float]
    bbox: dict[str, float]
    boxfill_segm: dict[str, float]
    pseudo: dict[str, float] | None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def supervision(self) -> str:
        return "masks" if self.method == "condinst" else "boxes only"


@dataclass
class DemoResult:
    results: list[MethodResult]
    table: str
    sheets: list[Path]
    contact_sheet: Path
    seconds: float


def demo_config(method: str, iters: int, config: str | Path = DEFAULT_CONFIG, overrides: list[str] | None = None) -> Config:
    """The recipe with ``method`` and a run of ``iters`` iterations (learning-rate step at
    80%, as in the full recipe; no intermediate checkpoints)."""
    steps = max(1, int(iters * 0.8))
    return load_config(
        config, [f"method={method}", f"solver.max_iter={iters}", f"solver.steps=[{steps}]", "train.checkpoint_period=0", *(overrides or [])]
    )


def train_method(cfg: Config, data_dir: Path, output: Path, device: str = "cpu", progress: bool = True) -> Path:
    """Train ``cfg.method`` on DATA's train split; returns the final checkpoint. Refuses a
    box-supervised run whose training loader would decode masks."""
    from training.train import build_train_loader, train

    dataset, _ = build_train_loader(data_dir, cfg)
    if cfg.method != "condinst" and dataset.with_masks:
        raise RuntimeError(f"the {cfg.method} training loader decodes masks; it must see boxes only")
    what = (
        "boxes and classes only (its data loader decodes no mask)"
        if not dataset.with_masks
        else "boxes, classes and masks (the upper bound)"
    )
    print(f"2. training {cfg.method} for {cfg.solver.max_iter} iterations on {len(dataset)} images from {what}")
    return train(cfg, data_dir, output, device=device, progress=progress)


def evaluate_method(method: str, checkpoint: Path, data_dir: Path, output: Path, class_agnostic_nms: bool = False) -> MethodResult:
    """Val metrics (masks, and box-fill on the same detections) and pseudo-mask quality on
    the train split for a checkpoint (teacher weights when it has them); writes
    OUTPUT/metrics.json, OUTPUT/metrics-boxfill.json and OUTPUT/pseudo-train.json.

    AP is measured with per-class NMS, COCO's protocol: on a weak multi-class model, NMS over
    all classes lowers it (the 600-iteration demo model: segm AP 3.8 -> 2.4, bbox 7.7 -> 3.2),
    because COCO AP credits the right class among several guesses for one object. The
    pictures use NMS over all classes (one box, one class), which reads better."""
    from training.checkpoint import load_model
    from training.evaluate import evaluate_model
    from training.pseudo_label import pseudo_label_dataset, pseudo_mask_quality

    model, _ = load_model(checkpoint)
    model.cfg.model.fcos.class_agnostic_nms = class_agnostic_nms
    seconds = {}
    start = time.perf_counter()
    masks = evaluate_model(model, data_dir, "val", "mask")
    boxfill = evaluate_model(model, data_dir, "val", "box")
    seconds["eval"] = time.perf_counter() - start
    start = time.perf_counter()
    pseudo = pseudo_label_dataset(model, data_dir, "train")
    quality = pseudo_mask_quality(pseudo, data_dir, "train")
    seconds["pseudo_label"] = time.perf_counter() - start
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(masks, indent=2) + "\n")
    (output / "metrics-boxfill.json").write_text(json.dumps(boxfill, indent=2) + "\n")
    (output / "pseudo-train.json").write_text(json.dumps(pseudo))
    return MethodResult(method, checkpoint, masks["segm"], masks["bbox"], boxfill["segm"], quality, seconds)


def format_table(results: list[MethodResult]) -> str:
    """A Markdown table with the :data:`TABLE_HEADER` columns, one row per method (AP in
    percent, one decimal; IoU three decimals; "-" where the split has no true masks)."""

    def iou(r: MethodResult, key: str) -> str:
        return "-" if r.pseudo is None else f"{r.pseudo[key]:.3f}"

    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for r in results:
        cells = [
            r.method,
            r.supervision,
            f"{r.segm['AP']:.1f}",
            f"{r.segm['AP50']:.1f}",
            f"{r.boxfill_segm['AP']:.1f}",
            iou(r, "mean_iou"),
            iou(r, "boxfill_iou"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def serve_instructions(checkpoint: Path, image: Path, port: int = 8000) -> str:
    """How to serve the checkpoint and query it: the command and two curl lines."""
    url = f"http://127.0.0.1:{port}"
    return "\n".join(
        [
            f"Serve it:  boxteacher serve --model {checkpoint} --host 127.0.0.1 --port {port}   (make demo does this next)",
            "Then, from another shell:",
            f"  curl -s -F image=@{image} '{url}/v1/segment?mask_format=none'     # detections, no masks",
            f"  curl -s -F image=@{image} -F 'boxes=[[10,10,80,80]]' {url}/v1/segment     # a mask for a box you draw",
            f"or open {url}/ in a browser.",
        ]
    )


def run_demo(
    output: str | Path = "demo",
    iters: int = DEFAULT_ITERS,
    train_images: int = 200,
    val_images: int = 50,
    size: int = 128,
    seed: int = 0,
    sheets: int = 6,
    upper_bound: bool = False,
    port: int = 8000,
    device: str = "cpu",
    progress: bool = True,
    config: str | Path = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
) -> DemoResult:
    """Steps 1-5 of the module docstring; prints as it goes and returns what it measured.

    OUTPUT/data: the synthetic dataset; OUTPUT/run (OUTPUT/run-condinst): the training run;
    OUTPUT/eval (OUTPUT/eval-condinst): metrics and pseudo masks; OUTPUT/sheets: the pictures;
    OUTPUT/summary.md: the table.
    """
    from training.checkpoint import load_model
    from training.data.synthetic import make_synthetic
    from training.visualize import save_comparison_sheets

    start = time.perf_counter()
    output = Path(output)
    data = make_synthetic(output / "data", train=train_images, val=val_images, size=size, seed=seed)
    print(f"1. synthetic shapes: {train_images} train / {val_images} val images of {size} px in {data}")
    methods = ["boxteacher"] + (["condinst"] if upper_bound else [])
    results = []
    for method in methods:
        suffix = "" if method == "boxteacher" else f"-{method}"
        t0 = time.perf_counter()
        checkpoint = train_method(demo_config(method, iters, config, overrides), data, output / f"run{suffix}", device, progress)
        trained = time.perf_counter() - t0
        print(f"3-4. evaluating {method} on val (masks and box-fill) and pseudo-labelling the training boxes")
        result = evaluate_method(method, checkpoint, data, output / f"eval{suffix}")
        result.seconds["train"] = trained
        results.append(result)
    table = format_table(results)
    boxteacher = results[0]
    model, _ = load_model(boxteacher.checkpoint)
    model.cfg.model.fcos.class_agnostic_nms = True
    sheet_paths, contact = save_comparison_sheets(model, data, output / "sheets", "val", sheets, method="BoxTeacher")
    seconds = time.perf_counter() - start
    (output / "summary.md").write_text(table + "\n")
    print()
    print(
        f"5. results on the {val_images} val images (BoxTeacher learned from boxes only; box-fill = the same detections with "
        "each mask replaced by its box; IoUs against the hidden true masks of the training boxes):"
    )
    print(table)
    print()
    print(f"pictures: {contact} (all), {output / 'sheets'}/<image>.png (true masks | filled boxes | BoxTeacher masks)")
    print(f"metrics: {output / 'eval'}/metrics.json, metrics-boxfill.json; table: {output / 'summary.md'}")
    print(f"demo time: {seconds / 60:.1f} min (training {sum(r.seconds['train'] for r in results) / 60:.1f} min)")
    print()
    val_image = data / "images" / json.loads((data / "annotations" / "val.json").read_text())["images"][0]["file_name"]
    print(serve_instructions(boxteacher.checkpoint, val_image, port))
    return DemoResult(results, table, sheet_paths, contact, seconds)
