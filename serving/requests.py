"""Parsing a POST /v1/segment request: the image bytes and fields from a multipart form or a
JSON body, the options merged from fields, query string and server defaults, and the boxes.
Every problem is an :class:`serving.errors.ApiError` naming what is wrong (4xx, never 500)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

import anyio
import numpy as np
from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from serving.errors import ApiError, validation_details, validation_message
from serving.schemas import IMAGE_ID_PATTERN, SegmentJSON, SegmentOptions
from serving.settings import ServeSettings

IMAGE_ID_RE = re.compile(IMAGE_ID_PATTERN.strip("^$"))

FORM_FIELDS = {"image", "image_id", "boxes", "score_threshold", "max_instances", "mask_format"}


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


async def read_request(request: Request, settings: ServeSettings, limiter: anyio.CapacityLimiter) -> tuple[bytes | None, dict[str, Any]]:
    """The image bytes and the other fields, from a multipart or JSON body. The bytes are None
    when the request names an earlier image by ``image_id`` instead (then in the fields,
    checked: 64 hex digits)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype or '(none)'!r} is not supported; send multipart/form-data or application/json",
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
        image_id = form.get("image_id")
        if part is not None and image_id is not None:
            raise ApiError(422, "invalid_request", "give either 'image' or 'image_id', not both")
        if part is None and image_id is None:
            raise ApiError(422, "missing_image", "the multipart form has no 'image' file field (nor an 'image_id')")
        if part is None:
            data = None
        elif isinstance(part, UploadFile):
            data = await part.read(settings.max_upload_bytes + 1)
        else:
            data = str(part).encode("utf-8")
        if data is not None and len(data) > settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large", f"the image file is over the limit of {settings.max_upload_bytes} bytes")
        fields: dict[str, Any] = {}
        for key in FORM_FIELDS - {"image"}:
            value = form.get(key)
            if isinstance(value, UploadFile):
                value = (await value.read(256 * 1024)).decode("utf-8", errors="replace")
            if value is not None and value != "":
                fields[key] = value
        if data is None:
            fields["image_id"] = _image_id(fields.get("image_id", ""))
        return data, fields
    finally:
        await form.close()


def _parse_json(body: bytes, settings: ServeSettings) -> tuple[bytes | None, dict[str, Any]]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(err)[:200]}") from None
    try:
        req = SegmentJSON.model_validate(payload)
    except ValidationError as err:
        raise ApiError(422, "invalid_request", validation_message(err), details=validation_details(err)) from None
    if (req.image is None) == (req.image_id is None):
        message = (
            "give either 'image' or 'image_id', not both" if req.image is not None else "the JSON body has no 'image' (nor an 'image_id')"
        )
        raise ApiError(422, "invalid_request" if req.image is not None else "missing_image", message)
    fields = {k: v for k, v in req.model_dump(exclude={"image"}).items() if v is not None}
    if req.boxes is not None:
        fields["boxes"] = req.boxes
    if req.image is None:
        return None, fields
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
    return data, fields


def _image_id(value: Any) -> str:
    """The image_id field: 64 lowercase hex digits (a response's ``image_id``)."""
    text = str(value).strip()
    if not IMAGE_ID_RE.fullmatch(text):
        raise ApiError(422, "invalid_request", f"'image_id' must be the 64 hex digits of an earlier response's image_id, got {text[:80]!r}")
    return text


def segment_options(fields: dict[str, Any], query: dict[str, Any], settings: ServeSettings) -> SegmentOptions:
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
        raise ApiError(422, "invalid_request", validation_message(err), details=validation_details(err)) from None


def parse_boxes(value: Any, max_boxes: int) -> np.ndarray | None:
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
