"""2P2D with real vLLM engines: two prefillers and two decoders behind one proxy.

The proxy is started as a user would (``lmcache-pd proxy`` with repeated
``--prefiller`` / ``--decoder`` / ``--decoder-kv``, round robin). 32 requests, mixing
completions and chat, streaming and not, run four at a time, so both prefillers push to
both decoders concurrently. Checked: greedy tokens equal one plain engine's; every
prefiller and every decoder served at least a quarter of the requests (vLLM's own
``request_success`` counters); every decoder received KV
(``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}``) and computed at
most the last partial chunk of each prompt; no request fell back to decode-only; no
request waited for a transfer deadline. A prefiller told to push to a decoder KV
endpoint nobody listens on fails within ``pd_connect_timeout_s`` and the proxy serves
the request decode-only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcache_pd.integration.vllm.launch import VLLMServer, free_port, metric_value
from lmcache_pd.integration.vllm.tiny_model import prompts as make_prompts
from lmcache_pd.router.proxy import spawn
from tests.integration.helpers import connector_config, load_lines, start_servers

CHUNK = 64
MAX_TOKENS = 8
REQUESTS = 32
CONCURRENCY = 4
TRANSFER_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 3.0  # prefillers: a decoder's control port must answer within this
# no stall: one request of ours takes ~1 s here; a missed handoff waits 20 s
REQUEST_LIMIT_S = TRANSFER_TIMEOUT_S - 5.0


def _cores(i: int) -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": str(i % 2)}


@dataclass
class XPYD:
    plain: VLLMServer
    prefillers: list[VLLMServer]
    decoders: list[VLLMServer]
    proxy_url: str


@pytest.fixture(scope="module")
def xpyd(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[XPYD]:
    work = tmp_path_factory.mktemp("xpyd")
    common = {"chunk_size": CHUNK, "pd_buffer_size": 8 << 20}
    plain = VLLMServer(tiny_model, work / "plain.log", name="plain")
    prefillers = [
        VLLMServer(
            tiny_model,
            work / f"prefiller{i}.log",
            name=f"prefiller{i}",
            kv_transfer_config=connector_config(
                "kv_producer", **common, pd_connect_timeout_s=CONNECT_TIMEOUT_S
            ),
            env=_cores(0),  # prefillers on core 0, decoders on core 1
        )
        for i in range(2)
    ]
    kv_ports = [free_port() for _ in range(2)]
    decoders = [
        VLLMServer(
            tiny_model,
            work / f"decoder{i}.log",
            name=f"decoder{i}",
            kv_transfer_config=connector_config(
                "kv_consumer",
                **common,
                pd_peer_init_port=kv_ports[i],
                max_local_cpu_size=0.05,
                pd_transfer_timeout_s=TRANSFER_TIMEOUT_S,
            ),
            env=_cores(1),
        )
        for i in range(2)
    ]
    start_servers([plain, *prefillers, *decoders])
    proxy = None
    try:
        argv = [a for p in prefillers for a in ("--prefiller", p.url)]
        for d, port in zip(decoders, kv_ports, strict=True):
            argv += ["--decoder", d.url, "--decoder-kv", f"127.0.0.1:{port}"]
        proxy, url = spawn([*argv, "--handoff-port", "0"])
        yield XPYD(plain, prefillers, decoders, url)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for s in (*decoders, *prefillers, plain):
            s.stop()


def _body(kind: int, prompt: str) -> tuple[str, dict[str, Any]]:
    """Request ``kind`` 0..3: completions / chat, each non-streaming and streaming."""
    chat = kind >= 2
    body: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": kind % 2 == 1,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def _text(path: str, body: dict[str, Any], resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text[:500]
    chat = path.endswith("chat/completions")
    if not body.get("stream"):
        choice = resp.json()["choices"][0]
        return str(choice["message"]["content"] if chat else choice["text"])
    parts = []
    done = False
    for line in resp.text.splitlines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            continue
        for choice in json.loads(data)["choices"]:
            if chat:
                parts.append((choice.get("delta") or {}).get("content") or "")
            else:
                parts.append(choice["text"])
    assert done, "stream ended without [DONE]"
    return "".join(parts)


def _post(url: str, path: str, body: dict[str, Any]) -> tuple[str, float]:
    t0 = time.monotonic()
    resp = httpx.post(url + path, json=body, timeout=120)
    return _text(path, body, resp), time.monotonic() - t0


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def _counts(server: VLLMServer) -> tuple[float, float]:
    """(finished requests, prompt tokens loaded from an external KV transfer)."""
    text = server.metrics()
    done = metric_value(text, "vllm:request_success_total") or 0.0
    ext = _sample(text, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    return done, ext


def test_2p2d_mixed_requests_identical_and_spread(xpyd: XPYD) -> None:
    texts = make_prompts(REQUESTS, seed=41, min_words=70, max_words=160)
    jobs = [_body(i % 4, p) for i, p in enumerate(texts)]
    want = []
    for path, body in jobs:
        want.append(_post(xpyd.plain.url, path, {**body, "stream": False})[0])
    engines = [*xpyd.prefillers, *xpyd.decoders]
    before = {s.name: _counts(s) for s in engines}
    log_start = {s.name: len(load_lines(s.log_text())) for s in xpyd.decoders}

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        got = list(pool.map(lambda job: _post(xpyd.proxy_url, *job), jobs))

    for i, ((text, seconds), expected) in enumerate(zip(got, want, strict=True)):
        assert text == expected, f"request {i} ({jobs[i][0]}, stream={jobs[i][1]['stream']})"
        assert seconds < REQUEST_LIMIT_S, f"request {i} took {seconds:.1f}s (a stalled handoff)"
    after = {s.name: _counts(s) for s in engines}
    served = {name: after[name][0] - before[name][0] for name in after}
    for name, n in served.items():
        assert n >= REQUESTS / 4, f"{name} served {n} of {REQUESTS}: {served}"
    assert sum(served[p.name] for p in xpyd.decoders) == REQUESTS, served

    for d in xpyd.decoders:
        received = after[d.name][1] - before[d.name][1]
        assert received > 0, f"{d.name} loaded no KV from a transfer"
        loads = load_lines(d.log_text())[log_start[d.name] :]
        assert len(loads) == served[d.name], loads
        for load in loads:
            # everything but the last partial chunk came from a prefiller
            assert load["computing"] <= max(load["prompt"] % CHUNK, 1), (d.name, load)
            assert load["loading"] >= load["prompt"] - CHUNK, (d.name, load)
        text = d.log_text()
        assert "no Done within" not in text and "chunks arrived within" not in text, d.name

    proxy_metrics = httpx.get(xpyd.proxy_url + "/metrics", timeout=10).text
    assert _sample(proxy_metrics, "lmcache_pd_proxy_decode_only_fallbacks_total") == 0
    pushes = [p.log_text().count("pushed ") for p in xpyd.prefillers]
    assert all(n >= REQUESTS / 4 for n in pushes), pushes


def test_push_to_unreachable_decoder_falls_back_to_decode_only(xpyd: XPYD) -> None:
    """The proxy names a decoder KV endpoint nobody listens on: the prefiller's push
    fails within pd_connect_timeout_s, its HandoffDone says so, the proxy decodes
    without KV params and the decoder recomputes: same tokens, one fallback counted."""
    prefiller, decoder = xpyd.prefillers[0], xpyd.decoders[0]
    dead = free_port()
    proxy, url = spawn(
        [
            *("--prefiller", prefiller.url, "--decoder", decoder.url),
            *("--decoder-kv", f"127.0.0.1:{dead}", "--handoff-port", "0"),
        ]
    )
    try:
        prompt = make_prompts(1, seed=43, min_words=90, max_words=90)[0]
        path, body = _body(0, prompt)
        want = _post(xpyd.plain.url, path, body)[0]
        got, seconds = _post(url, path, body)
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        proxy.terminate()
        proxy.wait(10)
    assert got == want
    assert seconds < CONNECT_TIMEOUT_S + 10, seconds
    assert _sample(metrics, "lmcache_pd_proxy_decode_only_fallbacks_total") == 1
    failures = [
        ln for ln in prefiller.log_text().splitlines() if "push to" in ln and f":{dead}" in ln
    ]
    assert failures and "failed" in failures[-1], failures
