"""Task images: where they may come from, how they are fetched, how long they are kept.

Task data is untrusted (anyone who can import tasks writes it), so a task must not make
the backend read local files or internal addresses:

- a relative path (``/data/upload/...``, ``/data/local-files/?d=...``, ``/tasks/...``) is
  resolved against ``LABEL_STUDIO_URL``; ``/data/local-files/?d=REL`` is read from
  ``LOCAL_FILES_DOCUMENT_ROOT/REL`` when that root is configured (never outside it);
- ``s3://``, ``gs://``, ``azure-blob://`` go through Label Studio's presign endpoint;
- ``http(s)://`` URLs are fetched only from Label Studio's host and the configured
  ``allowed_hosts``; every redirect hop must pass the same check;
- ``data:image/...;base64,...`` is decoded in place (no network) unless disabled;
- anything else (``file://``, ``ftp://``, bare paths ...) is refused;
- downloads stop at ``max_image_bytes`` and after ``download_timeout_s`` in total, and an
  image whose header declares more than ``max_pixels`` pixels is not decoded.

Label Studio's credentials are sent only to Label Studio's own origin: a personal access
token (a JWT refresh token) is exchanged at ``/api/token/refresh/`` for a short-lived
access token sent as ``Bearer``; a legacy token is sent as ``Token <key>``.

Decoded images are cached in memory (LRU, bounded in bytes) for ``cache_ttl_s`` seconds;
a local file is re-read when its size or modification time changes. A cached image's pixel
digest (the predictor's encoding-cache key) is computed once, so an annotator's next box on
the same image is neither fetched, decoded nor hashed again (:meth:`ImageFetcher.load_ref`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import httpx
import numpy as np

from serving.cache import image_digest
from serving.images import ImageError, decode_image
from serving.runtime import ImageRef

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
DEFAULT_PORTS = {"http": 80, "https": 443}
TOKEN_MARGIN_S = 30.0


class ImageFetchError(ValueError):
    """An image that cannot or must not be fetched; the message says why."""


class UrlNotAllowed(ImageFetchError):
    """A URL refused by the SSRF rules (scheme, host, redirect)."""


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise UrlNotAllowed(f"scheme {scheme or '(none)'!r} is not allowed (only http and https): {_short(url)}")
        if parts.username is not None or parts.password is not None:
            raise UrlNotAllowed(f"URLs with credentials are not allowed: {_short(url)}")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise UrlNotAllowed(f"URL without a host: {_short(url)}")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise UrlNotAllowed(f"bad port in {_short(url)}") from None
        return cls(scheme, host, port)


class HostAllowlist:
    """Hosts images may be downloaded from: Label Studio's origin plus ``entries``
    ("host" any port, "host:port", "*.example.com" for its subdomains)."""

    def __init__(self, entries: list[str], label_studio: Origin | None):
        self.label_studio = label_studio
        self.rules: list[tuple[str, int | None]] = []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            parts = urlsplit(entry if "://" in entry else "//" + entry)
            try:
                port = parts.port
            except ValueError:
                raise ValueError(f"allowed host {entry!r}: bad port") from None
            if not parts.hostname:
                raise ValueError(f"allowed host {entry!r}: no host name")
            self.rules.append((parts.hostname.rstrip("."), port))

    def allows(self, origin: Origin) -> bool:
        if self.label_studio is not None and origin == self.label_studio:
            return True
        for host, port in self.rules:
            if port is not None and port != origin.port:
                continue
            if host.startswith("*."):
                if origin.host.endswith(host[1:]) and origin.host != host[2:]:
                    return True
            elif origin.host == host:
                return True
        return False


# ---------------------------------------------------------------------------------------------
class TokenProvider:
    """The Authorization header for Label Studio: ``Bearer <access>`` for a personal access
    token (refreshed before it expires), ``Token <key>`` for a legacy token."""

    def __init__(self, base_url: str | None, api_key: str | None, client: httpx.Client, timeout: float = 10.0):
        self.base_url = base_url
        self.api_key = api_key
        self.client = client
        self.timeout = timeout
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    @property
    def is_pat(self) -> bool:
        return self.api_key is not None and jwt_claims(self.api_key).get("token_type") == "refresh"

    def header(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not self.is_pat:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if self._access is None or time.time() > self._expires - TOKEN_MARGIN_S:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        with self._lock:
            self._access = None

    def _refresh(self) -> None:
        if not self.base_url:
            raise ImageFetchError("LABEL_STUDIO_URL is not set; it is needed to use a personal access token")
        url = self.base_url + "/api/token/refresh/"
        try:
            r = self.client.post(url, json={"refresh": self.api_key}, timeout=self.timeout, follow_redirects=False)
        except httpx.HTTPError as err:
            raise ImageFetchError(f"cannot reach Label Studio to refresh the access token: {err}") from None
        if r.status_code != 200:
            raise ImageFetchError(f"Label Studio refused the personal access token (HTTP {r.status_code} from /api/token/refresh/)")
        access = r.json().get("access")
        if not access:
            raise ImageFetchError("Label Studio's /api/token/refresh/ answered without an access token")
        self._access = access
        self._expires = float(jwt_claims(access).get("exp") or time.time() + 240)


def jwt_claims(token: str) -> dict:
    """The (unverified) payload of a JWT, {} for anything else."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


