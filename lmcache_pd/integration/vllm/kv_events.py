"""KV events inside vLLM: which tiers the worker publishes and where tokens come from.

With ``pd_kv_events_port`` set, TP rank 0 of a decoder (receive buffer + tiers) or of a
``kv_both`` engine (tiers) runs a :class:`~lmcache_pd.events.KVEventPublisher` on
``pd_bind_host:pd_kv_events_port`` (replay/snapshot on the next port). Every rank holds
the same chunk keys (each its own shard of the heads), so one rank speaks for the
engine. A prefiller holds chunks only until they are pushed and publishes nothing.

Chunk tokens: the scheduler-side connector sends the prompt tokens of each newly
scheduled request with the step's metadata (:class:`EventedMetadata`, only when events
are on); the worker hands them to the publisher, which indexes them by chunk key.

vLLM's own stream too: when the engine runs with ``--kv-events-config`` (events on),
the same stores and removals also go through vLLM's connector event path (worker
``get_kv_connector_kv_cache_events`` -> scheduler ``update_connector_output`` ->
``take_events``), so a router subscribed to vLLM's publisher sees our tiers next to
vLLM's GPU blocks. That path moves only when the engine steps; our own socket also
serves idle engines and snapshots.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_events import KVConnectorKVEvents

from lmcache_pd.events import KeySource, KVEvent, KVEventPublisher, TierName
from lmcache_pd.integration.vllm.common import PDConnectorMetadata

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

    from lmcache_pd.config import Config
    from lmcache_pd.integration.vllm.worker_side import WorkerSide

log = logging.getLogger("lmcache_pd.vllm")


@dataclass
class EventedMetadata(PDConnectorMetadata):
    """The step's metadata plus the prompts of the requests scheduled for the first time."""

    prompts: list[list[int]] = field(default_factory=list)


def with_prompts(meta: PDConnectorMetadata, so: SchedulerOutput) -> EventedMetadata:
    prompts = [list(r.prompt_token_ids) for r in so.scheduled_new_reqs if r.prompt_token_ids]
    return EventedMetadata(loads=meta.loads, saves=meta.saves, prompts=prompts)


class ForwardedEvents:
    """Events bound for vLLM's publisher: added by our publisher thread, drained by the
    worker after each step. Bounded: the oldest are dropped (counted) when no step
    drains them."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self._items: deque[KVEvent] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.dropped = 0

    def add(self, events: list[KVEvent]) -> None:
        with self._lock:
            over = len(self._items) + len(events) - (self._items.maxlen or 0)
            self.dropped += max(0, over)
            self._items.extend(events)

    def drain(self) -> list[KVEvent]:
        with self._lock:
            out = list(self._items)
            self._items.clear()
        return out


class PDKVEvents(KVConnectorKVEvents):
    """vLLM's container for connector events (one worker's, or several combined)."""

    def __init__(self, events: list[Any] | None = None, workers: int = 1) -> None:
        self._events: list[Any] = list(events or [])
        self._workers = workers

    def add_events(self, events: list[Any]) -> None:
        self._events.extend(events)

    def aggregate(self) -> PDKVEvents:
        return self  # only TP rank 0 publishes: nothing to reconcile across workers

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[Any]:
        return list(self._events)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._events.clear()


def vllm_events_enabled(vllm_config: Any) -> bool:
    kec = getattr(vllm_config, "kv_events_config", None)
    return bool(kec is not None and kec.enable_kv_cache_events)


def start_publisher(
    worker: WorkerSide, cfg: Config, forward: ForwardedEvents | None = None
) -> KVEventPublisher | None:
    """The worker's publisher, or None (events off, not rank 0, nothing held here)."""
    if cfg.pd_kv_events_port <= 0 or worker.tp_rank != 0:
        return None
    sources: dict[TierName, KeySource] = {}
    receiver, store = worker.receiver, worker.store
    if receiver is not None:
        sources[TierName.BUFFER] = receiver.ready_keys
    if store is not None and store.cpu is not None:
        sources[TierName.CPU] = store.cpu.keys_lru
    disk = store.disk if store is not None else None
    if disk is not None:
        sources[TierName.DISK] = disk.keys_lru
    if not sources:
        log.warning(
            "pd_kv_events_port=%d: this engine (%s) holds no chunks between requests; "
            "no KV events are published",
            cfg.pd_kv_events_port,
            worker.role.value,
        )
        return None
    return KVEventPublisher(
        worker.hasher,
        sources,
        host=cfg.pd_bind_host,
        port=cfg.pd_kv_events_port,
        disk_root=disk.root if disk is not None and disk.disabled is None else None,
        queue_size=cfg.pd_kv_events_queue,
        forward=forward.add if forward is not None else None,
    )
