"""``LMCachePDConnector``: lmcache-pd as a vLLM v1 KV connector.

    --kv-transfer-config '{"kv_connector": "LMCachePDConnector",
        "kv_connector_module_path": "lmcache_pd.integration.vllm",
        "kv_role": "kv_producer",            # kv_consumer on the decoder, kv_both alone
        "kv_connector_extra_config": {"config_file": "pd.yaml", "chunk_size": 256}}'

vLLM builds one instance in the scheduler (role SCHEDULER) and one per worker (role
WORKER); this class only dispatches to :class:`SchedulerSide` or :class:`WorkerSide`.
Our config comes from ``kv_connector_extra_config`` (``config_file`` and/or inline
keys) over ``LMCACHE_*`` env; a bad key makes the engine refuse to start with our
:class:`~lmcache_pd.config.ConfigError` message.

Observability: the worker reports our figures through vLLM's KV-connector stats path
(:mod:`~lmcache_pd.integration.vllm.stats`: the engine's ``/metrics`` and its
``KV Transfer metrics`` log line) and, with ``pd_kv_events_port``, publishes KV events
of the chunks it holds (:mod:`~lmcache_pd.integration.vllm.kv_events`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_pd.integration.vllm.common import (
    KVRole,
    PDConnectorMetadata,
    load_connector_config,
    setup_logging,
)
from lmcache_pd.integration.vllm.kv_events import (
    EventedMetadata,
    ForwardedEvents,
    PDKVEvents,
    start_publisher,
    vllm_events_enabled,
    with_prompts,
)
from lmcache_pd.integration.vllm.stats import (
    MetricMedium,
    PDConnectorStats,
    PDPromMetrics,
    TransferOp,
    WorkerStats,
)

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from lmcache_pd.events import KVEventPublisher
    from lmcache_pd.integration.vllm.scheduler_side import SchedulerSide
    from lmcache_pd.integration.vllm.worker_side import WorkerSide


class LMCachePDConnector(KVConnectorBase_V1):
    """Disaggregated prefill (kv_producer / kv_consumer) and CPU/disk reuse (kv_both)."""

    _cache_hit_source = CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        setup_logging()
        self.kv_role = KVRole.from_vllm(self._kv_transfer_config.kv_role)
        self.cfg = load_connector_config(self._kv_transfer_config, self.kv_role)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._events: KVEventPublisher | None = None
        self._stats = WorkerStats(self.kv_role.value)
        # our tier events on vLLM's own stream too (--kv-events-config)
        self._forwarded = ForwardedEvents() if vllm_events_enabled(vllm_config) else None
        self._vllm_events: list[Any] = []  # scheduler side: taken by vLLM's publisher
        if role == KVConnectorRole.SCHEDULER:
            from lmcache_pd.integration.vllm.scheduler_side import SchedulerSide

            self._scheduler = SchedulerSide(vllm_config, self.kv_role, self.cfg)
        else:
            from lmcache_pd.integration.vllm.worker_side import WorkerSide

            self._worker = WorkerSide(vllm_config, self.kv_role, self.cfg)

    @property
    def requires_kv_delivery(self) -> bool:
        # The push runs from our own send buffer: a preempted request loses nothing.
        return False

    # ---------------------------------------------------------------- worker side

    def _w(self) -> WorkerSide:
        assert self._worker is not None, "worker-side method called on the scheduler side"
        return self._worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        worker = self._w()
        worker.register_kv_caches(kv_caches)
        medium = MetricMedium.BUFFER if self.kv_role is KVRole.CONSUMER else MetricMedium.CPU
        transfers = self._stats.transfers
        worker.on_loaded = lambda s, n: transfers.record(TransferOp.LOAD, medium, s, n)
        if worker.producer is not None:
            worker.producer.on_pushed = lambda s, n: transfers.record(
                TransferOp.PUSH, MetricMedium.NIXL, s, n
            )
        self._events = start_publisher(worker, self.cfg, self._forwarded)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if isinstance(meta, EventedMetadata) and self._events is not None:
            for prompt in meta.prompts:
                self._events.learn(prompt)
        if isinstance(meta, PDConnectorMetadata) and meta.loads:
            self._w().start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads complete before their request is scheduled for compute (async loads).
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        # Chunks are gathered across all layers at once in wait_for_save.
        return

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if isinstance(meta, PDConnectorMetadata) and meta.saves:
            self._w().save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        meta = self._connector_metadata
        idle = isinstance(meta, PDConnectorMetadata) and meta.idle
        return self._w().get_finished(finished_req_ids, idle=idle)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._w().get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is None:
            return None
        return self._stats.take(self._worker, self._events)

    def get_kv_connector_kv_cache_events(self) -> KVConnectorKVEvents | None:
        if self._forwarded is None:
            return None
        events = self._forwarded.drain()
        return PDKVEvents(events) if events else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return PDConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return PDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # ---------------------------------------------------------------- scheduler side

    def _s(self) -> SchedulerSide:
        assert self._scheduler is not None, "scheduler-side method called on a worker"
        return self._scheduler

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._s().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._s().update_state_after_alloc(request, blocks, num_external_tokens)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        events = connector_output.kv_cache_events
        if events is not None:
            self._vllm_events.extend(events.get_all_events())

    def take_events(self) -> Iterable[KVCacheEvent]:
        events, self._vllm_events = self._vllm_events, []
        return events

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = self._s().build_connector_meta(scheduler_output)
        if self.cfg.pd_kv_events_port > 0 and scheduler_output.scheduled_new_reqs:
            return with_prompts(meta, scheduler_output)  # the workers' events need tokens
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._s().request_finished(request, block_ids)
