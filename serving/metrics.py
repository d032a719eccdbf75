"""Prometheus metrics of one server (its own registry, so several apps can live in
one process, e.g. in tests), and the ASGI middleware that records every request."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "boxteacher_http_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "boxteacher_http_request_duration_seconds", "HTTP request latency", ["route", "method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("boxteacher_http_requests_in_flight", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge("boxteacher_batch_queue_depth", "Requests waiting for an inference batch", registry=r)
        self.batch_size = Histogram("boxteacher_batch_size", "Images per inference batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_latency = Histogram(
            "boxteacher_batch_duration_seconds", "Inference time of one batch (incl. mask paste-back)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.instances = Counter("boxteacher_instances", "Instances returned", registry=r)
        self.model = Info("boxteacher_model", "The served model", registry=r)
        self.decodes = Counter(
            "boxteacher_image_decodes",
            "Uploaded images decoded, or skipped (same bytes as an upload whose encoding is cached)",
            ["result"],
            registry=r,
        )
        self._cache_stats: Callable[[], dict] | None = None
        r.register(_CacheCollector(lambda: self._cache_stats() if self._cache_stats else None))

    def watch_cache(self, stats: Callable[[], dict]) -> None:
        """Export the encoding cache's ``stats()`` (serving.cache.EncodingCache) at every scrape."""
        self._cache_stats = stats

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """boxteacher_encoding_cache_{hits,misses,evictions}_total, _bytes, _entries, _max_bytes,
    read from the cache when /metrics is scraped (no bookkeeping on the request path)."""

    def __init__(self, stats: Callable[[], dict | None]):
        self.stats = stats

    def describe(self):
        return []

    def collect(self):
        s = self.stats()
        if s is None:
            return
        for name, doc in (
            ("hits", "Requests whose image encoding was in the cache"),
            ("misses", "Image encodings computed"),
            ("evictions", "Encodings dropped to stay under the byte limit"),
        ):
            yield CounterMetricFamily(f"boxteacher_encoding_cache_{name}", doc, value=s[name])
        for name, doc in (
            ("bytes", "Bytes held by cached encodings"),
            ("entries", "Cached encodings"),
            ("max_bytes", "Byte limit of the encoding cache"),
        ):
            yield GaugeMetricFamily(f"boxteacher_encoding_cache_{name}", doc, value=s[name])


class MetricsMiddleware:
    """Pure ASGI: in-flight gauge, latency histogram and request counter per route
    template (unmatched paths count as "unmatched", so fuzzing cannot blow up labels)."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        m = self.metrics
        m.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m.in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            if method not in ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"):
                method = "other"
            m.latency.labels(path, method).observe(time.perf_counter() - start)
            m.requests.labels(path, method, str(status["code"])).inc()
