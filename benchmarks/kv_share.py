"""KV shared between two kv_both engines: TTFT with a prefix held only in Redis, or only
in a peer engine's CPU tier (peer-to-peer fetch over NIXL), vs recomputing it.

    python benchmarks/kv_share.py [--quick] --json F --png P
    lmcache-pd bench kv_share [--quick] --json F --png P

One run, one redis-server on loopback, two ``kv_both`` engines A and B (core 0 and core 1,
``VLLM_CPU_OMP_THREADS_BIND``) with ``remote_url`` to it and ``enable_p2p`` on, a
random-weight Llama built locally (hidden 1024 x 8 layers, as ``bench e2e``: big enough
that prefill costs something on CPU), vLLM's prefix cache off. For each shared-prefix
length L (2k and 4k tokens) and each repetition, with a fresh random prefix P each time
and B's prompt P + a 16-token suffix:

* ``recompute``: B has never seen P: it computes all of it;
* ``redis``: A served P first (its chunks were written behind to Redis); the holder
  index is cleared, so B finds P only as values in Redis and loads them (one batched
  lookup, one pipelined GET);
* ``p2p``: A served P first; the chunk values are deleted from Redis, so only A's CPU
  tier holds P: B's lookup learns A holds it, A pushes the chunks into B's receive buffer
  over NIXL (``FetchKeys``), B loads them.

TTFT = time to the first streamed token of B's request. Ratios are recompute TTFT over
each path's TTFT, per length, measured in the same run (target: >= 3x). Figures on a
shared CPU box are noisy: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from lmcache_pd.integration.vllm.launch import VLLMServer
from lmcache_pd.tiers.redis_server import RedisServer, redis_server_binary

sys.path.append(str(Path(__file__).resolve().parent))  # benchmarks/_common.py
import _common as shared

PATHS = ("recompute", "redis", "p2p")
SUFFIX = 16
HOLDER_MARK = b":p2p:"  # holder-index keys (lmcache_pd.tiers.remote.RemoteStore.holder_key)


def ttft(url: str, prompt: list[int]) -> float:
    """Seconds to the first streamed token of a greedy 2-token completion."""
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                payload = json.loads(line[5:])
                if payload.get("choices") and payload["choices"][0].get("text") is not None:
                    return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


class Bench:
    def __init__(self, a: argparse.Namespace, model: Path, work: Path, redis: RedisServer) -> None:
        self.a = a
        self.work = work
        self.redis = redis
        self.client = redis.client()
        self.rng = random.Random(a.seed)
        cores = os.cpu_count() or 1
        self.engines = [
            VLLMServer(
                model,
                work / f"{name}.log",
                name=name,
                max_model_len=a.max_model_len,
                kv_cache_space_gb=2,
                extra_args=["--no-enable-prefix-caching"],
                kv_transfer_config=self.connector(),
                env={} if a.no_bind or cores < 2 else {"VLLM_CPU_OMP_THREADS_BIND": str(core)},
            )
            for core, name in enumerate(("kv_both-a", "kv_both-b"))
        ]

    def connector(self) -> dict[str, Any]:
        chunk_bytes = self.a.bytes_per_token * self.a.chunk_size
        room = (max(self.a.lengths) // self.a.chunk_size + 2) * chunk_bytes
        return shared.connector_config(
            "kv_both",
            chunk_size=self.a.chunk_size,
            local_cpu=True,
            max_local_cpu_size=2.0,
            remote_url=self.redis.url,
            remote_timeout_s=5.0,
            remote_write_queue_size=256,
            enable_p2p=True,
            pd_peer_init_port=0,  # two engines on one host: free ports
            pd_buffer_size=2 * room,
            pd_transfer_timeout_s=60.0,
        )

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.a.vocab) for _ in range(n)]

    def counts(self) -> tuple[int, int]:
        """(chunk values, holder entries) on the server."""
        values = holders = 0
        for key in self.client.scan_iter(match="lmcpd:*", count=1000):
            if HOLDER_MARK in key:
                holders += 1
            else:
                values += 1
        return values, holders

    def delete(self, holders: bool) -> int:
        """Delete every holder entry (``holders``) or every chunk value."""
        keys = [
            k
            for k in self.client.scan_iter(match="lmcpd:*", count=1000)
            if (HOLDER_MARK in k) == holders
        ]
        for i in range(0, len(keys), 512):
            self.client.delete(*keys[i : i + 512])
        return len(keys)

    def settled(self, at_least: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """The counts once they reach ``at_least`` and stop changing (the engines'
        write-behind is done), polled every 0.1 s for at most 120 s."""
        deadline = time.monotonic() + 120
        last, stable_since = self.counts(), time.monotonic()
        while True:
            time.sleep(0.1)
            now = self.counts()
            if now != last:
                last, stable_since = now, time.monotonic()
            reached = now[0] >= at_least[0] and now[1] >= at_least[1]
            if reached and time.monotonic() - stable_since >= 0.3:
                return now
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis did not settle at {at_least} (values, holders): {now}")

    def served_by_a(self, prefix: list[int]) -> None:
        """A computes ``prefix`` (+ a suffix) and its chunks reach Redis: values and
        holder entries."""
        v0, h0 = self.settled()
        ttft(self.engines[0].url, prefix + self.prompt(SUFFIX))
        chunks = len(prefix) // self.a.chunk_size
        self.settled((v0 + chunks, h0 + chunks))

    def one(self, path: str, length: int) -> float:
        b = self.engines[1]
        prefix = self.prompt(length)
        self.settled()  # earlier requests' writes are over
        if path == "redis":
            self.served_by_a(prefix)
            self.delete(holders=True)  # B finds the values only
        elif path == "p2p":
            self.served_by_a(prefix)
            self.delete(holders=False)  # only A's CPU tier holds the prefix now
        return ttft(b.url, prefix + self.prompt(SUFFIX))

    def run(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        with shared.running(self.engines, timeout_s=900):
            for s in self.engines:  # warm-up (first requests compile and allocate)
                ttft(s.url, self.prompt(64))
            self.one("p2p", self.a.chunk_size)  # first contact: Hello, NIXL metadata
            for length in self.a.lengths:
                for rep in range(self.a.reps):
                    for path in PATHS:
                        t = self.one(path, length)
                        rows.append(
                            {"path": path, "prefix_tokens": length, "rep": rep, "ttft_s": t}
                        )
                        print(f"  {length} {path} #{rep}: ttft {t * 1e3:.0f} ms", flush=True)
        return rows


def summarize(rows: list[dict[str, Any]], lengths: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for length in lengths:
        med = {
            p: statistics.median(
                r["ttft_s"] for r in rows if r["path"] == p and r["prefix_tokens"] == length
            )
            for p in PATHS
        }
        out.append(
            {
                "prefix_tokens": length,
                **{f"{p}_ttft_s": med[p] for p in PATHS},
                "redis_speedup": med["recompute"] / med["redis"],
                "p2p_speedup": med["recompute"] / med["p2p"],
            }
        )
    return out


def print_table(summary: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="kv_share: B's TTFT (ms, median) with a shared prefix")
    for col in ("prefix tokens", "recompute", "Redis only", "x", "peer (p2p)", "x"):
        t.add_column(col, justify="right")
    for s in summary:
        t.add_row(
            str(s["prefix_tokens"]),
            f"{s['recompute_ttft_s'] * 1e3:.0f}",
            f"{s['redis_ttft_s'] * 1e3:.0f}",
            f"{s['redis_speedup']:.1f}",
            f"{s['p2p_ttft_s'] * 1e3:.0f}",
            f"{s['p2p_speedup']:.1f}",
        )
    Console().print(t)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    fig, ax = shared.pyplot().subplots(figsize=(7, 4.2))
    lengths = [s["prefix_tokens"] for s in summary]
    width = 0.27
    labels = {
        "recompute": "recompute",
        "redis": "prefix in Redis only",
        "p2p": "prefix on peer (p2p)",
    }
    for i, p in enumerate(PATHS):
        xs = [j + (i - 1) * width for j in range(len(lengths))]
        ys = [s[f"{p}_ttft_s"] * 1e3 for s in summary]
        bars = ax.bar(xs, ys, width, label=labels[p])
        if p != "recompute":
            for bar, s in zip(bars, summary, strict=True):
                ax.annotate(
                    f"x{s[f'{p}_speedup']:.1f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_xticks(range(len(lengths)), [f"{n} tokens" for n in lengths])
    ax.set_ylabel("B's TTFT (ms, median)")
    ax.set_title("kv_both: a shared prefix from Redis or a peer vs recompute")
    ax.legend()
    shared.save_figure(fig, path)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = shared.engine_parser(__doc__, "one repetition per length")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--lengths", default="2048,4096", help="comma-separated prefix lengths")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bind", action="store_true", help="do not pin A and B to cores")
    a = p.parse_args(argv)
    if a.reps is None:
        a.reps = 1 if a.quick else 3
    if a.reps < 1:
        p.error(f"--reps must be >= 1, got {a.reps}")
    try:
        a.lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    except ValueError:
        p.error(f"--lengths: comma-separated token counts, got {a.lengths!r}")
    if not a.lengths or min(a.lengths) < a.chunk_size:
        p.error(f"--lengths: every prefix needs >= --chunk-size ({a.chunk_size}) tokens")
    a.vocab = 512
    a.max_model_len = max(a.lengths) + 2 * a.chunk_size
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    binary = redis_server_binary()
    if binary is None:
        print("kv_share needs redis-server (apt-get install -y redis-server)", file=sys.stderr)
        return 2
    work = shared.prepare_run(a.work_dir, "lmcache-pd-kv-share-")
    spec = shared.llama_spec(a.hidden, a.layers, a.vocab, a.max_model_len)
    a.bytes_per_token = a.layers * 2 * spec.kv_heads * 64 * 4  # fp32 KV
    model = shared.build_model(a.model_dir, work, spec)
    t0 = time.time()
    with RedisServer(work / "redis", binary=binary) as redis:
        rows = Bench(a, model, work, redis).run()
    summary = summarize(rows, a.lengths)
    ratios = {}
    for s in summary:
        ratios[f"redis_over_recompute_speedup_{s['prefix_tokens']}"] = s["redis_speedup"]
        ratios[f"p2p_over_recompute_speedup_{s['prefix_tokens']}"] = s["p2p_speedup"]
    result = {
        "benchmark": "kv_share",
        "config": {
            "quick": a.quick,
            "model": {"hidden": a.hidden, "layers": a.layers, "kv_heads": spec.kv_heads},
            "bytes_per_token": a.bytes_per_token,
            "lengths": a.lengths,
            "reps": a.reps,
            "chunk_size": a.chunk_size,
            "suffix_tokens": SUFFIX,
            **shared.host_load(),
        },
        "rows": rows,
        "summary": summary,
        "ratios": ratios,
        "target_speedup": 3.0,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=2))
    print_table(summary)
    shared.write_outputs(result, a.json, a.png, lambda path: plot(summary, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
