"""The remote tier on a real redis-server: round trips, batching, namespacing, corrupt
values, a killed or stalled server, start-up without the server, CPU + remote tiers."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash
from prometheus_client import CollectorRegistry

from lmcache_pd.config import Config
from lmcache_pd.integration.vllm.launch import free_port
from lmcache_pd.layout import preset
from lmcache_pd.tiers import CPUStore, TieredStore, build_tiers, tier_metrics
from lmcache_pd.tiers import remote as remote_mod
from lmcache_pd.tiers.disk import HEADER_SIZE, encode_header
from lmcache_pd.tiers.redis_server import RedisServer
from lmcache_pd.tiers.remote import RemoteState, RemoteStore

from .delay_proxy import DelayProxy
from .tier_helpers import key_of, payload

TINY = preset("tiny")
FP = TINY.fingerprint()
OTHER_FP = preset("llama-8b").fingerprint()
CHUNK = 16
SLOT = TINY.bytes_per_chunk(CHUNK)  # 16 KiB
WARN = "lmcache_pd.tiers.remote"


def remote(url: str, fingerprint: bytes = FP, **kw: object) -> RemoteStore:
    kw.setdefault("namespace", f"t-{uuid.uuid4().hex[:8]}")  # tests share one server
    kw.setdefault("probe_backoff_s", (0.05, 0.2))
    return RemoteStore(url, fingerprint, CHUNK, **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RemoteStore]:
    s = remote(redis_server.url)
    yield s
    s.close()


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def down_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == WARN and r.levelno == logging.WARNING and "remote tier" in r.getMessage()
    ]


# --- round trip, batching, namespacing ---


def test_round_trip_bit_exact(store: RemoteStore, redis_server: RedisServer) -> None:
    sizes = [SLOT, SLOT, 64, SLOT // 3]  # full chunks, a partial last chunk
    for i, n in enumerate(sizes):
        assert store.put(key_of(i), payload(i, n))
    assert store.flush(10)
    got = store.get_many([key_of(i) for i in range(len(sizes))])
    assert [bytes(g) if g is not None else None for g in got] == [
        payload(i, n) for i, n in enumerate(sizes)
    ]
    out = bytearray(SLOT)
    assert store.get_into(key_of(0), out) == SLOT and bytes(out) == payload(0, SLOT)
    assert store.get(key_of(99)) is None
    raw = redis_server.client().get(store.redis_key(key_of(0)))
    assert raw is not None and len(raw) == HEADER_SIZE + SLOT  # our header + the bytes
    stats = store.stats()
    assert stats["hits"] == 5 and stats["misses"] == 1
    assert stats["bytes_written"] == sum(sizes) and stats["corrupt_files"] == 0


def test_duplicate_puts_are_not_resent(store: RemoteStore, redis_server: RedisServer) -> None:
    client = redis_server.client()
    before = client.info("commandstats").get("cmdstat_set", {}).get("calls", 0)
    for _ in range(3):
        store.put(key_of(1), payload(1, SLOT))
        assert store.flush(10)
    after = client.info("commandstats")["cmdstat_set"]["calls"]
    assert after - before == 1
    assert store.stats()["duplicate_puts"] == 2


def test_lookup_and_get_many_take_one_round_trip(redis_server: RedisServer) -> None:
    """128 chunks (a 32k-token prompt at 256 tokens per chunk) over a link with 0.15 s
    latency: one round trip each, and the lookup moves no values."""
    delay = 0.15
    with DelayProxy(redis_server.port, delay) as proxy:
        s = remote(f"redis://127.0.0.1:{proxy.port}/0", timeout_s=5.0)
        try:
            keys = [key_of(i) for i in range(128)]
            for i in range(8):
                s.put(keys[i], payload(i, 1024))
            assert s.flush(30)
            client = redis_server.client()
            stats0 = client.info("commandstats")
            t0 = time.perf_counter()
            assert s.contains(keys) == 8
            lookup_s = time.perf_counter() - t0
            stats1 = client.info("commandstats")
            t0 = time.perf_counter()
            got = s.get_many(keys[:8])
            get_s = time.perf_counter() - t0
        finally:
            s.close()
    assert [bytes(g) for g in got if g is not None] == [payload(i, 1024) for i in range(8)]
    assert delay <= lookup_s < 2 * delay, lookup_s  # two round trips would be >= 0.3 s
    assert delay <= get_s < 2 * delay, get_s

    def calls(stats: dict, cmd: str) -> int:
        return int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0))

    assert calls(stats1, "evalsha") - calls(stats0, "evalsha") == 1  # one command
    assert calls(stats1, "exists") - calls(stats0, "exists") == 128  # run inside it
    for cmd in ("cmdstat_get", "cmdstat_mget"):
        assert stats1.get(cmd, {}).get("calls", 0) == stats0.get(cmd, {}).get("calls", 0)


def test_lookup_without_scripting_falls_back_to_a_pipeline(
    redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory(extra_args=["--rename-command", "EVALSHA", ""])
    s = remote(server.url)
    try:
        s.put(key_of(1), payload(1, 256))
        assert s.flush(10)
        with caplog.at_level(logging.WARNING, logger=WARN):
            assert s.contains([key_of(1), key_of(2)]) == 1
            assert s.contains([key_of(1), key_of(2)]) == 1
        lines = [m for m in down_warnings(caplog) if "Lua" in m]
        assert len(lines) == 1, lines
        assert s.state is RemoteState.UP
    finally:
        s.close()


def test_namespaced_by_layout_and_chunk_size(redis_server: RedisServer) -> None:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    ours = remote(redis_server.url, namespace=ns)
    other_layout = remote(redis_server.url, OTHER_FP, namespace=ns)
    other_chunk = RemoteStore(redis_server.url, FP, CHUNK * 2, namespace=ns)
    try:
        assert ours.put(key_of(7), payload(7, SLOT)) and ours.flush(10)
        assert ours.contains([key_of(7)]) == 1
        for s in (other_layout, other_chunk):
            assert key_of(7) not in s
            assert s.get(key_of(7)) is None
        assert ours.redis_key(key_of(7)).decode() == (
            f"{ns}:v1:{FP.hex()}:{CHUNK}:{key_of(7).hex()}"
        )
    finally:
        for s in (ours, other_layout, other_chunk):
            s.close()


# --- corrupt values: a miss, deleted, counted ---


def _flip(value: bytes) -> bytes:
    raw = bytearray(value)
    raw[HEADER_SIZE + 100] ^= 0x40
    return bytes(raw)


def _foreign(key: bytes) -> Callable[[bytes], bytes]:
    def rewrite(value: bytes) -> bytes:
        body = value[HEADER_SIZE:]
        return encode_header(key, OTHER_FP, len(body), xxhash.xxh3_64_intdigest(body)) + body

    return rewrite


@pytest.mark.parametrize("damage", ["flipped", "truncated", "foreign", "garbage", "a list"])
def test_corrupt_value_is_a_miss_deleted_and_counted(
    damage: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    s = remote(redis_server.url, metrics=tier_metrics(registry))
    try:
        key = key_of(3)
        s.put(key, payload(3, SLOT))
        assert s.flush(10)
        client = redis_server.client()
        rkey = s.redis_key(key)
        value = client.get(rkey)
        assert value is not None
        damaged = {
            "flipped": _flip,
            "truncated": lambda v: v[: len(v) - 1000],
            "foreign": _foreign(key),
            "garbage": lambda v: b"not a chunk",
            "a list": lambda v: v,
        }[damage](value)
        if damage == "a list":  # another program's key of another type
            client.delete(rkey)
            client.rpush(rkey, b"x")
        else:
            client.set(rkey, damaged)
        with caplog.at_level(logging.WARNING, logger=WARN):
            assert s.get(key) is None
        assert client.exists(rkey) == 0  # deleted
        stats = s.stats()
        assert stats["corrupt_files"] == 1 and stats["misses"] == 1 and stats["hits"] == 0
        assert stats["foreign_files"] == (damage == "foreign")
        sample = registry.get_sample_value(
            "lmcache_pd_tier_corrupt_files_total", {"tier": "remote"}
        )
        assert sample == 1.0
        assert any(rkey.decode() in m for m in down_warnings(caplog))
        # a good write replaces it
        s.put(key, payload(3, SLOT))
        assert s.flush(10) and s.get(key) == payload(3, SLOT)
    finally:
        s.close()


# --- the server killed, restarted, stalled ---


def test_server_killed_mid_run_and_restarted(
    redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory()
    s = remote(server.url, timeout_s=0.3)
    stop = threading.Event()
    errors: list[BaseException] = []
    results: list[tuple[int, bytes | None]] = []

    def engine() -> None:  # puts, lookups and gets while the server dies and comes back
        i = 0
        while not stop.is_set() and i < 5000:
            try:
                s.put(key_of(i), payload(i, SLOT))
                s.contains([key_of(i - 1), key_of(i)])
                got = s.get(key_of(i - 5))
                results.append((i - 5, None if got is None else bytes(got)))
            except BaseException as exc:
                errors.append(exc)
                return
            i += 1
            time.sleep(0.002)

    with caplog.at_level(logging.INFO, logger=WARN):
        worker = threading.Thread(target=engine)
        worker.start()
        try:
            time.sleep(0.3)
            server.kill()
            wait_until(lambda: s.state is RemoteState.DOWN)
            time.sleep(0.5)  # the engine keeps calling while the server is gone
            t0 = time.perf_counter()
            assert s.get(key_of(0)) is None and s.contains([key_of(0)]) == 0
            assert not s.put(key_of(0), b"x")
            assert time.perf_counter() - t0 < 0.05  # off: no network wait at all
            server.start()
            wait_until(lambda: s.state is RemoteState.UP)
            time.sleep(0.3)
        finally:
            stop.set()
            worker.join(30)
    try:
        assert not errors, errors
        assert len(down_warnings(caplog)) == 1  # one warning for the outage
        assert any("back after" in r.getMessage() for r in caplog.records)
        # nothing corrupt was ever returned: every hit is the exact chunk
        assert all(got is None or got == payload(i, SLOT) for i, got in results)
        assert any(got is not None for _, got in results)
        stats = s.stats()
        assert stats["down_events"] == 1 and stats["recoveries"] == 1
        assert stats["corrupt_files"] == 0 and stats["dropped_writes"] > 0
        assert s.put(key_of(10_000), payload(1, SLOT)) and s.flush(10)
        assert s.get(key_of(10_000)) == payload(1, SLOT)
    finally:
        s.close()


def test_stalled_server_costs_at_most_the_timeout(
    redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory()
    timeout = 0.3
    s = remote(server.url, timeout_s=timeout)
    try:
        s.put(key_of(1), payload(1, SLOT))
        assert s.flush(10)
        server.pause()
        with caplog.at_level(logging.WARNING, logger=WARN):
            t0 = time.perf_counter()
            assert s.contains([key_of(1)]) == 0
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(20):
                assert s.get(key_of(1)) is None
            rest = time.perf_counter() - t0
        assert first < timeout + 0.25, first
        assert rest < 0.05, rest
        assert s.state is RemoteState.DOWN and len(down_warnings(caplog)) == 1
        server.resume()
        wait_until(lambda: s.state is RemoteState.UP)
        assert s.get(key_of(1)) == payload(1, SLOT)  # a stall loses nothing
    finally:
        server.resume()
        s.close()


def test_full_write_queue_drops_without_blocking(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory()
    s = remote(server.url, timeout_s=0.5, queue_size=2)
    try:
        server.pause()  # the writer is stuck on its first batch
        t0 = time.perf_counter()
        accepted = [s.put(key_of(i), payload(i, SLOT)) for i in range(20)]
        assert time.perf_counter() - t0 < 0.2
        assert not all(accepted)
        assert s.stats()["queue_full_drops"] >= 20 - 3
    finally:
        server.resume()
        s.close()


# --- start-up without the server ---


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379", "redis://", "redis://127.0.0.1:99999", "redis://h:1/x", "unix://"],
)
def test_malformed_url_starts_without_the_tier(url: str, caplog: pytest.LogCaptureFixture) -> None:
    cfg = Config(chunk_size=CHUNK, max_local_cpu_size=4 * SLOT / 1e9, remote_url=url)
    with caplog.at_level(logging.WARNING):
        tiers = build_tiers(cfg, TINY)
    assert tiers is not None and tiers.remote is None and tiers.cpu is not None
    lines = [r.getMessage() for r in caplog.records if "remote_url" in r.getMessage()]
    assert len(lines) == 1 and "without the remote tier" in lines[0], lines
    tiers.close()


def test_unreachable_url_starts_off_and_comes_back(
    redis_binary: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(remote_mod, "PROBE_BACKOFF_S", (0.05, 0.2))
    port = free_port()
    cfg = Config(
        chunk_size=CHUNK,
        max_local_cpu_size=4 * SLOT / 1e9,
        remote_url=f"redis://127.0.0.1:{port}/0",
        remote_timeout_s=0.2,
    )
    with caplog.at_level(logging.WARNING, logger=WARN):
        t0 = time.perf_counter()
        tiers = build_tiers(cfg, TINY)
        start_s = time.perf_counter() - t0
    assert tiers is not None and tiers.remote is not None
    try:
        assert start_s < 2.0
        assert tiers.remote.state is RemoteState.DOWN
        lines = down_warnings(caplog)
        assert len(lines) == 1 and "unreachable at start" in lines[0], lines
        tiers.put(key_of(1), payload(1, SLOT))  # CPU keeps serving
        assert tiers.contains([key_of(1), key_of(2)]) == 1
        with RedisServer(tmp_path / "late", port=port, binary=redis_binary):
            wait_until(lambda: tiers.remote is not None and tiers.remote.state is RemoteState.UP)
            assert tiers.put(key_of(3), payload(3, SLOT)) and tiers.flush(10)
            assert tiers.remote.get(key_of(3)) == payload(3, SLOT)
    finally:
        tiers.close()


# --- CPU + remote, as a kv_both engine holds them ---


def test_cpu_plus_remote_shares_and_promotes(redis_server: RedisServer) -> None:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    metrics = tier_metrics(registry)

    def engine() -> TieredStore:
        cpu = CPUStore(8 * SLOT, SLOT, backend="numpy", metrics=metrics)
        return TieredStore(cpu, None, remote(redis_server.url, namespace=ns), metrics=metrics)

    a, b = engine(), engine()
    try:
        keys = [key_of(i) for i in range(4)]
        for i, key in enumerate(keys):
            assert a.put(key, payload(i, SLOT))
        assert a.flush(10)
        assert a.cpu is not None and a.cpu.stats()["pinned"] == 0  # lent slots released
        assert a.stats()["remote.bytes_written"] == 4 * SLOT
        assert b.contains(keys) == 4 and b.contains([*keys, key_of(50)]) == 4
        assert keys[0] not in b  # `in` is the local index only: never a network call
        views = b.acquire_many(keys)
        assert [bytes(v) for v in views if v is not None] == [payload(i, SLOT) for i in range(4)]
        for key in keys:
            b.release(key)
        assert b.cpu is not None and all(k in b.cpu for k in keys)  # promoted
        assert b.stats()["remote_promotions"] == 4
        remote_hits = b.stats()["remote.hits"]
        assert b.get(keys[2]) == payload(2, SLOT)  # now from CPU
        assert b.stats()["remote.hits"] == remote_hits
        assert (
            registry.get_sample_value("lmcache_pd_tier_promotions_total", {"tier": "remote"}) == 4.0
        )
        # a promoted chunk is not written back; B's own new chunk is shared with A
        assert b.put(key_of(9), payload(9, SLOT)) and b.flush(10)
        assert b.stats()["remote.duplicate_puts"] == 0
        assert a.get(key_of(9)) == payload(9, SLOT)
    finally:
        a.close()
        b.close()
