"""The optional ZMQ wait: the prefiller PUSHes a signed HandoffDone to the proxy."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
import zmq

from lmcache_pd.control import Codec, PushClient
from lmcache_pd.protocol import HandoffDone

SECRET = "proxy-test-secret-0123456789abcdef"
PROMPT = "alpha beta gamma delta epsilon zeta eta theta"


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_PD_AUTH_SECRET", SECRET)


def _notifier(ok: bool, delay_s: float = 0.0, secret: str = SECRET):
    ctx = zmq.Context.instance()

    def on_request(path: str, body: dict[str, Any]) -> None:
        params = body.get("kv_transfer_params") or {}
        if not params.get("proxy_notify"):
            return
        if delay_s:
            time.sleep(delay_s)
        push = PushClient(ctx, Codec(secret.encode()), params["proxy_notify"])
        push.send(
            HandoffDone(
                req_id=params["req_id"], ok=ok, chunks=3, error="" if ok else "decoder busy"
            )
        )
        push.close()

    return on_request


def _handoff_wait_count(client, url: str) -> float:
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith("lmcache_pd_proxy_handoff_wait_seconds_count"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_handoff_done_is_awaited_then_decode(stubs, proxy, client) -> None:
    p, d = stubs("P"), stubs("D")
    p.on_request = _notifier(ok=True)
    h = proxy(
        ["--prefiller", p.url, "--decoder", d.url, "--handoff-port", "0"], handoff_timeout_s=5.0
    )
    t0 = time.monotonic()
    r = client.post(h.url + "/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 200 and time.monotonic() - t0 < 2.0
    sent = p.requests[-1][1]["kv_transfer_params"]
    assert sent["proxy_notify"].startswith("tcp://127.0.0.1:")
    assert d.requests[-1][1]["kv_transfer_params"]["req_id"] == sent["req_id"]
    assert _handoff_wait_count(client, h.url) == 1


def test_notice_after_http_response_is_awaited(stubs, proxy, client) -> None:
    """The notice may come after the prefiller answered: the proxy waits for it."""
    p, d = stubs("P"), stubs("D")
    late: list[dict[str, Any]] = []
    p.on_request = lambda path, body: late.append(body)
    h = proxy(
        ["--prefiller", p.url, "--decoder", d.url, "--handoff-port", "0"], handoff_timeout_s=5.0
    )

    def send_late() -> None:
        while not late:
            time.sleep(0.01)
        time.sleep(0.3)
        _notifier(ok=True)("/v1/completions", late[0])

    t = threading.Thread(target=send_late)
    t.start()
    t0 = time.monotonic()
    r = client.post(h.url + "/v1/completions", json={"prompt": PROMPT})
    t.join()
    assert r.status_code == 200
    assert 0.25 < time.monotonic() - t0 < 3.0
    assert "kv_transfer_params" in d.requests[-1][1]


def test_failed_handoff_goes_decode_only(stubs, proxy, client) -> None:
    p, d = stubs("P"), stubs("D")
    p.on_request = _notifier(ok=False)
    h = proxy(["--prefiller", p.url, "--decoder", d.url, "--handoff-port", "0"])
    assert client.post(h.url + "/v1/completions", json={"prompt": PROMPT}).status_code == 200
    assert "kv_transfer_params" not in d.requests[-1][1]
    assert 'kind="handoff_failed"} 1.0' in client.get(h.url + "/metrics").text


def test_missing_or_forged_notice_times_out_and_decodes(stubs, proxy, client) -> None:
    p, d = stubs("P"), stubs("D")
    p.on_request = _notifier(ok=True, secret="another-secret-0123456789abcdef")  # forged
    h = proxy(
        ["--prefiller", p.url, "--decoder", d.url, "--handoff-port", "0"], handoff_timeout_s=0.3
    )
    t0 = time.monotonic()
    assert client.post(h.url + "/v1/completions", json={"prompt": PROMPT}).status_code == 200
    assert 0.25 < time.monotonic() - t0 < 2.5
    assert d.requests[-1][1]["kv_transfer_params"]["do_remote_prefill"] is True
    assert 'kind="handoff_timeout"} 1.0' in client.get(h.url + "/metrics").text


def test_secret_comes_from_the_config_file(stubs, proxy, client, monkeypatch) -> None:
    monkeypatch.delenv("LMCACHE_PD_AUTH_SECRET")
    file_secret = "secret-from-the-yaml-0123456789"
    p, d = stubs("P"), stubs("D")
    p.on_request = _notifier(ok=False, secret=file_secret)
    h = proxy(
        ["--prefiller", p.url, "--decoder", d.url, "--handoff-port", "0"],
        config={"pd_auth_secret": file_secret},
        handoff_timeout_s=2.0,
    )
    assert client.post(h.url + "/v1/completions", json={"prompt": PROMPT}).status_code == 200
    # the signed notice was accepted (ok=False -> decode-only), not dropped as forged
    assert "kv_transfer_params" not in d.requests[-1][1]


def test_disconnect_during_handoff_wait_leaves_no_waiter(stubs, proxy, client) -> None:
    p, d = stubs("P"), stubs("D")  # P never notifies
    h = proxy(
        ["--prefiller", p.url, "--decoder", d.url, "--handoff-port", "0"], handoff_timeout_s=10.0
    )
    with httpx.Client(trust_env=False, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post(h.url + "/v1/completions", json={"prompt": PROMPT})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = client.get(h.url + "/v1/proxy/state").json()
        if state["inflight"] == 0:
            break
        time.sleep(0.05)
    assert state["inflight"] == 0 and state["handoff_pending"] == 0
    assert d.served == 0  # never decoded: the client was gone


class _FirstPortTaken(zmq.Socket):  # type: ignore[type-arg]
    """A real socket whose first random bind lands on ``taken`` (the OS handing out the
    port the proxy is about to give its HTTP server: a race otherwise left to chance)."""

    taken = 0

    def bind_to_random_port(self, addr: str, *args: Any, **kwargs: Any) -> int:
        if self.taken:
            port, type(self).taken = self.taken, 0
            self.bind(f"{addr}:{port}")
            return port
        return super().bind_to_random_port(addr, *args, **kwargs)


def test_handoff_listener_never_takes_the_http_port() -> None:
    import socket

    from lmcache_pd.control import _bind
    from lmcache_pd.router.proxy import free_port

    http_port = free_port("127.0.0.1")
    ctx = zmq.Context()
    sock = _FirstPortTaken(ctx, zmq.PULL)
    try:
        _FirstPortTaken.taken = http_port
        port, endpoint = _bind(sock, Codec(SECRET.encode()), "127.0.0.1", 0, avoid=[http_port])
        assert port != http_port and endpoint.endswith(f":{port}")
        deadline = time.monotonic() + 5.0  # the unbind completes on ZMQ's I/O thread
        while True:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", http_port))  # free again for the HTTP server
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.02)
    finally:
        sock.close(0)
        ctx.term()
