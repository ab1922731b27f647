"""Counters: per-instance numbers for tests and summaries, mirrored into Prometheus.

Each component (sender, receiver, tier) owns a :class:`Counters`; ``inc`` bumps both its
own count and the process-wide Prometheus counter ``lmcache_pd_<name>_total`` labelled
with the component, so ``/metrics`` shows totals while tests read exact per-instance
values.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as _Counter
from typing import Any

from prometheus_client import Counter

_PROM: dict[str, Counter] = {}
_PROM_LOCK = threading.Lock()

DESCRIPTIONS = {
    "bytes": "KV bytes moved or stored",
    "chunks": "KV chunks moved or stored",
    "dedupe_hits": "chunks not resent because the receiver already held them",
    "busy": "Busy answers (receive buffer full)",
    "lease_expiries": "receive leases that expired before Done",
    "checksum_failures": "chunks rejected for a checksum mismatch",
    "auth_failures": "control frames dropped for a missing or wrong signature",
    "malformed_frames": "control frames that failed to decode",
    "oversize_frames": "control frames over the size limit",
    "incompatible": "Hello refused for a layout/model mismatch",
    "transfer_errors": "data-plane transfers that failed or timed out",
    "requests": "handoff requests",
    "failures": "handoff requests that failed",
}


def _prom(name: str) -> Counter:
    with _PROM_LOCK:
        if name not in _PROM:
            _PROM[name] = Counter(f"lmcache_pd_{name}", DESCRIPTIONS.get(name, name), ["component"])
        return _PROM[name]


class Counters:
    """Thread-safe named counters for one component instance."""

    def __init__(self, component: str) -> None:
        self.component = component
        self._counts: _Counter[str] = _Counter()
        self._lock = threading.Lock()
        # the labelled Prometheus child per name, looked up once (labels() costs
        # several microseconds, and a handoff bumps a handful of counters per request)
        self._children: dict[str, Any] = {}

    def inc(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount
            child = self._children.get(name)
            if child is None:
                child = self._children[name] = _prom(name).labels(self.component)
        child.inc(amount)

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class RateLimitedLog:
    """Logs the first ``burst`` events, then at most one per ``interval_s`` with a count
    of what was suppressed: a flood of bad frames cannot flood the log."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self._seen = 0
        self._suppressed = 0
        self._last = 0.0

    def warning(self, fmt: str, *args: object) -> None:
        self._seen += 1
        now = time.monotonic()
        if self._seen <= self.burst or now - self._last >= self.interval_s:
            extra = f" ({self._suppressed} similar suppressed)" if self._suppressed else ""
            self.logger.warning(fmt + extra, *args)
            self._last = now
            self._suppressed = 0
        else:
            self._suppressed += 1
