"""The OpenAPI extras of the HTTP API: what FastAPI cannot derive from the route signatures
(the two request body types of POST /v1/segment with a working example, and the documented
error responses)."""

from __future__ import annotations

from serving.schemas import ErrorBody


def doc(description: str) -> dict:
    """An error response of the OpenAPI schema: the ``ErrorBody`` model with a description."""
    return {"model": ErrorBody, "description": description}


AUTH_401 = {401: doc("missing or wrong API key (only when the server has BOXTEACHER_API_KEY set)")}
NOT_READY_503 = {503: doc("the model is still loading / warming up, or the queue is full (see Retry-After)")}

SEGMENT_DESCRIPTION = """\
Send the image as **multipart/form-data** (`image` file; optional `boxes` as a JSON string) or
as **application/json** (`{"image": "<base64>", "boxes": [[x1, y1, x2, y2], ...]}`). Options
(`score_threshold`, `max_instances`, `mask_format`) go in the query string or as fields.

More boxes on the same image: every response has an `image_id`; send it instead of the
image (`-F image_id=...` or `"image_id": "..."`) and the server reuses the image's cached
encoding, with nothing uploaded. When the server no longer has it (evicted, restarted),
it answers 404 `image_not_cached`: send the image again.

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
EXAMPLE_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAUAAAAFACAAAAADo+/p2AAABmUlEQVR42u3QQQEAAAQEMCS/6EJ42iKsU1yMAoECBQpEoECBAhEoUKBABAoUKBCBAgUKRKBAgQIRKFCgQAQKFCgQgQIFCkSgQIECEShQoECBCBQoUCACBQoUiECBAgUiUKBAgQgUKFAgAgUKFIhAgQIFIlCgQIEIFChQIAIFChQoUIFAgQIFIlCgQIEIFChQIAIFChSIQIECBSJQoECBCBQoUCACBQoUiECBAgUiUKBAgQgUKFCgQAQKFCgQgQIFCkSgQIECEShQoEAEChQoEIECBQpEoECBAhEoUKBABAoUKBCBAgUKFKhAoECBAhEoUKBABAoUKBCBAgUKRKBAgQIRKFCgQAQKFCgQgQIFCkSgQIECEShQoEAEChQoUCACBQoUiECBAgUiUKBAgQgUKFAgAgUKFIhAgQIFIlCgQIEIFChQIAIFChSIQIECBQpUIFCgQIEIFChQIAIFChSIQIECBSJQoECBCBQoUCACBQoUiECBAgUiUKBAgQgUKFAgAgUKFCgQgQIFCkSgQIECEShQoEAEChT4wwLp8QMAHbRtsQAAAABJRU5ErkJggg=="

_FIELDS_SCHEMA = {
    "boxes": {
        "type": "string",
        "description": "JSON array of boxes [[x1, y1, x2, y2], ...] in pixels",
        "example": "[[10, 20, 200, 300]]",
    },
    "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
    "max_instances": {"type": "integer", "minimum": 1, "maximum": 1000},
    "mask_format": {"type": "string", "enum": ["rle", "polygon", "png", "none"]},
    "image_id": {
        "type": "string",
        "pattern": "^[0-9a-f]{64}$",
        "description": "instead of image: the image_id of an earlier response (the image's encoding is reused, nothing is uploaded)",
    },
}

SEGMENT_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "JPEG, PNG, WebP, BMP, TIFF or GIF (or give image_id)"},
                    **_FIELDS_SCHEMA,
                },
            },
            "encoding": {"image": {"contentType": "image/*, application/octet-stream"}},
        },
        "application/json": {
            "schema": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "image": {"type": "string", "description": "the image file, base64 (a data: URL prefix is accepted); or give image_id"},
                    "image_id": _FIELDS_SCHEMA["image_id"],
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

SEGMENT_RESPONSES = {
    200: {
        "headers": {
            "Server-Timing": {
                "description": "decode, queue, inference (the whole batch) and encode times in ms",
                "schema": {"type": "string"},
                "example": "decode;dur=4.1, queue;dur=0.3, inference;dur=95.2, encode;dur=12.0",
            },
            "X-Batch-Size": {"description": "images in the inference batch this one ran in", "schema": {"type": "string"}},
            "X-Cache": {
                "description": "hit: the image's encoding was in the cache (only the prompt part ran); miss: encoded now",
                "schema": {"type": "string"},
            },
        }
    },
    400: doc("corrupt or truncated image, empty file, bad base64, malformed JSON or multipart"),
    **AUTH_401,
    404: doc("image_not_cached: the image_id is not (or no longer) cached on this server; send the image again"),
    413: doc("request body, image file or image pixels over the limits"),
    415: doc("Content-Type is not multipart/form-data or application/json, or the file is not a supported image"),
    422: doc("invalid field: bad boxes (non-finite, x2 <= x1, outside the image), too many boxes, bad options"),
    **NOT_READY_503,
}
