"""Box supervision from scratch on real photos (Penn-Fudan, issue 14), slow.

BoxInst as the authors train it, from scratch on Penn-Fudan, wrecks the detector: one side of
the box regression dies and the GIoU loss stays near 0.65 (docs/results.md, "Box supervision
from scratch on real photos"). Measured with this test's budget (R-18 GN from scratch, 200
iterations at batch 2, seed 0; `benchmarks/ablation-box-supervision.yaml` "authors" vs the
defaults, 2026-12-02):

| training | bbox AP | segm AP | mask pixels outside their box (val) | collapse detector |
|---|---|---|---|---|
| the authors' | 2.1 | 1.2 | 77% | fired at iteration 140 (flooding masks) |
| the defaults with box-prior weight 1 (two runs: a script, this test) | 14.1, 15.3 | 3.6, 2.0 | 6%, 5% | silent |
| today's defaults, box-prior weight 0.3 (this test, 2026-12-03) | 15.3 | 1.5 | 7% | silent |
| the same code, this test inside a full `.ci/run` (2026-12-03) | 15.3 | 2.3 | 20% | silent |

The defaults keep the detector training, the collapse detector silent and the masks inside
their boxes. The detector's numbers repeat to the digit (the mask path sends it no gradient),
but the mask head's do not: rounding that differs between runs (most likely the order of
parallel reductions) moves a 200-iteration run's masks between 5% and 20% outside their
boxes. So the bound on that share, 45%, sits between the worst healthy run (20%) and the
authors' training (77%), and the other bounds leave the same kind of room.
"""

from __future__ import annotations

import pytest
from helpers import PENNFUDAN, REPO

from training.benchmark import collapse_warning, instance_iou_and_scores
from training.config import load_config
from training.data.coco import CocoInstances
from training.evaluate import evaluate_model
from training.train import Trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PENNFUDAN / "annotations" / "train.json").is_file(), reason=f"Penn-Fudan is not at {PENNFUDAN}"),
]

ITERS = 200


def test_boxinst_from_scratch_keeps_the_detector_and_the_masks(tmp_path):
    overrides = [
        "method=boxinst", f"solver.max_iter={ITERS}", "solver.steps=[160]", "solver.memory_format=contiguous",
        f"train.checkpoint_period={ITERS}", "train.seed=0",
    ]  # fmt: skip
    trainer = Trainer(load_config(REPO / "configs" / "pennfudan-r18-scratch.yaml", overrides), PENNFUDAN, tmp_path)
    assert not trainer.dataset.with_masks  # boxes only
    trainer.run(progress=False)
    model = trainer.model.eval()
    metrics = evaluate_model(model, PENNFUDAN, "val")
    val = CocoInstances(PENNFUDAN, "val", with_masks=True, class_agnostic=bool(model.cfg.data.class_agnostic))
    _, _, _, outside = instance_iou_and_scores(model, val)
    print("segm", metrics["segm"]["AP"], "bbox", metrics["bbox"]["AP"], "outside", outside.mean())
    assert collapse_warning(tmp_path) is None
    assert metrics["bbox"]["AP"] > 7.0
    assert metrics["segm"]["AP"] > 0.5  # masks exist (a dead mask head gives 0)
    assert len(outside) > 0 and outside.mean() < 0.45  # healthy 5-20%, the authors' training 77%
