"""Benchmark of the CPU and disk tiers against the plain copies they wrap.

In one run, on the same bytes (``llama-8b`` chunks of ``chunk_size`` tokens, 32 MiB):

* CPU put / get (``get_into`` a preallocated buffer) vs ``memcpy`` (libc memcpy between
  preallocated, prefaulted buffers) -> ``cpu_put_over_memcpy``, ``cpu_get_over_memcpy``;
* disk write (write-behind, timed until flushed) / read (checksum verified) vs a plain
  sequential write / read of the same bytes into one file (read in the tier's
  ``BLOCK``-sized pieces, the faster way here) -> ``disk_write_over_file``,
  ``disk_read_over_file``. Both sides go through the page cache, no fsync;
* hit-path lookup cost in µs per chunk with 100k chunks held (index only: 64-byte
  payloads in the CPU tier; disk index entries without files), plus hashing a prompt.

Targets: each ratio >= 0.7. Each figure is the median of ``--reps`` interleaved rounds.
Run ``python benchmarks/tiers.py [--quick] --json F --png P`` or
``lmcache-pd bench tiers ...``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.layout import preset
from lmcache_pd.tiers import CPUStore, DiskStore, TieredStore
from lmcache_pd.tiers.disk import BLOCK, HEADER_SIZE

sys.path.append(str(Path(__file__).resolve().parent))  # benchmarks/_common.py
import _common as shared

TARGET = 0.7
RATIOS = (
    "cpu_put_over_memcpy",
    "cpu_get_over_memcpy",
    "disk_write_over_file",
    "disk_read_over_file",
)


def bench_cpu(src: list[np.ndarray], slot: int, reps: int) -> dict[str, float]:
    n = len(src)
    total = n * slot
    store = CPUStore(n * slot, slot, prefault=True)
    dst = np.empty((n, slot), dtype=np.uint8)
    dst[:, ::4096] = 1  # prefault
    out = np.empty(slot, dtype=np.uint8)
    out[::4096] = 1
    keys = [shared.chunk_key(i) for i in range(n)]
    samples: dict[str, list[float]] = {k: [] for k in ("memcpy_put", "put", "memcpy_get", "get")}
    samples["get_alloc"] = []

    src_addr = [int(a.ctypes.data) for a in src]
    dst_addr = [int(dst[i].ctypes.data) for i in range(n)]
    out_addr = int(out.ctypes.data)

    def memcpy_put() -> None:  # libc memcpy via ctypes: the floor for any copy
        for i in range(n):
            ctypes.memmove(dst_addr[i], src_addr[i], slot)

    def put() -> None:
        for i in range(n):
            store.put(keys[i], src[i])

    def memcpy_get() -> None:
        for i in range(n):
            ctypes.memmove(out_addr, dst_addr[i], slot)

    def get() -> None:
        for i in range(n):
            store.get_into(keys[i], out)

    def get_alloc() -> None:
        for i in range(n):
            store.get(keys[i])

    for rep in range(reps + 1):  # round 0 warms up
        store.clear()
        row = shared.timed_in_turn([("memcpy_put", memcpy_put), ("put", put)], rep)
        row |= shared.timed_in_turn([("memcpy_get", memcpy_get), ("get", get)], rep)
        row["get_alloc"] = shared.timed(get_alloc)
        if rep:
            for k, v in row.items():
                samples[k].append(v)
    for i in range(n):
        assert store.get(keys[i]) == src[i].tobytes(), "CPU tier returned wrong bytes"
    gbps = shared.median_gbps(samples, total)
    return {
        "memcpy_put_gbps": gbps["memcpy_put"],
        "put_gbps": gbps["put"],
        "memcpy_get_gbps": gbps["memcpy_get"],
        "get_into_gbps": gbps["get"],
        "get_alloc_gbps": gbps["get_alloc"],
        "pinned_memory": float(store.pinned_memory),
    }


def bench_disk(src: list[np.ndarray], slot: int, reps: int, root: Path) -> dict[str, float]:
    n = len(src)
    total = n * slot
    fp = preset("llama-8b").fingerprint()
    store = DiskStore(root / "tier", 4 * total + n * HEADER_SIZE, fp, queue_size=max(64, n))
    plain = root / "plain.bin"
    out = np.empty(slot, dtype=np.uint8)
    out[::4096] = 1
    samples: dict[str, list[float]] = {k: [] for k in ("file_write", "write", "file_read", "read")}

    def file_write() -> None:
        with open(plain, "wb", buffering=0) as f:
            for a in src:
                view = memoryview(a)
                while view.nbytes:
                    view = view[f.write(view) :]

    blocks = [memoryview(out)[i : i + BLOCK] for i in range(0, slot, BLOCK)]

    def file_read() -> None:  # block by block: faster here than one 32 MiB read (measured)
        fd = os.open(plain, os.O_RDONLY)
        try:
            pos = 0
            for _ in range(n):
                for block in blocks:
                    pos += os.preadv(fd, [block], pos)
        finally:
            os.close(fd)

    keys: list[bytes] = []

    def write() -> None:
        for i in range(n):
            store.put(keys[i], src[i], on_written=lambda: None)  # borrowed, as from CPU
        store.flush()

    def read() -> None:
        for i in range(n):
            if store.get_into(keys[i], out) is None:
                raise RuntimeError("disk tier missed a chunk it just wrote")

    try:
        for rep in range(reps + 1):
            keys[:] = [shared.chunk_key(i, rep) for i in range(n)]
            plain.unlink(missing_ok=True)
            # alternate which side goes first, and start each write with no dirty pages
            # pending, so neither side inherits the other's writeback throttling
            order = ("file", "tier") if rep % 2 else ("tier", "file")
            t: dict[str, float] = {}
            for side in order:
                os.sync()
                t[f"{side}_write"] = shared.timed(file_write if side == "file" else write)
            for side in order:
                t[f"{side}_read"] = shared.timed(file_read if side == "file" else read)
            t_file_write, t_write = t["file_write"], t["tier_write"]
            t_file_read, t_read = t["file_read"], t["tier_read"]
            if rep:
                samples["file_write"].append(t_file_write)
                samples["write"].append(t_write)
                samples["file_read"].append(t_file_read)
                samples["read"].append(t_read)
            for key in keys:
                store.evict(key)
        stats = store.stats()
        assert stats["dropped_writes"] == 0 and stats["corrupt_files"] == 0, stats
    finally:
        store.close()
        plain.unlink(missing_ok=True)
    gbps = shared.median_gbps(samples, total)
    return {
        "file_write_gbps": gbps["file_write"],
        "write_gbps": gbps["write"],
        "file_read_gbps": gbps["file_read"],
        "read_gbps": gbps["read"],
    }


def bench_lookup(held: int, prompt_chunks: int, rounds: int, root: Path) -> dict[str, float]:
    """µs per chunk of the hit path with ``held`` chunks indexed in each tier (index
    only: 64-byte payloads in the CPU tier, disk index entries without files). The
    prompt's first half is in CPU, all of it on disk."""
    layout = preset("llama-8b")
    hasher = ChunkHasher(layout.fingerprint(), 256)
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 128_000, prompt_chunks * 256)]
    keys = hasher.keys(tokens)
    half = keys[: prompt_chunks // 2]
    tiny = b"\0" * 64
    cpu = CPUStore(held * 64, 64, backend="numpy")
    t0 = time.perf_counter()
    for i in range(held - len(half)):
        cpu.put(shared.chunk_key(i, 7), tiny)
    for key in half:
        cpu.put(key, tiny)
    fill_s = time.perf_counter() - t0
    disk = DiskStore(root / "lookup", 1 << 60, layout.fingerprint())
    for i in range(held - prompt_chunks):  # index-only entries: no files written
        disk._index[shared.chunk_key(i, 9)] = 64
    for key in keys:
        disk._index[key] = 64
    both = TieredStore(cpu, disk)
    disk_only = TieredStore(None, disk)

    def per_chunk(fn: Callable[[], int], expect: int) -> float:
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            hit = fn()
            best = min(best, time.perf_counter() - t)
            assert hit == expect, (hit, expect)
        return best / expect * 1e6

    res = {
        "held_chunks": float(held),
        "prompt_chunks": float(prompt_chunks),
        "cpu_index_us_per_chunk": per_chunk(lambda: cpu.contains(half), len(half)),
        "disk_index_us_per_chunk": per_chunk(lambda: disk_only.contains(keys), prompt_chunks),
        "tiered_us_per_chunk": per_chunk(lambda: both.contains(keys), prompt_chunks),
        "hash_and_lookup_us_per_chunk": per_chunk(
            lambda: both.lookup(tokens, hasher, log_line=False).hit_chunks, prompt_chunks
        ),
        "fill_cpu_index_s": fill_s,
    }
    disk.close()
    return res


def _table(result: dict[str, Any]) -> None:
    c, d, r, lk = result["cpu"], result["disk"], result["ratios"], result["lookup"]
    rows = [
        ("CPU put vs memcpy", c["put_gbps"], c["memcpy_put_gbps"], r["cpu_put_over_memcpy"]),
        ("CPU get vs memcpy", c["get_into_gbps"], c["memcpy_get_gbps"], r["cpu_get_over_memcpy"]),
        ("disk write vs file", d["write_gbps"], d["file_write_gbps"], r["disk_write_over_file"]),
        ("disk read vs file", d["read_gbps"], d["file_read_gbps"], r["disk_read_over_file"]),
    ]
    note = (
        f"lookup at {int(lk['held_chunks'])} chunks held: CPU {lk['cpu_index_us_per_chunk']:.3f} "
        f"µs/chunk, disk {lk['disk_index_us_per_chunk']:.3f}, CPU+disk "
        f"{lk['tiered_us_per_chunk']:.3f}, hashing + lookup "
        f"{lk['hash_and_lookup_us_per_chunk']:.3f} µs/chunk; CPU get with allocation "
        f"{c['get_alloc_gbps']:.2f} GB/s"
    )
    shared.print_ratio_table(
        f"tiers: {result['chunks']} x {result['chunk_bytes'] >> 20} MiB llama-8b chunks",
        "baseline GB/s",
        rows,
        TARGET,
        [note],
    )


def _plot(result: dict[str, Any], path: Path) -> None:
    c, d, r, lk = result["cpu"], result["disk"], result["ratios"], result["lookup"]
    fig, (ax, ax2) = shared.pyplot().subplots(
        1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1.4]}
    )
    shared.ratio_bars(
        ax,
        ["CPU put", "CPU get", "disk write", "disk read"],
        [c["put_gbps"], c["get_into_gbps"], d["write_gbps"], d["read_gbps"]],
        [c["memcpy_put_gbps"], c["memcpy_get_gbps"], d["file_write_gbps"], d["file_read_gbps"]],
        [r[key] for key in RATIOS],
        ("baseline (memcpy / plain file)", "lmcache-pd tier"),
    )
    ax.set_title(f"{result['chunks']} x {result['chunk_bytes'] >> 20} MiB llama-8b chunks")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    labels = ["CPU", "disk", "CPU+disk", "hash+lookup"]
    values = [
        lk["cpu_index_us_per_chunk"],
        lk["disk_index_us_per_chunk"],
        lk["tiered_us_per_chunk"],
        lk["hash_and_lookup_us_per_chunk"],
    ]
    ax2.bar(labels, values, color="#2ca02c")
    ax2.set_ylabel("µs per chunk")
    ax2.set_title(f"hit-path lookup, {int(lk['held_chunks']) // 1000}k chunks held")
    ax2.tick_params(axis="x", labelsize=8)
    shared.save_figure(fig, path)


