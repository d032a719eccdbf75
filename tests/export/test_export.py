"""ONNX export of the tiny conditioned model (encoder + prompt graph): graph validity,
ONNX Runtime vs eager PyTorch (fewer than K, exactly K and zero detections; two input
sizes of one dynamic graph; box prompts through the prompt graph on the encoder's own
features), metadata, the CLI; TensorRT where it is installed.

One dynamic export per module (~40 s on 2 cores) and one fixed-size export through
the CLI (~15 s)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (pip install boxteacher[export])")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install boxteacher[export])")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install boxteacher[export])")

import onnx  # noqa: E402
from helpers import tiny_config, write_checkpoint  # noqa: E402

from export.check import compare_outputs, eager_outputs, exported_outputs, mask_iou  # noqa: E402
from export.metadata import ENCODER_INPUTS, ENCODER_OUTPUTS, PROMPT_INPUTS, PROMPT_OUTPUTS, prompt_path, read_onnx_metadata  # noqa: E402
from export.onnx_export import count_ops, export_checkpoint  # noqa: E402
from export.onnx_runtime import OnnxModel  # noqa: E402
from training.checkpoint import load_model, save_checkpoint  # noqa: E402
from training.cli import main  # noqa: E402

K = 20
# On cls*ctr. With it the tiny conditioned model finds fewer than K instances on the
# 128x160 canvas and more than K on 192x256 (checked on eager before each comparison).
THRESHOLD = 0.23
PROMPTS = torch.tensor(
    [[10.0, 12.0, 60.0, 70.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 150.0, 118.0], [30.0, 40.0, 35.0, 48.0], [-20.0, 60.0, 400.0, 300.0]]
)


def smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    """(3,h,w) uint8: a random low-frequency image (no exactly tied scores, unlike flat images)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g) * 255
    image = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (image + torch.rand(3, h, w, generator=g) * 40 - 20).clamp(0, 255).to(torch.uint8)


def noise_image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """(path, the two ONNX Runtime sessions, eager student) for a --dynamic export with K rows, traced at 192x256."""
    path = export_checkpoint(
        tiny_checkpoint,
        tmp_path_factory.mktemp("onnx") / "tiny-dynamic.onnx",
        branch="student",
        dynamic=True,
        input_size=(192, 256),
        max_detections=K,
        score_threshold=THRESHOLD,
    )
    model, _ = load_model(tiny_checkpoint, branch="student")
    return path, OnnxModel(path), model


def run_both(runner, model, image: torch.Tensor, prompts: torch.Tensor | None = None, threshold: float = THRESHOLD):
    """Exported and eager outputs for the same padded input."""
    batch, sizes = model.preprocess([image])
    out = exported_outputs(runner, batch.numpy(), sizes[0], None if prompts is None else prompts.numpy())
    ref = eager_outputs(model, batch, sizes[0], prompts, K, threshold)
    return out, ref, tuple(batch.shape[-2:])


def assert_parity(out: dict, ref: dict) -> dict:
    r = compare_outputs(out, ref)
    assert r["same_detections"] and r["same_order"], f"exported {out['labels'][: r['num_exported']]} vs eager {ref['labels']}"
    assert r["box_max_rel"] <= 1e-3
    assert r["det_score_max_abs"] <= 1e-4 and r["score_max_abs"] <= 1e-3
    n = r["num_exported"]
    if n:
        assert np.abs(out["masks"][:n] - ref["masks"]).max() <= 1e-4
        assert r["mask_ious"].min() >= 0.99
    assert r["padding_ok"]
    return r


