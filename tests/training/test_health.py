"""training.health: mask statistics, per-group gradient norms, the collapse detector, and
the gradient split between the mask path and the detector (hand-computed values)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_config

from training.criterion import compute_losses
from training.engine import student_batch
from training.health import (
    CollapseDetector,
    detector_parameters,
    loss_group_gradient_norms,
    mask_box_area_ratio,
    mask_health,
    mask_outside_box_share,
    saturated_logit_fraction,
)
from training.model.condinst import build_model
from training.model.mask_head import scale_gradient

PROBS = torch.tensor([[[0.9, 0.2, 0.7], [0.6, 0.4, 0.8]]])  # (1, 2, 3): foreground at columns 0 and 2
BOX = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])  # the box covers columns 0-1


def test_mask_outside_box_share():
    # foreground pixels: (0,0) (0,2) (1,0) (1,2); outside the box: the two in column 2
    assert float(mask_outside_box_share(PROBS, BOX)) == pytest.approx(0.5)
    # column 2 is padding: only the two foreground pixels inside the box count
    valid = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])
    assert float(mask_outside_box_share(PROBS, BOX, valid)) == 0.0
    # no foreground at all: 0, not NaN
    assert float(mask_outside_box_share(torch.zeros(1, 2, 3), BOX)) == 0.0


def test_mask_box_area_ratio():
    probs = torch.stack([PROBS[0], torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.1, 0.1]]), torch.full((2, 3), 0.9)])
    boxes = torch.stack([BOX[0], torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), torch.zeros(2, 3)])
    # instance 0: 4 foreground pixels / box of 4 = 1.0; instance 1: 1 / 2 = 0.5; instance 2: empty box, left out
    assert float(mask_box_area_ratio(probs, boxes)) == pytest.approx(0.75)
    assert float(mask_box_area_ratio(probs[2:], boxes[2:])) == 0.0


def test_saturated_logit_fraction():
    logits = torch.tensor([[[[13.0, -13.0], [5.0, 12.0]]]])  # 12 itself is not beyond 12
    assert float(saturated_logit_fraction(logits)) == pytest.approx(0.5)
    valid = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    assert float(saturated_logit_fraction(logits, valid)) == pytest.approx(1 / 3)


def test_mask_health_keys_and_empty():
    logits = torch.logit(PROBS)[:, None]
    out = mask_health(logits, BOX)
    assert out["mask_outside_box"] == pytest.approx(0.5) and out["mask_box_area"] == pytest.approx(1.0)
    assert out["mask_saturated"] == 0.0
    empty = mask_health(torch.zeros(0, 1, 2, 3), torch.zeros(0, 2, 3))
    assert set(empty) == set(out) and all(v != v for v in empty.values())  # NaN: not measured


def test_loss_group_gradient_norms():
    w = torch.zeros(2, requires_grad=True)
    losses = {
        "loss_fcos_cls": 3 * w[0] + 4 * w[1],  # gradient (3, 4): norm 5
        "loss_prj": 6 * w[0],
        "loss_pairwise": 8 * w[1],  # mask group: (6, 8), norm 10
    }
    out = loss_group_gradient_norms(losses, [w])
    assert out == {"grad_det": pytest.approx(5.0), "grad_mask": pytest.approx(10.0)}
    assert w.grad is None  # the training backward is left alone
    assert loss_group_gradient_norms({"loss_fcos_cls": 3 * w[0]}, [w])["grad_mask"] == 0.0


def test_scale_gradient():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = scale_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0])).sum().backward()
    assert x.grad.tolist() == [0.25, 0.5]
    assert scale_gradient(x, 1.0) is x and not scale_gradient(x, 0.0).requires_grad
    with torch.no_grad():
        assert scale_gradient(x, 0.5) is x


def test_collapse_detector_fires_once_after_patience(caplog):
    det = CollapseDetector(start_iteration=100, patience=2)
    sick = {"mask_box_area": 0.01, "mask_outside_box": 0.1, "mask_saturated": 0.0}
    healthy = {"mask_box_area": 0.8, "mask_outside_box": 0.05, "mask_saturated": 0.1}
    assert det.update(sick, 80) is None and det.update(sick, 90) is None  # before start_iteration
    assert det.update(sick, 100) is None  # one record is not a streak
    assert det.update(healthy, 120) is None  # a healthy record resets it
    assert det.update(sick, 140) is None
    with caplog.at_level(logging.WARNING):
        message = det.update(sick, 160)
    assert message and "iteration 160" in message and "empty masks" in message
    assert message in caplog.text
    assert det.update(sick, 180) is None and det.fired == message  # warns once


@pytest.mark.parametrize(
    "record, symptom",
    [
        ({"mask_outside_box": 0.7}, "flooding"),
        ({"mask_saturated": 0.95}, "saturated"),
        ({"mask_box_area": float("nan"), "mask_outside_box": float("nan")}, None),  # not measured
    ],
)
def test_collapse_symptoms(record, symptom):
    found = CollapseDetector().symptoms(record)
    assert (symptom in " ".join(found)) if symptom else found == []


@pytest.mark.parametrize("scales, detector_moves", [((1.0, 1.0), True), ((0.0, 0.0), False), (("null", "null"), False)])
def test_mask_losses_reach_the_detector_only_through_the_grad_scales(scales, detector_moves):
    """With both scales at 0 the mask losses train the controller and the mask branch
    but send no gradient into the backbone, FPN or FCOS towers."""
    torch.manual_seed(0)
    cfg = tiny_config(
        overrides=["method=boxinst", f"model.mask.controller_grad_scale={scales[0]}", f"model.mask.branch_grad_scale={scales[1]}"]
    )
    model = build_model(cfg).train()
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    from test_train import _target

    batch = student_batch(model, [image], [_target([[20, 20, 60, 50], [70, 10, 120, 90]])], cfg)
    losses = compute_losses(model, batch, iteration=50, cfg=cfg)
    mask_terms = sum(v for k, v in losses.items() if not k.startswith("loss_fcos"))
    mask_terms.backward()
    detector = sum(float(p.grad.abs().sum()) for p in detector_parameters(model) if p.grad is not None)
    mask_path = sum(float(p.grad.abs().sum()) for p in [*model.head.controller.parameters(), *model.mask_branch.parameters()])
    assert mask_path > 0
    assert (detector > 0) == detector_moves


@pytest.mark.parametrize("mode, detector_value, mask_value", [("global", 30 * 10 / 916**0.5, 4 * 10 / 916**0.5), ("per_group", 10.0, 4.0)])
def test_clip_gradients_global_vs_per_group(mode, detector_value, mask_value):
    """One detector gradient entry of 30 and one controller entry of 4, clipped at 10:
    globally both shrink by 10 / sqrt(30^2 + 4^2); per group only the detector's does."""
    from training.train import clip_gradients

    model = build_model(tiny_config())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    detector_p = detector_parameters(model)[0]
    detector_p.grad.view(-1)[0] = 30.0
    model.head.controller.weight.grad.view(-1)[0] = 4.0
    total = clip_gradients(model, 10.0, mode)
    assert float(total) == pytest.approx(916**0.5, rel=1e-6)
    assert float(detector_p.grad.view(-1)[0]) == pytest.approx(detector_value, rel=1e-5)
    assert float(model.head.controller.weight.grad.view(-1)[0]) == pytest.approx(mask_value, rel=1e-5)
    assert float(clip_gradients(model, None, mode)) == pytest.approx(
        float(torch.linalg.vector_norm(torch.tensor([detector_value, mask_value]))), rel=1e-5
    )


