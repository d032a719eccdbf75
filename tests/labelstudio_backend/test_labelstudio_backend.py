"""Unit tests of the Label Studio backend: brush RLE, geometry, label mapping, image
fetching rules (SSRF), predictions per mode, the HTTP routes, and the training manager.

A fake predictor (filled boxes) keeps most tests fast; one test runs the tiny checkpoint."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelstudio_backend.images import HostAllowlist, ImageCache, ImageFetcher, ImageFetchError, Origin, UrlNotAllowed, jwt_claims
from labelstudio_backend.label_config import LabelConfigError, class_to_label_map, label_to_class_map, parse_label_config
from labelstudio_backend.model import ModelHolder
from labelstudio_backend.predict import PredictOptions, TaskPredictor, aggregate_score, annotator_rectangles
from labelstudio_backend.regions import brush_result, mask_to_rle, percent_to_pixels, pixels_to_percent, rectangles_in, rle_to_mask
from serving.cache import image_digest
from serving.runtime import ImageRef, Instance

XML = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Person" predicted_values="pedestrian,class_1"/>
    <Label value="Car"/>
  </RectangleLabels>
  <BrushLabels name="mask" toName="image">
    <Label value="person"/>
    <Label value="Car"/>
  </BrushLabels>
</View>"""


# ---- fakes and helpers ----------------------------------------------------------------------
class FakePredictor:
    """The Predictor contract with filled-box masks; records the calls."""

    runtime = "fake"
    device = "cpu"
    path = None

    def __init__(self, class_names=("car", "class_1", "dog"), version="abcdef0123456789"):
        self.name, self.version, self.class_names = "fake", version, list(class_names)
        self.calls: list[tuple[int, list]] = []

    def predict(self, images, boxes=None, score_threshold=None, max_instances=None, use_cache=True):
        boxes = boxes if boxes is not None else [None] * len(images)
        self.calls.append((len(images), [None if b is None else len(b) for b in boxes]))
        self.cached = getattr(self, "cached", []) + [use_cache]
        self.images = getattr(self, "images", []) + [list(images)]
        out = []
        for image, b in zip(images, boxes):
            h, w = image.hw if isinstance(image, ImageRef) else image.shape[:2]
            if b is None:  # two detections: class 0 (car) and class 2 (dog, unmapped)
                b_det = np.array([[1, 1, w // 2, h // 2], [w // 2, h // 2, w - 1, h - 1]], dtype=np.float32)
                out.append([self._inst(b_det[0], 0, h, w, 0.9), self._inst(b_det[1], 2, h, w, 0.7)])
            else:
                out.append([self._inst(box, 1, h, w, 0.5 + 0.1 * k) for k, box in enumerate(np.asarray(b))])
        return out

    def _inst(self, box, label, h, w, score):
        mask = np.zeros((h, w), dtype=bool)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        mask[y0:y1, x0:x1] = True
        return Instance(np.asarray(box, dtype=np.float32), label, self.class_names[label], score, score, mask, "prompt")

    def close(self):
        pass


def png_bytes(w=64, h=48, seed=0) -> bytes:
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def data_url(w=64, h=48, seed=0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(w, h, seed)).decode()


def rect(x, y, w, h, label="Person", rid="r1", to_name="image", rotation=0):
    return {
        "id": rid,
        "type": "rectanglelabels",
        "from_name": "box",
        "to_name": to_name,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
    }


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves /img.png, /big, /redirect?to=URL, /api/token/refresh/; records headers."""

    seen: list[tuple[str, dict]] = []
    image = png_bytes()

    def do_GET(self):  # noqa: N802
        type(self).seen.append((self.path, dict(self.headers)))
        if self.path.startswith("/redirect"):
            target = self.path.split("to=", 1)[1]
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()
        elif self.path.startswith("/img.png") or self.path.startswith("/data/upload/"):
            self._send(200, self.image, "image/png")
        elif self.path == "/big":
            self._send(200, b"x" * 200_000, "image/png")
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).seen.append((self.path, dict(self.headers)))
        if self.path == "/api/token/refresh/" and json.loads(body).get("refresh") == PAT:
            self._send(200, json.dumps({"access": ACCESS}).encode(), "application/json")
        else:
            self._send(401, b"{}", "application/json")

    def _send(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _jwt(claims: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{enc({'alg': 'HS256'})}.{enc(claims)}.signature"


PAT = _jwt({"token_type": "refresh", "exp": 9999999999})
ACCESS = _jwt({"token_type": "access", "exp": int(time.time()) + 300})


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def config():
    return parse_label_config(XML)


def make_predictor(predictor=None, batch_size=4, **kw) -> TaskPredictor:
    holder = ModelHolder(predictor or FakePredictor())
    fetcher = ImageFetcher(**kw)
    return TaskPredictor(holder, fetcher, PredictOptions(batch_size=batch_size))


# ---- brush RLE -------------------------------------------------------------------------------
BRUSH_CASES = ["empty", "full", "pixel", "corner", "last", "ellipse", "noise", "stripes", "rows", "band"]


def _brush_case(case: str, h: int = 37, w: int = 53) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return {
        "empty": np.zeros((h, w), bool),
        "full": np.ones((h, w), bool),
        "pixel": (yy == 5) & (xx == 7),
        "corner": (yy < 3) & (xx < 4),  # starts at the first pixel
        "last": (yy == h - 1) & (xx >= w - 2),  # ends at the last pixel
        "ellipse": ((xx - 25) / 20.0) ** 2 + ((yy - 18) / 11.0) ** 2 <= 1,
        "noise": np.random.default_rng(1).random((h, w)) > 0.5,
        "stripes": (xx // 3) % 2 == 0,
        "rows": (yy >= 4) & (yy < 9),  # whole rows: one run across row ends
        "band": (xx >= w - 5) | (xx < 2),  # runs continuing from one row's end into the next row's start
    }[case]


@pytest.mark.parametrize("case", BRUSH_CASES)
def test_brush_rle_is_byte_for_byte_label_studio_sdks(case):
    from label_studio_sdk.converter.brush import mask2rle

    mask = _brush_case(case)
    assert mask_to_rle(mask) == mask2rle(np.where(mask, 255, 0).astype(np.uint8))


def test_brush_rle_of_long_runs_matches_label_studio_sdk():
    """Runs over 2**16 values (16384 pixels x RGBA) are written in 2**16 pieces."""
    from label_studio_sdk.converter.brush import mask2rle

    mask = np.zeros((300, 400), bool)
    mask[50:250] = True  # 80000 pixels = 320000 values in one run
    mask[260, 10:20] = True
    assert mask_to_rle(mask) == mask2rle(np.where(mask, 255, 0).astype(np.uint8))
    assert mask_to_rle(np.ones((128, 128), bool)) == mask2rle(np.full((128, 128), 255, np.uint8))  # exactly 2**16 values


@pytest.mark.parametrize("case", BRUSH_CASES)
def test_brush_rle_round_trips_through_the_sdk_decoder(case):
    from label_studio_sdk.converter.brush import decode_rle

    h, w = 37, 53
    mask = _brush_case(case, h, w)
    rle = mask_to_rle(mask)
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
    rgba = decode_rle(rle).reshape(h, w, 4)
    assert np.array_equal(rgba[:, :, 3], np.where(mask, 255, 0))  # 0/255, not an invisible 0/1
    assert np.array_equal(rle_to_mask(rle, w, h), mask)


def test_brush_result_shape():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:9] = True
    item = brush_result(mask, "Car", 0.8765432, "mask", "image", 20, 10)
    assert item["type"] == "brushlabels" and item["value"]["format"] == "rle"
    assert (item["original_width"], item["original_height"]) == (20, 10)
    assert item["value"]["brushlabels"] == ["Car"] and item["score"] == pytest.approx(0.8765, abs=1e-4)
    assert np.array_equal(rle_to_mask(item["value"]["rle"], 20, 10), mask)


# ---- rectangles -------------------------------------------------------------------------------
def test_rectangle_percent_to_pixels_rotation_0():
    # the notes' example: 320x240, x=18.75 y=20.83 w=37.5 h=50
    x0, y0, x1, y1 = percent_to_pixels({"x": 18.75, "y": 20.833333, "width": 37.5, "height": 50.0, "rotation": 0}, 320, 240)
    assert (x0, x1) == pytest.approx((60.0, 180.0)) and (y0, y1) == pytest.approx((50.0, 170.0), abs=1e-4)
    value = pixels_to_percent((60, 50, 180, 170), 320, 240)
    assert value == pytest.approx({"x": 18.75, "y": 50 / 2.4, "width": 37.5, "height": 50.0, "rotation": 0})
    assert percent_to_pixels(value, 320, 240) == pytest.approx((60, 50, 180, 170))


def test_rectangle_round_trip_many_sizes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, h = (int(v) for v in rng.integers(1, 5000, 2))
        box = np.sort(rng.random(2) * w).tolist()[:1] + np.sort(rng.random(2) * h).tolist()[:1]
        b = (box[0], box[1], box[0] + rng.random() * (w - box[0]), box[1] + rng.random() * (h - box[1]))
        assert percent_to_pixels(pixels_to_percent(b, w, h), w, h) == pytest.approx(b, abs=1e-6)


def test_rotated_rectangle_gives_its_enclosing_box():
    # 90 deg clockwise about the top-left corner: (x, y, w, h) -> x in [x - h, x], y in [y, y + w]
    x0, y0, x1, y1 = percent_to_pixels({"x": 50, "y": 10, "width": 10, "height": 20, "rotation": 90}, 100, 100)
    assert (x0, y0, x1, y1) == pytest.approx((30, 10, 50, 20))


def test_rectangles_in_skips_other_types_and_images():
    items = [
        rect(10, 10, 20, 20),
        rect(0, 0, 5, 5, to_name="other"),
        {"type": "brushlabels", "value": {}},
        {"type": "rectangle", "value": {"x": 0, "y": 0, "width": 50, "height": 50}},
    ]
    rects = rectangles_in(items, 200, 100, "image")
    assert [r.box for r in rects] == [pytest.approx((20, 10, 60, 30)), pytest.approx((0, 0, 100, 50))]
    assert [r.label for r in rects] == ["Person", None]


# ---- label config and mapping ---------------------------------------------------------------------
def test_parse_label_config(config):
    assert (config.image_name, config.image_key) == ("image", "image")
    assert config.rectangle.labels == ("Person", "Car") and config.brush.labels == ("person", "Car")
    assert config.rectangle.predicted_values["Person"] == ("pedestrian", "class_1")


def test_label_config_errors():
    with pytest.raises(LabelConfigError, match="not valid XML"):
        parse_label_config("<View>")
    with pytest.raises(LabelConfigError, match="no <Image>"):
        parse_label_config('<View><Text name="t" value="$t"/></View>')
    with pytest.raises(LabelConfigError, match="BrushLabels"):
        parse_label_config('<View><Image name="i" value="$x"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>')


def test_label_mapping_by_name_and_predicted_values(config):
    names = ["CAR", "class_1", "pedestrian", "dog"]
    # model class -> Label Studio label: names ignore case; predicted_values win; dog has none
    assert class_to_label_map(names, config.rectangle) == {0: "Car", 1: "Person", 2: "Person"}
    assert class_to_label_map(names, config.brush) == {0: "Car"}
    # Label Studio label -> model class (training data)
    assert label_to_class_map(names, config.rectangle) == {"Person": 2, "Car": 0}
    # a brush for a rectangle: same name in any case
    assert config.brush_label_for("Person") == "person" and config.brush_label_for("car") == "Car"
    assert config.brush_label_for("Unknown") is None


def test_brush_label_through_predicted_values():
    cfg = parse_label_config(
        '<View><Image name="im" value="$img"/>'
        '<RectangleLabels name="b" toName="im"><Label value="Human" predicted_values="person"/></RectangleLabels>'
        '<BrushLabels name="m" toName="im"><Label value="Mask of person" predicted_values="person"/><Label value="Other"/></BrushLabels></View>'
    )
    assert cfg.image_key == "img" and cfg.brush_label_for("Human") == "Mask of person"


# ---- predictions -----------------------------------------------------------------------------------
def test_interactive_returns_one_brush_per_context_rectangle(config):
    tp = make_predictor()
    task = {"id": 7, "data": {"image": data_url(100, 50)}, "annotations": [{"result": [rect(0, 0, 10, 10)]}]}
    preds, outcomes = tp.predict([task], config, {"result": [rect(10, 20, 30, 40, label="Car")]})
    (pred,) = preds
    (item,) = pred["result"]
    assert outcomes[0].mode == "interactive" and item["type"] == "brushlabels"
    assert item["value"]["brushlabels"] == ["Car"] and item["from_name"] == "mask" and item["to_name"] == "image"
    assert (item["original_width"], item["original_height"]) == (100, 50)
    m = rle_to_mask(item["value"]["rle"], 100, 50)
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (10, 40, 10, 30)
    assert item["score"] == pytest.approx(0.5) and pred["score"] == pytest.approx(0.5)
    assert pred["model_version"] == "fake-v0-abcdef01"


def test_batch_one_brush_per_rectangle_newest_annotation_then_drafts(config):
    tp = make_predictor()
    old = {"id": 1, "created_at": "2024-01-01T00:00:00Z", "result": [rect(0, 0, 10, 10)]}
    new = {
        "id": 2,
        "created_at": "2024-02-01T00:00:00Z",
        "result": [rect(0, 0, 50, 50, rid="a"), rect(50, 50, 50, 50, label="Car", rid="b"), rect(10, 10, 5, 5)],
    }
    cancelled = {"id": 3, "created_at": "2025-01-01T00:00:00Z", "was_cancelled": True, "result": [rect(0, 0, 1, 1)]}
    tasks = [
        {"id": 1, "data": {"image": data_url()}, "annotations": [old, new, cancelled]},
        {"id": 2, "data": {"image": data_url()}, "annotations": [], "drafts": [{"result": [rect(5, 5, 20, 20)]}]},
    ]
    assert annotator_rectangles(tasks[0]) == new["result"]
    preds, outcomes = tp.predict(tasks, config)
    assert [o.mode for o in outcomes] == ["boxes", "boxes"]
    assert [len(p["result"]) for p in preds] == [3, 1]
    assert [r["value"]["brushlabels"] for r in preds[0]["result"]] == [["person"], ["Car"], ["person"]]
    assert all(r["type"] == "brushlabels" for p in preds for r in p["result"])


def test_batch_without_rectangles_gives_mapped_detections(config):
    tp = make_predictor()
    preds, outcomes = tp.predict([{"id": 3, "data": {"image": data_url()}}], config)
    assert outcomes[0].mode == "detections"
    # class 0 "car" -> Car (rectangle + brush); class 2 "dog" maps to no label: dropped
    assert [(r["type"], r["value"].get("rectanglelabels") or r["value"].get("brushlabels")) for r in preds[0]["result"]] == [
        ("rectanglelabels", ["Car"]),
        ("brushlabels", ["Car"]),
    ]
    assert preds[0]["score"] == pytest.approx(0.9)


def test_prediction_score_mean_or_min():
    assert aggregate_score([0.2, 0.4, 0.9], "mean") == pytest.approx(0.5)
    assert aggregate_score([0.2, 0.4, 0.9], "min") == pytest.approx(0.2)
    assert aggregate_score([], "mean") == 0.0


def test_a_task_whose_image_fails_gets_an_empty_prediction(config, caplog):
    fake = FakePredictor()
    tp = make_predictor(fake, label_studio_url="http://127.0.0.1:9")  # nothing listens on port 9
    tasks = [
        {"id": 1, "data": {"image": data_url()}, "annotations": [{"result": [rect(0, 0, 50, 50)]}]},
        {"id": 2, "data": {"image": "/data/upload/1/missing.png"}},
        {"id": 3, "data": {"picture": data_url()}},
        {"id": 4, "data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}},
        {"id": 5, "data": {"image": data_url()}, "annotations": [{"result": [rect(150, 150, 10, 10)]}]},  # outside
    ]
    with caplog.at_level("WARNING"):
        preds, outcomes = tp.predict(tasks, config)
    assert len(preds) == 5
    assert len(preds[0]["result"]) == 1 and preds[0]["score"] > 0
    for k in (1, 2, 3):
        assert preds[k] == {"result": [], "score": 0.0, "model_version": "fake-v0-abcdef01"}
        assert outcomes[k].mode == "failed" and outcomes[k].error
    assert preds[4]["result"] == [] and outcomes[4].error is None  # nothing to segment, not an error
    assert "task 2: empty prediction" in caplog.text and "no 'image'" in caplog.text


def test_interactive_failures_are_http_errors_naming_the_reason(config):
    """Batch mode keeps empty predictions for failed tasks; an interactive request answers
    424 (image cannot be fetched) or 422 (rectangle outside the image) with the reason."""
    tp = make_predictor(label_studio_url="http://127.0.0.1:9")  # nothing listens on port 9
    missing = {"id": 8, "data": {"image": "/data/upload/1/missing.png"}}
    preds, outcomes = tp.predict([missing], config, {"result": [rect(10, 10, 20, 20)]})
    assert outcomes[0].mode == "failed" and outcomes[0].status == 424 and "missing.png" in outcomes[0].error
    outside = {"id": 9, "data": {"image": data_url(100, 50)}}
    preds, outcomes = tp.predict([outside], config, {"result": [rect(150, 150, 10, 10, rid="r7")]})
    assert outcomes[0].status == 422 and "rectangle r7" in outcomes[0].error and "outside the 100x50 image" in outcomes[0].error
    assert preds[0]["result"] == []
    _, outcomes = tp.predict([outside], config)  # batch: nothing to segment, not an error
    assert outcomes[0].error is None and outcomes[0].status is None


def test_interactive_requests_use_the_encoding_cache_batch_requests_do_not(config):
    fake = FakePredictor()
    tp = make_predictor(fake)
    task = {"id": 1, "data": {"image": data_url()}, "annotations": [{"result": [rect(0, 0, 10, 10)]}]}
    tp.predict([task], config, {"result": [rect(10, 20, 30, 40)]})
    tp.predict([task, task], config)
    assert fake.cached == [True, False]
    # interactive: the image goes with its digest (the encoding cache's key); batch: pixels only
    (ref,), batch = fake.images
    pixels = tp.fetcher.load(data_url())
    assert isinstance(ref, ImageRef) and ref.digest == image_digest(pixels) and ref.hw == (48, 64)
    assert np.array_equal(ref.load(), pixels)
    assert all(isinstance(im, np.ndarray) for im in batch)


def test_cached_image_digest_is_computed_once_per_entry(monkeypatch, tmp_path):
    import labelstudio_backend.images as images_module

    calls = []
    monkeypatch.setattr(images_module, "image_digest", lambda im: calls.append(im.shape) or image_digest(im))
    (tmp_path / "a.png").write_bytes(png_bytes(30, 20, seed=1))
    fetcher = ImageFetcher(local_files_root=tmp_path, label_studio_url="http://ls")
    first = fetcher.load_ref("/data/local-files/?d=a.png")
    second = fetcher.load_ref("/data/local-files/?d=a.png")
    assert first.digest == second.digest == image_digest(fetcher.load("/data/local-files/?d=a.png"))
    assert calls == [(20, 30, 3)] and first.hw == (20, 30)
    # a changed file is a new entry: decoded and hashed again
    (tmp_path / "a.png").write_bytes(png_bytes(31, 21, seed=2))
    third = fetcher.load_ref("/data/local-files/?d=a.png")
    assert third.digest != first.digest and calls == [(20, 30, 3), (21, 31, 3)]
    # an array that is not the cached one under that key is hashed, not given the entry's digest
    other = np.zeros((21, 31, 3), np.uint8)
    key = next(iter(fetcher.cache._items))
    assert fetcher.cache.digest(key, other) == image_digest(other) and len(calls) == 3
    # data: URLs are not cached: hashed every time
    fetcher.load_ref(data_url(8, 6))
    fetcher.load_ref(data_url(8, 6))
    assert calls[3:] == [(6, 8, 3), (6, 8, 3)]


def test_a_bad_box_fails_only_its_task(config):
    class Picky(FakePredictor):
        def predict(self, images, boxes=None, **kw):
            if boxes and any(b is not None and len(b) and b[0][0] > 30 for b in boxes):
                raise ValueError("box refused")
            return super().predict(images, boxes, **kw)

    tp = make_predictor(Picky())
    tasks = [{"id": i, "data": {"image": data_url()}, "annotations": [{"result": [rect(x, 0, 10, 10)]}]} for i, x in enumerate([0, 80, 5])]
    preds, outcomes = tp.predict(tasks, config)
    assert [len(p["result"]) for p in preds] == [1, 0, 1]
    assert outcomes[1].error == "ValueError: box refused"


def test_batches_are_chunked(config):
    fake = FakePredictor()
    tp = make_predictor(fake, batch_size=2)
    tasks = [{"id": i, "data": {"image": data_url(seed=i)}} for i in range(5)]
    preds, _ = tp.predict(tasks, config)
    assert len(preds) == 5 and [n for n, _ in fake.calls] == [2, 2, 1]


# ---- image fetching rules ---------------------------------------------------------------------------
def test_allowlist_rules():
    ls = Origin.of("http://ls.example.com:8080")
    allow = HostAllowlist(
        ["images.example.com", "cdn.example.org:8443", "*.bucket.example.net", "https://Files.Example.com", "[::1]:8000"], ls
    )
    ok = [
        "http://ls.example.com:8080/x",
        "https://images.example.com/a.png",
        "http://images.example.com:81/a",
        "https://cdn.example.org:8443/a",
        "https://a.b.bucket.example.net/x",
        "http://files.example.com/a",
        "http://[::1]:8000/a",
    ]
    bad = [
        "http://ls.example.com/x",
        "https://cdn.example.org/a",
        "https://bucket.example.net/x",
        "http://evil.com/",
        "http://images.example.com.evil.com/",
        "http://127.0.0.1/",
        "http://[::1]:8001/a",
        "http://evilbucket.example.net/",
    ]
    assert all(allow.allows(Origin.of(u)) for u in ok)
    assert not any(allow.allows(Origin.of(u)) for u in bad)


@pytest.mark.parametrize(
    "value,reason",
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://example.com/a.png", "scheme 'ftp'"),
        ("gopher://127.0.0.1:25/x", "scheme 'gopher'"),
        ("http://169.254.169.254/latest/meta-data/", "not allowed"),
        ("http://10.0.0.1/a.png", "not allowed"),
        ("//evil.example.com/a.png", "not an http"),
        ("images/a.png", "not an http"),
        ("http://user:pw@127.0.0.1/a.png", "credentials"),
    ],
)
def test_refused_urls(value, reason):
    fetcher = ImageFetcher(label_studio_url="http://ls.example.com:8080")
    with pytest.raises(UrlNotAllowed, match=reason):
        fetcher.load(value, 1)


def test_allowed_host_is_fetched_and_others_refused(http_server):
    fetcher = ImageFetcher(allowed_hosts=[http_server.split("//")[1]])
    assert fetcher.load(http_server + "/img.png").shape == (48, 64, 3)
    with pytest.raises(UrlNotAllowed):
        ImageFetcher().load(http_server + "/img.png")  # no Label Studio, no allowlist: nothing allowed


def test_redirect_to_another_host_is_refused(http_server):
    port = http_server.rsplit(":", 1)[1]
    fetcher = ImageFetcher(allowed_hosts=[f"127.0.0.1:{port}"])
    # same host: followed
    assert fetcher.load(f"{http_server}/redirect?to=/img.png").shape == (48, 64, 3)
    # another host (localhost is not 127.0.0.1 for the allowlist; and an internal address)
    for target in (f"http://localhost:{port}/img.png", "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"):
        _Handler.seen.clear()
        with pytest.raises(UrlNotAllowed):
            fetcher.load(f"{http_server}/redirect?to={target}")
        assert [p for p, _ in _Handler.seen] == [f"/redirect?to={target}"]  # the target was never requested


def test_size_limit_and_redirect_limit(http_server):
    fetcher = ImageFetcher(allowed_hosts=[http_server.split("//")[1]], max_bytes=100_000, max_redirects=1)
    with pytest.raises(ImageFetchError, match="limit"):
        fetcher.load(http_server + "/big")
    with pytest.raises(ImageFetchError, match="redirects"):
        fetcher.load(f"{http_server}/redirect?to=/redirect?to=/img.png")
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetcher.load(http_server + "/nothing.png")


def test_pixel_limit():
    with pytest.raises(ImageFetchError, match="pixels"):
        ImageFetcher(max_pixels=1000).load(data_url(64, 48))


def test_credentials_go_only_to_label_studio(http_server):
    other = http_server.replace("127.0.0.1", "localhost")
    # a personal access token is exchanged for an access token, sent as Bearer
    fetcher = ImageFetcher(label_studio_url=http_server, api_key=PAT, allowed_hosts=[other.split("//")[1]])
    _Handler.seen.clear()
    fetcher.load("/data/upload/1/a.png", 1)
    assert [p for p, _ in _Handler.seen] == ["/api/token/refresh/", "/data/upload/1/a.png"]
    assert _Handler.seen[1][1]["Authorization"] == f"Bearer {ACCESS}"
    _Handler.seen.clear()
    fetcher.load(other + "/img.png")
    assert "Authorization" not in _Handler.seen[0][1]
    # a legacy token is sent as "Token <key>"
    _Handler.seen.clear()
    ImageFetcher(label_studio_url=http_server, api_key="legacy-token-123").load("/data/upload/1/b.png", 1)
    assert _Handler.seen[0][1]["Authorization"] == "Token legacy-token-123"
    assert jwt_claims(PAT)["token_type"] == "refresh" and jwt_claims("legacy-token-123") == {}


def test_local_files_stay_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "ds").mkdir(parents=True)
    (root / "ds" / "a.png").write_bytes(png_bytes(30, 20))
    (tmp_path / "secret.png").write_bytes(png_bytes(10, 10))
    fetcher = ImageFetcher(label_studio_url="http://ls.example.com", local_files_root=root)
    assert fetcher.load("/data/local-files/?d=ds/a.png").shape == (20, 30, 3)
    assert fetcher.load("http://ls.example.com/data/local-files/?d=ds%2Fa.png").shape == (20, 30, 3)
    for bad in ("/data/local-files/?d=../secret.png", "/data/local-files/?d=/../../secret.png", "/data/local-files/?d=ds/../../secret.png"):
        with pytest.raises(UrlNotAllowed, match="outside"):
            fetcher.load(bad)


def test_exif_orientation_gives_the_true_size(config):
    img = Image.fromarray(np.zeros((40, 100, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed as 40 wide, 100 high
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    preds, _ = make_predictor().predict([{"id": 1, "data": {"image": url}}], config, {"result": [rect(0, 0, 50, 50)]})
    item = preds[0]["result"][0]
    assert (item["original_width"], item["original_height"]) == (40, 100)


def test_image_cache_bounded_expiring_and_local_files_invalidated(tmp_path):
    cache = ImageCache(max_bytes=3 * 100, ttl_s=0.2)
    for k in range(4):
        cache.put(str(k), np.zeros(100, np.uint8))
    assert cache.get("0") is None and cache.get("3") is not None and cache.stats()["bytes"] == 300
    time.sleep(0.25)
    assert cache.get("3") is None
    root = tmp_path / "r"
    root.mkdir()
    f = root / "a.png"
    f.write_bytes(png_bytes(30, 20))
    fetcher = ImageFetcher(local_files_root=root, label_studio_url="http://ls")
    assert fetcher.load("/data/local-files/?d=a.png").shape == (20, 30, 3)
    f.write_bytes(png_bytes(31, 21))
    assert fetcher.load("/data/local-files/?d=a.png").shape == (21, 31, 3)


# ---- HTTP routes ---------------------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from labelstudio_backend.app import create_app
    from labelstudio_backend.settings import BackendSettings

    settings = BackendSettings(work_dir=tmp_path, basic_auth_user="ml", basic_auth_pass="secret", warmup=False)
    app = create_app(settings, holder=ModelHolder(FakePredictor()))
    with TestClient(app) as c:
        yield c


AUTH = ("ml", "secret")


def test_basic_auth_on_every_route(client):
    for method, path in [
        ("get", "/health"),
        ("get", "/"),
        ("post", "/setup"),
        ("post", "/predict"),
        ("post", "/webhook"),
        ("get", "/metrics"),
    ]:
        r = getattr(client, method)(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert getattr(client, method)(path, auth=("ml", "wrong")).status_code == 401
    assert client.get("/health", auth=AUTH).json()["status"] == "UP"


def test_routes_in_label_studio_shapes(client):
    health = client.get("/health", auth=AUTH).json()
    assert health["model_class"] == "BoxTeacher" and health["model_version"] == "fake-v0-abcdef01"
    assert client.post(
        "/setup", json={"project": "3.1700000000", "schema": XML, "hostname": "http://x", "access_token": "t"}, auth=AUTH
    ).json() == {"model_version": "fake-v0-abcdef01"}
    # after /setup the project's config is known even without label_config in /predict
    body = {
        "tasks": [{"id": 1, "data": {"image": data_url()}}],
        "project": "3.1700000000",
        "params": {"login": None, "password": None, "context": {"result": [rect(0, 0, 50, 50)]}},
    }
    r = client.post("/predict", json=body, auth=AUTH).json()
    assert r["results"][0]["result"][0]["type"] == "brushlabels"
    r = client.post(
        "/predict", json={"tasks": [{"id": 1, "data": {"image": "file:///etc/passwd"}}], "label_config": XML, "params": {}}, auth=AUTH
    )
    assert r.status_code == 200 and r.json()["results"] == [{"result": [], "score": 0.0, "model_version": "fake-v0-abcdef01"}]
    bad = client.post("/predict", json={"tasks": [], "label_config": "<View/>", "params": {}}, auth=AUTH)
    assert bad.status_code == 400 and "Image" in bad.json()["detail"]
    # an interactive request whose image cannot be had: an HTTP error with the reason, not an empty 200
    body = {
        "tasks": [{"id": 5, "data": {"image": "file:///etc/passwd"}}],
        "label_config": XML,
        "params": {"context": {"result": [rect(0, 0, 5, 5)]}},
    }
    r = client.post("/predict", json=body, auth=AUTH)
    assert r.status_code == 424 and r.json()["errors"] == [r.json()["detail"]] and "task 5:" in r.json()["detail"]
    m = client.get("/metrics", auth=AUTH).json()
    assert m["predict_requests"] == {"interactive": 2, "batch": 1} and m["tasks"]["failed"] == 2
    assert m["encoding_cache"] is None  # the fake predictor has no cache


def test_webhook_answers_fast(client):
    started = time.perf_counter()
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1, "label_config": XML}}, auth=AUTH)
    assert r.status_code == 201 and r.json()["result"]["status"] == "unavailable"  # a fake model cannot be trained
    assert time.perf_counter() - started < 1.0
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED"}, auth=AUTH)
    assert r.status_code == 200 and r.json() == {"status": "Unknown event"}
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}}, auth=AUTH)
    assert r.status_code == 201 and r.json()["result"]["annotations_since_training"] == 1


def test_real_tiny_model_interactive(tiny_checkpoint, config, tmp_path):
    """The tiny checkpoint through the whole predict path: the brush lies in its rectangle."""
    from serving.runtime import load_predictor

    tp = make_predictor(load_predictor(tiny_checkpoint))
    preds, _ = tp.predict([{"id": 1, "data": {"image": data_url(160, 120)}}], config, {"result": [rect(10, 20, 50, 40)]})
    item = preds[0]["result"][0]
    m = rle_to_mask(item["value"]["rle"], 160, 120)
    assert m.any() and not m[:, :16].any() and not m[:, 96:].any() and not m[:24].any() and not m[72:].any()
    assert 0 < item["score"] <= 1 and preds[0]["model_version"].startswith("tiny-v0-")


# ---- training manager --------------------------------------------------------------------------------
class _Settings:
    def __init__(self, tmp_path, **kw):
        from labelstudio_backend.settings import BackendSettings

        base = dict(work_dir=tmp_path, label_studio_url="http://ls.invalid", label_studio_api_key="k", train_iters=1, train_batch_size=2)
        base.update(kw)
        self.s = BackendSettings(**base)


def synthetic_export(dataset: Path, n: int = 4, label="disc", brushes: bool = False) -> list[dict]:
    """Label Studio JSON export of n synthetic images (data: URLs), each object a rectangle
    (and with ``brushes`` its true mask as a brush, as if the annotator accepted it)."""
    from pycocotools import mask as mask_utils

    coco = json.loads((dataset / "annotations" / "train.json").read_text())
    tasks = []
    for img in coco["images"][:n]:
        raw = (dataset / "images" / img["file_name"]).read_bytes()
        w, h = img["width"], img["height"]
        result = []
        for a in coco["annotations"]:
            if a["image_id"] == img["id"]:
                x, y, bw, bh = a["bbox"]
                result.append(rect(x / w * 100, y / h * 100, bw / w * 100, bh / h * 100, label=label, rid=str(a["id"])))
                if brushes:
                    result.append(brush_result(mask_utils.decode(a["segmentation"]), label, 1.0, "mask", "image", w, h, rid=f"m{a['id']}"))
        tasks.append(
            {
                "id": img["id"],
                "data": {"image": "data:image/png;base64," + base64.b64encode(raw).decode()},
                "annotations": [{"id": img["id"], "result": result}],
            }
        )
    return tasks


def test_box_dataset_from_export(synthetic_dataset, tmp_path, config):
    from labelstudio_backend.dataset import build_box_dataset
    from training.data.coco import CocoInstances

    tasks = synthetic_export(synthetic_dataset, 6, label="Car") + [
        {"id": 99, "data": {"image": "file:///x"}, "annotations": [{"result": [rect(0, 0, 5, 5)]}]}
    ]
    summary = build_box_dataset(tasks, config, ["car", "dog"], ImageFetcher(), tmp_path / "d", val_fraction=0.5)
    assert summary.tasks == 6 and summary.skipped.keys() == {"99"} and summary.class_names == ["car", "dog"]
    ds = CocoInstances(tmp_path / "d", "train")
    _, target = ds[0]
    assert ds.class_names == ["car", "dog"] and set(target["labels"].tolist()) == {0}
    assert summary.train_images + summary.val_images == 6
    # an unknown label becomes a new class after the model's
    summary = build_box_dataset(synthetic_export(synthetic_dataset, 2, label="Person"), config, ["car"], ImageFetcher(), tmp_path / "e")
    assert summary.class_names == ["car", "Person"] and summary.new_labels == ["Person"] and summary.eval_split == "train"


def test_annotators_masks_go_with_their_boxes(synthetic_dataset, tmp_path, config):
    from labelstudio_backend.dataset import build_box_dataset

    tasks = synthetic_export(synthetic_dataset, 3, label="Car", brushes=True)
    tasks[0]["annotations"][0]["result"] = [r for r in tasks[0]["annotations"][0]["result"] if r["type"] != "brushlabels"]
    summary = build_box_dataset(tasks, config, ["car"], ImageFetcher(), tmp_path / "d")
    truth = json.loads((synthetic_dataset / "annotations" / "train.json").read_text())
    first = {a["id"] for a in truth["annotations"] if a["image_id"] == truth["images"][0]["id"]}
    assert summary.masks == summary.boxes - len(first) > 0  # every brush found its box; task 0 has none
    written = json.loads((tmp_path / "d" / "annotations" / "train.json").read_text())
    true_masks = [a["segmentation"] for a in truth["annotations"] if a["image_id"] in {im["id"] for im in truth["images"][1:3]}]
    assert [a["segmentation"] for a in written["annotations"] if "segmentation" in a] == true_masks  # each mask with its own box


def test_promotion_rule():
    from labelstudio_backend.fit import not_worse

    assert not_worse({"AP": 10.0}, {"AP": 10.0})[0] and not not_worse({"AP": 10.0}, {"AP": 9.9})[0]
    assert not_worse({"AP": 10.0}, {"AP": 9.5}, ap_tolerance=0.5)[0]
    ok, why = not_worse({"AP": 10.0, "mask_iou": 0.8}, {"AP": 12.0, "mask_iou": 0.7})
    assert not ok and why.startswith("worse mask IoU") and "box AP 10.00 -> 12.00" in why
    assert not_worse({"AP": 10.0, "mask_iou": 0.8}, {"AP": 12.0, "mask_iou": 0.75}, iou_tolerance=0.05)[0]
    assert not_worse({"AP": 10.0, "mask_iou": None}, {"AP": 10.0, "mask_iou": 0.1})[0]  # measured on one side only
    assert not not_worse({"AP": 0.0}, {"AP": float("nan")})[0]
    assert not_worse({"AP": None}, {"AP": 0.0})[0]  # new classes: the old model cannot serve them


def test_a_worse_fine_tune_is_not_promoted_unless_forced(synthetic_dataset, tmp_path, caplog):
    """One iteration at a huge learning rate wrecks the model: the old one keeps serving,
    both evaluations and the reason are in /health's training status and in the log; a
    START_TRAINING with "force": true promotes it all the same."""
    from conftest import tiny_config, write_checkpoint

    from labelstudio_backend.fit import TrainingManager, read_state
    from serving.runtime import load_predictor

    ckpt = write_checkpoint(tmp_path / "base.pth", tiny_config(2, ["class_names=[disc, square]"]))
    holder = ModelHolder(load_predictor(ckpt))
    settings = _Settings(tmp_path / "work", train_base_lr=1000.0, branch="student").s  # the EMA teacher would move 1 %
    manager = TrainingManager(holder, ImageFetcher(), settings, ckpt.resolve())
    manager._export = lambda project_id: synthetic_export(synthetic_dataset, 3, brushes=True)
    before = holder.model_version
    xml = XML.replace('<Label value="Car"/>', '<Label value="disc"/>')
    project = {"id": 1, "label_config": xml}

    with caplog.at_level("INFO", logger="labelstudio_backend.fit"):
        assert manager.on_event("START_TRAINING", {"project": project})["status"] == "training_started"
        assert manager.wait(600)
    status = manager.status()
    last = status["last"]
    assert last["status"] == "ok" and not last["promoted"] and not last["forced"], last
    assert last["decision"].startswith("worse") and last["dataset"]["masks"] > 0
    assert last["eval_before"]["mask_iou"] is not None and last["eval_after"]["mask_iou"] is not None
    assert holder.model_version == before and holder.generation == 0 and status["serving"]["model_version"] == before
    assert "if not worse" in status["promotion_rule"]
    assert read_state(settings.work_dir)["candidate"] == last["checkpoint"] and "current" not in read_state(settings.work_dir)
    assert any("not promoted" in r.getMessage() and last["decision"] in r.getMessage() for r in caplog.records)

    assert manager.on_event("START_TRAINING", {"project": project, "force": True})["status"] == "training_started"
    assert manager.wait(600)
    last = manager.status()["last"]
    print(last["decision"])  # pytest -s: the numbers of this test's worse fine-tune
    assert last["promoted"] and last["forced"] and last["decision"].startswith("worse"), last
    assert holder.model_version != before and holder.generation == 1
    assert read_state(settings.work_dir)["current"] == last["checkpoint"]


def test_failed_training_keeps_the_old_model(tiny_checkpoint, tmp_path):
    from labelstudio_backend.fit import TrainingManager
    from serving.runtime import load_predictor

    holder = ModelHolder(load_predictor(tiny_checkpoint))
    manager = TrainingManager(holder, ImageFetcher(), _Settings(tmp_path).s)
    manager._export = lambda project_id: (_ for _ in ()).throw(RuntimeError("Label Studio is down"))
    before = holder.model_version
    assert manager.start({"id": 1, "label_config": XML}, "test")["status"] == "training_started"
    assert manager.wait(60)
    status = manager.status()
    assert status["last"]["status"] == "failed" and "Label Studio is down" in status["last"]["error"]
    assert holder.model_version == before and status["failures"] == 1
    # state survives a restart
    assert TrainingManager(holder, ImageFetcher(), _Settings(tmp_path).s).status()["last"]["status"] == "failed"


@pytest.mark.slow
def test_training_swaps_the_model_and_bumps_the_version(synthetic_dataset, tmp_path):
    """One BoxTeacher iteration on exported boxes, evaluation, hot-swap, restart resumes it."""
    from conftest import tiny_config, write_checkpoint

    from labelstudio_backend.app import load_holder
    from labelstudio_backend.fit import TrainingManager
    from serving.runtime import load_predictor

    ckpt = write_checkpoint(tmp_path / "base.pth", tiny_config(2, ["class_names=[disc, square]"]))
    holder = ModelHolder(load_predictor(ckpt))
    settings = _Settings(tmp_path / "work", train_promote="always").s  # this test is about the swap, not the rule
    manager = TrainingManager(holder, ImageFetcher(), settings, ckpt.resolve())
    manager._export = lambda project_id: synthetic_export(synthetic_dataset, 3)
    before = holder.model_version
    xml = XML.replace('<Label value="Car"/>', '<Label value="disc"/>')
    assert manager.start({"id": 1, "label_config": xml}, "test")["status"] == "training_started"
    assert manager.start({"id": 1, "label_config": xml}, "again")["status"] == "already_training"
    assert manager.wait(600)
    last = manager.status()["last"]
    assert last["status"] == "ok", last
    assert holder.model_version != before and holder.generation == 1 and last["new_model_version"] == holder.model_version
    assert last["dataset"]["tasks"] == 3 and last["eval_after"]["AP"] is not None
    # a restart with the same --model serves the fine-tuned checkpoint
    settings.model = ckpt
    restored = load_holder(settings)
    assert restored.model_version == holder.model_version


def test_server_url_forwarding_matches_in_process(tiny_checkpoint, config):
    """--server-url: the same masks through the segmentation API as in-process."""
    from labelstudio_backend.model import RemotePredictor
    from serving.app import create_app as create_serving_app
    from serving.local import LocalServer
    from serving.runtime import load_predictor
    from serving.settings import ServeSettings

    local = load_predictor(tiny_checkpoint)
    image = (np.random.default_rng(3).random((90, 120, 3)) * 255).astype(np.uint8)
    boxes = np.array([[10, 10, 60, 50], [50, 20, 110, 85]], dtype=np.float32)
    with LocalServer(create_serving_app(ServeSettings(model=tiny_checkpoint, api_key="k", warmup=False))) as server:
        remote = RemotePredictor(server.url, api_key="k")
        assert remote.class_names == local.class_names and remote.version == local.version
        got = remote.predict([image], boxes=[boxes])[0]
        want = local.predict([image], boxes=[boxes])[0]
        assert [np.array_equal(g.mask, w.mask) for g, w in zip(got, want)] == [True, True]
        assert [g.mask_score for g in got] == pytest.approx([w.mask_score for w in want], abs=1e-4)
        detections = remote.predict([image], score_threshold=0.0, max_instances=5)[0]
        assert 0 < len(detections) <= 5
        tp = TaskPredictor(ModelHolder(remote), ImageFetcher(), PredictOptions())
        preds, _ = tp.predict([{"id": 1, "data": {"image": data_url(120, 90)}}], config, {"result": [rect(10, 10, 40, 40)]})
        assert preds[0]["result"][0]["type"] == "brushlabels"
        with pytest.raises(ValueError, match="HTTP 422"):
            remote.predict([image], boxes=[np.array([[200, 200, 300, 300]], np.float32)])


def test_settings_from_label_studio_environment(monkeypatch, tmp_path):
    from labelstudio_backend.settings import BackendSettings

    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls.example.com:8080/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "tok")
    monkeypatch.setenv("BASIC_AUTH_USER", "")  # docker compose's ${BASIC_AUTH_USER:-}: unset
    monkeypatch.setenv("BASIC_AUTH_PASS", "")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("BOXTEACHER_LS_ALLOWED_HOSTS", "a.example.com, *.b.example.com")
    s = BackendSettings()
    assert s.label_studio_url == "http://ls.example.com:8080" and s.api_key == "tok" and s.basic_auth is None
    assert s.work_dir == tmp_path and s.allowed_hosts == ["a.example.com", "*.b.example.com"]
    monkeypatch.setenv("BASIC_AUTH_USER", "u")
    with pytest.raises(ValueError, match="BASIC_AUTH"):
        BackendSettings()
    with pytest.raises(ValueError, match="http"):
        BackendSettings(label_studio_url="ls.example.com")


def test_training_after_every_n_annotations(tmp_path):
    from labelstudio_backend.fit import TrainingManager

    manager = TrainingManager(ModelHolder(FakePredictor()), ImageFetcher(), _Settings(tmp_path, train_every_n_annotations=2).s)
    started = []
    manager.start = lambda project, reason, force=False: started.append(reason) or {"status": "training_started"}
    assert manager.on_event("ANNOTATION_CREATED", {"project": {"id": 1}})["annotations_since_training"] == 1
    assert manager.on_event("ANNOTATION_UPDATED", {"project": {"id": 1}}) == {"status": "training_started"}
    assert started == ["2 new annotations"]
    assert manager.on_event("START_TRAINING", {"project": {"id": 1}}) == {"status": "training_started"}
    assert "checkpoint" in TrainingManager(ModelHolder(FakePredictor()), ImageFetcher(), _Settings(tmp_path).s).available()
