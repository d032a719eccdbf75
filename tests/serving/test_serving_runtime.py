"""serving.runtime, serving.prompting, serving.images, serving.masks and the batcher,
without HTTP: the Predictor contract on the tiny random checkpoint (CPU)."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL_SCALE, shapes_image, tiny_config, write_checkpoint
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from serving.batching import MicroBatcher, QueueFull
from serving.cache import image_digest
from serving.images import CorruptImage, EmptyImage, ImageTooLarge, UnsupportedImage, decode_image
from serving.masks import encode_png, encode_polygon, encode_rle
from serving.prompting import SOURCE_MATCHED, SOURCE_PROMPT, ImageEncoding, PromptOutput, box_prompted_masks, validate_boxes
from serving.runtime import Instance, PyTorchPredictor, load_predictor
from training.model.boxes import box_pixel_masks
from training.model.processing import paste_mask_in_box

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2


def image(k: int, h: int = 96, w: int = 96) -> np.ndarray:
    return shapes_image(21, k, h, w)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("rt") / "tiny.pth", tiny_config(overrides=SMALL_SCALE))


@pytest.fixture(scope="module")
def predictor(checkpoint) -> PyTorchPredictor:
    return load_predictor(checkpoint)


def test_contract_properties(predictor, checkpoint):
    assert predictor.runtime == "pytorch" and predictor.name == "tiny"
    assert predictor.class_names == ["class_0", "class_1", "class_2"]
    assert len(predictor.version) == 12
    assert predictor.input_size == {"min_size": 64, "max_size": 96, "size_divisibility": 32, "fixed": None}
    # teacher weights by default; the student on request
    student = load_predictor(checkpoint, branch="student")
    im = image(0)
    a, b = predictor.predict([im])[0], student.predict([im])[0]
    assert [i.mask_score for i in a] != [i.mask_score for i in b]


def test_instances_in_original_pixels_sorted_by_mask_score(predictor):
    im = image(1, 80, 120)
    out = predictor.predict([im])[0]
    assert out and all(isinstance(i, Instance) for i in out)
    for inst in out:
        assert inst.mask.shape == (80, 120) and inst.mask.dtype == bool
        assert inst.box.shape == (4,) and 0 <= inst.box[0] < inst.box[2] <= 120 and 0 <= inst.box[1] < inst.box[3] <= 80
        assert inst.label_name == predictor.class_names[inst.label] and inst.source == "detection"
        assert 0 <= inst.det_score <= 1 and 0 <= inst.mask_score <= 1
        assert inst.area == inst.mask.sum()
        x0, y0, x1, y1 = inst.window  # the window the predictor pasted the mask on holds all of it
        outside = inst.mask.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any() and (x1 - x0) * (y1 - y0) >= inst.area
    scores = [i.mask_score for i in out]
    assert scores == sorted(scores, reverse=True)
    # the model's own post-processing, through CondInst.predict, gives the same instances
    ref = predictor.model.predict([torch.from_numpy(im).permute(2, 0, 1)])[0]
    order = torch.argsort(ref.scores, descending=True, stable=True)
    assert len(order) == len(out)
    for inst, k in zip(out, order.tolist()):
        assert inst.mask_score == pytest.approx(float(ref.scores[k]), abs=1e-6)
        assert np.array_equal(inst.mask, ref.masks[k].numpy())


def test_batched_equals_one_by_one(predictor):
    images = [image(2), image(3, 64, 90), image(4), image(5, 120, 70)]
    batched = predictor.predict(images, use_cache=False)
    for im, got in zip(images, batched):
        alone = predictor.predict([im], use_cache=False)[0]
        assert len(alone) == len(got)
        for a, b in zip(alone, got):
            assert a.label == b.label and a.mask_score == pytest.approx(b.mask_score, abs=1e-4)
            assert (a.mask != b.mask).mean() < 1e-3


def test_cached_answers_equal_uncached(checkpoint):
    """Encode once, prompt many (PyTorch): an image's second request runs only the prompt part
    (or nothing) on the cached encoding, with exactly the uncached answers."""
    p = load_predictor(checkpoint)
    im = image(11)
    auto = p.predict([im], use_cache=False)[0]
    boxes = np.array([[2, 2, 30, 30], auto[0].box, [60, 60, 94, 94]], dtype=np.float32)
    uncached = p.predict([im], boxes=[boxes], use_cache=False)[0]
    assert p.cache.stats()["misses"] == 0 and len(p.cache) == 0
    p.predict([im], boxes=[boxes[:1]])  # encodes and caches
    cached = p.predict([im], boxes=[boxes])[0]
    cached_auto = p.predict([im])[0]
    stats = p.cache.stats()
    assert (stats["entries"], stats["hits"], stats["misses"]) == (1, 2, 1) and stats["bytes"] > 0
    assert [i.source for i in cached][1] == "matched"
    for want, got in ((uncached, cached), (auto, cached_auto)):
        assert len(want) == len(got) > 0
        for x, y in zip(want, got):
            assert (x.label, x.det_score, x.mask_score, x.source) == (y.label, y.det_score, y.mask_score, y.source)
            assert np.array_equal(x.box, y.box) and np.array_equal(x.mask, y.mask)
    # another image is a miss; close() (a hot swap) drops every entry
    p.predict([image(12)], boxes=[boxes])
    assert p.cache.stats()["misses"] == 2 and len(p.cache) == 2
    p.close()
    assert len(p.cache) == 0 and p.cache.stats()["bytes"] == 0


def test_cache_is_bounded_in_bytes_and_keyed_by_version(checkpoint):
    p = load_predictor(checkpoint)
    size = p.encode([image(13)])[0].nbytes
    small = load_predictor(checkpoint, cache_bytes=size * 2 + size // 2)  # room for two encodings
    for k in (13, 14, 15):
        small.encode([image(k)])
    stats = small.cache.stats()
    assert (stats["entries"], stats["evictions"]) == (2, 1) and stats["bytes"] <= stats["max_bytes"]
    small.encode([image(13)])  # the least recently used one was dropped: a miss
    assert small.cache.stats()["misses"] == 4
    assert load_predictor(checkpoint, cache_bytes=0).encode([image(13)])[0].nbytes == size  # 0 = off, still answers
    assert list(p.cache._items) == [(p.version, image_digest(image(13)))]  # the key: (model version, content hash)


def test_threshold_and_max_instances_per_image(predictor):
    im = image(6)
    full = predictor.predict([im])[0]
    # A threshold halfway between two scores that are well apart: the batched forward may move a
    # score by ~1e-5, so a cut equal to one instance's own score would be decided by rounding.
    scores = sorted({i.mask_score for i in full}, reverse=True)
    gaps = [(hi - lo, (hi + lo) / 2) for hi, lo in zip(scores, scores[1:]) if hi - lo > 1e-3]
    assert gaps, "the tiny model gives no two scores 1e-3 apart"
    cut = gaps[len(gaps) // 2][1]
    a, b = predictor.predict([im, im], score_threshold=[cut, None], max_instances=[None, 3])
    assert all(i.mask_score >= cut for i in a) and len(a) == sum(i.mask_score >= cut for i in full)
    assert len(b) == 3


def test_class_agnostic_nms_keeps_one_box_per_object(predictor):
    im = image(6)
    full = predictor.predict([im])[0]
    predictor.class_agnostic_nms = True
    try:
        one = predictor.predict([im])[0]
    finally:
        predictor.class_agnostic_nms = False
    boxes = torch.tensor(np.stack([i.box for i in full]))
    overlaps = box_iou(boxes, boxes) > predictor.nms_threshold
    # greedy by hand: walk the detections best first, keep one that overlaps no kept one
    kept: list[int] = []
    for k in range(len(full)):
        if not any(overlaps[k, j] for j in kept):
            kept.append(k)
    assert len(set(i.label for i in full)) > 1 and len(kept) < len(full)  # the case is not trivial
    assert [(i.label, i.mask_score) for i in one] == [(full[k].label, full[k].mask_score) for k in kept]


def test_box_prompts(predictor):
    im = image(7)
    dets = predictor.predict([im])[0]
    boxes = np.array([[3.2, 4.7, 30.1, 40.9], dets[0].box, [50, 50, 150, 150], [10, 60, 20, 70]], dtype=np.float32)
    out = predictor.predict([im, im], boxes=[boxes, None])
    prompted, automatic = out
    assert len(prompted) == 4 and len(automatic) == len(dets)
    assert [i.source for i in prompted][:2] == ["prompt", "matched"]
    assert prompted[1].label == dets[0].label and prompted[1].det_score == pytest.approx(dets[0].det_score)
    np.testing.assert_allclose(prompted[2].box, [50, 50, 96, 96])  # clipped to the image
    for inst in prompted:
        outside = ~box_pixel_masks(torch.tensor(inst.box[None]), 96, 96)[0].numpy()
        assert not inst.mask[outside].any()
        assert 0 <= inst.mask_score <= 1
        x0, y0, x1, y1 = inst.window  # the box's pixels
        assert not outside[y0:y1, x0:x1].any() and (x1 - x0) * (y1 - y0) == (~outside).sum()
    # every box's mask, the matched one's included, is the mask head at that box's centre:
    # the prompt part run directly on this image's encoding, pasted on the box
    enc = predictor.encode([im], use_cache=False)[0]
    scale = np.array([enc.input_hw[1] / 96, enc.input_hw[0] / 96] * 2, dtype=np.float32)
    own = predictor._prompt(enc, torch.from_numpy(boxes[1:2] * scale)).mask_probs[0]
    x0, y0, x1, y1 = prompted[1].window
    want = paste_mask_in_box(own, (x0, y0, x1, y1), enc.input_hw, (96, 96), 4) > 0.5
    assert np.array_equal(prompted[1].mask[y0:y1, x0:x1], want.numpy())
    assert predictor.predict([im], boxes=[np.zeros((0, 4))])[0] == []


def test_box_prompted_masks_by_hand():
    """A matched box takes the detection's class and score but the mask at its own centre.

    Input = output = 32x32, stride 4 (8x8 maps). One detection [0, 0, 16, 16] (label 3, det
    0.9) whose mask is all ones; prompt masks: box A = the detection's box, ones on the 2x2
    top-left cells only (pixel centres 2 and 6 are 1, 10 is 0: the pasted mask crosses 0.5 at
    pixel 8); box B = [16, 16, 32, 32], no detection, all ones.
    """
    ones = torch.ones(1, 8, 8)
    enc = ImageEncoding(
        boxes=torch.tensor([[0.0, 0.0, 16.0, 16.0]]), labels=torch.tensor([3]), det_scores=torch.tensor([0.9]),
        scores=torch.tensor([0.8]), mask_probs=ones, input_hw=(32, 32),
    )  # fmt: skip
    a = torch.zeros(8, 8)
    a[:2, :2] = 1.0
    prompt = PromptOutput(labels=torch.tensor([1, 2]), det_scores=torch.tensor([0.4, 0.5]), mask_probs=torch.stack([a, torch.ones(8, 8)]))
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0]])
    pm = box_prompted_masks(boxes, enc, prompt, (32, 32))
    assert pm.sources == [SOURCE_MATCHED, SOURCE_PROMPT] and pm.matched_index.tolist() == [0, -1]
    assert pm.labels.tolist() == [3, 2] and pm.det_scores.tolist() == pytest.approx([0.9, 0.5])
    mask_a = pm.masks[0].numpy()
    assert mask_a[:6, :6].all() and not mask_a[10:].any() and not mask_a[:, 10:].any()  # not the detection's full box
    assert pm.masks[1, 16:, 16:].all() and not pm.masks[1, :16].any() and not pm.masks[1, :, :16].any()
    assert pm.mask_scores[1].item() == pytest.approx((0.5 * 1.0) ** 0.5)  # sqrt(det * m_bar), m_bar = 1
    assert pm.windows == [(0, 0, 16, 16), (16, 16, 32, 32)]


def test_prompt_masks_follow_the_box(predictor):
    """Boxes without a detection use the mask head at their own location: each gets its own mask."""
    im = np.full((96, 96, 3), 127, np.uint8)
    boxes = np.array([[2, 2, 30, 30], [60, 60, 94, 94], [2, 60, 30, 94]], dtype=np.float32)
    out = predictor.predict([im], boxes=[boxes])[0]
    assert [i.box.tolist() for i in out] == boxes.tolist()
    masks = [i.mask for i in out]
    assert not np.array_equal(masks[0], masks[1])


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([[1, 2, 3]], "shape"),
        ([[np.nan, 1, 5, 5]], "non-finite"),
        ([[1, 1, np.inf, 5]], "non-finite"),
        ([[5, 1, 5, 9]], "empty or inverted"),
        ([[5, 9, 8, 2]], "empty or inverted"),
        ([[200, 10, 300, 20]], "outside"),
        ([[-30, -30, -1, -1]], "outside"),
    ],
)
def test_bad_boxes_raise(predictor, boxes, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict([image(8)], boxes=[np.array(boxes, dtype=np.float64)])
    with pytest.raises(ValueError, match=message):
        validate_boxes(np.array(boxes, dtype=np.float64), (96, 96))


def test_bad_images_raise(predictor):
    for bad in (
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((0, 5, 3), np.uint8),
    ):
        with pytest.raises(ValueError, match="uint8 RGB"):
            predictor.predict([bad])
    with pytest.raises(ValueError, match="entries"):
        predictor.predict([image(0)], boxes=[None, None])
    assert predictor.predict([]) == []


def test_load_predictor_by_suffix(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_predictor(tmp_path / "missing.pth")
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown model file type"):
        load_predictor(odd)


# ---- decoding uploads ----------------------------------------------------------------------------------
def _png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(arr)
    (pil.convert(mode) if mode else pil).save(buf, format="PNG", **save)
    return buf.getvalue()


def test_decode_image_modes_and_exif():
    rgb = image(9, 40, 60)
    assert np.array_equal(decode_image(_png(rgb), 10**6), rgb)
    gray = decode_image(_png(rgb, "L"), 10**6)
    assert gray.shape == (40, 60, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    assert decode_image(_png(rgb, "RGBA"), 10**6).shape == (40, 60, 3)
    sixteen = np.full((40, 60), 65535, np.uint16)
    sixteen[:, :30] = 257 * 10
    out = decode_image(_png(sixteen), 10**6)
    assert out[0, 0, 0] == 10 and out[0, -1, 0] == 255
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise when displayed
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), 10**6).shape == (60, 40, 3)


def test_decode_image_plain_png_fast_path_equals_pillow(monkeypatch):
    """libspng decodes plain 8-bit RGB PNGs (and only those); every upload gives the pixels
    Pillow gives, with or without pyspng installed."""
    import serving.images as images

    pytest.importorskip("pyspng")
    rgb = image(11, 50, 70)
    exif = Image.Exif()
    exif[0x0112] = 8
    uploads = {
        "rgb": _png(rgb),
        "gray": _png(rgb, "L"),
        "rgba": _png(rgb, "RGBA"),
        "palette": _png(rgb, "P"),
        "exif": _png(rgb, exif=exif),
        "trns": _png(rgb, transparency=(0, 0, 0)),
    }
    calls: list[int] = []
    real = images.pyspng.load
    monkeypatch.setattr(images.pyspng, "load", lambda data: calls.append(len(data)) or real(data))
    fast = {name: decode_image(data, 10**6) for name, data in uploads.items()}
    assert calls[0] == len(uploads["rgb"]) and len(uploads["exif"]) not in calls  # EXIF: Pillow rotates
    assert fast["exif"].shape == (70, 50, 3)
    monkeypatch.setattr(images, "pyspng", None)
    for name, data in uploads.items():
        slow = decode_image(data, 10**6)
        assert fast[name].dtype == np.uint8 and fast[name].flags.writeable, name
        assert np.array_equal(fast[name], slow), name
    assert np.array_equal(fast["rgb"], rgb)


def test_decode_image_errors():
    with pytest.raises(EmptyImage):
        decode_image(b"", 10**6)
    with pytest.raises(UnsupportedImage):
        decode_image(b"GIF87 not really", 10**6)
    with pytest.raises(UnsupportedImage):
        decode_image(b"%PDF-1.4\n", 10**6)
    data = _png(image(10))
    with pytest.raises(CorruptImage):
        decode_image(data[: len(data) // 2], 10**6)
    with pytest.raises(ImageTooLarge, match="96x96"):
        decode_image(data, 96 * 96 - 1)


# ---- mask encodings ---------------------------------------------------------------------------------
def test_mask_encodings_round_trip():
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:35] = True
    mask[22:28, 2:6] = True
    rle = encode_rle(mask)
    assert rle["size"] == [30, 40] and isinstance(rle["counts"], str)
    assert np.array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool), mask)
    png = Image.open(io.BytesIO(base64.b64decode(encode_png(mask))))
    assert png.mode == "1" and np.array_equal(np.array(png), mask)
    polygons = encode_polygon(mask)
    assert len(polygons) == 2
    rles = mask_utils.frPyObjects(polygons, 30, 40)
    assert abs(mask_utils.area(mask_utils.merge(rles)) - mask.sum()) / mask.sum() < 0.2
    assert encode_polygon(np.zeros((5, 5), bool)) == []


# ---- the micro-batcher --------------------------------------------------------------------------------
def test_micro_batcher_batches_isolates_failures_and_bounds_the_queue():
    sizes: list[int] = []

    def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if 13 in items:
            raise ValueError("unlucky")
        return [x * 2 for x in items]

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=4, max_wait_s=0.05, max_queue=10)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(x) for x in range(8)), return_exceptions=True)
            assert results == [x * 2 for x in range(8)]
            assert max(sizes) == 4 and sum(sizes) == 8
            results = await asyncio.gather(batcher.submit(12), batcher.submit(13), batcher.submit(14), return_exceptions=True)
            assert results[0] == 24 and isinstance(results[1], ValueError) and results[2] == 28
            tasks = [asyncio.create_task(batcher.submit(x)) for x in range(11)]
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert sum(isinstance(r, QueueFull) for r in done) == 1
        finally:
            await batcher.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("crop_fraction", [1.0, 0.25, 0.0])
def test_crop_rle_equals_pycocotools_on_the_full_mask(monkeypatch, crop_fraction):
    """serving.masks.encode_rle works on the mask's bounding crop (or hands a large crop to
    pycocotools whole); the counts must be byte for byte pycocotools' (edge cases: empty,
    full, touching every border, runs that continue from the bottom of one column to the top
    of the next, one pixel). crop_fraction 1.0: always the crop path; 0.0: never."""
    from serving import masks
    from serving.masks import encode_rle

    monkeypatch.setattr(masks, "CROP_FRACTION", crop_fraction)

    def reference(m):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}

    cases = [np.zeros((4, 3), bool), np.ones((4, 3), bool)]
    wrap = np.zeros((4, 3), bool)
    wrap[2:, 0] = wrap[:2, 1] = True  # one run in column-major order across the column break
    one = np.zeros((5, 7), bool)
    one[4, 6] = True
    cases += [wrap, one]
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = rng.integers(1, 40, size=2)
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
        m &= rng.random((h, w)) > 0.3  # holes: several runs per column
        cases.append(m)
    for m in cases:
        assert encode_rle(m) == reference(m), m.astype(int)
        # a window known to hold every True pixel (Instance.window) gives the same counts
        h, w = m.shape
        ys, xs = np.nonzero(m)
        if len(ys):
            x0, y0 = rng.integers(0, xs.min() + 1), rng.integers(0, ys.min() + 1)
            x1, y1 = rng.integers(xs.max() + 1, w + 1), rng.integers(ys.max() + 1, h + 1)
            assert encode_rle(m, (int(x0), int(y0), int(x1), int(y1))) == reference(m), (x0, y0, x1, y1)
        assert encode_rle(m, (0, 0, w, h)) == reference(m)
    assert encode_rle(np.array([[0, 2], [0, 0]], np.uint8)) == reference(np.array([[0, 1], [0, 0]], bool))  # nonzero = inside
