"""1P1D with real vLLM engines: prefiller -> our handoff -> decoder, through our proxy.

One prefiller (kv_producer), one decoder (kv_consumer) and one plain engine (the
reference) share this module; the proxy runs as a child process and waits for the
prefiller's ``HandoffDone`` before sending the decoder the request. Greedy tokens must
equal the plain engine's, the decoder must compute at most the last partial chunk, a
missing or dead prefiller costs a recompute (or a clear error with policy ``fail``)
within the deadline without leaking blocks, and mismatched layouts are refused at Hello.

The same two engines also serve the standard vLLM PD contract (what vLLM's proxy example,
Ray Serve LLM and llm-d send), driven by a stdlib client: prefill with only
``do_remote_decode``, decode with the returned ``kv_transfer_params`` unchanged.

Both engines show our figures on their own ``/metrics`` (vLLM's KV-connector stats path)
and the decoder publishes KV events of the chunks it received (``pd_kv_events_port``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import psutil
import pytest

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.config import load_config
from lmcache_pd.integration.vllm.launch import (
    VLLMServer,
    free_port,
    free_port_pair,
    metric_value,
)
from lmcache_pd.layout import preset
from lmcache_pd.protocol import DecodeParams, standard_prefill_params
from lmcache_pd.router.proxy import spawn
from lmcache_pd.sender import OutChunk, Sender
from lmcache_pd.transports.nixl import NixlTransport
from tests.integration.helpers import connector_config, load_lines, start_servers
from tests.integration.observe import chunks_of, kv_events, metric_sum, stored_chunks

CHUNK = 64
MAX_TOKENS = 12
TRANSFER_TIMEOUT_S = 4.0
# prompt lengths in tokens: shorter than a chunk, exact multiples, ragged
LENGTHS = [5, 17, 63, 64, 65, 100, 127, 128, 129, 150, 191, 192]
LENGTHS += [193, 230, 255, 256, 257, 300, 320, 333, 383, 384, 400, 450]


PREFILL_HOLD_TTL_S = 3.0


def producer_config() -> dict[str, Any]:
    return connector_config(
        "kv_producer",
        chunk_size=CHUNK,
        pd_buffer_size=8 << 20,
        pd_lease_ttl_s=PREFILL_HOLD_TTL_S,
    )


def consumer_config(port: int, policy: str = "recompute", events_port: int = 0) -> dict[str, Any]:
    return connector_config(
        "kv_consumer",
        chunk_size=CHUNK,
        pd_buffer_size=8 << 20,
        pd_peer_init_port=port,
        max_local_cpu_size=0.05,
        pd_transfer_timeout_s=TRANSFER_TIMEOUT_S,
        pd_lease_ttl_s=3.0,
        load_failure_policy=policy,
        pd_kv_events_port=events_port,
    )


def bind(core: int) -> dict[str, str]:
    cpus = os.cpu_count() or 1
    return {"VLLM_CPU_OMP_THREADS_BIND": str(core % cpus)} if cpus > 1 else {}


def token_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@dataclass
class PD:
    plain: VLLMServer
    prefiller: VLLMServer
    decoder: VLLMServer
    kv_port: int
    proxy: subprocess.Popen[bytes]
    proxy_url: str
    events_port: int = 0

    def via_proxy(self, prompt: list[int] | str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        resp = httpx.post(f"{self.proxy_url}/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()


@pytest.fixture(scope="module")
def pd(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PD]:
    work = tmp_path_factory.mktemp("disagg")
    kv_port = free_port()
    events_port = free_port_pair(avoid=(kv_port,))  # publisher + replay on the next port
    plain = VLLMServer(tiny_model, work / "plain.log", name="plain")
    # compute on separate cores: engines busy-poll for a second after each step
    prefiller = VLLMServer(
        tiny_model,
        work / "prefiller.log",
        name="prefiller",
        kv_transfer_config=producer_config(),
        env=bind(0),
    )
    decoder = VLLMServer(
        tiny_model,
        work / "decoder.log",
        name="decoder",
        kv_transfer_config=consumer_config(kv_port, events_port=events_port),
        env=bind(1),
    )
    start_servers([plain, prefiller, decoder])
    proxy = None
    try:
        proxy, url = spawn(
            [
                "--prefiller",
                prefiller.url,
                "--decoder",
                decoder.url,
                "--decoder-kv",
                f"127.0.0.1:{kv_port}",
                "--handoff-port",
                "0",
            ]
        )
        yield PD(plain, prefiller, decoder, kv_port, proxy, url, events_port)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for s in (decoder, prefiller, plain):
            s.stop()


def _usage(server: VLLMServer) -> float:
    value = metric_value(server.metrics(), "vllm:kv_cache_usage_perc")
    assert value is not None
    return value


def test_disagg_identical_tokens_and_decoder_computes_only_the_tail(pd: PD) -> None:
    prompts = token_prompts(LENGTHS, seed=21)
    start = len(load_lines(pd.decoder.log_text()))
    for prompt in prompts:
        want = pd.plain.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
        got = pd.via_proxy(prompt)["choices"][0]["text"]
        assert got == want, f"prompt of {len(prompt)} tokens"
    loads = load_lines(pd.decoder.log_text())[start:]
    long_enough = [p for p in prompts if len(p) >= CHUNK]
    assert len(loads) == len(long_enough), loads
    for prompt, load in zip(long_enough, loads, strict=True):
        n = len(prompt)
        assert load["prompt"] == n
        # everything but the last partial chunk came from the prefiller
        assert load["computing"] <= max(n % CHUNK, 1), load
    pushed = pd.prefiller.log_text().count("pushed ")
    assert pushed >= len(long_enough)


def test_our_metrics_on_both_engines_and_decoder_events(pd: PD) -> None:
    """After the 1P1D runs: the handoff's figures on each engine's own /metrics and in
    its log line; the decoder's KV events announce the chunks it received."""
    prompt = token_prompts([3 * CHUNK + 5], seed=31)[0]
    pd.via_proxy(prompt, max_tokens=2)
    prod, cons = {"role": "kv_producer"}, {"role": "kv_consumer"}
    deadline = time.monotonic() + 40
    p_text = d_text = ""
    while time.monotonic() < deadline:  # stats reach the API server after a step
        pd.via_proxy(prompt, max_tokens=2)  # the log line needs activity in its interval
        pd.prefiller.completion("flush", 1)
        p_text, d_text = pd.prefiller.metrics(), pd.decoder.metrics()
        if (
            metric_sum(p_text, "vllm:lmcache_pd_transfer_seconds_count", op="push") > 0
            and metric_sum(d_text, "vllm:lmcache_pd_chunks_received_total") > 0
            and "KV Transfer metrics:" in pd.prefiller.log_text()
            and "KV Transfer metrics:" in pd.decoder.log_text()
        ):
            break
        time.sleep(0.2)
    sent = metric_sum(p_text, "vllm:lmcache_pd_chunks_sent_total", medium="nixl", **prod)
    received = metric_sum(d_text, "vllm:lmcache_pd_chunks_received_total", medium="nixl", **cons)
    assert sent >= 3 and received >= 3
    assert metric_sum(p_text, "vllm:lmcache_pd_bytes_moved_total", **prod) > 0
    assert metric_sum(d_text, "vllm:lmcache_pd_bytes_moved_total", **cons) > 0
    assert metric_sum(p_text, "vllm:lmcache_pd_transfer_bytes_sum", op="push", **prod) > 0
    assert metric_sum(d_text, "vllm:lmcache_pd_tokens_loaded_total", **cons) >= 3 * CHUNK
    assert (
        metric_sum(d_text, "vllm:lmcache_pd_transfer_seconds_count", op="load", medium="buffer") > 0
    )
    assert metric_sum(d_text, "vllm:lmcache_pd_tier_bytes_written_total", medium="cpu") > 0
    assert metric_sum(d_text, "vllm:lmcache_pd_checksum_failures_total") == 0
    assert "KV Transfer metrics:" in pd.prefiller.log_text()
    assert "KV Transfer metrics:" in pd.decoder.log_text()
    events = kv_events(f"tcp://127.0.0.1:{pd.events_port + 1}")
    assert chunks_of(prompt, CHUNK) <= stored_chunks(events, "CPU")


