"""Training steps for the three methods, numerical safety on awkward boxes, the
schedule, and (slow) the tiny config learning real masks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import REPO, tiny_config

from training.benchmark import load_variants
from training.config import load_config
from training.criterion import compute_losses
from training.engine import assigned_teacher_view, student_batch, teacher_pseudo_masks
from training.model.condinst import InputDetections, build_model
from training.model.fcos import Detections
from training.model.processing import paste_masks
from training.train import Trainer, lr_factor

REPO_CONFIGS = REPO / "configs"


def _target(boxes, h=96, w=128, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = boxes.shape[0]
    masks = torch.zeros(n, h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        masks[i, int(y1) : int(y2) + 1, int(x1) : int(x2) + 1] = 1
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels if labels is not None else [0] * n, dtype=torch.int64),
        "masks": masks,
        "image_id": 1,
        "orig_size": (h, w),
    }


AWKWARD = [
    [],  # an image with no boxes
    [[10.2, 10.2, 10.6, 10.7]],  # a box smaller than a pixel
    [[0.0, 0.0, 127.0, 95.0], [100.0, 60.0, 128.0, 96.0]],  # at the image border
]


def _one_detection(box: list[float], input_hw: tuple[int, int]) -> InputDetections:
    """One detection whose stride-4 mask is 1 on the left half of its box's rows, 0 elsewhere."""
    hp, wp = -(-input_hw[0] // 4), -(-input_hw[1] // 4)
    mask = torch.zeros(1, hp, wp)
    mask[0, 2:6, 1:3] = 1.0
    dets = Detections(
        boxes=torch.tensor([box]), det_scores=torch.tensor([0.9]), labels=torch.zeros(1, dtype=torch.int64),
        locations=torch.zeros(1, 2), levels=torch.zeros(1, dtype=torch.int64), params=torch.zeros(1, 1), valid=torch.ones(1, dtype=torch.bool),
    )  # fmt: skip
    return InputDetections(dets, mask, torch.tensor([0.8]), torch.tensor([0.5]), input_hw)


def _view_args(cfg) -> tuple[int, float, float]:
    """assigned_teacher_view's stride and Algorithm 1's thresholds, as training passes them."""
    return cfg.model.mask.out_stride, cfg.boxteacher.iou_threshold, cfg.boxteacher.score_threshold


def test_flipped_teacher_view_is_mirrored_back():
    cfg = tiny_config(overrides=["method=boxteacher"])
    hw = (32, 40)
    det = _one_detection([4.0, 8.0, 14.0, 24.0], hw)  # in the mirrored image's pixels
    gt = torch.tensor([[26.0, 8.0, 36.0, 24.0], [0.0, 0.0, 5.0, 5.0]])  # box 0 = the detection mirrored (40 - x)
    probs, scores, boxes, has = assigned_teacher_view(det, gt, hw, True, *_view_args(cfg))
    assert has.tolist() == [True, False]
    assert boxes.tolist() == [[26.0, 8.0, 36.0, 24.0], [0.0, 0.0, 0.0, 0.0]]
    assert scores.tolist() == pytest.approx([0.9, 0.0])
    pasted = paste_masks(det.mask_probs, hw, hw, cfg.model.mask.out_stride)[0]
    assert torch.equal(probs[0], pasted.flip(-1)) and not torch.equal(probs[0], pasted)
    assert probs[0][:, 20:].sum() > 0 and probs[0][:, :20].sum() == 0  # the mask moved to the right half
    assert not probs[1].any()
    # The same detection read as an un-mirrored view matches the un-mirrored box instead.
    _, _, boxes, has = assigned_teacher_view(det, torch.tensor([[4.0, 8.0, 14.0, 24.0]]), hw, False, *_view_args(cfg))
    assert has.tolist() == [True] and boxes.tolist() == [[4.0, 8.0, 14.0, 24.0]]


def test_teacher_boxes_are_clipped_to_the_image_before_matching():
    # As the authors' postprocess: a detection reaching 12 px past the left edge is read as
    # [0, 8, 8, 24], IoU 1 with the GT box (unclipped: 8 * 16 / (20 * 16) = 0.4, no match).
    cfg = tiny_config(overrides=["method=boxteacher"])
    hw = (32, 40)
    det = _one_detection([-12.0, 8.0, 8.0, 24.0], hw)
    _, _, boxes, has = assigned_teacher_view(det, torch.tensor([[0.0, 8.0, 8.0, 24.0]]), hw, False, *_view_args(cfg))
    assert has.tolist() == [True] and boxes.tolist() == [[0.0, 8.0, 8.0, 24.0]]


def test_teacher_labels_every_scale_and_its_mirror(monkeypatch):
    # teacher_min_size 64 + teacher_extra_sizes [96], flipped: one forward per scale, each of
    # the 2 images and their mirrors (4 inputs): 96x128 -> 64x85 (padded to 64x96) and 96x128.
    # Each GT box then merges 4 views (2 scales x 2 flips).
    import training.engine as engine

    cfg = tiny_config(
        overrides=[
            "method=boxteacher",
            "boxteacher.teacher_flip=true",
            "boxteacher.teacher_min_size=64",
            "boxteacher.teacher_max_size=128",
            "boxteacher.teacher_extra_sizes=[96]",
        ]
    )
    teacher = build_model(cfg)
    inputs, merged = [], []
    teacher.register_forward_pre_hook(lambda module, args: inputs.append(tuple(args[0].shape)))
    merge = engine.merge_teacher_views
    monkeypatch.setattr(engine, "merge_teacher_views", lambda views: merged.append(len(views)) or merge(views))
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    batch = student_batch(teacher, [image, image], [_target([[20, 20, 60, 50]]), _target([[10, 10, 40, 80]])], cfg)
    pseudo, _ = teacher_pseudo_masks(teacher, [image, image], batch, cfg)
    assert inputs == [(4, 3, 64, 96), (4, 3, 96, 128)]
    assert merged == [4, 4] and [p[0].shape[0] for p in pseudo] == [1, 1]


@pytest.mark.parametrize("method", ["condinst", "boxinst", "boxteacher", "boxteacher-flip", "boxteacher-flip-scales"])
@pytest.mark.parametrize("boxes", AWKWARD, ids=["no-boxes", "sub-pixel", "border"])
def test_losses_are_finite_and_differentiable(method, boxes):
    torch.manual_seed(0)
    # the teacher's test-time augmentation: flip, and flip at two scales
    extra = [96] if method.endswith("-scales") else []
    method, _, tta = method.partition("-")
    flip = bool(tta)
    cfg = tiny_config(overrides=[f"method={method}", f"boxteacher.teacher_flip={flip}", f"boxteacher.teacher_extra_sizes={extra}"])
    model = build_model(cfg).train()
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    batch = student_batch(model, [image, image.flip(-1)], [_target(boxes), _target([[20, 20, 60, 50]])], cfg)
    if method == "boxteacher":
        teacher = build_model(cfg)
        batch.pseudo, stats = teacher_pseudo_masks(teacher, [image, image.flip(-1)], batch, cfg)
        assert len(batch.pseudo) == 2 and batch.pseudo[0][0].shape[0] == len(boxes)
    losses = compute_losses(model, batch, iteration=50, cfg=cfg)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_lr_schedule_warmup_and_steps():
    cfg = load_config(None, ["solver.warmup_iters=10", "solver.warmup_factor=0.1", "solver.steps=[20,30]", "solver.gamma=0.5"])
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(5, cfg) == pytest.approx(0.1 * 0.5 + 0.5)
    assert lr_factor(10, cfg) == 1.0 and lr_factor(20, cfg) == 0.5 and lr_factor(35, cfg) == 0.25


@pytest.mark.parametrize("method", ["condinst", "boxteacher"])
def test_trainer_runs_and_checkpoints(synthetic_dataset, tmp_path, method):
    cfg = tiny_config(overrides=[f"method={method}", "solver.batch_size=2", "solver.max_iter=3", "train.log_period=1"])
    trainer = Trainer(cfg, synthetic_dataset, tmp_path)
    final = trainer.run(progress=False)
    ckpt = torch.load(final, weights_only=False)
    assert ckpt["iteration"] == 3 and ckpt["config"]["class_names"] == trainer.dataset.class_names
    assert (ckpt["teacher"] is not None) == (method == "boxteacher")
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3]


