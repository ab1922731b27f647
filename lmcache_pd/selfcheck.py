"""`lmcache-pd check`: transport self-test.

1. Which UCX path a WRITE takes here (a child process runs one with ``UCX_PROTO_INFO=y``
   and we read UCX's protocol table): shared memory/cma/RDMA/cuda_ipc, or TCP. A
   TCP-only path on one host is warned about loudly.
2. 64 MiB NIXL WRITE between two agents (best of N), beside memcpy of the same bytes.
3. Idle CPU of a connected sender + receiver pair over 5 s (percent of one core): our
   waits block, so this should be ~0 (NIXL's own progress thread would burn a core).
Exit 1 with an explanation when the transfer fails or bytes differ.

``--receiver tcp://HOST:PORT`` checks the path to a receiver on another host instead
(start one there with ``python -m lmcache_pd.peer receiver --verify``, its
``pd_bind_host`` set to that host's address and the same secret): the UCX path and
GB/s of full handoffs (Offer -> WRITE -> Done -> Committed, every chunk checksummed by
the receiver) from this process to it. TCP is the expected path between hosts without
RDMA; it is reported, and warned about only when RDMA was asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from lmcache_pd.transports.base import DescListHandle, TransferTimeout, XferState
from lmcache_pd.transports.nixl import NixlTransport

console = Console()
MIB = 1 << 20


def _two_agents(
    nbytes: int,
) -> tuple[
    NixlTransport,
    NixlTransport,
    np.ndarray,
    np.ndarray,
    DescListHandle,
    DescListHandle,
]:
    """Two agents in this process, ``nbytes`` registered on each, descriptors prepped."""
    a, b = NixlTransport("check-a"), NixlTransport("check-b")
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    a.register(src.ctypes.data, nbytes)
    b.register(dst.ctypes.data, nbytes)
    peer = a.add_peer(b.metadata())
    b.add_peer(a.metadata())
    a.connect(peer)
    local = a.prep_local([(src.ctypes.data, nbytes, 0)])
    remote = a.prep_remote(peer, [(dst.ctypes.data, nbytes, 0)])
    return a, b, src, dst, local, remote


def measure_write(nbytes: int, reps: int) -> tuple[float, bool]:
    """Best GB/s of ``reps`` WRITEs of ``nbytes`` and whether the bytes arrived intact."""
    a, b, src, dst, local, remote = _two_agents(nbytes)
    best = 0.0
    try:
        for i in range(reps):
            dst[::4096] = 0
            t0 = time.perf_counter()
            handle = a.write(local, [0], remote, [0], b"check%d" % i)
            # both agents live in this process and neither has a progress thread: the
            # target must be progressed too (UCX wireup and TCP need it)
            deadline = time.monotonic() + 30.0
            notified = False
            while a.poll(handle) is not XferState.DONE:
                notified = notified or bool(b.notifications())
                if time.monotonic() > deadline:
                    raise TransferTimeout("NIXL WRITE not complete after 30s")
                time.sleep(0.0001)
            dt = time.perf_counter() - t0
            a.release(handle)
            best = max(best, nbytes / dt / 1e9)
            while not notified and time.monotonic() < deadline:
                notified = bool(b.notifications())
                time.sleep(0.0002)
        return best, bool(np.array_equal(src, dst))
    finally:
        a.close()
        b.close()


class RemoteTarget(msgspec.Struct, frozen=True):
    """A receiver on another host: its endpoint and the layout it was started with."""

    endpoint: str
    layout: str = "tiny"
    chunk_size: int = 256


def measure_remote(target: RemoteTarget, nbytes: int, reps: int) -> tuple[float, bool]:
    """Best GB/s of ``reps`` handoffs of ``nbytes`` of fresh chunks to a remote receiver,
    and whether every chunk passed the receiver's checksum."""
    from lmcache_pd.chunks import ChunkHasher
    from lmcache_pd.config import load_config
    from lmcache_pd.layout import preset
    from lmcache_pd.peer import make_requests, send_requests
    from lmcache_pd.sender import Sender

    layout = preset(target.layout)
    chunk_bytes = layout.bytes_per_chunk(target.chunk_size)
    chunks = max(1, nbytes // chunk_bytes)
    cfg = load_config(
        overrides={
            "chunk_size": target.chunk_size,
            "pd_buffer_size": chunks * chunk_bytes,
            "pd_verify_checksums": True,
        }
    )
    tx = Sender(cfg, layout, NixlTransport())
    hasher = ChunkHasher(layout.fingerprint(), target.chunk_size, cfg.hash_algorithm)
    seed = int.from_bytes(os.urandom(4), "little")  # fresh keys: the receiver may hold old ones
    best, intact = 0.0, True
    try:
        for i in range(reps):
            prompts = make_requests(1, chunks * target.chunk_size, seed=seed + i)
            (row,) = send_requests(tx, target.endpoint, hasher, prompts)
            if not row["ok"]:
                console.print(f"[red]handoff to {target.endpoint} failed: {row['error']}[/red]")
                return best, False
            intact = intact and row["dedup"] == 0
            best = max(best, float(row["bytes"]) / max(float(row["seconds"]), 1e-9) / 1e9)
        return best, intact
    finally:
        tx.close()
        tx.transport.close()


def measure_memcpy(nbytes: int, reps: int) -> float:
    src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def probe_ucx_path(timeout_s: float = 60.0, target: RemoteTarget | None = None) -> list[str]:
    """UCX transports chosen for ``ucp_put`` (remote write) here, e.g. ``['cma/memory']``;
    with ``target``, for a write into that remote receiver."""
    env = {**os.environ, "UCX_PROTO_INFO": "y", "UCX_LOG_LEVEL": "info"}
    extra = [] if target is None else _target_argv(target)
    res = subprocess.run(
        [sys.executable, "-m", "lmcache_pd.selfcheck", "--probe", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    return parse_put_paths(res.stdout + res.stderr)


def _target_argv(target: RemoteTarget) -> list[str]:
    return [
        "--receiver", target.endpoint, "--layout", target.layout,
        "--chunk-size", str(target.chunk_size),
    ]  # fmt: skip


def parse_put_paths(text: str) -> list[str]:
    """Read the Config column of UCX's 'remote memory write by ucp_put*' tables."""
    paths: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "remote memory write by ucp_put" not in line:
            continue
        for row in lines[i + 1 : i + 12]:
            cells = [c.strip() for c in row.split("|")]
            if len(cells) >= 5 and cells[1] and cells[1][0].isdigit():
                for part in re.split(r",\s*|\s+", cells[3]):
                    if part and part not in paths:
                        paths.append(part)
            elif "+----" in row and paths:
                break
    return paths


def measure_idle_cpu(seconds: float) -> float:
    """CPU (percent of one core) of a connected, idle sender + receiver pair."""
    from lmcache_pd.chunks import ChunkHasher
    from lmcache_pd.config import load_config
    from lmcache_pd.layout import preset
    from lmcache_pd.peer import send_requests
    from lmcache_pd.receiver import Receiver
    from lmcache_pd.sender import Sender

    layout = preset("tiny")
    cfg = load_config(overrides={"chunk_size": 16, "pd_buffer_size": 1 << 20})
    rx = Receiver(cfg, layout, NixlTransport(), port=0).start()
    tx = Sender(cfg, layout, NixlTransport())
    try:
        hasher = ChunkHasher(layout.fingerprint(), 16)
        send_requests(tx, rx.endpoint, hasher, [list(range(64))])  # connected and warmed
        time.sleep(0.2)
        proc = psutil.Process()
        before = proc.cpu_times()
        time.sleep(seconds)
        after = proc.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        return 100.0 * used / seconds
    finally:
        tx.close()
        rx.close()
        tx.transport.close()
        rx.transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-pd check", description=__doc__)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument(
        "--receiver",
        default=None,
        help="tcp://HOST:PORT of a remote receiver (python -m lmcache_pd.peer receiver): "
        "check the path to that host with full handoffs",
    )
    parser.add_argument("--layout", default="tiny", help="the remote receiver's --layout")
    parser.add_argument(
        "--chunk-size", type=int, default=256, help="the remote receiver's --chunk-size"
    )
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    target = None
    if args.receiver is not None:
        if not re.fullmatch(r"tcp://[^:/\s]+:\d{1,5}", args.receiver):
            parser.error(f"--receiver must look like tcp://HOST:PORT, got {args.receiver!r}")
        if args.chunk_size <= 0:
            parser.error(f"--chunk-size must be positive, got {args.chunk_size}")
        try:
            from lmcache_pd.layout import preset

            preset(args.layout)
        except ValueError as exc:
            parser.error(str(exc))
        target = RemoteTarget(args.receiver, args.layout, args.chunk_size)
    if args.size_mb <= 0 or args.reps <= 0:
        parser.error("--size-mb and --reps must be positive")
    if args.probe:  # child of probe_ucx_path: one small write, UCX prints its tables
        if target is None:
            measure_write(MIB, 1)
        else:
            measure_remote(target, MIB, 1)
        return 0

    nbytes = args.size_mb * MIB
    try:
        paths = probe_ucx_path(target=target)
    except (subprocess.SubprocessError, OSError) as exc:
        paths = []
        console.print(f"[yellow]could not probe the UCX path: {exc}[/yellow]")
    try:
        if target is None:
            nixl_gbps, intact = measure_write(nbytes, args.reps)
        else:
            nixl_gbps, intact = measure_remote(target, nbytes, args.reps)
    except Exception as exc:
        console.print(f"[red]NIXL WRITE failed: {exc}[/red]")
        console.print(
            "Check: nixl-cu12 installed with its UCX plugin; if UCX_TLS is set it must "
            "include tcp on hosts without RDMA (e.g. UCX_TLS=tcp,cma,sm,self)."
        )
        return 1
    memcpy_gbps = measure_memcpy(nbytes, args.reps)
    idle = measure_idle_cpu(args.idle_seconds)
    tcp_only = bool(paths) and all(p.startswith("tcp") for p in paths)
    result = {
        "receiver": target.endpoint if target else None,
        "ucx_put_path": paths,
        "tcp_fallback": tcp_only,
        "bytes": nbytes,
        "nixl_gbps": round(nixl_gbps, 3),
        "memcpy_gbps": round(memcpy_gbps, 3),
        "nixl_over_memcpy": round(nixl_gbps / memcpy_gbps, 3) if memcpy_gbps else 0.0,
        "bytes_intact": intact,
        "idle_cpu_pct": round(idle, 2),
        "idle_seconds": args.idle_seconds,
    }
    table = Table(title="lmcache-pd transport self-check")
    table.add_column("check")
    table.add_column("result", justify="right")
    if target is not None:
        table.add_row("remote receiver", target.endpoint)
    table.add_row("UCX path for remote WRITE", ", ".join(paths) or "unknown")
    what = "NIXL WRITE" if target is None else "handoff to the receiver"
    table.add_row(f"{what} {args.size_mb} MiB (best of {args.reps})", f"{nixl_gbps:.2f} GB/s")
    table.add_row("memcpy, same bytes", f"{memcpy_gbps:.2f} GB/s")
    table.add_row("NIXL / memcpy", f"{result['nixl_over_memcpy']:.2f}")
    table.add_row("bytes intact", str(intact))
    table.add_row(f"idle CPU, sender+receiver, {args.idle_seconds:.0f}s", f"{idle:.2f} % of a core")
    console.print(table)
    if tcp_only and target is not None:
        if _rdma_requested():
            console.print(
                "[bold red]WARNING: UCX_TLS/UCX_NET_DEVICES ask for RDMA but the KV goes "
                "over TCP: check the RDMA device names (ucx_info -d) and UCX_NET_DEVICES."
                "[/bold red]"
            )
        else:
            console.print(
                "KV crosses hosts over TCP (no RDMA transport configured or found); expect "
                "NIC speed, not memory speed."
            )
    elif tcp_only:
        console.print(
            "[bold red]WARNING: UCX moves KV over TCP here, not shared memory/cma/RDMA. "
            "Check UCX_TLS and that cma/sm are allowed (ptrace scope, /dev/shm).[/bold red]"
        )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
        console.print(f"wrote {args.json_path}")
    if not intact:
        console.print("[red]bytes differ after the WRITE: the transport is broken here[/red]")
        return 1
    return 0


def _rdma_requested() -> bool:
    tls = os.environ.get("UCX_TLS", "")
    devs = os.environ.get("UCX_NET_DEVICES", "")
    return any(t in tls for t in ("rc", "dc", "ud", "ib")) or "mlx" in devs


if __name__ == "__main__":
    sys.exit(main())
