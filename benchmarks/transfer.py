"""Transfer benchmark: our full handoff vs a raw NIXL WRITE vs memcpy, same bytes, same run.

For llama-8b chunks (256 tokens = 32 MiB each) from one chunk up to 8k tokens:

- ``raw_nixl_gbps``: one prepped NIXL WRITE of the chunks into a bare agent in another
  process (target progressed by polling, as our receiver does), timed until the target
  saw the notification: the floor of what any handoff can do. Like the receiver's slots,
  its destinations rotate over >= 1 GiB (``ROTATE_BYTES``), so neither side's writes
  are served from the L3 cache while the other's go to DRAM;
- ``handoff_gbps``: the whole handoff from this process to a real receiver process, with
  checksums on: each chunk carries its ``kvsum64`` digest (taken at gather time, outside
  the timed region, as the engine does) and the receiver keeps it with the chunk; it is
  checked by the first pass that reads the chunk anyway (the decoder's scatter, the
  store copy), not by a pass in the handoff. That cost is in ``bench kernels``
  (gather/scatter with vs without the checksum); here, after the timed reps, the
  receiver reads every chunk once through its verifying ``acquire``
  (``digests_checked``, which must fail none). The receive buffer has room for the
  run's requests, so after Hello every request takes the credit path (WRITEs into the
  lent grant, one Push -> Committed), as it does on a decoder whose CPU tier lets grants
  evict received chunks (up to ``RX_BUFFER_MAX``; beyond, the Offer path is measured);
- ``handoff_noverify_gbps``: the same with ``pd_verify_checksums: false`` (no digests);
- ``memcpy_gbps``: numpy copy of the same bytes.

Latency view: ``--latency-reps`` requests of one chunk (default 100, quick 30, bounded
by ``--latency-budget-s`` too), interleaved with raw NIXL WRITEs of one chunk and ZMQ
echo round trips: p50/p99 microseconds of ``Sender.send`` (credit path: Push ->
Committed), beside the raw WRITE's, for a llama-8b chunk (32 MiB) and a ``tiny`` one
(256 KiB, where moving the bytes costs little and ``overhead_p50_us`` is what the
handoff's messages, polling and commit add). ``overhead_beyond_rtt_p50_us`` takes one
ZMQ round trip between two idle processes (``zmq_rtt_p50_us``, the least one message
exchange costs on this host) off that: the handoff's own work (target: <= 100 us).

Prints a table, writes ``--json`` and a ``--png`` plot (bandwidth and latency panels).
``--quick`` stops at 2k tokens. Run: ``lmcache-pd bench transfer [--quick] --json F
--png P``.

``--device cuda`` (a GPU host; ``make gpu-check``): sender and receiver buffers in VRAM
(``pd_buffer_device: cuda``), NIXL over UCX (``cuda_ipc`` between the two processes);
the raw baseline WRITEs from VRAM into the raw target's host buffer, and "memcpy" is a
device-to-device copy. The digests are real there too (kvsum64 of the VRAM slots; the
receiver checks them on its CUDA tensors at the end).

``--netns`` (root, ``ip``): the same across two network namespaces joined by a veth
(:mod:`lmcache_pd.netns`): this process runs in namespace ``a``, the raw target and the
receivers in ``b`` bound to its address, ``UCX_TLS=tcp`` and ``UCX_NET_DEVICES=pd0`` on
both sides, so every byte crosses the veth over TCP as between two hosts; always 1 chunk
to 8k tokens (``--quick``: fewer reps).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
from rich.console import Console
from rich.table import Table

from lmcache_pd.buffer import host_buffer
from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.config import load_config
from lmcache_pd.control import fine_timer_slack
from lmcache_pd.layout import preset
from lmcache_pd.peer import PeerProcess
from lmcache_pd.sender import OutChunk, Sender
from lmcache_pd.transports.base import MemKind
from lmcache_pd.transports.nixl import NixlTransport

console = Console()
CHUNK = 256
LAYOUT_NAME = "llama-8b"
LAYOUT = preset(LAYOUT_NAME)
SLOT = LAYOUT.bytes_per_chunk(CHUNK)
# the latency view's second size: a chunk small enough that moving its bytes costs
# little, so what a request adds to a raw WRITE (messages, polling, commit) shows
SMALL_LAYOUT_NAME = "tiny"


def slot_bytes(layout: str) -> int:
    return preset(layout).bytes_per_chunk(CHUNK)


@dataclass(frozen=True)
class Placement:
    """Where the target processes run: a command prefix (``ip netns exec NS``) and env."""

    prefix: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


PEERS = Placement()  # replaced by main() under --netns
DEVICE = "cpu"  # replaced by main() under --device cuda


# Destinations a benchmark rotates over, at least: a receiver writes each request into
# slots it has not just written (its grants take free slots first), so its writes go to
# DRAM; a raw WRITE into the same bytes every time would be served by the L3 cache (up to
# hundreds of MiB) and measure a cache, not the transport. Both sides rotate over >= 1 GiB.
ROTATE_BYTES = 1 << 30


def windows(n: int, reps: int, slot: int = SLOT) -> int:
    """How many request-sized destination windows a run of ``reps`` (+ warm-up) requests
    of ``n`` chunks rotates over: enough for ``ROTATE_BYTES``, at most one per request."""
    return max(1, min(reps + 1, -(-ROTATE_BYTES // (n * slot))))


class RawNixl:
    """One prepped WRITE of ``n`` slots into a bare agent in another process, timed until
    the target reports the notification; each request writes the next of ``windows(n,
    reps)`` destination windows, as the receiver's slots rotate."""

    def __init__(self, n: int, reps: int = 8, layout: str = LAYOUT_NAME) -> None:
        slot = slot_bytes(layout)
        self.windows = windows(n, reps, slot)
        nbytes = n * slot
        fine_timer_slack()  # our polls (agent.wait) as short as the sender's, same thread
        self.target = PeerProcess(
            "raw-target", "--buffer-bytes", str(nbytes * self.windows),
            env=PEERS.env, prefix=PEERS.prefix,
        )  # fmt: skip
        self.agent = NixlTransport("raw-initiator")
        meta_hex, addr = self.target.read_tagged("READY").split()
        kind, dev = MemKind.DRAM, 0
        if DEVICE == "cuda":  # VRAM -> the target's host buffer
            self.src_t = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
            kind, dev, src = MemKind.VRAM, torch.cuda.current_device(), self.src_t.data_ptr()
        else:
            self.src = host_buffer(nbytes)  # the same allocator as our buffers
            self.src[:] = 1
            src = self.src.ctypes.data
        self.agent.register(src, nbytes, kind, dev)
        peer = self.agent.add_peer(bytes.fromhex(meta_hex))
        self.agent.connect(peer)
        base = int(addr)
        self.local = self.agent.prep_local([(src + i * slot, slot, dev) for i in range(n)], kind)
        self.remote = self.agent.prep_remote(
            peer, [(base + i * slot, slot, 0) for i in range(n * self.windows)]
        )
        self.idx = list(range(n))
        self.n = n
        self.count = 0

    def once(self) -> float:
        self.count += 1
        first = (self.count % self.windows) * self.n
        dst = list(range(first, first + self.n))
        self.target.send_line("ARM")  # it polls from now until the notification
        self.target.read_tagged("ARMED")
        t0 = time.perf_counter()
        handle = self.agent.write(self.local, self.idx, self.remote, dst, b"raw%d" % self.count)
        self.agent.wait(handle, 60.0)
        self.target.read_tagged("NOTIF")
        dt = time.perf_counter() - t0
        self.agent.release(handle)
        return dt

    def close(self) -> None:
        self.agent.close()
        self.target.stop()


