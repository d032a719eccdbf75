"""The quality benchmark's bookkeeping: variants, seeds, summaries and the collapse column."""

from __future__ import annotations

import json
import math

import pytest

from training.benchmark import collapse_warning, format_quality_table, load_variants, summarize_rows


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
