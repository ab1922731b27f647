"""Proxy overhead: requests/s and p50/p99 latency, direct to a stub engine vs through the proxy.

The stub (``lmcache_pd.router.stub``) is a real OpenAI-shaped HTTP server on 127.0.0.1
that answers at once; it is the baseline. In the same run, against the same stub:

* ``direct``      — client -> stub;
* ``proxy``       — client -> proxy -> stub (one hop: no prefiller, the proxy's own cost);
* ``proxy_2step`` — client -> proxy -> stub as prefiller (max_tokens=1) -> stub as decoder
  (the full disaggregated flow: two upstream requests per client request).

plus ``engine_like``: direct vs proxy against a stub that takes 20 ms +- 50 % a request
(JSON, concurrency 16), i.e. when the engine and not the proxy is the bottleneck.

Each at concurrency 1, 16, 64, streaming (SSE, 4 events) and not. Every cell is bounded
in requests and seconds, and repeated (2x quick, 3x full) interleaved with the other
targets; the repeat with the most requests/s is kept (other tenants of a shared host can
only slow a run down). The load generator is a small keep-alive HTTP/1.1 client (one
connection per worker) so that it costs less than the servers it measures.

Summary ratios (non-streaming, concurrency 16, the issue's targets):
``added_p50_ms`` = p50(proxy) - p50(direct) (target <= 2 ms) and
``throughput_ratio`` = rps(proxy) / rps(direct) (target >= 0.9).

    python benchmarks/proxy.py [--quick] [--json F] [--png P]
    lmcache-pd bench proxy --quick --json benchmarks/results/proxy_quick.json \
        --png benchmarks/results/proxy_quick.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmcache_pd.router.proxy import free_port, spawn

sys.path.append(str(Path(__file__).resolve().parent))  # benchmarks/_common.py
import _common as shared

CONCURRENCY = (1, 16, 64)
TARGETS = ("direct", "proxy", "proxy_2step")
REPEATS_QUICK = 2
REPEATS_FULL = 3
ENGINE_MS = 20.0
ENGINE_JITTER = 0.5  # 10..30 ms: requests do not finish in lockstep
BODY = {"model": "stub", "prompt": "hello " * 64, "max_tokens": 4, "temperature": 0}


@dataclass
class Cell:
    target: str
    stream: bool
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float


async def _one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, float]:
    """Send one request on a kept-alive connection; (status, seconds to first body byte)."""
    t0 = time.perf_counter()
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    ttfb = time.perf_counter() - t0
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        i = lower.index(b"content-length:")
        n = int(lower[i + 15 : lower.index(b"\r\n", i)])
        await reader.readexactly(n)
    return status, ttfb


async def _cell(
    host: str, port: int, stream: bool, concurrency: int, max_requests: int, max_seconds: float
) -> tuple[list[float], list[float], int, float]:
    body = json.dumps({**BODY, "stream": stream}).encode()
    raw = (
        f"POST /v1/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    lat: list[float] = []
    ttfbs: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal errors, issued
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                status, ttfb = await _one(reader, writer, raw)
                lat.append(time.perf_counter() - t0)
                ttfbs.append(ttfb)
                errors += status != 200
        finally:
            writer.close()

    # warm the connections and the servers' paths first (not measured)
    warm_deadline = time.perf_counter() + 1.0
    reader, writer = await asyncio.open_connection(host, port)
    for _ in range(20):
        if time.perf_counter() > warm_deadline:
            break
        await _one(reader, writer, raw)
    writer.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, ttfbs, errors, time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


def _start_stub(delay_ms: float = 0.0, jitter: float = 0.0) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmcache_pd.router.stub", "--port", str(port)]
    cmd += ["--stream-chunks", "4", "--delay-ms", str(delay_ms), "--jitter", str(jitter)]
    proc = subprocess.Popen(cmd)
    import socket

    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.terminate()
    raise RuntimeError("stub engine did not start")


def _measure(
    port: int, stream: bool, c: int, target: str, max_requests: int, max_seconds: float
) -> Cell:
    lat, ttfb, errors, secs = asyncio.run(
        _cell("127.0.0.1", port, stream, c, max_requests, max_seconds)
    )
    return Cell(
        target,
        stream,
        c,
        len(lat),
        errors,
        round(secs, 3),
        round(len(lat) / secs, 1),
        round(_pct(lat, 0.5), 3),
        round(_pct(lat, 0.99), 3),
        round(_pct(ttfb, 0.5), 3),
    )


def _best(runs: list[Cell]) -> Cell:
    """The repeat with the most requests/s (others on a shared host only slow us down)."""
    best = max(runs, key=lambda x: x.rps)
    best.errors = sum(x.errors for x in runs)
    return best


def run(quick: bool) -> dict[str, object]:
    max_requests = 800 if quick else 6000
    max_seconds = 0.8 if quick else 5.0
    repeats = REPEATS_QUICK if quick else REPEATS_FULL
    procs: list[subprocess.Popen[bytes]] = []
    try:
        stub, stub_port = _start_stub()
        procs.append(stub)
        stub_url = f"http://127.0.0.1:{stub_port}"
        one, one_url = spawn(["--decoder", stub_url])
        procs.append(one)
        two, two_url = spawn(["--prefiller", stub_url, "--decoder", stub_url])
        procs.append(two)
        ports = {
            "direct": stub_port,
            "proxy": int(one_url.rsplit(":", 1)[1]),
            "proxy_2step": int(two_url.rsplit(":", 1)[1]),
        }
        cells: list[Cell] = []
        for stream in (False, True):
            for c in CONCURRENCY:
                runs: dict[str, list[Cell]] = {t: [] for t in TARGETS}
                for _ in range(repeats):
                    for target in TARGETS:  # interleaved: the three see the same box state
                        runs[target].append(
                            _measure(ports[target], stream, c, target, max_requests, max_seconds)
                        )
                for target in TARGETS:
                    cell = _best(runs[target])
                    cells.append(cell)
                    print(
                        f"  {target:12s} stream={stream!s:5s} c={c:<3d} "
                        f"{cell.rps:8.1f} req/s  p50 {cell.p50_ms:7.3f} ms  "
                        f"p99 {cell.p99_ms:7.3f} ms  errors {cell.errors}",
                        flush=True,
                    )
        # an engine-like stub (20 ms +- 50 % a request): what the proxy costs when the engine
        # is the bottleneck, as real engines are
        slow, slow_port = _start_stub(ENGINE_MS, ENGINE_JITTER)
        procs.append(slow)
        via, via_url = spawn(["--decoder", f"http://127.0.0.1:{slow_port}"])
        procs.append(via)
        engine_like: list[Cell] = []
        for target, port in (("direct", slow_port), ("proxy", int(via_url.rsplit(":", 1)[1]))):
            x = _measure(port, False, 16, target, max_requests, max_seconds * 2)
            engine_like.append(x)
            print(f"  engine-like {target:7s} c=16 {x.rps:8.1f} req/s  p50 {x.p50_ms:7.3f} ms")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    result = _summarize(cells, quick)
    result["repeats"] = repeats
    d, p = engine_like
    result["engine_like"] = {
        "service_ms": ENGINE_MS,
        "jitter": ENGINE_JITTER,
        "cells": [asdict(x) for x in engine_like],
        "added_p50_ms": round(p.p50_ms - d.p50_ms, 3),
        "throughput_ratio": round(p.rps / d.rps, 3),
    }
    return result


def _find(cells: list[Cell], target: str, stream: bool, c: int) -> Cell:
    return next(x for x in cells if (x.target, x.stream, x.concurrency) == (target, stream, c))


def _summarize(cells: list[Cell], quick: bool) -> dict[str, object]:
    ratios: dict[str, dict[str, float]] = {}
    for target in ("proxy", "proxy_2step"):
        for stream in (False, True):
            for c in CONCURRENCY:
                d, p = _find(cells, "direct", stream, c), _find(cells, target, stream, c)
                ratios[f"{target}/{'stream' if stream else 'json'}/c{c}"] = {
                    "added_p50_ms": round(p.p50_ms - d.p50_ms, 3),
                    "throughput_ratio": round(p.rps / d.rps, 3) if d.rps else float("nan"),
                }
    head = ratios["proxy/json/c16"]
    return {
        "benchmark": "proxy",
        "quick": quick,
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        },
        "note": "stub answers at once; servers and load generator share this host's cores",
        "cells": [asdict(x) for x in cells],
        "ratios": ratios,
        "added_p50_ms": head["added_p50_ms"],
        "throughput_ratio": head["throughput_ratio"],
        "targets": {"added_p50_ms_max": 2.0, "throughput_ratio_min": 0.9},
        "met": {
            "added_p50_ms": head["added_p50_ms"] <= 2.0,
            "throughput_ratio": head["throughput_ratio"] >= 0.9,
        },
    }


def _table(result: dict[str, object]) -> str:
    rows = ["target       mode    c    req/s     p50 ms   p99 ms  ttfb p50  errors"]
    for x in result["cells"]:  # type: ignore[union-attr]
        rows.append(
            f"{x['target']:12s} {'sse' if x['stream'] else 'json':5s} {x['concurrency']:3d} "
            f"{x['rps']:8.1f} {x['p50_ms']:9.3f} {x['p99_ms']:8.3f} "
            f"{x['ttfb_p50_ms']:9.3f} {x['errors']:6d}"
        )
    rows.append("")
    rows.append(f"added_p50_ms (proxy, json, c=16): {result['added_p50_ms']}  (target <= 2)")
    rows.append(
        f"throughput_ratio (proxy, json, c=16): {result['throughput_ratio']}  (target >= 0.9)"
    )
    eng: dict[str, object] = result["engine_like"]  # type: ignore[assignment]
    rows.append(
        f"engine-like stub ({eng['service_ms']} ms +- {eng['jitter']:.0%}), json, c=16: "
        f"added_p50_ms {eng['added_p50_ms']}, throughput_ratio {eng['throughput_ratio']}"
    )
    return "\n".join(rows)


def _plot(result: dict[str, object], path: Path) -> None:
    cells = result["cells"]
    fig, axes = shared.pyplot().subplots(2, 2, figsize=(11, 7))
    for col, stream in enumerate((False, True)):
        for row, (field, label) in enumerate((("rps", "requests/s"), ("p50_ms", "p50 ms"))):
            ax = axes[row][col]
            width = 0.27
            for k, target in enumerate(TARGETS):
                ys = [
                    next(
                        x[field]
                        for x in cells
                        if x["target"] == target  # type: ignore
                        and x["stream"] == stream
                        and x["concurrency"] == c
                    )
                    for c in CONCURRENCY
                ]
                ax.bar(
                    [i + (k - 1) * width for i in range(len(CONCURRENCY))], ys, width, label=target
                )
            ax.set_xticks(range(len(CONCURRENCY)), [f"c={c}" for c in CONCURRENCY])
            ax.set_ylabel(label)
            ax.set_title(f"{'SSE' if stream else 'JSON'}: {label}")
            ax.legend(fontsize=8)
    fig.suptitle(
        f"lmcache-pd proxy vs direct stub (added p50 {result['added_p50_ms']} ms, "
        f"throughput ratio {result['throughput_ratio']} at c=16, json)"
    )
    shared.save_figure(fig, path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short cells (< 1 minute in all)")
    shared.add_output_args(ap)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    result = run(args.quick)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(_table(result))
    shared.write_outputs(result, args.json, args.png, lambda path: _plot(result, path), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
