"""Hand-checked tests for training/model/assignment.py (BoxTeacher Algorithm 1)."""

from __future__ import annotations

import torch

import training.boxteacher
from training.model.assignment import assign_pseudo_masks


def test_boxteacher_re_exports_the_one_algorithm_1():
    assert training.boxteacher.assign_pseudo_masks is assign_pseudo_masks


def _assign(pred, scores, gt, **kw):
    return assign_pseudo_masks(
        torch.tensor(pred, dtype=torch.float32), torch.tensor(scores), torch.tensor(gt, dtype=torch.float32), **kw
    ).tolist()


def test_assign_two_predictions_compete_for_one_box():
    gt = [[0, 0, 10, 10], [20, 0, 30, 10]]
    # pred 1 has the higher score and takes GT 0; pred 0 (IoU 0.9 with GT 0) gets nothing
    assert _assign([[1, 0, 10, 10], [0, 0, 10, 10]], [0.8, 0.9], gt) == [1, -1]


def test_assign_loser_takes_second_box_only_above_iou_threshold():
    preds = [[0, 0, 10, 10], [0, 0, 10, 9]]
    # GT 1 = [0,0,10,6]: IoU(pred 1, GT 1) = 60/90 = 0.67 >= 0.5 -> pred 1 takes it
    assert _assign(preds, [0.9, 0.8], [[0, 0, 10, 10], [0, 0, 10, 6]]) == [0, 1]
    # GT 1 = [0,0,10,4]: IoU(pred 1, GT 1) = 40/90 = 0.44 < 0.5 -> GT 1 has no pseudo mask
    assert _assign(preds, [0.9, 0.8], [[0, 0, 10, 10], [0, 0, 10, 4]]) == [0, -1]


def test_assign_box_without_good_prediction_and_confidence_cut():
    gt = [[0, 0, 10, 10], [50, 50, 60, 60]]
    # pred 0 overlaps GT 1 with IoU 25/175 < 0.5; pred 1 is a perfect match but below 0.05
    out = _assign([[0, 0, 10, 10], [50, 50, 60, 60], [55, 55, 65, 65]], [0.9, 0.04, 0.6], gt)
    assert out == [0, -1]
    assert _assign([[50, 50, 60, 60]], [0.05], gt) == [-1, 0]  # the cut is inclusive


def test_assign_off_by_one_gt0_is_not_rematched():
    # The authors' `gtm > 0` test would let the second prediction overwrite GT 0's match.
    gt = [[0, 0, 10, 10]]
    assert _assign([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], gt) == [0]
    assert _assign([[0, 0, 10, 10], [0, 0, 10, 10]], [0.8, 0.9], gt) == [1]
    # one-to-one on a crowded random case
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(30, 2, generator=g) * 20
    preds = torch.cat([xy, xy + 8 + torch.rand(30, 2, generator=g) * 4], dim=1)
    gts = preds[::3] + torch.rand(10, 4, generator=g)
    matched = assign_pseudo_masks(preds, torch.rand(30, generator=g), gts)
    used = matched[matched >= 0].tolist()
    assert len(used) == len(set(used)) and len(used) > 0


def test_assign_picks_highest_iou_and_handles_empty_and_degenerate():
    # the prediction takes the GT with the highest IoU, not the first above threshold
    assert _assign([[0, 0, 10, 10]], [0.9], [[0, 0, 10, 7], [0, 0, 10, 9]]) == [-1, 0]
    assert _assign([], [], [[0, 0, 1, 1]]) == [-1]
    assert assign_pseudo_masks(torch.zeros(2, 4), torch.ones(2), torch.zeros(0, 4)).shape == (0,)
    assert assign_pseudo_masks(torch.zeros(2, 4), torch.ones(2), torch.zeros(0, 4)).dtype == torch.int64
    # zero-area boxes: IoU 0/0 must not match
    assert _assign([[5, 5, 5, 5]], [0.9], [[5, 5, 5, 5]]) == [-1]
