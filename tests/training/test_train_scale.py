"""The trainer at scale, in process: mixed precision, gradient accumulation, non-finite
steps, ``model.weights`` with another number of classes, the linear scaling rule."""

from __future__ import annotations

import pytest
import torch
from helpers import REPO, tiny_config

from training.config import load_config
from training.train import Trainer, infinite

CONFIGS = REPO / "configs"
SMALL = ["input.min_size_train=[64]", "input.max_size_train=96", "input.min_size_test=64", "input.max_size_test=96",
         "boxteacher.teacher_min_size=64", "boxteacher.teacher_max_size=96", "solver.batch_size=2"]  # fmt: skip
FAST_LR = ["solver.warmup_iters=0", "solver.base_lr=0.01"]


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    from training.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("d64") / "data", train=8, val=4, size=64, seed=1)


def _param_delta(trainer, batch, steps=2):
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    records = [trainer.step(*batch) for _ in range(steps)]
    delta = torch.cat([(p.detach() - start[k]).flatten() for k, p in trainer.model.named_parameters()])
    return delta, records


def test_bf16_autocast_agrees_with_fp32(data64, tmp_path):
    """2 steps on the same batch: the update under bf16 autocast is the fp32 one within
    bf16's precision (~3 significant digits on activations)."""
    fp32 = Trainer(tiny_config(overrides=SMALL + FAST_LR), data64, tmp_path / "a")
    batch = next(infinite(fp32.loader))
    bf16 = Trainer(tiny_config(overrides=SMALL + FAST_LR + ["solver.amp=bf16"]), data64, tmp_path / "b")
    seen = []
    bf16.model.head.cls_logits.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    d32, r32 = _param_delta(fp32, batch)
    d16, r16 = _param_delta(bf16, batch)
    assert seen and seen[0] == torch.bfloat16  # autocast is really on
    assert bf16.skipped_steps == 0
    assert r16[0]["loss"] == pytest.approx(r32[0]["loss"], rel=0.01)
    assert float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)) > 0.97
    assert float(d16.norm() / d32.norm()) == pytest.approx(1.0, abs=0.05)


def test_gradient_accumulation_equals_the_full_batch(data64, tmp_path):
    """2 micro-batches of 1 image == 1 batch of 2 when both images have as many positives
    (an image and its mirror): the losses are means per micro-batch, as they are per
    process in DDP (see tests/training/test_distributed.py)."""
    from distributed_worker import mirrored_pair

    images, targets = mirrored_pair(data64)
    over = ["method=boxteacher", "boxteacher.strong_augmentation=none", "solver.memory_format=contiguous"]  # see distributed_worker.FIXED
    full = Trainer(tiny_config(overrides=SMALL + FAST_LR + over), data64, tmp_path / "a")
    accum = Trainer(tiny_config(overrides=SMALL + FAST_LR + over + ["solver.grad_accum_steps=2"]), data64, tmp_path / "b")
    d1, r1 = _param_delta(full, (images, targets))
    d2, r2 = _param_delta(accum, (images, targets))
    assert float(d1.abs().max()) > 1e-3
    torch.testing.assert_close(d2, d1, atol=2e-6, rtol=1e-4)
    assert [r["loss"] for r in r2] == pytest.approx([r["loss"] for r in r1], rel=1e-4)


def test_nan_loss_is_skipped_counted_and_stops_when_it_persists(data64, tmp_path, monkeypatch, caplog):
    import training.train as train_module

    real = train_module.losses_from_outputs
    poison_at = {1}

    def poisoned(model, head, mask_feats, batch, iteration, *rest):
        losses = real(model, head, mask_feats, batch, iteration, *rest)
        if iteration in poison_at:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    monkeypatch.setattr(train_module, "losses_from_outputs", poisoned)
    over = SMALL + FAST_LR + ["train.max_nonfinite_steps=2", "model.backbone.freeze_at=5"]
    trainer = Trainer(tiny_config(overrides=over), data64, tmp_path)
    batch = next(infinite(trainer.loader))
    snapshots, records = [], []
    for _ in range(3):
        records.append(trainer.step(*batch))
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert [r["skipped"] for r in records] == [0.0, 1.0, 0.0]
    assert trainer.skipped_steps == 1 and trainer.nonfinite_steps == 0 and trainer.iteration == 3
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])  # nothing applied
    assert any(not torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])
    assert "non-finite loss" in caplog.text

    poison_at.update(range(3, 100))  # now it persists
    trainer.step(*batch)
    with pytest.raises(RuntimeError, match="NaN/inf for 2 iterations in a row"):
        trainer.step(*batch)
    assert trainer.skipped_steps == 3


def test_model_weights_from_a_checkpoint_with_other_classes(data64, tmp_path, caplog):
    from conftest import write_checkpoint

    ckpt_path = write_checkpoint(tmp_path / "three.pth", tiny_config(num_classes=3))
    source = torch.load(ckpt_path, weights_only=False)["teacher"]
    cfg = tiny_config(overrides=SMALL + ["data.class_agnostic=true", f"model.weights={ckpt_path}"])
    trainer = Trainer(cfg, data64, tmp_path / "run")
    state = trainer.model.state_dict()
    assert trainer.cfg.model.num_classes == 1 and state["head.cls_logits.weight"].shape[0] == 1
    assert "head.cls_logits" in caplog.text and "re-initialised" in caplog.text
    same = [k for k in state if torch.equal(state[k], source[k])]
    assert sorted(set(state) - set(same)) == ["head.cls_logits.bias", "head.cls_logits.weight"]


def test_linear_scaling_rule_and_batch_per_process():
    from training.train import per_process_batch, scale_to_world_size

    cfg = load_config(CONFIGS / "coco-r50-1x.yaml")
    assert cfg.solver.reference_world_size == 8
    four = scale_to_world_size(cfg, 4)
    assert (four.solver.batch_size, four.solver.base_lr, four.solver.max_iter, four.solver.steps) == (8, 0.005, 180000, [120000, 160000])
    assert four.solver.warmup_iters == 2000 and four.boxteacher.warmup_iters == 20000 and four.train.checkpoint_period == 10000
    assert four.solver.reference_world_size is None  # the checkpoint's config is literal
    assert per_process_batch(four, 4) == 2 and scale_to_world_size(four, 4) is four
    assert scale_to_world_size(cfg, 8).solver.batch_size == 16
    with pytest.raises(ValueError, match="not divisible by the number of processes"):
        per_process_batch(load_config(None, ["solver.batch_size=3"]), 2)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        per_process_batch(load_config(None, ["solver.batch_size=4", "solver.grad_accum_steps=3"]), 1)
