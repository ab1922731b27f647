"""``Receiver.acquire`` of chunks held only in the remote tier: one batched round trip for
the whole load (``TieredStore.acquire_many``), pins recorded where they were taken and
released there. Real receiver (NIXL agent, ZMQ), real redis-server."""

from __future__ import annotations

import secrets

import numpy as np

from lmcache_pd.tiers.cpu import CPUStore
from lmcache_pd.tiers.manager import TieredStore
from lmcache_pd.tiers.redis_server import RedisServer
from lmcache_pd.tiers.remote import RemoteStore
from tests.core.helpers import CHUNK, LAYOUT, hasher, make_config, receiver

SLOT = LAYOUT.bytes_per_chunk(CHUNK)


def store(url: str, namespace: str) -> TieredStore:
    remote = RemoteStore(url, LAYOUT.fingerprint(), CHUNK, namespace=namespace, timeout_s=2.0)
    return TieredStore(CPUStore(16 * SLOT, SLOT), None, remote)


def test_multi_chunk_acquire_is_one_remote_round_trip(redis_server: RedisServer) -> None:
    namespace = f"rx-acquire-{secrets.token_hex(4)}"
    rng = np.random.default_rng(8)
    keys = hasher().keys(rng.integers(0, 1000, 4 * CHUNK).tolist())
    data = [rng.integers(0, 256, SLOT, dtype=np.uint8).tobytes() for _ in keys]
    writer = store(redis_server.url, namespace)  # another engine put them into Redis
    for key, chunk in zip(keys, data, strict=True):
        writer.put(key, chunk)
    assert writer.flush(10.0)
    writer.close()

    tiers = store(redis_server.url, namespace)
    remote, cpu = tiers.remote, tiers.cpu
    assert remote is not None and cpu is not None
    calls: list[int] = []
    get_many = remote.get_many

    def counted(batch: list[bytes]) -> list[memoryview | None]:
        calls.append(len(batch))
        return get_many(batch)

    remote.get_many = counted  # type: ignore[method-assign]
    cfg = make_config()
    try:
        with receiver(cfg, store=tiers) as rx:
            views = rx.acquire(keys)
            try:
                assert [bytes(v) for v in views if v is not None] == data
                assert calls == [4]  # the four chunks in one round trip
                assert cpu.stats()["pinned"] == 4  # promoted into CPU, pinned there
            finally:
                rx.release(keys)
            assert cpu.stats()["pinned"] == 0
            assert rx._store_pins == {}
            # now in CPU: a second acquire asks the server nothing
            assert [rx.read(k) for k in keys] == data
            assert calls == [4]
    finally:
        tiers.close()
