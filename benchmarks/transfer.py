"""Transfer benchmark: our full handoff vs a raw NIXL WRITE vs memcpy, same bytes, same run.

For llama-8b chunks (256 tokens = 32 MiB each) from one chunk up to 8k tokens:

- ``raw_nixl_gbps``: one prepped NIXL WRITE of the chunks into a bare agent in another
  process (target progressed by polling, as our receiver does), timed until the target
  saw the notification: the floor of what any handoff can do;
- ``handoff_gbps``: Offer -> Accept -> WRITEs -> Done -> Committed from this process to
  a real receiver process that verifies every chunk's xxh3 checksum (sender checksums
  are taken at gather time, outside the timed region, as the engine does);
- ``handoff_noverify_gbps``: the same with ``pd_verify_checksums: false``;
- ``memcpy_gbps``: numpy copy of the same bytes.

Prints a table, writes ``--json`` and a ``--png`` plot. ``--quick`` stops at 2k tokens.
Run: ``lmcache-pd bench transfer [--quick] --json F --png P``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from lmcache_pd.transports.nixl import NixlTransport
from rich.console import Console
from rich.table import Table

from lmcache_pd.buffer import host_buffer
from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.config import load_config
from lmcache_pd.layout import preset
from lmcache_pd.sender import OutChunk, Sender

console = Console()
CHUNK = 256
LAYOUT = preset("llama-8b")
SLOT = LAYOUT.bytes_per_chunk(CHUNK)


def _spawn(role: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lmcache_pd.peer", role, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _line(proc: subprocess.Popen[str], tag: str) -> str:
    assert proc.stdout is not None
    for _ in range(1000):
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer exited before {tag}")
        if line.startswith(tag + " "):
            return line[len(tag) + 1 :].strip()
    raise RuntimeError(f"no {tag} line")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def raw_nixl(n_chunks: int, reps: int) -> float:
    """Median GB/s of one WRITE of ``n_chunks`` slots into another process's agent,
    timed until the target reports the notification."""
    nbytes = n_chunks * SLOT
    target = _spawn("raw-target", "--buffer-bytes", str(nbytes))
    a = NixlTransport("raw-initiator")
    try:
        meta_hex, addr = _line(target, "READY").split()
        src = host_buffer(nbytes)  # the same allocator as our buffers
        src[:] = 1
        a.register(src.ctypes.data, nbytes)
        peer = a.add_peer(bytes.fromhex(meta_hex))
        a.connect(peer)
        base = int(addr)
        local = a.prep_local([(src.ctypes.data + i * SLOT, SLOT, 0) for i in range(n_chunks)])
        remote = a.prep_remote(peer, [(base + i * SLOT, SLOT, 0) for i in range(n_chunks)])
        idx = list(range(n_chunks))
        times = []
        for i in range(reps + 1):  # the first one warms the connection
            t0 = time.perf_counter()
            handle = a.write(local, idx, remote, idx, b"raw%d" % i)
            a.wait(handle, 60.0)
            _line(target, "NOTIF")
            times.append(time.perf_counter() - t0)
            a.release(handle)
    finally:
        a.close()
        _stop(target)
    return nbytes / statistics.median(times[1:]) / 1e9


def handoff(n_chunks: int, reps: int, verify: bool) -> float:
    """Median GB/s of a full handoff of ``n_chunks`` fresh chunks to a receiver process."""
    env = {"LMCACHE_PD_VERIFY_CHECKSUMS": "true" if verify else "false"}
    rx = _spawn(
        "receiver", "--layout", "llama-8b", "--chunk-size", str(CHUNK),
        "--buffer-bytes", str(n_chunks * SLOT), "--timeout", "60", env=env,
    )  # fmt: skip
    cfg = load_config(
        overrides={
            "chunk_size": CHUNK,
            "pd_buffer_size": n_chunks * SLOT,
            "pd_transfer_timeout_s": 60.0,
        }
    )
    tx = Sender(cfg, LAYOUT, NixlTransport("bench-tx"))
    hasher = ChunkHasher(LAYOUT.fingerprint(), CHUNK)
    rng = np.random.default_rng(0)
    slots = tx.alloc(n_chunks)
    times = []
    try:
        endpoint = _line(rx, "READY")
        for s in slots:
            np.frombuffer(tx.buffer.view(s), dtype=np.uint8)[::4096] = rng.integers(
                0, 256, SLOT // 4096
            )
        sums = [tx.checksum(s, SLOT) for s in slots]  # taken at gather time in the engine
        for rep in range(reps + 1):
            keys = hasher.keys(
                rng.integers(0, 32000, n_chunks * CHUNK).tolist()
            )  # fresh: no dedupe
            chunks = [OutChunk(k, s, SLOT, c) for k, s, c in zip(keys, slots, sums, strict=True)]
            t0 = time.perf_counter()
            res = tx.send(endpoint, f"bench-{rep}", chunks)
            times.append(time.perf_counter() - t0)
            assert res.sent == n_chunks and res.bad == 0, res
    finally:
        tx.free(slots)
        tx.close()
        _stop(rx)
    return n_chunks * SLOT / statistics.median(times[1:]) / 1e9


def memcpy(n_chunks: int, reps: int) -> float:
    src, dst = host_buffer(n_chunks * SLOT), host_buffer(n_chunks * SLOT)
    src[:] = 1
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return src.size / statistics.median(times[1:]) / 1e9


def plot(rows: list[dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["bytes"] / 2**20 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (
        ("raw_nixl_gbps", "raw NIXL WRITE"),
        ("handoff_gbps", "lmcache-pd handoff (verified)"),
        ("handoff_noverify_gbps", "lmcache-pd handoff (no verify)"),
        ("memcpy_gbps", "memcpy"),
    ):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per request (MiB, llama-8b, 256-token chunks)")
    ax.set_ylabel("GB/s")
    ax.set_title("KV handoff throughput vs raw NIXL and memcpy (same run)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="up to 2k tokens, fewer reps")
    parser.add_argument("--reps", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("LMCACHE_PD_AUTH_SECRET", secrets.token_hex(32))
    sizes = [1, 2, 4, 8] if args.quick else [1, 2, 4, 8, 16, 32]
    reps = args.reps or (3 if args.quick else 5)
    started = time.monotonic()
    rows = []
    for n in sizes:
        raw = raw_nixl(n, reps)
        full = handoff(n, reps, verify=True)
        fast = handoff(n, reps, verify=False)
        rows.append(
            {
                "chunks": n,
                "tokens": n * CHUNK,
                "bytes": n * SLOT,
                "raw_nixl_gbps": round(raw, 3),
                "handoff_gbps": round(full, 3),
                "handoff_noverify_gbps": round(fast, 3),
                "memcpy_gbps": round(memcpy(n, reps), 3),
                "control_overhead_us_per_chunk": round(
                    (n * SLOT / full / 1e9 - n * SLOT / raw / 1e9) * 1e6 / n, 1
                ),
            }
        )
    last = rows[-1]
    summary = {
        "layout": "llama-8b",
        "chunk_size": CHUNK,
        "reps": reps,
        "rows": rows,
        "handoff_over_raw_at_max": round(last["handoff_gbps"] / last["raw_nixl_gbps"], 3),
        "handoff_noverify_over_raw_at_max": round(
            last["handoff_noverify_gbps"] / last["raw_nixl_gbps"], 3
        ),
        "raw_over_memcpy_at_max": round(last["raw_nixl_gbps"] / last["memcpy_gbps"], 3),
        "seconds": round(time.monotonic() - started, 1),
    }
    table = Table(title="lmcache-pd transfer benchmark (llama-8b, GB/s, median)")
    for col in (
        "chunks",
        "MiB",
        "raw NIXL",
        "handoff",
        "handoff no-verify",
        "memcpy",
        "ctl µs/chunk",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["chunks"]),
            f"{r['bytes'] / 2**20:.0f}",
            f"{r['raw_nixl_gbps']:.2f}",
            f"{r['handoff_gbps']:.2f}",
            f"{r['handoff_noverify_gbps']:.2f}",
            f"{r['memcpy_gbps']:.2f}",
            f"{r['control_overhead_us_per_chunk']:.0f}",
        )
    console.print(table)
    console.print(
        f"handoff/raw at max: {summary['handoff_over_raw_at_max']:.2f} (verified), "
        f"{summary['handoff_noverify_over_raw_at_max']:.2f} (no verify); "
        f"raw/memcpy {summary['raw_over_memcpy_at_max']:.2f}; {summary['seconds']}s"
    )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2))
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
