"""Benchmark of the remote tier (Redis/Valkey) against raw redis-py on the same server.

In one run, against one ``redis-server`` started on a free loopback port (or ``--url``):

* put: ``RemoteStore.put`` of ``--chunks`` llama-8b chunks (32 MiB each at 256 tokens)
  with the bytes lent, as ``TieredStore`` lends its pinned CPU slots, timed until the
  write-behind queue is flushed (checksum, header, existence check, ``SET``), vs a raw
  redis-py pipeline ``SET`` of the same bytes -> ``put_over_raw``; also the put of a
  caller that keeps its buffer (one copy more), ``put_copy_gbps``;
* get: ``RemoteStore.get_many`` of those chunks (one round trip, header and xxh3-64
  checksum verified) vs a raw pipelined ``GET`` of the same bytes -> ``get_over_raw``;
* lookup of a 32k-token prompt (128 chunks, small values): ours (one ``EVALSHA`` that
  answers per key, no values moved) vs one ``MGET`` of the same keys (which moves the
  values), a pipeline of 128 ``EXISTS`` (our fallback where scripts are refused) and one
  variadic ``EXISTS`` (a count only, no per-key answer), in µs; server read events.

Target: put and get ratios >= 0.8. Figures are medians of ``--reps`` interleaved rounds.
Run ``python benchmarks/remote.py [--quick] --json F --png P`` or
``lmcache-pd bench remote ...``.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from lmcache_pd.layout import preset
from lmcache_pd.tiers.redis_server import RedisServer
from lmcache_pd.tiers.remote import RemoteStore
from lmcache_pd.tiers.remote_url import parse_remote_url

sys.path.append(str(Path(__file__).resolve().parent))  # benchmarks/_common.py
import _common as shared

TARGET = 0.8
RATIOS = ("put_over_raw", "get_over_raw")
PROMPT_CHUNKS = 128  # a 32k-token prompt


def bench_bandwidth(url: str, src: list[np.ndarray], reps: int) -> dict[str, float]:
    layout = preset("llama-8b")
    n, slot = len(src), src[0].nbytes
    total = n * slot
    store = RemoteStore(
        url, layout.fingerprint(), shared.CHUNK_TOKENS, timeout_s=10.0, queue_size=n
    )
    raw = raw_client(url)
    default = redis.Redis(**parse_remote_url(url).client_kwargs(), socket_timeout=30)
    samples: dict[str, list[float]] = {
        k: [] for k in ("raw_put", "raw_put_default_packer", "put", "put_copy", "raw_get", "get")
    }
    views = [memoryview(a) for a in src]
    keys: list[bytes] = []
    copy_keys: list[bytes] = []
    raw_keys: list[bytes] = []
    got: list[Any] = []

    def raw_put() -> None:
        pipe = raw.pipeline(transaction=False)
        for rk, v in zip(raw_keys, views, strict=True):
            pipe.set(rk, v)
        pipe.execute()

    def raw_put_default_packer() -> None:
        pipe = default.pipeline(transaction=False)
        for rk, v in zip(raw_keys, views, strict=True):
            pipe.set(rk, v)
        pipe.execute()

    def put() -> None:
        for k, v in zip(keys, views, strict=True):
            if not store.put(k, v, on_written=lambda: None):  # lent, as from CPU slots
                raise RuntimeError("remote tier dropped a write")
        if not store.flush(120):
            raise RuntimeError("remote tier writes did not finish")

    def put_copy() -> None:
        for k, v in zip(copy_keys, views, strict=True):
            if not store.put(k, v):
                raise RuntimeError("remote tier dropped a write")
        if not store.flush(120):
            raise RuntimeError("remote tier writes did not finish")

    def raw_get() -> None:
        pipe = raw.pipeline(transaction=False)
        for rk in raw_keys:
            pipe.get(rk)
        got[:] = pipe.execute()

    def get() -> None:
        got[:] = store.get_many(keys)

    try:
        for rep in range(reps + 1):  # round 0 warms up
            keys[:] = [shared.chunk_key(i, rep) for i in range(n)]
            copy_keys[:] = [shared.chunk_key(i, rep + 500) for i in range(n)]
            raw_keys[:] = [b"bench-raw:" + k.hex().encode() for k in keys]
            puts = [
                ("raw_put", raw_put),
                ("put", put),
                ("put_copy", put_copy),
                ("raw_put_default_packer", raw_put_default_packer),
            ]
            row = shared.timed_in_turn(puts, rep)
            gets = [("raw_get", raw_get), ("get", get)]
            for name, fn in gets if rep % 2 else gets[::-1]:  # alternate who goes first
                row[name] = shared.timed(fn)
                if name == "get":
                    for i, g in enumerate(got):
                        if g is None or g != views[i]:
                            raise RuntimeError(f"remote tier returned wrong bytes for chunk {i}")
            got.clear()
            raw.delete(*raw_keys, *[store.redis_key(k) for k in keys + copy_keys])
            if rep:
                for k, v in row.items():
                    samples[k].append(v)
        stats = store.stats()
        if stats["corrupt_files"] or stats["dropped_writes"]:
            raise RuntimeError(f"remote tier counted problems: {stats}")
    finally:
        store.close()
        raw.close()
        default.close()
    return {f"{k}_gbps": v for k, v in shared.median_gbps(samples, total).items()}


def raw_client(url: str) -> redis.Redis:
    """The raw baseline: redis-py with its pure-Python command packer, which sends a
    large value as its own buffer. (With hiredis installed redis-py packs commands with
    hiredis, which copies every value into one string: ~3x slower SETs of 32 MiB here;
    measured too, as ``raw_put_default_packer``, but not used as the baseline.)"""
    encoder = redis.connection.Encoder("utf-8", "strict", False)
    kwargs = parse_remote_url(url).client_kwargs()
    cls: type[redis.connection.AbstractConnection] = redis.connection.Connection
    if kwargs.pop("ssl", False):
        cls = redis.connection.SSLConnection
    if "unix_socket_path" in kwargs:
        cls = redis.connection.UnixDomainSocketConnection
        kwargs["path"] = kwargs.pop("unix_socket_path")
    pool = redis.ConnectionPool(
        connection_class=cls,
        **kwargs,
        socket_timeout=30,
        command_packer=redis.connection.PythonRespSerializer(6000, encoder.encode),
    )
    return redis.Redis(connection_pool=pool)


def _read_events(client: redis.Redis) -> int:
    return int(client.info("stats")["total_reads_processed"])


def bench_lookup(url: str, rounds: int) -> dict[str, float]:
    layout = preset("llama-8b")
    store = RemoteStore(
        url, layout.fingerprint(), shared.CHUNK_TOKENS, timeout_s=10.0, queue_size=PROMPT_CHUNKS
    )
    client = redis.Redis(**parse_remote_url(url).client_kwargs(), socket_timeout=30)
    keys = [shared.chunk_key(i, 999) for i in range(PROMPT_CHUNKS)]
    rkeys = [store.redis_key(k) for k in keys]
    try:
        for i, k in enumerate(keys):  # small values: the lookup's cost, not the bytes'
            store.put(k, i.to_bytes(4, "little") * 256)
        store.flush(60)

        def best(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(rounds):
                times.append(shared.timed(fn))
            return statistics.median(times) * 1e6

        ours = best(lambda: store.contains(keys))

        def pipelined() -> None:
            pipe = client.pipeline(transaction=False)
            for rk in rkeys:
                pipe.exists(rk)
            pipe.execute()

        pipeline = best(pipelined)
        mget = best(lambda: client.mget(rkeys))
        exists_count = best(lambda: client.exists(*rkeys))
        ping = best(client.ping)
        if store.contains(keys) != PROMPT_CHUNKS:
            raise RuntimeError("lookup did not find the prompt's chunks")
        # server read events: INFO, then the operation, then INFO; PING for reference
        ev: dict[str, int] = {}
        for name, fn in (("ping", client.ping), ("lookup", lambda: store.contains(keys))):
            a = _read_events(client)
            fn()
            ev[name] = _read_events(client) - a
        client.delete(*rkeys)
    finally:
        store.close()
        client.close()
    return {
        "prompt_chunks": float(PROMPT_CHUNKS),
        "lookup_us": ours,
        "mget_us": mget,
        "pipelined_exists_us": pipeline,
        "exists_count_us": exists_count,
        "ping_us": ping,
        "mget_over_lookup": mget / ours,
        "lookup_read_events": float(ev["lookup"]),
        "ping_read_events": float(ev["ping"]),
    }


def _table(result: dict[str, Any]) -> None:
    b, lk, r = result["bandwidth"], result["lookup"], result["ratios"]
    rows = [
        (
            "put, lent (until flushed) vs pipelined SET",
            b["put_gbps"],
            b["raw_put_gbps"],
            r["put_over_raw"],
        ),
        ("get_many vs pipelined GET", b["get_gbps"], b["raw_get_gbps"], r["get_over_raw"]),
    ]
    notes = [
        f"put of a caller that keeps its buffer (copied): {b['put_copy_gbps']:.2f} GB/s; "
        f"raw SET with redis-py's default packer (hiredis: {result['hiredis']}): "
        f"{b['raw_put_default_packer_gbps']:.2f} GB/s",
        f"lookup of {int(lk['prompt_chunks'])} chunks (32k tokens): {lk['lookup_us']:.0f} µs "
        f"(one EVALSHA, {int(lk['lookup_read_events'])} server read events incl. the "
        f"INFO, PING: {int(lk['ping_read_events'])}); one MGET {lk['mget_us']:.0f} µs "
        f"({lk['mget_over_lookup']:.2f}x ours); pipeline of EXISTS "
        f"{lk['pipelined_exists_us']:.0f} µs; variadic EXISTS (count only) "
        f"{lk['exists_count_us']:.0f} µs; PING {lk['ping_us']:.0f} µs",
    ]
    shared.print_ratio_table(
        f"remote tier: {result['chunks']} x {result['chunk_bytes'] >> 20} MiB llama-8b "
        f"chunks, redis-server {result['server_version']} on loopback",
        "raw redis-py GB/s",
        rows,
        TARGET,
        notes,
    )


def _plot(result: dict[str, Any], path: Path) -> None:
    b, lk, r = result["bandwidth"], result["lookup"], result["ratios"]
    fig, (ax, ax2) = shared.pyplot().subplots(
        1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [2, 1.6]}
    )
    shared.ratio_bars(
        ax,
        ["put", "get"],
        [b["put_gbps"], b["get_gbps"]],
        [b["raw_put_gbps"], b["raw_get_gbps"]],
        [r[key] for key in RATIOS],
        ("raw redis-py pipeline (SET / GET)", "lmcache-pd remote tier"),
    )
    ax.set_title(f"{result['chunks']} x {result['chunk_bytes'] >> 20} MiB chunks, loopback")
    ax.legend(fontsize=8, loc="upper left")
    labels = ["ours\n(EVALSHA)", "one MGET", "EXISTS\npipeline", "EXISTS\n(count)", "PING"]
    values = [
        lk["lookup_us"],
        lk["mget_us"],
        lk["pipelined_exists_us"],
        lk["exists_count_us"],
        lk["ping_us"],
    ]
    ax2.bar(labels, values, color=["#1f77b4", "#999999", "#aaaaaa", "#bbbbbb", "#dddddd"])
    ax2.set_ylabel("µs")
    ax2.set_title(f"lookup of {int(lk['prompt_chunks'])} chunks (32k tokens)")
    ax2.tick_params(axis="x", labelsize=8)
    shared.save_figure(fig, path)


def run(quick: bool, chunks: int | None, reps: int | None, url: str | None) -> dict[str, Any]:
    src, reps = shared.chunk_rounds(quick, chunks, reps)
    server = None if url else RedisServer()
    url = url or server.url  # type: ignore[union-attr]
    t0 = time.perf_counter()
    try:
        version = redis.Redis(**parse_remote_url(url).client_kwargs()).info("server")
        bandwidth = bench_bandwidth(url, src, reps)
        lookup = bench_lookup(url, 50 if quick else 200)
    finally:
        if server is not None:
            server.stop()
    ratios = {
        "put_over_raw": bandwidth["put_gbps"] / bandwidth["raw_put_gbps"],
        "get_over_raw": bandwidth["get_gbps"] / bandwidth["raw_get_gbps"],
    }
    return {
        **shared.run_header("remote", quick),
        "redis_py": redis.__version__,
        "hiredis": importlib.util.find_spec("hiredis") is not None,
        "server_version": version.get("redis_version", "?"),
        **shared.rounds_header(src, reps),
        "bandwidth": bandwidth,
        "lookup": lookup,
        **shared.ratio_summary(ratios, TARGET, t0),
        "notes": "medians of interleaved rounds on one loopback redis-server; put is timed "
        "until the write-behind queue is flushed; get verifies header and checksum",
    }


def main(argv: list[str] | None = None) -> int:
    parser = shared.rounds_parser(__doc__)
    parser.add_argument("--url", help="use this server (redis://...) instead of starting one")
    shared.add_output_args(parser)
    args = parser.parse_args(argv)
    return shared.report(run(args.quick, args.chunks, args.reps, args.url), args, _table, _plot)


if __name__ == "__main__":
    raise SystemExit(main())
