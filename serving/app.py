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
import base64
import binascii
import hmac
import json
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batching import MicroBatcher, QueueFull
from serving.images import ImageError, decode_image
from serving.masks import encode_mask, polygon_available
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.prompting import validate_boxes
from serving.runtime import Instance, Predictor, load_predictor
from serving.schemas import (
    ErrorBody,
    Health,
    MaskFormatName,
    ModelInfo,
    Ready,
    SegmentJSON,
    SegmentOptions,
    SegmentResponse,
)
from serving.settings import ServeSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
FORM_FIELDS = {"image", "boxes", "score_threshold", "max_instances", "mask_format"}
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error answered as JSON ``ErrorBody``."""

    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None, details: list | None = None):
        super().__init__(message)
        self.status, self.error, self.message, self.headers, self.details = status, error, message, headers, details


def _error_response(status: int, error: str, message: str, headers: dict | None = None, details: list | None = None) -> JSONResponse:
    body = {"status": status, "error": error, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def _doc(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


AUTH_401 = {401: _doc("missing or wrong API key (only when the server has BOXTEACHER_API_KEY set)")}
NOT_READY_503 = {503: _doc("the model is still loading / warming up, or the queue is full (see Retry-After)")}


@dataclass
class SegmentJob:
    image: np.ndarray
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
        if state.predictor is None:
            if settings.torch_threads:
                import torch

                torch.set_num_threads(settings.torch_threads)
            log.info("loading %s on %s", settings.model, settings.device)
            state.predictor = await run_in_threadpool(load_predictor, settings.model, settings.device, settings.branch)
        p: Predictor = state.predictor
        metrics.model.info({"name": p.name, "version": p.version, "runtime": p.runtime, "device": str(p.device)})
        batcher: MicroBatcher[SegmentJob, SegmentResult] = MicroBatcher(
            lambda jobs: _run_jobs(p, jobs),
            settings.max_batch_size,
            settings.max_wait_ms / 1000.0,
            settings.max_queue,
            on_batch=metrics.observe_batch,
            on_queue=metrics.queue_depth.set,
            incoming=lambda: state.incoming,
        )
        await batcher.start()
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

    # ---- errors: always JSON ErrorBody ----------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error_response(err.status, err.error, err.message, err.headers, err.details)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        details = [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in err.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(x) for x in first["loc"])
        return _error_response(422, "invalid_request", f"{where}: {first['msg']}", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        codes = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        return _error_response(err.status_code, codes.get(err.status_code, "http_error"), message, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal_error", "internal server error (logged on the server)")

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
        responses={503: _doc("not ready yet (loading or warming up)")},
    )
    async def readyz(request: Request):
        st = request.app.state
        if not st.ready or st.predictor is None:
            return _error_response(503, "not_ready", "the model is warming up", headers={"Retry-After": str(RETRY_AFTER_S)})
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
        responses={
            200: {
                "headers": {
                    "Server-Timing": {
                        "description": "decode, queue, inference (the whole batch) and encode times in ms",
                        "schema": {"type": "string"},
                        "example": "decode;dur=4.1, queue;dur=0.3, inference;dur=95.2, encode;dur=12.0",
                    },
                    "X-Batch-Size": {"description": "images in the inference batch this one ran in", "schema": {"type": "string"}},
                }
            },
            400: _doc("corrupt or truncated image, empty file, bad base64, malformed JSON or multipart"),
            **AUTH_401,
            413: _doc("request body, image file or image pixels over the limits"),
            415: _doc("Content-Type is not multipart/form-data or application/json, or the file is not a supported image"),
            422: _doc("invalid field: bad boxes (non-finite, x2 <= x1, outside the image), too many boxes, bad options"),
            **NOT_READY_503,
        },
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
            data, fields = await _read_request(request, settings, st.codec_limiter)
            opts = _options(fields, {"score_threshold": score_threshold, "max_instances": max_instances, "mask_format": mask_format}, settings)
            raw_boxes = _parse_boxes(fields.get("boxes"), settings.max_boxes)
            if opts.mask_format == "polygon" and not polygon_available():
                raise ApiError(422, "invalid_request", "mask_format=polygon needs opencv-python-headless on the server; use rle or png")
            t_decode = time.perf_counter()
            try:
                image = await anyio.to_thread.run_sync(decode_image, data, settings.max_pixels, limiter=st.codec_limiter)
            except ImageError as err:
                raise ApiError(err.status, err.code, str(err)) from None
            boxes = None
            if raw_boxes is not None:
                try:
                    boxes = validate_boxes(raw_boxes, image.shape[:2])
                except ValueError as err:
                    raise ApiError(422, "invalid_boxes", str(err)) from None
        finally:
            st.incoming -= 1
        t_submit = time.perf_counter()
        try:
            result = await st.batcher.submit(SegmentJob(image, boxes, opts.score_threshold, opts.max_instances))
        except QueueFull as err:
            raise ApiError(503, "queue_full", f"the server is busy: {err}; retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        t_done = time.perf_counter()
        p: Predictor = st.predictor
        content = await anyio.to_thread.run_sync(_response_json, p, image.shape[:2], result.instances, opts.mask_format, limiter=st.codec_limiter)
        metrics.instances.inc(len(result.instances))
        timing = _server_timing(
            decode=t_submit - t_decode,
            queue=max(t_done - t_submit - result.inference_s, 0.0),
            inference=result.inference_s,
            encode=time.perf_counter() - t_done,
        )
        return Response(content, media_type="application/json", headers={"Server-Timing": timing, "X-Batch-Size": str(result.batch_size)})

    # ---- middleware (outermost last) -------------------------------------------------------------
    if api_key is not None:
        app.add_middleware(_DocsAuthMiddleware, api_key=api_key, paths={app.openapi_url, app.docs_url, app.redoc_url, "/docs/oauth2-redirect"})
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
SEGMENT_DESCRIPTION = """\
Send the image as **multipart/form-data** (`image` file; optional `boxes` as a JSON string) or
as **application/json** (`{"image": "<base64>", "boxes": [[x1, y1, x2, y2], ...]}`). Options
(`score_threshold`, `max_instances`, `mask_format`) go in the query string or as fields.