# receive buffer of one benchmark receiver, at most: room for every rep's request plus a
# grant keeps the credit path in use (a decoder's CPU tier would make room instead;
# its copy is left out here: that is tier cost, not transfer cost)
RX_BUFFER_MAX = 4 << 30


class Handoff:
    """A full handoff of ``n`` fresh chunks (no dedupe) to a receiver process."""

    def __init__(
        self,
        n: int,
        verify: bool,
        reps: int = 8,
        layout: str = LAYOUT_NAME,
        reply_by_notif: bool = True,
    ) -> None:
        slot = self.slot = slot_bytes(layout)
        env = {**PEERS.env, "LMCACHE_PD_VERIFY_CHECKSUMS": "true" if verify else "false"}
        if DEVICE == "cuda":
            env["LMCACHE_PD_BUFFER_DEVICE"] = "cuda"
        rx_bytes = min((reps + 3) * n * slot, max(RX_BUFFER_MAX, 2 * n * slot))
        check = ["--check-digests"] if verify else []
        self.rx = PeerProcess(
            "receiver", "--layout", layout, "--chunk-size", str(CHUNK),
            "--buffer-bytes", str(rx_bytes), "--timeout", "60", *check, env=env,
            prefix=PEERS.prefix,
        )  # fmt: skip
        self.rx_stats: dict[str, int] = {}
        cfg = load_config(
            overrides={
                "chunk_size": CHUNK,
                "pd_buffer_size": n * slot,
                "pd_transfer_timeout_s": 60.0,
                "pd_reply_by_notif": reply_by_notif,
                **({"pd_buffer_device": "cuda"} if DEVICE == "cuda" else {}),
            }
        )
        self.tx = Sender(cfg, preset(layout), NixlTransport("bench-tx"))
        self.hasher = ChunkHasher(preset(layout).fingerprint(), CHUNK)
        self.rng = np.random.default_rng(0)
        self.n = n
        self.slots = self.tx.alloc(n)
        for s in self.slots:
            self.tx.buffer.slot_tensor(s)[::4096] = 7
        # checksums are taken at gather time in the engine, outside the handoff
        self.sums = [self.tx.checksum(s, slot) for s in self.slots]
        self.endpoint = self.rx.read_tagged("READY")

    def once(self) -> float:
        keys = self.hasher.keys(self.rng.integers(0, 32000, self.n * CHUNK).tolist())
        chunks = [
            OutChunk(k, s, self.slot, c)
            for k, s, c in zip(keys, self.slots, self.sums, strict=True)
        ]
        t0 = time.perf_counter()
        res = self.tx.send(self.endpoint, "bench", chunks)
        dt = time.perf_counter() - t0
        assert res.sent == self.n and res.bad == 0, res
        return dt

    def close(self) -> None:
        self.tx.free(self.slots)
        self.tx.close()
        self.tx.transport.close()
        self.rx.close_stdin()
        try:
            self.rx_stats = json.loads(self.rx.read_tagged("STATS"))
        finally:
            self.rx.stop()