def test_idle_engines_do_not_spin(pd: PD) -> None:
    """No busy-polling threads: idle prefiller and decoder stay near 0 % CPU."""
    # let the last test's requests finish and vLLM's own 1 s busy loop after its last
    # step run out before the window opens (otherwise it alone reads as ~20 %)
    time.sleep(2.5)
    groups = {}
    for s in (pd.prefiller, pd.decoder):
        assert s.proc is not None
        root = psutil.Process(s.proc.pid)
        groups[s.name] = [root, *root.children(recursive=True)]
        for p in groups[s.name]:
            p.cpu_percent(None)
    time.sleep(5.0)
    for name, procs in groups.items():
        total = sum(p.cpu_percent(None) for p in procs if p.is_running())
        assert total < 15.0, f"{name} burns {total:.0f} % CPU while idle"


def test_missing_chunks_recompute_within_deadline(pd: PD) -> None:
    """Chunks announced by a prefiller that never delivers: the decoder waits at most
    pd_transfer_timeout_s, recomputes, answers correctly and frees every block."""
    before = _usage(pd.decoder)
    prompt = token_prompts([200], seed=22)[0]
    want = pd.plain.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
    params = DecodeParams(req_id="ghost-1", lmcache_pd_chunks=3, lmcache_pd_sent=True).to_dict()
    t0 = time.monotonic()
    got = pd.decoder.completion(prompt, MAX_TOKENS, kv_transfer_params=params)
    elapsed = time.monotonic() - t0
    assert got["choices"][0]["text"] == want
    assert TRANSFER_TIMEOUT_S - 0.5 <= elapsed <= TRANSFER_TIMEOUT_S + 15, elapsed
    log_text = pd.decoder.log_text()
    assert "only 0 of 3 chunks arrived" in log_text
    assert "reporting" in log_text and "invalid" in log_text
    deadline = time.monotonic() + 10
    while _usage(pd.decoder) > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _usage(pd.decoder) <= before


