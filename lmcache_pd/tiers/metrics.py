"""Tier counters: typed names, plain counts for ``stats()`` and their Prometheus mirrors.

:class:`Count` names every counter a tier keeps; :class:`TierCounters` is the one path
that updates a tier's plain count and its Prometheus series together (the CPU and disk
tiers use it; :class:`DropReason` says why a put stored nothing). The Prometheus series
(:class:`TierMetrics`, one set per registry, labelled by tier) mirror the counts for
scraping. Pass ``prometheus_client.REGISTRY`` to export them with the
process's other metrics; by default each :class:`TierMetrics` gets a private registry so
several stores (tests, benchmarks) never collide.
"""

from __future__ import annotations

import enum
import threading
import weakref
from collections.abc import Sequence
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


class Count(str, enum.Enum):
    """A tier counter; the value is its key in ``stats()`` (and its Prometheus name,
    for the mirrored ones)."""

    HITS = "hits"
    MISSES = "misses"
    BYTES_WRITTEN = "bytes_written"
    BYTES_READ = "bytes_read"
    EVICTIONS = "evictions"
    DROPPED_WRITES = "dropped_writes"
    REJECTED_TOO_LARGE = "rejected_too_large"
    QUEUE_FULL_DROPS = "queue_full_drops"
    DUPLICATE_PUTS = "duplicate_puts"
    CORRUPT_FILES = "corrupt_files"
    FOREIGN_FILES = "foreign_files"
    WRITE_ERRORS = "write_errors"
    FILES_LOADED = "files_loaded"
    CHECKSUM_MISMATCHES = "checksum_mismatches"


# Counts with a Prometheus counter of the same name in TierMetrics.
_MIRRORED = frozenset(
    {
        Count.HITS,
        Count.MISSES,
        Count.BYTES_WRITTEN,
        Count.BYTES_READ,
        Count.EVICTIONS,
        Count.DROPPED_WRITES,
        Count.CORRUPT_FILES,
    }
)


class DropReason(str, enum.Enum):
    """Why a put stored nothing (each also counts one ``dropped_writes``)."""

    TOO_LARGE = "too_large"  # the chunk is larger than a slot / the tier
    QUEUE_FULL = "queue_full"  # the write-behind queue is full
    NO_FREE_SLOT = "no_free_slot"  # every slot pinned or being written
    DISABLED = "disabled"  # the tier disabled itself
    CHECKSUM = "checksum"  # the bytes did not hash to the digest the put carried

    @property
    def counter(self) -> Count | None:
        """The reason's own counter, if it has one."""
        return _REASON_COUNTS.get(self)


_REASON_COUNTS = {
    DropReason.TOO_LARGE: Count.REJECTED_TOO_LARGE,
    DropReason.QUEUE_FULL: Count.QUEUE_FULL_DROPS,
    DropReason.CHECKSUM: Count.CHECKSUM_MISMATCHES,
}


class TierCounters:
    """One tier's counters: the plain counts ``stats()`` reports, and their Prometheus
    mirrors, always updated together. Thread-safe."""

    def __init__(
        self, metrics: TierMetrics, tier: str, capacity_bytes: int, names: Sequence[Count]
    ) -> None:
        self._counts: dict[Count, int] = dict.fromkeys(names, 0)
        extra = tuple(n.value for n in names if n in _MIRRORED and n.value not in TIER_METRICS)
        self._m = metrics.bind(tier, capacity_bytes, extra=extra)
        self._lock = threading.Lock()

    def inc(self, name: Count, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount
        if name in _MIRRORED and amount:
            self._m[name.value].inc(amount)

    def set(self, name: Count, value: int) -> None:
        """Set a count that is a level, not an event count (``files_loaded``)."""
        with self._lock:
            self._counts[name] = value

    def drop(self, reason: DropReason) -> None:
        """A put stored nothing: one ``dropped_writes`` and the reason's own count."""
        self.inc(Count.DROPPED_WRITES)
        own = reason.counter
        if own is not None and own in self._counts:
            self.inc(own)

    def gauges(self, used_bytes: int, entries: int) -> None:
        self._m["used_bytes"].set(used_bytes)
        self._m["entries"].set(entries)

    def __getitem__(self, name: Count) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        """The counts by their ``stats()`` names."""
        with self._lock:
            return {name.value: value for name, value in self._counts.items()}


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