Without boxes: the model's instances, best `mask_score` first. With boxes (pixels, xyxy):
exactly one instance per box, in the given order, each mask clipped to its box
(`score_threshold` and `max_instances` do not apply).

Masks: `rle` (COCO RLE, default), `polygon`, `png` (base64) or `none`.
EXIF orientation is applied first; `width`/`height` are the oriented size.

```
curl -F image=@photo.jpg -F 'boxes=[[10,20,200,300]]' http://127.0.0.1:8000/v1/segment
```
"""

# a 320x320 grey PNG: the JSON example is a request that works
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAUAAAAFACAAAAADo+/p2AAABmUlEQVR42u3QQQEAAAQEMCS/6EJ42iKsU1yMAoECBQpEoECBAhEoUKBABAoUKBCBAgUKRKBAgQIRKFCgQAQKFCgQgQIFCkSgQIECEShQoECBCBQoUCACBQoUiECBAgUiUKBAgQgUKFAgAgUKFIhAgQIFIlCgQIEIFChQIAIFChQoUIFAgQIFIlCgQIEIFChQIAIFChSIQIECBSJQoECBCBQoUCACBQoUiECBAgUiUKBAgQgUKFCgQAQKFCgQgQIFCkSgQIECEShQoEAEChQoEIECBQpEoECBAhEoUKBABAoUKBCBAgUKFKhAoECBAhEoUKBABAoUKBCBAgUKRKBAgQIRKFCgQAQKFCgQgQIFCkSgQIECEShQoEAEChQoUCACBQoUiECBAgUiUKBAgQgUKFAgAgUKFIhAgQIFIlCgQIEIFChQIAIFChSIQIECBQpUIFCgQIEIFChQIAIFChSIQIECBSJQoECBCBQoUCACBQoUiECBAgUiUKBAgQgUKFAgAgUKFCgQgQIFCkSgQIECEShQoEAEChT4wwLp8QMAHbRtsQAAAABJRU5ErkJggg=="
)

_FIELDS_SCHEMA = {
    "boxes": {
        "type": "string",
        "description": "JSON array of boxes [[x1, y1, x2, y2], ...] in pixels",
        "example": "[[10, 20, 200, 300]]",
    },
    "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
    "max_instances": {"type": "integer", "minimum": 1, "maximum": 1000},
    "mask_format": {"type": "string", "enum": ["rle", "polygon", "png", "none"]},
}

SEGMENT_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "additionalProperties": False,
                "properties": {"image": {"type": "string", "format": "binary", "description": "JPEG, PNG, WebP, BMP, TIFF or GIF"}, **_FIELDS_SCHEMA},
            },
            "encoding": {"image": {"contentType": "image/*, application/octet-stream"}},
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "additionalProperties": False,
                "properties": {
                    "image": {"type": "string", "description": "the image file, base64 (a data: URL prefix is accepted)"},
                    "boxes": {
                        "type": ["array", "null"],
                        "items": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                        "description": "box prompts [[x1, y1, x2, y2], ...] in pixels",
                    },
                    "score_threshold": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                    "max_instances": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000},
                    "mask_format": {"type": ["string", "null"], "enum": ["rle", "polygon", "png", "none", None]},
                },
            },
            "example": {"image": EXAMPLE_PNG_BASE64, "boxes": [[10, 20, 200, 300]], "mask_format": "rle"},
        },
    },
}


async def _warm_up(app: FastAPI, batcher: MicroBatcher, predictor: Predictor, enabled: bool) -> None:
    if enabled:
        try:
            await batcher.run_exclusive(predictor.warm_up)
        except Exception:  # noqa: BLE001 - a failed warm-up is logged; readiness still follows the real requests
            log.exception("warm-up failed")
    app.state.ready = True
    log.info("model %s (%s, %s) ready", predictor.name, predictor.runtime, predictor.version)


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


def _response_json(p: Predictor, hw: tuple[int, int], instances: list[Instance], mask_format: str) -> bytes:
    """The SegmentResponse as JSON bytes (masks encoded here, in a worker thread)."""
    body = {
        "width": int(hw[1]),
        "height": int(hw[0]),
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
                "mask": encode_mask(inst.mask, mask_format),
            }
            for inst in instances
        ],
    }
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


# ---- request parsing ------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"the request body is {int(declared)} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _read_request(request: Request, settings: ServeSettings, limiter: anyio.CapacityLimiter) -> tuple[bytes, dict[str, Any]]:
    """The image bytes and the other fields, from a multipart or JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise ApiError(
            415, "unsupported_media_type", f"Content-Type {ctype or '(none)'!r} is not supported; send multipart/form-data or application/json"
        )
    body = await _read_body(request, settings.max_body_bytes)
    if ctype == "application/json":
        return await anyio.to_thread.run_sync(_parse_json, body, settings, limiter=limiter)
    form = await Request(request.scope, receive=_replay(body)).form(max_files=1, max_fields=len(FORM_FIELDS), max_part_size=256 * 1024)
    try:
        unknown = sorted(set(form.keys()) - FORM_FIELDS)
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown form field(s) {unknown}; allowed: {sorted(FORM_FIELDS)}")
        part = form.get("image")
        if part is None:
            raise ApiError(422, "missing_image", "the multipart form has no 'image' file field")
        if isinstance(part, UploadFile):
            data = await part.read(settings.max_upload_bytes + 1)
        else:
            data = str(part).encode("utf-8")
        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large", f"the image file is over the limit of {settings.max_upload_bytes} bytes")
        fields: dict[str, Any] = {}
        for key in FORM_FIELDS - {"image"}:
            value = form.get(key)
            if isinstance(value, UploadFile):
                value = (await value.read(256 * 1024)).decode("utf-8", errors="replace")
            if value is not None and value != "":
                fields[key] = value
        return data, fields
    finally:
        await form.close()