def test_fail_policy_returns_clear_error(tiny_model: Path, server_factory: Any, pd: PD) -> None:
    decoder = server_factory(
        "decoder-fail",
        tiny_model,
        kv_transfer_config=consumer_config(free_port(), policy="fail"),
    )
    with decoder:
        before = _usage(decoder)
        prompt = token_prompts([200], seed=23)[0]
        params = DecodeParams(req_id="ghost-2", lmcache_pd_chunks=3, lmcache_pd_sent=True).to_dict()
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "kv_transfer_params": params,
        }
        t0 = time.monotonic()
        resp = httpx.post(f"{decoder.url}/v1/completions", json=body, timeout=60)
        elapsed = time.monotonic() - t0
        assert elapsed <= TRANSFER_TIMEOUT_S + 15
        failed = resp.status_code >= 400 or any(
            c.get("finish_reason") not in ("length", "stop") for c in resp.json()["choices"]
        )
        assert failed, resp.text
        assert "load_failure_policy=fail" in decoder.log_text()
        assert _usage(decoder) <= before


def test_layout_mismatch_refused_at_hello(tiny_model: Path, server_factory: Any, pd: PD) -> None:
    """A bf16 prefiller cannot push into the fp32 decoder: Hello names the field."""
    bf16 = server_factory(
        "prefiller-bf16", tiny_model, kv_transfer_config=producer_config(), dtype="bfloat16"
    )
    with bf16:
        prompt = token_prompts([150], seed=24)[0]
        params = {
            "do_remote_decode": True,
            "req_id": "mismatch-1",
            "decoder_host": "127.0.0.1",
            "decoder_init_port": pd.kv_port,
        }
        bf16.completion(prompt, 1, kv_transfer_params=params)
        deadline = time.monotonic() + 30
        while "push to" not in bf16.log_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        failure = [ln for ln in bf16.log_text().splitlines() if "push to" in ln]
        assert failure and "failed" in failure[0], failure
        assert "dtype" in failure[0], failure[0]


# --- the standard vLLM PD contract, spoken by a stdlib client (no proxy of ours) -------


