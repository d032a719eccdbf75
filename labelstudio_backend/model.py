"""The model behind the backend: loaded once per process, swapped atomically after training.

:class:`ModelHolder` wraps either a local :class:`serving.runtime.Predictor` (checkpoint,
ONNX model or TensorRT engine) or a :class:`RemotePredictor` that forwards to a running
``boxteacher serve`` API (``--server-url``), so one GPU server can serve both. Predictions
go through one lock (a Predictor is not thread-safe); a swap waits for the running
prediction and then replaces the model in one step.

``model_version`` (what Label Studio stores with each prediction) is
``<name>-v<generation>-<file hash>``; every successful training bumps the generation, so
Label Studio predicts again with the new model.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from serving.runtime import ImageRef, Instance

log = logging.getLogger(__name__)


class RemotePredictor:
    """The :class:`serving.runtime.Predictor` contract over the HTTP API (POST /v1/segment).

    Images are sent as PNG (lossless, already EXIF-corrected), masks come back as COCO RLE.
    """

    runtime = "remote"

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0, workers: int = 4):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, follow_redirects=False, trust_env=False)
        self.workers = workers
        self.path: Path | None = None
        self.refresh()

    def refresh(self) -> None:
        """Read name, version and classes from GET /v1/model."""
        r = self.client.get("/v1/model")
        if r.status_code != 200:
            raise RuntimeError(f"{self.url}/v1/model answered HTTP {r.status_code}: {r.text[:200]}")
        info = r.json()
        self.name = str(info.get("name", "remote"))
        self.version = str(info.get("version", "unknown"))
        self.device = f"{info.get('runtime', '?')}@{self.url}"
        self.class_names = [c["name"] for c in sorted(info.get("classes", []), key=lambda c: c["id"])]

    def predict(
        self,
        images: Sequence[np.ndarray | ImageRef],
        boxes: Sequence[np.ndarray | None] | None = None,
        score_threshold: float | None = None,
        max_instances: int | None = None,
        use_cache: bool = True,
    ) -> list[list[Instance]]:
        """As :meth:`serving.runtime.Predictor.predict` (``use_cache`` is the server's business:
        the API keeps its own encoding cache and finds the same image by its pixels)."""
        images = [im.load() if isinstance(im, ImageRef) else im for im in images]
        box_list = list(boxes) if boxes is not None else [None] * len(images)
        if len(images) <= 1:
            return [self._one(im, b, score_threshold, max_instances) for im, b in zip(images, box_list)]
        with ThreadPoolExecutor(min(self.workers, len(images))) as pool:
            return list(pool.map(lambda ib: self._one(ib[0], ib[1], score_threshold, max_instances), zip(images, box_list)))

    def _one(self, image: np.ndarray, boxes: np.ndarray | None, score_threshold, max_instances) -> list[Instance]:
        from pycocotools import mask as mask_utils

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        data = {"mask_format": "rle"}
        if boxes is not None:
            data["boxes"] = json.dumps(np.asarray(boxes, dtype=float).reshape(-1, 4).tolist())
        else:
            if score_threshold is not None:
                data["score_threshold"] = str(score_threshold)
            if max_instances is not None:
                data["max_instances"] = str(max_instances)
        r = self.client.post("/v1/segment", files={"image": ("image.png", buf.getvalue(), "image/png")}, data=data)
        if r.status_code != 200:
            message = r.json().get("message", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
            if 400 <= r.status_code < 500:
                raise ValueError(f"segmentation API: HTTP {r.status_code}: {str(message)[:300]}")
            raise RuntimeError(f"segmentation API: HTTP {r.status_code}: {str(message)[:300]}")
        out = []
        for inst in r.json()["instances"]:
            rle = inst["mask"]
            with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 copy-keyword warning
                warnings.filterwarnings("ignore", message=".*copy keyword", category=DeprecationWarning)
                mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
            out.append(
                Instance(
                    np.asarray(inst["box"], dtype=np.float32),
                    int(inst["category_id"]),
                    str(inst["category_name"]),
                    float(inst["det_score"]),
                    float(inst["mask_score"]),
                    mask,
                    str(inst.get("source", "detection")),
                )
            )
        return out

    def info(self) -> dict:
        return {"name": self.name, "version": self.version, "runtime": self.runtime, "device": self.device, "class_names": self.class_names}

    def close(self) -> None:
        self.client.close()


class ModelHolder:
    """The one model of this process (see the module docstring)."""

    def __init__(self, predictor, generation: int = 0, name: str | None = None, executor: ThreadPoolExecutor | None = None):
        self._predictor = predictor
        self.generation = generation
        self.name = name or predictor.name  # kept across swaps: the base model's name
        self._lock = threading.Lock()
        # The inference thread (the app's, one worker) that loads, warms up and runs local models;
        # None: the caller's thread. A thread that runs torch keeps an OpenMP pool of its own, and
        # with more pool threads than cores libgomp stops spinning between parallel regions: the
        # tiny model ran at 75-83 instead of 40 ms when loaded on one thread and run on others.
        self.executor = executor

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the inference thread (the caller's when there is none)."""
        if self.executor is None:
            return fn(*args, **kwargs)
        return self.executor.submit(fn, *args, **kwargs).result()

    @property
    def predictor(self):
        return self._predictor

    @property
    def class_names(self) -> list[str]:
        return list(self._predictor.class_names)

    @property
    def path(self) -> Path | None:
        """The checkpoint being served (None for exported models or a remote server)."""
        p = getattr(self._predictor, "path", None)
        return Path(p) if p is not None and Path(p).suffix.lower() in (".pth", ".pt") else None

    @property
    def model_version(self) -> str:
        return f"{self.name}-v{self.generation}-{str(self._predictor.version)[:8]}"

    def predict(self, images, boxes=None, score_threshold=None, max_instances=None, use_cache=True):
        """:meth:`serving.runtime.Predictor.predict`, one call at a time."""
        with self._lock:
            return self.run(
                self._predictor.predict,
                images,
                boxes=boxes,
                score_threshold=score_threshold,
                max_instances=max_instances,
                use_cache=use_cache,
            )

    def cache_stats(self) -> dict | None:
        """The encoding cache's counters (None for a remote server: see its /metrics)."""
        cache = getattr(self._predictor, "cache", None)
        return cache.stats() if cache is not None else None

    def swap(self, predictor, generation: int | None = None) -> None:
        """Serve ``predictor`` from now on (after the running prediction) and close the old one
        (which drops its cached encodings: the new model answers from its own only)."""
        with self._lock:
            old, self._predictor = self._predictor, predictor
            self.generation = self.generation + 1 if generation is None else generation
        try:
            old.close()
        except Exception:  # noqa: BLE001 - closing the old model must not fail the swap
            log.exception("closing the previous model failed")

    def info(self) -> dict:
        p = self._predictor
        return {
            "model_version": self.model_version,
            "name": p.name,
            "version": p.version,
            "runtime": p.runtime,
            "device": str(p.device),
            "path": str(self.path) if self.path else None,
            "class_names": self.class_names,
        }
