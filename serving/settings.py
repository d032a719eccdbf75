"""Server settings: defaults here, overridden by ``BOXTEACHER_*`` environment
variables, overridden by ``boxteacher serve`` flags (e.g. ``BOXTEACHER_MAX_BATCH_SIZE=16``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BOXTEACHER_", extra="ignore", protected_namespaces=())

    # --- model -------------------------------------------------------------------------------
    model: Path | None = None  # checkpoint (.pth/.pt), ONNX (.onnx) or TensorRT engine (.engine/.plan)
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    branch: Literal["teacher", "student"] | None = None  # checkpoints: teacher by default when present
    warmup: bool = True  # run one prediction before /readyz turns ready
    torch_threads: int | None = Field(None, ge=1)  # torch intra-op threads (None: torch's default)

    # --- HTTP --------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None  # when set, every route but /healthz, /readyz and / needs "Bearer <key>"
    cors_origins: list[str] = []  # CORS off when empty; e.g. '["https://label.example.com"]'
    log_level: str = "info"

    # --- limits ------------------------------------------------------------------------------
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)  # image file size (413 above)
    max_pixels: int = Field(12_000_000, ge=1)  # width * height of the decoded image (413 above)
    max_boxes: int = Field(100, ge=0)  # box prompts per request (422 above)
    max_queue: int = Field(64, ge=1)  # requests waiting for inference (503 + Retry-After above)

    # --- batching ----------------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1)  # images per forward pass
    max_wait_ms: float = Field(5.0, ge=0)  # how long the first request of a batch waits for others

    codec_threads: int | None = Field(None, ge=1)  # threads decoding images / encoding masks (None: CPU count)

    # --- encode once, prompt many ---------------------------------------------------------------
    cache_mb: float = Field(512.0, ge=0)  # image encodings kept (LRU by bytes), keyed by model version + pixel hash; 0: off
    known_uploads: int = Field(4096, ge=0)  # upload hashes remembered, so a repeated upload is not decoded again

    # --- defaults of a request ---------------------------------------------------------------
    score_threshold: float = Field(0.3, ge=0, le=1)  # minimum mask-aware score
    max_instances: int = Field(100, ge=1)  # instances per image, best first
    mask_format: Literal["rle", "polygon", "png", "none"] = "rle"
    # One box, one class: NMS over all classes on top of the model's per-class NMS (any
    # runtime). Off by default: on a weak multi-class model it lowers COCO AP (docs/serving.md).
    class_agnostic_nms: bool = False

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the upload as base64 in JSON (4/3) plus 64 KiB for the rest."""
        return self.max_upload_bytes * 4 // 3 + 4 + 64 * 1024
