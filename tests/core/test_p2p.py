"""Peer-to-peer fetch between two engines' tiers (lmcache_pd.p2p), real parts only.

Two "engines" in one process, each a tiered store (CPU + the remote tier on one real
redis-server) with a :class:`PeerSharing` (receiver + sender on their own NIXL agents,
p2p server and client on ZMQ). Engine A holds chunks in its CPU tier and advertises them
in the remote tier's holder index; their values are deleted from Redis, so engine B can
only get them from A: bit-exact through the handoff, counted on both sides. A stale
holder entry, a dead peer and a wrongly signed request are misses that cost a bounded
time and leak no slot.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lmcache_pd.config import Config, ConfigError, load_config
from lmcache_pd.control import Codec
from lmcache_pd.p2p import PeerClient, PeerSharing
from lmcache_pd.protocol import ErrorCode
from lmcache_pd.pull import FetchError
from lmcache_pd.tiers.cpu import CPUStore
from lmcache_pd.tiers.manager import TieredStore
from lmcache_pd.tiers.redis_server import RedisServer
from lmcache_pd.tiers.remote import RemoteStore

from .helpers import CHUNK, LAYOUT, hasher, make_config

CHUNK_BYTES = LAYOUT.bytes_per_chunk(CHUNK)


@pytest.fixture(scope="module")
def redis_url(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("p2p-redis"), binary=redis_binary)
    try:
        yield server.url
    finally:
        server.stop()


@dataclass
class Engine:
    store: TieredStore
    p2p: PeerSharing

    def close(self) -> None:
        self.p2p.close()
        self.store.close()


def engine(cfg: Config, url: str, namespace: str) -> Engine:
    store = TieredStore(
        CPUStore(16 * CHUNK_BYTES, CHUNK_BYTES),
        None,
        RemoteStore(url, LAYOUT.fingerprint(), CHUNK, namespace=namespace, timeout_s=2.0),
    )
    return Engine(store, PeerSharing(cfg, LAYOUT, store, receiver_port=0, server_port=0))


@pytest.fixture
def engines(redis_url: str) -> Iterator[tuple[Engine, Engine, Config]]:
    cfg = make_config(
        enable_p2p=True,
        remote_url=redis_url,
        pd_connect_timeout_s=1.0,
        pd_transfer_timeout_s=1.5,
    )
    namespace = f"p2p-{secrets.token_hex(4)}"  # each test its own keys
    a = engine(cfg, redis_url, namespace)
    b = engine(cfg, redis_url, namespace)
    try:
        yield a, b, cfg
    finally:
        b.close()
        a.close()


def held_only_by(a: Engine, n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """``n`` random chunks in A's CPU tier, advertised as A's; their values are deleted
    from Redis (only A can serve them)."""
    rng = np.random.default_rng(seed)
    keys = hasher().keys(rng.integers(0, 1000, n * CHUNK).tolist())
    data = [rng.integers(0, 256, CHUNK_BYTES, dtype=np.uint8).tobytes() for _ in keys]
    for key, chunk in zip(keys, data, strict=True):
        assert a.store.put(key, chunk)
    assert a.store.flush(5.0)
    remote = a.store.remote
    assert remote is not None
    remote.client.delete(*[remote.redis_key(k) for k in keys])
    return keys, data


def assert_no_leaks(a: Engine, b: Engine) -> None:
    assert a.p2p.sender.buffer.free_count == a.p2p.sender.buffer.num_slots
    usage = b.p2p.receiver.slot_usage()
    assert usage["leased"] == 0


def test_chunks_held_by_a_peer_arrive_bit_exact_and_are_counted(
    engines: tuple[Engine, Engine, Config],
) -> None:
    a, b, _ = engines
    keys, data = held_only_by(a, 3, seed=1)
    src = b.p2p.source
    assert src.lookup(keys) == 0  # nothing here, nothing in Redis
    assert src.lookup_with_peers(keys) == 3  # the holder index names A
    assert src.wait_for(keys, 10.0) == 3
    views = src.acquire(keys)
    try:
        assert [bytes(v) for v in views if v is not None] == data
    finally:
        src.release(keys)
    assert src.counters["peer_hits"] == 3 and src.counters["peer_misses"] == 0
    assert a.p2p.server.counters["chunks_served"] == 3
    assert_no_leaks(a, b)
    # B now holds them itself and advertises so; a second fetch has nothing to do
    assert b.store.flush(5.0)
    assert src.lookup_with_peers(keys) == 3 and src.wait_for(keys, 5.0) == 3
    assert src.counters["fetches"] == 1


def test_a_stale_holder_entry_is_a_miss(engines: tuple[Engine, Engine, Config]) -> None:
    a, b, _ = engines
    keys, data = held_only_by(a, 3, seed=2)
    assert a.store.cpu is not None
    a.store.cpu.evict(keys[2])  # A lost the last chunk; its entry still names A
    src = b.p2p.source
    assert src.lookup_with_peers(keys) == 3
    assert src.wait_for(keys, 10.0) == 2  # A sends the prefix it still holds
    assert [b.p2p.receiver.read(k) for k in keys[:2]] == data[:2]
    assert src.counters["peer_misses"] == 1
    assert a.p2p.server.counters["keys_missed"] == 1
    assert_no_leaks(a, b)


def _dead_endpoint() -> str:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_a_dead_peer_is_a_miss_within_the_deadline(
    engines: tuple[Engine, Engine, Config],
) -> None:
    _a, b, cfg = engines
    rng = np.random.default_rng(3)
    keys = hasher().keys(rng.integers(0, 1000, 2 * CHUNK).tolist())
    remote = b.store.remote
    assert remote is not None
    dead = _dead_endpoint()
    remote.advertise(keys, dead, 60.0)
    assert remote.flush(5.0)
    src = b.p2p.source
    assert src.lookup_with_peers(keys) == 2
    t0 = time.monotonic()
    assert src.wait_for(keys, 30.0) == 0
    elapsed = time.monotonic() - t0
    assert elapsed < cfg.pd_connect_timeout_s + cfg.pd_transfer_timeout_s + 1.0, elapsed
    assert b.p2p.client.counters["timeouts"] == 1
    # the dead peer is not asked again for a while: no peer hit, no wait
    assert src.lookup_with_peers(keys) == 0
    t0 = time.monotonic()
    assert src.wait_for(keys, 30.0) == 0
    assert time.monotonic() - t0 < 0.5
    assert b.p2p.receiver.slot_usage()["leased"] == 0


def test_wrongly_signed_and_malformed_requests_are_refused(
    engines: tuple[Engine, Engine, Config],
) -> None:
    a, b, cfg = engines
    keys, _ = held_only_by(a, 2, seed=4)
    endpoint = a.p2p.server.endpoint
    forger = PeerClient(cfg, Codec(secrets.token_bytes(32)), b.p2p.client.receiver)
    try:
        with pytest.raises(FetchError) as err:
            forger.fetch_keys(endpoint, keys, 0.5)
        assert err.value.code is ErrorCode.TIMEOUT  # dropped unanswered
    finally:
        forger.close()
    assert a.p2p.server.counters["auth_failures"] >= 1
    assert a.p2p.server.counters["requests"] == 0
    with pytest.raises(FetchError) as bad:
        b.p2p.client.fetch_keys(endpoint, [b"short"], 2.0)
    assert bad.value.code is ErrorCode.BAD_REQUEST
    assert "16 bytes" in str(bad.value)
    assert b.p2p.receiver.lookup(keys) == 0  # nothing was pushed
    assert_no_leaks(a, b)


def test_enable_p2p_without_the_remote_tier_is_refused(tmp_path: Path) -> None:
    cfg = make_config()
    store = TieredStore(CPUStore(4 * CHUNK_BYTES, CHUNK_BYTES), None)
    try:
        with pytest.raises(ValueError, match="remote_url"):
            PeerSharing(cfg, LAYOUT, store, receiver_port=0, server_port=0)
    finally:
        store.close()


def test_lmcache_p2p_keys_take_effect(caplog: pytest.LogCaptureFixture) -> None:
    env = {
        "LMCACHE_ENABLE_P2P": "true",
        "LMCACHE_P2P_HOST": "0.0.0.0",
        "LMCACHE_P2P_INIT_PORTS": "8200,8201",
        "LMCACHE_PD_PEER_HOST": "10.0.0.7",
    }
    with caplog.at_level(logging.WARNING):
        cfg = load_config(env=env)
    assert cfg.enable_p2p and cfg.p2p_init_ports == [8200, 8201]
    assert cfg.port_for_rank("p2p_init_ports", 1) == 8201
    assert cfg.p2p_advertised_host() == "10.0.0.7"  # a wildcard advertises pd_peer_host
    ignored = [r.getMessage() for r in caplog.records if "ignoring LMCache keys" in r.getMessage()]
    assert not any("p2p_init_ports" in m or "enable_p2p" in m for m in ignored)
    defaults = load_config(env={})
    assert (defaults.enable_p2p, defaults.p2p_host, defaults.p2p_init_ports) == (
        False,
        "127.0.0.1",
        0,
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"p2p_init_ports": [8200, 70000]}, "p2p_init_ports: port 70000 out of range"),
        ({"p2p_init_ports": []}, "p2p_init_ports: port list is empty"),
        ({"p2p_holder_ttl_s": 0}, "p2p_holder_ttl_s: must be > 0"),
        ({"enable_p2p": "sometimes"}, "enable_p2p: expected bool"),
    ],
)
def test_bad_p2p_config_is_refused_naming_the_key(
    overrides: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=overrides, env={})
