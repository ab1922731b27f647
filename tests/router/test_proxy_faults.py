"""Faults through a real proxy: dead engines, deadlines, bad bodies, client disconnects."""

from __future__ import annotations

import time

import httpx
import pytest

PROMPT = "one two three four five six seven eight nine ten"


def _metric(client: httpx.Client, url: str, prefix: str) -> float:
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_dead_prefiller_is_retried_on_another(stubs, proxy, client, dead_url) -> None:
    p = stubs("P")
    d = stubs("D")
    h = proxy(["--prefiller", f"{dead_url()},{p.url}", "--decoder", d.url])
    for _ in range(4):
        r = client.post(h.url + "/v1/completions", json={"prompt": PROMPT})
        assert r.status_code == 200
        assert d.requests[-1][1]["kv_transfer_params"]["do_remote_prefill"] is True
    assert p.served == 4
    assert _metric(client, h.url, "lmcache_pd_proxy_decode_only_fallbacks_total") == 0


def test_failing_prefillers_fall_back_to_decode_only(stubs, proxy, client, dead_url) -> None:
    bad = stubs("P500", fail_status=500)
    d = stubs("D")
    h = proxy(["--prefiller", f"{dead_url()},{bad.url}", "--decoder", d.url])
    for i in range(3):
        r = client.post(h.url + "/v1/completions", json={"prompt": PROMPT, "stream": i == 2})
        assert r.status_code == 200, r.text  # no failed request
        assert "kv_transfer_params" not in d.requests[-1][1]  # decoder recomputes
    assert _metric(client, h.url, "lmcache_pd_proxy_decode_only_fallbacks_total") == 3
    assert _metric(client, h.url, 'lmcache_pd_proxy_errors_total{kind="prefill_failed"}') >= 3
    assert (
        _metric(
            client,
            h.url,
            'lmcache_pd_proxy_requests_total{endpoint="/v1/completions",mode="fallback"}',
        )
        == 3
    )


