"""Property-based fuzzing of the OpenAPI schema with schemathesis, against a real server
with an API key: no 5xx, documented status codes, content types and headers, responses
that conform to their schemas, and no protected route that ignores a missing key.

Time-bounded (``--max-time``) and seeded. Not checked: ``positive_data_acceptance``
(a schema-valid request may still name a box outside the image or carry bytes that are
no image: the API answers 4xx by design).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SMALL_SCALE, local_server, tiny_config, write_checkpoint

pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")

KEY = "fuzz-key"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "ignored_auth",
    ]
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny.pth", tiny_config(overrides=SMALL_SCALE))
    settings = {"api_key": KEY, "max_upload_bytes": 256 * 1024, "max_pixels": 1_000_000, "max_wait_ms": 1}
    with local_server(ckpt, headers={"Authorization": f"Bearer {KEY}"}, **settings) as s:
        yield s


def test_openapi_schema_fuzzing(server, tmp_path: Path):
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert exe, "the schemathesis command is missing next to the interpreter"
    cmd = [
        exe,
        "run",
        f"{server.url}/openapi.json",
        "-H",
        f"Authorization: Bearer {KEY}",
        "--checks",
        CHECKS,
        "--max-time",
        "20",
        "--workers",
        "1",
        "--seed",
        "20261126",
        "--request-timeout",
        "30",
        "--no-color",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "5 selected" in out and "generated" in out
