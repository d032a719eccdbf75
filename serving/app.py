"""The segmentation API (FastAPI). ``create_app(settings)`` builds it; ``boxteacher serve`` runs it.

Routes: POST /v1/segment, GET /v1/model, /healthz, /readyz, /metrics, and a small page at /.
The model loads in the lifespan (startup fails loudly when it cannot); the warm-up runs
in the background and /readyz turns 200 when it is done. Inference goes through the
:class:`~serving.batching.MicroBatcher` (one inference thread); decoding, JSON parsing
and mask encoding run in worker threads behind a limiter of ``codec_threads`` (default:
the CPU count), so the event loop only moves bytes and a burst of requests cannot starve
the inference thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batching import MicroBatcher, QueueFull
from serving.cache import EncodingCache
from serving.errors import ApiError, error_response, validation_details, validation_message
from serving.images import ImageError, decode_image
from serving.masks import encode_mask, polygon_available
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.openapi import AUTH_401, SEGMENT_DESCRIPTION, SEGMENT_REQUEST_BODY, SEGMENT_RESPONSES, doc
from serving.prompting import validate_boxes
from serving.requests import parse_boxes, read_request, segment_options
from serving.runtime import ImageRef, Instance, Predictor, load_predictor
from serving.schemas import Health, MaskFormatName, ModelInfo, Ready, SegmentResponse
from serving.settings import ServeSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 1


@dataclass
class SegmentJob:
    image: ImageRef
    boxes: np.ndarray | None
    score_threshold: float
    max_instances: int


# ---------------------------------------------------------------------------------------------
def create_app(settings: ServeSettings | None = None, predictor: Predictor | None = None) -> FastAPI:
    """The app for ``settings`` (env ``BOXTEACHER_*`` when None). A given ``predictor``
    is used as is (tests, embedding); otherwise ``settings.model`` is loaded at startup."""
    settings = settings or ServeSettings()
    if predictor is None and settings.model is None:
        raise ValueError("no model: pass --model FILE or set BOXTEACHER_MODEL")
    metrics = ServingMetrics()
    api_key = (settings.api_key.get_secret_value() if settings.api_key is not None else "") or None  # "" = no key

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        batcher: MicroBatcher[SegmentJob, SegmentResult] = MicroBatcher(
            lambda jobs: _run_jobs(state.predictor, jobs),
            settings.max_batch_size,
            settings.max_wait_ms / 1000.0,
            settings.max_queue,
            on_batch=metrics.observe_batch,
            on_queue=metrics.queue_depth.set,
            incoming=lambda: state.incoming,
        )
        await batcher.start()
        if state.predictor is None:
            if settings.torch_threads:
                import torch

                torch.set_num_threads(settings.torch_threads)
            log.info("loading %s on %s", settings.model, settings.device)
            cache_bytes = int(settings.cache_mb * 1024 * 1024)
            # Loaded on the inference thread, where it will run: a model loaded on another thread
            # leaves that thread an OpenMP pool of its own, and with more pool threads than cores
            # libgomp stops spinning between parallel regions (the tiny model's inference took
            # twice as long: 75 vs 35-40 ms on this 2-core CPU).
            try:
                state.predictor = await batcher.run_exclusive(
                    lambda: load_predictor(settings.model, settings.device, settings.branch, cache_bytes)
                )
            except BaseException:
                await batcher.stop()
                raise
        p: Predictor = state.predictor
        p.class_agnostic_nms = settings.class_agnostic_nms
        metrics.model.info({"name": p.name, "version": p.version, "runtime": p.runtime, "device": str(p.device)})
        metrics.watch_cache(p.cache.stats)
        state.batcher = batcher
        state.codec_limiter = anyio.CapacityLimiter(settings.codec_threads or os.cpu_count() or 1)
        warmup = asyncio.create_task(_warm_up(app, batcher, p, settings.warmup))
        try:
            yield
        finally:
            warmup.cancel()
            await batcher.stop()
            p.close()

    app = FastAPI(
        title="boxteacher segmentation API",
        version="1",
        summary="Instance masks with a mask-aware quality score, from an image and optionally boxes.",
        description=(
            "BoxTeacher (CondInst) instance segmentation. `POST /v1/segment` takes an image "
            "(multipart or base64 JSON) and optional box prompts; masks come back as COCO RLE by default. "
            "When the server has an API key, send `Authorization: Bearer <key>` (not needed for /healthz and /readyz)."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.predictor = predictor
    app.state.ready = False
    app.state.batcher = None
    app.state.incoming = 0  # /v1/segment requests received, not yet queued for inference
    app.state.metrics = metrics
    app.state.uploads = EncodingCache(settings.known_uploads, size=lambda _: 1)  # sha256(upload) -> (pixel digest, (H, W))
    app.state.images = EncodingCache(settings.known_uploads, size=lambda _: 1)  # image_id (pixel digest) -> (H, W)

    # ---- errors: always JSON ErrorBody ----------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(err.status, err.error, err.message, err.headers, err.details)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(422, "invalid_request", validation_message(err, "request"), details=validation_details(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        codes = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        return error_response(err.status_code, codes.get(err.status_code, "http_error"), message, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error (logged on the server)")

    # ---- auth ------------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="API key, required when the server has BOXTEACHER_API_KEY set")

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if credentials is None or not hmac.compare_digest(given.encode("utf-8"), api_key.encode("utf-8")):
            raise ApiError(
                401,
                "unauthorized",
                "missing API key: send 'Authorization: Bearer <key>'" if credentials is None else "wrong API key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # ---- routes -----------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health()

    @app.get(
        "/readyz",
        response_model=Ready,
        tags=["health"],
        summary="Readiness: the model is loaded and warmed up",
        responses={503: doc("not ready yet (loading or warming up)")},
    )
    async def readyz(request: Request):
        st = request.app.state
        if not st.ready or st.predictor is None:
            return error_response(503, "not_ready", "the model is warming up", headers={"Retry-After": str(RETRY_AFTER_S)})
        return Ready(model=_model_ref(st.predictor))

    @app.get(
        "/v1/model",
        response_model=ModelInfo,
        tags=["model"],
        summary="The served model: classes, input size, runtime, version, limits",
        dependencies=[Depends(require_key)],
        responses=AUTH_401,
    )
    async def model_info(request: Request) -> ModelInfo:
        p: Predictor = request.app.state.predictor
        s = settings
        return ModelInfo(
            name=p.name,
            version=p.version,
            runtime=p.runtime,  # type: ignore[arg-type]
            device=str(p.device),
            classes=[{"id": i, "name": n} for i, n in enumerate(p.class_names)],
            input_size=p.input_size,
            mask_threshold=p.mask_threshold,
            defaults={"score_threshold": s.score_threshold, "max_instances": s.max_instances, "mask_format": s.mask_format},
            limits={"max_upload_bytes": s.max_upload_bytes, "max_pixels": s.max_pixels, "max_boxes": s.max_boxes, "max_queue": s.max_queue},
            batching={"max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms},
        )

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics",
        dependencies=[Depends(require_key)],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}, **AUTH_401},
    )
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        tags=["segment"],
        summary="Instance masks for an image (optionally one per given box)",
        description=SEGMENT_DESCRIPTION,
        dependencies=[Depends(require_key)],
        responses=SEGMENT_RESPONSES,
        openapi_extra={"requestBody": SEGMENT_REQUEST_BODY},
    )
    async def segment(
        request: Request,
        score_threshold: float | None = Query(None, ge=0, le=1, description="minimum mask_score (default: server setting)"),
        max_instances: int | None = Query(None, ge=1, le=1000, description="keep the best N instances (default: server setting)"),
        mask_format: MaskFormatName | None = Query(None, description="rle (default) | polygon | png | none"),
    ) -> Response:
        st = request.app.state
        if not st.ready or st.batcher is None:
            raise ApiError(503, "not_ready", "the model is warming up; retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)})
        st.incoming += 1
        try:
            data, fields = await read_request(request, settings, st.codec_limiter)
            opts = segment_options(
                fields, {"score_threshold": score_threshold, "max_instances": max_instances, "mask_format": mask_format}, settings
            )
            raw_boxes = parse_boxes(fields.get("boxes"), settings.max_boxes)
            if opts.mask_format == "polygon" and not polygon_available():
                raise ApiError(422, "invalid_request", "mask_format=polygon needs opencv-python-headless on the server; use rle or png")
            t_decode = time.perf_counter()
            p: Predictor = st.predictor
            if data is None:
                image, cached = _known_image(fields["image_id"], p, st.images), True
                metrics.decodes.labels("skipped").inc()
            else:
                try:
                    image, cached = await anyio.to_thread.run_sync(
                        _image_ref, data, p, st.uploads, settings.max_pixels, metrics, limiter=st.codec_limiter
                    )
                except ImageError as err:
                    raise ApiError(err.status, err.code, str(err)) from None
                st.images.put(image.digest, image.hw)
            boxes = None
            if raw_boxes is not None:
                try:
                    boxes = validate_boxes(raw_boxes, image.hw)
                except ValueError as err:
                    raise ApiError(422, "invalid_boxes", str(err)) from None
        finally:
            st.incoming -= 1
        t_submit = time.perf_counter()
        try:
            result = await st.batcher.submit(SegmentJob(image, boxes, opts.score_threshold, opts.max_instances))
        except ImageNotCached as err:  # evicted between the check and the inference
            raise err.api_error() from None
        except QueueFull as err:
            raise ApiError(
                503, "queue_full", f"the server is busy: {err}; retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)}
            ) from None
        t_done = time.perf_counter()
        content = await anyio.to_thread.run_sync(_response_json, p, image, result.instances, opts.mask_format, limiter=st.codec_limiter)
        metrics.instances.inc(len(result.instances))
        timing = _server_timing(
            decode=t_submit - t_decode,
            queue=max(t_done - t_submit - result.inference_s, 0.0),
            inference=result.inference_s,
            encode=time.perf_counter() - t_done,
        )
        headers = {"Server-Timing": timing, "X-Batch-Size": str(result.batch_size), "X-Cache": "hit" if cached else "miss"}
        return Response(content, media_type="application/json", headers=headers)

    # ---- middleware (outermost last) -------------------------------------------------------------
    if api_key is not None:
        app.add_middleware(
            _DocsAuthMiddleware, api_key=api_key, paths={app.openapi_url, app.docs_url, app.redoc_url, "/docs/oauth2-redirect"}
        )
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


# ---------------------------------------------------------------------------------------------
async def _warm_up(app: FastAPI, batcher: MicroBatcher, predictor: Predictor, enabled: bool) -> None:
    if enabled:
        try:
            await batcher.run_exclusive(predictor.warm_up)
        except Exception:  # noqa: BLE001 - a failed warm-up is logged; readiness still follows the real requests
            log.exception("warm-up failed")
    app.state.ready = True
    log.info("model %s (%s, %s) ready", predictor.name, predictor.runtime, predictor.version)


def _image_ref(
    data: bytes, predictor: Predictor, uploads: EncodingCache, max_pixels: int, metrics: ServingMetrics
) -> tuple[ImageRef, bool]:
    """The upload as an :class:`ImageRef` and whether its encoding is cached. An upload seen
    before (same bytes) whose encoding is still cached is neither decoded nor hashed again;
    otherwise it is decoded here (a codec thread) and its pixel digest remembered."""
    upload = hashlib.sha256(data).digest()
    known = uploads.get(upload)
    if known is not None:
        ref = ImageRef(known[0], known[1], lambda: decode_image(data, max_pixels))
        if predictor.cache_key(ref) in predictor.cache:
            metrics.decodes.labels("skipped").inc()
            return ref, True
    image = decode_image(data, max_pixels)
    metrics.decodes.labels("decoded").inc()
    ref = ImageRef.of(image)
    uploads.put(upload, (ref.digest, ref.hw))
    return ref, predictor.cache_key(ref) in predictor.cache


class ImageNotCached(LookupError):
    """A request named an image by ``image_id`` whose encoding the server does not have."""

    def __init__(self, image_id: str):
        super().__init__(
            f"image_id {image_id[:12]}... is not cached on this server (never sent, evicted, or the server restarted "
            "or changed model); send the image again"
        )

    def api_error(self) -> ApiError:
        return ApiError(404, "image_not_cached", str(self))


def _known_image(image_id: str, predictor: Predictor, images: EncodingCache) -> ImageRef:
    """The image an earlier response named ``image_id``, as an :class:`ImageRef` without
    pixels (``load`` raises :class:`ImageNotCached`): its encoding must be in the predictor's
    cache (404 image_not_cached otherwise)."""

    def gone() -> np.ndarray:
        raise ImageNotCached(image_id)

    hw = images.get(image_id)
    ref = ImageRef(image_id, hw, gone) if hw is not None else None
    if ref is None or predictor.cache_key(ref) not in predictor.cache:
        raise ImageNotCached(image_id).api_error()
    return ref


@dataclass
class SegmentResult:
    instances: list[Instance]
    inference_s: float  # predict() of the batch this image ran in
    batch_size: int


def _run_jobs(predictor: Predictor, jobs: list[SegmentJob]) -> list[SegmentResult]:
    start = time.perf_counter()
    out = predictor.predict(
        [j.image for j in jobs],
        boxes=[j.boxes for j in jobs],
        score_threshold=[j.score_threshold for j in jobs],
        max_instances=[j.max_instances for j in jobs],
    )
    seconds = time.perf_counter() - start
    return [SegmentResult(instances, seconds, len(jobs)) for instances in out]


def _server_timing(**durations: float) -> str:
    """Server-Timing header value: ``decode;dur=4.1, ...`` (milliseconds)."""
    return ", ".join(f"{name};dur={1000 * seconds:.1f}" for name, seconds in durations.items())


def _model_ref(p: Predictor) -> dict:
    return {"name": p.name, "version": p.version, "runtime": p.runtime}


def _response_json(p: Predictor, image: ImageRef, instances: list[Instance], mask_format: str) -> bytes:
    """The SegmentResponse as JSON bytes (masks encoded here, in a worker thread; orjson: a few
    times faster than json.dumps on ~40 RLE strings, and it refuses NaN as json does with
    ``allow_nan=False``: scores go through :func:`_finite` first)."""
    body = {
        "width": int(image.hw[1]),
        "height": int(image.hw[0]),
        "image_id": image.digest,
        "model": _model_ref(p),
        "mask_format": mask_format,
        "instances": [
            {
                "box": [round(float(v), 3) for v in inst.box],
                "category_id": inst.label,
                "category_name": inst.label_name,
                "det_score": _finite(inst.det_score),
                "mask_score": _finite(inst.mask_score),
                "area": inst.area,
                "source": inst.source,
                "mask": encode_mask(inst.mask, mask_format, inst.window),
            }
            for inst in instances
        ],
    }
    return orjson.dumps(body)


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


class _DocsAuthMiddleware:
    """Bearer check for the OpenAPI schema and docs pages when an API key is set."""

    def __init__(self, app, api_key: str, paths: set[str | None]):
        self.app = app
        self.key = api_key.encode("utf-8")
        self.paths = {p for p in paths if p}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in self.paths:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(401, "unauthorized", "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
