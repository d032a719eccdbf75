"""Run the API in a background thread on 127.0.0.1 (the benchmark and the tests use it)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalServer:
    """``with LocalServer(app) as server: httpx.get(server.url + "/healthz")``.

    Starts uvicorn for ``app`` on 127.0.0.1 and a free port in a daemon thread, waits
    until /readyz answers 200 (``ready_timeout`` seconds), and stops it on exit.
    """

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None, ready_timeout: float = 120.0, headers: dict | None = None
    ):
        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.ready_timeout = ready_timeout
        self.headers = headers or {}
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server stopped during startup (see its log)")
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0, headers=self.headers).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.__exit__(None, None, None)
        raise TimeoutError(f"the server at {self.url} was not ready within {self.ready_timeout} s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