# ---------------------------------------------------------------------------------------------
class ImageCache:
    """Decoded images by key, least recently used dropped first, at most ``max_bytes`` in
    total, each kept ``ttl_s`` seconds, with each image's pixel digest once it was asked for
    (:meth:`digest`). Thread-safe."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, _Cached] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or time.monotonic() - item.stored > self.ttl_s:
                if item is not None:
                    self._drop(key)
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item.image

    def put(self, key: str, image: np.ndarray) -> None:
        if image.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = _Cached(image, time.monotonic())
            self._bytes += image.nbytes
            while self._bytes > self.max_bytes and self._items:
                self._drop(next(iter(self._items)))

    def digest(self, key: str, image: np.ndarray) -> str:
        """:func:`serving.cache.image_digest` of ``image``, remembered with the entry of ``key``
        while that entry holds this very array (cached images are never modified)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None and item.image is image and item.digest is not None:
                return item.digest
        value = image_digest(image)
        with self._lock:
            item = self._items.get(key)
            if item is not None and item.image is image:
                item.digest = value
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"images": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses}

    def _drop(self, key: str) -> None:
        self._bytes -= self._items.pop(key).image.nbytes


@dataclass
class _Cached:
    image: np.ndarray
    stored: float  # time.monotonic() when put
    digest: str | None = None


