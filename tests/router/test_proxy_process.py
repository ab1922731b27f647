"""The proxy as a process: no torch import, fast start, CLI errors, bounded memory."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from lmcache_pd.router.proxy import free_port, spawn

PROMPT = "shared prefix words for the memory test " * 3


def test_import_pulls_no_torch_numpy_nixl_vllm_and_is_fast() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import lmcache_pd.router.proxy; "
        "dt = time.perf_counter() - t; "
        "bad = [m for m in ('torch', 'numpy', 'nixl', 'vllm') if m in sys.modules]; "
        "print(dt, bad)"
    )
    best = float("inf")
    for _ in range(3):  # best of 3: a busy shared host should not fail this
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split(maxsplit=1)
        assert out[1].strip() == "[]", out
        best = min(best, float(out[0]))
        if best < 1.0:
            break
    # a coarse bound (timing belongs in benchmarks); importing torch alone would exceed it
    assert best < 5.0, f"import took {best:.2f} s (about 0.45 s on an idle 2-core box)"


def test_process_starts_in_about_a_second(stubs) -> None:
    d = stubs("D")
    t0 = time.monotonic()
    proc, url = spawn(["--decoder", d.url])
    try:
        while True:
            try:
                if httpx.get(url + "/health", trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.02)
        took = time.monotonic() - t0
        assert took < 4.0, f"proxy took {took:.2f}s to serve /health (about 1 s idle)"
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_errors_exit_2() -> None:
    from lmcache_pd.router.proxy import main

    assert main(["--prefiller", "http://127.0.0.1:1"]) == 2  # no decoder
    assert main(["--decoder", "http://x:1", "--decoder-kv", "nonsense"]) == 2


async def _load(url: str, n: int, concurrency: int) -> int:
    import aiohttp

    ok = 0
    queue = iter(range(n))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal ok
            for i in queue:
                body = {"prompt": PROMPT + f"tail {i}", "stream": i % 2 == 0}
                async with session.post(url + "/v1/completions", json=body) as r:
                    await r.read()
                    ok += r.status == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def _stub_process() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmcache_pd.router.stub", "--port", str(port)])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("stub did not start")


@pytest.mark.slow
def test_10000_requests_leave_memory_flat(tmp_path) -> None:
    """2,000 warm-up + 8,000 measured requests (two-step, cache_aware, half SSE)."""
    procs = [_stub_process(), _stub_process()]
    (p, p_url), (d, d_url) = procs
    cfg = tmp_path / "p.yaml"
    cfg.write_text("chunk_size: 4\nprefix_map_entries: 2000\nfinished_history: 256\n")
    proc, url = spawn(
        ["--prefiller", p_url, "--decoder", d_url, "--policy", "cache_aware", "--config", str(cfg)]
    )
    try:
        ps = psutil.Process(proc.pid)
        assert asyncio.run(_load(url, 2000, 16)) == 2000  # warm-up: pools, caches, arenas
        rss_warm = ps.memory_info().rss
        assert asyncio.run(_load(url, 8000, 16)) == 8000
        rss_end = ps.memory_info().rss
        state = httpx.get(url + "/v1/proxy/state", trust_env=False).json()
    finally:
        for x in (proc, p, d):
            x.terminate()
        for x in (proc, p, d):
            x.wait(10)
    assert state["inflight"] == 0
    assert state["finished_kept"] == 256
    assert state["prefix_map"] <= 2000
    grown = (rss_end - rss_warm) / 2**20
    print(
        f"proxy RSS {rss_warm / 2**20:.1f} MiB after 2,000 requests, "
        f"+{grown:.2f} MiB after 8,000 more"
    )
    assert grown < 16, f"RSS grew {grown:.1f} MiB over 8000 requests after warm-up"


def test_lmcache_pd_cli_reaches_the_proxy() -> None:
    cmd = [
        sys.executable,
        "-c",
        "from lmcache_pd.cli import app; app()",
        "proxy",
        "--prefiller",
        "http://127.0.0.1:1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "decoders: at least one --decoder URL is required" in done.stderr
