"""A local, headless Label Studio for trying the backend and for the end-to-end test.

Label Studio lives in its own virtual environment (it pins label-studio-sdk, Django and
numpy versions of its own), created on first use::

    python -m labelstudio_backend.devserver --venv .cache/labelstudio-venv --data /tmp/lsdata --port 8089

prints the URL, the user's e-mail and password, a legacy token and a personal access
token, and runs until Ctrl-C. Settings (from labelstudio-notes, tried on 1.23.2): bound to
127.0.0.1, no sign-up without a link, local-files serving under ``--files``, ML backends on
private addresses allowed (``ML_BLOCK_LOCAL_IP=false``, ``SSRF_PROTECTION_ENABLED=false``:
local development only), no telemetry.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_USER = "admin@example.com"
DEFAULT_PASSWORD = "admin12345"
DEFAULT_TOKEN = "0123456789abcdef0123456789abcdef01234567"
# Label Studio reads bare HOST/PORT/USERNAME/PASSWORD too (get_env falls back to them)
LEAKY_ENV = ("HOST", "PORT", "USERNAME", "PASSWORD", "LABEL_STUDIO_HOST", "LABEL_STUDIO_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_venv(venv: str | Path, version: str = LABEL_STUDIO_VERSION, log_file: str | Path | None = None, timeout: float = 1800) -> Path:
    """The ``label-studio`` executable of ``venv``, installing ``label-studio==version`` with
    pip (this interpreter's ``venv`` module) when the venv does not have it yet.

    Raises:
        RuntimeError: the install failed (the log's tail is in the message).
    """
    venv = Path(venv).resolve()
    exe = venv / "bin" / "label-studio"
    marker = venv / f".installed-label-studio-{version}"
    if exe.is_file() and marker.is_file():
        return exe
    log_path = Path(log_file) if log_file else venv.parent / "labelstudio-install.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", f"label-studio=={version}"],
        ]
        for cmd in steps:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = -1
            if code != 0:
                log.flush()
                tail = "\n".join(log_path.read_text().splitlines()[-15:])
                raise RuntimeError(f"installing label-studio=={version} failed ({' '.join(cmd[:3])}...): see {log_path}\n{tail}")
    if not exe.is_file():
        raise RuntimeError(f"label-studio was installed but {exe} is missing")
    marker.write_text(version + "\n")
    return exe


class LabelStudioServer:
    """``with LabelStudioServer(exe, data_dir) as ls: ls.url, ls.token, ls.client()``.

    Starts ``label-studio start`` headless on 127.0.0.1 with a fresh or existing data dir,
    waits for ``/health``, and stops it (process group) on exit. The first start of a data
    dir runs the database migrations (about a minute).
    """

    def __init__(
        self,
        exe: str | Path,
        data_dir: str | Path,
        port: int | None = None,
        files_root: str | Path | None = None,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        token: str = DEFAULT_TOKEN,
        start_timeout: float = 600.0,
    ):
        self.exe = Path(exe)
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.files_root = Path(files_root).resolve() if files_root else self.data_dir / "files"
        self.user, self.password, self.token = user, password, token
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir / "label-studio.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            LABEL_STUDIO_USERNAME=self.user,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(self.files_root),
            LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false",
            LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",
            LATEST_VERSION_CHECK="false",
            COLLECT_ANALYTICS="false",
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> LabelStudioServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.files_root.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.exe),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-legacy-api-token",
            "--log-level",
            "WARNING",
        ]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            cmd, env=self.environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.data_dir
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"label-studio exited with {self.process.returncode}; log: {self.log_path}\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"label-studio did not answer /health within {self.start_timeout} s; log: {self.log_path}\n{self.log_tail()}")

    def stop(self) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ---- clients and tokens -----------------------------------------------------------------
    def client(self, api_key: str | None = None):
        """A label-studio-sdk client (legacy token unless ``api_key`` is given)."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=api_key or self.token, timeout=300)

    def personal_access_token(self) -> str:
        """A new personal access token for the user (Label Studio allows one per user)."""
        headers = {"Authorization": f"Token {self.token}"}
        r = httpx.post(self.url + "/api/token/", headers=headers, timeout=30)
        if r.status_code == 409:
            raise RuntimeError("this user already has a personal access token (Label Studio allows one); revoke it in Account settings")
        r.raise_for_status()
        return r.json()["token"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Start a local headless Label Studio (own venv) for the backend.")
    p.add_argument("--venv", default=".cache/labelstudio-venv", help="Label Studio's virtual environment (created when missing)")
    p.add_argument("--data", default=".cache/labelstudio-data", help="data dir (database, uploads)")
    p.add_argument("--files", default=None, help="LOCAL_FILES_DOCUMENT_ROOT (default DATA/files)")
    p.add_argument("--port", type=int, default=8089)
    args = p.parse_args(argv)
    exe = ensure_venv(args.venv)
    with LabelStudioServer(exe, args.data, args.port, args.files) as ls:
        print(f"Label Studio {ls.url}  user {ls.user}  password {ls.password}")
        print(f"legacy token: {ls.token}")
        try:
            print(f"personal access token: {ls.personal_access_token()}")
        except httpx.HTTPError as err:
            print(f"(no personal access token: {err})")
        print(f"local files root: {ls.files_root}  log: {ls.log_path}   Ctrl-C stops it")
        try:
            while ls.process is not None and ls.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