def run(quick: bool, chunks: int | None, reps: int | None, workdir: Path | None) -> dict[str, Any]:
    src, reps = shared.chunk_rounds(quick, chunks, reps)
    slot = src[0].nbytes
    root = Path(tempfile.mkdtemp(prefix="lmcache-pd-bench-tiers-", dir=workdir))
    t0 = time.perf_counter()
    try:
        cpu = bench_cpu(src, slot, reps)
        disk = bench_disk(src, slot, reps, root)
        lookup = bench_lookup(100_000, 512, 5 if quick else 20, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = {
        "cpu_put_over_memcpy": cpu["put_gbps"] / cpu["memcpy_put_gbps"],
        "cpu_get_over_memcpy": cpu["get_into_gbps"] / cpu["memcpy_get_gbps"],
        "disk_write_over_file": disk["write_gbps"] / disk["file_write_gbps"],
        "disk_read_over_file": disk["read_gbps"] / disk["file_read_gbps"],
    }
    return {
        **shared.run_header("tiers", quick),
        **shared.rounds_header(src, reps),
        "workdir": str(workdir or tempfile.gettempdir()),
        "cpu": cpu,
        "disk": disk,
        "lookup": lookup,
        **shared.ratio_summary(ratios, TARGET, t0),
        "notes": "medians of interleaved rounds; disk figures are page-cache figures "
        "(no fsync on either side); CPU get = get_into a preallocated buffer",
    }


def main(argv: list[str] | None = None) -> int:
    parser = shared.rounds_parser(__doc__)
    parser.add_argument("--dir", type=Path, help="directory for the disk tier (default tmp)")
    shared.add_output_args(parser)
    args = parser.parse_args(argv)
    return shared.report(run(args.quick, args.chunks, args.reps, args.dir), args, _table, _plot)


if __name__ == "__main__":
    raise SystemExit(main())