class ZmqEcho:
    """One ZMQ round trip (DEALER -> ROUTER echo in another process, 128 bytes): what
    the handoff's one message exchange costs at least on this host. Sits idle between
    requests, as the receiver does, so both pay the same wake-ups."""

    def __init__(self) -> None:
        self.peer = PeerProcess("echo", env=PEERS.env, prefix=PEERS.prefix)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.peer.read_tagged("READY"))
        self.msg = b"x" * 128

    def once(self) -> float:
        t0 = time.perf_counter()
        self.sock.send(self.msg)
        if not self.sock.poll(10_000):
            raise RuntimeError("echo peer did not answer within 10 s")
        self.sock.recv()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
        self.peer.stop()


class Memcpy:
    def __init__(self, n: int) -> None:
        if DEVICE == "cuda":
            self.src_t = torch.ones(n * SLOT, dtype=torch.uint8, device="cuda")
            self.dst_t = torch.empty_like(self.src_t)
        self.src, self.dst = host_buffer(n * SLOT), host_buffer(n * SLOT)
        self.src[:] = 1

    def once(self) -> float:
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.dst_t.copy_(self.src_t)
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        np.copyto(self.dst, self.src)
        return time.perf_counter() - t0

    def close(self) -> None:
        del self.src, self.dst


