"""The image-encoding cache: encode an image once, answer every box on it from the cache.

Keys are ``(model version, image content hash)``: :func:`image_digest` is the SHA-256 of
the decoded pixels (and their shape), so the same picture sent twice (another upload,
another format, another client) finds its entry, and a different picture never does.
Entries are bounded in bytes (the tensors they hold) and dropped least recently used
first; a predictor clears its cache when it is closed (a hot-swapped model never answers
from its predecessor's entries, whose version differs anyway).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import numpy as np


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


def image_digest(image: np.ndarray) -> str:
    """SHA-256 (hex) of an image's shape, dtype and pixels: its content key (~4 ms for 1920x1080)."""
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


class EncodingCache(Generic[V]):
    """LRU of values, at most ``max_bytes`` of ``size(value)`` in total (0: caches nothing;
    ``size`` defaults to the value's ``nbytes``; ``lambda v: 1`` bounds the entry count).

    Thread-safe. Counts hits, misses, evictions (entries dropped to make room) and the
    bytes held, for /metrics. A value larger than ``max_bytes`` is not stored.
    """

    def __init__(self, max_bytes: int, size: Callable[[Any], int] | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._size = size or (lambda value: int(value.nbytes))
        self._items: OrderedDict[Any, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Any) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Any, value: V) -> None:
        size = self._size(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._size(self._items.pop(key))
            if size > self.max_bytes:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= self._size(dropped)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Any) -> bool:
        """Whether ``key`` is held (counts neither a hit nor a miss, moves nothing)."""
        with self._lock:
            return key in self._items

    def stats(self) -> dict[str, int]:
        """{"entries", "bytes", "max_bytes", "hits", "misses", "evictions"}."""
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
