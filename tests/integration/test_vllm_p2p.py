"""Peer-to-peer fetch between two real ``kv_both`` vLLM engines (lmcache_pd.p2p).

Engines A and B share one redis-server (loopback) as their remote tier, with
``enable_p2p`` on. A serves a long prompt cold (vLLM's own prefix cache off: a single
engine's tokens) and advertises the chunks its CPU tier got in the remote tier's holder
index. The chunk values are then deleted from Redis, so the only copy is A's. B serves a
prompt with the same prefix: its lookup learns A holds the chunks, A pushes them into B's
receive buffer over NIXL, and B computes only the last partial chunk. B's tokens are
A's, and its log shows the peer hits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmcache_pd.integration.vllm.launch import VLLMServer
from lmcache_pd.integration.vllm.tiny_model import prompts as make_prompts
from lmcache_pd.tiers.redis_server import RedisServer
from tests.integration.helpers import (
    connector_config,
    load_lines,
    lookup_lines,
    start_servers,
    texts,
)

CHUNK = 64
MAX_TOKENS = 16
NO_PREFIX_CACHE = ["--no-enable-prefix-caching"]

pytestmark = pytest.mark.vllm


@dataclass
class Peers:
    redis: RedisServer
    a: VLLMServer
    b: VLLMServer


def p2p_config(url: str) -> dict[str, object]:
    return connector_config(
        "kv_both",
        chunk_size=CHUNK,
        local_cpu=True,
        max_local_cpu_size=0.05,
        remote_url=url,
        remote_timeout_s=2.0,
        enable_p2p=True,
        pd_peer_init_port=0,  # two engines on one host: free ports (advertised)
        pd_buffer_size=8 << 20,
        pd_connect_timeout_s=5.0,
        pd_transfer_timeout_s=10.0,
    )


@pytest.fixture(scope="module")
def peers(
    redis_binary: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Peers]:
    work = tmp_path_factory.mktemp("p2p")
    redis = RedisServer(work / "redis", binary=redis_binary)
    a = VLLMServer(
        tiny_model,
        work / "a.log",
        name="kv_both-a",
        kv_transfer_config=p2p_config(redis.url),
        env={"VLLM_CPU_OMP_THREADS_BIND": "0"},
        extra_args=NO_PREFIX_CACHE,
    )
    b = VLLMServer(
        tiny_model,
        work / "b.log",
        name="kv_both-b",
        kv_transfer_config=p2p_config(redis.url),
        env={"VLLM_CPU_OMP_THREADS_BIND": "1"},
        extra_args=NO_PREFIX_CACHE,
    )
    try:
        start_servers([a, b])
        yield Peers(redis, a, b)
    finally:
        for s in (b, a):
            s.stop()
        redis.stop()


def _keys(redis: RedisServer, holders: bool) -> list[bytes]:
    client = redis.client()
    try:
        found = list(client.scan_iter(match="lmcpd:*", count=1000))
    finally:
        client.close()
    return [k for k in found if (b":p2p:" in k) == holders]


def test_b_fetches_a_prefix_from_peer_a_over_nixl(peers: Peers) -> None:
    prompt = make_prompts(1, seed=31, min_words=150, max_words=150)[0]
    n = len(peers.a.tokenize(prompt))
    if n % CHUNK == 0:
        prompt += " and"
        n = len(peers.a.tokenize(prompt))
    full = n // CHUNK * CHUNK
    assert full >= 3 * CHUNK and n > full, n

    want = texts(peers.a, [prompt], MAX_TOKENS)  # cold on A: a single engine's tokens
    assert lookup_lines(peers.a.log_text())[-1][1] == 0
    deadline = time.monotonic() + 60  # A advertises its chunks (write-behind)
    while len(_keys(peers.redis, holders=True)) < full // CHUNK:
        assert time.monotonic() < deadline, "engine A's holder entries did not reach Redis"
        time.sleep(0.2)
    values = _keys(peers.redis, holders=False)
    if values:  # only A's CPU tier keeps the prefix now
        client = peers.redis.client()
        client.delete(*values)
        client.close()

    got = texts(peers.b, [prompt], MAX_TOKENS)
    assert got == want
    log = peers.b.log_text()
    total, hit, _ = lookup_lines(log)[-1]
    assert total == n and hit >= full, (total, hit)
    load = load_lines(log)[-1]
    assert load["loading"] >= full - 1 and load["computing"] <= n - full + 1, load
    fetched = [line for line in log.splitlines() if "p2p: fetched" in line]
    assert fetched, "B did not fetch from its peer"
    assert f"fetched {full // CHUNK} of {full // CHUNK} chunk(s) from peer" in fetched[-1]
    assert f"peer_hits={full // CHUNK} peer_misses=0" in fetched[-1]
    assert "Retrieved" in log and "not loaded" not in log
