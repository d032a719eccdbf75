"""The HTTP API against a real uvicorn server on 127.0.0.1 (tiny random model, CPU).

Responses are checked against the predictor itself (RLE decoded with pycocotools);
every bad input gets its 4xx with a JSON message and the next good request succeeds;
auth; 50 concurrent clients are batched; the ``boxteacher serve`` command starts.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import REPO, SMALL_SCALE, iou, shapes_image, tiny_config, write_checkpoint
from PIL import Image
from pycocotools import mask as mask_utils

from serving.app import create_app
from serving.local import LocalServer, free_port
from serving.runtime import load_predictor
from serving.settings import ServeSettings

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2

# the tiny model at a small test scale keeps CPU inference fast
MAX_UPLOAD = 256 * 1024


def synthetic_image(k: int, size: int = 96, width: int | None = None) -> np.ndarray:
    return shapes_image(11, k, size, width or size)


def encode(image: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A ~50 kB 1-bit PNG that declares width x height pixels (all zero)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


def decode_rle(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("serving") / "tiny.pth", tiny_config(overrides=SMALL_SCALE))


@pytest.fixture(scope="module")
def predictor(small_checkpoint):
    return load_predictor(small_checkpoint)


def make_settings(**kw) -> ServeSettings:
    base = dict(max_upload_bytes=MAX_UPLOAD, max_pixels=4_000_000, max_boxes=20, max_batch_size=8, max_wait_ms=20, score_threshold=0.0)
    base.update(kw)
    return ServeSettings(**base)


@pytest.fixture(scope="module")
def server(predictor):
    with LocalServer(create_app(make_settings(), predictor=predictor)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def segment(client: httpx.Client, image: np.ndarray, boxes=None, **params) -> httpx.Response:
    data = {"boxes": json.dumps(boxes)} if boxes is not None else {}
    return client.post("/v1/segment", files={"image": ("img.png", encode(image), "image/png")}, data=data, params=params)


# ---- responses agree with the predictor ----------------------------------------------------------
def test_rle_masks_match_the_predictor(client, predictor):
    for k, width in enumerate((96, 80, 96)):
        image = synthetic_image(k, width=width)
        r = segment(client, image, score_threshold=0.0, max_instances=100)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["width"], body["height"]) == (width, 96)
        assert body["model"] == {"name": predictor.name, "version": predictor.version, "runtime": "pytorch"}
        expected = predictor.predict([image], score_threshold=0.0, max_instances=100)[0]
        assert len(body["instances"]) == len(expected) > 0
        for got, want in zip(body["instances"], expected):
            mask = decode_rle(got["mask"])
            assert mask.shape == (96, width)
            assert iou(mask, want.mask) >= 0.99
            assert got["area"] == int(mask.sum())
            assert got["category_id"] == want.label and got["category_name"] == predictor.class_names[want.label]
            assert got["mask_score"] == pytest.approx(want.mask_score, abs=1e-4)
            assert got["det_score"] == pytest.approx(want.det_score, abs=1e-4)
            np.testing.assert_allclose(got["box"], want.box, atol=1e-2)
            assert got["source"] == "detection"
        scores = [i["mask_score"] for i in body["instances"]]
        assert scores == sorted(scores, reverse=True)
        timing = dict(re.findall(r"(\w+);dur=([0-9.]+)", r.headers["server-timing"]))
        assert set(timing) == {"decode", "queue", "inference", "encode"} and float(timing["inference"]) > 0
        assert r.headers["x-batch-size"] == "1"


def _metric(text: str, name: str, **labels) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + sel + '}') if sel else ''}\s+([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _prompted(checkpoint: Path, k: int):
    """A fresh predictor, synthetic image k, two boxes, and the uncached answer for them."""
    p = load_predictor(checkpoint)
    im = synthetic_image(k)
    boxes = [[5, 5, 50, 60], [40, 30, 90, 90]]
    return p, im, boxes, p.predict([im], boxes=[np.asarray(boxes, np.float32)], use_cache=False)[0]


def test_next_boxes_on_the_same_image_hit_the_cache(small_checkpoint):
    """The annotator's loop over HTTP: the first request encodes the image, later ones with new
    boxes (the same upload, or the same pixels in another file format) only run the prompt part;
    answers equal the uncached predictor's; /metrics counts hits, misses, bytes and skipped decodes."""
    p, im, boxes, want = _prompted(small_checkpoint, 21)
    with LocalServer(create_app(make_settings(), predictor=p)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        first = segment(c, im, boxes[:1])
        second = segment(c, im, boxes)  # the same PNG bytes: no decode, no hashing, no encoder run
        third = c.post("/v1/segment", files={"image": ("img.bmp", encode(im, "BMP"), "image/bmp")}, data={"boxes": json.dumps(boxes)})
        assert [r.headers["x-cache"] for r in (first, second, third)] == ["miss", "hit", "hit"]
        for r in (second, third):
            got = r.json()["instances"]
            assert [i["source"] for i in got] == [i.source for i in want]
            for g, w in zip(got, want):
                assert g["mask_score"] == w.mask_score and np.array_equal(decode_rle(g["mask"]), w.mask)
        text = c.get("/metrics").text
    assert _metric(text, "boxteacher_encoding_cache_misses_total") == 1 and _metric(text, "boxteacher_encoding_cache_hits_total") == 2
    assert _metric(text, "boxteacher_encoding_cache_entries") == 1 and _metric(text, "boxteacher_encoding_cache_bytes") > 0
    assert _metric(text, "boxteacher_encoding_cache_evictions_total") == 0
    assert _metric(text, "boxteacher_image_decodes_total", result="skipped") == 1
    assert _metric(text, "boxteacher_image_decodes_total", result="decoded") == 2  # the PNG once, the BMP (other bytes) once


def test_threshold_and_max_instances(client):
    image = synthetic_image(3)
    everything = segment(client, image, score_threshold=0.0).json()["instances"]
    assert len(everything) > 3
    cut = sorted(i["mask_score"] for i in everything)[len(everything) // 2]
    above = segment(client, image, score_threshold=cut).json()["instances"]
    assert len(above) == sum(i["mask_score"] >= cut for i in everything) and all(i["mask_score"] >= cut for i in above)
    assert len(segment(client, image, score_threshold=0.0, max_instances=2).json()["instances"]) == 2


def test_json_body_and_mask_formats(client):
    image = synthetic_image(4)
    b64 = base64.b64encode(encode(image)).decode()
    rle = client.post("/v1/segment", json={"image": b64, "max_instances": 3}).json()["instances"]
    masks = [decode_rle(i["mask"]) for i in rle]
    png = client.post("/v1/segment", json={"image": "data:image/png;base64," + b64, "max_instances": 3, "mask_format": "png"}).json()
    assert png["mask_format"] == "png"
    for inst, mask in zip(png["instances"], masks):
        decoded = np.array(Image.open(io.BytesIO(base64.b64decode(inst["mask"]))).convert("L")) > 0
        assert np.array_equal(decoded, mask)
    poly = client.post("/v1/segment", params={"mask_format": "polygon", "max_instances": 3}, json={"image": b64}).json()
    for inst in poly["instances"]:
        assert inst["mask"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in inst["mask"])
        xs = np.concatenate([p[0::2] for p in inst["mask"]])
        assert xs.min() >= 0 and xs.max() < image.shape[1]
    none = client.post("/v1/segment", json={"image": b64, "mask_format": "none"}).json()
    assert none["instances"] and all(i["mask"] is None for i in none["instances"])


def test_exif_orientation_and_image_modes(client):
    image = synthetic_image(5, width=64)  # 96 x 64
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    r = client.post("/v1/segment", files={"image": ("a.jpg", encode(image, "JPEG", exif=exif), "image/jpeg")})
    assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (96, 64)
    gray = (image.mean(axis=2)).astype(np.uint8)
    variants = {
        "gray": encode(gray),
        "rgba": encode(np.dstack([image, np.full(image.shape[:2], 200, np.uint8)])),
        "16bit": encode(gray.astype(np.uint16) * 257),
        "palette": encode_palette(image),
    }
    for name, data in variants.items():
        r = client.post("/v1/segment", files={"image": (f"{name}.png", data, "image/png")})
        assert r.status_code == 200, (name, r.text)
        assert (r.json()["width"], r.json()["height"]) == (64, 96), name


def encode_palette(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert("P").save(buf, format="PNG")
    return buf.getvalue()


# ---- box prompts ----------------------------------------------------------------------------------
def test_box_prompts_one_instance_per_box_in_order_inside_the_box(client, predictor):
    image = synthetic_image(6)
    detections = predictor.predict([image], score_threshold=0.0)[0]
    best = detections[0]
    boxes = [[5.5, 10.0, 40.0, 50.5], best.box.round(2).tolist(), [60, 2, 95, 30], [-20, -20, 30, 20]]
    r = segment(client, image, boxes=boxes)
    assert r.status_code == 200, r.text
    instances = r.json()["instances"]
    assert len(instances) == len(boxes)
    for inst, box in zip(instances, boxes):
        clipped = np.clip(box, 0, [96, 96, 96, 96])
        np.testing.assert_allclose(inst["box"], clipped, atol=1e-3)
        mask = decode_rle(inst["mask"])
        ys, xs = np.nonzero(mask)
        if len(xs):
            assert xs.min() >= np.floor(clipped[0]) and xs.max() < np.ceil(clipped[2])
            assert ys.min() >= np.floor(clipped[1]) and ys.max() < np.ceil(clipped[3])
        assert 0.0 <= inst["mask_score"] <= 1.0
    assert instances[1]["source"] == "matched" and instances[1]["category_id"] == best.label
    # the same through the predictor
    direct = predictor.predict([image], boxes=[np.array(boxes, dtype=np.float32)])[0]
    assert [d.source for d in direct] == [i["source"] for i in instances]
    for d, inst in zip(direct, instances):
        assert iou(d.mask, decode_rle(inst["mask"])) >= 0.99
    # an empty list of boxes asks for zero instances
    assert segment(client, image, boxes=[]).json()["instances"] == []


# ---- bad inputs: each its 4xx, and the server keeps serving ---------------------------------------
GOOD = synthetic_image(7)


def _truncated_jpeg() -> bytes:
    data = encode(GOOD, "JPEG", quality=95)
    return data[: len(data) * 2 // 3]


def test_next_boxes_by_image_id_without_uploading_the_image(small_checkpoint):
    """Every response names its image (image_id = the pixel digest); a request that sends the
    image_id instead of the image reuses the cached encoding and gives the uncached answer;
    once the encoding is gone the server answers 404 image_not_cached, not 500."""
    from serving.cache import image_digest

    p, im, boxes, want = _prompted(small_checkpoint, 22)
    with LocalServer(create_app(make_settings(), predictor=p)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        first = segment(c, im, boxes[:1])
        image_id = first.json()["image_id"]
        assert image_id == image_digest(im)
        by_form = c.post("/v1/segment", files={"image_id": (None, image_id)}, data={"boxes": json.dumps(boxes)})
        by_json = c.post("/v1/segment", json={"image_id": image_id, "boxes": boxes})
        for r in (by_form, by_json):
            assert r.status_code == 200 and r.headers["x-cache"] == "hit", r.text
            body = r.json()
            assert (body["width"], body["height"], body["image_id"]) == (im.shape[1], im.shape[0], image_id)
            for g, w in zip(body["instances"], want, strict=True):
                assert g["mask_score"] == w.mask_score and np.array_equal(decode_rle(g["mask"]), w.mask)
        automatic = c.post("/v1/segment", json={"image_id": image_id, "max_instances": 3})
        assert automatic.status_code == 200 and len(automatic.json()["instances"]) == 3
        p.cache.clear()  # evicted (or another model): the client is told to send the image again
        gone = c.post("/v1/segment", json={"image_id": image_id, "boxes": boxes})
        assert gone.status_code == 404 and gone.json()["error"] == "image_not_cached" and "send the image again" in gone.json()["message"]
        assert segment(c, im, boxes).json()["image_id"] == image_id  # sent again: cached again


BAD_REQUESTS = {
    "truncated_jpeg": (lambda: {"files": {"image": ("a.jpg", _truncated_jpeg(), "image/jpeg")}}, 400, "corrupt_image"),
    "zero_bytes": (lambda: {"files": {"image": ("a.png", b"", "image/png")}}, 400, "empty_image"),
    "text_named_png": (lambda: {"files": {"image": ("notes.png", b"just some text\n" * 10, "image/png")}}, 415, "unsupported_image"),
    "png_bomb_20000x20000": (lambda: {"files": {"image": ("bomb.png", png_bomb(), "image/png")}}, 413, "image_too_large"),
    "nan_boxes": (lambda: {"files": {"image": ("a.png", encode(GOOD))}, "data": {"boxes": "[[NaN, 1, 20, 20]]"}}, 422, "invalid_boxes"),
    "infinite_box_json": (
        lambda: {
            "content": b'{"image": "%s", "boxes": [[1, 1, Infinity, 9]]}' % base64.b64encode(encode(GOOD)),
            "headers": {"content-type": "application/json"},
        },
        422,
        "invalid_boxes",
    ),
    "boxes_outside": (
        lambda: {"files": {"image": ("a.png", encode(GOOD))}, "data": {"boxes": "[[200, 200, 300, 300]]"}},
        422,
        "invalid_boxes",
    ),
    "inverted_box": (lambda: {"files": {"image": ("a.png", encode(GOOD))}, "data": {"boxes": "[[50, 10, 20, 40]]"}}, 422, "invalid_boxes"),
    "box_of_three": (lambda: {"files": {"image": ("a.png", encode(GOOD))}, "data": {"boxes": "[[1, 2, 3]]"}}, 422, "invalid_boxes"),
    "boxes_not_json": (lambda: {"files": {"image": ("a.png", encode(GOOD))}, "data": {"boxes": "ten boxes please"}}, 422, "invalid_boxes"),
    "too_many_boxes": (
        lambda: {"files": {"image": ("a.png", encode(GOOD))}, "data": {"boxes": json.dumps([[0, 0, 5, 5]] * 21)}},
        422,
        "too_many_boxes",
    ),
    "wrong_content_type": (lambda: {"content": encode(GOOD), "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type"),
    "text_plain": (lambda: {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    "huge_json": (lambda: {"json": {"image": "A" * (2 * MAX_UPLOAD)}}, 413, "payload_too_large"),
    "huge_json_chunked": (
        lambda: {"content": iter([b'{"image": "'] + [b"A" * 65536] * 16 + [b'"}']), "headers": {"content-type": "application/json"}},
        413,
        "payload_too_large",
    ),
    "huge_multipart_file": (lambda: {"files": {"image": ("a.png", b"\x89PNG" + b"\0" * (MAX_UPLOAD + 10))}}, 413, "payload_too_large"),
    "deeply_nested_json": (lambda: {"content": b"[" * 100000, "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    "malformed_json": (lambda: {"content": b'{"image": ', "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    "json_not_object": (lambda: {"json": [1, 2, 3]}, 422, "invalid_request"),
    "bad_base64": (lambda: {"json": {"image": "not base64 at all!"}}, 400, "invalid_base64"),
    "unknown_json_field": (lambda: {"json": {"image": "", "colour": "red"}}, 422, "invalid_request"),
    "missing_image": (lambda: {"files": {"picture": ("a.png", encode(GOOD))}}, 422, "invalid_request"),
    "no_image_field": (lambda: {"data": {"boxes": "[]"}, "files": {"boxes2": ("x", b"1")}}, 422, "invalid_request"),
    "bad_threshold": (lambda: {"files": {"image": ("a.png", encode(GOOD))}, "data": {"score_threshold": "2.5"}}, 422, "invalid_request"),
    "bad_query": (lambda: {"files": {"image": ("a.png", encode(GOOD))}, "params": {"mask_format": "jpeg"}}, 422, "invalid_request"),
    "image_and_image_id": (
        lambda: {"files": {"image": ("a.png", encode(GOOD)), "image_id": (None, "0" * 64)}},
        422,
        "invalid_request",
    ),
    "empty_image_id": (lambda: {"files": {"image_id": (None, "")}, "data": {"boxes": "[[1, 1, 9, 9]]"}}, 422, "invalid_request"),
    "malformed_image_id": (lambda: {"files": {"image_id": (None, "../../etc/passwd")}}, 422, "invalid_request"),
    "malformed_image_id_json": (lambda: {"json": {"image_id": "ABC"}}, 422, "invalid_request"),
    "unknown_image_id": (lambda: {"files": {"image_id": (None, "0" * 64)}, "data": {"boxes": "[[1, 1, 9, 9]]"}}, 404, "image_not_cached"),
    "unknown_image_id_json": (lambda: {"json": {"image_id": "f" * 64}}, 404, "image_not_cached"),
    "json_without_image": (lambda: {"json": {"boxes": [[1, 1, 9, 9]]}}, 422, "missing_image"),
    "multipart_without_boundary": (lambda: {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_4xx_and_the_next_request_succeeds(client, case):
    make, status, code = BAD_REQUESTS[case]
    r = client.post("/v1/segment", **make())
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and body["message"]
    if code is not None:
        assert body["error"] == code
    ok = segment(client, GOOD, max_instances=1)
    assert ok.status_code == 200 and len(ok.json()["instances"]) == 1


def test_errors_are_json_for_unknown_routes_and_methods(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = client.get("/v1/segment")
    assert r.status_code == 405 and r.json()["message"]


# ---- model info, health, metrics ---------------------------------------------------------------------
def test_model_health_and_ready(client, predictor):
    info = client.get("/v1/model").json()
    assert info["runtime"] == "pytorch" and info["version"] == predictor.version
    assert [c["name"] for c in info["classes"]] == predictor.class_names
    assert info["input_size"]["min_size"] == 64 and info["limits"]["max_upload_bytes"] == MAX_UPLOAD
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    schema = client.get("/openapi.json").json()
    op = schema["paths"]["/v1/segment"]["post"]
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"200", "400", "401", "413", "415", "422", "503"} <= set(op["responses"])


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+([0-9.eE+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def test_fifty_concurrent_clients_are_batched(server, client):
    before = client.get("/metrics").text
    images = [encode(synthetic_image(100 + k % 5)) for k in range(50)]

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=60)) as ac:
            return await asyncio.gather(
                *(ac.post("/v1/segment", files={"image": ("a.png", data, "image/png")}, params={"mask_format": "none"}) for data in images)
            )

    responses = asyncio.run(run_all())
    assert [r.status_code for r in responses] == [200] * 50
    after = client.get("/metrics").text
    batches = metric(after, "boxteacher_batch_size_count") - metric(before, "boxteacher_batch_size_count")
    batched_images = metric(after, "boxteacher_batch_size_sum") - metric(before, "boxteacher_batch_size_sum")
    assert batched_images == 50
    assert batches < 50, "no request shared a batch"
    single = metric(after, "boxteacher_batch_size_bucket", '{le="1.0"}') - metric(before, "boxteacher_batch_size_bucket", '{le="1.0"}')
    assert single < batches, "every batch had one image"
    ok = 'boxteacher_http_requests_total{method="POST",route="/v1/segment",status="200"}'
    assert metric(after, ok) - metric(before, ok) == 50
    assert metric(after, "boxteacher_http_requests_in_flight") == 1.0  # the /metrics request itself
    assert metric(after, "boxteacher_batch_queue_depth") == 0.0
    for name in ("boxteacher_http_request_duration_seconds_bucket", "boxteacher_batch_duration_seconds_count", "boxteacher_model_info"):
        assert name in after


def test_queue_full_answers_503_with_retry_after(predictor):
    settings = make_settings(max_queue=1, max_batch_size=1, max_wait_ms=0)
    with LocalServer(create_app(settings, predictor=predictor)) as s:
        data = encode(synthetic_image(8))

        async def burst():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as ac:
                return await asyncio.gather(*(ac.post("/v1/segment", files={"image": ("a.png", data)}) for _ in range(8)))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
        for busy in (r for r in responses if r.status_code == 503):
            assert busy.headers["retry-after"] == "1" and busy.json()["error"] == "queue_full"
        assert httpx.post(s.url + "/v1/segment", files={"image": ("a.png", data)}, timeout=60).status_code == 200


# ---- auth ---------------------------------------------------------------------------------------------
def test_api_key(predictor):
    key = "s3cret-key"
    with LocalServer(create_app(make_settings(api_key=key), predictor=predictor)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        files = {"image": ("a.png", encode(GOOD), "image/png")}
        for path in ("/v1/model", "/metrics", "/openapi.json", "/docs"):
            missing = c.get(path)
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer", path
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert c.get(path, headers={"Authorization": f"Bearer {key}"}).status_code == 200, path
        assert c.post("/v1/segment", files=files).status_code == 401
        assert c.post("/v1/segment", files=files, headers={"Authorization": "Bearer " + key[:-1]}).status_code == 401
        assert c.post("/v1/segment", files=files, headers={"Authorization": "Basic " + key}).status_code == 401
        r = c.post("/v1/segment", files=files, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["instances"]
        for path in ("/healthz", "/readyz", "/"):
            assert c.get(path).status_code == 200, path
    # an empty key (e.g. an unset variable in docker-compose) means no key
    with LocalServer(create_app(make_settings(api_key=""), predictor=predictor)) as s:
        assert httpx.get(s.url + "/v1/model").status_code == 200


def test_cors_off_by_default_and_configurable(client, predictor):
    r = client.options("/v1/segment", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    settings = make_settings(cors_origins=["https://label.example"])
    with LocalServer(create_app(settings, predictor=predictor)) as s:
        r = httpx.options(s.url + "/v1/segment", headers={"Origin": "https://label.example", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://label.example"


# ---- the command ----------------------------------------------------------------------------------------
def test_boxteacher_serve_command(small_checkpoint):
    port = free_port()
    env = {**os.environ, "BOXTEACHER_MAX_BATCH_SIZE": "4", "PYTHONPATH": str(REPO)}
    env.pop("BOXTEACHER_API_KEY", None)
    cmd = [sys.executable, "-m", "training.cli", "serve", "--model", str(small_checkpoint), "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        info = httpx.get(url + "/v1/model").json()
        assert info["batching"]["max_batch_size"] == 4 and info["name"] == small_checkpoint.stem
        r = httpx.post(url + "/v1/segment", files={"image": ("a.png", encode(GOOD))}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_command_refuses_a_missing_model(tmp_path, capsys, monkeypatch):
    from training.cli import main

    monkeypatch.delenv("BOXTEACHER_MODEL", raising=False)
    assert main(["serve", "--model", str(tmp_path / "missing.pth")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "no model" in capsys.readouterr().err
