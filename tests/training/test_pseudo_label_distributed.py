"""Pseudo-labelling at scale (training/pseudo_label.py): sharded over torchrun processes
(gloo on CPU), streamed to per-rank part files, resumed after kill -9, merged into one
COCO file with the unmatched boxes and a review order.

The reference is one process, in this process, with one thread like the torchrun
workers (so that float results are bit-identical). The data: 6 synthetic 128 px images
plus one box in a corner that no prediction matches (annotation 9001), so the merged
file has both pseudo masks and unmatched boxes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_config, write_checkpoint

from training import pseudo_label
from training.cli import main
from training.pseudo_label import parts_dir, read_part, review_order

UNMATCHABLE = 9001


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from training.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("pl") / "data", train=6, val=1, size=128, seed=0)
    ann_file = root / "annotations" / "train.json"
    coco = json.loads(ann_file.read_text())
    coco["annotations"].append(
        {"id": UNMATCHABLE, "image_id": 1, "category_id": 1, "bbox": [124.0, 0.0, 3.0, 3.0], "area": 9.0, "iscrowd": 0}
    )
    ann_file.write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("plw") / "m.pth", tiny_config(num_classes=7))


def _argv(weights: Path, data: Path, output: Path) -> list[str]:
    return ["pseudo-label", "--weights", str(weights), "--data", str(data), "--output", str(output)]


def _one_thread_main(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(weights, data, tmp_path_factory) -> dict:
    """The uninterrupted one-process result."""
    out = tmp_path_factory.mktemp("ref") / "pseudo.json"
    assert "WORLD_SIZE" not in os.environ
    assert _one_thread_main(_argv(weights, data, out)) == 0
    assert not parts_dir(out).exists()  # removed after the merge
    return json.loads(out.read_text())


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_the_merged_file_lists_unmatched_boxes_and_a_review_order_worst_first(reference, data):
    truth = json.loads((data / "annotations" / "train.json").read_text())
    pseudo = {a["id"]: a for a in reference["annotations"]}
    unmatched = [a["id"] for a in reference["unmatched_boxes"]]
    assert pseudo and UNMATCHABLE in unmatched
    boxes = sorted(a["id"] for a in truth["annotations"] if not a["iscrowd"])
    assert sorted([*pseudo, *unmatched]) == boxes  # every box once: a pseudo mask or listed
    assert all("segmentation" not in a for a in reference["unmatched_boxes"])
    assert all(a["pseudo"] and 0 <= a["score"] <= 1 for a in pseudo.values())
    order = reference["review_order"]
    assert order[: len(unmatched)] == sorted(unmatched)  # no mask at all: first
    scores = [pseudo[i]["score"] for i in order[len(unmatched) :]]
    assert scores == sorted(scores) and sorted(order) == boxes  # then the worst score first
    assert [im["id"] for im in reference["images"]] == sorted(im["id"] for im in truth["images"])
    info = reference["info"]
    assert (info["pseudo_masks"], info["unmatched_boxes"], info["boxes"]) == (len(pseudo), len(unmatched), len(boxes))
    assert info["quality"] is not None  # the synthetic split has true masks


def test_review_order_ties_by_id():
    assert review_order([5, 3, 4], [0.5, 0.5, 0.1], [9, 2]) == [2, 9, 4, 3, 5]
    assert review_order([], [], []) == []


def test_parts_are_written_image_by_image_before_the_merge(weights, data, tmp_path, monkeypatch):
    """What a process holds is one image: each record is on disk before the next image is
    labelled, and the merge reads the parts back."""
    from training.checkpoint import load_model

    out = tmp_path / "p.json"
    part = parts_dir(out) / "part-00000.jsonl"
    seen: list[int] = []
    label_image, merge = pseudo_label.pseudo_label_image, pseudo_label.merge_parts

    def counting_label_image(*args, **kwargs):
        seen.append(len(list(read_part(part))) if part.exists() else 0)
        return label_image(*args, **kwargs)

    def counting_merge(parts, dataset, *rest):
        seen.append(len(list(read_part(part))))
        return merge(parts, dataset, *rest)

    monkeypatch.setattr(pseudo_label, "pseudo_label_image", counting_label_image)
    monkeypatch.setattr(pseudo_label, "merge_parts", counting_merge)
    model, _ = load_model(weights)
    summary = pseudo_label.pseudo_label_to_file(model, data, "train", out, distributed=False)
    assert seen == list(range(7)) and summary["images"] == 6  # 6 images: 0..5 records before each, 6 at the merge
    assert not parts_dir(out).exists() and out.is_file()


def test_two_processes_write_what_one_process_writes(weights, data, reference, tmp_path):
    out = tmp_path / "two.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training",
        *_argv(weights, data, out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "2 processes" in proc.stderr  # rank 0's log: the images were shared out
    assert json.loads(out.read_text()) == reference
    assert not parts_dir(out).exists()


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_result(weights, data, reference, tmp_path, caplog):
    out = tmp_path / "killed.json"
    cmd = [sys.executable, str(REPO / "tests" / "training" / "pseudo_label_killer.py"), "4", *_argv(weights, data, out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    part = parts_dir(out) / "part-00000.jsonl"
    assert not out.exists() and len(list(read_part(part))) == 3  # 3 whole records ...
    assert not part.read_bytes().endswith(b"\n")  # ... and the cut fourth

    with caplog.at_level(logging.INFO, logger="training.pseudo_label"):
        assert _one_thread_main(_argv(weights, data, out)) == 0
    assert any("6 images, 3 already in" in r.getMessage() for r in caplog.records)  # resumed, not redone
    assert json.loads(out.read_text()) == reference
    assert not parts_dir(out).exists()


def test_parts_of_another_run_are_not_mixed_in(weights, data, tmp_path, capsys):
    out = tmp_path / "p.json"
    parts = parts_dir(out)
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps({"split": "train", "checkpoint_sha256": "another"}))
    assert main(_argv(weights, data, out)) == 2
    err = capsys.readouterr().err
    assert "holds the parts of another run" in err and "checkpoint_sha256" in err and not out.exists()


def test_the_teachers_views_are_chosen_on_the_command_line(weights, data, tmp_path, capsys, monkeypatch):
    """--flip and --extra-sizes reach the labeller and are part of the run's settings (so a
    rerun with other views does not resume from these parts); a size that is not one is refused."""
    out = tmp_path / "p.json"
    views, asked = pseudo_label.teacher_views, []
    monkeypatch.setattr(pseudo_label, "teacher_views", lambda model, images, *how: asked.append(how) or views(model, images, *how))
    assert _one_thread_main([*_argv(weights, data, out), "--flip", "--extra-sizes", "160", "96"]) == 0
    test = tiny_config().input  # the checkpoint's test scale, then the extra sizes, mirrored too
    assert asked == [([test.min_size_test, 160, 96], test.max_size_test, True)] * 6
    settings = json.loads(out.read_text())["info"]["settings"]
    assert settings["flip"] is True and settings["extra_sizes"] == [160, 96]
    with pytest.raises(SystemExit) as exit_info:
        main([*_argv(weights, data, tmp_path / "q.json"), "--extra-sizes", "0"])
    assert exit_info.value.code == 2 and "'0' is not a size in pixels" in capsys.readouterr().err
