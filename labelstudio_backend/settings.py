"""Backend settings: defaults here, then environment variables, then ``boxteacher labelstudio`` flags.

Our own settings read ``BOXTEACHER_LS_<NAME>`` (e.g. ``BOXTEACHER_LS_ALLOWED_HOSTS``). The
names Label Studio's own ML backends use are read as they are, so an existing deployment's
environment carries over: ``LABEL_STUDIO_URL`` (or ``LABEL_STUDIO_HOST``),
``LABEL_STUDIO_API_KEY`` (or ``LABEL_STUDIO_ACCESS_TOKEN``), ``BASIC_AUTH_USER`` /
``BASIC_AUTH_PASS``, ``LOCAL_FILES_DOCUMENT_ROOT`` (or ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``)
and ``MODEL_DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _env(name: str, *aliases: str) -> AliasChoices:
    """Read the field from env BOXTEACHER_LS_<NAME> or the given plain names (constructor
    keywords use the field name: ``populate_by_name``)."""
    return AliasChoices(f"BOXTEACHER_LS_{name.upper()}", *aliases)


class BackendSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BOXTEACHER_LS_", extra="ignore", protected_namespaces=(), populate_by_name=True)

    # --- model ---------------------------------------------------------------------------------
    model: Path | None = None  # checkpoint (.pth), ONNX or TensorRT engine, loaded once per process
    server_url: str | None = None  # instead of a model: forward to a running `boxteacher serve` API
    server_api_key: SecretStr | None = Field(None, validation_alias=_env("server_api_key", "BOXTEACHER_API_KEY"))
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    branch: Literal["teacher", "student"] | None = None  # checkpoint weights (teacher by default when present)
    torch_threads: int | None = Field(None, ge=1)  # torch intra-op threads (None: torch's default)
    warmup: bool = True  # one prediction at startup, so the first annotator does not wait for it

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"  # 0.0.0.0 when Label Studio runs on another machine or in Docker
    port: int = Field(9090, ge=0, le=65535)
    basic_auth_user: str | None = Field(None, validation_alias=_env("basic_auth_user", "BASIC_AUTH_USER"))
    basic_auth_pass: SecretStr | None = Field(None, validation_alias=_env("basic_auth_pass", "BASIC_AUTH_PASS"))
    log_level: str = "info"

    # --- Label Studio (images and training data) ---------------------------------------------------
    label_studio_url: str | None = Field(None, validation_alias=_env("label_studio_url", "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"))
    # a personal access token (JWT refresh token: exchanged for short-lived access tokens)
    # or a legacy token (sent as "Token <key>")
    label_studio_api_key: SecretStr | None = Field(
        None, validation_alias=_env("label_studio_api_key", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN")
    )
    # /data/local-files/?d=REL is read from ROOT/REL when set (same value as Label Studio's), else downloaded
    local_files_root: Path | None = Field(
        None, validation_alias=_env("local_files_root", "LOCAL_FILES_DOCUMENT_ROOT", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    )

    # --- image downloads (task data is untrusted) ---------------------------------------------------
    # hosts images may come from, besides Label Studio's own: "images.example.com",
    # "cdn.example.com:8443", "*.s3.amazonaws.com"; JSON list or comma-separated
    allowed_hosts: Annotated[list[str], NoDecode] = []
    allow_data_urls: bool = True  # data:image/...;base64 task values (no network involved)
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)  # download size limit
    max_pixels: int = Field(50_000_000, ge=1)  # decoded width * height limit (checked before decoding)
    download_timeout_s: float = Field(20.0, gt=0)  # whole download, connect to last byte
    max_redirects: int = Field(3, ge=0)  # each hop must be allowed too
    cache_max_bytes: int = Field(512 * 1024 * 1024, ge=0)  # decoded images kept (LRU); 0: no cache
    cache_ttl_s: float = Field(600.0, ge=0)  # a cached image is fetched again after this long
    encoding_cache_mb: float = Field(512.0, ge=0)  # image encodings kept for interactive boxes (LRU by bytes); 0: off

    # --- predictions -------------------------------------------------------------------------------
    score_threshold: float = Field(0.3, ge=0, le=1)  # detections (tasks without rectangles): minimum mask-aware score
    max_instances: int = Field(50, ge=1)  # detections per task
    prediction_score: Literal["mean", "min"] = "mean"  # prediction score from its regions' scores
    batch_size: int = Field(4, ge=1)  # images per forward pass in batch mode (the chunk size)
    fetch_workers: int = Field(4, ge=1)  # parallel image downloads
    detections_as_rectangles: bool = True  # tasks without rectangles: emit a rectangle next to each brush

    # --- training (fit) -----------------------------------------------------------------------------
    work_dir: Path = Field(Path("labelstudio-backend"), validation_alias=_env("work_dir", "MODEL_DIR"))  # datasets, checkpoints, state
    train_enabled: bool = True
    train_iters: int = Field(300, ge=1)  # BoxTeacher iterations per training run
    train_batch_size: int = Field(4, ge=1)  # capped at the number of training images
    train_base_lr: float | None = Field(None, gt=0)  # None: a tenth of the checkpoint's solver.base_lr
    train_every_n_annotations: int = Field(0, ge=0)  # also train after every N created/updated annotations (0: off)
    train_min_tasks: int = Field(1, ge=1)  # tasks with rectangles needed to train
    train_val_fraction: float = Field(0.2, ge=0, lt=1)  # annotated tasks held out to evaluate (>= 5 tasks needed)
    train_device: str | None = None  # None: the serving device
    # a fine-tuned model replaces the served one only when it is not worse on the held-out tasks
    # (box AP, and box-prompted mask IoU where annotators drew masks; docs/labelstudio.md); "always": every time
    train_promote: Literal["if_not_worse", "always"] = "if_not_worse"
    train_promote_ap_tolerance: float = Field(0.0, ge=0)  # box AP points (0-100) a new model may lose and still count as not worse
    train_promote_iou_tolerance: float = Field(0.0, ge=0)  # the same for the box-prompted mask IoU (0-1)
    train_overrides: Annotated[list[str], NoDecode] = []  # extra dotted config overrides for the fine-tuning, e.g. ["solver.base_lr=0.001"]
    resume_trained: bool = True  # on start, serve the last fine-tuned model of this --model if the work dir has one

    @field_validator(
        "basic_auth_user",
        "basic_auth_pass",
        "label_studio_api_key",
        "server_api_key",
        "local_files_root",
        "model",
        "train_device",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value):
        """``FOO=`` (e.g. docker compose's ``${FOO:-}``) means unset, not an empty password."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_hosts", "train_overrides", mode="before")
    @classmethod
    def _split_list(cls, value):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("label_studio_url", "server_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.strip().rstrip("/")
        if not value.lower().startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {value!r})")
        return value

    @model_validator(mode="after")
    def _check(self) -> BackendSettings:
        if (self.basic_auth_user is None) != (self.basic_auth_pass is None):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.model is not None and self.server_url is not None:
            raise ValueError("give either a model file or a server URL, not both")
        return self

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user is None or self.basic_auth_pass is None:
            return None
        return self.basic_auth_user, self.basic_auth_pass.get_secret_value()

    @property
    def api_key(self) -> str | None:
        return self.label_studio_api_key.get_secret_value() if self.label_studio_api_key else None
