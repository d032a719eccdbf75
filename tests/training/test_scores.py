"""training/model/scores.py: the last step of the mask-aware score, by hand.

(The whole score, Eq. 1 with its m_bar, is checked by hand in tests/training/test_boxteacher.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from training.model.scores import mask_aware_score, mask_aware_score_from_mean, mean_foreground_probability


def test_mask_aware_score_from_mean_by_hand():
    # sqrt(0.64 * 0.25) = 0.4; a negative detection score counts as 0; m_bar 0 gives 0
    out = mask_aware_score_from_mean(torch.tensor([0.64, -0.1, 0.9]), torch.tensor([0.25, 0.5, 0.0]))
    assert out.tolist() == pytest.approx([0.4, 0.0, 0.0])
    assert out.dtype == torch.float32


def test_mask_aware_score_is_from_mean_of_m_bar():
    probs = torch.tensor([[[0.9, 0.8, 0.3, 0.95]]])
    c = torch.tensor([0.64])
    m_bar = mean_foreground_probability(probs)
    assert torch.equal(mask_aware_score(c, probs), mask_aware_score_from_mean(c, m_bar))
    assert mask_aware_score(c, probs).item() == pytest.approx(math.sqrt(0.64 * (2.65 / 3)))
