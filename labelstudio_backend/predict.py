"""Label Studio tasks -> predictions (what POST /predict answers).

Two modes, chosen by the request:

- **interactive** (``context.result`` holds the rectangle an annotator just drew with the
  smart tool): one prediction for the first task, one ``brushlabels`` region per context
  rectangle: the box-prompted mask, the rectangle's label, the mask-aware score as the
  region score;
- **batch** (no context: "Retrieve predictions", the labelling stream): per task, if its
  newest annotation (else its newest draft) has rectangles, one box-prompted brush per
  rectangle; otherwise the model's own detections as rectangles plus brushes, labels
  mapped from the model's classes (:mod:`labelstudio_backend.label_config`).

Tasks run in chunks of ``batch_size`` images (one forward pass each, images fetched in
parallel). In batch mode a task that fails (image missing, URL refused, bad box) gets an
empty prediction and a logged reason; the other tasks are not affected. An interactive
request that fails is answered with an HTTP error instead (``TaskOutcome.status``: 424 when
the image cannot be fetched, 422 for a rectangle that is empty or outside the image), so
Label Studio records the failure instead of an empty "success" (see docs/labelstudio.md for
what Label Studio shows of it).

Interactive requests go through the predictor's encoding cache (an annotator's boxes on
one image: the first encodes it, the next ones run only the prompt part); batch requests
bypass it (they run batched forwards over many images and must not evict the images
annotators are working on).

A prediction is ``{"result": [...], "score": s, "model_version": v}`` with ``s`` the mean
(or min) of its regions' scores, 0 when it has none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from labelstudio_backend.images import ImageFetcher
from labelstudio_backend.label_config import LabelConfig, class_to_label_map
from labelstudio_backend.model import ModelHolder
from labelstudio_backend.regions import Rectangle, brush_result, has_rectangles, rectangle_result, rectangles_in
from serving.runtime import ImageRef

log = logging.getLogger(__name__)
MIN_BOX_PIXELS = 1.0  # a rectangle narrower or lower than this (after clipping) gets no mask


class BadRectangle(ValueError):
    """An interactive rectangle that cannot be segmented (empty, or outside the image)."""


def error_status(err: Exception) -> int:
    """The HTTP status of an interactive request that failed with ``err``: 422 for a bad
    rectangle or box, 424 (Failed Dependency) when the task's image cannot be had, 500 else."""
    from labelstudio_backend.images import ImageFetchError

    if isinstance(err, (ImageFetchError, KeyError)):
        return 424
    if isinstance(err, ValueError):
        return 422
    return 500


@dataclass
class PredictOptions:
    score_threshold: float = 0.3  # detections: minimum mask-aware score
    max_instances: int = 50  # detections per task
    prediction_score: str = "mean"  # "mean" | "min" of the region scores
    batch_size: int = 4  # images per forward pass
    detections_as_rectangles: bool = True  # detections: a rectangle next to each brush


@dataclass
class TaskOutcome:
    """What happened to one task (for the logs and /metrics)."""

    task_id: object
    mode: str  # "interactive" | "boxes" | "detections" | "failed"
    regions: int = 0
    error: str | None = None
    status: int | None = None  # the HTTP status an interactive request answers with when it failed


@dataclass
class _Job:
    index: int
    task: dict
    rect_results: list[dict] | None  # annotators' rectangles (raw result items), None: detect
    image: np.ndarray | None = None
    ref: ImageRef | None = None  # interactive: the image with its digest (the encoding cache's key)
    boxes: np.ndarray | None = None
    rects: list[Rectangle] = field(default_factory=list)


def aggregate_score(scores: Sequence[float], how: str) -> float:
    """The prediction score from its regions' scores: mean or min; 0 without regions."""
    if not scores:
        return 0.0
    return round(float(min(scores) if how == "min" else sum(scores) / len(scores)), 4)


