"""Our figures on the engine's own ``/metrics`` and in its periodic log line.

vLLM's KV-connector stats path, as NixlConnector uses it: each worker's connector
returns a :class:`PDConnectorStats` from ``get_kv_connector_stats()`` after every step
(what changed since the last one); vLLM sums them over the workers, hands the payload
to the API server, which builds our stats class (``build_kv_connector_stats``) for the
``KV Transfer metrics: ...`` log line (:meth:`PDConnectorStats.reduce`) and feeds our
:class:`PDPromMetrics` (``build_prom_metrics``), registered next to vLLM's metrics.

Exported (every series also carries vLLM's ``model_name`` / ``engine`` labels):

* counters ``vllm:lmcache_pd_<figure>_total{role, medium}`` for every :class:`Figure`;
* gauges ``vllm:lmcache_pd_<level>{role, medium}`` for every :class:`Level` (slots and
  holds in use now; 0 on an idle engine, so a leak shows; refreshed with the engine's
  steps, at most once per second);
* histograms ``vllm:lmcache_pd_transfer_seconds`` and ``vllm:lmcache_pd_transfer_bytes``
  ``{role, medium, op}``: ``op=push`` one handoff sent by a prefiller (``medium=nixl``),
  ``op=load`` one load of held chunks into paged KV (``medium=buffer`` on a decoder,
  ``cpu`` for kv_both).

``role`` is vLLM's ``kv_role`` (``kv_producer`` / ``kv_consumer`` / ``kv_both``);
``medium`` is ``nixl`` (the handoff), ``hold`` (a prefiller's held chunks), ``cpu``,
``disk``, ``remote`` (tiers), ``events`` (the KV-event publisher) or ``engine``.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from lmcache_pd.events import KVEventPublisher
    from lmcache_pd.integration.vllm.worker_side import WorkerSide

# Per-step stats are cheap, but the tier snapshot walks the CPU index: at most this often.
COUNTS_INTERVAL_S = 1.0
MAX_TRANSFERS = 10_000  # kept between two collections (a stalled collector loses the rest)


class Figure(str, enum.Enum):
    """A counter we export (``vllm:lmcache_pd_<value>_total``)."""

    BYTES_MOVED = "bytes_moved"
    CHUNKS_SENT = "chunks_sent"
    CHUNKS_RECEIVED = "chunks_received"
    CHUNKS_DEDUPED = "chunks_deduped"
    LEASE_EXPIRIES = "lease_expiries"
    CHECKSUM_FAILURES = "checksum_failures"
    TRANSFER_FAILURES = "transfer_failures"
    LOAD_FAILURES = "load_failures"
    TOKENS_LOADED = "tokens_loaded"
    TOKENS_STORED = "tokens_stored"
    TIER_HITS = "tier_hits"
    TIER_MISSES = "tier_misses"
    TIER_EVICTIONS = "tier_evictions"
    TIER_BYTES_READ = "tier_bytes_read"
    TIER_BYTES_WRITTEN = "tier_bytes_written"
    EVENTS_PUBLISHED = "kv_events_published"
    EVENTS_DROPPED = "kv_events_dropped"


class Level(str, enum.Enum):
    """A gauge we export (``vllm:lmcache_pd_<value>``): what is in use right now."""

    RECEIVE_SLOTS_LEASED = "receive_slots_leased"
    RECEIVE_SLOTS_GRANTED = "receive_slots_granted"
    RECEIVE_SLOTS_READY = "receive_slots_ready"
    SEND_SLOTS_IN_USE = "send_slots_in_use"
    HOLDS_OUTSTANDING = "holds_outstanding"


LEVEL_DOCS: dict[Level, str] = {
    Level.RECEIVE_SLOTS_LEASED: "receive-buffer slots under a lease (KV landing now)",
    Level.RECEIVE_SLOTS_GRANTED: "receive-buffer slots granted to senders, not yet leased",
    Level.RECEIVE_SLOTS_READY: "receive-buffer slots holding ready chunks (a cache, evictable)",
    Level.SEND_SLOTS_IN_USE: "send-buffer slots in use (gathered, pushing or held)",
    Level.HOLDS_OUTSTANDING: "prefiller holds (standard contract) not yet fetched or expired",
}


class MetricMedium(str, enum.Enum):
    NIXL = "nixl"
    HOLD = "hold"
    BUFFER = "buffer"
    CPU = "cpu"
    DISK = "disk"
    REMOTE = "remote"
    EVENTS = "events"
    ENGINE = "engine"


class TransferOp(str, enum.Enum):
    PUSH = "push"
    LOAD = "load"


DOCS: dict[Figure, str] = {
    Figure.BYTES_MOVED: "KV bytes moved by lmcache-pd handoffs (sent or received)",
    Figure.CHUNKS_SENT: "KV chunks a prefiller pushed",
    Figure.CHUNKS_RECEIVED: "KV chunks a decoder received and verified",
    Figure.CHUNKS_DEDUPED: "KV chunks not moved because the receiver already held them",
    Figure.LEASE_EXPIRIES: "receive leases (nixl) or prefiller holds (hold) that expired",
    Figure.CHECKSUM_FAILURES: "KV chunks rejected for a checksum mismatch",
    Figure.TRANSFER_FAILURES: "handoffs or fetches that failed",
    Figure.LOAD_FAILURES: "loads of held KV that came up short (blocks recomputed or failed)",
    Figure.TOKENS_LOADED: "prompt tokens loaded from held KV instead of computed",
    Figure.TOKENS_STORED: "prompt tokens stored into the tiers (kv_both)",
    Figure.TIER_HITS: "chunk reads served by a tier",
    Figure.TIER_MISSES: "chunk reads a tier could not serve",
    Figure.TIER_EVICTIONS: "chunks a tier evicted to make room",
    Figure.TIER_BYTES_READ: "chunk bytes served by a tier",
    Figure.TIER_BYTES_WRITTEN: "chunk bytes stored into a tier",
    Figure.EVENTS_PUBLISHED: "KV events (BlockStored/BlockRemoved) published",
    Figure.EVENTS_DROPPED: "KV-event inputs dropped because the publisher queue was full",
}

Key = tuple[Figure, MetricMedium]

# counter names of our components -> the figure they feed
_SENDER = {
    "bytes": Figure.BYTES_MOVED,
    "chunks": Figure.CHUNKS_SENT,
    "dedupe_hits": Figure.CHUNKS_DEDUPED,
    "checksum_failures": Figure.CHECKSUM_FAILURES,
    "failures": Figure.TRANSFER_FAILURES,
}
_RECEIVER = {
    "bytes": Figure.BYTES_MOVED,
    "chunks": Figure.CHUNKS_RECEIVED,
    "dedupe_hits": Figure.CHUNKS_DEDUPED,
    "checksum_failures": Figure.CHECKSUM_FAILURES,
    "lease_expiries": Figure.LEASE_EXPIRIES,
}
_TIER = {
    "hits": Figure.TIER_HITS,
    "misses": Figure.TIER_MISSES,
    "evictions": Figure.TIER_EVICTIONS,
    "bytes_read": Figure.TIER_BYTES_READ,
    "bytes_written": Figure.TIER_BYTES_WRITTEN,
}


def _add(
    out: dict[Key, int],
    counts: Mapping[str, Any],
    names: Mapping[str, Figure],
    medium: MetricMedium,
) -> None:
    for name, figure in names.items():
        value = counts.get(name, 0)
        if isinstance(value, int) and value:
            out[(figure, medium)] = out.get((figure, medium), 0) + value


def cumulative(worker: WorkerSide, events: KVEventPublisher | None) -> dict[Key, int]:
    """Every figure of this worker since it started."""
    out: dict[Key, int] = {}
    producer = worker.producer
    if producer is not None:
        _add(out, producer.sender.counters.snapshot(), _SENDER, MetricMedium.NIXL)
        _add(
            out,
            producer.holds.counters.snapshot(),
            {"hold_expiries": Figure.LEASE_EXPIRIES},
            MetricMedium.HOLD,
        )
    if worker.receiver is not None:
        _add(out, worker.receiver.counters.snapshot(), _RECEIVER, MetricMedium.NIXL)
    if worker.fetcher is not None:
        _add(
            out,
            worker.fetcher.counters.snapshot(),
            {"failures": Figure.TRANSFER_FAILURES},
            MetricMedium.NIXL,
        )
    if worker.store is not None:
        for tier, counts in worker.store.tier_stats().items():
            _add(out, counts, _TIER, MetricMedium(tier))
    engine = {
        "load_failures": worker.load_failures,
        "loaded_tokens": worker.loaded_tokens,
        "stored_tokens": worker.stored_tokens,
    }
    _add(
        out,
        engine,
        {
            "load_failures": Figure.LOAD_FAILURES,
            "loaded_tokens": Figure.TOKENS_LOADED,
            "stored_tokens": Figure.TOKENS_STORED,
        },
        MetricMedium.ENGINE,
    )
    if events is not None:
        s = events.stats
        _add(
            out,
            {"published": s.stored + s.removed, "dropped": s.dropped + s.replay_dropped},
            {"published": Figure.EVENTS_PUBLISHED, "dropped": Figure.EVENTS_DROPPED},
            MetricMedium.EVENTS,
        )
    return out


def levels(worker: WorkerSide) -> dict[str, int]:
    """Every level of this worker now, ``"level|medium"`` -> value."""
    out: dict[str, int] = {}
    nixl = MetricMedium.NIXL.value
    producer = worker.producer
    if producer is not None:
        buf = producer.sender.buffer
        out[f"{Level.SEND_SLOTS_IN_USE.value}|{nixl}"] = buf.num_slots - buf.free_count
        out[f"{Level.HOLDS_OUTSTANDING.value}|{MetricMedium.HOLD.value}"] = (
            producer.holds.outstanding()
        )
    if worker.receiver is not None:
        usage = worker.receiver.slot_usage()
        out[f"{Level.RECEIVE_SLOTS_LEASED.value}|{nixl}"] = usage["leased"]
        out[f"{Level.RECEIVE_SLOTS_GRANTED.value}|{nixl}"] = usage["granted"]
        out[f"{Level.RECEIVE_SLOTS_READY.value}|{nixl}"] = usage["ready"]
    return out


class TransferLog:
    """Per-transfer observations (op, medium, seconds, bytes) between two collections.
    Thread-safe; bounded (the oldest are dropped)."""

    def __init__(self, maxlen: int = MAX_TRANSFERS) -> None:
        self._items: deque[list[Any]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def record(self, op: TransferOp, medium: MetricMedium, seconds: float, nbytes: int) -> None:
        with self._lock:
            self._items.append([op.value, medium.value, float(seconds), int(nbytes)])

    def drain(self) -> list[list[Any]]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items


@dataclass
class PDConnectorStats(KVConnectorStats):
    """What changed in one interval. ``data``: ``role``; ``counts``: ``"figure|medium"``
    -> delta; ``transfers``: ``[op, medium, seconds, bytes]`` each; ``levels``:
    ``"level|medium"`` -> value now (summed over workers; plain values: vLLM ships this
    payload between processes)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"role": "", "counts": {}, "transfers": []}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        counts: dict[str, int] = self.data.setdefault("counts", {})
        for key, value in other.data.get("counts", {}).items():
            counts[key] = counts.get(key, 0) + int(value)
        self.data.setdefault("transfers", []).extend(other.data.get("transfers", []))
        mine: dict[str, int] = self.data.setdefault("levels", {})
        for key, value in other.data.get("levels", {}).items():
            mine[key] = mine.get(key, 0) + int(value)
        if not self.data.get("role"):
            self.data["role"] = other.data.get("role", "")
        return self

    def is_empty(self) -> bool:
        return (
            not any(self.data.get("counts", {}).values())
            and not self.data.get("transfers")
            and not self.data.get("levels")
        )

    def reduce(self) -> dict[str, int | float]:
        """The log line's figures: non-zero counters, then per (op, medium) the number
        of transfers, their mean time (ms) and MB."""
        out: dict[str, int | float] = {}
        for key, value in sorted(self.data.get("counts", {}).items()):
            if value:
                out[key.replace("|", "@")] = value
        groups: dict[str, list[tuple[float, int]]] = {}
        for op, medium, seconds, nbytes in self.data.get("transfers", []):
            groups.setdefault(f"{op}@{medium}", []).append((seconds, nbytes))
        for name, obs in sorted(groups.items()):
            total_s = sum(s for s, _ in obs)
            total_b = sum(b for _, b in obs)
            out[f"{name} n"] = len(obs)
            out[f"{name} avg ms"] = round(total_s / len(obs) * 1e3, 3)
            out[f"{name} MB"] = round(total_b / 2**20, 3)
        return out


