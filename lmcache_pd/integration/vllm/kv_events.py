"""KV events inside vLLM: which tiers the worker publishes and where tokens come from.

With ``pd_kv_events_port`` set, TP rank 0 of a decoder (receive buffer + tiers) or of a
``kv_both`` engine (tiers) runs a :class:`~lmcache_pd.events.KVEventPublisher` on
``pd_bind_host:pd_kv_events_port`` (replay/snapshot on the next port). Every rank holds
the same chunk keys (each its own shard of the heads), so one rank speaks for the
engine. A prefiller holds chunks only until they are pushed and publishes nothing.

Chunk tokens: the scheduler-side connector sends the prompt tokens of each newly
scheduled request with the step's metadata (:class:`EventedMetadata`, only when events
are on); the worker hands them to the publisher, which indexes them by chunk key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmcache_pd.events import KeySource, KVEventPublisher, TierName
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


def start_publisher(worker: WorkerSide, cfg: Config) -> KVEventPublisher | None:
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
    )
