"""Request and response models of the HTTP API (they are the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MaskFormatName = Literal["rle", "polygon", "png", "none"]


class ErrorBody(BaseModel):
    """Every error: the HTTP status, a short machine code and a message naming the problem."""

    status: int = Field(..., examples=[422])
    error: str = Field(..., examples=["invalid_boxes"])
    message: str = Field(..., examples=["box 0 is empty or inverted (needs x2 > x1 and y2 > y1): [50.0, 10.0, 20.0, 40.0]"])
    details: list[dict] | None = Field(None, description="field-level problems of a validation error")


class RLEMask(BaseModel):
    """COCO compressed RLE (column-major); decode with
    ``pycocotools.mask.decode({"size": size, "counts": counts.encode()})``."""

    size: list[int] = Field(..., min_length=2, max_length=2, description="[height, width]", examples=[[480, 640]])
    counts: str = Field(..., examples=["Ye04c;3N2O1N..."])


class InstanceOut(BaseModel):
    box: list[float] = Field(
        ..., min_length=4, max_length=4, description="xyxy in the image's pixels (EXIF-corrected)", examples=[[12.5, 40.0, 210.2, 380.0]]
    )
    category_id: int = Field(..., description="index into /v1/model class_names", examples=[0])
    category_name: str = Field(..., examples=["person"])
    det_score: float = Field(..., description="detection confidence sqrt(cls * centerness)", examples=[0.81])
    mask_score: float = Field(
        ..., description="mask-aware score sqrt(det_score * mean mask probability of the mask's pixels); ranks instances", examples=[0.77]
    )
    area: int = Field(..., description="mask area in pixels", examples=[40213])
    source: Literal["detection", "matched", "prompt"] = Field(
        ...,
        description='"detection": found by the model; with box prompts (every mask from the mask head at the box '
        'centre), "matched": the box matched a detection (Algorithm 1, IoU >= 0.5) and takes its class and '
        'detection score, "prompt": no match, class and score at the box centre',
    )
    mask: RLEMask | list[list[float]] | str | None = Field(
        ...,
        description="by mask_format: rle -> RLE object; polygon -> [[x1, y1, x2, y2, ...], ...]; "
        "png -> base64 1-bit PNG of the full image; none -> null",
    )


class ModelRef(BaseModel):
    name: str = Field(..., examples=["boxteacher_r50"])
    version: str = Field(..., examples=["3f2a9c1b7d01"])
    runtime: Literal["pytorch", "onnxruntime", "tensorrt"]


IMAGE_ID_PATTERN = r"^[0-9a-f]{64}$"


class SegmentResponse(BaseModel):
    width: int = Field(..., examples=[640])
    height: int = Field(..., examples=[480])
    image_id: str = Field(
        ...,
        description="the image's content id (SHA-256 of its pixels): send it instead of the image for more boxes on the "
        "same image while the server keeps its encoding (404 image_not_cached otherwise: send the image again)",
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
    )
    model: ModelRef
    mask_format: MaskFormatName
    instances: list[InstanceOut]


class SegmentJSON(BaseModel):
    """The JSON form of a request (the multipart form has the same fields)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="the image file, base64 (a data: URL prefix is accepted); or give image_id")
    image_id: str | None = Field(None, pattern=IMAGE_ID_PATTERN, description="instead of image: the image_id of an earlier response")
    boxes: list[list[float]] | None = Field(
        None, description="box prompts [[x1, y1, x2, y2], ...] in pixels: one instance per box, in order", examples=[[[10, 20, 200, 300]]]
    )
    score_threshold: float | None = Field(None, ge=0, le=1, description="minimum mask_score (automatic mode)")
    max_instances: int | None = Field(None, ge=1, le=1000, description="at most this many instances (automatic mode)")
    mask_format: MaskFormatName | None = None


class SegmentOptions(BaseModel):
    """Options merged from form/JSON fields and the query string."""

    score_threshold: float = Field(..., ge=0, le=1)
    max_instances: int = Field(..., ge=1, le=1000)
    mask_format: MaskFormatName


class ClassInfo(BaseModel):
    id: int
    name: str


class ModelInfo(BaseModel):
    name: str
    version: str
    runtime: Literal["pytorch", "onnxruntime", "tensorrt"]
    device: str
    classes: list[ClassInfo]
    input_size: dict = Field(..., description="test-time resize rule: min_size, max_size, size_divisibility, fixed")
    mask_threshold: float
    defaults: dict = Field(..., description="request defaults: score_threshold, max_instances, mask_format")
    limits: dict = Field(..., description="max_upload_bytes, max_pixels, max_boxes, max_queue")
    batching: dict = Field(..., description="max_batch_size, max_wait_ms")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model: ModelRef
