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
"""

from __future__ import annotations

import argparse
import asyncio
import io
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

    def __enter__(self) -> "_ServerProcess":
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

    predictor = load_predictor(model, device)
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
    with _ServerProcess(model, device, max_batch_size, max_wait_ms, server_env) as server, httpx.Client(base_url=server.url, timeout=600) as client:
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
            _row(f"bare predictor, batches of {max_batch_size} (p50/p95 per batch)", 1, per_batch, sum(per_batch), 0, float(max_batch_size), max_batch_size)
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


def _row(name: str, concurrency: int, latencies: list[float], wall: float, errors: int, mean_batch: float, images_per_call: int = 1) -> dict[str, Any]:
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
        lines.append(f"Throughput gain of batching at the highest concurrency (vs max_batch_size=1): {result['batching_gain_vs_unbatched']:.2f}x")
    return "\n".join(lines)


# ---- CLI wiring (the benchmark command group calls these) -----------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``boxteacher benchmark serve``."""
    p.add_argument("--model", required=True, help="checkpoint (.pth), ONNX model (.onnx) or TensorRT engine (.engine)")
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
    """Handler of ``boxteacher benchmark serve``: prints the Markdown table."""
    import json

    result = run_serve_benchmark(
        args.model,
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
    print(format_markdown(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # python -m serving.benchmark --model FILE ...
    parser = argparse.ArgumentParser(prog="python -m serving.benchmark", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run_from_args(parser.parse_args()))
