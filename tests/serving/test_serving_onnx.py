"""The ONNX Runtime predictor and the API over it: the tiny checkpoint exported with
export.onnx_export (fixed 64x96 canvas: the quicker export), compared with eager PyTorch
on images whose resized size fills that canvas (so both see the same padded input)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import SMALL_SCALE, iou, shapes_image, tiny_config, write_checkpoint
from PIL import Image
from pycocotools import mask as mask_utils

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install boxteacher[export])")
onnx_export = pytest.importorskip("export.onnx_export", reason="export/onnx_export.py is not there yet")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2


def landscape(k: int) -> np.ndarray:
    """2:3 images: resized to exactly the 64x96 export canvas."""
    return shapes_image(31, k, 96, 144)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    ckpt = write_checkpoint(folder / "tiny.pth", tiny_config(overrides=SMALL_SCALE))
    onnx_path = onnx_export.export_checkpoint(ckpt, folder / "tiny.onnx", branch="teacher", dynamic=False)
    return ckpt, Path(onnx_path)


@pytest.fixture(scope="module")
def predictors(models):
    from serving.runtime import load_predictor

    ckpt, onnx_path = models
    return load_predictor(ckpt), load_predictor(onnx_path)


def test_onnx_predictor_matches_pytorch(predictors):
    torch_p, onnx_p = predictors
    assert onnx_p.runtime == "onnxruntime" and onnx_p.class_names == torch_p.class_names
    assert onnx_p.input_size["fixed"] == [64, 96]
    for k in range(2):
        im = landscape(k)
        a = torch_p.predict([im], score_threshold=0.0)[0]
        b = onnx_p.predict([im], score_threshold=0.0)[0]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.label == y.label
            assert x.mask_score == pytest.approx(y.mask_score, abs=1e-3)
            np.testing.assert_allclose(x.box, y.box, rtol=1e-3, atol=1e-2)
            assert iou(x.mask, y.mask) >= 0.99
        boxes = np.array([[5, 5, 60, 60], a[0].box, [80, 20, 140, 90]], dtype=np.float32)
        pa = torch_p.predict([im], boxes=[boxes])[0]
        pb = onnx_p.predict([im], boxes=[boxes])[0]
        assert [i.source for i in pa] == [i.source for i in pb] and pa[1].source == "matched"
        for x, y in zip(pa, pb):
            assert x.label == y.label and x.mask_score == pytest.approx(y.mask_score, abs=1e-3)
            assert iou(x.mask, y.mask) >= 0.99


def test_onnx_fixed_canvas_takes_any_aspect_ratio(predictors):
    _, onnx_p = predictors
    for h, w in ((150, 90), (64, 64), (40, 300)):
        out = onnx_p.predict([_any(h, w)], score_threshold=0.0)[0]
        assert all(i.mask.shape == (h, w) for i in out)
        boxed = onnx_p.predict([_any(h, w)], boxes=[np.array([[0, 0, w / 2, h / 2]], np.float32)])[0]
        assert len(boxed) == 1 and not boxed[0].mask[:, int(np.ceil(w / 2)) :].any()


def _any(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(h * 1000 + w)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_api_over_onnx(predictors):
    from serving.app import create_app
    from serving.local import LocalServer
    from serving.settings import ServeSettings

    _, onnx_p = predictors
    im = landscape(7)
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    settings = ServeSettings(score_threshold=0.0, max_batch_size=4)
    with LocalServer(create_app(settings, predictor=onnx_p)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        assert c.get("/v1/model").json()["runtime"] == "onnxruntime"
        body = c.post("/v1/segment", files={"image": ("a.png", buf.getvalue(), "image/png")}).json()
        assert body["model"]["runtime"] == "onnxruntime"
        expected = onnx_p.predict([im], score_threshold=0.0)[0]
        assert len(body["instances"]) == len(expected) > 0
        for got, want in zip(body["instances"], expected):
            mask = mask_utils.decode({"size": got["mask"]["size"], "counts": got["mask"]["counts"].encode()}).astype(bool)
            assert np.array_equal(mask, want.mask)
        boxes = [[10, 10, 50, 60], [70, 5, 140, 95]]
        body = c.post("/v1/segment", files={"image": ("a.png", buf.getvalue())}, data={"boxes": json.dumps(boxes)}).json()
        assert [i["box"] for i in body["instances"]] == [[float(v) for v in b] for b in boxes]


class _TorchOutputsModel:
    """Stands in for TensorRTModel (no TensorRT here): ``encode`` / ``prompt`` over ONNX
    Runtime, taking and returning torch tensors as the TensorRT plans do."""

    def __init__(self, onnx_model):
        self.onnx_model = onnx_model
        self.metadata = onnx_model.metadata

    def encode(self, images_padded, image_size):
        import torch

        raw = self.onnx_model.encode(images_padded.numpy(), np.asarray(image_size))
        return {k: torch.from_numpy(v) for k, v in raw.items()}

    def prompt(self, features, prompt_boxes):
        import torch

        raw = self.onnx_model.prompt({k: v.numpy() for k, v in features.items()}, prompt_boxes.numpy())
        return {k: torch.from_numpy(v) for k, v in raw.items()}


def test_tensorrt_predictor_path_with_a_stand_in_runner(models, predictors):
    """Everything of the TensorRT predictor but the engines: torch tensors in and out of both
    graphs, the metadata, the shared post-processing, the cache."""
    from serving.runtime import TensorRTPredictor, _ExportedPredictor

    _, onnx_path = models
    _, onnx_p = predictors
    trt_p = TensorRTPredictor.__new__(TensorRTPredictor)
    _ExportedPredictor.__init__(trt_p, _TorchOutputsModel(onnx_p.exported), onnx_path, "cpu")
    assert trt_p.runtime == "tensorrt" and trt_p.input_size == onnx_p.input_size
    im = landscape(9)
    boxes = np.array([[5, 5, 60, 60], [80, 20, 140, 90]], dtype=np.float32)
    for kwargs in ({"score_threshold": 0.0}, {"boxes": [boxes]}, {"boxes": [boxes]}):  # the second box request hits the cache
        a, b = onnx_p.predict([im], use_cache=False, **kwargs)[0], trt_p.predict([im], **kwargs)[0]
        assert len(a) == len(b) > 0
        assert all(np.array_equal(x.mask, y.mask) and x.mask_score == y.mask_score for x, y in zip(a, b))
    assert trt_p.cache.stats()["hits"] == 2


def test_onnx_cached_answers_equal_uncached(models):
    """Encode once, prompt many: the cached path gives the very same masks, scores, labels
    and sources as the uncached one (exact equality: same graphs on the same arrays)."""
    from serving.runtime import load_predictor

    _, onnx_path = models
    p = load_predictor(onnx_path)
    im = landscape(4)
    auto = p.predict([im], score_threshold=0.0, use_cache=False)[0]
    boxes = np.array([[5, 5, 60, 60], auto[0].box, [80, 20, 140, 90]], dtype=np.float32)
    uncached = p.predict([im], boxes=[boxes], use_cache=False)[0]
    assert p.cache.stats()["entries"] == 0
    first = p.predict([im], boxes=[boxes[:1]])[0]  # encodes and caches
    again = p.predict([im], boxes=[boxes])[0]  # prompt graph only
    cached_auto = p.predict([im], score_threshold=0.0)[0]
    assert p.cache.stats() | {"bytes": 0} == {
        "entries": 1,
        "bytes": 0,
        "max_bytes": p.cache.max_bytes,
        "hits": 2,
        "misses": 1,
        "evictions": 0,
    }
    for want, got in ((uncached, again), (uncached[:1], first), (auto, cached_auto)):
        assert len(want) == len(got) > 0
        for x, y in zip(want, got):
            assert (x.label, x.det_score, x.mask_score, x.source) == (y.label, y.det_score, y.mask_score, y.source)
            assert np.array_equal(x.box, y.box) and np.array_equal(x.mask, y.mask)
    assert [i.source for i in again][1] == "matched"
    p.close()
    assert p.cache.stats()["entries"] == 0


def test_engine_without_tensorrt_says_so(tmp_path, models):
    from export.metadata import read_onnx_metadata
    from serving.runtime import load_predictor

    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a plan")
    with pytest.raises(FileNotFoundError, match="sidecar"):
        load_predictor(engine)
    (tmp_path / "model.engine.json").write_text(json.dumps(read_onnx_metadata(models[1]).to_dict()))
    (tmp_path / "model.prompt.engine").write_bytes(b"not a plan either")
    with pytest.raises(Exception, match="(?i)tensorrt"):
        load_predictor(engine)
