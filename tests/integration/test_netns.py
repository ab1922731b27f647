"""Prefiller and decoder on two "hosts": network namespaces joined by a veth (lmcache_pd.netns).

Every byte between the hosts crosses the veth over TCP (``UCX_TLS=tcp``,
``UCX_NET_DEVICES=pd0``; cma/shared memory would otherwise still work across network
namespaces, which share a PID namespace). The namespaces are created and deleted by this
module; the tests skip with the reason only where they cannot be created (not root, no
``ip``). Checked here:

- ``lmcache-pd check --receiver`` from host a to a receiver bound on host b reports a TCP
  path over ``pd0`` and intact bytes; the receiver verifies every chunk's pattern;
- the core handoff (sender process on a, receiver process on b) moves bit-exact chunks;
- with vLLM: 1P1D (prefiller + proxy on host a, decoder on host b) gives the tokens of
  one engine, and the decoder loads everything but the last partial chunk.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcache_pd.integration.vllm.launch import VLLMServer, free_port
from lmcache_pd.netns import (
    Host,
    NetnsError,
    NetnsPair,
    our_namespaces,
    sweep_stale,
    unavailable_reason,
)
from lmcache_pd.peer import PeerProcess
from lmcache_pd.router.proxy import spawn
from tests.integration.helpers import connector_config, load_lines, start_servers

CHUNK = 64
MAX_TOKENS = 8
LENGTHS = [40, 64, 100, 129, 200, 257, 333]
SECRET = secrets.token_hex(32)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with NetnsPair() as p:
        yield p


def host_env(host: Host) -> dict[str, str]:
    """UCX over TCP on the veth, our control plane bound to the host's address."""
    return {**host.tcp_env(), "LMCACHE_PD_BIND_HOST": host.addr, "LMCACHE_PD_AUTH_SECRET": SECRET}


def test_namespaces_hold_the_addresses_and_are_deleted() -> None:
    with NetnsPair(subnet="10.232.0") as p:
        names = our_namespaces()
        assert p.a.ns in names and p.b.ns in names
        shown = p.b.run(["ip", "-4", "addr", "show", "dev", "pd0"]).stdout
        assert "10.232.0.2/24" in shown
        root = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        assert "10.232.0." not in root  # nothing added to the root namespace
    assert p.a.ns not in our_namespaces() and p.b.ns not in our_namespaces()


def test_namespaces_left_by_a_dead_process_are_swept() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(10)
    name = f"lmcpd-{gone.pid}-1-a"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in sweep_stale()
        assert name not in our_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_bad_subnet_is_refused() -> None:
    with pytest.raises(ValueError, match=r"10\.x"):
        NetnsPair(subnet="192.168.7")


def test_call_reports_a_missing_namespace() -> None:
    with pytest.raises(NetnsError, match="lmcpd-0-0-a cannot be entered"):
        Host("lmcpd-0-0-a", "10.231.0.1").call(lambda: None)


def _receiver(host: Host, *args: str) -> PeerProcess:
    return PeerProcess("receiver", "--verify", *args, env=host_env(host), prefix=host.prefix())


def test_check_across_hosts_reports_tcp_and_intact_bytes(pair: NetnsPair, tmp_path: Path) -> None:
    rx = _receiver(pair.b)
    try:
        endpoint = rx.read_tagged("READY")
        assert endpoint.startswith(f"tcp://{pair.b.addr}:")
        out = tmp_path / "check.json"
        res = pair.a.run(
            [
                *(sys.executable, "-m", "lmcache_pd.cli", "check", "--receiver", endpoint),
                *("--size-mb", "8", "--reps", "2", "--idle-seconds", "1", "--json", str(out)),
            ],
            env={**pair.a.tcp_env(), "LMCACHE_PD_AUTH_SECRET": SECRET},
            timeout_s=240,
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        result = json.loads(out.read_text())
    finally:
        rx.close_stdin()
    stats = json.loads(rx.read_tagged("STATS"))
    rx.stop()
    assert result["receiver"] == endpoint
    assert result["ucx_put_path"] and all(p.startswith("tcp") for p in result["ucx_put_path"])
    assert "tcp/pd0" in result["ucx_put_path"]
    assert result["bytes_intact"] is True and result["nixl_gbps"] > 0
    assert "crosses hosts over TCP" in res.stdout
    # 8 MiB of tiny-layout chunks (256 KiB) per rep, twice, plus the 1 MiB probe
    assert stats["pattern_bad"] == 0 and stats["pattern_verified"] >= 2 * 32 + 4


def test_check_rejects_a_malformed_receiver() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "lmcache_pd.selfcheck", "--receiver", "10.231.0.2:7300"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "tcp://HOST:PORT" in res.stderr


def test_handoff_across_hosts_is_bit_exact(pair: NetnsPair) -> None:
    rx = _receiver(pair.b, "--chunk-size", "16")
    try:
        endpoint = rx.read_tagged("READY")
        tx = PeerProcess(
            "sender", "--chunk-size", "16", "--endpoint", endpoint,
            "--requests", "6", "--tokens", "200",
            env=host_env(pair.a), prefix=pair.a.prefix(),
        )  # fmt: skip
        rows = [json.loads(tx.read_tagged("RESULT")) for _ in range(6)]
        tx_stats = json.loads(tx.read_tagged("STATS"))
        assert tx.proc.wait(60) == 0
    finally:
        rx.close_stdin()
    stats = json.loads(rx.read_tagged("STATS"))
    rx.stop()
    assert all(r["ok"] for r in rows), rows
    sent = sum(r["sent"] for r in rows)
    # odd requests share their first half with the previous one: those chunks dedupe
    assert sum(r["dedup"] for r in rows) > 0
    assert stats["pattern_verified"] == stats["chunks"] == sent and stats["pattern_bad"] == 0
    assert tx_stats.get("errors", 0) == 0


# ------------------------------------------------------------------ vLLM 1P1D


class NsServer(VLLMServer):
    """A vLLM server started inside ``host``'s namespace, listening on its address; its
    HTTP calls are made from inside that namespace."""

    def __init__(self, host: Host, *args: Any, **kwargs: Any) -> None:
        kwargs["extra_args"] = [*kwargs.get("extra_args", ()), "--host", host.addr]
        super().__init__(*args, **kwargs)
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host.addr}:{self.port}"

    def command(self) -> list[str]:
        # `ip netns exec`, not a child of a setns thread: it also remounts /sys, where
        # UCX looks for the namespace's devices (pd0)
        return [*self.host.prefix(), *super().command()]

    def wait_ready(self, timeout_s: float = 300.0) -> NsServer:
        self.host.call(super().wait_ready, timeout_s)
        return self


