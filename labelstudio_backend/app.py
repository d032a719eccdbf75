"""The Label Studio ML backend (FastAPI). ``create_app(settings)`` builds it;
``boxteacher labelstudio`` runs it.

Routes, in the shapes Label Studio 1.23 sends and reads:

=================  =================================================================================
``GET /health``    ``{"status": "UP", "model_class": "BoxTeacher", "model_version": ..., "training": {...}}``
``POST /setup``    ``{"project": "<id>.<ts>", "schema": <label config>, ...}`` -> ``{"model_version": ...}``
``POST /predict``  ``{"tasks": [...], "label_config": ..., "params": {"context": null | {"result": [...]}}}``
                   -> ``{"results": [<prediction per task>], "model_version": ...}``; an interactive
                   request that fails: 422 / 424 ``{"status", "detail", "errors": [reason]}``
``POST /webhook``  ``{"action": "START_TRAINING" | "ANNOTATION_CREATED" | ..., "project": {...}}``
                   -> 201 ``{"status": "ok", "result": {...}}``; other actions: 200 ``{"status": "Unknown event"}``
``GET /metrics``   JSON counters: predictions, latencies, image cache, encoding cache, training
=================  =================================================================================

With ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` set, every route needs HTTP Basic auth.
The model is loaded once, at startup; prediction and training never reload it per request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import statistics
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Body, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from labelstudio_backend.fit import TrainingManager, read_state
from labelstudio_backend.images import ImageFetcher
from labelstudio_backend.label_config import LabelConfig, LabelConfigError, parse_label_config
from labelstudio_backend.model import ModelHolder, RemotePredictor
from labelstudio_backend.predict import PredictOptions, TaskPredictor, context_rectangles
from labelstudio_backend.settings import BackendSettings

log = logging.getLogger(__name__)

MODEL_CLASS = "BoxTeacher"
TRAIN_EVENTS = {
    "START_TRAINING",
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATION_DELETED",
    "ANNOTATIONS_DELETED",
}


class Stats:
    """Counters and recent latencies for /metrics (thread-safe)."""

    def __init__(self, window: int = 500):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()
        self.tasks: Counter = Counter()
        self.regions = 0
        self.webhooks: Counter = Counter()
        self.latency = {"interactive": deque(maxlen=window), "batch": deque(maxlen=window)}
        self.last_errors: deque = deque(maxlen=20)

    def observe(self, mode: str, seconds: float, outcomes: list) -> None:
        with self._lock:
            self.requests[mode] += 1
            self.latency[mode].append(seconds)
            for o in outcomes:
                self.tasks[o.mode] += 1
                self.regions += o.regions
                if o.error:
                    self.last_errors.append({"task": o.task_id, "error": o.error, "time": time.time()})

    def snapshot(self) -> dict:
        with self._lock:
            lat = {}
            for mode, values in self.latency.items():
                v = sorted(values)
                lat[mode] = {
                    "count": len(v),
                    "p50_s": round(statistics.median(v), 4) if v else None,
                    "p95_s": round(v[min(len(v) - 1, int(0.95 * len(v)))], 4) if v else None,
                }
            return {
                "predict_requests": dict(self.requests),
                "tasks": dict(self.tasks),
                "regions": self.regions,
                "webhooks": dict(self.webhooks),
                "latency": lat,
                "recent_task_errors": list(self.last_errors),
            }


def load_holder(settings: BackendSettings) -> ModelHolder:
    """The model of this process: --server-url, or the --model file (or, when the work dir
    says it was fine-tuned from that file, the newest fine-tuned checkpoint)."""
    if settings.server_url:
        key = settings.server_api_key.get_secret_value() if settings.server_api_key else None
        return ModelHolder(RemotePredictor(settings.server_url, key))
    if settings.model is None:
        raise ValueError("no model: pass --model FILE or --server-url URL")
    from serving.runtime import load_predictor

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    path, generation = Path(settings.model), 0
    state = read_state(settings.work_dir)
    if settings.resume_trained and state.get("current") and state.get("base_model") == str(path.resolve()):
        current = Path(state["current"])
        if current.is_file():
            path, generation = current, int(state.get("generation", 0))
            log.info("serving the fine-tuned %s (generation %d) of %s", current, generation, settings.model)
    cache_bytes = int(settings.encoding_cache_mb * 1024 * 1024)
    return ModelHolder(load_predictor(path, settings.device, settings.branch, cache_bytes), generation, name=Path(settings.model).stem)


def create_app(settings: BackendSettings | None = None, holder: ModelHolder | None = None) -> FastAPI:
    """The backend for ``settings`` (environment when None). A given ``holder`` is used as is
    (tests, embedding); otherwise the model is loaded at startup."""
    settings = settings or BackendSettings()
    if holder is None and settings.model is None and settings.server_url is None:
        raise ValueError("no model: pass --model FILE or --server-url URL")
    stats = Stats()
    configs: dict[str, LabelConfig] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = app.state
        # One inference thread for the app's life (ModelHolder.executor); it ends at shutdown, so
        # that its OpenMP pool does not slow the torch work of other threads afterwards.
        inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        if st.holder is None:
            log.info("loading %s on %s", settings.model or settings.server_url, settings.device)
            try:
                st.holder = await asyncio.get_running_loop().run_in_executor(inference, load_holder, settings)
            except BaseException:
                inference.shutdown(wait=False)
                raise
        st.holder.executor = inference
        fetcher = ImageFetcher.from_settings(settings)
        options = PredictOptions(
            settings.score_threshold,
            settings.max_instances,
            settings.prediction_score,
            settings.batch_size,
            settings.detections_as_rectangles,
        )
        st.predictor = TaskPredictor(st.holder, fetcher, options, settings.fetch_workers)
        base = Path(settings.model).resolve() if settings.model else None
        st.training = TrainingManager(st.holder, fetcher, settings, base)
        if settings.warmup and hasattr(st.holder.predictor, "warm_up"):
            await asyncio.get_running_loop().run_in_executor(inference, st.holder.predictor.warm_up)
        # import the brush encoder now (label-studio-sdk is slow to import), not in the first request
        await run_in_threadpool(__import__, "label_studio_sdk.converter.brush")
        log.info("model %s ready (%s classes)", st.holder.model_version, len(st.holder.class_names))
        try:
            yield
        finally:
            st.predictor.close()
            fetcher.close()
            st.holder.executor = None
            await run_in_threadpool(inference.shutdown, True)

    app = FastAPI(
        title="boxteacher Label Studio ML backend",
        version="1",
        summary="Annotators' boxes become pre-filled masks; the model learns from their boxes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.holder = holder
    app.state.stats = stats

    def config_for(project: str | None, label_config: str | None) -> LabelConfig:
        key = str(project or "").split(".")[0]
        if label_config:
            cfg = parse_label_config(label_config)
            configs[key] = cfg
            return cfg
        if key in configs:
            return configs[key]
        raise LabelConfigError("the request has no label_config and /setup was not called for this project")

    @app.exception_handler(LabelConfigError)
    async def _config_error(request: Request, err: LabelConfigError):
        return JSONResponse({"status": 400, "detail": str(err)}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"status": 500, "detail": f"{type(err).__name__}: {err}"}, status_code=500)

    # ---- routes -------------------------------------------------------------------------------
    @app.get("/")
    @app.get("/health")
    def health(request: Request) -> dict:
        st = request.app.state
        return {
            "status": "UP",
            "model_class": MODEL_CLASS,
            "model_version": st.holder.model_version,
            "model": st.holder.info(),
            "training": st.training.status(),
        }

    @app.post("/setup")
    def setup(request: Request, payload: dict = Body(default_factory=dict)) -> dict:
        schema = payload.get("schema")
        if schema:
            try:
                config_for(payload.get("project"), schema)
            except LabelConfigError as err:  # /setup must answer; /predict reports it
                log.warning("project %s: %s", payload.get("project"), err)
        holder: ModelHolder = request.app.state.holder
        if isinstance(holder.predictor, RemotePredictor):
            try:
                holder.predictor.refresh()
            except Exception as err:  # noqa: BLE001 - keep answering with the last known version
                log.warning("segmentation API /v1/model failed: %s", err)
        return {"model_version": holder.model_version}

    @app.post("/predict")
    def predict(request: Request, payload: dict = Body(...)):
        st = request.app.state
        tasks = payload.get("tasks") or []
        params = payload.get("params") or {}
        context = params.get("context")
        config = config_for(payload.get("project"), payload.get("label_config"))
        started = time.perf_counter()
        predictions, outcomes = st.predictor.predict(tasks, config, context)
        mode = "interactive" if tasks and context_rectangles(context) is not None else "batch"
        stats.observe(mode, time.perf_counter() - started, outcomes)
        log.info(
            "predict %s: %d task(s), %d region(s), %d failed, %.3f s",
            mode,
            len(tasks),
            sum(o.regions for o in outcomes),
            sum(1 for o in outcomes if o.error),
            time.perf_counter() - started,
        )
        if mode == "interactive" and outcomes[0].error:
            # Label Studio turns a non-2xx answer into {"errors": [...]} for the smart tool's request
            # (and its log) instead of storing an empty prediction; direct callers get the reason.
            message = f"task {outcomes[0].task_id}: {outcomes[0].error}"
            status = outcomes[0].status or 500
            return JSONResponse({"status": status, "detail": message, "errors": [message]}, status_code=status)
        return {"results": predictions, "model_version": st.holder.model_version}

    @app.post("/webhook")
    def webhook(request: Request, payload: dict = Body(default_factory=dict)):
        action = str(payload.get("action") or "")
        stats.webhooks[action or "(none)"] += 1
        if action not in TRAIN_EVENTS:
            return JSONResponse({"status": "Unknown event"}, status_code=200)
        result = request.app.state.training.on_event(action, payload)
        return JSONResponse({"status": "ok", "result": result}, status_code=201)

    @app.get("/metrics")
    def metrics(request: Request) -> dict:
        st = request.app.state
        return {
            "model_version": st.holder.model_version,
            **stats.snapshot(),
            "image_cache": st.predictor.fetcher.cache.stats(),
            "encoding_cache": st.holder.cache_stats(),
            "training": st.training.status(),
        }

    if settings.basic_auth is not None:
        app.add_middleware(BasicAuthMiddleware, user=settings.basic_auth[0], password=settings.basic_auth[1])
    return app


class BasicAuthMiddleware:
    """HTTP Basic auth on every route (constant-time compare). Label Studio sends it when the
    backend is connected with "Basic auth"; its automatic webhook needs the header added
    (see the README)."""

    def __init__(self, app, user: str, password: str):
        self.app = app
        self.expected = f"{user}:{password}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._ok(dict(scope.get("headers") or []).get(b"authorization", b"")):
            response = JSONResponse(
                {"status": 401, "detail": "HTTP Basic auth required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="boxteacher"'},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _ok(self, header: bytes) -> bool:
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self.expected)
