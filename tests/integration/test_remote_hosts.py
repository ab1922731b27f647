"""KV shared across hosts: two ``kv_both`` vLLM engines on two "hosts" (network
namespaces joined by a veth, lmcache_pd.netns) share one redis-server.

The server runs on host a, bound to host a's veth address; engine A (host a) and engine B
(host b) both use it as their remote tier (``remote_url``) over that address. Engine A
serves a prompt cold (vLLM's own prefix cache off: a single engine's tokens); its chunks
are written behind to Redis. Engine B, on the other host, serves the same prompt: its
lookup finds the full chunks in Redis, it loads them over the veth and computes only the
last partial chunk, and its tokens are identical to A's. The namespaces are created and
deleted here; the test skips with the reason only where they cannot be made.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmcache_pd.integration.vllm.tiny_model import prompts as make_prompts
from lmcache_pd.netns import NetnsPair, unavailable_reason
from lmcache_pd.tiers.redis_server import RedisServer
from tests.integration.helpers import connector_config, load_lines, lookup_lines, start_servers
from tests.integration.helpers import texts as _texts
from tests.integration.test_netns import NsServer

CHUNK = 64
MAX_TOKENS = 16
PASSWORD = secrets.token_hex(16)
NO_PREFIX_CACHE = ["--no-enable-prefix-caching"]

pytestmark = [
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
    pytest.mark.vllm,
]


@dataclass
class SharedHosts:
    pair: NetnsPair
    redis: RedisServer
    a: NsServer
    b: NsServer

    def texts(self, server: NsServer, prompts: list[str]) -> list[str]:
        return server.host.call(_texts, server, prompts, MAX_TOKENS)

    def tokens(self, server: NsServer, prompt: str) -> int:
        return len(server.host.call(server.tokenize, prompt))


def both_config(url: str) -> dict[str, object]:
    return connector_config(
        "kv_both",
        chunk_size=CHUNK,
        local_cpu=True,
        max_local_cpu_size=0.05,
        remote_url=url,
        remote_timeout_s=2.0,
    )


@pytest.fixture(scope="module")
def shared(
    redis_binary: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedHosts]:
    work = tmp_path_factory.mktemp("remote-hosts")
    with NetnsPair() as pair:
        redis = RedisServer(
            work / "redis",
            binary=redis_binary,
            prefix=pair.a.prefix(),
            bind=[pair.a.addr],
            password=PASSWORD,  # off loopback Redis wants one (protected mode)
        )
        url = f"redis://:{PASSWORD}@{pair.a.addr}:{redis.port}/0"
        a = NsServer(
            pair.a,
            tiny_model,
            work / "a.log",
            name="kv_both-a",
            kv_transfer_config=both_config(url),
            env={"VLLM_CPU_OMP_THREADS_BIND": "0"},
            extra_args=NO_PREFIX_CACHE,
        )
        b = NsServer(
            pair.b,
            tiny_model,
            work / "b.log",
            name="kv_both-b",
            kv_transfer_config=both_config(url),
            env={"VLLM_CPU_OMP_THREADS_BIND": "1"},
            extra_args=NO_PREFIX_CACHE,
        )
        try:
            start_servers([a, b])
            yield SharedHosts(pair, redis, a, b)
        finally:
            for s in (b, a):
                s.stop()
            redis.stop()


def _chunk_keys(redis: RedisServer) -> int:
    client = redis.client()
    try:
        return sum(1 for _ in client.scan_iter(match="lmcpd:*", count=1000))
    finally:
        client.close()


def test_prefix_from_host_a_loads_on_host_b_through_redis(shared: SharedHosts) -> None:
    prompt = make_prompts(1, seed=21, min_words=150, max_words=150)[0]
    n = shared.tokens(shared.a, prompt)
    if n % CHUNK == 0:
        prompt += " and"
        n = shared.tokens(shared.a, prompt)
    full = n // CHUNK * CHUNK
    assert full >= 3 * CHUNK and n > full, n

    want = shared.texts(shared.a, [prompt])  # cold on A: a single engine's tokens
    assert lookup_lines(shared.a.log_text())[-1][1] == 0
    deadline = time.monotonic() + 60  # A writes its chunks behind to Redis
    while _chunk_keys(shared.redis) < full // CHUNK:
        assert time.monotonic() < deadline, "engine A's chunks did not reach Redis"
        time.sleep(0.2)

    client = shared.redis.client()
    gets_before = client.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
    got = shared.texts(shared.b, [prompt])
    gets = client.info("commandstats").get("cmdstat_get", {}).get("calls", 0) - gets_before
    client.close()

    assert got == want
    total, hit, _ = lookup_lines(shared.b.log_text())[-1]
    assert total == n and hit >= full, (total, hit)
    load = load_lines(shared.b.log_text())[-1]
    assert load["prompt"] == n
    assert load["loading"] >= full - 1 and load["computing"] <= n - full + 1, load
    assert gets >= full // CHUNK  # B read the chunks from the server on host a