# ---------------------------------------------------------------------------------------------
class ImageFetcher:
    """``fetcher.load(task_data_value, task_id) -> (H, W, 3) uint8 RGB`` under the rules above."""

    def __init__(
        self,
        label_studio_url: str | None = None,
        api_key: str | None = None,
        allowed_hosts: list[str] | None = None,
        local_files_root: str | Path | None = None,
        max_bytes: int = 50 * 1024 * 1024,
        max_pixels: int = 50_000_000,
        timeout_s: float = 20.0,
        max_redirects: int = 3,
        cache_max_bytes: int = 512 * 1024 * 1024,
        cache_ttl_s: float = 600.0,
        allow_data_urls: bool = True,
    ):
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self.ls_origin = Origin.of(self.label_studio_url) if self.label_studio_url else None
        self.allowlist = HostAllowlist(list(allowed_hosts or []), self.ls_origin)
        self.local_root = Path(local_files_root).resolve() if local_files_root else None
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.allow_data_urls = allow_data_urls
        self.client = httpx.Client(follow_redirects=False, trust_env=False, headers={"User-Agent": "boxteacher-labelstudio"})
        self.tokens = TokenProvider(self.label_studio_url, api_key, self.client)
        self.cache = ImageCache(cache_max_bytes, cache_ttl_s)

    @classmethod
    def from_settings(cls, s) -> ImageFetcher:
        return cls(
            s.label_studio_url,
            s.api_key,
            s.allowed_hosts,
            s.local_files_root,
            s.max_image_bytes,
            s.max_pixels,
            s.download_timeout_s,
            s.max_redirects,
            s.cache_max_bytes,
            s.cache_ttl_s,
            s.allow_data_urls,
        )

    def close(self) -> None:
        self.client.close()

    # ---- the entry point ------------------------------------------------------------------
    def load(self, value: object, task_id: int | None = None) -> np.ndarray:
        """The image a task data value points at, as (H, W, 3) uint8 RGB, EXIF-corrected.

        Raises:
            UrlNotAllowed: refused by the rules (scheme, host, path outside the root);
            ImageFetchError: not found, too large, too slow, not an image, HTTP error.
        """
        return self._load(value, task_id)[0]

    def load_ref(self, value: object, task_id: int | None = None) -> ImageRef:
        """As :meth:`load`, as a :class:`serving.runtime.ImageRef` whose digest is computed
        once per cached image (interactive requests: the encoding cache's key without hashing
        the pixels at every box)."""
        image, key = self._load(value, task_id)
        return ImageRef.of(image, self.cache.digest(key, image) if key is not None else image_digest(image))

    def _load(self, value: object, task_id: int | None) -> tuple[np.ndarray, str | None]:
        """The image and its cache key (None: a data: URL, not cached)."""
        if not isinstance(value, str) or not value.strip():
            raise ImageFetchError(f"the task's image value is not a non-empty string: {_short(repr(value))}")
        value = value.strip()
        if value.lower().startswith("data:"):
            return self._data_url(value), None
        local = self._local_file(value)
        if local is not None:
            stat = local.stat()
            key = f"file:{local}:{stat.st_size}:{stat.st_mtime_ns}"
            return self._cached(key, lambda: self._read_local(local, stat.st_size)), key
        url = self._resolve(value, task_id)
        return self._cached(url, lambda: self._download(url)), url

    # ---- resolution ----------------------------------------------------------------------
    def _resolve(self, value: str, task_id: int | None) -> str:
        """Task value -> an absolute http(s) URL that passes the allowlist."""
        scheme = urlsplit(value).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            if not self.label_studio_url:
                raise ImageFetchError(f"{scheme}:// images need LABEL_STUDIO_URL (Label Studio presigns them)")
            if task_id is None:
                raise ImageFetchError(f"{scheme}:// images need the task id for Label Studio's presign endpoint")
            fileuri = base64.urlsafe_b64encode(value.encode()).decode()
            return f"{self.label_studio_url}/tasks/{int(task_id)}/presign/?fileuri={quote(fileuri)}"
        if scheme:
            url = value
        elif value.startswith("/") and not value.startswith("//"):
            if not self.label_studio_url:
                raise ImageFetchError(f"the image path {_short(value)} is relative to Label Studio; set LABEL_STUDIO_URL")
            url = self.label_studio_url + value
        else:
            raise UrlNotAllowed(f"not an http(s) URL or a Label Studio path: {_short(value)}")
        self._check(url)
        return url

    def _check(self, url: str) -> Origin:
        origin = Origin.of(url)
        if not self.allowlist.allows(origin):
            raise UrlNotAllowed(
                f"host {origin.host}:{origin.port} is not allowed (Label Studio's host or BOXTEACHER_LS_ALLOWED_HOSTS): {_short(url)}"
            )
        return origin

    def _local_file(self, value: str) -> Path | None:
        """``/data/local-files/?d=REL`` (relative, or on Label Studio's origin) -> the file
        under the local-files root, when a root is configured; None otherwise."""
        if self.local_root is None:
            return None
        parts = urlsplit(value)
        if parts.scheme:
            if self.ls_origin is None or parts.scheme.lower() not in DEFAULT_PORTS:
                return None
            try:
                if Origin.of(value) != self.ls_origin:
                    return None
            except UrlNotAllowed:
                return None
        if parts.path.rstrip("/") != "/data/local-files":
            return None
        rel = parse_qs(parts.query).get("d", [""])[0]
        if not rel:
            raise ImageFetchError(f"local-files URL without ?d=: {_short(value)}")
        path = (self.local_root / rel.lstrip("/")).resolve()
        if path != self.local_root and self.local_root not in path.parents:
            raise UrlNotAllowed(f"local file outside LOCAL_FILES_DOCUMENT_ROOT: {_short(rel)}")
        if not path.is_file():
            raise ImageFetchError(f"local file not found: {path}")
        return path

    # ---- reading -------------------------------------------------------------------------
    def _cached(self, key: str, load) -> np.ndarray:
        image = self.cache.get(key)
        if image is None:
            image = load()  # shared by later requests: callers must not modify it
            self.cache.put(key, image)
        return image

    def _decode(self, data: bytes, what: str) -> np.ndarray:
        try:
            return decode_image(data, self.max_pixels)
        except ImageError as err:
            raise ImageFetchError(f"{what}: {err}") from None

    def _read_local(self, path: Path, size: int) -> np.ndarray:
        if size > self.max_bytes:
            raise ImageFetchError(f"{path} is {size} bytes; the limit is {self.max_bytes}")
        return self._decode(path.read_bytes(), str(path))

    def _data_url(self, value: str) -> np.ndarray:
        if not self.allow_data_urls:
            raise UrlNotAllowed("data: URLs are disabled (BOXTEACHER_LS_ALLOW_DATA_URLS=false)")
        head, _, body = value.partition(",")
        if ";base64" not in head.lower():
            raise ImageFetchError("only base64 data: URLs are supported")
        if len(body) > self.max_bytes * 4 // 3 + 4:
            raise ImageFetchError(f"the data: URL is over the limit of {self.max_bytes} bytes")
        try:
            data = base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise ImageFetchError(f"the data: URL is not valid base64: {err}") from None
        return self._decode(data, "data: URL")

    def _download(self, url: str) -> np.ndarray:
        """GET with manual redirects (each hop re-checked), a size cap and an overall deadline."""
        deadline = time.monotonic() + self.timeout_s
        current = url
        for hop in range(self.max_redirects + 1):
            origin = self._check(current)
            headers = self.tokens.header() if origin == self.ls_origin else {}
            data, location = self._get(current, headers, deadline)
            if location is None:
                return self._decode(data, _short(url))
            current = urljoin(current, location)
            log.debug("redirect %d: %s -> %s", hop + 1, _short(url), _short(current))
        raise ImageFetchError(f"more than {self.max_redirects} redirects: {_short(url)}")

    def _get(self, url: str, headers: dict, deadline: float) -> tuple[bytes, str | None]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError(f"download took longer than {self.timeout_s} s: {_short(url)}")
        try:
            with self.client.stream("GET", url, headers=headers, timeout=httpx.Timeout(remaining)) as r:
                if r.is_redirect:
                    location = r.headers.get("location")
                    if not location:
                        raise ImageFetchError(f"HTTP {r.status_code} without a Location header: {_short(url)}")
                    return b"", location
                if r.status_code != 200:
                    if r.status_code == 401 and "Authorization" in headers:
                        self.tokens.invalidate()
                    raise ImageFetchError(f"HTTP {r.status_code} for {_short(url)}")
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageFetchError(f"{_short(url)} is {declared} bytes; the limit is {self.max_bytes}")
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ImageFetchError(f"{_short(url)} is over the limit of {self.max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise ImageFetchError(f"download took longer than {self.timeout_s} s: {_short(url)}")
                    chunks.append(chunk)
                return b"".join(chunks), None
        except httpx.TimeoutException:
            raise ImageFetchError(f"download took longer than {self.timeout_s} s: {_short(url)}") from None
        except httpx.HTTPError as err:
            raise ImageFetchError(f"download failed for {_short(url)}: {err}") from None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