def test_relu_straight_through():
    from training.model.fcos import relu_straight_through

    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    y = relu_straight_through(x)
    assert y.tolist() == [0.0, 0.5, 3.0]
    (y * torch.tensor([-1.0, 2.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [-1.0, 2.0, 4.0]  # a plain ReLU would give 0 for the first


@pytest.mark.parametrize("straight, dead_side_moves", [(True, True), (False, False)])
def test_a_dead_box_side_recovers_only_with_the_straight_through_relu(straight, dead_side_moves):
    """A regression side whose pre-activation is negative everywhere gets a gradient only with
    fcos.reg_straight_through (the stalled GIoU of box-supervised training from scratch)."""
    from test_train import _target

    torch.manual_seed(0)
    cfg = tiny_config(overrides=["method=condinst", f"model.fcos.reg_straight_through={straight}"])
    model = build_model(cfg).train()
    with torch.no_grad():
        model.head.bbox_pred.bias[0] = -100.0  # the left side: negative at every location
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    batch = student_batch(model, [image], [_target([[20, 20, 60, 50]])], cfg)
    losses = compute_losses(model, batch, iteration=50, cfg=cfg)
    losses["loss_fcos_loc"].backward()
    assert (model.head.bbox_pred.bias.grad[0].abs() > 0).item() == dead_side_moves
    model.eval()
    with torch.no_grad():  # inference is a plain ReLU either way
        head, _ = model(batch.images)
    assert all(float(r[:, 0].max()) == 0.0 for r in head.bbox_reg)


def test_auto_defaults_decouple_box_supervision_only():
    """None / "auto": the authors' coupling with mask supervision, the decoupled mask path
    with box supervision; explicit values win."""
    from training.config import load_config

    condinst, boxinst = load_config(None, ["method=condinst"]), load_config(None, ["method=boxinst"])
    assert condinst.mask_grad_scales == (1.0, 1.0) and condinst.clip_mode == "global"
    assert boxinst.mask_grad_scales == (0.0, 0.0) and boxinst.clip_mode == "per_group"
    pinned = load_config(None, ["method=boxteacher", "model.mask.controller_grad_scale=0.5", "solver.clip_grad_mode=global"])
    assert pinned.mask_grad_scales == (0.5, 0.0) and pinned.clip_mode == "global"
