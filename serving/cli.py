"""``boxteacher serve``: the HTTP segmentation API (heavy imports happen in the handler)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP segmentation API over a checkpoint, ONNX model or TensorRT engine",
        description=(
            "Serve POST /v1/segment, GET /v1/model, /healthz, /readyz, /metrics and a demo page at /. "
            "Every setting can also come from the environment as BOXTEACHER_<NAME> "
            "(e.g. BOXTEACHER_API_KEY, BOXTEACHER_MAX_BATCH_SIZE, BOXTEACHER_CORS_ORIGINS); flags win."
        ),
    )
    p.add_argument(
        "--model", default=None, help="checkpoint (.pth), ONNX model (.onnx) or TensorRT engine (.engine) [env BOXTEACHER_MODEL]"
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 in Docker)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    p.add_argument("--branch", choices=["teacher", "student"], default=None, help="checkpoint weights (default: teacher when present)")
    p.add_argument("--max-batch-size", type=int, default=None, help="images per forward pass (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="how long a request waits for a batch to fill (default 5)")
    p.add_argument(
        "--class-agnostic-nms",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one box, one class: NMS over all classes on the detections (default off: it lowers COCO AP of weak multi-class "
        "models) [env BOXTEACHER_CLASS_AGNOSTIC_NMS]",
    )
    p.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn
    from pydantic import ValidationError

    from serving.app import create_app
    from serving.errors import validation_message
    from serving.settings import ServeSettings

    given = {
        "model": args.model,
        "host": args.host,
        "port": args.port,
        "device": args.device,
        "branch": args.branch,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "log_level": args.log_level,
        "class_agnostic_nms": args.class_agnostic_nms,
    }
    try:
        settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise ValueError(f"invalid settings: {validation_message(err, 'settings')}") from None
    if settings.model is None:
        raise ValueError("no model: pass --model FILE or set BOXTEACHER_MODEL")
    if not settings.model.is_file():
        raise FileNotFoundError(f"model file not found: {settings.model}")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not (settings.api_key and settings.api_key.get_secret_value()):
        logging.getLogger("serving").warning("listening on %s without an API key: set BOXTEACHER_API_KEY to require one", settings.host)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=10)
    return 0