class WorkerStats:
    """Turns a worker's cumulative figures into per-interval :class:`PDConnectorStats`."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.transfers = TransferLog()
        self._last: dict[Key, int] = {}
        self._last_levels: dict[str, int] = {}
        self._last_t = 0.0

    def take(self, worker: WorkerSide, events: KVEventPublisher | None) -> PDConnectorStats | None:
        transfers = self.transfers.drain()
        counts: dict[str, int] = {}
        levels_now: dict[str, int] = {}
        now = time.monotonic()
        if now - self._last_t >= COUNTS_INTERVAL_S or transfers:
            self._last_t = now
            current = cumulative(worker, events)
            for key, value in current.items():
                delta = value - self._last.get(key, 0)
                if delta > 0:
                    counts[f"{key[0].value}|{key[1].value}"] = delta
            self._last = current
            now_levels = levels(worker)
            if now_levels != self._last_levels or any(now_levels.values()):
                levels_now = now_levels  # sent while anything is in use or it changed
            self._last_levels = now_levels
        if not counts and not transfers and not levels_now:
            return None
        data = {"role": self.role, "counts": counts, "transfers": transfers, "levels": levels_now}
        return PDConnectorStats(data=data)


# histogram buckets: 100 us .. 30 s; 4 KiB .. 16 GiB
TIME_BUCKETS = [
    1e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
]
SIZE_BUCKETS = [float(2**i) for i in range(12, 35, 2)]


class PDPromMetrics(KVConnectorPromMetrics):
    """Our counters and histograms, registered by vLLM's Prometheus logger."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        ours = [*labelnames, "role", "medium"]
        self.counters: dict[Figure, Any] = {
            f: self._counter_cls(
                name=f"vllm:lmcache_pd_{f.value}", documentation=DOCS[f], labelnames=ours
            )
            for f in Figure
        }
        self.gauges: dict[Level, Any] = {
            lv: self._gauge_cls(
                name=f"vllm:lmcache_pd_{lv.value}", documentation=LEVEL_DOCS[lv], labelnames=ours
            )
            for lv in Level
        }
        histogram: Any = self._histogram_cls  # vLLM types it as a union of the three
        self.xfer_seconds = histogram(
            name="vllm:lmcache_pd_transfer_seconds",
            documentation="Duration of lmcache-pd KV transfers (push: a handoff; load: into KV)",
            buckets=TIME_BUCKETS,
            labelnames=[*ours, "op"],
        )
        self.xfer_bytes = histogram(
            name="vllm:lmcache_pd_transfer_bytes",
            documentation="Size of lmcache-pd KV transfers in bytes",
            buckets=SIZE_BUCKETS,
            labelnames=[*ours, "op"],
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        base = self.per_engine_labelvalues[engine_idx]
        role = str(transfer_stats_data.get("role", ""))
        for key, value in transfer_stats_data.get("counts", {}).items():
            name, _, medium = key.partition("|")
            try:
                figure = Figure(name)
            except ValueError:
                continue  # a figure of a newer worker: not ours to guess
            self.counters[figure].labels(*base, role, medium).inc(value)
        for key, value in transfer_stats_data.get("levels", {}).items():
            name, _, medium = key.partition("|")
            try:
                level = Level(name)
            except ValueError:
                continue
            self.gauges[level].labels(*base, role, medium).set(value)
        for op, medium, seconds, nbytes in transfer_stats_data.get("transfers", []):
            self.xfer_seconds.labels(*base, role, medium, op).observe(seconds)
            self.xfer_bytes.labels(*base, role, medium, op).observe(nbytes)
