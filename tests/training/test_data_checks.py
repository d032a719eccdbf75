"""``boxteacher check-data`` and the same checks in front of train, eval and pseudo-label.

Two dataset folders built here from the synthetic shapes (64 px): ``skippable`` has every
problem that is skipped or kept (malformed, NaN/inf, empty and outside boxes, a box
partly outside, an annotation of an undeclared image, a missing, an unreadable and a
wrongly sized image file, two entries for one file, a crowd-only image, a segmentation
that is not one); ``fatal`` has all of those plus the fatal ones (an unknown category
id, a duplicate image id) and two more splits: ``empty`` (no annotations) and
``broken`` (not JSON). Each problem sits on known ids, so the report is checked by count
and example, and the commands by the one line they print.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import REPO

from training.cli import main
from training.data.checks import KINDS, DataError, check_split
from training.data.coco import CocoInstances

SMALL = ["input.min_size_train=[64]", "input.max_size_train=96", "input.min_size_test=64", "input.max_size_test=96",
         "boxteacher.teacher_min_size=64", "boxteacher.teacher_max_size=96", "solver.batch_size=2",
         "model.backbone.freeze_at=5", "method=boxinst", "solver.max_iter=1", "solver.warmup_iters=0"]  # fmt: skip

# kind -> (count, ids its examples name); image 2's file is gone, image 3's is not an image,
# image 4 declares 100x100 for a 64x64 file, image 20 names image 5's file, image 7's
# annotations are all crowd; the annotations 10xx are added to image 1 (64x64).
SKIPPABLE = {
    "bad_bbox": (2, ["annotation 1001", "annotation 1002"]),
    "nonfinite_bbox": (2, ["annotation 1003", "annotation 1004"]),
    "empty_bbox": (2, ["annotation 1005", "annotation 1006"]),
    "bbox_outside": (1, ["annotation 1007"]),
    "orphan_annotation": (1, ["annotation 1010: image 777"]),
    "missing_image": (1, ["image 2"]),
    "unreadable_image": (1, ["image 3"]),
    "size_mismatch": (1, ["image 4"]),
    "bbox_clamped": (1, ["annotation 1008"]),
    "duplicate_file_name": (1, ["000005.png (images 5 and 20)"]),
    "crowd_only": (1, ["image 7"]),
    "bad_segmentation": (1, ["annotation 1011"]),
}
FATAL = {"duplicate_image_id": (1, ["image 6"]), "unknown_category": (1, ["annotation 1009: category 999"])}


def _box(ann_id: int, image_id: int, bbox, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "iscrowd": 0, "area": 25.0, **extra}


def _write_problem_dataset(root: Path, fatal: bool) -> Path:
    from training.data.synthetic import make_synthetic

    make_synthetic(root, train=8, val=3, size=64, seed=0)
    ann_file = root / "annotations" / "train.json"
    data = json.loads(ann_file.read_text())
    assert any(a["image_id"] == 7 for a in data["annotations"])
    data["annotations"] += [
        _box(1001, 1, "2, 34, 28, 29"),
        _box(1002, 1, [1, 2, 3]),
        _box(1003, 1, [float("nan"), 1, 5, 5]),
        _box(1004, 1, [1, 1, float("inf"), 5]),
        _box(1005, 1, [1, 1, 0, 5]),
        _box(1006, 1, [10, 10, -3, 5]),
        _box(1007, 1, [100, 100, 5, 5]),
        _box(1008, 1, [50, 50, 30, 30]),
        _box(1010, 777, [1, 1, 5, 5]),
        _box(1011, 1, [2, 2, 10, 10], segmentation="a mask, in words"),
    ]
    (root / "images" / "000002.png").unlink()
    (root / "images" / "000003.png").write_bytes(b"not an image")
    images = {im["id"]: im for im in data["images"]}
    images[4].update(width=100, height=100)
    data["images"].append({"id": 20, "file_name": "000005.png", "width": 64, "height": 64})
    for a in data["annotations"]:
        if a["image_id"] == 7:
            a["iscrowd"] = 1
    if fatal:
        data["annotations"].append(_box(1009, 1, [2, 2, 10, 10], category_id=999))
        data["images"].append({"id": 6, "file_name": "another.png", "width": 64, "height": 64})
        val = json.loads((root / "annotations" / "val.json").read_text())
        (root / "annotations" / "empty.json").write_text(json.dumps({**val, "annotations": []}))
        (root / "annotations" / "broken.json").write_text('{"images": [{"id": 1, ')
    ann_file.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    return root


@pytest.fixture(scope="module")
def skippable(tmp_path_factory) -> Path:
    return _write_problem_dataset(tmp_path_factory.mktemp("skippable") / "data", fatal=False)


@pytest.fixture(scope="module")
def fatal(tmp_path_factory) -> Path:
    return _write_problem_dataset(tmp_path_factory.mktemp("fatal") / "data", fatal=True)


def _assert_problems(report: dict, expected: dict[str, tuple[int, list[str]]]) -> None:
    found = {p["kind"]: p for p in report["problems"]}
    assert set(found) == set(expected), report["problems"]
    for kind, (count, ids) in expected.items():
        assert found[kind]["count"] == count, (kind, found[kind])
        for name in ids:  # "image 2" must not match "image 20"
            assert any(re.match(re.escape(name) + r"(?!\d)", e) for e in found[kind]["examples"]), (kind, name, found[kind])


def _error_lines(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"boxteacher {command}: error:")]


# ---- check-data ---------------------------------------------------------------------------------
def test_check_data_finds_every_problem_with_counts_and_examples(fatal, capsys):
    assert main(["check-data", str(fatal), "--json"]) == 1  # cannot proceed
    reports = {Path(r["file"]).stem: r for r in json.loads(capsys.readouterr().out)}
    assert list(reports)[0] == "train" and set(reports) == {"train", "val", "empty", "broken"}
    train = reports["train"]
    assert not train["usable"] and train["images"] == 10 and train["categories"] == 7
    _assert_problems(train, {**SKIPPABLE, **FATAL})
    severities = {p["kind"]: p["severity"] for p in train["problems"]}
    assert {k for k, s in severities.items() if s == "fatal"} == set(FATAL)
    assert {k for k, s in severities.items() if s == "kept"} == {"bbox_clamped", "duplicate_file_name", "crowd_only", "bad_segmentation"}
    assert train["annotations_without_mask"] >= 1  # 1011 (its segmentation was not one)
    assert not reports["empty"]["usable"] and [p["kind"] for p in reports["empty"]["problems"]] == ["no_boxes"]
    assert not reports["broken"]["usable"] and [p["kind"] for p in reports["broken"]["problems"]] == ["unparseable"]
    assert "not valid JSON" in reports["broken"]["problems"][0]["examples"][0]
    assert reports["val"]["usable"] and reports["val"]["problems"] == []


def test_check_data_exit_codes_and_text(skippable, fatal, tmp_path, capsys):
    assert main(["check-data", str(skippable)]) == 0  # skipped and kept problems: training can proceed
    out, err = capsys.readouterr()
    assert "-> usable" in out and "training can proceed" in err
    for kind, (count, ids) in SKIPPABLE.items():
        assert f"{count}  {KINDS[kind][1]}" in out and all(i in out for i in ids), kind
    assert main(["check-data", str(fatal), "--split", "train", "--images", "exists"]) == 1
    out, err = capsys.readouterr()
    assert "NOT usable" in out and "annotation 1009: category 999" in out
    assert "cannot proceed" in err
    assert "unreadable" not in out  # --images exists opens no file
    assert main(["check-data", str(tmp_path / "nowhere")]) == 2
    assert _error_lines(capsys.readouterr().err, "check-data")


def test_the_reader_stops_with_one_line_or_warns_once_with_the_counts(skippable, fatal):
    with pytest.raises(DataError) as err:
        CocoInstances(fatal, "train")
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(fatal / "annotations" / "train.json"))
    assert "image 6" in message and "annotation 1009: category 999" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoInstances(skippable, "train")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert "skipped 2 bbox is not a list of 4 numbers" in str(caught[0].message)
    assert 2 not in dataset.image_ids and 7 in dataset.image_ids  # missing file out, crowd-only in
    assert all(a.get("iscrowd") in (0, 1) and a["area"] > 0 for a in dataset.coco.dataset["annotations"])
    assert check_split(skippable, "train").usable


# ---- the commands on bad data -----------------------------------------------------------------------
def test_train_eval_pseudo_label_stop_with_one_line_on_fatal_data(fatal, tiny_checkpoint, tmp_path, capsys):
    runs = {
        "train": [
            "train",
            "--config",
            str(REPO / "configs" / "synthetic-tiny.yaml"),
            "--data",
            str(fatal),
            "--output",
            str(tmp_path / "t"),
            "--no-progress",
            *SMALL,
        ],
        "eval": ["eval", "--weights", str(tiny_checkpoint), "--data", str(fatal), "--split", "train", "--output", str(tmp_path / "e")],
        "pseudo-label": ["pseudo-label", "--weights", str(tiny_checkpoint), "--data", str(fatal), "--output", str(tmp_path / "p.json")],
    }
    for command, argv in runs.items():
        assert main(argv) != 0, command
        (line,) = _error_lines(capsys.readouterr().err, command)
        assert str(fatal / "annotations" / "train.json") in line and "annotation 1009: category 999" in line and "image 6" in line
    assert not (tmp_path / "t" / "model_final.pth").exists() and not (tmp_path / "p.json").exists()
    for split, why in (("broken", "not valid JSON"), ("empty", "no usable box")):
        assert (
            main(
                [
                    "pseudo-label",
                    "--weights",
                    str(tiny_checkpoint),
                    "--data",
                    str(fatal),
                    "--split",
                    split,
                    "--output",
                    str(tmp_path / "q.json"),
                ]
            )
            != 0
        )
        (line,) = _error_lines(capsys.readouterr().err, "pseudo-label")
        assert f"{split}.json" in line and why in line


def test_train_eval_pseudo_label_proceed_with_one_warning_on_skippable_data(skippable, tiny_checkpoint, tmp_path, capsys):
    train_file = str(skippable / "annotations" / "train.json")

    def run(argv: list[str]) -> list[str]:
        """main(argv) == 0; the checks' warnings (each one line, about train.json)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])
        checks = [str(w.message) for w in caught if str(w.message).startswith(train_file)]
        assert len(checks) == 1 and "\n" not in checks[0], checks  # every reader of the split warns alike
        assert "skipped 2 bbox has NaN or infinite values" in checks[0] and "skipped 1 image files not found" in checks[0]
        return checks

    run(["train", "--config", str(REPO / "configs" / "synthetic-tiny.yaml"), "--data", str(skippable), "--output", str(tmp_path / "t"),
         "--no-eval", "--no-progress", *SMALL])  # fmt: skip
    assert (tmp_path / "t" / "model_final.pth").is_file()

    run(
        [
            "eval",
            "--weights",
            str(tiny_checkpoint),
            "--data",
            str(skippable),
            "--split",
            "train",
            "--output",
            str(tmp_path / "e"),
            "--max-images",
            "3",
        ]
    )
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["segm"] is None and "AP" in metrics["bbox"]  # annotation 1011 has no mask: box AP only
    assert "annotation 1011" in capsys.readouterr().err

    run(["pseudo-label", "--weights", str(tiny_checkpoint), "--data", str(skippable), "--output", str(tmp_path / "p.json")])
    result = json.loads((tmp_path / "p.json").read_text())
    labelled = {im["id"] for im in result["images"]}
    assert 2 not in labelled and 3 not in labelled and 4 not in labelled  # missing, unreadable, wrongly sized
    boxes = {a["id"] for a in result["annotations"]} | {a["id"] for a in result["unmatched_boxes"]}
    assert 1008 in boxes and not boxes & {1001, 1002, 1003, 1004, 1005, 1006, 1007, 1010}


def test_val_without_masks_stops_training_before_it_starts(skippable, tmp_path, capsys):
    """Evaluation after training measures mask AP: a box-only val split is named at once."""
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "images").symlink_to(skippable / "images")
    (data / "annotations" / "train.json").write_text((skippable / "annotations" / "train.json").read_text())
    val = json.loads((skippable / "annotations" / "val.json").read_text())
    for a in val["annotations"]:
        del a["segmentation"]
    (data / "annotations" / "val.json").write_text(json.dumps(val))
    argv = [
        "train",
        "--config",
        str(REPO / "configs" / "synthetic-tiny.yaml"),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "t"),
        "--no-progress",
        *SMALL,
    ]
    assert main(argv) != 0
    (line,) = _error_lines(capsys.readouterr().err, "train")
    assert "val.json" in line and "without a mask" in line and "--no-eval" in line


def test_no_traceback_from_the_command_line(fatal, tmp_path):
    cmd = [sys.executable, "-m", "training", "train", "--config", str(REPO / "configs" / "synthetic-tiny.yaml"), "--data", str(fatal),
           "--output", str(tmp_path / "t"), "--no-progress", *SMALL]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("boxteacher train: error: ") and "annotation 1009: category 999" in lines[0], lines
