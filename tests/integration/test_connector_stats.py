"""Our KV-connector stats without engines: aggregation over workers, the log line's
figures, the Prometheus series vLLM's logger registers (private registry here)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lmcache_pd.integration.vllm.connector import LMCachePDConnector
from lmcache_pd.integration.vllm.stats import (
    Figure,
    MetricMedium,
    PDConnectorStats,
    TransferLog,
    TransferOp,
)
from tests.integration.observe import metric_sum


def _worker(counts: dict[str, int], transfers: list[list[Any]]) -> PDConnectorStats:
    return PDConnectorStats(data={"role": "kv_producer", "counts": counts, "transfers": transfers})


def test_aggregate_reduce_and_prometheus() -> None:
    a = _worker({"chunks_sent|nixl": 3, "bytes_moved|nixl": 300}, [["push", "nixl", 0.01, 300]])
    b = _worker({"chunks_sent|nixl": 2, "checksum_failures|nixl": 1}, [["push", "nixl", 0.03, 200]])
    empty = PDConnectorStats()
    assert empty.is_empty() and not a.is_empty()
    total = a.aggregate(b).aggregate(empty)
    assert total.data["counts"] == {
        "chunks_sent|nixl": 5,
        "bytes_moved|nixl": 300,
        "checksum_failures|nixl": 1,
    }
    line = total.reduce()
    assert line["chunks_sent@nixl"] == 5 and line["push@nixl n"] == 2
    assert line["push@nixl avg ms"] == 20.0

    # what vLLM's API server does with the payload: rebuild, then export
    rebuilt = LMCachePDConnector.build_kv_connector_stats(total.to_dict())
    assert isinstance(rebuilt, PDConnectorStats) and rebuilt.data == total.data
    reg = CollectorRegistry()

    def bound(cls: type) -> type:
        return type(cls.__name__, (cls,), {"__init__": _with_registry(cls, reg)})

    types = {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)}
    prom = LMCachePDConnector.build_prom_metrics(
        SimpleNamespace(kv_transfer_config=None),  # type: ignore[arg-type]
        types,  # type: ignore[arg-type]
        ["model_name", "engine"],
        {0: ["tiny", "0"]},
    )
    prom.observe(rebuilt.to_dict(), 0)
    prom.observe({"role": "kv_producer", "counts": {"not_ours|x": 1}, "transfers": []}, 0)
    text = generate_latest(reg).decode()
    labels = {"role": "kv_producer", "medium": "nixl", "engine": "0"}
    assert metric_sum(text, "vllm:lmcache_pd_chunks_sent_total", **labels) == 5
    assert metric_sum(text, "vllm:lmcache_pd_checksum_failures_total", **labels) == 1
    assert metric_sum(text, "vllm:lmcache_pd_transfer_seconds_count", op="push") == 2
    assert metric_sum(text, "vllm:lmcache_pd_transfer_bytes_sum", op="push") == 500
    for f in Figure:  # every figure is registered, observed or not
        assert f"# TYPE vllm:lmcache_pd_{f.value}_total counter" in text, f


def test_transfer_log_is_bounded() -> None:
    log = TransferLog(maxlen=3)
    for i in range(5):
        log.record(TransferOp.LOAD, MetricMedium.CPU, 0.001 * i, i)
    assert [row[3] for row in log.drain()] == [2, 3, 4]
    assert log.drain() == []


def _with_registry(cls: type, reg: CollectorRegistry) -> Any:
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, registry=reg, **kwargs)

    return init


def test_forwarded_events_for_vllms_stream_never_clear_all() -> None:
    """Stores and removals also go to vLLM's publisher; a clear of our tiers is sent
    there as removals (an AllBlocksCleared would drop vLLM's GPU blocks too)."""
    from lmcache_pd.chunks import ChunkHasher
    from lmcache_pd.events import BlockRemoved, BlockStored, KVEventPublisher, TierName
    from lmcache_pd.integration.vllm.kv_events import ForwardedEvents, PDKVEvents
    from lmcache_pd.tiers.cpu import CPUStore

    hasher = ChunkHasher(bytes(16), 4)
    cpu = CPUStore(8 * 16, 16, backend="numpy")
    fwd = ForwardedEvents(maxlen=100)
    pub = KVEventPublisher(hasher, {TierName.CPU: cpu.keys_lru}, forward=fwd.add)
    try:
        tokens = list(range(8))
        pub.learn(tokens)
        for k in hasher.keys(tokens):
            cpu.put(k, b"x" * 16)
        assert pub.flush()
        cpu.clear()
        assert pub.flush()
        events = fwd.drain()
        assert [type(e) for e in events] == [BlockStored, BlockStored, BlockRemoved]
        assert set(events[2].block_hashes) == set(hasher.keys(tokens))
        combined = PDKVEvents(events[:1])
        combined.add_events(events[1:])
        combined.increment_workers()
        assert combined.get_all_events() == events and combined.get_number_of_workers() == 2
        assert fwd.drain() == []
    finally:
        pub.close()
        cpu.close()
