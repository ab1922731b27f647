"""Our in-use gauges (send slots, holds, receive leases/grants) on the connector's stats
path: sent while something is in use or a level changed, summed over workers, exported
as ``vllm:lmcache_pd_<level>`` gauges that fall back to 0 (what the soak's leak check
reads). A real :class:`SlotBuffer` is allocated from and freed; the worker around it is
a plain namespace (no engine)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lmcache_pd.buffer import SlotBuffer
from lmcache_pd.integration.vllm import stats as stats_mod
from lmcache_pd.integration.vllm.connector import LMCachePDConnector
from lmcache_pd.integration.vllm.stats import Level, PDConnectorStats, WorkerStats
from lmcache_pd.metrics import Counters
from tests.integration.observe import metric_sum


class _Holds:
    def __init__(self) -> None:
        self.n = 0
        self.counters = Counters("holds")

    def outstanding(self) -> int:
        return self.n


def _producer_worker(buffer: SlotBuffer, holds: _Holds) -> Any:
    sender = SimpleNamespace(buffer=buffer, counters=Counters("sender"))
    producer = SimpleNamespace(sender=sender, holds=holds)
    return SimpleNamespace(
        producer=producer,
        receiver=None,
        fetcher=None,
        store=None,
        load_failures=0,
        loaded_tokens=0,
        stored_tokens=0,
    )


def _registry_types(reg: CollectorRegistry) -> dict[type, type]:
    def bound(cls: type) -> type:
        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            cls.__init__(self, *args, registry=reg, **kwargs)

        return type(cls.__name__, (cls,), {"__init__": init})

    return {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)}


def test_levels_reported_while_in_use_then_zero(monkeypatch: Any) -> None:
    monkeypatch.setattr(stats_mod, "COUNTS_INTERVAL_S", 0.0)
    buffer = SlotBuffer(64, 8)
    holds = _Holds()
    worker = _producer_worker(buffer, holds)
    ws = WorkerStats("kv_producer")
    send_key = f"{Level.SEND_SLOTS_IN_USE.value}|nixl"
    hold_key = f"{Level.HOLDS_OUTSTANDING.value}|hold"

    first = ws.take(worker, None)  # the first interval states the (zero) levels
    assert first is not None and first.data["levels"] == {send_key: 0, hold_key: 0}
    assert ws.take(worker, None) is None  # idle and unchanged: nothing to send

    slots = buffer.alloc(3)
    holds.n = 1
    busy = ws.take(worker, None)
    assert busy is not None and busy.data["levels"] == {send_key: 3, hold_key: 1}
    again = ws.take(worker, None)  # still in use: sent again (the gauge stays fresh)
    assert again is not None and again.data["levels"][send_key] == 3

    # two workers (TP ranks) are summed
    total = PDConnectorStats(data=busy.data).aggregate(again)
    assert isinstance(total, PDConnectorStats)
    assert total.data["levels"] == {send_key: 6, hold_key: 2}
    assert "levels" not in str(total.reduce())  # the log line keeps its counters only

    reg = CollectorRegistry()
    prom = LMCachePDConnector.build_prom_metrics(
        SimpleNamespace(kv_transfer_config=None),  # type: ignore[arg-type]
        _registry_types(reg),  # type: ignore[arg-type]
        ["model_name", "engine"],
        {0: ["tiny", "0"]},
    )
    prom.observe(total.to_dict(), 0)
    text = generate_latest(reg).decode()
    assert metric_sum(text, "vllm:lmcache_pd_send_slots_in_use", role="kv_producer") == 6
    assert metric_sum(text, "vllm:lmcache_pd_holds_outstanding", medium="hold") == 2
    for lv in Level:
        assert f"# TYPE vllm:lmcache_pd_{lv.value} gauge" in text, lv

    buffer.free(slots)
    holds.n = 0
    idle = ws.take(worker, None)  # changed back to zero: sent once
    assert idle is not None and idle.data["levels"] == {send_key: 0, hold_key: 0}
    prom.observe(idle.to_dict(), 0)
    text = generate_latest(reg).decode()
    assert metric_sum(text, "vllm:lmcache_pd_send_slots_in_use", role="kv_producer") == 0
    assert ws.take(worker, None) is None
    buffer.close()
