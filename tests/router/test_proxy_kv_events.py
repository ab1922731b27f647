"""cache_aware routes by the engines' KV events: a snapshot on subscribe, after an engine
restart that reloads its prefixes from disk, and removals; events of another block size
are ignored. The engines' KV side is the real publisher over real tiers (DiskStore,
CPUStore); their HTTP side is the stub engine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventPublisher,
    TierName,
)
from lmcache_pd.integration.vllm.launch import free_port_pair
from lmcache_pd.router.kv_events import EngineEvents, HeldMap
from lmcache_pd.router.stub import word_tokens
from lmcache_pd.tiers.cpu import CPUStore
from lmcache_pd.tiers.disk import DiskStore

CS = 4
FP = bytes(range(16))  # the engines' layout fingerprint (the proxy hashes without one)
CHUNK = b"\x01" * 32
PROMPT = "the shared system prompt of our tenant says hello to everyone here " * 2


def _state(client: httpx.Client, url: str) -> dict[str, Any]:
    return client.get(url + "/v1/proxy/state").json()


def _wait(pred: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _route(client: httpx.Client, url: str, decoders: list[Any], n: int = 4) -> list[int]:
    for d in decoders:
        d.served = 0
    for _ in range(n):
        r = client.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200, r.text
    return [d.served for d in decoders]


def test_routes_to_the_engine_that_reloaded_the_prefix_from_disk(
    tmp_path: Path, stubs: Any, proxy: Any, client: httpx.Client
) -> None:
    hasher = ChunkHasher(FP, CS)
    tokens = word_tokens(PROMPT)
    keys = hasher.keys(tokens)
    assert len(keys) >= 4
    p0 = free_port_pair()
    p1 = free_port_pair(avoid=(p0, p0 + 1))  # each publisher binds port and port + 1
    disk = DiskStore(tmp_path / "e0", 1 << 20, FP)
    pub0 = KVEventPublisher(hasher, {TierName.DISK: disk.keys_lru}, port=p0, disk_root=disk.root)
    cpu1 = CPUStore(1 << 16, len(CHUNK), backend="numpy")
    pub1 = KVEventPublisher(hasher, {TierName.CPU: cpu1.keys_lru}, port=p1)
    # engine 0 served the prompt before the proxy existed: its chunks are on disk
    pub0.learn(tokens)
    for k in keys:
        disk.put(k, CHUNK)
    assert disk.flush(5) and pub0.flush()
    decoders = [stubs("D0"), stubs("D1")]
    h = proxy(
        [
            "--prefiller",
            stubs("P").url,
            "--decoder",
            ",".join(d.url for d in decoders),
            "--decoder-events",
            f"127.0.0.1:{p0},127.0.0.1:{p1}",
            "--policy",
            "cache_aware",
        ],
        config={"chunk_size": CS},
        events_resync_s=0.5,
    )
    try:
        # a late subscriber: the snapshot tells the proxy what engine 0 holds
        _wait(lambda: _state(client, h.url)["held_map"] >= len(keys))
        assert _route(client, h.url, decoders) == [4, 0]

        # engine 0 restarts: its disk tier reloads the chunks (tokens from the files)
        pub0.close()
        disk.close()
        disk = DiskStore(tmp_path / "e0", 1 << 20, FP)
        pub0 = KVEventPublisher(
            hasher, {TierName.DISK: disk.keys_lru}, port=p0, disk_root=disk.root
        )
        _wait(lambda: _state(client, h.url)["kv_events"][0]["snapshots"] >= 3)
        _wait(lambda: _state(client, h.url)["held_map"] >= len(keys))
        assert _route(client, h.url, decoders) == [4, 0]

        # engine 0 drops them (BlockRemoved): no affinity any more, requests spread
        for k in keys:
            disk.evict(k)
        assert pub0.flush()
        _wait(lambda: _state(client, h.url)["held_map"] == 0)
        assert _route(client, h.url, decoders) == [2, 2]

        # engine 1 gets them into its CPU tier: it wins now
        pub1.learn(tokens)
        for k in keys:
            cpu1.put(k, CHUNK)
        assert pub1.flush()
        _wait(lambda: _state(client, h.url)["held_map"] >= len(keys))
        assert _route(client, h.url, decoders) == [0, 4]
    finally:
        pub0.close()
        pub1.close()
        disk.close()
        cpu1.close()


def _stored(h: bytes, parent: bytes | None, toks: list[int], size: int) -> BlockStored:
    return BlockStored(
        block_hashes=[h],
        parent_block_hash=parent,
        token_ids=toks,
        block_size=size,
        lora_id=None,
        medium="CPU",
        lora_name=None,
    )


def test_events_resolve_out_of_order_and_ignore_other_block_sizes() -> None:
    proxy_hasher = ChunkHasher(b"", CS)
    held = HeldMap(100)
    sub = EngineEvents(0, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", proxy_hasher, held)
    toks = list(range(12))
    want = proxy_hasher.keys(toks)
    # children before parents (snapshot order is not chain order), engine hashes opaque
    sub.apply(
        [
            _stored(b"c" * 16, b"b" * 16, toks[8:12], CS),
            _stored(b"b" * 16, b"a" * 16, toks[4:8], CS),
            _stored(b"v" * 16, None, list(range(16)), 16),  # vLLM's own GPU blocks
            _stored(b"a" * 16, None, toks[0:4], CS),
        ]
    )
    assert [held.get(k) for k in want] == [1, 1, 1]
    assert sub.ignored == 1 and len(held) == 3
    sub.apply([BlockRemoved(block_hashes=[b"a" * 16], medium="CPU"), AllBlocksCleared()])
    assert len(held) == 0


def test_bad_decoder_events_are_named() -> None:
    from lmcache_pd.config import ConfigError
    from lmcache_pd.router.settings import settings_from_args

    base = ["--decoder", "http://127.0.0.1:8001", "--policy", "cache_aware"]
    with pytest.raises(ConfigError, match="decoder_events: expected host:port, got 'nohost'"):
        settings_from_args([*base, "--decoder-events", "nohost"])
    with pytest.raises(ConfigError, match="decoder_events: 2 endpoints for 1 decoders"):
        settings_from_args([*base, "--decoder-events", "127.0.0.1:1,127.0.0.1:2"])
    ok = settings_from_args([*base, "--decoder-events", "127.0.0.1:7600"])
    assert ok.events_endpoint(0) == ("127.0.0.1", 7600)