@dataclass
class Hosts1P1D:
    pair: NetnsPair
    plain: VLLMServer
    prefiller: NsServer
    decoder: NsServer
    proxy_url: str

    def via_proxy(self, prompt: list[int]) -> str:
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        resp = self.pair.a.call(
            httpx.post, f"{self.proxy_url}/v1/completions", json=body, timeout=120
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["choices"][0]["text"])


@pytest.fixture(scope="module")
def hosts_1p1d(
    pair: NetnsPair, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hosts1P1D]:
    work = tmp_path_factory.mktemp("netns-1p1d")
    kv_port = free_port()
    plain = VLLMServer(tiny_model, work / "plain.log", name="plain")
    common = {"chunk_size": CHUNK, "pd_buffer_size": 8 << 20}
    prefiller = NsServer(
        pair.a,
        tiny_model,
        work / "prefiller.log",
        name="prefiller",
        kv_transfer_config=connector_config(
            "kv_producer", **common, pd_bind_host=pair.a.addr, pd_connect_timeout_s=10.0
        ),
        env={**host_env(pair.a), "VLLM_CPU_OMP_THREADS_BIND": "0"},
    )
    decoder = NsServer(
        pair.b,
        tiny_model,
        work / "decoder.log",
        name="decoder",
        kv_transfer_config=connector_config(
            "kv_consumer",
            **common,
            pd_bind_host=pair.b.addr,
            pd_peer_init_port=kv_port,
            pd_transfer_timeout_s=20.0,
            max_local_cpu_size=0.05,
        ),
        env={**host_env(pair.b), "VLLM_CPU_OMP_THREADS_BIND": "1"},
    )
    start_servers([plain, prefiller, decoder])
    proxy = None
    try:
        argv = [
            *("--prefiller", prefiller.url, "--decoder", decoder.url),
            *("--decoder-kv", f"{pair.b.addr}:{kv_port}", "--host", pair.a.addr),
            *("--handoff-host", pair.a.addr, "--handoff-port", "0"),
        ]
        proxy, url = pair.a.call(spawn, argv, 30.0, {"LMCACHE_PD_AUTH_SECRET": SECRET})
        yield Hosts1P1D(pair, plain, prefiller, decoder, url)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for s in (decoder, prefiller, plain):
            s.stop()


@pytest.mark.vllm
def test_1p1d_across_hosts_gives_the_tokens_of_one_engine(hosts_1p1d: Hosts1P1D) -> None:
    import random

    rng = random.Random(31)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in LENGTHS]
    for prompt in prompts:
        want = hosts_1p1d.plain.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
        assert hosts_1p1d.via_proxy(prompt) == want, f"prompt of {len(prompt)} tokens"
    loads = load_lines(hosts_1p1d.decoder.log_text())
    long_enough = [p for p in prompts if len(p) >= CHUNK]
    assert len(loads) == len(long_enough), loads
    for prompt, load in zip(long_enough, loads, strict=True):
        assert load["prompt"] == len(prompt)
        assert load["computing"] <= max(len(prompt) % CHUNK, 1), load
    text = hosts_1p1d.prefiller.log_text()
    assert text.count("pushed ") >= len(long_enough)
    assert f"{hosts_1p1d.pair.b.addr}" in text  # it pushed to host b's address