# ---- integration: does the tiny config learn masks? (minutes on CPU) ------------------
# configs/synthetic-tiny.yaml, batch 4, 300 iterations, synthetic 200/50 images, seed 0,
# this 2-core machine. Measured (segm AP vs the box-fill baseline on the same detections):
#   condinst   (GT masks)  segm 3.39 vs 0.54, bbox 4.50, 84 s
#   boxinst    (boxes)     segm 2.87 vs 0.32, bbox 4.01, 102 s
#   boxteacher (boxes)     segm 1.28 vs 0.31, bbox 2.67, 132 s (teacher); its pseudo masks
#                          on the 699 training boxes: IoU with the hidden true masks 0.082
#                          at iteration 100 -> 0.366 at 300 (0.487 -> 0.582 where matched;
#                          coverage 0.17 -> 0.63; the filled boxes: 0.514).
# Training is not bit-identical from run to run (threads), and the box-fill AP of these weak
# detectors moves most: a fresh-clone run gave boxinst segm 2.95 vs box-fill 1.07 (bbox 4.31).
# The bounds below (segm AP above box-fill by a margin and at least twice it) allow for that.

INTEGRATION_ITERS = int(os.environ.get("BOXTEACHER_IT_ITERS", "300"))


@pytest.fixture(scope="module")
def integration_data(tmp_path_factory):
    from training.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("it") / "data", train=200, val=50, size=128, seed=0)


