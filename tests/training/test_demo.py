"""The demo: its recipe, its table, its serving hints, and the whole pipeline on a tiny run."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from training.demo import TABLE_HEADER, MethodResult, demo_config, format_table, run_demo, serve_instructions


def _result(method: str, ap: float, ap50: float, boxfill: float, pseudo: dict | None) -> MethodResult:
    return MethodResult(method, Path("m.pth"), {"AP": ap, "AP50": ap50}, {"AP": 0.0}, {"AP": boxfill}, pseudo)


def test_demo_config_is_the_tiny_recipe_shortened():
    cfg = demo_config("boxteacher", 10)
    assert cfg.method == "boxteacher"
    assert cfg.solver.max_iter == 10 and cfg.solver.steps == [8] and cfg.train.checkpoint_period == 0
    assert cfg.model.fpn_channels == 64  # the rest is configs/synthetic-tiny.yaml
    assert demo_config("condinst", 600).solver.steps == [480]


def test_format_table_by_hand():
    rows = [
        _result("boxteacher", 5.04, 14.96, 1.26, {"mean_iou": 0.6123, "boxfill_iou": 0.5141}),
        _result("condinst", 9.1, 21.8, 2.3, None),
    ]
    assert format_table(rows).splitlines() == [
        "| method | trained on | segm AP | AP50 | box-fill segm AP | pseudo-mask IoU | filled-box IoU |",
        "|---|---|---|---|---|---|---|",
        "| boxteacher | boxes only | 5.0 | 15.0 | 1.3 | 0.612 | 0.514 |",
        "| condinst | masks | 9.1 | 21.8 | 2.3 | - | - |",
    ]


def test_serve_instructions_name_the_model_image_and_port():
    text = serve_instructions(Path("demo/run/model_final.pth"), Path("demo/data/images/000201.png"), 8123)
    assert "boxteacher serve --model demo/run/model_final.pth --host 127.0.0.1 --port 8123" in text
    assert "curl -s -F image=@demo/data/images/000201.png 'http://127.0.0.1:8123/v1/segment?mask_format=none'" in text
    assert "-F 'boxes=[[10,10,80,80]]' http://127.0.0.1:8123/v1/segment" in text


def test_demo_end_to_end_on_a_tiny_run(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo(out, iters=2, train_images=4, val_images=3, sheets=2, progress=False, overrides=["solver.batch_size=2"])
    printed = capsys.readouterr().out
    assert "boxes and classes only (its data loader decodes no mask)" in printed
    header = "| " + " | ".join(TABLE_HEADER) + " |"
    assert header in printed and (out / "summary.md").read_text().splitlines()[0] == header
    assert [r.method for r in result.results] == ["boxteacher"]
    assert result.results[0].pseudo is not None  # the synthetic train split has hidden masks to measure against
    assert set(result.results[0].segm) >= {"AP", "AP50"}
    for name in ("metrics.json", "metrics-boxfill.json", "pseudo-train.json"):
        assert (out / "eval" / name).is_file()
    assert len(result.sheets) == 2
    for sheet in result.sheets:
        assert Image.open(sheet).size[0] == 4 * 512 + 5 * 8  # four 512-px panels (128-px images, 4x)
    assert Image.open(result.contact_sheet).size[1] > 2 * 512
    assert "curl -s -F image=@" in printed and (out / "run" / "model_final.pth").is_file()
