"""The image part / prompt part split of box prompting (training/model/fcos.py, condinst.py,
processing.py's InputSpec helpers), by hand on tiny tensors."""

from __future__ import annotations

import math

import torch
from helpers import conditioned_model, tiny_config

from training.model.fcos import HeadOutputs, PromptCells, level_sizes, prompt_cells, prompt_detections
from training.model.processing import InputSpec, batch_to_spec, normalize_and_pad, resize_image, resize_to_spec


def test_level_sizes_halve_rounding_up():
    # P3 of a padded 200x336 input is 25x42 (stride 8); each level is ceil(previous / 2)
    assert level_sizes((25, 42), 5) == [(25, 42), (13, 21), (7, 11), (4, 6), (2, 3)]
    assert level_sizes((1, 1), 3) == [(1, 1), (1, 1), (1, 1)]


def _two_level_head() -> HeadOutputs:
    # level 0: 2x2 cells, 2 classes; level 1: 1x1; controller with 3 params
    cls0 = torch.tensor([[[0.0, 2.0], [-1.0, 0.0]], [[1.0, 0.0], [-1.0, 3.0]]])[None]  # (1, 2, 2, 2)
    ctr0 = torch.zeros(1, 1, 2, 2)
    cls1 = torch.tensor([[[4.0]], [[-4.0]]])[None]
    ctr1 = torch.full((1, 1, 1, 1), 2.0)
    ctl0 = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)
    ctl1 = torch.tensor([100.0, 101.0, 102.0]).reshape(1, 3, 1, 1)
    return HeadOutputs([cls0, cls1], [torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 1, 1)], [ctr0, ctr1], [ctl0, ctl1])


def test_prompt_cells_by_hand():
    cells = prompt_cells(_two_level_head(), 0)
    s = torch.sigmoid
    half = 0.5  # sigmoid(0) of the level-0 centerness
    expected = [
        max(s(torch.tensor(0.0)), s(torch.tensor(1.0))) * half,  # cell (0,0): class 1 (logit 1)
        s(torch.tensor(2.0)) * half,  # cell (0,1): class 0
        s(torch.tensor(-1.0)) * half,  # cell (1,0): tie, class 0 or 1 have equal logits
        s(torch.tensor(3.0)) * half,  # cell (1,1): class 1
        s(torch.tensor(4.0)) * s(torch.tensor(2.0)),  # level 1
    ]
    assert torch.allclose(cells.scores, torch.stack([torch.as_tensor(v) for v in expected]), atol=1e-7)
    assert cells.classes[[0, 1, 3, 4]].tolist() == [1, 0, 1, 0]
    # params: level 0 row-major cells then level 1; param j of cell (y, x) is ctl[j, y, x]
    assert cells.params.tolist() == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11], [100, 101, 102]]
    assert cells.nbytes == 5 * 4 + 5 * 8 + 15 * 4


def test_prompt_detections_picks_the_cell_of_the_box_centre():
    cfg = tiny_config().model.fcos
    cells = PromptCells(
        torch.arange(50, dtype=torch.float32) / 100, torch.arange(50) % 3, torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 2)
    )
    # P3 3x4 (stride 8): 12 cells, P4 2x2: 4, P5 1x1 ... (strides 8..128 of the config)
    sizes = level_sizes((3, 4), len(cfg.strides))
    box = torch.tensor([[16.0, 8.0, 24.0, 16.0]])  # 8 px: half 4 <= the first size of interest -> P3
    d = prompt_detections(cells, box, (3, 4), cfg)
    # centre (20, 12) -> P3 cell x = 2, y = 1 -> index 1 * 4 + 2 = 6, location (2*8+4, 1*8+4)
    assert d.levels.tolist() == [0] and d.locations.tolist() == [[20.0, 12.0]]
    assert (
        d.params.tolist() == [[6.0, 6.0]]
        and d.labels.tolist() == [0]
        and math.isclose(float(d.det_scores[0]), math.sqrt(0.06), rel_tol=1e-6)
    )
    big = torch.tensor([[0.0, 0.0, 2 * cfg.sizes_of_interest[0] + 2, 10.0]])  # half just above the P3 range -> P4
    d = prompt_detections(cells, big, (3, 4), cfg)
    cx = (2 * cfg.sizes_of_interest[0] + 2) / 2
    ix = min(int(cx // 16), sizes[1][1] - 1)
    assert d.levels.tolist() == [1] and d.params[0, 0].item() == 12 + 0 * sizes[1][1] + ix


def test_condinst_prompt_equals_prompt_detections_plus_mask_head():
    cfg = tiny_config()
    model = conditioned_model(cfg)
    batch, _ = model.preprocess([torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))])
    with torch.no_grad():
        head, feats = model(batch)
        cells = prompt_cells(head, 0)
        boxes = torch.tensor([[4.0, 4.0, 40.0, 50.0], [50.0, 10.0, 90.0, 60.0]])
        labels, det_scores, probs = model.prompt(cells, feats, boxes)
        d = prompt_detections(cells, boxes, tuple(feats.shape[-2:]), cfg.model.fcos)
        ref = model.mask_logits(feats, d.params, d.locations, d.levels, torch.zeros_like(d.levels)).sigmoid()[:, 0]
    assert torch.equal(labels, d.labels) and torch.equal(det_scores, d.det_scores) and torch.equal(probs, ref)
    assert probs.shape == (2, 64 // 4, 96 // 4)


def test_input_spec_helpers_are_the_model_rules():
    cfg = tiny_config()
    spec = InputSpec.from_config(cfg.input)
    image = torch.randint(0, 255, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    small = resize_to_spec(image, spec)
    assert torch.equal(small, resize_image(image, cfg.input.min_size_test, cfg.input.max_size_test))
    batch, sizes = batch_to_spec([small], spec)
    ref, ref_sizes = normalize_and_pad([small], cfg.input.pixel_mean, cfg.input.pixel_std, cfg.input.format, cfg.input.size_divisibility)
    assert torch.equal(batch, ref) and sizes == ref_sizes
    canvas = InputSpec(spec.min_size, spec.max_size, spec.pixel_mean, spec.pixel_std, fixed_hw=(96, 128))
    fixed, _ = batch_to_spec([resize_to_spec(image, canvas)], canvas)
    assert fixed.shape[-2:] == (96, 128)