# ---- the graph ------------------------------------------------------------------------
def test_graph_is_valid_with_nms_and_fixed_k_outputs(exported):
    path, runner, _ = exported
    prompt = onnx.load(str(prompt_path(path)))
    onnx.checker.check_model(prompt)
    assert [i.name for i in prompt.graph.input] == list(PROMPT_INPUTS) and [o.name for o in prompt.graph.output] == list(PROMPT_OUTPUTS)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert count_ops(model, "NonMaxSuppression") >= 1  # NMS stayed in the graph
    assert [i.name for i in model.graph.input] == list(ENCODER_INPUTS)
    assert [o.name for o in model.graph.output] == list(ENCODER_OUTPUTS)
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in [*model.graph.input, *model.graph.output]}
    assert dims["images"][:2] == [1, 3] and all(isinstance(d, str) for d in dims["images"][2:])  # dynamic H, W
    prompt_dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in prompt.graph.input}
    assert isinstance(prompt_dims["prompt_boxes"][0], str) and prompt_dims["prompt_boxes"][1] == 4  # dynamic P
    assert dims["boxes"] == [K, 4] and dims["labels"] == [K] and dims["num_detections"] == [1]
    assert dims["masks"][0] == K
    assert not Path(str(path) + ".data").exists() and not Path(str(prompt_path(path)) + ".data").exists()  # self-contained files
    assert runner.fixed_hw is None and runner.providers == ["CPUExecutionProvider"]


def test_metadata_round_trips(exported, tiny_checkpoint):
    path, _, model = exported
    cfg = model.cfg
    meta = read_onnx_metadata(path)
    assert meta.class_names == cfg.class_names == ["class_0", "class_1", "class_2"]
    assert meta.pixel_mean == cfg.input.pixel_mean and meta.pixel_std == cfg.input.pixel_std
    assert meta.channel_format == "RGB" and meta.size_divisibility == 32
    assert (meta.min_size_test, meta.max_size_test) == (cfg.input.min_size_test, cfg.input.max_size_test)
    assert meta.mask_threshold == 0.5 and meta.mask_stride == 4
    assert meta.max_detections == K and meta.score_threshold == THRESHOLD
    assert meta.dynamic is True and meta.input_size is None and meta.example_input_size == [192, 256]
    assert meta.branch == "student" and meta.iteration == 0
    import hashlib

    sha = hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()
    assert meta.checkpoint_sha256 == sha and meta.model_version.startswith(sha[:12])
    assert meta.boxteacher_version and meta.opset >= 11
    assert read_onnx_metadata(prompt_path(path)).model_version == meta.model_version  # the pair is checked when loading
    assert meta.extra == {}  # every key written is a typed field


