"""kv_both on one real vLLM engine: prefix reuse from the CPU/disk tiers.

One engine with our connector (CPU + disk tiers) beside one plain engine; vLLM's own
prefix cache is off on both so every reused token really comes through our tiers. The
greedy tokens must be identical, the log must show the hits, and after a restart the
prefix must hit from disk. Our figures must show on the engine's ``/metrics`` and its
log line, and the KV events of its tiers (CPU, and disk after the restart) must decode
with vLLM's own types.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcache_pd.integration.vllm.launch import (
    ServerError,
    VLLMServer,
    free_port_pair,
    metric_value,
)
from lmcache_pd.integration.vllm.tiny_model import prompts as make_prompts
from tests.integration.helpers import (
    connector_config,
    load_lines,
    lookup_lines,
    start_servers,
    texts,
)
from tests.integration.observe import chunks_of, kv_events, metric_sum, stored_chunks

CHUNK = 64
MAX_TOKENS = 24
NO_PREFIX_CACHE = ["--no-enable-prefix-caching"]


def both_config(disk: Path, events_port: int = 0) -> dict[str, object]:
    return connector_config(
        "kv_both",
        chunk_size=CHUNK,
        local_cpu=True,
        max_local_cpu_size=0.05,
        local_disk=f"file://{disk}",
        max_local_disk_size=0.2,
        pd_kv_events_port=events_port,
    )


@pytest.fixture(scope="module")
def events_port() -> int:
    return free_port_pair()  # the publisher's replay socket binds the next port


@pytest.fixture(scope="module")
def engines(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, events_port: int
) -> Iterator[tuple[VLLMServer, VLLMServer, Path]]:
    work = tmp_path_factory.mktemp("kv-both")
    disk = work / "disk"
    # vLLM's own KV-event publisher too: our tier events also travel on its stream
    vllm_events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"ipc://{work}/vllm-events.sock",
        "replay_endpoint": f"ipc://{work}/vllm-replay.sock",
    }
    plain = VLLMServer(tiny_model, work / "plain.log", name="plain", extra_args=NO_PREFIX_CACHE)
    both = VLLMServer(
        tiny_model,
        work / "both.log",
        name="kv_both",
        kv_transfer_config=both_config(disk, events_port),
        extra_args=[*NO_PREFIX_CACHE, "--kv-events-config", json.dumps(vllm_events)],
        env={"VLLM_LOG_STATS_INTERVAL": "2"},  # the stats log line within the test
    )
    start_servers([plain, both])
    try:
        yield plain, both, disk
    finally:
        both.stop()
        plain.stop()


def test_prefix_hit_gives_identical_tokens(
    engines: tuple[VLLMServer, VLLMServer, Path],
) -> None:
    plain, both, _ = engines
    base = make_prompts(1, seed=11, min_words=150, max_words=150)[0]
    shared = [base, base + " and then the decode engine took over", base]
    n_tokens = len(both.tokenize(base))
    assert n_tokens >= 3 * CHUNK, "prompt too short for the test"
    want = texts(plain, shared, MAX_TOKENS)
    got = texts(both, shared, MAX_TOKENS)
    assert got == want
    lines = lookup_lines(both.log_text())[-3:]
    full = n_tokens // CHUNK * CHUNK
    assert lines[0][1] == 0, lines  # cold
    assert lines[1][1] >= full and lines[2][1] >= full, lines  # shared chunks hit
    loads = load_lines(both.log_text())
    assert loads and loads[-1]["loading"] >= full - 1
    hits = metric_value(both.metrics(), "vllm:external_prefix_cache_hits_total")
    assert hits is not None and hits >= 2 * (full - 1)


def test_unrelated_prompts_identical(engines: tuple[VLLMServer, VLLMServer, Path]) -> None:
    plain, both, _ = engines
    ps = make_prompts(6, seed=12, min_words=3, max_words=150)
    ps = ps + ps[:3]  # the repeats load from the tiers
    assert texts(both, ps, MAX_TOKENS) == texts(plain, ps, MAX_TOKENS)


def test_our_metrics_and_events(
    engines: tuple[VLLMServer, VLLMServer, Path], events_port: int
) -> None:
    """After the reuse runs above: tier hits, loads and stores on the engine's /metrics
    and in its log line; CPU-tier KV events for a prompt's chunks, with its tokens."""
    _, both, _ = engines
    prompt = make_prompts(1, seed=14, min_words=120, max_words=120)[0]
    texts(both, [prompt, prompt], 4)  # the repeat loads from the tiers
    tokens = both.tokenize(prompt)
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:  # stats reach the API server after a step
        both.completion(prompt, 2)  # keeps loading from the tiers while we wait
        text = both.metrics()
        if (
            metric_sum(text, "vllm:lmcache_pd_transfer_seconds_count", op="load") >= 2
            and "KV Transfer metrics:" in both.log_text()
        ):
            break
        time.sleep(0.2)
    role = {"role": "kv_both"}
    assert metric_sum(text, "vllm:lmcache_pd_tier_hits_total", medium="cpu", **role) > 0
    assert metric_sum(text, "vllm:lmcache_pd_tokens_loaded_total", **role) >= 2 * CHUNK
    assert metric_sum(text, "vllm:lmcache_pd_tokens_stored_total", **role) >= 2 * CHUNK
    assert metric_sum(text, "vllm:lmcache_pd_tier_bytes_written_total", medium="cpu") > 0
    assert metric_sum(text, "vllm:lmcache_pd_transfer_seconds_count", op="load", medium="cpu") >= 2
    assert metric_sum(text, "vllm:lmcache_pd_transfer_bytes_sum", op="load") > 0
    assert metric_sum(text, "vllm:lmcache_pd_kv_events_published_total") > 0
    assert metric_sum(text, "vllm:lmcache_pd_load_failures_total") == 0
    assert "KV Transfer metrics:" in both.log_text()
    events = kv_events(f"tcp://127.0.0.1:{events_port + 1}")
    want = chunks_of(tokens, CHUNK)
    assert want and want <= stored_chunks(events, "CPU")
    assert {e.block_size for e in events} == {CHUNK}
    # the same chunks on vLLM's own stream (replayed from its first batch)
    # vLLM publishes the connector's events when the engine steps: step until they show
    replay = both.log_path.parent / "vllm-replay.sock"
    deadline = time.monotonic() + 30
    seen: set = set()
    while time.monotonic() < deadline:
        seen = stored_chunks(kv_events(f"ipc://{replay}", start=0), "CPU")
        if want <= seen:
            break
        both.completion(prompt, 2)
    assert want <= seen


