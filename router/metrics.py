"""Prometheus metrics of one proxy instance (its own registry, so tests can run many).

Names start with ``lmcache_pd_proxy_``. Exposed at ``GET /metrics``.
"""

from __future__ import annotations

import enum

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Mode(str, enum.Enum):
    """How a request was served."""

    DISAGG = "disagg"  # prefill on a prefiller, decode on a decoder with the KV
    DIRECT = "direct"  # short prompt (< disagg_min_tokens) or no prefiller configured
    FALLBACK = "fallback"  # prefill failed (after retry): decoder recomputes


class ErrorKind(str, enum.Enum):
    BAD_REQUEST = "bad_request"
    NO_ENGINE = "no_engine"
    DEADLINE = "deadline"
    OVERLOADED = "overloaded"
    UPSTREAM = "upstream"  # engine answered 4xx/5xx (passed through)
    UPSTREAM_CONNECT = "upstream_connect"
    PREFILL_FAILED = "prefill_failed"  # one prefill attempt failed (may be retried)
    HANDOFF_TIMEOUT = "handoff_timeout"
    HANDOFF_FAILED = "handoff_failed"
    TOKENIZE_FAILED = "tokenize_failed"
    CLIENT_DISCONNECT = "client_disconnect"


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        p = "lmcache_pd_proxy_"
        self.requests = Counter(
            p + "requests", "Requests received", ["endpoint", "mode"], registry=r
        )
        self.errors = Counter(p + "errors", "Errors by kind", ["kind"], registry=r)
        self.fallbacks = Counter(
            p + "decode_only_fallbacks",
            "Requests served decode-only after prefill failed",
            registry=r,
        )
        self.prefill_seconds = Histogram(
            p + "prefill_seconds",
            "Prefill step time (proxy view of TTFT on prefiller)",
            buckets=_LAT_BUCKETS,
            registry=r,
        )
        self.handoff_wait_seconds = Histogram(
            p + "handoff_wait_seconds",
            "Wait for HandoffDone after the prefill response",
            buckets=_LAT_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            p + "ttft_seconds",
            "Request start to first decoder byte",
            buckets=_LAT_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            p + "engine_inflight", "In-flight requests per engine", ["role", "engine"], registry=r
        )
        self.healthy = Gauge(
            p + "engine_healthy", "1 if the engine is in rotation", ["role", "engine"], registry=r
        )
        self.routed = Counter(p + "routed", "Routing decisions", ["role", "reason"], registry=r)
        self.table_size = Gauge(
            p + "inflight_requests", "Requests in the in-flight table", registry=r
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
