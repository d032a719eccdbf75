"""``boxteacher labelstudio``: the Label Studio ML backend (heavy imports happen in the handler)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "labelstudio",
        help="Label Studio ML backend: boxes -> masks, and fine-tuning from annotators' boxes",
        description=(
            "Serve /health, /setup, /predict, /webhook and /metrics for Label Studio. "
            "Label Studio's own variables are read as they are (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, "
            "BASIC_AUTH_USER, BASIC_AUTH_PASS, LOCAL_FILES_DOCUMENT_ROOT, MODEL_DIR); every other setting "
            "can come from the environment as BOXTEACHER_LS_<NAME> (e.g. BOXTEACHER_LS_ALLOWED_HOSTS, "
            "BOXTEACHER_LS_TRAIN_ITERS); flags win. See docs/labelstudio.md."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", default=None, help="checkpoint (.pth), ONNX model or TensorRT engine, loaded once [env BOXTEACHER_LS_MODEL]"
    )
    src.add_argument("--server-url", default=None, help="forward to a running 'boxteacher serve' API instead of loading a model")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 for Label Studio on another host or in Docker)")
    p.add_argument("--port", type=int, default=None, help="port (default 9090)")
    p.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    p.add_argument("--branch", choices=["teacher", "student"], default=None, help="checkpoint weights (default: teacher when present)")
    p.add_argument(
        "--work-dir", default=None, help="training data, fine-tuned checkpoints and state (default ./labelstudio-backend) [env MODEL_DIR]"
    )
    p.add_argument("--train-iters", type=int, default=None, help="BoxTeacher iterations per training run (default 300)")
    p.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn
    from pydantic import ValidationError

    from labelstudio_backend.app import create_app
    from labelstudio_backend.settings import BackendSettings
    from serving.errors import validation_message

    given = {
        "model": args.model,
        "server_url": args.server_url,
        "host": args.host,
        "port": args.port,
        "device": args.device,
        "branch": args.branch,
        "work_dir": args.work_dir,
        "train_iters": args.train_iters,
        "log_level": args.log_level,
    }
    try:
        settings = BackendSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise ValueError(f"invalid settings: {validation_message(err, 'settings')}") from None
    if settings.model is None and settings.server_url is None:
        raise ValueError("no model: pass --model FILE or --server-url URL (or set BOXTEACHER_LS_MODEL)")
    if settings.model is not None and not settings.model.is_file():
        raise FileNotFoundError(f"model file not found: {settings.model}")
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per image download otherwise
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=10)
    return 0