def measure(n: int, reps: int) -> dict[str, float]:
    """GB/s medians for ``n`` chunks. The four measurements are interleaved rep by rep,
    so load from other processes hits them alike, and their order rotates each rep, so
    none always runs right after another (e.g. the raw WRITE's 256 MiB); the first rep
    of each is a warm-up."""
    benches = {
        "raw_nixl_gbps": RawNixl(n, reps),
        "handoff_gbps": Handoff(n, verify=True, reps=reps),
        "handoff_noverify_gbps": Handoff(n, verify=False, reps=reps),
        "memcpy_gbps": Memcpy(n),
    }
    times: dict[str, list[float]] = {k: [] for k in benches}
    verified = benches["handoff_gbps"]
    assert isinstance(verified, Handoff)
    try:
        order = list(benches)
        for rep in range(reps + 1):
            for key in order[rep % len(order) :] + order[: rep % len(order)]:
                times[key].append(benches[key].once())
        # share of requests that took the one-round-trip credit path (Push), each
        # handoff: without a tier, a receive buffer full of ready chunks lends no grant
        credit = {
            key: bench.tx.counters["pushes"] / max(1, bench.tx.counters["requests"])
            for key, bench in benches.items()
            if isinstance(bench, Handoff)
        }
    finally:
        for bench in benches.values():
            bench.close()
    checked = verified.rx_stats.get("digests_checked", 0)
    failed = verified.rx_stats.get("checksum_failures", 0)
    if failed or not checked:
        raise RuntimeError(f"receiver digest check: {checked} chunks checked, {failed} failed")
    out = {k: n * SLOT / statistics.median(v[1:]) / 1e9 for k, v in times.items()}
    out["credit_path_share"] = credit["handoff_gbps"]
    out["credit_path_share_noverify"] = credit["handoff_noverify_gbps"]
    out["digests_checked"] = checked
    return out


def measure_latency(reps: int, budget_s: float, layout: str = LAYOUT_NAME) -> dict[str, float]:
    """Per-request latency at 1 chunk of ``layout``: Push -> Committed of a verified
    handoff (the whole ``Sender.send``), the same with the answer over ZMQ instead of a
    NIXL notification (``pd_reply_by_notif: false``), the raw NIXL WRITE ->
    notification and one ZMQ round trip, interleaved; at most ``reps`` of each and
    ``budget_s`` seconds (after one warm-up each)."""
    raw, hand = RawNixl(1, reps, layout), Handoff(1, verify=True, reps=reps, layout=layout)
    hand_zmq = Handoff(1, verify=True, reps=reps, layout=layout, reply_by_notif=False)
    echo = ZmqEcho()
    t_raw: list[float] = []
    t_hand: list[float] = []
    t_zmq: list[float] = []
    t_rtt: list[float] = []
    try:
        for bench in (raw, hand, hand_zmq, echo):
            bench.once()
        deadline = time.monotonic() + budget_s
        for _ in range(reps):
            t_raw.append(raw.once())
            t_rtt.append(echo.once())
            t_hand.append(hand.once())
            t_zmq.append(hand_zmq.once())
            if time.monotonic() > deadline:
                break
    finally:
        for bench in (raw, hand, hand_zmq, echo):
            bench.close()

    def pct(v: list[float], q: float) -> float:
        return round(float(np.percentile(np.array(v) * 1e6, q)), 1)

    return {
        "chunks": 1,
        "layout": layout,
        "bytes": slot_bytes(layout),
        "reps": len(t_hand),
        "handoff_p50_us": pct(t_hand, 50),
        "handoff_p99_us": pct(t_hand, 99),
        # the same handoff answered over ZMQ (pd_reply_by_notif: false)
        "handoff_zmq_answer_p50_us": pct(t_zmq, 50),
        "handoff_zmq_answer_p99_us": pct(t_zmq, 99),
        "raw_nixl_p50_us": pct(t_raw, 50),
        "raw_nixl_p99_us": pct(t_raw, 99),
        "handoff_over_raw_p50": round(pct(t_hand, 50) / max(pct(t_raw, 50), 1e-9), 3),
        # what the handoff adds to moving the bytes: control messages, polling, commit
        "overhead_p50_us": round(pct(t_hand, 50) - pct(t_raw, 50), 1),
        # one ZMQ round trip between two processes, measured alongside
        "zmq_rtt_p50_us": pct(t_rtt, 50),
        # the target: at most 100 us beyond that one round trip
        "overhead_beyond_rtt_p50_us": round(pct(t_hand, 50) - pct(t_raw, 50) - pct(t_rtt, 50), 1),
    }


