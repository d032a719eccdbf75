"""Benchmark of the Label Studio backend (not a test).

1. **Interactive latency**: the time from Label Studio's /predict request (an annotator's
   rectangle in ``context.result``, the task's image on an HTTP host) to the backend's
   answer, p50 / p95, for 640x480 and 1920x1080 images. The backend runs as
   ``boxteacher labelstudio`` in a subprocess; "first box" requests download and decode the
   image, "next boxes" find it in the cache (an annotator drawing more boxes on one image).
2. **Box-prompted mask quality** on a COCO-format dataset (Penn-Fudan val) with the true
   boxes as prompts: mean IoU with the true masks, next to the filled box and OpenCV
   GrabCut initialised with the same box (5 iterations).

    python -m labelstudio_backend.benchmark --model model.pth \
        --data ../shared/datasets/pennfudan --output bench-labelstudio.json
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

XML = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image" smart="true"><Label value="person"/></RectangleLabels>
<BrushLabels name="mask" toName="image"><Label value="person"/></BrushLabels></View>"""
SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def load_val(data: Path, split: str = "val", limit: int | None = None):
    """[(image RGB uint8, boxes (n,4) xyxy float32, masks (n,H,W) bool), ...] of a COCO folder."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from training.data.coco import _load_coco_quietly, load_image

    coco: COCO = _load_coco_quietly(data / "annotations" / f"{split}.json")
    out = []
    for image_id in sorted(coco.getImgIds())[:limit]:
        info = coco.imgs[image_id]
        image = load_image(data / "images" / info["file_name"]).permute(1, 2, 0).numpy()
        anns = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd")]
        if not anns:
            continue
        boxes = np.asarray(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=np.float32
        )
        masks = np.stack([mask_utils.decode(coco.annToRLE(a)).astype(bool) for a in anns])
        out.append((image, boxes, masks))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _filled(box, h, w) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3]))
    m[max(y0, 0) : y1, max(x0, 0) : x1] = True
    return m


def _grabcut(image: np.ndarray, box, iterations: int = 5) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    x1, y1 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(
            cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
            mask,
            (x0, y0, max(x1 - x0, 1), max(y1 - y0, 1)),
            bgd,
            fgd,
            iterations,
            cv2.GC_INIT_WITH_RECT,
        )
    except cv2.error:  # a box covering the whole image leaves no background model
        return _filled(box, h, w)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


PROMPTED = "the model, box-prompted"  # whatever it was trained with (boxteacher, boxinst or condinst)


def quality(model: str, data: Path, device: str = "cpu", limit: int | None = None) -> dict:
    """Mean IoU with the true masks of box-prompted masks, filled boxes and GrabCut."""
    from serving.runtime import load_predictor

    predictor = load_predictor(model, device)
    ious: dict[str, list[float]] = {PROMPTED: [], "filled box": [], "GrabCut (5 it.)": []}
    seconds: dict[str, float] = dict.fromkeys(ious, 0.0)
    samples = load_val(data, limit=limit)
    for image, boxes, masks in samples:
        h, w = image.shape[:2]
        t = time.perf_counter()
        instances = predictor.predict([image], boxes=[boxes])[0]
        seconds[PROMPTED] += time.perf_counter() - t
        for k, inst in enumerate(instances):
            ious[PROMPTED].append(_iou(inst.mask, masks[k]))
            t = time.perf_counter()
            ious["filled box"].append(_iou(_filled(boxes[k], h, w), masks[k]))
            seconds["filled box"] += time.perf_counter() - t
            t = time.perf_counter()
            ious["GrabCut (5 it.)"].append(_iou(_grabcut(image, boxes[k]), masks[k]))
            seconds["GrabCut (5 it.)"] += time.perf_counter() - t
    n = len(ious["filled box"])
    return {
        "images": len(samples),
        "instances": n,
        "methods": {
            name: {
                "mean_iou": round(float(np.mean(v)), 4),
                "median_iou": round(float(np.median(v)), 4),
                "ms_per_instance": round(seconds[name] / max(n, 1) * 1000, 1),
            }
            for name, v in ious.items()
        },
    }


class _ImageHost:
    """A local HTTP server for the benchmark images (the backend allows only this host)."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def latency(
    model: str, data: Path, images: int = 10, boxes_per_image: int = 3, device: str = "cpu", torch_threads: int | None = None
) -> dict:
    """Interactive /predict latency per image size (see the module docstring)."""
    samples = load_val(data, limit=images)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        host = _ImageHost(root)
        port = _free_port()
        env = dict(
            os.environ, BOXTEACHER_LS_ALLOWED_HOSTS=host.url.split("//")[1], BOXTEACHER_LS_WORK_DIR=str(root / "work"), PYTHONUNBUFFERED="1"
        )
        env.pop("BASIC_AUTH_USER", None)
        env.pop("BASIC_AUTH_PASS", None)
        if torch_threads:
            env["BOXTEACHER_LS_TORCH_THREADS"] = str(torch_threads)
        cmd = [
            sys.executable,
            "-m",
            "training.cli",
            "labelstudio",
            "--model",
            model,
            "--port",
            str(port),
            "--device",
            device,
            "--log-level",
            "warning",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(root / "backend.log", "wb"))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the backend exited: {(root / 'backend.log').read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("the backend did not start")
                time.sleep(0.5)
            client = httpx.Client(timeout=300)
            task_id = 0
            for size_name, (w, h) in SIZES.items():
                first, rest, cpu = [], [], []
                for i, (image, boxes, _) in enumerate(samples):
                    ih, iw = image.shape[:2]
                    name = f"{size_name}_{i}.jpg"
                    Image.fromarray(image).resize((w, h), Image.BILINEAR).save(root / name, quality=90)
                    scaled = boxes * np.array([w / iw, h / ih, w / iw, h / ih], dtype=np.float32)
                    task_id += 1
                    for j in range(boxes_per_image):
                        x0, y0, x1, y1 = scaled[j % len(scaled)].tolist()
                        rect = {
                            "type": "rectanglelabels",
                            "from_name": "box",
                            "to_name": "image",
                            "original_width": w,
                            "original_height": h,
                            "value": {
                                "x": x0 / w * 100,
                                "y": y0 / h * 100,
                                "width": (x1 - x0) / w * 100,
                                "height": (y1 - y0) / h * 100,
                                "rotation": 0,
                                "rectanglelabels": ["person"],
                            },
                        }
                        body = {
                            "tasks": [
                                {"id": task_id, "data": {"image": f"{host.url}/{name}"}, "annotations": [], "drafts": [], "predictions": []}
                            ],
                            "project": "1.1",
                            "label_config": XML,
                            "params": {"login": None, "password": None, "context": {"result": [rect]}},
                        }
                        c = _cpu_seconds(proc.pid)
                        t = time.perf_counter()
                        r = client.post(url + "/predict", json=body)
                        dt = time.perf_counter() - t
                        cpu.append(_cpu_seconds(proc.pid) - c)
                        r.raise_for_status()
                        assert r.json()["results"][0]["result"], r.text[:300]
                        (first if j == 0 else rest).append(dt)
                both = first + rest
                results[size_name] = {
                    "requests": len(both),
                    "first_box_p50_ms": round(statistics.median(first) * 1000, 1),
                    "first_box_p95_ms": round(_percentile(first, 95) * 1000, 1),
                    "next_boxes_p50_ms": round(statistics.median(rest) * 1000, 1) if rest else None,
                    "next_boxes_p95_ms": round(_percentile(rest, 95) * 1000, 1) if rest else None,
                    "all_p50_ms": round(statistics.median(both) * 1000, 1),
                    "all_p95_ms": round(_percentile(both, 95) * 1000, 1),
                    "backend_cpu_ms_per_request": round(float(np.mean(cpu)) * 1000, 1),
                }
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            host.close()
    return results


def markdown(report: dict) -> str:
    lines = [
        f"model: {report['model']} on {report['device']} ({report['cpus']} CPUs, load average {report['load_average_before']} at the start)",
        "",
    ]
    if "latency" in report:
        lines += [
            "| image | requests | first box p50 / p95 (ms) | next boxes p50 / p95 (ms) | all p50 / p95 (ms) | backend CPU ms / request |",
            "|---|---|---|---|---|---|",
        ]
        for size, r in report["latency"].items():
            lines.append(
                f"| {size} | {r['requests']} | {r['first_box_p50_ms']} / {r['first_box_p95_ms']} | "
                f"{r['next_boxes_p50_ms']} / {r['next_boxes_p95_ms']} | {r['all_p50_ms']} / {r['all_p95_ms']} | {r['backend_cpu_ms_per_request']} |"
            )
        lines.append("")
    if "quality" in report:
        q = report["quality"]
        lines += [
            f"{q['instances']} instances on {q['images']} images, true boxes as prompts",
            "",
            "| method | mean IoU | median IoU | ms / instance |",
            "|---|---|---|---|",
        ]
        for name, r in q["methods"].items():
            lines.append(f"| {name} | {r['mean_iou']:.3f} | {r['median_iou']:.3f} | {r['ms_per_instance']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint (.pth), ONNX model or TensorRT engine")
    p.add_argument("--data", type=Path, required=True, help="COCO folder with annotations/val.json (e.g. ../shared/datasets/pennfudan)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=10, help="images per size for the latency part")
    p.add_argument("--boxes-per-image", type=int, default=3)
    p.add_argument("--quality-limit", type=int, default=None, help="at most this many val images for the quality part")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (backend and quality part)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--output", type=Path, default=None, help="write the report as JSON")
    args = p.parse_args(argv)
    report: dict = {
        "model": str(args.model),
        "device": args.device,
        "cpus": os.cpu_count(),
        "load_average_before": round(os.getloadavg()[0], 2),
    }
    if not args.skip_latency:
        report["latency"] = latency(args.model, args.data, args.images, args.boxes_per_image, args.device, args.torch_threads)
    if not args.skip_quality:
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        report["quality"] = quality(args.model, args.data, args.device, args.quality_limit)
    print(markdown(report))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
