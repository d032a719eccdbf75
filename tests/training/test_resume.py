"""Resume after a crash: kill -9 mid-run then --resume; a damaged latest checkpoint falls
back to the one before; a resumed run equals an uninterrupted one; pruning."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_config

from training.checkpoint import read_checkpoint
from training.config import load_config
from training.resume import latest_valid_checkpoint, periodic_checkpoints, prune_checkpoints
from training.train import Trainer, lr_factor

SMALL = [
    "input.min_size_train=[64]",
    "input.max_size_train=96",
    "input.min_size_test=64",
    "input.max_size_test=96",
    "boxteacher.teacher_min_size=64",
    "boxteacher.teacher_max_size=96",
    "solver.batch_size=2",
    "model.backbone.freeze_at=5",
]  # fmt: skip  (a frozen backbone: faster steps, smaller checkpoints)


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    from training.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("d64") / "data", train=8, val=4, size=64, seed=1)


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training", "train", "--config", str(REPO / "configs" / "synthetic-tiny.yaml"),
            "--data", str(data), "--output", str(out), "--no-eval", "--no-progress", *extra,
            *SMALL, "method=boxteacher", "solver.max_iter=5", "train.checkpoint_period=2", "train.keep_checkpoints=1",
            "train.log_period=1"]  # fmt: skip


def test_kill_9_then_resume_continues_from_the_last_checkpoint(data64, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(_train_cmd(data64, out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    try:
        while not (out / "model_0000002.pth").exists():
            assert proc.poll() is None, f"training ended before its first checkpoint: {proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pth").exists()
    for _, path in periodic_checkpoints(out):  # whatever is there reads back
        read_checkpoint(path)
    last = periodic_checkpoints(out)[-1][0]
    before = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip().endswith("}")]

    done = subprocess.run(_train_cmd(data64, out, "--resume"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from {out / f'model_{last:07d}.pth'} at iteration {last}" in done.stderr
    final = read_checkpoint(out / "model_final.pth")
    assert final["iteration"] == 5 and final["teacher"] is not None and final["scaler"] is not None and final["rng"]
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000004.pth", "model_final.pth"]
    for path in out.glob("*.pth"):
        read_checkpoint(path)
    assert not list(out.glob(".*.tmp"))
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 6))  # continues, nothing logged twice
    cfg = load_config(REPO / "configs" / "synthetic-tiny.yaml", SMALL)
    for r in records:  # the learning rate continues where it was (logged after the step)
        assert r["lr"] == pytest.approx(cfg.solver.base_lr * lr_factor(r["iteration"], cfg), rel=1e-9)
    assert [r["loss"] for r in records[:last]] == [r["loss"] for r in before[:last]]
    assert (out / "tensorboard").is_dir()


def test_a_damaged_latest_checkpoint_falls_back_and_resuming_equals_not_stopping(data64, tmp_path, caplog):
    over = SMALL + ["method=boxteacher", "solver.max_iter=3", "train.checkpoint_period=1", "train.log_period=1"]
    straight = Trainer(tiny_config(overrides=over), data64, tmp_path / "a")
    straight.run(progress=False)

    # B crashed at the end: its model_final.pth was cut short on the disk
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(tmp_path / "a" / "model_0000002.pth", b / "model_0000002.pth")
    blob = (tmp_path / "a" / "model_final.pth").read_bytes()
    (b / "model_final.pth").write_bytes(blob[: len(blob) // 2])
    found = latest_valid_checkpoint(b)
    assert found is not None and found[0].name == "model_0000002.pth"
    assert "skipping model_final.pth" in caplog.text and "falling back" in caplog.text

    resumed = Trainer(tiny_config(overrides=over), data64, b, resume=True)
    assert resumed.iteration == 2
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(straight.cfg.solver.base_lr * lr_factor(2, straight.cfg))
    resumed.run(progress=False)
    a_final, b_final = read_checkpoint(tmp_path / "a" / "model_final.pth"), read_checkpoint(b / "model_final.pth")
    assert b_final["iteration"] == 3
    for branch in ("student", "teacher"):  # same data order, same RNG: the same run
        for k, v in a_final[branch].items():
            torch.testing.assert_close(b_final[branch][k], v, atol=1e-6, rtol=1e-5, msg=f"{branch}.{k}")


def test_prune_keeps_the_last_periodic_checkpoints(tmp_path):
    for it in (2, 4, 6, 8):
        (tmp_path / f"model_{it:07d}.pth").write_bytes(b"x")
    (tmp_path / "model_final.pth").write_bytes(b"x")
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000006.pth", "model_0000008.pth", "model_final.pth"]
    assert latest_valid_checkpoint(tmp_path) is None  # not checkpoints at all: all skipped
