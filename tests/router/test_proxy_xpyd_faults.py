"""2P2D faults through a real proxy (stub engines): the decoder the proxy picked is down.

- it went down after the proxy last saw it healthy: the prefill (whose KV went to the
  dead decoder's endpoint) is done, so the request is failed over to the other decoder
  decode-only (no ``kv_transfer_params``: that decoder has no KV for it), the dead one is
  ejected, and later requests prefill for the survivor's KV endpoint;
- every decoder is down: 503 (streaming or not) well within the deadline, nothing hangs.
"""

from __future__ import annotations

import time

PROMPT = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
KV_PORTS = (7301, 7302)  # never contacted by stubs: only named in kv_transfer_params


def _metric(client, url: str, name: str) -> float:
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _argv(prefillers, decoders) -> list[str]:
    argv = [a for p in prefillers for a in ("--prefiller", p.url)]
    for d, port in zip(decoders, KV_PORTS, strict=True):
        argv += ["--decoder", d.url, "--decoder-kv", f"127.0.0.1:{port}"]
    return argv


def test_picked_decoder_down_fails_over_decode_only(stubs, proxy, client) -> None:
    p0, p1, d0, d1 = stubs("P0"), stubs("P1"), stubs("D0"), stubs("D1")
    # health checks far apart: the proxy only learns of the dead decoder by using it
    h = proxy(_argv([p0, p1], [d0, d1]), health_interval_s=60.0)
    for _ in range(4):  # round robin: both decoders and both prefillers in use
        assert client.post(h.url + "/v1/completions", json={"prompt": PROMPT}).status_code == 200
    assert d0.served == d1.served == 2 and p0.served == p1.served == 2
    d0.stop()
    before = d1.served
    t0 = time.monotonic()
    for i in range(4):
        r = client.post(h.url + "/v1/completions", json={"prompt": PROMPT, "stream": i % 2 == 1})
        assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 10.0
    assert d1.served == before + 4
    survivor = [body for _path, body in list(d1.requests)[-4:]]
    # exactly one request had been prefilled for d0's KV endpoint: it went decode-only
    decode_only = [b for b in survivor if "kv_transfer_params" not in b]
    assert len(decode_only) == 1, survivor
    prefills = [body for p in (p0, p1) for _path, body in list(p.requests)[-2:]]
    ports = sorted(b["kv_transfer_params"]["decoder_init_port"] for b in prefills)
    assert ports.count(KV_PORTS[0]) == 1 and ports.count(KV_PORTS[1]) == 3, ports
    for b in survivor:
        if "kv_transfer_params" in b:
            assert b["kv_transfer_params"]["do_remote_prefill"] is True
    health = client.get(h.url + "/health")
    assert health.status_code == 200  # one decoder left is still a working proxy
    assert _metric(client, h.url, "lmcache_pd_proxy_errors_total") >= 1


def test_every_decoder_down_gives_503_within_deadline(stubs, proxy, client) -> None:
    p0, p1, d0, d1 = stubs("P0"), stubs("P1"), stubs("D0"), stubs("D1")
    h = proxy(_argv([p0, p1], [d0, d1]), health_interval_s=60.0)
    assert client.post(h.url + "/v1/completions", json={"prompt": PROMPT}).status_code == 200
    d0.stop()
    d1.stop()
    for stream in (False, True):
        t0 = time.monotonic()
        r = client.post(
            h.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": PROMPT}], "stream": stream},
        )
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < 5.0
        assert "decoder" in r.json()["error"]["message"]
    assert client.get(h.url + "/health").status_code == 503