def test_restart_hits_from_disk(
    engines: tuple[VLLMServer, VLLMServer, Path],
    tiny_model: Path,
    tmp_path: Path,
    events_port: int,
) -> None:
    plain, both, disk = engines
    prompt = make_prompts(1, seed=13, min_words=110, max_words=110)[0]
    want = texts(plain, [prompt], MAX_TOKENS)
    assert texts(both, [prompt], MAX_TOKENS) == want
    deadline = time.monotonic() + 20  # the disk tier writes behind: let it land
    while not any(p.is_file() for p in disk.rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    both.stop()
    assert any(p.is_file() for p in disk.rglob("*")), "nothing was written to the disk tier"
    again = VLLMServer(
        tiny_model,
        tmp_path / "restarted.log",
        name="kv_both-restarted",
        kv_transfer_config=both_config(disk, events_port),
        extra_args=NO_PREFIX_CACHE,
    )
    with again:
        # before any request: the snapshot announces the chunks reloaded from disk
        tokens = again.tokenize(prompt)
        reloaded = stored_chunks(kv_events(f"tcp://127.0.0.1:{events_port + 1}"), "STORAGE")
        assert chunks_of(tokens, CHUNK) <= reloaded
        assert texts(again, [prompt], MAX_TOKENS) == want
        n_tokens = len(again.tokenize(prompt))
        (total, hit, _), *_ = lookup_lines(again.log_text())
        assert total == n_tokens
        assert hit >= n_tokens // CHUNK * CHUNK > 0
        assert "Retrieved" in again.log_text()


def test_bad_config_key_refuses_to_start(tiny_model: Path, server_factory: Any) -> None:
    """A misspelt key stops the engine with our message naming the closest key."""
    bad = connector_config("kv_both", chunk_sise=64)
    server = server_factory("bad-config", tiny_model, kv_transfer_config=bad)
    server.start()
    with pytest.raises(ServerError):
        server.wait_ready(240)
    assert "chunk_sise: unknown config key; did you mean 'chunk_size'?" in server.log_text()