# ---- ONNX Runtime vs eager --------------------------------------------------------------
@pytest.mark.parametrize("seed", [2, 3])
def test_fewer_than_k_detections_with_padding(exported, seed):
    """120x150 image: padded to 128x160 (the mask-aware score sees only the 120x150 region)."""
    _, runner, model = exported
    out, ref, hw = run_both(runner, model, smooth_image(120, 150, seed))
    assert hw == (128, 160)
    n = int(ref["num_detections"][0])
    assert 0 < n < K, f"precondition: the eager model should find 1..{K - 1} instances, found {n}"
    r = assert_parity(out, ref)
    assert int(out["num_detections"][0]) == n and r["matched"] == n
    assert np.all(out["labels"][n:] == -1) and np.all(out["boxes"][n:] == 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_exactly_k_detections_at_a_second_size(exported, seed):
    _, runner, model = exported
    out, ref, hw = run_both(runner, model, noise_image(192, 256, seed))
    assert hw == (192, 256)
    model_count = len(model.detect(*model(model.preprocess([noise_image(192, 256, seed)])[0]), [(192, 256)], THRESHOLD)[0].dets.labels)
    assert model_count > K, "precondition: the eager model should find more than K instances"
    assert int(out["num_detections"][0]) == K
    assert_parity(out, ref)
    assert np.all(out["labels"] >= 0)


def test_third_size_and_aspect(exported):
    _, runner, model = exported
    out, ref, hw = run_both(runner, model, smooth_image(250, 180, 3))
    assert hw == (256, 192)
    assert_parity(out, ref)


def test_prompt_outputs_equal_eager(exported):
    _, runner, model = exported
    out, ref, _ = run_both(runner, model, smooth_image(120, 150, 0), PROMPTS)
    r = assert_parity(out, ref)
    assert out["prompt_masks"].shape == (len(PROMPTS), 32, 40)
    assert r["prompt_labels_equal"]
    assert r["prompt_det_score_max_abs"] <= 1e-4
    assert np.abs(out["prompt_masks"] - ref["prompt_masks"]).max() <= 1e-4
    assert r["prompt_mask_ious"].min() >= 0.99
    # one prompt (P = 1) works too and does not change the detections
    single, _, _ = run_both(runner, model, smooth_image(120, 150, 0), PROMPTS[:1])
    assert np.array_equal(single["labels"], out["labels"]) and single["prompt_masks"].shape[0] == 1
    assert mask_iou(single["prompt_masks"] > 0.5, out["prompt_masks"][:1] > 0.5).min() == 1.0


# ---- the CLI: fixed size, zero detections --------------------------------------------------
@pytest.fixture(scope="module")
def cli_exported(tiny_checkpoint, tmp_path_factory):
    """`boxteacher export onnx` of the student at a fixed 128x160, threshold above every score."""
    out = tmp_path_factory.mktemp("cli") / "fixed.onnx"
    argv = ["export", "onnx", "--weights", str(tiny_checkpoint), "--output", str(out), "--input-size", "128", "160"]
    assert main(argv + ["--max-detections", str(K), "--score-threshold", "1.0"]) == 0
    return out


def test_cli_export_fixed_size_zero_detections(cli_exported, tiny_checkpoint, capsys):
    meta = read_onnx_metadata(cli_exported)
    assert meta.dynamic is False and meta.input_size == [128, 160] and meta.branch == "student"
    runner = OnnxModel(cli_exported)
    assert runner.fixed_hw == (128, 160)
    model, _ = load_model(tiny_checkpoint, branch="student")
    out, ref, _ = run_both(runner, model, smooth_image(128, 160, 5), PROMPTS, threshold=1.0)
    assert int(out["num_detections"][0]) == 0 == int(ref["num_detections"][0])
    assert np.all(out["labels"] == -1) and not out["scores"].any() and not out["det_scores"].any() and not out["masks"].any()
    r = compare_outputs(out, ref)
    assert r["padding_ok"] and r["prompt_labels_equal"] and r["prompt_mask_ious"].min() >= 0.99
    with pytest.raises(ValueError, match="fixed input of 128x160"):
        runner.encode(np.zeros((1, 3, 192, 256), np.float32), (192, 256))


def test_cli_names_the_teacher_branch_when_there_is_no_student(tmp_path, capsys):
    cfg = tiny_config()
    full = torch.load(write_checkpoint(tmp_path / "full.pth", cfg), weights_only=False)
    teacher_only = save_checkpoint(tmp_path / "teacher.pth", {"config": full["config"], "student": None, "teacher": full["teacher"]})
    assert main(["export", "onnx", "--weights", str(teacher_only), "--output", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "no 'student' weights" in err and "--branch teacher" in err
    assert main(["export", "onnx", "--weights", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "x.onnx")]) == 2
    assert "not found" in capsys.readouterr().err


def test_check_command_reports_parity_and_ap(exported, tiny_checkpoint, synthetic_dataset, tmp_path, capsys):
    path, _, _ = exported
    report_path = tmp_path / "check.json"
    argv = ["export", "check", "--weights", str(tiny_checkpoint), "--model", str(path), "--data", str(synthetic_dataset)]
    assert main(argv + ["--max-images", "3", "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    p = report["parity"]
    assert report["images"] == 3 and report["runtime"] == "onnxruntime" and report["branch"] == "student"
    assert p["num_exported"] == p["num_eager"] == p["matched"] and p["same_detections_images"] == 3
    assert p["box_max_rel"] <= 1e-3 and (p["mask_iou_min"] is None or p["mask_iou_min"] >= 0.99)
    assert report["exported"]["segm"] == report["eager"]["segm"]
    assert set(report["branches"]) == {"student", "teacher"}
    assert "segm AP" in capsys.readouterr().out


def test_benchmark_runs_on_the_same_inputs(exported, tiny_checkpoint):
    from export.benchmark import benchmark_inference, format_table

    path, _, _ = exported
    result = benchmark_inference(tiny_checkpoint, path, iters=2, warmup=1, num_images=2, input_size=(128, 160))
    assert [r["runtime"] for r in result["rows"]] == ["pytorch-eager", "onnxruntime"]
    assert result["rows"][0]["speedup_vs_eager"] == 1.0 and result["rows"][1]["median_ms"] > 0
    assert "| onnxruntime | cpu |" in format_table(result)


# ---- TensorRT ------------------------------------------------------------------------------
def _tensorrt_available() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install boxteacher[tensorrt])"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU"
    return None


def test_tensorrt_cli_says_when_tensorrt_is_missing(exported, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    path, _, _ = exported
    assert main(["export", "tensorrt", "--onnx", str(path), "--output", str(tmp_path / "m.engine"), "--fp16"]) == 2
    assert "TensorRT is not installed: pip install boxteacher[tensorrt]" in capsys.readouterr().err
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.gpu
@pytest.mark.skipif(_tensorrt_available() is not None, reason=str(_tensorrt_available()))
def test_tensorrt_engine_matches_eager(exported, tmp_path):
    from export.metadata import read_engine_metadata, sidecar_path
    from export.tensorrt_build import build_engine
    from export.tensorrt_runtime import TensorRTModel

    path, _, model = exported
    engine = build_engine(path, tmp_path / "tiny.engine", min_shape=(64, 64), opt_shape=(192, 256), max_shape=(256, 320))
    meta = read_engine_metadata(engine)
    assert sidecar_path(engine).is_file() and prompt_path(engine).is_file()
    assert meta.class_names == model.cfg.class_names and meta.extra["precision"] == "fp32"
    runner = TensorRTModel(engine)
    for image in (smooth_image(120, 150, 0), noise_image(192, 256, 0)):
        out, ref, _ = run_both(runner, model, image, PROMPTS)
        r = compare_outputs(out, ref)
        assert r["same_detections"] and r["box_max_rel"] <= 1e-3 and r["padding_ok"]
        assert r["mask_ious"].size == 0 or r["mask_ious"].mean() >= 0.99
        assert r["prompt_labels_equal"]


def test_tensorrt_profile_shapes_follow_the_onnx_metadata():
    """The optimisation-profile rules need no TensorRT: fixed graphs fix all three shapes."""
    from export.metadata import build_metadata
    from export.tensorrt_build import _shape_triplet

    cfg = tiny_config(overrides=["input.min_size_test=800", "input.max_size_test=1333"])

    def meta(dynamic: bool, size: tuple[int, int]):
        return build_metadata(cfg, branch="student", max_detections=K, score_threshold=0.05, dynamic=dynamic, input_size=size)

    fixed = meta(False, (128, 160))
    assert _shape_triplet(fixed, None, None, None) == ((128, 160),) * 3
    with pytest.raises(ValueError, match="fixed input"):
        _shape_triplet(fixed, None, (192, 256), None)
    dynamic = meta(True, (800, 1088))
    assert _shape_triplet(dynamic, None, None, None) == ((416, 416), (800, 1088), (1344, 1344))
    assert _shape_triplet(dynamic, (320, 320), (800, 1344), (1344, 1344))[1] == (800, 1344)
    with pytest.raises(ValueError, match="multiples of 32"):
        _shape_triplet(dynamic, None, (801, 1088), None)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        _shape_triplet(dynamic, (896, 896), (800, 1088), None)
