"""``run_serve_benchmark`` end to end, kept tiny (2 requests per level): it starts the real
``boxteacher serve`` subprocess, measures both paths and reports the ratios."""

from __future__ import annotations

from helpers import tiny_config, write_checkpoint

from serving.benchmark import format_markdown, run_serve_benchmark


def test_serve_benchmark_runs(tmp_path):
    ckpt = write_checkpoint(tmp_path / "tiny.pth", tiny_config(overrides=["input.min_size_test=64", "input.max_size_test=96"]))
    result = run_serve_benchmark(
        ckpt, [1, 2], 2, image_size=(60, 80), num_images=2, max_batch_size=2, warmup_requests=1, compare_unbatched=False
    )
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "bare predictor, batch 1" and names.count("HTTP, max_batch_size=2") == 2
    assert all(r["errors"] == 0 and r["throughput_rps"] > 0 and r["p50_ms"] > 0 for r in result["rows"])
    assert result["http_overhead_c1"] is not None and result["batching_gain"] is not None
    table = format_markdown(result)
    assert "| HTTP, max_batch_size=2 | 2 |" in table and "HTTP overhead at concurrency 1" in table


def test_prompt_latency_runs_every_path(tmp_path):
    """``--prompts`` end to end, one small image: in process with the cache on and off, and
    through the server uploading every box's image or naming it by image_id."""
    from serving.benchmark import format_prompt_markdown, prompt_latency

    ckpt = write_checkpoint(tmp_path / "tiny.pth", tiny_config(overrides=["input.min_size_test=64", "input.max_size_test=96"]))
    result = prompt_latency(ckpt, [(60, 80)], num_images=1, boxes_per_image=3)
    paths = [(r["path"], r["cache"]) for r in result["rows"]]
    assert paths == [
        ("in process", "on"),
        ("in process", "off"),
        ("POST /v1/segment", "on"),
        ("POST /v1/segment, next boxes by image_id", "on"),
    ]
    assert all(r["image"] == "80x60" and r["first_box"]["n"] == 1 and r["next_boxes"]["n"] == 2 for r in result["rows"])
    assert "| POST /v1/segment, next boxes by image_id | on | 80x60 |" in format_prompt_markdown(result)