def annotator_rectangles(task: dict) -> list[dict] | None:
    """The result items of the newest non-cancelled annotation with rectangles, else of the
    newest draft with rectangles; None when the task has neither."""
    for key in ("annotations", "drafts"):
        items = [a for a in task.get(key) or [] if isinstance(a, dict) and not a.get("was_cancelled") and has_rectangles(a.get("result"))]
        if items:
            newest = max(items, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
            return list(newest.get("result") or [])
    return None


def context_rectangles(context: dict | None) -> list[dict] | None:
    """The rectangles of an interactive request's ``context.result``, None when not interactive."""
    if not isinstance(context, dict):
        return None
    result = context.get("result")
    if not isinstance(result, list) or not result:
        return None
    return [r for r in result if isinstance(r, dict) and r.get("type") in ("rectanglelabels", "rectangle")]


class TaskPredictor:
    """Runs predictions for Label Studio tasks with one model and one image fetcher."""

    def __init__(self, holder: ModelHolder, fetcher: ImageFetcher, options: PredictOptions, fetch_workers: int = 4):
        self.holder = holder
        self.fetcher = fetcher
        self.options = options
        self.pool = ThreadPoolExecutor(fetch_workers, thread_name_prefix="fetch")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- entry point ------------------------------------------------------------------------
    def predict(self, tasks: list[dict], config: LabelConfig, context: dict | None = None) -> tuple[list[dict], list[TaskOutcome]]:
        """One prediction per task (interactive: one prediction, for the first task)."""
        version = self.holder.model_version
        rects = context_rectangles(context)
        if rects is not None:
            if not tasks:
                return [], []
            jobs = [_Job(0, tasks[0], rects)]
            mode = "interactive"
        else:
            jobs = [_Job(i, t, annotator_rectangles(t)) for i, t in enumerate(tasks)]
            mode = None
        predictions: list[dict | None] = [None] * len(jobs)
        outcomes: list[TaskOutcome | None] = [None] * len(jobs)
        size = max(1, self.options.batch_size)
        for start in range(0, len(jobs), size):
            chunk = jobs[start : start + size]
            for job, (prediction, outcome) in zip(chunk, self._run_chunk(chunk, config, version, mode)):
                predictions[job.index] = prediction
                outcomes[job.index] = outcome
        for outcome in outcomes:
            if outcome is not None and outcome.error:
                log.warning("task %s: empty prediction: %s", outcome.task_id, outcome.error)
        return predictions, outcomes  # type: ignore[return-value]

    # ---- one chunk --------------------------------------------------------------------------
    def _run_chunk(self, chunk: list[_Job], config: LabelConfig, version: str, mode: str | None) -> list[tuple[dict, TaskOutcome]]:
        errors: dict[int, Exception] = {}
        futures = [self.pool.submit(self._prepare, job, config, mode == "interactive") for job in chunk]
        for job, fut in zip(chunk, futures):
            try:
                fut.result()
            except Exception as err:  # noqa: BLE001 - one bad task must not fail the batch
                errors[job.index] = err
        instances: dict[int, list] = {}
        for job in chunk:  # rectangles given, but none usable: nothing to run
            if job.index not in errors and job.boxes is not None and len(job.boxes) == 0:
                instances[job.index] = []
        ready = [job for job in chunk if job.index not in errors and job.index not in instances]
        if ready:
            try:
                out = self._infer(ready, use_cache=mode == "interactive")
                instances.update({job.index: inst for job, inst in zip(ready, out)})
            except Exception:  # noqa: BLE001 - retry one by one so only the bad task fails
                for job in ready:
                    try:
                        instances[job.index] = self._infer([job], use_cache=mode == "interactive")[0]
                    except Exception as err:  # noqa: BLE001
                        errors[job.index] = err
        results = []
        for job in chunk:
            task_id = job.task.get("id")
            if job.index in errors:
                err = errors[job.index]
                outcome = TaskOutcome(task_id, "failed", 0, f"{type(err).__name__}: {err}", error_status(err))
                results.append((self._prediction([], version), outcome))
                continue
            items, scores, job_mode = self._regions(job, instances[job.index], config, mode)
            results.append((self._prediction(items, version, scores), TaskOutcome(task_id, job_mode, len(scores))))
        return results

    def _prepare(self, job: _Job, config: LabelConfig, strict: bool = False) -> None:
        """Fetch the image and turn the rectangles into pixel boxes (``strict``, interactive:
        a rectangle that is empty or outside the image raises :class:`BadRectangle`)."""
        data = job.task.get("data") or {}
        if config.image_key not in data:
            raise KeyError(f"the task data has no '{config.image_key}' (keys: {sorted(data)[:10]})")
        if strict:
            job.ref = self.fetcher.load_ref(data[config.image_key], job.task.get("id"))
            job.image = job.ref.load()
        else:
            job.image = self.fetcher.load(data[config.image_key], job.task.get("id"))
        if job.rect_results is None:
            return
        h, w = job.image.shape[:2]
        kept = []
        for rect in rectangles_in(job.rect_results, w, h, config.image_name):
            x0, y0, x1, y1 = max(rect.box[0], 0.0), max(rect.box[1], 0.0), min(rect.box[2], float(w)), min(rect.box[3], float(h))
            if x1 - x0 < MIN_BOX_PIXELS or y1 - y0 < MIN_BOX_PIXELS:
                if strict:
                    name = f"rectangle {rect.region_id}" if rect.region_id else "the rectangle"
                    raise BadRectangle(f"{name} {[round(v, 1) for v in rect.box]} is empty or outside the {w}x{h} image")
                log.info("task %s: rectangle %s is empty or outside the image; no mask", job.task.get("id"), rect.region_id)
                continue
            kept.append(Rectangle((x0, y0, x1, y1), rect.label, rect.region_id, rect.from_name))
        job.rects = kept
        job.boxes = np.asarray([r.box for r in kept], dtype=np.float32).reshape(-1, 4)

    def _infer(self, jobs: list[_Job], use_cache: bool) -> list[list]:
        o = self.options
        started = time.perf_counter()
        out = self.holder.predict(
            [j.ref if use_cache and j.ref is not None else j.image for j in jobs],
            boxes=[j.boxes if j.rect_results is not None else None for j in jobs],
            score_threshold=o.score_threshold,
            max_instances=o.max_instances,
            use_cache=use_cache,
        )
        log.debug("inference of %d images: %.3f s", len(jobs), time.perf_counter() - started)
        return out

    def _regions(self, job: _Job, instances: list, config: LabelConfig, mode: str | None) -> tuple[list[dict], list[float], str]:
        h, w = job.image.shape[:2]
        items: list[dict] = []
        scores: list[float] = []
        if job.rect_results is not None:
            if config.brush is None:
                return [], [], mode or "boxes"
            for rect, inst in zip(job.rects, instances):
                label = config.brush_label_for(rect.label) or rect.label
                items.append(brush_result(inst.mask, label, inst.mask_score, config.brush.name, config.brush.to_name, w, h))
                scores.append(inst.mask_score)
            return items, scores, mode or "boxes"
        names = self.holder.class_names
        brush_map = class_to_label_map(names, config.brush) if config.brush else {}
        rect_map = class_to_label_map(names, config.rectangle) if config.rectangle and self.options.detections_as_rectangles else {}
        for inst in instances:
            if inst.label not in brush_map and inst.label not in rect_map:
                continue
            if inst.label in rect_map:
                rc = config.rectangle
                items.append(rectangle_result(inst.box, rect_map[inst.label], inst.mask_score, rc.name, rc.to_name, w, h))
            if inst.label in brush_map:
                bc = config.brush
                items.append(brush_result(inst.mask, brush_map[inst.label], inst.mask_score, bc.name, bc.to_name, w, h))
            scores.append(inst.mask_score)
        return items, scores, "detections"

    def _prediction(self, items: list[dict], version: str, scores: Sequence[float] = ()) -> dict:
        return {"result": items, "score": aggregate_score(list(scores), self.options.prediction_score), "model_version": version}