def post_json(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def contract_request(pd: PD, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """What vLLM's proxy example, Ray Serve LLM and llm-d do: prefill with max_tokens 1
    and ``do_remote_decode``, then decode with the returned params, unchanged."""
    prefill = dict(body, max_tokens=1, stream=False, kv_transfer_params=standard_prefill_params())
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    returned = post_json(pd.prefiller.url + path, prefill).get("kv_transfer_params")
    decode = dict(body, kv_transfer_params=returned)
    return post_json(pd.decoder.url + path, decode), returned


def test_standard_contract_identical_tokens_and_decoder_computes_only_the_tail(pd: PD) -> None:
    prompts = token_prompts(LENGTHS, seed=31)
    start = len(load_lines(pd.decoder.log_text()))
    for prompt in prompts:
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        want = pd.plain.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
        got, returned = contract_request(pd, "/v1/completions", body)
        assert got["choices"][0]["text"] == want, f"prompt of {len(prompt)} tokens"
        params = DecodeParams.from_request(returned)
        assert params is not None
        if len(prompt) >= CHUNK:
            assert params.pulls and params.lmcache_pd_chunks == len(prompt) // CHUNK
    loads = load_lines(pd.decoder.log_text())[start:]
    long_enough = [p for p in prompts if len(p) >= CHUNK]
    assert len(loads) == len(long_enough), loads
    for prompt, load in zip(long_enough, loads, strict=True):
        assert load["source"] == "fetch", load
        assert load["computing"] <= max(len(prompt) % CHUNK, 1), load
    assert pd.decoder.log_text().count("fetched ") >= len(long_enough)


def test_standard_contract_chat(pd: PD) -> None:
    words = "the cache token prefill decode chunk layer tensor engine request block".split()
    rng = random.Random(32)
    for n in (40, 90, 150, 220):
        messages = [
            {"role": "system", "content": "answer briefly"},
            {"role": "user", "content": " ".join(rng.choice(words) for _ in range(n))},
        ]
        body = {
            "model": "tiny",
            "messages": messages,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        want = post_json(pd.plain.url + "/v1/chat/completions", body)
        got, returned = contract_request(pd, "/v1/chat/completions", body)
        assert got["choices"][0]["message"] == want["choices"][0]["message"]
        assert DecodeParams.from_request(returned) is not None


def _fresh_prompt(seed: int, n: int = 200) -> list[int]:
    return token_prompts([n], seed=seed)[0]


def _decode_with(pd: PD, prompt: list[int], params: object) -> str:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "kv_transfer_params": params,
    }
    return post_json(pd.decoder.url + "/v1/completions", body)["choices"][0]["text"]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"do_remote_prefill": True, "lmcache_pd_chunks": "three"}, "lmcache_pd_chunks"),
        (
            {"do_remote_prefill": True, "lmcache_pd_hold": "h", "lmcache_pd_chunks": 3},
            "lmcache_pd_pull_ports",
        ),
        ({"do_remote_prefill": True, "remote_port": "x"}, "remote_port"),
    ],
)
def test_malformed_decode_params_recompute_and_name_the_field(
    pd: PD, params: dict[str, Any], named: str
) -> None:
    before = _usage(pd.decoder)
    prompt = _fresh_prompt(33)
    want = pd.plain.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
    assert _decode_with(pd, prompt, params) == want
    lines = [ln for ln in pd.decoder.log_text().splitlines() if "recomputing its prompt" in ln]
    assert lines and named in lines[-1], lines[-1:]
    assert _usage(pd.decoder) <= before + 1e-9


