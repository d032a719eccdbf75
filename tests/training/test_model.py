"""CondInst pieces against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import conditioned_model, tiny_config

from training.config import ConfigError, FCOSConfig, load_config
from training.model.fcos import (
    assign_targets_single,
    centerness_target,
    compute_locations,
    fcos_losses,
    giou_loss_ltrb,
    level_size_ranges,
    non_max_suppression,
)
from training.model.mask_head import aligned_bilinear, dynamic_param_count, relative_coordinates, run_dynamic_head, split_dynamic_params
from training.model.processing import (
    normalize_and_pad,
    paste_mask_in_box,
    paste_masks,
    paste_matrix,
    paste_windows,
    resized_size,
    scale_boxes,
)


def test_locations_and_size_ranges():
    loc = compute_locations(2, 3, 8)
    assert loc.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert level_size_ranges([64, 128]) == [(-1.0, 64.0), (64.0, 128.0), (128.0, 1e8)]


def _assign(locations, levels, boxes, radius=1.5, strides=(8, 16), soi=(64,)):
    labels = torch.arange(len(boxes))
    return assign_targets_single(locations, levels, boxes, labels, 5, list(strides), list(soi), radius)


def test_fcos_centre_sampling_radius():
    # A 40x40 box centred at (50,50); stride 8, radius 1.5 -> centre region [38,62].
    boxes = torch.tensor([[30.0, 30.0, 70.0, 70.0]])
    locs = torch.tensor([[36.0, 50.0], [40.0, 50.0], [60.0, 50.0], [63.0, 50.0], [50.0, 50.0]])
    lab, reg, inds = _assign(locs, torch.zeros(5, dtype=torch.long), boxes)
    assert lab.tolist() == [5, 0, 0, 5, 0]  # 36 and 63 are inside the box but outside the centre region
    assert reg[1].tolist() == [10.0, 20.0, 30.0, 20.0]  # l, t, r, b from (40,50)
    # Without centre sampling every location inside the box is positive.
    lab, _, _ = _assign(locs, torch.zeros(5, dtype=torch.long), boxes, radius=0.0)
    assert lab.tolist() == [0, 0, 0, 0, 0]


def test_fcos_size_ranges_pick_the_level():
    # max(l,t,r,b) = 50 at the centre of a 100x100 box: level 0 (range -1..64), not level 1.
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    locs = torch.tensor([[50.0, 50.0], [50.0, 50.0]])
    lab, _, _ = _assign(locs, torch.tensor([0, 1]), boxes, radius=0.0)
    assert lab.tolist() == [0, 5]
    # A 200x200 box needs 100 at its centre: level 1 (64..inf).
    boxes = torch.tensor([[0.0, 0.0, 200.0, 200.0]])
    lab, _, _ = _assign(torch.tensor([[100.0, 100.0], [100.0, 100.0]]), torch.tensor([0, 1]), boxes, radius=0.0)
    assert lab.tolist() == [5, 0]


def test_fcos_ambiguity_goes_to_the_smallest_box():
    boxes = torch.tensor([[0.0, 0.0, 60.0, 60.0], [20.0, 20.0, 40.0, 40.0]])
    lab, reg, inds = _assign(torch.tensor([[30.0, 30.0]]), torch.zeros(1, dtype=torch.long), boxes, radius=0.0)
    assert lab.tolist() == [1] and inds.tolist() == [1]
    assert reg[0].tolist() == [10.0, 10.0, 10.0, 10.0]


def test_fcos_no_boxes_is_all_background():
    lab, reg, inds = _assign(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(0, 4))
    assert lab.tolist() == [5, 5, 5] and inds.tolist() == [-1, -1, -1] and reg.abs().sum() == 0


def test_centerness_target_by_hand():
    reg = torch.tensor([[10.0, 20.0, 30.0, 20.0], [5.0, 5.0, 5.0, 5.0]])
    expected = [math.sqrt((10 / 30) * (20 / 20)), 1.0]
    assert centerness_target(reg).tolist() == pytest.approx(expected)


def test_giou_loss_by_hand():
    # Same location; target l,t,r,b = 2,2,2,2 (4x4), prediction 1,1,1,1 (2x2) inside it.
    # I = 4, U = 16, IoU = (4+1)/(16+1) = 5/17, enclosing = 16 -> GIoU = IoU, loss = 12/17.
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    assert giou_loss_ltrb(pred, target).item() == pytest.approx(12 / 17)
    # Prediction 4,0,0,0 has zero area: I = 0, U = 16, enclosing 6x4 = 24: GIoU = 1/17 - 8/24.
    pred = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    assert giou_loss_ltrb(pred, target).item() == pytest.approx(1 - (1 / 17 - 8 / 24))
    assert giou_loss_ltrb(pred, target, torch.tensor([0.5])).item() == pytest.approx(0.5 * (1 - (1 / 17 - 8 / 24)))


def test_focal_and_centerness_losses_by_hand():
    from training.model.fcos import FCOSTargets

    cfg = FCOSConfig()
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0]])  # 2 locations, 2 classes
    targets = FCOSTargets(
        labels=torch.tensor([2, 0]),  # location 0 background, location 1 class 0
        reg=torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]),
        gt_inds=torch.tensor([-1, 0]),
        ctrness=torch.tensor([0.0, 1.0]),
    )
    flat = {"cls_logits": logits, "bbox_reg": torch.ones(2, 4), "ctrness": torch.tensor([0.0, 0.0])}
    out = fcos_losses(flat, targets, 2, cfg)

    def focal(x, t, a=0.25, g=2.0):
        p = 1 / (1 + math.exp(-x))
        pt = p if t else 1 - p
        return -(a if t else 1 - a) * (1 - pt) ** g * math.log(pt)

    expected = focal(0, 0) * 2 + focal(2, 1) + focal(-1, 0)
    assert out["loss_fcos_cls"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss_fcos_ctr"].item() == pytest.approx(math.log(2), rel=1e-5)  # BCE(0 logit, 1)
    assert out["loss_fcos_loc"].item() == pytest.approx(0.0, abs=1e-6)  # perfect box


def test_dynamic_head_parameter_count():
    assert dynamic_param_count(8, 8, 3) == 169
    assert dynamic_param_count(16, 8, 3) == 233


def test_split_dynamic_params_layout():
    params = torch.arange(169, dtype=torch.float32)[None]
    weights, biases = split_dynamic_params(params, 8, 8, 3)
    assert [tuple(w.shape) for w in weights] == [(1, 8, 10), (1, 8, 8), (1, 1, 8)]
    assert weights[0][0, 0, :3].tolist() == [0, 1, 2] and weights[0][0, 1, 0] == 10  # row-major out x in
    assert weights[1][0, 0, 0] == 80 and weights[2][0, 0, 0] == 144
    assert biases[0][0, :, 0].tolist() == list(range(152, 160)) and biases[2].item() == 168


def test_batched_dynamic_head_equals_grouped_conv_and_loop():
    torch.manual_seed(0)
    n, cin, hw = 5, 10, 12
    inputs = torch.randn(n, cin, hw)
    params = torch.randn(n, 169)
    weights, biases = split_dynamic_params(params, 8, 8, 3)
    batched = run_dynamic_head(inputs, weights, biases)
    # AdelaiDet's grouped conv: (1, n*C, H, W) with groups = n.
    x = inputs.reshape(1, n * cin, hw, 1)
    for k, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w.reshape(-1, w.shape[2], 1, 1), b.reshape(-1), groups=n)
        if k < 2:
            x = F.relu(x)
    grouped = x.reshape(n, 1, hw)
    loop = []
    for i in range(n):
        y = inputs[i : i + 1, :, :, None]
        for k, (w, b) in enumerate(zip(weights, biases)):
            y = F.conv2d(y, w[i][:, :, None, None], b[i, :, 0])
            if k < 2:
                y = F.relu(y)
        loop.append(y[:, :, :, 0])
    assert torch.allclose(batched, grouped, atol=1e-5)
    assert torch.allclose(batched, torch.cat(loop), atol=1e-5)


def test_relative_coordinates_by_hand():
    rel = relative_coordinates(torch.tensor([[12.0, 4.0]]), (2, 2), 8, torch.tensor([64.0]))
    # pixels at (4,4), (12,4), (4,12), (12,12); rel = (instance - pixel) / 64
    assert rel[0, 0].tolist() == pytest.approx([8 / 64, 0, 8 / 64, 0])
    assert rel[0, 1].tolist() == pytest.approx([0, 0, -8 / 64, -8 / 64])


def test_aligned_bilinear_by_hand():
    x = torch.tensor([[[[0.0, 1.0]]]])  # 1x2 -> 2x4
    y = aligned_bilinear(x, 2)
    # pad right -> [0,1,1], align_corners to 3x5: [0,.5,1,1,1]; pad left 1 -> [0,0,.5,1,1,1]; crop 4
    assert y[0, 0, 0].tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])
    assert y.shape == (1, 1, 2, 4)


def test_paste_masks_back_and_scale_boxes():
    probs = torch.zeros(1, 8, 8)  # stride 4 on a 32x32 canvas
    probs[0, 2:4, 2:4] = 1.0
    out = paste_masks(probs, (30, 28), (60, 56))
    assert out.shape == (1, 60, 56)
    binary = out[0] > 0.5
    ys, xs = torch.nonzero(binary, as_tuple=True)
    # The stride-4 cells 2..3 cover input pixels ~8..15, i.e. ~16..31 at twice the size.
    assert 14 <= ys.min() <= 18 and 28 <= ys.max() <= 33 and 14 <= xs.min() <= 18
    boxes = scale_boxes(torch.tensor([[10.0, 5.0, 40.0, 29.0]]), (30, 28), (60, 56))
    assert boxes.tolist() == [[20.0, 10.0, 56.0, 58.0]]  # x2 clipped to the width 56


def test_paste_matrix_by_hand():
    # stride 2, two cells, no resize: aligned_bilinear of an impulse at cell 0 is [1, 1, .5, 0]
    # (pad right, align_corners to 5: [1, .5, 0, 0, 0]; pad left 1: [1, 1, .5, 0, 0, 0]; crop 4)
    matrix, first, last = paste_matrix(2, 2, 4, 4)
    assert matrix.tolist() == [[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert first.tolist() == [0, 0, 0, 1] and last.tolist() == [0, 0, 1, 1]
    # bilinear 4 -> 2 (align_corners=False): output pixel i reads input 2i + 0.5, i.e. halves of 2i and 2i+1
    matrix, first, last = paste_matrix(2, 2, 4, 2)
    assert matrix.tolist() == [[1.0, 0.0], [0.25, 0.75]]  # 0.5 * [1, 0] + 0.5 * [1, 0]; 0.5 * [.5, .5] + 0.5 * [0, 1]
    assert first.tolist() == [0, 0] and last.tolist() == [0, 1]


def test_paste_windows_by_hand():
    # the paste of paste_matrix(2, 2, 4, 4) on both axes: output rows/columns 0-1 read only cell 0,
    # 2 reads cells 0 and 1, 3 reads only cell 1
    probs = torch.zeros(3, 2, 2)
    probs[0, 1, 1] = 0.9  # only cell (1, 1) is live: output rows 2-3, columns 2-3
    probs[1, 0, 1] = 0.9  # cell (0, 1): rows 0-2, columns 2-3
    probs[2] = 0.5  # nothing above 0.5 (0.5 is not above it, but within the rounding margin: all of it)
    windows = paste_windows(probs, 0.5, (4, 4), (4, 4), stride=2)
    assert windows.tolist() == [[2, 2, 4, 4], [2, 0, 4, 3], [0, 0, 4, 4]]
    assert paste_windows(probs[:2] * 0.5, 0.5, (4, 4), (4, 4), stride=2).tolist() == [[0, 0, 0, 0]] * 2  # nothing live


@pytest.mark.parametrize(
    "canvas_s4, input_hw, output_hw", [((8, 8), (30, 28), (60, 56)), ((20, 32), (72, 120), (270, 480)), ((9, 7), (33, 25), (17, 13))]
)
def test_paste_windows_hold_every_pasted_pixel(canvas_s4, input_hw, output_hw):
    gen = torch.Generator().manual_seed(sum(output_hw))
    probs = torch.rand(6, *canvas_s4, generator=gen) * 0.45  # below 0.5 everywhere ...
    for k in range(4):  # ... but for a 2x2 blob of cells in each of the first four
        probs[k, k : k + 2, k + 1 : k + 3] += 0.5
    windows = paste_windows(probs, 0.5, input_hw, output_hw)
    binary = paste_masks(probs, input_hw, output_hw) > 0.5
    for mask, (x0, y0, x1, y1) in zip(binary[:4], windows[:4].tolist()):
        inside = torch.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        assert mask.any() and not (mask & ~inside).any()  # every pasted pixel inside the window
        assert (x1 - x0) * (y1 - y0) <= 0.35 * mask.numel()  # a blob's window, not the image
    assert windows[4:].tolist() == [[0, 0, 0, 0]] * 2 and not binary[4:].any()


@pytest.mark.parametrize(
    "canvas_s4, input_hw, output_hw",
    [((8, 8), (30, 28), (60, 56)), ((6, 10), (24, 37), (24, 37)), ((20, 32), (72, 120), (1080, 1920)), ((9, 7), (33, 25), (17, 13))],
)
def test_paste_mask_in_box_is_paste_masks_on_the_box(canvas_s4, input_hw, output_hw):
    probs = torch.rand(1, *canvas_s4, generator=torch.Generator().manual_seed(sum(output_hw)))
    full = paste_masks(probs, input_hw, output_hw)[0]
    h, w = output_hw
    for x0, y0, x1, y1 in [(0, 0, w, h), (1, 2, w // 2, h // 3), (w - 3, h - 2, w, h), (w // 3, h // 4, w // 3 + 1, h // 4 + 1)]:
        crop = paste_mask_in_box(probs[0], (x0, y0, x1, y1), input_hw, output_hw)
        assert crop.shape == (y1 - y0, x1 - x0)
        torch.testing.assert_close(crop, full[y0:y1, x0:x1], rtol=0, atol=1e-6)


def test_resize_and_normalize_and_pad():
    assert resized_size(480, 640, 800, 1333) == (800, 1067)
    assert resized_size(100, 1000, 800, 1333) == (133, 1333)
    img = torch.full((3, 30, 40), 100, dtype=torch.uint8)
    img[0] = 10
    batch, sizes = normalize_and_pad([img], [1.0, 2.0, 3.0], [1.0, 2.0, 4.0], "BGR", 32)
    assert batch.shape == (1, 3, 32, 64) and sizes == [(30, 40)]
    assert batch[0, :, 0, 0].tolist() == pytest.approx([99.0, 49.0, 1.75])  # BGR: (100-1)/1, (100-2)/2, (10-3)/4
    assert batch[0, :, 31, 63].tolist() == [0.0, 0.0, 0.0]  # zero padding after normalisation


def test_model_forward_shapes_and_empty_prediction():
    cfg = tiny_config()
    model = conditioned_model(cfg)
    batch, sizes = model.preprocess([torch.zeros(3, 96, 128, dtype=torch.uint8)])
    head, mask_feats = model(batch)
    assert [tuple(t.shape[-2:]) for t in head.cls_logits] == [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    assert mask_feats.shape == (1, 8, 12, 16)
    assert head.controller[0].shape[1] == 169
    out = model.predict([torch.zeros(3, 96, 128, dtype=torch.uint8)], score_threshold=1.1)[0]
    assert len(out) == 0 and out.masks.shape == (0, 96, 128)
    out = model.predict([torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)])[0]
    assert 0 < len(out) <= cfg.model.fcos.max_detections and out.masks.shape[1:] == (96, 128)
    assert (out.scores <= out.det_scores.sqrt() + 1e-6).all()  # sqrt(c * m) <= sqrt(c)


def test_class_agnostic_nms_keeps_one_box_per_object_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 11.0], [20.0, 20.0, 30.0, 30.0]])  # IoU(0, 1) = 100/110
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([0, 1, 0])  # one object, two classes; a second object
    assert non_max_suppression(boxes, scores, labels, 0.6).tolist() == [0, 1, 2]  # per class: both boxes of object 1
    assert non_max_suppression(boxes, scores, labels, 0.6, class_agnostic=True).tolist() == [0, 2]
    same = torch.tensor([0, 0, 0])
    assert non_max_suppression(boxes, scores, same, 0.6).tolist() == [0, 2]  # one class: the two rules agree


def test_decode_detections_class_agnostic_switch():
    """A conditioned model hesitates between classes: per-class NMS keeps near-identical boxes
    with different labels (IoU 1.0 measured), class-agnostic NMS none above the threshold (0.50)."""
    from torchvision.ops import box_iou

    cfg = tiny_config()
    model = conditioned_model(cfg)
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    overlaps = {}
    for agnostic in (False, True):
        model.cfg.model.fcos.class_agnostic_nms = agnostic
        out = model.predict([image], resize=False)[0]
        iou = box_iou(out.boxes, out.boxes).fill_diagonal_(0)
        overlaps[agnostic] = float(iou.max())
    assert overlaps[False] > 0.9 and overlaps[True] < 0.55  # nms_threshold 0.6 between them, with margins


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="solver.base_lrr"):
        load_config(None, ["solver.base_lrr=0.1"])
    with pytest.raises(ConfigError, match="model.backbone.depth"):
        load_config(None, ["model.backbone.depth=19"])
