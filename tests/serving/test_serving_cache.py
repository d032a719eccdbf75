"""serving/cache.py: the encoding cache's LRU-by-bytes rule and the image content key, by hand."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from serving.cache import EncodingCache, image_digest


@dataclass
class Blob:
    nbytes: int


def test_lru_by_bytes_by_hand():
    cache = EncodingCache(100)
    cache.put("a", Blob(40))
    cache.put("b", Blob(40))
    assert cache.get("a").nbytes == 40  # a is now the most recently used
    cache.put("c", Blob(40))  # 120 > 100: drops b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.stats() == {"entries": 2, "bytes": 80, "max_bytes": 100, "hits": 3, "misses": 1, "evictions": 1}
    cache.put("a", Blob(10))  # replacing an entry counts its new size only
    assert cache.stats()["bytes"] == 50
    cache.put("huge", Blob(101))  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("huge") is None and cache.stats()["evictions"] == 1 and len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and cache.stats()["bytes"] == 0


def test_zero_bytes_caches_nothing_and_negative_is_refused():
    cache = EncodingCache(0)
    cache.put("a", Blob(1))
    assert cache.get("a") is None and len(cache) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        EncodingCache(-1)


def test_image_digest_is_the_content_key():
    a = np.zeros((4, 6, 3), np.uint8)
    b = a.copy()
    assert image_digest(a) == image_digest(b)  # same pixels, another array
    b[3, 5, 2] = 1
    assert image_digest(a) != image_digest(b)  # one channel of one pixel
    assert image_digest(a) != image_digest(np.zeros((6, 4, 3), np.uint8))  # same bytes, other shape
    assert image_digest(a[:, ::2]) == image_digest(np.ascontiguousarray(a[:, ::2]))  # views hash their pixels
    assert len(image_digest(a)) == 64
