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


@pytest.mark.parametrize(
    "name, depth, classes, batch, lr, max_iter, steps, aug",
    [
        ("coco-r50-1x", 50, 80, 16, 0.01, 90000, [60000, 80000], "strong"),
        ("coco-r50-3x", 50, 80, 16, 0.01, 270000, [210000, 250000], "strongv2"),
        ("coco-r101-3x", 101, 80, 16, 0.01, 270000, [210000, 250000], "strongv2"),
        ("voc-r50", 50, 20, 16, 0.01, 15000, [10000, 13500], "strong"),
        ("cityscapes-r50", 50, 8, 8, 0.005, 24000, [18000], "strong"),
    ],
)
def test_paper_recipes(name, depth, classes, batch, lr, max_iter, steps, aug):
    """method.md §4 and implementation-notes.md §4; batch and lr are for 8 processes."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert (cfg.model.backbone.depth, cfg.model.num_classes) == (depth, classes)
    assert (cfg.solver.batch_size, cfg.solver.base_lr, cfg.solver.max_iter, cfg.solver.steps) == (batch, lr, max_iter, steps)
    assert cfg.boxteacher.strong_augmentation == aug and cfg.solver.reference_world_size == 8
