"""UCX's TCP listeners follow ``pd_bind_host``: a NIXL agent created for a loopback
bind host listens on no outside address, yet a WRITE between two such agents works; an
agent created without one listens on every interface (the default this guards against).
Which interface an address maps to (:func:`ucx_net_devices`), and a ``UCX_NET_DEVICES``
set by the user wins. Agents run in a child process so that its listening sockets are
theirs alone (read back with psutil, as ``ss -ltnp`` shows them)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys

import psutil
import pytest

from lmcache_pd.transports.nixl import ucx_net_devices

CHILD = r"""
import json, os, sys, time
import numpy as np
import psutil
from lmcache_pd.transports.nixl import NixlTransport

bind = sys.argv[1] or None
a = NixlTransport("listen-a", bind_host=bind)
b = NixlTransport("listen-b", bind_host=bind)
n = 1 << 16
src = np.arange(n, dtype=np.uint8)
dst = np.zeros(n, dtype=np.uint8)
a.register(src.ctypes.data, n)
b.register(dst.ctypes.data, n)
peer = a.add_peer(b.metadata())
local = a.prep_local([(src.ctypes.data, n, 0)])
remote = a.prep_remote(peer, [(dst.ctypes.data, n, 0)])
h = a.write(local, [0], remote, [0], b"done")
deadline = time.monotonic() + 20
notified = False
while a.poll(h).value != "DONE" or not notified:  # both agents progress (no threads)
    notified = notified or bool(b.notifications())
    assert time.monotonic() < deadline, "WRITE not complete within 20 s"
    time.sleep(0.001)
a.release(h)
listening = sorted(
    {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp") if c.status == "LISTEN"}
)
print("RESULT " + json.dumps({
    "devices": a.net_devices, "listening": listening, "intact": bool((dst == src).all()),
}), flush=True)
a.close()
b.close()
"""


def _outside_address() -> str | None:
    """An IPv4 address of a non-loopback interface of this host (None: there is none)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return str(a.address)
    return None


def _run(bind_host: str, env: dict[str, str] | None = None) -> dict[str, object]:
    child_env = {k: v for k, v in os.environ.items() if k != "UCX_NET_DEVICES"}
    child_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, bind_host],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def test_loopback_bind_host_listens_on_loopback_only() -> None:
    got = _run("127.0.0.1")
    assert got["intact"], got
    assert got["devices"] == "lo", got
    listening = got["listening"]
    assert isinstance(listening, list)
    outside = [ip for ip in listening if not ipaddress.ip_address(ip).is_loopback]
    assert outside == [], f"UCX listens on {outside} although pd_bind_host is 127.0.0.1"


def test_without_bind_host_ucx_listens_on_every_interface() -> None:
    """The default the restriction guards against (and proof the check above can fail)."""
    outside = _outside_address()
    if outside is None:
        pytest.skip("this host has no non-loopback IPv4 interface")
    got = _run("")
    assert got["devices"] is None and got["intact"], got
    assert outside in got["listening"], got


def test_a_host_address_maps_to_its_interface() -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this host has no non-loopback IPv4 interface")
    name = next(
        n for n, addrs in psutil.net_if_addrs().items() if any(a.address == outside for a in addrs)
    )
    assert ucx_net_devices(outside) == name
    got = _run(outside)
    assert got["devices"] == name and got["intact"], got
    listening = got["listening"]
    assert isinstance(listening, list) and outside in listening, got
    assert all(ip == outside or ipaddress.ip_address(ip).is_loopback for ip in listening), got


def test_address_mapping(caplog: pytest.LogCaptureFixture) -> None:
    assert ucx_net_devices("127.0.0.1") == "lo"
    assert ucx_net_devices("127.0.0.53") == "lo"  # all of 127/8 is the loopback interface
    assert ucx_net_devices("localhost") == "lo"
    assert ucx_net_devices("::1") == "lo"
    for wildcard in ("0.0.0.0", "::", "*", "", None):
        assert ucx_net_devices(wildcard) is None
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.transports.nixl"):
        assert ucx_net_devices("no-such-host.invalid") is None
    assert "does not resolve" in caplog.text


def _owns(address: str) -> bool:
    return any(a.address == address for addrs in psutil.net_if_addrs().values() for a in addrs)


def test_unknown_address_warns_and_leaves_the_default(caplog: pytest.LogCaptureFixture) -> None:
    address = "198.51.100.77"  # TEST-NET-2: no interface here carries it
    if _owns(address):
        pytest.skip(f"this host carries {address}")
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.transports.nixl"):
        assert ucx_net_devices(address) is None
    assert "no local interface carries pd_bind_host 198.51.100.77" in caplog.text


def test_user_ucx_net_devices_wins() -> None:
    got = _run("127.0.0.1", {"UCX_NET_DEVICES": "all"})
    assert got["devices"] == "all" and got["intact"], got
