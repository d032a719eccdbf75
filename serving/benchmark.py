"""``boxteacher benchmark serve``: the API's throughput and latency against the bare predictor.

In one run, on the same images:
1. the bare predictor in this process: latency of ``predict([image])`` (p50/p95) and the
   images/s of ``predict`` on batches of ``max_batch_size``;
2. ``boxteacher serve`` started as a subprocess on 127.0.0.1 (a free port), driven by
   ``concurrency`` concurrent HTTP clients (multipart PNG upload, RLE masks back):
   throughput and p50/p95 per concurrency level, and the mean batch size the server
   formed (from its /metrics). At concurrency 1 the HTTP requests alternate with the bare
   predictor's calls, request by request, so both see the same machine load;
3. optionally the same at the highest concurrency with batching off (max_batch_size=1).

Reported: the HTTP overhead at concurrency 1, paired per request: (HTTP latency - the
predictor's time inside the server, from the ``Server-Timing`` header) / that time, median
over requests (robust to a noisy machine); p50(HTTP) / p50(bare predictor in this process)
- 1 as well; and the throughput gain of batching (highest concurrency vs concurrency 1,
and vs the same concurrency unbatched). Client and server share the machine's cores.
Both sides run with the encoding cache off here, so that every request does the whole work.

``--prompts`` measures the annotator's loop instead (:func:`prompt_latency`): for each image
size, the first box on an image (the image part runs) and the next boxes on the same image
(only the prompt part runs, from the cache), p50 / p95, in process and through POST
/v1/segment (each box uploading the image, or the next boxes naming it by the first
response's ``image_id``), with the cache on and off, and the peak RSS of the server with its
cache full.
``--random-model RECIPE`` writes a conditioned random checkpoint of a recipe (backbone weights
none: timing only) and its ONNX export into ``--workdir`` and benchmarks both runtimes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def benchmark_images(num_images: int = 8, size: tuple[int, int] = (480, 640), seed: int = 0) -> list[np.ndarray]:
    """Deterministic synthetic-shapes images (H, W, 3) uint8 of ``size`` (H, W)."""
    from training.data.synthetic import render_image

    h, w = size
    out = []
    for k in range(num_images):
        pixels, _ = render_image(np.random.default_rng([seed, k]), max(h, w))
        out.append(np.ascontiguousarray(pixels[:h, :w]))
    return out


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\s+([0-9.eE+-]+)$", text, re.M))


class _ServerProcess:
    """``boxteacher serve`` in a subprocess on a free 127.0.0.1 port."""

    def __init__(self, model: str | Path, device: str, max_batch_size: int, max_wait_ms: float, env: dict[str, str] | None = None):
        from serving.local import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        repo = Path(__file__).resolve().parents[1]
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), full_env.get("PYTHONPATH", "")]))
        full_env.pop("BOXTEACHER_API_KEY", None)
        self.cmd = [
            sys.executable, "-m", "training.cli", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--device", device, "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning",
        ]  # fmt: skip
        self.env = full_env
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()

    def __enter__(self) -> _ServerProcess:
        import httpx

        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError("the server did not become ready in 300 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def _drive(url: str, payloads: list[bytes], concurrency: int, num_requests: int, params: dict) -> tuple[list[float], float, int]:
    """num_requests POSTs with ``concurrency`` in flight; returns latencies (s), wall time (s), errors."""
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = iter(range(num_requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            data = payloads[i % len(payloads)]
            start = time.perf_counter()
            r = await client.post("/v1/segment", files={"image": ("image.png", data, "image/png")}, params=params)
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, wall, errors


def run_serve_benchmark(
    model: str | Path,
    concurrency_levels: list[int] | tuple[int, ...] = (1, 8, 32),
    num_requests: int = 64,
    *,
    device: str = "cpu",
    image_size: tuple[int, int] = (480, 640),
    num_images: int = 8,
    max_batch_size: int = 8,
    max_wait_ms: float = 5.0,
    mask_format: str = "rle",
    score_threshold: float | None = None,
    warmup_requests: int = 4,
    compare_unbatched: bool = True,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Measure the API against the bare predictor (see the module docstring).

    Returns a dict with ``rows`` (one per measured path: name, concurrency, requests,
    throughput_rps, p50_ms, p95_ms, mean_batch, errors), ``http_overhead_c1`` (ratio),
    ``batching_gain`` (throughput at the highest concurrency / at concurrency 1),
    ``batching_gain_vs_unbatched`` (same concurrency, max_batch_size=1; None when not run)
    and ``setup`` (model, runtime, image size, machine). ``torch_threads`` sets the
    intra-op threads of both the bare predictor and the server (default: torch's).
    """
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    server_env = {"BOXTEACHER_TORCH_THREADS": str(torch_threads)} if torch_threads else {}
    server_env["BOXTEACHER_CACHE_MB"] = "0"  # every request does the whole work, as the bare predictor below

    from serving.runtime import load_predictor

    levels = sorted({int(c) for c in concurrency_levels if int(c) >= 1})
    if not levels:
        raise ValueError("concurrency_levels needs at least one level >= 1")
    images = benchmark_images(num_images, image_size)
    payloads = [_png(im) for im in images]
    params: dict[str, Any] = {"mask_format": mask_format}
    if score_threshold is not None:
        params["score_threshold"] = score_threshold
    rows: list[dict[str, Any]] = []

    import httpx

    predictor = load_predictor(model, device, cache_bytes=0)
    thr = score_threshold if score_threshold is not None else 0.3  # the server's default
    setup = {
        "model": str(model),
        "runtime": predictor.runtime,
        "device": device,
        "image_size": list(image_size),
        "input_size": predictor.input_size,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "mask_format": mask_format,
    }

    def measure(server: _ServerProcess, concurrency: int, name: str) -> dict[str, Any]:
        before = httpx.get(server.url + "/metrics").text
        latencies, wall, errors = asyncio.run(_drive(server.url, payloads, concurrency, num_requests, params))
        after = httpx.get(server.url + "/metrics").text
        n = _metric(after, "boxteacher_batch_size_count") - _metric(before, "boxteacher_batch_size_count")
        total = _metric(after, "boxteacher_batch_size_sum") - _metric(before, "boxteacher_batch_size_sum")
        return _row(name, concurrency, latencies, wall, errors, total / n if n else float("nan"))

    http_name = f"HTTP, max_batch_size={max_batch_size}"
    with (
        _ServerProcess(model, device, max_batch_size, max_wait_ms, server_env) as server,
        httpx.Client(base_url=server.url, timeout=600) as client,
    ):
        for i in range(warmup_requests):
            predictor.predict([images[i % len(images)]], score_threshold=thr)
            client.post("/v1/segment", files={"image": ("image.png", payloads[i % len(payloads)], "image/png")}, params=params)
        # 1. bare predictor and HTTP at concurrency 1, interleaved request by request so
        #    that both see the same machine load
        bare: list[float] = []
        one: list[float] = []
        inside: list[float] = []  # the predictor's time inside the API process, per request (Server-Timing)
        errors = 0
        for i in range(num_requests):
            start = time.perf_counter()
            predictor.predict([images[i % len(images)]], score_threshold=thr)
            bare.append(time.perf_counter() - start)
            if 1 in levels:
                start = time.perf_counter()
                r = client.post("/v1/segment", files={"image": ("image.png", payloads[i % len(payloads)], "image/png")}, params=params)
                one.append(time.perf_counter() - start)
                errors += r.status_code != 200
                inside.append(_timing(r.headers.get("server-timing", ""), "inference"))
        rows.append(_row("bare predictor, batch 1", 1, bare, sum(bare), 0, 1.0))
        if inside:
            rows.append(_row("bare predictor inside the API process, batch 1 (Server-Timing)", 1, inside, sum(inside), 0, 1.0))
        # 2. the bare predictor on full batches
        per_batch: list[float] = []
        for k in range(max(1, num_requests // max_batch_size)):
            batch = [images[(k * max_batch_size + j) % len(images)] for j in range(max_batch_size)]
            start = time.perf_counter()
            predictor.predict(batch, score_threshold=thr)
            per_batch.append(time.perf_counter() - start)
        rows.append(
            _row(
                f"bare predictor, batches of {max_batch_size} (p50/p95 per batch)",
                1,
                per_batch,
                sum(per_batch),
                0,
                float(max_batch_size),
                max_batch_size,
            )
        )
        if 1 in levels:
            rows.append(_row(http_name, 1, one, sum(one), errors, 1.0))
        # 3. HTTP at the other concurrency levels
        for c in levels:
            if c > 1:
                rows.append(measure(server, c, http_name))
    predictor.close()
    del predictor
    unbatched = None
    if compare_unbatched and max(levels) > 1 and max_batch_size > 1:
        with _ServerProcess(model, device, 1, 0.0, server_env) as server:
            asyncio.run(_drive(server.url, payloads, 1, warmup_requests, params))
            unbatched = measure(server, max(levels), "HTTP, max_batch_size=1")
            rows.append(unbatched)

    http = {r["concurrency"]: r for r in rows if r["name"] == http_name}
    # paired per request: (HTTP latency - the predictor's time inside the server) / that time
    paired = [(h - b) / b for h, b in zip(one, inside) if b > 0]
    overhead = _percentile(paired, 50) if paired else None
    overhead_separate = http[1]["p50_ms"] / rows[0]["p50_ms"] - 1.0 if 1 in http else None
    gain = http[max(levels)]["throughput_rps"] / http[1]["throughput_rps"] if 1 in http and len(levels) > 1 else None
    gain_unbatched = http[max(levels)]["throughput_rps"] / unbatched["throughput_rps"] if unbatched else None
    return {
        "rows": rows,
        "http_overhead_c1": overhead,
        "http_overhead_c1_vs_separate_process": overhead_separate,
        "batching_gain": gain,
        "batching_gain_vs_unbatched": gain_unbatched,
        "setup": setup,
    }


def _timing(header: str, name: str) -> float:
    """Seconds of entry ``name`` in a Server-Timing header (0.0 when absent)."""
    m = re.search(rf"(?:^|,)\s*{re.escape(name)};dur=([0-9.]+)", header)
    return float(m.group(1)) / 1000 if m else 0.0


def _row(
    name: str, concurrency: int, latencies: list[float], wall: float, errors: int, mean_batch: float, images_per_call: int = 1
) -> dict[str, Any]:
    return {
        "name": name,
        "concurrency": concurrency,
        "requests": len(latencies) * images_per_call,
        "throughput_rps": len(latencies) * images_per_call / wall if wall > 0 else float("nan"),
        "p50_ms": 1000 * _percentile(latencies, 50),
        "p95_ms": 1000 * _percentile(latencies, 95),
        "mean_batch": mean_batch,
        "errors": errors,
    }


def format_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table plus the two ratios."""
    s = result["setup"]
    lines = [
        f"Model `{Path(s['model']).name}` ({s['runtime']}, {s['device']}), {s['image_size'][1]}x{s['image_size'][0]} PNG uploads, "
        f"network input {s['input_size']['min_size']}/{s['input_size']['max_size']}, masks as {s['mask_format']}; "
        f"{s['cpus']} CPUs, torch threads {s['torch_threads']}; server max_batch_size={s['max_batch_size']}, max_wait_ms={s['max_wait_ms']}.",
        "",
        "| path | concurrency | images | images/s | p50 (ms) | p95 (ms) | mean batch | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['concurrency']} | {r['requests']} | {r['throughput_rps']:.2f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['mean_batch']:.2f} | {r['errors']} |"
        )
    lines.append("")
    if result["http_overhead_c1"] is not None:
        lines.append(
            "HTTP overhead at concurrency 1 (median over requests of (HTTP latency - predictor time inside the server) / "
            f"predictor time): {100 * result['http_overhead_c1']:+.1f}%"
        )
    if result.get("http_overhead_c1_vs_separate_process") is not None:
        lines.append(
            "p50 HTTP at concurrency 1 / p50 of the bare predictor in the benchmark process - 1: "
            f"{100 * result['http_overhead_c1_vs_separate_process']:+.1f}% (two processes; sensitive to machine load)"
        )
    if result["batching_gain"] is not None:
        lines.append(f"Throughput gain, highest concurrency vs concurrency 1: {result['batching_gain']:.2f}x")
    if result["batching_gain_vs_unbatched"] is not None:
        lines.append(
            f"Throughput gain of batching at the highest concurrency (vs max_batch_size=1): {result['batching_gain_vs_unbatched']:.2f}x"
        )
    return "\n".join(lines)


# ---- the annotator's loop: first box, next boxes --------------------------------------------------
def prompt_boxes(image_hw: tuple[int, int], count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` deterministic (1, 4) xyxy boxes inside an image, 10-40% of each side."""
    rng = np.random.default_rng(seed)
    h, w = image_hw
    out = []
    for _ in range(count):
        bw, bh = rng.uniform(0.1, 0.4) * w, rng.uniform(0.1, 0.4) * h
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        out.append(np.array([[x0, y0, x0 + bw, y0 + bh]], dtype=np.float32))
    return out


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident set size (VmHWM) of a process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        text = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def _summary(times: list[float]) -> dict[str, float | int]:
    return {"n": len(times), "p50_ms": round(1000 * _percentile(times, 50), 1), "p95_ms": round(1000 * _percentile(times, 95), 1)}


def prompt_latency(
    model: str | Path,
    image_sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...] = ((480, 640), (1080, 1920)),
    num_images: int = 3,
    boxes_per_image: int = 4,
    *,
    device: str = "cpu",
    http: bool = True,
    cache_off: bool = True,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """First box and next boxes on the same image (see the module docstring).

    Returns {"setup", "rows": [{"path", "cache", "image", "first_box": {n, p50_ms, p95_ms},
    "next_boxes": {...}}], "peak_rss_mb": {"in_process": .., "server": ..}}. ``cache_off``
    adds the in-process predictor with its cache off (every box runs the whole network).
    """
    import httpx
    import torch

    from serving.runtime import load_predictor

    if torch_threads:
        torch.set_num_threads(torch_threads)
    rows: list[dict[str, Any]] = []
    sets = {
        hw: (benchmark_images(num_images, hw, seed=7), [prompt_boxes(hw, boxes_per_image, seed=k) for k in range(num_images)])
        for hw in map(tuple, image_sizes)
    }

    def per_size(call, path: str, cache: str, image_sets=None) -> None:
        for hw, (images, boxes) in (image_sets or sets).items():
            first, rest = [], []
            for im, bs in zip(images, boxes):
                for j, b in enumerate(bs):
                    start = time.perf_counter()
                    call(im, b)
                    (first if j == 0 else rest).append(time.perf_counter() - start)
            rows.append(
                {"path": path, "cache": cache, "image": f"{hw[1]}x{hw[0]}", "first_box": _summary(first), "next_boxes": _summary(rest)}
            )

    predictor = load_predictor(model, device)
    runtime = predictor.runtime
    predictor.warm_up()
    per_size(lambda im, b, p=predictor: p.predict([im], boxes=[b]), "in process", "on")
    rss_in_process = peak_rss_mb()
    if cache_off:
        predictor.cache.max_bytes = 0  # from now on nothing is cached: every box encodes its image
        predictor.cache.clear()
        per_size(lambda im, b, p=predictor: p.predict([im], boxes=[b]), "in process", "off")
    predictor.close()
    del predictor
    server_rss = None
    if http:
        # by image_id: other images (so that their first box encodes), the next boxes name the image
        id_sets = {hw: (benchmark_images(num_images, hw, seed=8), boxes) for hw, (_, boxes) in sets.items()}
        pngs = {id(im): _png(im) for group in (sets, id_sets) for images, _ in group.values() for im in images}
        env = {"BOXTEACHER_TORCH_THREADS": str(torch_threads)} if torch_threads else {}
        with _ServerProcess(model, device, 1, 0.0, env) as server, httpx.Client(base_url=server.url, timeout=600) as client:
            image_ids: dict[int, str] = {}

            def post(im, b, by_id: bool = False):
                fields = {"boxes": json.dumps(b.tolist())}
                if by_id and id(im) in image_ids:
                    r = client.post("/v1/segment", files={"image_id": (None, image_ids[id(im)])}, data=fields)
                else:
                    r = client.post("/v1/segment", files={"image": ("image.png", pngs[id(im)], "image/png")}, data=fields)
                r.raise_for_status()
                image_ids[id(im)] = r.json()["image_id"]

            per_size(post, "POST /v1/segment", "on")
            per_size(lambda im, b: post(im, b, by_id=True), "POST /v1/segment, next boxes by image_id", "on", id_sets)
            server_rss = peak_rss_mb(server.proc.pid if server.proc else None)
    return {
        "setup": {
            "model": str(model),
            "runtime": runtime,
            "device": device,
            "images_per_size": num_images,
            "boxes_per_image": boxes_per_image,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average": round(os.getloadavg()[0], 2),
        },
        "rows": rows,
        "peak_rss_mb": {"in_process": round(rss_in_process, 1), "server": round(server_rss, 1) if server_rss else None},
    }


def format_prompt_markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"Model `{Path(s['model']).name}` ({s['runtime']}, {s['device']}), {s['images_per_size']} images per size, "
        f"{s['boxes_per_image']} boxes per image (the first one encodes the image); {s['cpus']} CPUs, torch threads "
        f"{s['torch_threads']}, load average {s['load_average']} at the start.",
        "",
        "| path | cache | image | first box p50 / p95 (ms) | next boxes p50 / p95 (ms) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        f, n = r["first_box"], r["next_boxes"]
        lines.append(f"| {r['path']} | {r['cache']} | {r['image']} | {f['p50_ms']} / {f['p95_ms']} | {n['p50_ms']} / {n['p95_ms']} |")
    rss = result["peak_rss_mb"]
    lines += ["", f"Peak RSS with the cache full: in process {rss['in_process']} MiB, server {rss['server']} MiB."]
    return "\n".join(lines)


def random_models(recipe: str, workdir: str | Path, overrides: list[str] | None = None, onnx: bool = True) -> list[Path]:
    """A conditioned random checkpoint of ``recipe`` (+ ``model.backbone.weights=none``) and,
    with ``onnx``, its dynamic ONNX export, in ``workdir`` (reused when there): for timing."""
    from training.checkpoint import write_random_checkpoint
    from training.config import load_config

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    name = Path(recipe).stem
    ckpt = work / f"{name}-random.pth"
    if not ckpt.is_file():
        write_random_checkpoint(ckpt, load_config(recipe, ["model.backbone.weights=none", *(overrides or [])]))
    out = [ckpt]
    if onnx:
        from export.onnx_export import export_checkpoint

        path = work / f"{name}-random.onnx"
        if not path.is_file():
            export_checkpoint(ckpt, path, branch="teacher", dynamic=True)
        out.append(path)
    return out


# ---- CLI wiring (the benchmark command group calls these) -----------------------------------------
def register(bench: argparse._SubParsersAction) -> None:
    """``boxteacher benchmark serve`` (entry point group ``boxteacher.benchmarks``)."""
    p = bench.add_parser("serve", help="HTTP throughput/latency vs the bare predictor")
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``boxteacher benchmark serve``."""
    p.add_argument("--model", default=None, help="checkpoint (.pth), ONNX model (.onnx) or TensorRT engine (.engine)")
    p.add_argument(
        "--random-model",
        default=None,
        metavar="RECIPE",
        help="instead of --model: a random conditioned checkpoint of RECIPE (backbone weights none) and its ONNX export, both benchmarked",
    )
    p.add_argument("--workdir", default="bench-serve", help="where --random-model writes its models (reused)")
    p.add_argument("--prompts", action="store_true", help="the annotator's loop: first box vs next boxes on the same image, cache on/off")
    p.add_argument("--prompt-sizes", default="480x640,1080x1920", help="HxW image sizes of --prompts (default 480x640,1080x1920)")
    p.add_argument("--prompt-images", type=int, default=3, help="images per size for --prompts")
    p.add_argument("--boxes-per-image", type=int, default=4)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels (default 1,8,32)")
    p.add_argument("--requests", type=int, default=64, help="requests per level (default 64)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"), help="synthetic image size (default 480 640)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--mask-format", default="rle", choices=["rle", "polygon", "png", "none"])
    p.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size=1 comparison")
    p.add_argument("--torch-threads", type=int, default=None, help="intra-op threads of the predictor and the server (default: torch's)")
    p.add_argument("--output", default=None, help="also write the result as JSON here")


def run_from_args(args: argparse.Namespace) -> int:
    """Handler of ``boxteacher benchmark serve``: prints the Markdown table(s)."""
    if (args.model is None) == (args.random_model is None):
        raise ValueError("give --model FILE or --random-model RECIPE")
    models = [Path(args.model)] if args.model else random_models(args.random_model, args.workdir)
    results = []
    for model in models:
        results.append(_run_one(args, model))
    if args.output:
        Path(args.output).write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return 0


def _run_one(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    if args.prompts:
        sizes = [tuple(int(v) for v in hw.split("x")) for hw in str(args.prompt_sizes).split(",") if hw.strip()]
        result = prompt_latency(
            model, sizes, args.prompt_images, args.boxes_per_image, device=args.device, torch_threads=args.torch_threads
        )
        print(format_prompt_markdown(result), flush=True)
        return result
    result = run_serve_benchmark(
        model,
        [int(c) for c in str(args.concurrency).split(",") if c.strip()],
        args.requests,
        device=args.device,
        image_size=tuple(args.image_size),
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        mask_format=args.mask_format,
        compare_unbatched=not args.no_unbatched,
        torch_threads=args.torch_threads,
    )
    print(format_markdown(result), flush=True)
    return result


if __name__ == "__main__":  # python -m serving.benchmark --model FILE ...
    parser = argparse.ArgumentParser(prog="python -m serving.benchmark", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run_from_args(parser.parse_args()))