# BoxInst's training as the authors published it (the "authors" variant of the ablation file).
AUTHORS_TRAINING = load_variants(str(REPO_CONFIGS.parent / "benchmarks" / "ablation-box-supervision.yaml"))["authors"]


def _integration_trainer(method: str, data, output, extra: list[str] = ()) -> Trainer:
    overrides = [
        f"method={method}",
        "solver.batch_size=4",
        f"solver.max_iter={INTEGRATION_ITERS}",
        f"solver.steps=[{int(INTEGRATION_ITERS * 0.83)}]",
        *extra,
    ]
    cfg = load_config(REPO_CONFIGS / "synthetic-tiny.yaml", overrides)
    return Trainer(cfg, data, output)


def _masks_vs_box_fill(model, data) -> tuple[dict, dict]:
    from training.evaluate import evaluate_model

    masks = evaluate_model(model.eval(), data, "val")
    boxfill = evaluate_model(model, data, "val", mask_mode="box")
    print("segm", masks["segm"], "box-fill", boxfill["segm"], "bbox", masks["bbox"])
    return masks, boxfill


@pytest.mark.slow
@pytest.mark.parametrize("method", ["condinst", "boxinst"])
def test_learns_masks_far_better_than_box_fill(method, integration_data, tmp_path):
    """condinst from the true masks; boxinst from boxes only."""
    trainer = _integration_trainer(method, integration_data, tmp_path)
    assert trainer.dataset.with_masks == (method == "condinst")  # boxinst never reads a true mask
    trainer.run(progress=False)
    masks, boxfill = _masks_vs_box_fill(trainer.model, integration_data)
    assert masks["bbox"]["AP"] > 1.0
    assert masks["segm"]["AP"] > boxfill["segm"]["AP"] + 1.0 and masks["segm"]["AP"] > 2 * boxfill["segm"]["AP"]


@pytest.mark.slow
def test_boxteacher_learns_from_boxes_and_its_pseudo_masks_improve(integration_data, tmp_path):
    from training.pseudo_label import pseudo_label_dataset, pseudo_mask_quality
    from training.train import infinite

    def teacher_pseudo_mask_quality() -> dict:
        quality = pseudo_mask_quality(pseudo_label_dataset(trainer.teacher.eval(), integration_data, "train"), integration_data, "train")
        print(f"iteration {trainer.iteration}: pseudo masks {quality}")
        return quality

    # The method as published: at this budget (1200 samples) our from-scratch defaults, whose
    # mask path sends no gradient into the detector, learn synthetic masks more slowly (measured:
    # segm AP 0.80 vs box-fill 0.61, against 1.55 vs 0.45 here; docs/results.md). The defaults
    # are tested by the boxinst run above and measured on real photos by benchmark quality.
    trainer = _integration_trainer("boxteacher", integration_data, tmp_path, AUTHORS_TRAINING)
    assert not trainer.dataset.with_masks  # training never reads a true mask
    batches = infinite(trainer.loader)
    early_at = INTEGRATION_ITERS // 3
    while trainer.iteration < early_at:
        trainer.step(*next(batches))
    early = teacher_pseudo_mask_quality()
    while trainer.iteration < INTEGRATION_ITERS:
        trainer.step(*next(batches))
    late = teacher_pseudo_mask_quality()
    # The teacher's pseudo masks (Algorithm 1 on the training boxes) get better as it learns:
    # more boxes get one, and they fit the hidden true masks better.
    assert late["coverage"] > early["coverage"]
    assert late["mean_iou"] > 2 * early["mean_iou"] and late["mean_iou"] > 0.15
    assert late["matched_iou"] > early["matched_iou"] + 0.03
    masks, boxfill = _masks_vs_box_fill(trainer.teacher, integration_data)  # the teacher is what eval evaluates
    assert masks["bbox"]["AP"] > 0.5
    assert masks["segm"]["AP"] > boxfill["segm"]["AP"] + 0.5 and masks["segm"]["AP"] > 2 * boxfill["segm"]["AP"]
