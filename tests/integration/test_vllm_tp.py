"""Tensor parallelism with real vLLM engines: same and mixed TP, push-ahead and pull.

A tiny random Llama with 4 KV heads. Prefillers at TP 1 and 2, decoders at TP 1 and 2
(vLLM CPU, each TP rank bound to its own core with ``VLLM_CPU_OMP_THREADS_BIND=0|1``).
For each shape 1->1, 2->2, 2->1, 1->2:

- through our proxy (push-ahead): greedy tokens identical to one TP=1 engine, the
  decoder loaded the prompt from the transfer (``external_kv_transfer`` tokens, its load
  lines) and computed at most the last partial chunk;
- through the standard vLLM PD contract (prefill with ``do_remote_decode``, decode with
  the returned params, as Ray Serve / llm-d drive it): the same, every load a ``fetch``.

At mixed TP each decoder rank assembles its KV heads from the prefiller ranks' pieces
(:mod:`lmcache_pd.tp`); a chunk missing a piece is never loaded.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lmcache_pd.integration.vllm.launch import VLLMServer, free_port_pair
from lmcache_pd.integration.vllm.tiny_model import TinySpec, make_tiny_model
from lmcache_pd.integration.vllm.tiny_model import prompts as make_prompts
from lmcache_pd.protocol import DecodeParams, standard_prefill_params
from lmcache_pd.router.proxy import spawn
from tests.integration.helpers import connector_config, load_lines, start_servers

CHUNK = 32
MAX_TOKENS = 8
SHAPES = [(1, 1), (2, 2), (2, 1), (1, 2)]
SPEC = TinySpec(kv_heads=4)  # 4 KV heads: 2 per rank at TP=2


@dataclass
class Fleet:
    plain: VLLMServer
    prefillers: dict[int, VLLMServer]  # by TP size
    decoders: dict[int, VLLMServer]
    kv_ports: dict[int, int]  # decoder TP size -> its rank 0 control port
    proxies: dict[tuple[int, int], str]  # (prefill TP, decode TP) -> proxy URL


def _tp_args(tp: int) -> tuple[list[str], dict[str, str], int]:
    """(extra args, env, KV cache GiB) of an engine at TP ``tp`` on this 2-core box."""
    if tp == 1:
        return [], {}, 1
    return ["--tensor-parallel-size", str(tp)], {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, 1


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("tp")
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-4kv"), SPEC)
    common = {"chunk_size": CHUNK, "pd_buffer_size": 8 << 20, "pd_transfer_timeout_s": 20.0}
    plain = VLLMServer(
        model, work / "plain.log", name="plain", env={"VLLM_CPU_OMP_THREADS_BIND": "0"}
    )
    prefillers, decoders, kv_ports = {}, {}, {}
    for tp, core in ((1, "0"), (2, None)):
        args, env, gib = _tp_args(tp)
        prefillers[tp] = VLLMServer(
            model,
            work / f"prefiller-tp{tp}.log",
            name=f"prefiller-tp{tp}",
            kv_transfer_config=connector_config("kv_producer", **common, pd_lease_ttl_s=20.0),
            env=env or {"VLLM_CPU_OMP_THREADS_BIND": core or "0"},
            extra_args=args,
            kv_cache_space_gb=gib,
        )
    for tp, core in ((1, "1"), (2, None)):
        args, env, gib = _tp_args(tp)
        kv_ports[tp] = free_port_pair()  # rank r listens on port + r
        decoders[tp] = VLLMServer(
            model,
            work / f"decoder-tp{tp}.log",
            name=f"decoder-tp{tp}",
            kv_transfer_config=connector_config(
                "kv_consumer", **common, pd_peer_init_port=kv_ports[tp], max_local_cpu_size=0.05
            ),
            env=env or {"VLLM_CPU_OMP_THREADS_BIND": core or "1"},
            extra_args=args,
            kv_cache_space_gb=gib,
        )
    start_servers([plain, *prefillers.values(), *decoders.values()], timeout_s=600)
    procs = []
    try:
        proxies = {}
        for p_tp, d_tp in SHAPES:
            argv = ["--prefiller", prefillers[p_tp].url, "--decoder", decoders[d_tp].url]
            argv += ["--decoder-kv", f"127.0.0.1:{kv_ports[d_tp]}", "--handoff-port", "0"]
            proc, url = spawn(argv)
            procs.append(proc)
            proxies[(p_tp, d_tp)] = url
        yield Fleet(plain, prefillers, decoders, kv_ports, proxies)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        for s in (*decoders.values(), *prefillers.values(), plain):
            s.stop()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        out: dict[str, Any] = json.loads(resp.read())
    return out


def _body(prompt: str) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
    }


def _check_loads(decoder: VLLMServer, start: int, count: int, sources: set[str]) -> None:
    loads = load_lines(decoder.log_text())[start:]
    assert len(loads) == count, loads
    for load in loads:
        assert load["source"] in sources, load
        assert load["loading"] >= load["prompt"] - CHUNK, load  # the KV came from afar
        assert load["computing"] <= max(load["prompt"] % CHUNK, 1), load  # only the tail
    text = decoder.log_text()
    assert "chunks arrived within" not in text and "fetching its KV failed" not in text


@pytest.mark.parametrize(("p_tp", "d_tp"), SHAPES, ids=[f"tp{p}-tp{d}" for p, d in SHAPES])
def test_proxy_push_ahead_identical_across_tp_shapes(fleet: Fleet, p_tp: int, d_tp: int) -> None:
    prompts = make_prompts(4, seed=60 + 10 * p_tp + d_tp, min_words=40, max_words=120)
    decoder = fleet.decoders[d_tp]
    start = len(load_lines(decoder.log_text()))
    for prompt in prompts:
        want = _post(fleet.plain.url + "/v1/completions", _body(prompt))["choices"][0]["text"]
        got = _post(fleet.proxies[(p_tp, d_tp)] + "/v1/completions", _body(prompt))
        assert got["choices"][0]["text"] == want, prompt[:60]
    # "transfer": a TP>1 prefiller's other ranks may still be landing when the proxy
    # hears from its rank 0, so the decoder waits for them
    _check_loads(decoder, start, len(prompts), {"held", "transfer"})


@pytest.mark.parametrize(("p_tp", "d_tp"), SHAPES, ids=[f"tp{p}-tp{d}" for p, d in SHAPES])
def test_standard_contract_identical_across_tp_shapes(fleet: Fleet, p_tp: int, d_tp: int) -> None:
    prompts = make_prompts(3, seed=80 + 10 * p_tp + d_tp, min_words=40, max_words=120)
    prefiller, decoder = fleet.prefillers[p_tp], fleet.decoders[d_tp]
    start = len(load_lines(decoder.log_text()))
    for prompt in prompts:
        want = _post(fleet.plain.url + "/v1/completions", _body(prompt))["choices"][0]["text"]
        prefill = dict(_body(prompt), max_tokens=1, kv_transfer_params=standard_prefill_params())
        params = _post(prefiller.url + "/v1/completions", prefill)["kv_transfer_params"]
        parsed = DecodeParams.from_request(params)
        assert parsed is not None and parsed.pulls and parsed.lmcache_pd_tp_size == p_tp
        got = _post(decoder.url + "/v1/completions", dict(_body(prompt), kv_transfer_params=params))
        assert got["choices"][0]["text"] == want, prompt[:60]
    _check_loads(decoder, start, len(prompts), {"fetch"})
