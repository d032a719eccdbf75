"""Every recipe in configs/ validates against the typed config."""

from pathlib import Path

import pytest

from training.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.solver.max_iter > 0 and cfg.method in {"condinst", "boxinst", "boxteacher"}


def test_coco_r50_1x_matches_the_paper():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "coco-r50-1x.yaml")
    assert (cfg.solver.batch_size, cfg.solver.base_lr, cfg.solver.max_iter, cfg.solver.steps) == (16, 0.01, 90000, [60000, 80000])
    assert cfg.boxteacher.momentum == 0.999 and cfg.boxteacher.pixel_weight == 0.5 and cfg.boxteacher.affinity_weight == 0.1
