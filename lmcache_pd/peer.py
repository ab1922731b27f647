"""Standalone sender/receiver processes: the demo, the self-check, benchmarks and tests
run the handoff across real process boundaries with these.

    python -m lmcache_pd.peer receiver --layout tiny --chunk-size 16 [--port 0]
        prints ``READY <endpoint>``, serves until stdin closes (or SIGTERM), then
        prints ``STATS <json>`` (counters, slot usage, pattern verification; with
        ``--check-digests`` every held chunk read once through the verifying
        ``acquire``: ``digests_checked``, failures in ``checksum_failures``).
    python -m lmcache_pd.peer sender --endpoint tcp://... --requests N --tokens L
        prints one ``RESULT <json>`` line per request, then ``STATS <json>``.
    python -m lmcache_pd.peer raw-target --buffer-bytes N
        a bare NIXL agent with one registered buffer (the raw-NIXL baseline of the
        benchmarks): prints ``READY <metadata hex> <address>``; each ``ARM`` line on
        stdin (answered ``ARMED``) makes it poll until the next notification, which
        it prints as ``NOTIF <text>``; stops when stdin closes.
    python -m lmcache_pd.peer echo
        a plain ZMQ ROUTER on ``pd_bind_host`` that sends every message straight back
        (the one-round-trip baseline of ``bench transfer``'s latency view): prints
        ``READY <endpoint>``; stops when stdin closes.

Chunk contents follow :func:`pattern` (derived from the chunk key), so the receiver
verifies every byte it committed without the sender shipping a copy.
Both read the shared secret from ``LMCACHE_PD_AUTH_SECRET`` / the secret file as usual.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np
import zmq

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.config import Config, load_config
from lmcache_pd.control import fine_timer_slack
from lmcache_pd.layout import KVLayout, preset
from lmcache_pd.receiver import Receiver
from lmcache_pd.sender import HandoffError, OutChunk, Sender
from lmcache_pd.tiers import build_tiers
from lmcache_pd.transports.nixl import NixlTransport

_PERIOD = 64 * 1024


class PeerProcess:
    """A ``python -m lmcache_pd.peer ROLE ...`` child whose stdout lines are tagged."""

    def __init__(
        self,
        role: str,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix`` runs the child under a wrapper, e.g. ``ip netns exec NS``."""
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "lmcache_pd.peer", role, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []

    def read_tagged(self, tag: str, timeout_s: float = 60.0) -> str:
        """The rest of the next stdout line that starts with ``tag``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{tag}: peer exited (rc={self.proc.poll()}) first")
            self.lines.append(line)
            if line.startswith(tag + " ") or line.rstrip("\n") == tag:
                return line[len(tag) + 1 :].strip()
        raise TimeoutError(f"peer printed no {tag} within {timeout_s}s")

    def send_line(self, line: str) -> None:
        """One line to the child's stdin (the raw target's ``ARM``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        """The receiver's and raw target's stop signal."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Close stdin, wait for exit, kill if it does not come."""
        self.close_stdin()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def pattern(key: bytes, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
    """Deterministic bytes of a chunk: a 64 KiB block seeded by the key, repeated."""
    block = np.random.default_rng(int.from_bytes(key[:8], "little")).integers(
        0, 256, min(_PERIOD, nbytes), dtype=np.uint8
    )
    if out is None:
        out = np.empty(nbytes, dtype=np.uint8)
    reps = -(-nbytes // block.size)
    out[:nbytes] = np.tile(block, reps)[:nbytes]
    return out


def verify_pattern(key: bytes, data: memoryview | bytes) -> bool:
    arr = np.frombuffer(data, dtype=np.uint8)
    return bool(np.array_equal(arr, pattern(key, arr.size)))


def _config(args: argparse.Namespace) -> tuple[Config, KVLayout]:
    overrides: dict[str, object] = {"chunk_size": args.chunk_size}
    if args.buffer_bytes:
        overrides["pd_buffer_size"] = args.buffer_bytes
    if args.lease_ttl:
        overrides["pd_lease_ttl_s"] = args.lease_ttl
    if args.timeout:
        overrides["pd_connect_timeout_s"] = args.timeout
        overrides["pd_transfer_timeout_s"] = args.timeout
    if args.cpu_store_bytes:
        overrides["local_cpu"] = True
        overrides["max_local_cpu_size"] = args.cpu_store_bytes / 1e9
    return load_config(args.config, overrides), preset(args.layout)


def run_receiver(args: argparse.Namespace) -> int:
    cfg, layout = _config(args)
    store = build_tiers(cfg, layout) if args.cpu_store_bytes else None
    transport = NixlTransport(bind_host=cfg.pd_bind_host)
    rx = Receiver(cfg, layout, transport, port=args.port, store=store).start()
    print(f"READY {rx.endpoint}", flush=True)
    _stdin_closed().wait()
    verified = bad = 0
    if args.verify:
        with rx._lock:
            keys = list(rx._ready)
        for key in keys:
            data = rx.read(key)
            if data is not None:
                ok = verify_pattern(key, data)
                verified += ok
                bad += not ok
    checked = 0
    if args.check_digests:
        with rx._lock:
            keys = list(rx._ready)
        for key in keys:
            checked += rx.acquire([key])[0] is not None
            rx.release([key])
    stats = {
        **rx.stats(),
        "pattern_verified": verified,
        "pattern_bad": bad,
        "digests_checked": checked,
    }
    rx.close()
    transport.close()  # before exit: an agent left to interpreter teardown may abort
    if store is not None:
        store.close()
    print("STATS " + json.dumps(stats), flush=True)
    return 0


def _stdin_closed() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def wait_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    return stop


def run_raw_target(args: argparse.Namespace) -> int:
    """Polls notifications only while armed (an ``ARM`` line on stdin, answered with
    ``ARMED``, until the next notification), like our receiver polls only while a lease
    is outstanding: an idle target takes no CPU from the measurements beside it."""
    from lmcache_pd.buffer import host_buffer

    transport = NixlTransport()
    buf = host_buffer(args.buffer_bytes)
    transport.register(buf.ctypes.data, buf.size)
    print(f"READY {transport.metadata().hex()} {buf.ctypes.data}", flush=True)
    stop, armed = threading.Event(), threading.Event()
    armed.set()  # until the first notification: the initiator's connect needs our progress

    def on_sigterm(*_: object) -> None:
        stop.set()
        armed.set()

    signal.signal(signal.SIGTERM, on_sigterm)

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "ARM":
                armed.set()
                print("ARMED", flush=True)
        stop.set()
        armed.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    fine_timer_slack()  # as the receiver's loop thread: a 50 us gap lasts 50 us
    while not stop.is_set():
        if not armed.is_set():
            armed.wait()
            continue
        notifs = transport.notifications()
        if notifs:  # before the print: the next ARM may follow it at once
            armed.clear()
        for _peer, text in notifs:
            print(f"NOTIF {text.decode(errors='replace')}", flush=True)
        # the receiver's gap while a transfer is due (after a Push/Done): 50 us
        stop.wait(50e-6)
    transport.close()
    return 0


def run_echo(args: argparse.Namespace) -> int:
    """Answers each message with itself: one network round trip, no work."""
    cfg, _ = _config(args)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port(f"tcp://{cfg.pd_bind_host}")
    print(f"READY tcp://{cfg.pd_bind_host}:{port}", flush=True)
    stop = _stdin_closed()
    while not stop.is_set():
        if sock.poll(200):
            sock.send_multipart(sock.recv_multipart())
    sock.close()
    ctx.term()
    return 0


def make_requests(n: int, tokens: int, seed: int = 0, vocab: int = 32000) -> list[list[int]]:
    """``n`` prompts of ``tokens`` tokens; every odd one shares its first half with the
    previous prompt (so a receiver can dedupe those chunks)."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    for i in range(n):
        fresh = rng.integers(0, vocab, tokens).tolist()
        if i % 2 == 1:
            half = tokens // 2
            fresh = out[-1][:half] + fresh[half:]
        out.append(fresh)
    return out


class RequestRow(TypedDict, total=False):
    """One request's outcome in :func:`send_requests` (printed as JSON by the sender)."""

    req_id: str
    tokens: int
    ok: bool
    chunks: int
    sent: int
    dedup: int
    bytes: int
    seconds: float
    error: str


def send_requests(
    tx: Sender,
    endpoint: str,
    hasher: ChunkHasher,
    prompts: Sequence[Sequence[int]],
    on_result: Callable[[RequestRow], object] | None = None,
) -> list[RequestRow]:
    """Gather (pattern-fill) and send each prompt's chunks; one result row per prompt."""
    bpt = tx.layout.bytes_per_token
    results: list[RequestRow] = []
    for i, tokens in enumerate(prompts):
        keys = hasher.keys(tokens, include_partial=tx.cfg.save_unfull_chunk)
        sizes = [
            min(hasher.chunk_size, len(tokens) - j * hasher.chunk_size) * bpt
            for j in range(len(keys))
        ]
        slots = tx.alloc(len(keys))
        try:
            chunks = []
            for key, slot, nbytes in zip(keys, slots, sizes, strict=True):
                pattern(key, nbytes, np.frombuffer(tx.buffer.view(slot, nbytes), dtype=np.uint8))
                chunks.append(OutChunk(key, slot, nbytes, tx.checksum(slot, nbytes)))
            res = tx.send(endpoint, f"req-{i}", chunks)
            row: RequestRow = {
                "req_id": res.req_id,
                "tokens": len(tokens),
                "chunks": res.chunks,
                "sent": res.sent,
                "dedup": res.dedup,
                "bytes": res.bytes,
                "seconds": res.seconds,
                "ok": True,
            }
        except HandoffError as exc:
            row = {"req_id": f"req-{i}", "tokens": len(tokens), "ok": False, "error": str(exc)}
        finally:
            tx.free(slots)
        results.append(row)
        if on_result is not None:
            on_result(row)
    return results


def run_sender(args: argparse.Namespace) -> int:
    cfg, layout = _config(args)
    transport = NixlTransport()
    tx = Sender(cfg, layout, transport)
    hasher = ChunkHasher(layout.fingerprint(), cfg.chunk_size, cfg.hash_algorithm)
    prompts = make_requests(args.requests, args.tokens, args.seed)
    rows = send_requests(
        tx, args.endpoint, hasher, prompts, lambda r: print("RESULT " + json.dumps(r), flush=True)
    )
    print("STATS " + json.dumps(tx.counters.snapshot()), flush=True)
    tx.close()
    transport.close()
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcache_pd.peer")
    parser.add_argument("role", choices=["receiver", "sender", "raw-target", "echo"])
    parser.add_argument("--layout", default="tiny")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--buffer-bytes", type=int, default=0)
    parser.add_argument("--lease-ttl", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=0.0)
    parser.add_argument("--config", default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--verify", action="store_true", help="receiver: check pattern bytes")
    parser.add_argument(
        "--check-digests",
        action="store_true",
        help="receiver: at exit, read every held chunk through the checksum-verifying acquire",
    )
    parser.add_argument(
        "--cpu-store-bytes", type=int, default=0, help="receiver: a CPU tier behind the buffer"
    )
    parser.add_argument("--endpoint", default="")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    started = time.monotonic()
    runners = {
        "receiver": run_receiver,
        "sender": run_sender,
        "raw-target": run_raw_target,
        "echo": run_echo,
    }
    rc = runners[args.role](args)
    logging.getLogger(__name__).debug("%s ran %.1fs", args.role, time.monotonic() - started)
    return rc


if __name__ == "__main__":
    sys.exit(main())