def test_prefiller_timeout_counts_as_failure(stubs, proxy, client) -> None:
    slow = stubs("Pslow", delay_s=5.0)
    d = stubs("D")
    h = proxy(["--prefiller", slow.url, "--decoder", d.url], prefill_timeout_s=0.3)
    t0 = time.monotonic()
    r = client.post(h.url + "/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 200 and time.monotonic() - t0 < 3
    assert "kv_transfer_params" not in d.requests[-1][1]


def test_dead_decoder_gives_503_within_deadline(stubs, proxy, client, dead_url) -> None:
    p = stubs("P")
    h = proxy(["--prefiller", p.url, "--decoder", dead_url()])
    t0 = time.monotonic()
    r = client.post(h.url + "/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 503
    assert time.monotonic() - t0 < 2.0
    err = r.json()["error"]
    assert err["code"] == 503 and "decoder" in err["message"]
    # now ejected: the next one is refused at once, and /health says so
    assert client.post(h.url + "/v1/completions", json={"prompt": PROMPT}).status_code == 503
    assert client.get(h.url + "/health").status_code == 503


def test_dead_decoder_fails_over_to_another(stubs, proxy, client, dead_url) -> None:
    p, d = stubs("P"), stubs("D")
    h = proxy(["--prefiller", p.url, "--decoder", f"{dead_url()},{d.url}"])
    for _ in range(3):
        assert client.post(h.url + "/v1/completions", json={"prompt": PROMPT}).status_code == 200
    assert d.served == 3


def test_hung_decoder_gives_504_at_the_deadline(stubs, proxy, client) -> None:
    p = stubs("P")
    d = stubs("D", delay_s=10.0)
    h = proxy(["--prefiller", p.url, "--decoder", d.url], decode_timeout_s=0.5)
    t0 = time.monotonic()
    r = client.post(h.url + "/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert time.monotonic() - t0 < 2.5


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b"[1, 2]"),
        ("/v1/completions", b'{"model": "m"}'),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}'),
        ("/v1/chat/completions", b'{"messages": []}'),
        ("/v1/chat/completions", b""),
    ],
)
def test_malformed_body_gives_400(stubs, proxy, client, path, body) -> None:
    p, d = stubs("P"), stubs("D")
    h = proxy(["--prefiller", p.url, "--decoder", d.url])
    r = client.post(h.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == 400 and err["message"]
    assert p.served == 0 and d.served == 0


def test_health_ejection_and_readmission(stubs, proxy, client) -> None:
    p = stubs("P")
    d0, d1 = stubs("D0"), stubs("D1")
    h = proxy(["--prefiller", p.url, "--decoder", f"{d0.url},{d1.url}"])
    d1.healthy = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = {e["url"]: e["state"] for e in client.get(h.url + "/health").json()["engines"]}
        if states[d1.url] == "ejected":
            break
        time.sleep(0.05)
    assert states[d1.url] == "ejected"
    before = d1.served
    for _ in range(4):
        assert client.post(h.url + "/v1/completions", json={"prompt": PROMPT}).status_code == 200
    assert d1.served == before  # out of rotation
    d1.healthy = True
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = {e["url"]: e["state"] for e in client.get(h.url + "/health").json()["engines"]}
        if states[d1.url] == "healthy":
            break
        time.sleep(0.05)
    assert states[d1.url] == "healthy"
    for _ in range(4):
        client.post(h.url + "/v1/completions", json={"prompt": PROMPT})
    assert d1.served > before  # back in rotation


def _wait_for(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_cancels_upstream_stream(stubs, proxy) -> None:
    p = stubs("P")
    d = stubs("D", stream_chunks=100, stream_interval_s=0.1)
    h = proxy(["--prefiller", p.url, "--decoder", d.url])
    with httpx.Client(trust_env=False, timeout=10) as c:
        with c.stream(
            "POST", h.url + "/v1/completions", json={"prompt": PROMPT, "stream": True}
        ) as r:
            first = next(r.iter_raw())
            assert first.startswith(b"data: ")
        req_id = d.requests[-1][1]["kv_transfer_params"]["req_id"]
        assert _wait_for(lambda: req_id in d.cancelled), "decoder stream not cancelled"
        assert _wait_for(lambda: c.get(h.url + "/v1/proxy/state").json()["inflight"] == 0)
        state = c.get(h.url + "/health").json()
        assert all(e["inflight"] == 0 for e in state["engines"])


def test_client_disconnect_cancels_upstream_non_stream(stubs, proxy) -> None:
    p = stubs("P")
    d = stubs("D", delay_s=10.0)
    h = proxy(["--prefiller", p.url, "--decoder", d.url])
    with httpx.Client(trust_env=False, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post(h.url + "/v1/completions", json={"prompt": PROMPT})
    req_id = d.requests[-1][1]["kv_transfer_params"]["req_id"]
    assert _wait_for(lambda: req_id in d.cancelled), "decoder request not cancelled"


def test_client_disconnect_during_prefill_cancels_prefill(stubs, proxy) -> None:
    p = stubs("P", delay_s=10.0)
    d = stubs("D")
    h = proxy(["--prefiller", p.url, "--decoder", d.url])
    with httpx.Client(trust_env=False, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post(h.url + "/v1/completions", json={"prompt": PROMPT, "stream": True})
    req_id = p.requests[-1][1]["kv_transfer_params"]["req_id"]
    assert _wait_for(lambda: req_id in p.cancelled), "prefill not cancelled"
    assert d.served == 0
    with httpx.Client(trust_env=False) as c:
        assert _wait_for(lambda: c.get(h.url + "/v1/proxy/state").json()["inflight"] == 0)


def test_unknown_routes_are_openai_shaped(stubs, proxy, client) -> None:
    d = stubs("D")
    h = proxy(["--decoder", d.url])
    r = client.get(h.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = client.get(h.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