def _parse_json(body: bytes, settings: ServeSettings) -> tuple[bytes, dict[str, Any]]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(err)[:200]}") from None
    try:
        req = SegmentJSON.model_validate(payload)
    except ValidationError as err:
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors(include_url=False, include_input=False)]
        where = ".".join(str(x) for x in details[0]["loc"]) if details else ""
        raise ApiError(422, "invalid_request", f"{where or 'body'}: {details[0]['msg'] if details else 'invalid'}", details=details) from None
    text = req.image
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    if len(text) > settings.max_upload_bytes * 4 // 3 + 4:
        raise ApiError(413, "payload_too_large", f"the image is over the limit of {settings.max_upload_bytes} bytes")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, "invalid_base64", f"'image' is not valid base64: {err}") from None
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "payload_too_large", f"the image file is over the limit of {settings.max_upload_bytes} bytes")
    fields = {k: v for k, v in req.model_dump(exclude={"image"}).items() if v is not None}
    if req.boxes is not None:
        fields["boxes"] = req.boxes
    return data, fields


def _options(fields: dict[str, Any], query: dict[str, Any], settings: ServeSettings) -> SegmentOptions:
    merged = {
        "score_threshold": settings.score_threshold,
        "max_instances": settings.max_instances,
        "mask_format": settings.mask_format,
    }
    merged.update({k: v for k, v in query.items() if v is not None})
    merged.update({k: fields[k] for k in merged if k in fields})
    try:
        return SegmentOptions.model_validate(merged)
    except ValidationError as err:
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors(include_url=False, include_input=False)]
        raise ApiError(422, "invalid_request", f"{details[0]['loc'][0]}: {details[0]['msg']}", details=details) from None


def _parse_boxes(value: Any, max_boxes: int) -> np.ndarray | None:
    """boxes field (JSON text or a parsed list) -> (n, 4) float64, checked for shape and count."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ApiError(422, "invalid_boxes", "'boxes' must be JSON like [[x1, y1, x2, y2], ...]") from None
    if not isinstance(value, list):
        raise ApiError(422, "invalid_boxes", "'boxes' must be a list of [x1, y1, x2, y2] boxes")
    if len(value) > max_boxes:
        raise ApiError(422, "too_many_boxes", f"{len(value)} boxes given; the limit is {max_boxes}")
    for i, box in enumerate(value):
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise ApiError(422, "invalid_boxes", f"box {i} must be 4 numbers [x1, y1, x2, y2]; got {json.dumps(box)[:100]}")
        if not all(math.isfinite(v) for v in box):
            raise ApiError(422, "invalid_boxes", f"box {i} has a non-finite coordinate: {box}")
    return np.asarray(value, dtype=np.float64).reshape(-1, 4)


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
                response = _error_response(401, "unauthorized", "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
