"""Prometheus metrics of the CPU and disk tiers (one set per registry, labelled by tier).

Every store also keeps plain integer counters for ``stats()``; these Prometheus series
mirror them for scraping. Pass ``prometheus_client.REGISTRY`` to export them with the
process's other metrics; by default each :class:`TierMetrics` gets a private registry so
several stores (tests, benchmarks) never collide.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

_LOCK = threading.Lock()
_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, TierMetrics] = (
    weakref.WeakKeyDictionary()
)


class TierMetrics:
    """The counters and gauges all tiers report into, labelled ``tier="cpu"|"disk"``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ["tier"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"lmcache_pd_tier_{name}", doc, labels, registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"lmcache_pd_tier_{name}", doc, labels, registry=registry)

        self.hits = counter("hits", "Chunk lookups served by the tier")
        self.misses = counter("misses", "Chunk lookups the tier could not serve")
        self.bytes_written = counter("bytes_written", "Chunk bytes stored into the tier")
        self.bytes_read = counter("bytes_read", "Chunk bytes served by the tier")
        self.evictions = counter("evictions", "Chunks evicted to make room (LRU)")
        self.dropped_writes = counter(
            "dropped_writes", "Writes dropped (queue full, no free slot, tier disabled)"
        )
        self.corrupt_files = counter(
            "corrupt_files", "Chunk files found corrupt, truncated or foreign, and deleted"
        )
        self.promotions = counter("promotions", "Disk hits copied up into the CPU tier")
        self.used_bytes = gauge("used_bytes", "Bytes of chunks held")
        self.entries = gauge("entries", "Chunks held")
        self.capacity_bytes = gauge("capacity_bytes", "Configured capacity in bytes")

    def bind(self, tier: str, capacity_bytes: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
        """The children labelled ``tier`` of every metric a tier reports (``TIER_METRICS``
        plus ``extra``), with the capacity gauge set."""
        bound = {name: getattr(self, name).labels(tier=tier) for name in (*TIER_METRICS, *extra)}
        bound["capacity_bytes"].set(capacity_bytes)
        return bound


# What every tier reports; a tier adds its own (the disk tier: corrupt_files).
TIER_METRICS = (
    "hits",
    "misses",
    "bytes_written",
    "bytes_read",
    "evictions",
    "dropped_writes",
    "used_bytes",
    "entries",
    "capacity_bytes",
)


def tier_metrics(registry: CollectorRegistry | None = None) -> TierMetrics:
    """The :class:`TierMetrics` of ``registry`` (created once per registry); a fresh
    private registry when None."""
    if registry is None:
        return TierMetrics(CollectorRegistry(auto_describe=True))
    with _LOCK:
        metrics = _BY_REGISTRY.get(registry)
        if metrics is None:
            metrics = TierMetrics(registry)
            _BY_REGISTRY[registry] = metrics
        return metrics