def test_unknown_and_expired_holds_recompute_without_leaks(pd: PD) -> None:
    """A hold that was never issued, or that expired on the prefiller (pd_lease_ttl_s),
    is refused; the decoder recomputes within its deadline and nothing leaks."""
    prompt = _fresh_prompt(34)
    want = pd.plain.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    returned = post_json(
        pd.prefiller.url + "/v1/completions",
        dict(body, kv_transfer_params=standard_prefill_params()),
    )["kv_transfer_params"]
    forged = dict(returned, lmcache_pd_hold="0" * 32)
    t0 = time.monotonic()
    assert _decode_with(pd, prompt, forged) == want
    assert time.monotonic() - t0 < 10
    assert "refused: no held KV" in pd.decoder.log_text()
    # the real hold is never fetched: it expires on the prefiller and frees its slots
    dropped = f"held KV {returned['lmcache_pd_hold']} ("
    deadline = time.monotonic() + PREFILL_HOLD_TTL_S + 10
    while dropped not in pd.prefiller.log_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert dropped in pd.prefiller.log_text()
    assert "dropped: not fetched" in pd.prefiller.log_text()
    assert _decode_with(pd, prompt, returned) == want  # the expired hold: recomputed
    assert _usage(pd.decoder) < 0.01


def test_corrupted_chunk_is_caught_by_the_scatter_and_recomputed(
    tiny_model: Path, server_factory: Any, pd: PD
) -> None:
    """A decoder without a tier, so the engine's scatter is a chunk's first read: chunks
    pushed (by this test, a real sender) whose bytes do not match their kvsum64 digests
    are caught by the checksum fused into vLLM's CPU-page scatter, their blocks reported
    invalid and recomputed: the plain engine's tokens, the failure counted and logged.
    The bytes are plausible KV (random normal floats): loaded, they would change the
    tokens."""
    port = free_port()
    config = connector_config(
        "kv_consumer",
        chunk_size=CHUNK,
        pd_buffer_size=8 << 20,
        pd_peer_init_port=port,
        local_cpu=False,
        load_failure_policy="recompute",
    )
    decoder = server_factory("decoder-nostore", tiny_model, kv_transfer_config=config)
    prompt = token_prompts([3 * CHUNK + 10], seed=41)[0]
    want = pd.plain.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
    layout = msgspec.structs.replace(preset("tiny"), model=str(tiny_model))
    slot_bytes = layout.bytes_per_chunk(CHUNK)
    cfg = load_config(overrides={"chunk_size": CHUNK, "pd_buffer_size": 4 * slot_bytes})
    keys = ChunkHasher(layout.fingerprint(), CHUNK, cfg.hash_algorithm).keys(prompt)
    assert len(keys) == 3
    with decoder:
        transport = NixlTransport("corrupting-prefiller")
        tx = Sender(cfg, layout, transport)
        slots = tx.alloc(len(keys))
        try:
            rng = np.random.default_rng(41)
            chunks = []
            for key, slot in zip(keys, slots, strict=True):
                view = np.frombuffer(tx.buffer.view(slot, slot_bytes), dtype=np.uint8)
                view[:] = rng.standard_normal(slot_bytes // 4).astype(np.float32).view(np.uint8)
                chunks.append(OutChunk(key, slot, slot_bytes, tx.checksum(slot, slot_bytes)))
                view[1001] ^= 0x10  # damaged after the digest was taken
            res = tx.send(f"tcp://127.0.0.1:{port}", "corrupt-1", chunks)
            assert (res.sent, res.bad) == (3, 0)  # the receiver does not hash on landing
        finally:
            tx.free(slots)
            tx.close()
            transport.close()
        got = decoder.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
        assert got == want
        log_text = decoder.log_text()
        assert "failed their kvsum64 checksum" in log_text, log_text[-3000:]
        assert "found by the engine's load" in log_text
        assert "not loaded; reporting" in log_text
        failures = 0.0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # stats reach the API server after a step
            decoder.completion("flush", 1)
            failures = metric_sum(decoder.metrics(), "vllm:lmcache_pd_checksum_failures_total")
            if failures:
                break
            time.sleep(0.3)
        assert failures == 1  # the first chunk; the prefix ends there, the rest is unread


def test_dead_prefiller_falls_back_to_decoder(pd: PD) -> None:
    """Runs last: kills the prefiller. The proxy falls back, the decoder recomputes."""
    pd.prefiller.kill()
    for prompt in token_prompts([90, 200], seed=25):
        want = pd.plain.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
        t0 = time.monotonic()
        got = pd.via_proxy(prompt)["choices"][0]["text"]
        assert got == want
        assert time.monotonic() - t0 < 60
    assert _usage(pd.decoder) == 0.0 or _usage(pd.decoder) < 0.01
