"""The quality benchmark's bookkeeping: variants, seeds, summaries and the collapse column."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from training.benchmark import (
    cmd_quality,
    collapse_warning,
    dead_mask_head,
    format_quality_table,
    load_variants,
    quality_jobs,
    summarize_rows,
    threads_per_job,
)


def _row(method, seed, segm, variant="", collapse=None, outside=0.05):
    return {
        "method": method, "variant": variant, "seed": seed, "segm_AP": segm, "segm_AP50": 2 * segm, "segm_AP75": 0.0,
        "bbox_AP": 30.0 + seed, "boxfill_segm_AP": 1.0, "rho_cls": 0.3, "rho_mask_aware": float("nan"),
        "outside_box": outside, "pseudo_iou": 0.6, "pseudo_boxfill_iou": 0.5, "collapse": collapse, "train_s": 100.0,
    }  # fmt: skip


def test_summaries_mean_min_max_over_seeds():
    rows = [_row("boxinst", s, segm) for s, segm in enumerate([10.0, 13.0, 16.0])] + [_row("condinst", 0, 20.0, collapse="x")]
    summary = {s["method"]: s for s in summarize_rows(rows)}
    assert summary["boxinst"]["segm_AP"] == (13.0, 10.0, 16.0)
    assert summary["boxinst"]["bbox_AP"] == (31.0, 30.0, 32.0)
    assert summary["boxinst"]["seeds"] == 3 and summary["boxinst"]["collapsed"] == 0
    assert summary["condinst"]["collapsed"] == 1
    assert all(math.isnan(v) for v in summary["boxinst"]["rho_mask_aware"])  # NaNs are left out, not averaged
    table = format_quality_table(summarize_rows(rows))
    assert "| boxinst | 3 | 13.0 (10.0-16.0) |" in table and "| condinst | 1 | 20.0 |" in table and "| 1/1 |" in table


def test_a_run_whose_masks_are_no_better_than_filled_boxes_counts_as_collapsed():
    healthy = _row("boxteacher", 0, 20.6)  # box-fill 1.0, pseudo masks 0.6 against 0.5
    dead = {**_row("boxteacher", 1, 0.0), "pseudo_iou": 0.225}  # the detector silent
    worse_pseudo = {**_row("boxteacher", 2, 20.9), "pseudo_iou": 0.4}
    assert dead_mask_head(healthy) is None
    assert "segm AP 0.0, box-fill 1.0" in dead_mask_head(dead)
    assert "IoU 0.400 against 0.500" in dead_mask_head(worse_pseudo)
    assert dead_mask_head(_row("boxinst", 0, 20.0, collapse="mask head collapse at iteration 40")) == "mask head collapse at iteration 40"
    (summary,) = summarize_rows([healthy, dead, worse_pseudo])
    assert summary["collapsed"] == 2


def test_variants_file_splices_aliases(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("base: &base [a=1, b=2]\none: [*base, c=3]\nempty:\n")
    assert load_variants(str(path)) == {"base": ["a=1", "b=2"], "one": ["a=1", "b=2", "c=3"], "empty": []}
    assert load_variants(None) == {"": []}
    path.write_text("just a string\n")
    with pytest.raises(ValueError, match="mapping"):
        load_variants(str(path))


def test_collapse_warning_read_from_the_log(tmp_path):
    assert collapse_warning(tmp_path) is None
    (tmp_path / "log.jsonl").write_text(
        json.dumps({"iteration": 20, "loss": 1.0}) + "\n" + json.dumps({"iteration": 40, "warning": "mask head collapse"}) + "\n"
    )
    assert collapse_warning(tmp_path) == "mask head collapse"


def _quality_args(tmp_path, jobs, seeds=2, methods="condinst,boxinst", first_seed=0):
    return argparse.Namespace(
        data="unused", config="unused", output=str(tmp_path), methods=methods, device="cpu",
        seeds=seeds, first_seed=first_seed, variants=None, jobs=jobs, overrides=["solver.max_iter=5"],
    )  # fmt: skip


def test_threads_per_job_shares_the_cpus():
    assert threads_per_job(1, cpus=2) == 2
    assert threads_per_job(2, cpus=2) == 1
    assert threads_per_job(3, cpus=2) == 1  # never 0
    assert threads_per_job(2, cpus=16) == 8
    assert threads_per_job(3, cpus=16) == 5


def test_quality_jobs_in_table_order(tmp_path):
    jobs = quality_jobs(_quality_args(tmp_path, jobs=1))
    assert [(m, d.name) for _, m, _, d in jobs] == [
        ("condinst", "condinst-seed0"), ("condinst", "condinst-seed1"), ("boxinst", "boxinst-seed0"), ("boxinst", "boxinst-seed1"),
    ]  # fmt: skip
    assert jobs[3][2] == ["solver.max_iter=5", "train.seed=1"]


def test_first_seed_adds_seeds_after_earlier_runs(tmp_path):
    """--first-seed 2 --seeds 1 trains only seed 2; its folder name and train.seed say so."""
    jobs = quality_jobs(_quality_args(tmp_path, jobs=1, seeds=1, first_seed=2))
    assert [(m, d.name, o[-1]) for _, m, o, d in jobs] == [
        ("condinst", "condinst-seed2", "train.seed=2"), ("boxinst", "boxinst-seed2", "train.seed=2"),
    ]  # fmt: skip


@pytest.mark.parametrize("jobs", [1, 2])
def test_parallel_runs_give_the_table_in_order(tmp_path, jobs):
    """--jobs 2 runs each (method, seed) in a worker process; the finished runs (row.json)
    are read back there, so the rows and the table are the same as with --jobs 1."""
    args = _quality_args(tmp_path, jobs)
    for _, method, _, run_dir in quality_jobs(args):
        run_dir.mkdir()
        seed = int(run_dir.name[-1])
        (run_dir / "row.json").write_text(json.dumps({k: v for k, v in _row(method, seed, 10.0 + seed).items() if k != "variant"}))
    assert cmd_quality(args) == 0
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("condinst", 0), ("condinst", 1), ("boxinst", 0), ("boxinst", 1)]
    assert "| condinst | 2 | 10.5 (10.0-11.0) |" in (tmp_path / "quality.md").read_text()


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--jobs"):
        cmd_quality(_quality_args(tmp_path, jobs=0))
