"""File identity: the one content hash used for checkpoints, annotation files and exports
(pseudo-label resume keys, export metadata, the served model's version). No torch import,
so the ONNX/TensorRT serving path can use it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
