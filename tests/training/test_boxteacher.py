"""Hand-checked tests for training/boxteacher.py (EMA teacher, pseudo-mask targets and losses).

Algorithm 1 (training.model.assignment): tests/training/test_assignment.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.boxteacher import (
    QUALITY_SCORE_KINDS,
    affinity_loss,
    authors_pseudo_weight,
    crop_masks_to_boxes,
    ema_momentum,
    ema_update_,
    gather_assigned_masks,
    mask_aware_score,
    match_teacher_view,
    mean_foreground_probability,
    merge_teacher_views,
    noise_aware_pseudo_mask_loss,
    pseudo_affinity,
    pseudo_mask_targets,
    quality_score,
    refine_pseudo_masks,
)
from training.losses import dice_loss

# ---------------------------------------------------------------- EMA


def test_ema_momentum_ramp():
    assert ema_momentum(0) == 0.0
    assert ema_momentum(1) == 0.5
    assert ema_momentum(9) == pytest.approx(0.9)
    assert ema_momentum(99) == pytest.approx(0.99)
    assert ema_momentum(999) == pytest.approx(0.999)
    assert ema_momentum(100000) == 0.999
    assert ema_momentum(3, final=0.5) == 0.5
    with pytest.raises(ValueError):
        ema_momentum(-1)


def _tiny_net(weight: float, running_mean: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(weight)
        net[1].weight.fill_(weight)
        net[1].running_mean.fill_(running_mean)
    return net


def test_ema_update_two_steps_by_hand_buffers_untouched():
    teacher = _tiny_net(1.0, running_mean=7.0)
    student = _tiny_net(3.0, running_mean=-1.0)
    ema_update_(teacher, student, momentum=0.5)  # 0.5 * 1 + 0.5 * 3 = 2
    assert teacher[0].weight.item() == pytest.approx(2.0)
    assert teacher[1].weight.item() == pytest.approx(2.0)
    with torch.no_grad():
        student[0].weight.fill_(5.0)
    ema_update_(teacher, student, momentum=0.9)  # 0.9 * 2 + 0.1 * 5 = 2.3
    assert teacher[0].weight.item() == pytest.approx(2.3)
    assert teacher[1].weight.item() == pytest.approx(0.9 * 2.0 + 0.1 * 3.0)
    assert teacher[1].running_mean.item() == 7.0  # buffers are not averaged
    assert teacher[1].num_batches_tracked.item() == 0
    assert student[0].weight.item() == 5.0  # the student is not modified
    assert teacher[0].weight.grad is None
    ema_update_(teacher, student, momentum=0.0)  # momentum 0 copies the student exactly
    assert teacher[0].weight.item() == 5.0


def test_ema_update_unwraps_data_parallel_and_checks_names():
    teacher = _tiny_net(1.0, 0.0)
    student = nn.DataParallel(_tiny_net(3.0, 0.0))  # CPU-only: a plain wrapper with .module
    ema_update_(teacher, student, momentum=0.5)
    assert teacher[0].weight.item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        ema_update_(teacher, nn.Linear(1, 1), momentum=0.5)
    with pytest.raises(ValueError):
        ema_update_(teacher, student, momentum=1.5)


def test_ema_update_unwraps_distributed_data_parallel():
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    timeout = timedelta(seconds=20)
    try:  # a private local store on a free port: nothing shared with other test runs
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timeout)
    except Exception as exc:  # pragma: no cover - sandbox without loopback networking
        pytest.skip(f"cannot start a 1-process gloo group: {exc}")
    try:
        teacher = _tiny_net(1.0, 0.0)
        student = nn.parallel.DistributedDataParallel(_tiny_net(3.0, 0.0))
        ema_update_(teacher, student, momentum=0.75)  # 0.75 * 1 + 0.25 * 3 = 1.5
        assert teacher[0].weight.item() == pytest.approx(1.5)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- mask-aware score


def _score_case():
    probs = torch.tensor([[[0.9, 0.8, 0.3, 0.95]]])  # (1, 1, 4)
    box = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])  # 0.95 lies outside the box
    return torch.tensor([0.64]), probs, box


def test_mask_aware_score_hand_case():
    c, probs, box = _score_case()
    # confident pixels in the box: {0.9, 0.8} -> mean 0.85
    assert mean_foreground_probability(probs, box).item() == pytest.approx(0.85)
    assert mask_aware_score(c, probs, box).item() == pytest.approx(math.sqrt(0.64 * 0.85))
    # without a box: {0.9, 0.8, 0.95}
    assert mask_aware_score(c, probs).item() == pytest.approx(math.sqrt(0.64 * (2.65 / 3)))
    assert authors_pseudo_weight(c, torch.tensor([0.85])).item() == pytest.approx(math.sqrt(0.8 * 0.85))


def test_mask_aware_score_empty_is_zero():
    probs = torch.tensor([[[0.5, 0.2], [0.0, 0.1]], [[0.9, 0.9], [0.9, 0.9]]])
    box = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    score = mask_aware_score(torch.tensor([0.9, 0.9]), probs, box)
    assert score.tolist() == [0.0, 0.0]  # no pixel > 0.5 / empty box
    assert mask_aware_score(torch.zeros(0), torch.zeros(0, 2, 2), torch.zeros(0, 2, 2)).shape == (0,)


def test_quality_score_kinds():
    c, probs, box = _score_case()
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 5.0]])
    kw = dict(mask_probs=probs, box_masks=box, pred_boxes=pred, gt_boxes=gt)
    assert quality_score("none", c, **kw).tolist() == [1.0]
    assert quality_score("cls", c, **kw).item() == pytest.approx(0.64)
    assert quality_score("iou", c, **kw).item() == pytest.approx(0.5)
    assert quality_score("mask_aware", c, **kw).item() == pytest.approx(math.sqrt(0.64 * 0.85))
    # the authors' weight ignores the box: m_bar over {0.9, 0.8, 0.95}
    assert quality_score("mask_aware_authors", c, **kw).item() == pytest.approx(math.sqrt(0.8 * 2.65 / 3))
    # mean entropy: probs {0.5, 1.0} inside the box -> entropies {1, 0} -> 1 - 0.5
    ent_probs = torch.tensor([[[0.5, 1.0, 0.5]]])
    ent_box = torch.tensor([[[1.0, 1.0, 0.0]]])
    q = quality_score("mean_entropy", c, mask_probs=ent_probs, box_masks=ent_box)
    assert q.item() == pytest.approx(0.5, abs=1e-4)
    empty_box = quality_score("mean_entropy", c, mask_probs=ent_probs, box_masks=torch.zeros(1, 1, 3))
    assert empty_box.item() == 0.0
    with pytest.raises(ValueError, match="mask_aware_authors"):
        quality_score("entropy", c, **kw)
    with pytest.raises(ValueError):
        quality_score("iou", c, mask_probs=probs)
    assert set(QUALITY_SCORE_KINDS) == {"none", "cls", "iou", "mean_entropy", "mask_aware", "mask_aware_authors"}


# ---------------------------------------------------------------- pseudo-mask targets


def test_crop_masks_to_boxes_removes_leak():
    mask = torch.ones(1, 8, 8)
    cropped = crop_masks_to_boxes(mask, torch.tensor([[2.0, 2.0, 4.5, 5.0]]))
    expected = torch.zeros(1, 8, 8)
    expected[0, 2:6, 2:5] = 1.0  # rows int(2):int(6), cols int(2):int(5.5)
    assert torch.equal(cropped, expected)
    bool_mask = torch.ones(1, 8, 8, dtype=torch.bool)
    assert crop_masks_to_boxes(bool_mask, torch.tensor([[2.0, 2.0, 4.5, 5.0]])).dtype == torch.bool


def test_gather_assigned_masks():
    pred_masks = torch.stack([torch.full((2, 2), 0.3), torch.full((2, 2), 0.9)])
    masks, weights = gather_assigned_masks(pred_masks, torch.tensor([0.4, 0.7]), torch.tensor([1, -1, 0]))
    assert masks[:, 0, 0].tolist() == pytest.approx([0.9, 0.0, 0.3])
    assert weights.tolist() == pytest.approx([0.7, 0.0, 0.4])
    m0, w0 = gather_assigned_masks(torch.zeros(0, 2, 2), torch.zeros(0), torch.tensor([-1, -1]))
    assert m0.shape == (2, 2, 2) and w0.tolist() == [0.0, 0.0]


def test_match_teacher_view_mirrors_a_flipped_view_back_before_matching():
    # A 20 px wide image; the GT box spans x 2..8. The flipped view saw it at x 12..18.
    gt = torch.tensor([[2.0, 0.0, 8.0, 10.0]])
    seen = torch.tensor([[12.0, 0.0, 18.0, 10.0], [0.0, 0.0, 4.0, 4.0]])
    scores = torch.tensor([0.6, 0.9])
    boxes, matched = match_teacher_view(seen, scores, gt, (10, 20), flipped=True)
    assert boxes.tolist() == [[2.0, 0.0, 8.0, 10.0], [16.0, 0.0, 20.0, 4.0]]  # x -> 20 - x
    assert matched.tolist() == [0]  # IoU 1 after mirroring
    boxes, matched = match_teacher_view(seen, scores, gt, (10, 20), flipped=False)
    assert torch.equal(boxes, seen) and matched.tolist() == [-1]  # unmirrored: IoU 0 with the GT box
    _, matched = match_teacher_view(seen, torch.tensor([0.01, 0.9]), gt, (10, 20), flipped=True, score_threshold=0.05)
    assert matched.tolist() == [-1]  # below the score threshold


def test_merge_teacher_views_by_hand():
    # 3 GT boxes, 2 views: box 0 matched in both, box 1 only in the flipped view, box 2 in none.
    plain = (
        torch.tensor([0.2, 0.0, 0.0]).view(3, 1, 1).expand(3, 2, 2),
        torch.tensor([0.6, 0.0, 0.0]),
        torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        torch.tensor([True, False, False]),
    )
    flipped = (
        torch.tensor([0.8, 0.7, 0.0]).view(3, 1, 1).expand(3, 2, 2),
        torch.tensor([0.4, 0.9, 0.0]),
        torch.tensor([[2.0, 0.0, 6.0, 4.0], [1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]]),
        torch.tensor([True, True, False]),
    )
    probs, scores, boxes, has = merge_teacher_views([plain, flipped])
    assert probs[:, 0, 0].tolist() == pytest.approx([0.5, 0.7, 0.0])  # (0.2 + 0.8) / 2; the one view; none
    assert scores.tolist() == pytest.approx([0.5, 0.9, 0.0])
    assert boxes.tolist() == [[1.0, 0.0, 5.0, 4.0], [1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]]  # exact halves
    assert has.tolist() == [True, True, False]
    assert merge_teacher_views([plain]) is plain  # without the flip: the view itself


def test_pseudo_mask_targets_pad_subsample_crop_binarise():
    teacher = torch.zeros(1, 10, 10)
    teacher[0, 2, 2] = 0.7  # sampled, inside the box
    teacher[0, 6, 2] = 0.4  # sampled, inside the box, below 0.5
    teacher[0, 2, 6] = 0.9  # sampled, outside the box (cols 0:6)
    teacher[0, 3, 3] = 1.0  # not a sampled pixel
    soft, binary = pseudo_mask_targets(teacher, torch.tensor([[0.0, 0.0, 5.0, 9.0]]), (16, 16))
    assert soft.shape == binary.shape == (1, 4, 4)
    expected_soft = torch.zeros(4, 4)
    expected_soft[0, 0], expected_soft[1, 0] = 0.7, 0.4
    assert torch.allclose(soft[0], expected_soft)
    expected_binary = torch.zeros(4, 4)
    expected_binary[0, 0] = 1.0
    assert torch.equal(binary[0], expected_binary)
    with pytest.raises(ValueError):
        pseudo_mask_targets(torch.zeros(1, 20, 4), torch.zeros(1, 4), (16, 16))


# ---------------------------------------------------------------- affinity


def _column_mask():
    p = torch.zeros(1, 1, 3, 3)
    p[0, 0, :, 1] = 1.0
    return p


REFINED = torch.tensor([[1 / 9, 11 / 18, 1 / 9], [1 / 6, 2 / 3, 1 / 6], [1 / 9, 11 / 18, 1 / 9]])


def test_refine_pseudo_masks_3x3():
    # (avg3x3 with zero padding counted + p) / 2; e.g. centre: (3/9 + 1) / 2 = 2/3
    assert torch.allclose(refine_pseudo_masks(_column_mask())[0, 0], REFINED)


def _same(a: float, b: float) -> float:
    return a * b + (1 - a) * (1 - b)


def test_pseudo_affinity_3x3():
    refined = refine_pseudo_masks(_column_mask())
    aff = pseudo_affinity(refined, None, kernel_size=3, dilation=1)
    assert aff.shape == (1, 8, 3, 3)
    centre = [_same(2 / 3, v) for v in REFINED.flatten().tolist()[:4] + REFINED.flatten().tolist()[5:]]
    assert aff[0, :, 1, 1].tolist() == pytest.approx(centre, abs=1e-6)  # 10/27, 29/54, 10/27, 7/18, ...
    assert aff[0, 1, 1, 1].item() == pytest.approx(29 / 54)
    assert aff[0, 0, 0, 0].item() == 0.0  # neighbour outside the map
    valid = torch.ones(1, 1, 3, 3)
    valid[..., 2] = 0.0  # column 2 invalid
    masked = pseudo_affinity(refined, valid, kernel_size=3, dilation=1)
    assert masked[0, 4, 1, 1].item() == 0.0 and masked[0, 3, 1, 1].item() == pytest.approx(7 / 18)
    # dilation 2 on 3x3: only the corners see each other; (0,0) -> (0,2): 1/81 + 64/81
    d2 = pseudo_affinity(refined, None, kernel_size=3, dilation=2)
    assert d2[0, 4, 0, 0].item() == pytest.approx(65 / 81)
    assert d2[0, :, 1, 1].sum().item() == 0.0


def _affinity_case():
    probs = torch.full((3, 3), 0.2)
    probs[1, 1], probs[0, 1], probs[2, 1] = 0.9, 0.7, 0.6
    logits = torch.log(probs / (1 - probs)).view(1, 1, 3, 3)
    aff = pseudo_affinity(refine_pseudo_masks(_column_mask()), None, kernel_size=3, dilation=1)
    box = torch.zeros(1, 3, 3)
    box[0, 1, 1] = 1.0  # only the centre pixel's edges; A > 0.5 for (0,1) and (2,1) only
    return logits, aff, box


def test_affinity_loss_authors_and_paper_modes_by_hand():
    logits, aff, box = _affinity_case()
    authors = affinity_loss(logits, aff, box, threshold=0.5, mode="authors", dilation=1)
    expected_authors = (-math.log(0.9 * 0.7 + 0.1 * 0.3) - math.log(0.9 * 0.6 + 0.1 * 0.4)) / 2
    assert authors.shape == (1,)
    assert authors.item() == pytest.approx(expected_authors, abs=1e-5)
    paper = affinity_loss(logits, aff, box, threshold=0.5, mode="paper", dilation=1)
    expected_paper = (-(math.log(0.9 * 0.7) + math.log(0.1 * 0.3)) - (math.log(0.9 * 0.6) + math.log(0.1 * 0.4))) / 2
    assert paper.item() == pytest.approx(expected_paper, abs=1e-4)
    # "label": both selected edges join foreground pixels (refined centre column 2/3 > 0.5)
    refined = refine_pseudo_masks(_column_mask())
    label = affinity_loss(logits, aff, box, threshold=0.5, mode="label", dilation=1, refined=refined)
    assert label.item() == pytest.approx((-math.log(0.9 * 0.7) - math.log(0.9 * 0.6)) / 2, abs=1e-5)
    # a background pair: flip everything (labels and probabilities) -> the same value
    flipped = affinity_loss(-logits, aff, box, threshold=0.5, mode="label", dilation=1, refined=1 - refined)
    assert flipped.item() == pytest.approx(label.item(), abs=1e-5)
    with pytest.raises(ValueError, match="refined"):
        affinity_loss(logits, aff, box, mode="label", dilation=1)
    # A = 7/18 ~ 0.389 edges join when the threshold drops below it: 4 more edges
    low = affinity_loss(logits, aff, box, threshold=0.38, mode="authors", dilation=1)
    extra = 2 * -math.log(0.9 * 0.2 + 0.1 * 0.8)
    assert low.item() == pytest.approx((2 * expected_authors + extra) / 4, abs=1e-5)
    with pytest.raises(ValueError):
        affinity_loss(logits, aff, box, mode="literal")


def test_affinity_loss_empty_edges_is_zero_with_finite_grad():
    logits, aff, _ = _affinity_case()
    logits.requires_grad_(True)
    loss = affinity_loss(logits, aff, torch.zeros(1, 3, 3), dilation=1)
    assert loss.item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- noise-aware loss


def _noise_aware_inputs(k=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, 1, size, size, generator=g)
    soft = torch.zeros(k, size, size)
    soft[:, 2:6, 2:6] = 0.8
    binary = (soft > 0.5).float()
    box = torch.zeros(k, size, size)
    box[:, 1:7, 1:7] = 1.0
    return logits, binary, soft, box


def test_noise_aware_loss_weights_and_normaliser():
    logits, binary, soft, box = _noise_aware_inputs()
    logits.requires_grad_(True)
    weights = torch.tensor([0.5, 0.0])
    out = noise_aware_pseudo_mask_loss(logits, binary, soft, weights, box, affinity_mode="authors")
    dice0 = dice_loss(logits[:1].sigmoid(), binary[:1]).item()
    refined = refine_pseudo_masks(soft[:1, None])
    aff0 = affinity_loss(logits[:1], pseudo_affinity(refined), box[:1], mode="authors").item()
    # N_p = 1 (one positive weight): 0.5 * (0.5 * dice0) and 0.1 * (0.5 * aff0)
    assert out["loss_pseudo_pixel"].item() == pytest.approx(0.5 * 0.5 * dice0, rel=1e-5)
    assert out["loss_pseudo_affinity"].item() == pytest.approx(0.1 * 0.5 * aff0, rel=1e-5)
    # the unmatched proposal contributes nothing and gets no gradient
    (out["loss_pseudo_pixel"] + out["loss_pseudo_affinity"]).backward()
    assert logits.grad[1].abs().sum().item() == 0.0 and logits.grad[0].abs().sum().item() > 0
    # two positive weights: N_p = 2
    both = noise_aware_pseudo_mask_loss(logits, binary, soft, torch.tensor([0.5, 0.25]), box, use_affinity=False)
    dice1 = dice_loss(logits[1:].sigmoid(), binary[1:]).item()
    assert both["loss_pseudo_pixel"].item() == pytest.approx(0.5 * (0.5 * dice0 + 0.25 * dice1) / 2, rel=1e-5)
    assert both["loss_pseudo_affinity"].item() == 0.0


def test_noise_aware_loss_options_and_warmup():
    logits, binary, soft, box = _noise_aware_inputs()
    w = torch.tensor([1.0, 1.0])
    cold = noise_aware_pseudo_mask_loss(logits, binary, soft, w, box, warmup=0.0)
    assert cold["loss_pseudo_pixel"].item() == 0.0 and cold["loss_pseudo_affinity"].item() == 0.0
    half = noise_aware_pseudo_mask_loss(logits, binary, soft, w, box, warmup=0.5)
    full = noise_aware_pseudo_mask_loss(logits, binary, soft, w, box, warmup=1.0)
    assert half["loss_pseudo_pixel"].item() == pytest.approx(0.5 * full["loss_pseudo_pixel"].item())
    bce = noise_aware_pseudo_mask_loss(logits, binary, soft, w, box, pixel_loss="bce", use_affinity=False)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], binary).item()
    assert bce["loss_pseudo_pixel"].item() == pytest.approx(0.5 * expected, rel=1e-5)
    none = noise_aware_pseudo_mask_loss(logits, binary, soft, w, box, pixel_loss="none")
    assert none["loss_pseudo_pixel"].item() == 0.0 and none["loss_pseudo_affinity"].item() > 0
    with pytest.raises(ValueError):
        noise_aware_pseudo_mask_loss(logits, binary, soft, w, box, pixel_loss="l1")


def test_noise_aware_loss_empty_is_zero_on_graph():
    logits = torch.zeros(0, 1, 8, 8, requires_grad=True)
    empty = torch.zeros(0, 8, 8)
    out = noise_aware_pseudo_mask_loss(logits, empty, empty, torch.zeros(0), empty)
    assert set(out) == {"loss_pseudo_pixel", "loss_pseudo_affinity"}
    assert all(v.item() == 0.0 and v.requires_grad for v in out.values())
    sum(out.values()).backward()


@pytest.mark.parametrize("mode", ["paper", "authors"])
def test_pseudo_losses_finite_at_probabilities_exactly_zero_and_one(mode):
    logits, binary, soft, box = _noise_aware_inputs()
    extreme = torch.where(logits > 0, torch.tensor(200.0), torch.tensor(-200.0))
    extreme[0, 0, 0, :4] = torch.tensor([float("inf"), -float("inf"), float("inf"), -float("inf")])
    extreme.requires_grad_(True)
    assert extreme.sigmoid().detach().eq(0).any() and extreme.sigmoid().detach().eq(1).any()
    box = torch.ones_like(box)  # every edge with A > 0.5 counts, including disagreeing pixels
    for pixel_loss in ("dice", "bce"):
        out = noise_aware_pseudo_mask_loss(extreme, binary, soft, torch.tensor([0.7, 0.3]), box, pixel_loss=pixel_loss, affinity_mode=mode)
        total = out["loss_pseudo_pixel"] + out["loss_pseudo_affinity"]
        assert torch.isfinite(total) and total.item() > 0
        extreme.grad = None
        total.backward()
        assert torch.isfinite(extreme.grad).all()
