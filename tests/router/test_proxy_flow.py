"""Two-step flow, passthrough and routing through a real proxy (uvicorn on 127.0.0.1).

The engines are stub OpenAI servers (real HTTP servers that record what they receive).
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx

from lmcache_pd.router.kv_params import KVTransferParams

PROMPT = "the quick brown fox jumps over the lazy dog " * 4  # 36 words = 36 tokens


def test_two_step_flow_order_and_params(stubs, proxy, client, journal) -> None:
    p = stubs("P")
    d = stubs("D")
    h = proxy(["--prefiller", p.url, "--decoder", d.url, "--decoder-kv", "10.0.0.7:7455"])
    body = {
        "model": "m",
        "prompt": PROMPT,
        "max_tokens": 7,
        "temperature": 0,
        "return_token_ids": True,
        "ignore_eos": True,
        "priority": 3,
        "stream_options": {"include_usage": True},
        "min_tokens": 2,
        "n": 2,
    }
    r = client.post(h.url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["id"].startswith("cmpl-D")

    assert [(name, path) for name, path, _ in journal] == [
        ("P", "/v1/completions"),
        ("D", "/v1/completions"),
    ]
    pre = journal[0][2]
    assert pre["max_tokens"] == 1 and pre["stream"] is False
    assert "stream_options" not in pre and "min_tokens" not in pre and "n" not in pre
    sent = pre["kv_transfer_params"]
    assert set(sent) == set(KVTransferParams.__struct_fields__)
    assert sent["do_remote_decode"] is True
    assert (sent["decoder_host"], sent["decoder_init_port"]) == ("10.0.0.7", 7455)
    assert sent["proxy_notify"] is None  # HTTP-only flow
    for key in ("return_token_ids", "ignore_eos", "priority", "temperature", "model"):
        assert pre[key] == body[key]

    dec = journal[1][2]
    assert {k: v for k, v in dec.items() if k != "kv_transfer_params"} == body
    params = dec["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["req_id"] == sent["req_id"]
    assert params["remote_engine_id"] == "P"  # what the prefiller returned is forwarded


def test_chat_messages_passed_unchanged_to_both(stubs, proxy, client, journal) -> None:
    p, d = stubs("P"), stubs("D")
    h = proxy(["--prefiller", p.url, "--decoder", d.url])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.post(
        h.url + "/v1/chat/completions",
        json={"model": "m", "messages": messages, "max_completion_tokens": 9},
    )
    assert r.status_code == 200
    assert r.json()["object"] == "chat.completion"
    pre, dec = journal[0][2], journal[1][2]
    assert pre["messages"] == messages == dec["messages"]
    assert pre["max_completion_tokens"] == 1 and pre["max_tokens"] == 1
    assert dec["max_completion_tokens"] == 9 and "max_tokens" not in dec
    # the decoder default port: decoder host, 7300 + index
    assert pre["kv_transfer_params"]["decoder_init_port"] == 7300


def test_streaming_passthrough_is_byte_identical(stubs, proxy, client) -> None:
    p = stubs("P")
    d = stubs("D", stream_chunks=12, stream_interval_s=0.005)
    h = proxy(["--prefiller", p.url, "--decoder", d.url])
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = {"model": "m", "stream": True, "max_tokens": 12}
        body.update(
            {"prompt": PROMPT}
            if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": PROMPT}]}
        )
        direct = client.post(d.url + path, json=body)
        via = client.post(h.url + path, json=body)
        assert via.status_code == 200
        assert via.headers["content-type"] == direct.headers["content-type"]
        assert via.content == direct.content
        assert via.content.endswith(b"data: [DONE]\n\n")
        # the prefill step was not streamed
        assert p.requests[-1][1]["stream"] is False


def test_non_stream_error_passthrough_and_models(stubs, proxy, client) -> None:
    p, d = stubs("P"), stubs("D")
    h = proxy(["--prefiller", p.url, "--decoder", d.url])
    assert client.get(h.url + "/v1/models").json()["data"][0]["id"] == "stub"
    health = client.get(h.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    d.fail_status = 422  # an engine 4xx comes back unchanged
    r = client.post(h.url + "/v1/completions", json={"prompt": "x y z"})
    assert r.status_code == 422 and r.json()["error"]["message"] == "stub"
    metrics = client.get(h.url + "/metrics").text
    for name in (
        "lmcache_pd_proxy_requests_total",
        "lmcache_pd_proxy_errors_total",
        "lmcache_pd_proxy_prefill_seconds_bucket",
        "lmcache_pd_proxy_engine_inflight",
        "lmcache_pd_proxy_handoff_wait_seconds",
    ):
        assert name in metrics


def test_short_prompts_skip_the_prefill_hop(stubs, proxy, client, journal) -> None:
    p, d = stubs("P"), stubs("D")
    h = proxy(["--prefiller", p.url, "--decoder", d.url, "--disagg-min-tokens", "10"])
    client.post(h.url + "/v1/completions", json={"prompt": "two words"})
    assert [n for n, *_ in journal] == ["D"]
    assert "kv_transfer_params" not in d.requests[-1][1]
    client.post(h.url + "/v1/completions", json={"prompt": PROMPT})
    assert [n for n, *_ in journal] == ["D", "P", "D"]
    text = client.get(h.url + "/metrics").text
    assert 'mode="direct"} 1.0' in text and 'mode="disagg"} 1.0' in text


def _affinity_prompt(i: int) -> str:
    return "shared system prompt " * 8 + f"question number {i} please"


def test_cache_aware_affinity_and_spread(stubs, proxy, client) -> None:
    decoders = [stubs(f"D{i}") for i in range(3)]
    p = stubs("P")
    h = proxy(
        [
            "--prefiller",
            p.url,
            "--decoder",
            ",".join(d.url for d in decoders),
            "--policy",
            "cache_aware",
        ],
        config={"chunk_size": 4},
    )
    for i in range(6):
        r = client.post(h.url + "/v1/completions", json={"prompt": _affinity_prompt(i)})
        assert r.status_code == 200
    got = [d.served for d in decoders]
    assert sorted(got) == [0, 0, 6], got  # the shared prefix sticks to one decoder

    for d in decoders:
        d.served = 0
    for i in range(9):
        client.post(h.url + "/v1/completions", json={"prompt": f"unrelated {i} " * 6})
    assert [d.served for d in decoders] == [3, 3, 3]  # unrelated prompts spread


def test_load_guard_overrides_affinity(stubs, proxy) -> None:
    decoders = [stubs(f"D{i}", delay_s=0.6) for i in range(2)]
    p = stubs("P")
    h = proxy(
        [
            "--prefiller",
            p.url,
            "--decoder",
            ",".join(d.url for d in decoders),
            "--policy",
            "cache_aware",
        ],
        config={"chunk_size": 4},
        load_guard_factor=2.0,
    )
    with httpx.Client(trust_env=False, timeout=20) as c:
        c.post(h.url + "/v1/completions", json={"prompt": _affinity_prompt(0)})
        home = max(decoders, key=lambda d: d.served)
        with cf.ThreadPoolExecutor(6) as pool:
            codes = list(
                pool.map(
                    lambda i: (
                        c.post(
                            h.url + "/v1/completions", json={"prompt": _affinity_prompt(i)}
                        ).status_code
                    ),
                    range(1, 7),
                )
            )
        assert codes == [200] * 6
        other = next(d for d in decoders if d is not home)
        assert other.served >= 1, "load guard never sent the hot prefix elsewhere"
        assert 'reason="load_guard"' in c.get(h.url + "/metrics").text
