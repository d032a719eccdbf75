"""Every recipe in configs/ validates against the typed config."""

import pytest
from helpers import REPO

from training.config import load_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.solver.max_iter > 0 and cfg.method in {"condinst", "boxinst", "boxteacher"}


def test_coco_r50_1x_matches_the_paper():
    cfg = load_config(REPO / "configs" / "coco-r50-1x.yaml")
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
    """The paper's recipes as the authors' configs set them (docs/training.md); batch and lr are for 8 processes."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert (cfg.model.backbone.depth, cfg.model.num_classes) == (depth, classes)
    assert (cfg.solver.batch_size, cfg.solver.base_lr, cfg.solver.max_iter, cfg.solver.steps) == (batch, lr, max_iter, steps)
    assert cfg.boxteacher.strong_augmentation == aug and cfg.solver.reference_world_size == 8
    # the paper's training (ImageNet weights): the authors' coupling and losses, pinned in the base
    assert cfg.mask_grad_scales == (1.0, 1.0) and not cfg.model.fcos.reg_straight_through
    assert cfg.boxinst.outside_weight == 0.0 and cfg.boxinst.projection_bce_weight == 0.0 and not cfg.boxinst.projection_in_image
    assert cfg.boxinst.box_prior_weight == 0.0


def test_a_recipe_overrides_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "method: boxinst\nmodel: {num_classes: 5, backbone: {depth: 18, norm: gn}}\nsolver: {steps: [10, 20]}\n"
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {backbone: {depth: 34}}\nsolver: {steps: [30]}\n")
    cfg = load_config(tmp_path / "child.yaml")
    # sections merge key by key; lists and values replace
    assert (cfg.method, cfg.model.num_classes, cfg.model.backbone.depth, cfg.model.backbone.norm) == ("boxinst", 5, 34, "gn")
    assert cfg.solver.steps == [30]
    assert load_config(tmp_path / "child.yaml", ["model.backbone.depth=50"]).model.backbone.depth == 50


def test_a_base_of_a_base_is_refused(tmp_path):
    from training.config import ConfigError

    (tmp_path / "a.yaml").write_text("method: boxinst\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="one level"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "d.yaml")


def test_box_prior_span_follows_the_pairwise_warmup_unless_set():
    cfg = load_config(REPO / "configs" / "pennfudan-r18-scratch.yaml")
    assert cfg.boxinst.box_prior_iters is None and cfg.boxinst.prior_iters == cfg.boxinst.pairwise_warmup_iters == 200
    cfg = load_config(REPO / "configs" / "pennfudan-r18-scratch.yaml", ["boxinst.box_prior_iters=50"])
    assert cfg.boxinst.prior_iters == 50