def plot(
    rows: list[dict[str, float]],
    path: str,
    where: str = "",
    latencies: Sequence[dict[str, Any]] = (),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["bytes"] / 2**20 for r in rows]
    fig, (ax, lax) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1.3]})
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
    ax.set_title(f"KV handoff throughput vs raw NIXL and memcpy (same run{where})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if latencies:
        names, p50, p99 = [], [], []
        for lat in latencies:
            size = f"{lat['bytes'] / 2**20:g} MiB"
            for who, key in (
                ("raw", "raw_nixl"),
                ("handoff", "handoff"),
                ("ZMQ\nanswer", "handoff_zmq_answer"),  # pd_reply_by_notif: false
            ):
                names.append(f"{who}\n{size}")
                p50.append(lat[f"{key}_p50_us"])
                p99.append(lat[f"{key}_p99_us"])
        names.append("ZMQ\nRTT")
        p50.append(latencies[0]["zmq_rtt_p50_us"])
        p99.append(0)
        pos = np.arange(len(names))
        lax.bar(pos - 0.2, p50, 0.4, label="p50")
        lax.bar(pos + 0.2, p99, 0.4, label="p99")
        lax.set_xticks(pos, names, fontsize=7)
        lax.set_yscale("log")
        lax.set_ylabel("µs per request (log)")
        lax.set_title(f"1-chunk latency ({latencies[0]['reps']:.0f} requests)")
        lax.grid(True, axis="y", alpha=0.3)
        lax.legend()
    else:
        lax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="up to 2k tokens, fewer reps")
    parser.add_argument("--reps", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--png", default=None)
    parser.add_argument(
        "--netns", action="store_true", help="across two network namespaces, over TCP"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="buffers in host memory (default) or VRAM (pd_buffer_device)",
    )
    parser.add_argument(
        "--latency-reps",
        type=int,
        default=0,
        help="1-chunk requests timed for p50/p99 (default 100, quick 30)",
    )
    parser.add_argument("--latency-budget-s", type=float, default=60.0)
    parser.add_argument("--peer-ns", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peer-addr", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("LMCACHE_PD_AUTH_SECRET", secrets.token_hex(32))
    if args.netns and args.peer_ns is None:
        return run_in_netns(list(sys.argv[1:] if argv is None else argv))
    global PEERS, DEVICE
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda: torch sees no CUDA device[/red]")
        return 2
    DEVICE = args.device
    if args.peer_ns is not None:
        tcp = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "pd0"}
        PEERS = Placement(
            ("ip", "netns", "exec", args.peer_ns), {**tcp, "LMCACHE_PD_BIND_HOST": args.peer_addr}
        )
    sizes = [1, 2, 4, 8] if args.quick and not args.netns else [1, 2, 4, 8, 16, 32]
    reps = args.reps or (5 if args.quick else 7)
    if args.netns and args.quick and not args.reps:
        reps = 3
    started = time.monotonic()
    rows = []
    for n in sizes:
        gbps = measure(n, reps)
        rows.append(
            {
                "chunks": n,
                "tokens": n * CHUNK,
                "bytes": n * SLOT,
                **{k: round(v, 3) for k, v in gbps.items()},
                "control_overhead_us_per_chunk": round(
                    (1 / gbps["handoff_gbps"] - 1 / gbps["raw_nixl_gbps"]) * SLOT / 1e3, 1
                ),
            }
        )
    lat_reps = args.latency_reps or (30 if args.quick else 100)
    latency = measure_latency(lat_reps, args.latency_budget_s)
    latency_small = measure_latency(lat_reps, args.latency_budget_s, SMALL_LAYOUT_NAME)
    last = rows[-1]
    summary = {
        "layout": "llama-8b",
        "chunk_size": CHUNK,
        "path": "netns veth, UCX_TLS=tcp" if args.netns else "this host, UCX default",
        "device": DEVICE,
        "reps": reps,
        "rows": rows,
        "latency_1_chunk": latency,
        "latency_small_chunk": latency_small,
        "handoff_over_raw_at_max": round(last["handoff_gbps"] / last["raw_nixl_gbps"], 3),
        "handoff_noverify_over_raw_at_max": round(
            last["handoff_noverify_gbps"] / last["raw_nixl_gbps"], 3
        ),
        "raw_over_memcpy_at_max": round(last["raw_nixl_gbps"] / last["memcpy_gbps"], 3),
        "seconds": round(time.monotonic() - started, 1),
    }
    where = ", two netns over TCP" if args.netns else ""
    if DEVICE == "cuda":
        where += ", VRAM buffers"
    table = Table(title=f"lmcache-pd transfer benchmark (llama-8b{where}, GB/s, median)")
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
    lt = Table(title=f"per-request latency of 1 chunk, µs, {latency['reps']} requests")
    for col in ("chunk", "path", "p50 µs", "p99 µs", "added p50 µs", "beyond 1 RTT"):
        lt.add_column(col, justify="right")
    for lat in (latency, latency_small):
        size = f"{lat['bytes'] / 2**20:g} MiB"
        lt.add_row(size, "raw NIXL WRITE", f"{lat['raw_nixl_p50_us']:.0f}",
                   f"{lat['raw_nixl_p99_us']:.0f}", "", "")  # fmt: skip
        lt.add_row(size, "ZMQ round trip", f"{lat['zmq_rtt_p50_us']:.0f}", "", "", "")
        lt.add_row(size, "handoff Push -> Committed", f"{lat['handoff_p50_us']:.0f}",
                   f"{lat['handoff_p99_us']:.0f}", f"{lat['overhead_p50_us']:.0f}",
                   f"{lat['overhead_beyond_rtt_p50_us']:.0f}")  # fmt: skip
        zmq_added = lat["handoff_zmq_answer_p50_us"] - lat["raw_nixl_p50_us"]
        lt.add_row(size, "  answer over ZMQ instead", f"{lat['handoff_zmq_answer_p50_us']:.0f}",
                   f"{lat['handoff_zmq_answer_p99_us']:.0f}", f"{zmq_added:.0f}",
                   f"{zmq_added - lat['zmq_rtt_p50_us']:.0f}")  # fmt: skip
    console.print(lt)
    console.print(
        "added = handoff - raw WRITE; beyond 1 RTT = added - one ZMQ round trip (target <= 100 µs)"
    )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2))
    if args.png:
        plot(rows, args.png, where, (latency, latency_small))
    return 0


def run_in_netns(argv: list[str]) -> int:
    """Make the namespace pair and run this benchmark again inside namespace ``a``."""
    from lmcache_pd.netns import NetnsPair, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        console.print(f"[red]--netns: {reason}[/red]")
        return 2
    with NetnsPair() as pair:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
        cmd += ["--peer-ns", pair.b.ns, "--peer-addr", pair.b.addr]
        proc = pair.a.popen(cmd, env=pair.a.tcp_env())
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
