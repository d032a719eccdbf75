"""Hand-checked tests for training/losses.py (BoxInst box-supervised losses)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import logit

from training.losses import (
    box_masks,
    box_prior_loss,
    boxinst_losses,
    color_similarity,
    dice_loss,
    image_color_similarity,
    image_valid_mask,
    linear_cooldown,
    linear_warmup,
    log_same_label_probability,
    outside_box_loss,
    pairwise_loss,
    pairwise_weights,
    projection_bce_loss,
    projection_loss,
    restrict_to_image,
    rgb_to_lab,
    unfold_neighbours,
)

# ---------------------------------------------------------------- dice


def test_dice_loss_hand_case():
    probs = torch.tensor([[1.0, 0.0, 1.0, 0.5], [1.0, 1.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    loss = dice_loss(probs, targets)
    # instance 0: sum(ab) = 1, sum(a^2) = 2.25, sum(b^2) = 2 -> 1 - 2 / 4.25
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(1.0 - 2.0 / 4.25, abs=1e-5)
    assert loss[1].item() == pytest.approx(0.0, abs=1e-5)


def test_dice_loss_flattens_per_instance_and_empty():
    probs = torch.rand(3, 1, 4, 5)
    targets = (torch.rand(3, 4, 5) > 0.5).float()
    flat = dice_loss(probs.reshape(3, -1), targets.reshape(3, -1))
    assert torch.allclose(dice_loss(probs, targets), flat)
    assert dice_loss(torch.zeros(0, 4, 4), torch.zeros(0, 4, 4)).shape == (0,)
    # two all-zero maps: 1 - 0 / eps = 1, not NaN
    assert dice_loss(torch.zeros(1, 4), torch.zeros(1, 4)).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- box masks


def _box_masks_reference(boxes, height, width, stride):
    start = stride // 2
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        full = torch.zeros(height, width)
        full[max(int(y1), 0) : int(y2 + 1), max(int(x1), 0) : int(x2 + 1)] = 1.0
        out.append(full[start::stride, start::stride])
    return torch.stack(out)


def test_box_masks_border_box():
    # cols int(10.5)=10 : int(16.99)=16 -> sampled cols {10, 14} -> indices 2, 3
    # rows 3 : 16 -> sampled rows {6, 10, 14} -> indices 1, 2, 3
    masks = box_masks(torch.tensor([[10.5, 3.0, 15.99, 15.99]]), 16, 16, stride=4)
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    assert masks.shape == (1, 4, 4) and masks.dtype == torch.float32
    assert torch.equal(masks[0], expected)
    # a box beyond the image on every side covers everything; negative starts clamp to 0
    full = box_masks(torch.tensor([[-3.0, -1.0, 20.0, 20.0], [-3.0, -1.0, 2.0, 2.0]]), 16, 16)
    assert torch.equal(full[0], torch.ones(4, 4))
    assert full[1].sum() == 1 and full[1, 0, 0] == 1


def test_box_masks_sub_pixel_boxes():
    # rows int(6.1)=6 : int(7.8)=7 -> row 6; cols int(5.9)=5 : int(7.4)=7 -> cols 5, 6
    box = torch.tensor([[5.9, 6.1, 6.4, 6.8]])
    full = box_masks(box, 16, 16, stride=1)
    assert full.sum() == 2 and full[0, 6, 5] == 1 and full[0, 6, 6] == 1
    at4 = box_masks(box, 16, 16, stride=4)
    assert at4.sum() == 1 and at4[0, 1, 1] == 1  # input pixel (6, 6) = stride-4 pixel (1, 1)
    # a sub-pixel box that misses every sampled pixel is empty at stride 4
    tiny = torch.tensor([[0.2, 0.2, 0.7, 0.7]])
    assert box_masks(tiny, 16, 16, stride=1).sum() == 1
    assert box_masks(tiny, 16, 16, stride=4).sum() == 0


def test_box_masks_matches_slicing_reference_and_empty():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 30
    wh = torch.rand(20, 2, generator=g) * 12
    boxes = torch.cat([xy, xy + wh], dim=1)
    for stride in (1, 4, 8):
        assert torch.equal(box_masks(boxes, 32, 40, stride), _box_masks_reference(boxes, 32, 40, stride))
    assert box_masks(torch.zeros(0, 4), 32, 40).shape == (0, 8, 10)


# ---------------------------------------------------------------- projection


def test_projection_loss_perfect_box_prediction_is_zero():
    masks = box_masks(torch.tensor([[4.0, 8.0, 20.0, 15.0]]), 32, 32)
    assert projection_loss(masks[:, None], masks).item() == pytest.approx(0.0, abs=1e-5)


def test_projection_loss_hand_4x4():
    box = torch.zeros(1, 4, 4)
    box[0, 1:3, 1:3] = 1.0
    probs = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.8, 0.2, 0.0], [0.0, 0.6, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]])
    # max over y: [0, .8, .2, .5] vs [0,1,1,0]: 1 - 2*1.0 / (0.93 + 2)
    # max over x: [0, .8, .6, 0] vs [0,1,1,0]: 1 - 2*1.4 / (1.00 + 2)
    expected = (1 - 2.0 / 2.93) + (1 - 2.8 / 3.0)
    loss = projection_loss(probs, box)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert torch.allclose(projection_loss(probs[:, None], box), loss)


# ---------------------------------------------------------------- LAB and colour similarity


def _pixels(*rgb):
    """(3, 1, len) uint8 image from RGB triples."""
    return torch.tensor(rgb, dtype=torch.uint8).T.reshape(3, 1, len(rgb))


def test_rgb_to_lab_known_colours():
    lab = rgb_to_lab(_pixels((255, 0, 0), (255, 255, 255), (0, 0, 0), (128, 128, 128), (127, 127, 127)))
    lab = lab[:, 0].T  # (5, 3)
    assert lab.dtype == torch.float32
    assert lab[0].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.01)  # red
    assert lab[1].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.01)  # white
    assert lab[2].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)  # black
    assert lab[3].tolist() == pytest.approx([53.59, 0.0, 0.0], abs=0.01)  # grey 128
    assert lab[4].tolist() == pytest.approx([53.19, 0.0, 0.0], abs=0.01)  # grey 127


def test_rgb_to_lab_float_and_batched_inputs_agree():
    img = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from_uint8 = rgb_to_lab(img)
    assert from_uint8.shape == (2, 3, 4, 5)
    assert torch.allclose(rgb_to_lab(img.float() / 255.0), from_uint8, atol=1e-4)
    # batched and single-image arithmetic may round differently (measured up to 3e-5 in L*a*b*
    # units, 0-100): a relative-only tolerance fails on values near 0
    assert torch.allclose(rgb_to_lab(img[1]), from_uint8[1], atol=1e-4)
    with pytest.raises(ValueError):
        rgb_to_lab(torch.zeros(4, 2, 2))


def test_unfold_neighbours_order_and_zero_padding():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    n = unfold_neighbours(x, kernel_size=3, dilation=1)
    assert n.shape == (1, 1, 8, 3, 3)
    assert n[0, 0, :, 1, 1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert n[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0, 1, 0, 3, 4]
    y = torch.arange(25.0).reshape(1, 1, 5, 5)
    d2 = unfold_neighbours(y, kernel_size=3, dilation=2)
    assert d2[0, 0, :, 2, 2].tolist() == [0, 2, 4, 10, 14, 20, 22, 24]
    assert d2[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0, 2, 0, 10, 12]


def test_color_similarity_two_known_colours():
    # LAB: grey 128 = (53.59, 0, 0), grey 127 = (53.19, 0, 0): S = exp(-0.40 / 2) ~ 0.82
    lab = rgb_to_lab(_pixels((128, 128, 128), (0, 0, 0), (127, 127, 127)))[None]  # (1,3,1,3)
    sim = color_similarity(lab, kernel_size=3, dilation=2, theta=2.0)
    assert sim.shape == (1, 8, 1, 3)
    # neighbour 4 = offset (0, +2): pixel 0 vs pixel 2; neighbour 3 = (0, -2): pixel 2 vs pixel 0
    assert sim[0, 4, 0, 0].item() == pytest.approx(math.exp(-(53.585 - 53.193) / 2), abs=2e-3)
    assert sim[0, 4, 0, 0].item() == pytest.approx(0.822, abs=3e-3)
    assert sim[0, 3, 0, 2].item() == pytest.approx(sim[0, 4, 0, 0].item(), abs=1e-6)
    # red vs white: ||(46.76, -80.09, -67.20)|| = 114.5 -> exp(-57.3) ~ 1e-25
    lab2 = rgb_to_lab(_pixels((255, 0, 0), (0, 0, 0), (255, 255, 255)))[None]
    assert color_similarity(lab2)[0, 4, 0, 0].item() < 1e-20
    # same colour -> 1
    lab3 = rgb_to_lab(_pixels((10, 200, 30), (0, 0, 0), (10, 200, 30)))[None]
    assert color_similarity(lab3)[0, 4, 0, 0].item() == pytest.approx(1.0)


def test_image_color_similarity_pipeline():
    grey128 = torch.tensor([128, 128, 128], dtype=torch.uint8)
    img = grey128.view(1, 3, 1, 1).repeat(1, 1, 16, 16)
    img[0, :, 0:4, 8:12] = 127  # block (0, 2): grey 127
    img[0, :, 8:12, 0:4] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)  # block (2, 0): red
    # block (2, 2): 4 pixels of 128, 12 of 129 -> mean 128.75 -> floor -> 128 (same as grey 128)
    img[0, :, 8:12, 8:12] = 129
    img[0, :, 8:12:2, 8:12:2] = 128
    valid = image_valid_mask(16, 12, 16, 16)  # columns 12..15 are padding
    sim = image_color_similarity(img, valid[None], stride=4)
    assert sim.shape == (1, 8, 4, 4)
    assert sim[0, 4, 0, 0].item() == pytest.approx(0.822, abs=3e-3)  # grey 128 vs grey 127
    assert sim[0, 6, 0, 0].item() < 1e-20  # grey vs red
    assert sim[0, 4, 0, 1].item() == 0.0  # neighbour block (0, 3) is padding
    assert sim[0, 6, 1, 1].item() == pytest.approx(1.0)  # grey vs grey, both valid
    assert sim[0, 0, 1, 1].item() == 0.0  # neighbour (-1, -1) is outside the map
    assert sim[0, 0, 2, 2].item() == pytest.approx(1.0)  # floored checkerboard == grey 128
    assert sim[0, 7, 2, 2].item() == 0.0  # neighbour outside the map
    # float images holding 0..255 values give the same result
    assert torch.allclose(image_color_similarity(img.float(), valid, stride=4), sim)


def test_image_valid_mask_bottom_rows():
    mask = image_valid_mask(6, 5, 8, 8, bottom_rows_removed=2)
    assert mask.shape == (8, 8)
    assert mask[:4, :5].eq(1).all() and mask.sum() == 20


# ---------------------------------------------------------------- pairwise


def test_pairwise_loss_hand_case():
    # 1x5 map; dilation 2 links pixel 0 <-> 2 and 2 <-> 4
    p = [0.8, 0.5, 0.3, 0.5, 0.5]
    logits = torch.tensor([logit(v) for v in p]).view(1, 1, 1, 5)
    weights = torch.zeros(1, 8, 1, 5)
    weights[0, 4, 0, 0] = 1.0  # pixel 0 -> pixel 2: P(same) = .8*.3 + .2*.7 = .38
    weights[0, 4, 0, 2] = 1.0  # pixel 2 -> pixel 4: P(same) = .3*.5 + .7*.5 = .5
    expected = (-math.log(0.38) + math.log(2.0)) / 2
    assert pairwise_loss(logits, weights).item() == pytest.approx(expected, abs=1e-5)
    # the normaliser is max(sum w, 1): one edge with weight 0.5 -> 0.5 * loss
    half = torch.zeros(1, 8, 1, 5)
    half[0, 4, 0, 0] = 0.5
    assert pairwise_loss(logits, half).item() == pytest.approx(-0.5 * math.log(0.38), abs=1e-5)
    log_same = log_same_label_probability(logits)
    assert log_same[0, 4, 0, 0].item() == pytest.approx(math.log(0.38), abs=1e-6)
    assert log_same[0, 3, 0, 2].item() == pytest.approx(math.log(0.38), abs=1e-6)


def test_pairwise_weights_threshold_and_box():
    sim = torch.tensor([0.29, 0.3, 0.9]).view(1, 1, 1, 3).repeat(1, 8, 1, 1)
    box = torch.tensor([[[1.0, 1.0, 0.0]]])
    w = pairwise_weights(sim, box, threshold=0.3)
    assert w.shape == (1, 8, 1, 3)
    assert w[0, :, 0].tolist() == [[0.0, 1.0, 0.0]] * 8
    # one image's similarity broadcasts to several instances
    assert pairwise_weights(sim, box.repeat(3, 1, 1)).shape == (3, 8, 1, 3)


def test_pairwise_loss_extreme_and_empty():
    logits = torch.tensor([200.0, float("inf"), -200.0, -float("inf")] * 4).view(1, 1, 4, 4)
    logits.requires_grad_(True)
    loss = pairwise_loss(logits, torch.ones(1, 8, 4, 4))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10  # disagreeing neighbours, capped by the floor
    assert torch.isfinite(logits.grad).all()
    empty = torch.zeros(0, 1, 4, 4, requires_grad=True)
    zero = pairwise_loss(empty, torch.zeros(0, 8, 4, 4))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()


# ---------------------------------------------------------------- warm-up and combination


def test_linear_warmup():
    assert linear_warmup(0, 10000) == 0.0
    assert linear_warmup(5000, 10000) == 0.5
    assert linear_warmup(10000, 10000) == 1.0
    assert linear_warmup(20000, 10000) == 1.0
    assert linear_warmup(3, 0) == 1.0
    assert linear_warmup(-5, 100) == 0.0


def test_boxinst_losses_warmup_and_empty():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 15.0, 15.0], [8.0, 4.0, 30.0, 20.0], [2.0, 2.0, 9.0, 30.0]])
    masks = box_masks(boxes, 32, 32)
    sim = torch.rand(3, 8, 8, 8)
    at0 = boxinst_losses(logits, masks, sim, iteration=0)
    full = boxinst_losses(logits, masks, sim, iteration=10000)
    assert at0["loss_pairwise"].item() == 0.0
    assert full["loss_pairwise"].item() == pytest.approx(pairwise_loss(logits, pairwise_weights(sim, masks)).item(), rel=1e-6)
    assert full["loss_prj"].item() == pytest.approx(projection_loss(logits.sigmoid(), masks).mean().item(), rel=1e-6)
    (full["loss_prj"] + full["loss_pairwise"]).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    empty = torch.zeros(0, 1, 8, 8, requires_grad=True)
    out = boxinst_losses(empty, torch.zeros(0, 8, 8), torch.zeros(0, 8, 8, 8), iteration=5)
    assert all(v.item() == 0.0 and v.requires_grad for v in out.values())


def test_linear_cooldown():
    assert linear_cooldown(0, 200) == 1.0
    assert linear_cooldown(50, 200) == 0.75
    assert linear_cooldown(200, 200) == 0.0
    assert linear_cooldown(500, 200) == 0.0
    assert linear_cooldown(-3, 200) == 1.0
    assert linear_cooldown(0, 0) == 0.0  # no prior


def test_box_prior_loss_hand_case():
    # one 2x2 map, box = left column; logits 0 (p = 1/2) everywhere except x_11 = ln 3 (p = 3/4)
    logits = torch.tensor([[[[0.0, 0.0], [0.0, math.log(3.0)]]]], requires_grad=True)
    box = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # dice = 1 - 2 * (1/2 + 1/2) / ((1/4 + 1/4 + 1/4 + 9/16) + 2) = 1 - 2 / (53/16) = 21/53
    loss = box_prior_loss(logits, box)
    assert loss.shape == (1,) and loss.item() == pytest.approx(21 / 53, rel=1e-5)
    loss.sum().backward()
    assert logits.grad[0, 0, 0, 0] < 0 and logits.grad[0, 0, 1, 1] > 0  # inside pulled up, outside down
    assert box_prior_loss(torch.full((1, 1, 2, 2), 30.0), torch.ones(1, 2, 2)).item() == pytest.approx(0.0, abs=1e-5)


def test_boxinst_losses_box_prior_falls_to_zero():
    logits = torch.zeros(1, 1, 2, 2)
    box = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    sim = torch.ones(1, 8, 2, 2)
    dice = 1 - 2 * 1.0 / (1.0 + 2.0)  # p = 1/2 everywhere: sum p*b = 1, sum p^2 = 1, sum b^2 = 2
    at = {t: boxinst_losses(logits, box, sim, iteration=t, box_prior_weight=2.0, box_prior_iters=100) for t in (0, 25, 100)}
    assert at[0]["loss_box_prior"].item() == pytest.approx(2.0 * dice, rel=1e-5)
    assert at[25]["loss_box_prior"].item() == pytest.approx(2.0 * 0.75 * dice, rel=1e-5)
    assert at[100]["loss_box_prior"].item() == 0.0
    assert "loss_box_prior" not in boxinst_losses(logits, box, sim, iteration=0, box_prior_weight=2.0)  # no iterations: off
    empty = boxinst_losses(torch.zeros(0, 1, 2, 2), torch.zeros(0, 2, 2), sim[:0], 0, box_prior_weight=1, box_prior_iters=10)
    assert empty["loss_box_prior"].item() == 0.0


def test_outside_box_loss_hand_case():
    # logits [[0, ln 3], [-ln 3, 2]], box = the top-left pixel: three pixels outside
    logits = torch.tensor([[[[0.0, math.log(3.0)], [-math.log(3.0), 2.0]]]], requires_grad=True)
    box = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # softplus(ln 3) = ln 4, softplus(-ln 3) = ln(4/3), softplus(2) = ln(1 + e^2)
    expected = (math.log(4.0) + math.log(4.0 / 3.0) + math.log(1.0 + math.e**2)) / 3.0
    loss = outside_box_loss(logits, box)
    assert loss.shape == (1,) and loss.item() == pytest.approx(expected, rel=1e-6)
    # padding at the bottom-right pixel: the mean over the two outside image pixels
    valid = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    assert outside_box_loss(logits, box, valid).item() == pytest.approx(math.log(16.0 / 3.0) / 2.0, rel=1e-6)
    # the gradient is sigmoid(x) / count outside the box, 0 inside: it does not vanish when saturated
    loss.backward()
    assert logits.grad[0, 0, 0, 0].item() == 0.0
    assert logits.grad[0, 0, 1, 1].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item() / 3.0, rel=1e-6)
    saturated = torch.full((1, 1, 2, 2), 30.0, requires_grad=True)
    outside_box_loss(saturated, box).sum().backward()
    assert saturated.grad[0, 0, 1, 1].item() == pytest.approx(1.0 / 3.0, rel=1e-6)
    # a box over the whole map: nothing outside, loss 0
    assert outside_box_loss(logits.detach(), torch.ones(1, 2, 2)).item() == 0.0


def test_projection_bce_loss_hand_case():
    # logits [[0, ln 3], [-ln 3, 2]], box = the top-left pixel
    logits = torch.tensor([[[[0.0, math.log(3.0)], [-math.log(3.0), 2.0]]]])
    box = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # columns: max 0 (target 1) -> ln 2; max 2 (target 0) -> ln(1 + e^2)
    # rows:    max ln 3 (target 1) -> ln 4 - ln 3; max 2 (target 0) -> ln(1 + e^2)
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2.0 + math.log(1.0 + math.e**2)
    loss = projection_bce_loss(logits, box)
    assert loss.shape == (1,) and loss.item() == pytest.approx(expected, rel=1e-6)
    # a mask saturated to empty still gets a full pull on its box's row and column maxima
    empty = torch.tensor([[[[-30.0, -31.0], [-32.0, -33.0]]]], requires_grad=True)
    projection_bce_loss(empty, box).sum().backward()
    # (0, 0) is the max of column 0 and of row 0, both inside the box: -1/2 from each mean
    assert empty.grad[0, 0, 0, 0].item() == pytest.approx(-1.0, rel=1e-6)


def test_projections_in_the_image_ignore_the_padding():
    """With projection_in_image, the projection terms on a padded canvas equal those on the
    image alone (padding at the right and bottom), whatever the padding holds."""
    torch.manual_seed(0)
    image_logits = torch.randn(2, 1, 3, 4) * 3
    image_boxes = box_masks(torch.tensor([[0.0, 0.0, 6.0, 5.0], [5.0, 2.0, 15.0, 11.0]]), 12, 16)  # (2, 3, 4)
    padded = torch.full((2, 1, 5, 6), 50.0)  # the padding "paints" every row and column
    padded[:, :, :3, :4] = image_logits
    padded_boxes = torch.zeros(2, 5, 6)
    padded_boxes[:, :3, :4] = image_boxes
    valid = torch.zeros(1, 5, 6)
    valid[:, :3, :4] = 1.0
    sim = torch.ones(2, 8, 5, 6)
    on_image = boxinst_losses(image_logits, image_boxes, sim[..., :3, :4], 0, projection_bce_weight=1.0)
    restricted = boxinst_losses(padded, padded_boxes, sim, 0, valid=valid, projection_bce_weight=1.0, projection_in_image=True)
    canvas = boxinst_losses(padded, padded_boxes, sim, 0, valid=valid, projection_bce_weight=1.0)
    for key in ("loss_prj", "loss_prj_bce"):
        assert restricted[key].item() == pytest.approx(on_image[key].item(), rel=1e-5)
        assert canvas[key].item() != pytest.approx(on_image[key].item(), rel=1e-2)  # BoxInst's canvas sees the paint
    masked = restrict_to_image(padded, valid)
    assert torch.equal(masked[:, :, :3, :4], image_logits) and (masked[:, :, 3:] == -1e4).all()


def test_boxinst_losses_outside_term_only_when_weighted():
    logits = torch.zeros(1, 1, 2, 2)
    box = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    sim = torch.ones(1, 8, 2, 2)
    plain = boxinst_losses(logits, box, sim, iteration=0)
    assert set(plain) == {"loss_prj", "loss_pairwise"}
    out = boxinst_losses(logits, box, sim, iteration=0, outside_weight=0.5, projection_bce_weight=2.0)
    assert out["loss_outside"].item() == pytest.approx(0.5 * math.log(2.0), rel=1e-6)  # softplus(0) = ln 2
    assert out["loss_prj_bce"].item() == pytest.approx(2.0 * projection_bce_loss(logits, box).item(), rel=1e-6)
    assert set(boxinst_losses(torch.zeros(0, 1, 2, 2), torch.zeros(0, 2, 2), sim[:0], 0, outside_weight=1, projection_bce_weight=1)) == {
        "loss_prj",
        "loss_pairwise",
        "loss_outside",
        "loss_prj_bce",
    }


def test_losses_finite_at_probabilities_exactly_zero_and_one():
    logits = torch.tensor([[200.0, -200.0], [-200.0, 200.0]]).repeat(2, 2).view(1, 1, 4, 4)
    logits.requires_grad_(True)
    probs = logits.sigmoid()
    assert probs.detach().eq(0).any() and probs.detach().eq(1).any()
    box = torch.ones(1, 4, 4)
    total = dice_loss(probs, box).sum() + projection_loss(probs, box).sum() + pairwise_loss(logits, torch.ones(1, 8, 4, 4))
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(logits.grad).all()
