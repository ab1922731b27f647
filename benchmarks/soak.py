"""Soak: 2 prefillers + 2 decoders behind ``lmcache-pd proxy`` under a steady load while
one prefiller is killed (SIGKILL) and restarted and one decoder is restarted (SIGTERM,
then started again on the same ports).

    python benchmarks/soak.py [--quick] [--json F] [--png P]
    lmcache-pd bench soak [--quick] [--json F] [--png P]

What runs (all on 127.0.0.1, a tiny random-weight Llama built locally): prefillers P0, P1
bound to core 0, decoders D0, D1 bound to core 1 (``VLLM_CPU_OMP_THREADS_BIND``), the
proxy in round robin. ``--requests`` (1000; ``--quick`` 100) requests are sent open loop
at ``--rate`` per second with at most ``--concurrency`` in flight, cycling over
completions / chat, each streamed and not; every prompt is one of a few shared prefixes
plus its own suffix (a few hundred tokens), so decoders already hold some chunks
(dedupe). At ``--kill-at`` of the requests P0's process group is SIGKILLed and started
again; at ``--restart-at`` D1 is stopped with SIGTERM (vLLM's default: in-flight requests
aborted) and started again on the same HTTP and KV ports. Restarts overlap when an engine
takes longer to start than the gap.

Reported (table, ``--json``, ``--png``):

* requests ok / failed, requests past ``--deadline-s`` (a stalled handoff waits for
  ``pd_transfer_timeout_s``), the proxy's decode-only fallbacks;
* latency p50 / p99 per phase: ``before`` the kill, ``faults`` (kill until both engines
  are back), ``after``;
* RSS of every process group (engine API server + engine core, per generation of a
  restarted engine) and of the proxy, sampled all along: growth after warm-up (the
  median of the last samples against the median of the first samples after warm-up;
  flat = within ``--rss-tolerance``);
* slots in use once idle, from each engine's ``/metrics`` gauges
  (``vllm:lmcache_pd_receive_slots_leased`` / ``_granted``, ``_send_slots_in_use``,
  ``_holds_outstanding``): must be 0 (ready chunks are a cache, shown apart);
* greedy output of every ``--check-every``-th request against one plain engine started
  after the soak (same prompts, non-streamed): must be identical.

Exit status 0 when every check passes. Everything is bounded: the load by count and
``--max-seconds``, every wait by a deadline; engines are always stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from lmcache_pd.integration.vllm.launch import VLLMServer, free_port, metric_value
from lmcache_pd.integration.vllm.tiny_model import TinySpec
from lmcache_pd.integration.vllm.tiny_model import prompts as word_prompts

sys.path.append(str(Path(__file__).resolve().parent))  # benchmarks/_common.py
import _common as shared

# gauges that must read 0 on an idle engine (name, what it counts)
LEAK_GAUGES = (
    "vllm:lmcache_pd_receive_slots_leased",
    "vllm:lmcache_pd_receive_slots_granted",
    "vllm:lmcache_pd_send_slots_in_use",
    "vllm:lmcache_pd_holds_outstanding",
)
CACHE_GAUGE = "vllm:lmcache_pd_receive_slots_ready"
# a decoder waited its whole pd_transfer_timeout_s for a request's KV
STALL_LINE = "chunks arrived within"
# a lease freed because its sender went silent (expected once per push cut by a kill)
LEASE_DROP_LINE = "no Done within"


class Kind(str, enum.Enum):
    COMPLETION = "completion"
    COMPLETION_STREAM = "completion_stream"
    CHAT = "chat"
    CHAT_STREAM = "chat_stream"

    @property
    def chat(self) -> bool:
        return self in (Kind.CHAT, Kind.CHAT_STREAM)

    @property
    def stream(self) -> bool:
        return self in (Kind.COMPLETION_STREAM, Kind.CHAT_STREAM)


KINDS = list(Kind)


class Phase(str, enum.Enum):
    BEFORE = "before"
    FAULTS = "faults"
    AFTER = "after"


class Event(str, enum.Enum):
    PREFILLER_KILLED = "prefiller killed"
    PREFILLER_BACK = "prefiller back"
    DECODER_STOPPED = "decoder stopped"
    DECODER_BACK = "decoder back"


@dataclass
class Outcome:
    """One request as the client saw it."""

    i: int
    kind: Kind
    sent_s: float  # since the load started
    ok: bool = False
    latency_s: float = float("nan")
    ttft_s: float = float("nan")
    error: str = ""
    text: str = ""
    phase: Phase = Phase.BEFORE


@dataclass
class Sample:
    t_s: float
    rss_mb: dict[str, float] = field(default_factory=dict)  # series -> MB (process group)
    procs_mb: dict[str, float] = field(default_factory=dict)  # "series/name[pid]" -> MB


# ---------------------------------------------------------------------- requests
def request_body(kind: Kind, prompt: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": kind.stream,
    }
    if kind.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def _choice_text(choice: dict[str, Any], chat: bool, stream: bool) -> str:
    if not chat:
        return str(choice.get("text") or "")
    part = choice.get("delta" if stream else "message") or {}
    return str(part.get("content") or "")


def send(
    client: httpx.Client, url: str, kind: Kind, prompt: str, max_tokens: int, timeout_s: float
) -> tuple[str, float]:
    """One request: (text, ttft seconds). Raises on any error, a truncated stream, or an
    answer that did not run to ``max_tokens`` (finish_reason other than ``length``: e.g.
    ``abort`` from an engine that shut down under it)."""
    path, body = request_body(kind, prompt, max_tokens)
    t0 = time.perf_counter()
    if not kind.stream:
        resp = client.post(url + path, json=body, timeout=timeout_s)
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        choice = resp.json()["choices"][0]
        if choice.get("finish_reason") != "length":
            raise RuntimeError(f"finish_reason {choice.get('finish_reason')!r}")
        return _choice_text(choice, kind.chat, False), time.perf_counter() - t0
    parts: list[str] = []
    ttft = float("nan")
    done = False
    finish = None
    with client.stream("POST", url + path, json=body, timeout=timeout_s) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:200]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                continue
            payload = json.loads(data)
            if "error" in payload:
                raise RuntimeError(f"error event: {str(payload['error'])[:200]}")
            for choice in payload.get("choices", []):
                piece = _choice_text(choice, kind.chat, True)
                if piece and ttft != ttft:
                    ttft = time.perf_counter() - t0
                parts.append(piece)
                finish = choice.get("finish_reason") or finish
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    if finish != "length":
        raise RuntimeError(f"stream finish_reason {finish!r}")
    return "".join(parts), ttft


class Prompts:
    """Seeded prompts: one of ``prefixes`` shared prefixes plus a suffix of its own."""

    def __init__(self, seed: int, prefixes: int, prefix_words: int, suffix_words: int) -> None:
        self.prefixes = word_prompts(prefixes, seed, prefix_words, prefix_words)
        self.seed = seed
        self.suffix_words = suffix_words

    def get(self, i: int) -> str:
        seed = self.seed * 1_000_003 + i + 1
        suffix = word_prompts(1, seed, self.suffix_words // 4, self.suffix_words)[0]
        return f"{self.prefixes[i % len(self.prefixes)]} {suffix}"


# ---------------------------------------------------------------------- processes
def group_rss_mb(pid: int) -> dict[str, float]:
    """RSS (MB) of a process and each of its descendants, ``name[pid]`` -> MB (vLLM
    names its engine core ``VLLM::EngineCore``); empty when gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out: dict[str, float] = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out[f"{p.name()}[{p.pid}]"] = p.memory_info().rss / 2**20
    return out


class Cluster:
    """The 2P2D engines and the proxy; engines are replaced in place on restart."""

    def __init__(self, a: argparse.Namespace, model: Path, work: Path) -> None:
        self.a = a
        self.model = model
        self.work = work
        self.kv_ports = [free_port() for _ in range(2)]
        self.http_ports = {name: free_port() for name in ("P0", "P1", "D0", "D1")}
        self.engines: dict[str, VLLMServer] = {}
        self.generation: dict[str, int] = {}
        self.lock = threading.Lock()
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_url = ""
        self.clock: Callable[[], float] = lambda: 0.0  # the soak's (seconds since the load)
        self.ready_at: dict[str, float] = {}  # series -> when it answered /health

    def _make(self, name: str) -> VLLMServer:
        gen = self.generation.get(name, -1) + 1
        self.generation[name] = gen
        common: dict[str, Any] = {"chunk_size": self.a.chunk_size, "pd_buffer_size": 16 << 20}
        if name.startswith("P"):
            cfg = shared.connector_config(
                "kv_producer", **common, pd_connect_timeout_s=self.a.connect_timeout_s
            )
            core = 0
        else:
            cfg = shared.connector_config(
                "kv_consumer",
                **common,
                pd_peer_init_port=self.kv_ports[int(name[1])],
                max_local_cpu_size=0.05,
                pd_lease_ttl_s=self.a.lease_ttl_s,
                pd_transfer_timeout_s=self.a.transfer_timeout_s,
            )
            core = 1
        env = {} if self.a.no_bind else {"VLLM_CPU_OMP_THREADS_BIND": str(core)}
        return VLLMServer(
            self.model,
            self.work / f"{name}.{gen}.log",
            port=self.http_ports[name],
            name=f"{name}.{gen}",
            kv_transfer_config=cfg,
            env=env,
            max_model_len=self.a.max_model_len,
            # a small paged KV cache: its pages are all touched during warm-up, so RSS
            # growth afterwards is growth (1 GiB would fill slowly over the whole run)
            extra_args=["--num-gpu-blocks-override", str(self.a.kv_blocks)],
        )

    def series(self, name: str) -> str:
        return f"{name}.{self.generation[name]}"

    def start(self, timeout_s: float) -> None:
        for name in self.http_ports:
            self.engines[name] = self._make(name).start()
        for s in self.engines.values():
            s.wait_ready(timeout_s)
        self.ready_at = {self.series(name): 0.0 for name in self.engines}
        from lmcache_pd.router.proxy import spawn

        argv = ["--prefiller", self.engines["P0"].url, "--prefiller", self.engines["P1"].url]
        for i in range(2):
            argv += ["--decoder", self.engines[f"D{i}"].url]
            argv += ["--decoder-kv", f"127.0.0.1:{self.kv_ports[i]}"]
        self.proxy, self.proxy_url = spawn([*argv, "--handoff-port", "0"], timeout_s=30)

    def kill_and_restart(self, name: str, timeout_s: float, on_down: Callable[[], None]) -> None:
        """SIGKILL ``name``'s process group, start a new generation on the same ports."""
        old = self.engines[name]
        old.kill()
        old.stop(timeout_s=5)
        on_down()
        self._restart(name, timeout_s)

    def stop_and_restart(self, name: str, timeout_s: float, on_down: Callable[[], None]) -> None:
        """SIGTERM ``name`` (graceful), then start a new generation on the same ports."""
        self.engines[name].stop(timeout_s=60)
        on_down()
        self._restart(name, timeout_s)

    def _restart(self, name: str, timeout_s: float) -> None:
        new = self._make(name)
        with self.lock:
            self.engines[name] = new
        new.start()
        new.wait_ready(timeout_s)
        self.ready_at[self.series(name)] = self.clock()

    def pids(self) -> dict[str, int]:
        """Series name -> root pid of every live process group (engines, proxy)."""
        out: dict[str, int] = {}
        with self.lock:
            for name, s in self.engines.items():
                if s.proc is not None and s.proc.poll() is None:
                    out[self.series(name)] = s.proc.pid
        if self.proxy is not None and self.proxy.poll() is None:
            out["proxy"] = self.proxy.pid
        return out

    def stop(self) -> None:
        if self.proxy is not None:
            shared.stop_process(self.proxy)
            self.proxy = None
        for s in self.engines.values():
            s.stop()


class Sampler:
    """RSS of every process group every ``interval_s`` seconds, in a thread."""

    def __init__(self, cluster: Cluster, interval_s: float, clock: Callable[[], float]) -> None:
        self.cluster = cluster
        self.interval_s = interval_s
        self.clock = clock
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = Sample(round(self.clock(), 3))
            for series, pid in self.cluster.pids().items():
                procs = group_rss_mb(pid)
                if procs:
                    sample.rss_mb[series] = round(sum(procs.values()), 2)
                    for name, mb in procs.items():
                        sample.procs_mb[f"{series}/{name}"] = round(mb, 2)
            self.samples.append(sample)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------------- the soak
class Soak:
    def __init__(self, a: argparse.Namespace, cluster: Cluster, prompts: Prompts) -> None:
        self.a = a
        self.cluster = cluster
        self.prompts = prompts
        self.t0 = 0.0
        self.events: list[tuple[float, Event]] = []
        self.outcomes: list[Outcome] = []
        self.fault_error = ""
        self.late_starts = 0  # requests that waited for a free concurrency slot

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, event: Event) -> None:
        self.events.append((round(self.now(), 3), event))
        print(f"  [{self.now():7.1f} s] {event.value}", flush=True)

    def _kill_prefiller(self) -> None:
        """SIGKILL P0's process group, start it again (a fault thread)."""
        try:
            self.cluster.kill_and_restart(
                "P0", self.a.start_timeout_s, lambda: self.mark(Event.PREFILLER_KILLED)
            )
            self.mark(Event.PREFILLER_BACK)
        except Exception as exc:
            self.fault_error += f"prefiller: {type(exc).__name__}: {exc}"[:1000]
            print(f"  prefiller fault failed: {exc}"[:300], flush=True)

    def _restart_decoder(self) -> None:
        """SIGTERM D1, start it again on the same ports (a fault thread)."""
        try:
            self.cluster.stop_and_restart(
                "D1", self.a.start_timeout_s, lambda: self.mark(Event.DECODER_STOPPED)
            )
            self.mark(Event.DECODER_BACK)
        except Exception as exc:
            self.fault_error += f"decoder: {type(exc).__name__}: {exc}"[:1000]
            print(f"  decoder fault failed: {exc}"[:300], flush=True)

    def _both(self) -> None:
        other = threading.Thread(target=self._restart_decoder, name="restart-decoder")
        other.start()
        self._kill_prefiller()
        other.join(2 * self.a.start_timeout_s + 120)

    def _one(self, client: httpx.Client, out: Outcome) -> None:
        t = time.perf_counter()
        try:
            out.text, out.ttft_s = send(
                client,
                self.cluster.proxy_url,
                out.kind,
                self.prompts.get(out.i),
                self.a.max_tokens,
                self.a.request_timeout_s,
            )
            out.ok = True
        except Exception as exc:
            out.error = f"{type(exc).__name__}: {exc}"[:500]
        out.latency_s = time.perf_counter() - t
        if not out.kind.stream:
            out.ttft_s = out.latency_s

    def run(self) -> None:
        """Open-loop load at ``rate`` with at most ``concurrency`` in flight."""
        a = self.a
        kill_i, restart_i = int(a.requests * a.kill_at), int(a.requests * a.restart_at)
        slots = threading.Semaphore(a.concurrency)
        threads: list[threading.Thread] = []
        faults = {
            kill_i: threading.Thread(target=self._kill_prefiller, name="kill-prefiller"),
            restart_i: threading.Thread(target=self._restart_decoder, name="restart-decoder"),
        }
        if kill_i == restart_i:
            faults = {kill_i: threading.Thread(target=self._both, name="faults")}
        limits = httpx.Limits(max_connections=a.concurrency, max_keepalive_connections=0)
        with httpx.Client(limits=limits) as client:
            for i in range(a.requests):
                if self.now() > a.max_seconds:
                    print(f"  load stopped at {i} requests: --max-seconds reached", flush=True)
                    break
                if i in faults:
                    faults[i].start()
                delay = i / a.rate - self.now()
                if delay > 0:
                    time.sleep(delay)
                if not slots.acquire(blocking=False):
                    self.late_starts += 1
                    slots.acquire(timeout=a.request_timeout_s + 5)
                out = Outcome(i, KINDS[i % len(KINDS)], round(self.now(), 3))
                self.outcomes.append(out)

                def work(o: Outcome = out) -> None:
                    try:
                        self._one(client, o)
                    finally:
                        slots.release()

                th = threading.Thread(target=work, name=f"req-{i}", daemon=True)
                th.start()
                threads.append(th)
                if (i + 1) % 50 == 0:
                    ok = sum(o.ok for o in self.outcomes if o.latency_s == o.latency_s)
                    print(f"  [{self.now():7.1f} s] sent {i + 1}, ok so far {ok}", flush=True)
            for th in threads:
                th.join(a.request_timeout_s + 5)
            for fault in faults.values():
                if fault.ident is not None:
                    fault.join(2 * a.start_timeout_s + 120)
        self.phases()

    def phases(self) -> None:
        """Label each request by when it was sent: before the first fault, during the
        faults (until both restarted engines are back), after."""
        times = {e: t for t, e in self.events}
        inf = float("inf")
        start = min(times.get(Event.PREFILLER_KILLED, inf), times.get(Event.DECODER_STOPPED, inf))
        end = max(times.get(Event.PREFILLER_BACK, inf), times.get(Event.DECODER_BACK, inf))
        for o in self.outcomes:
            o.phase = Phase.BEFORE if o.sent_s < start else Phase.FAULTS
            if o.sent_s >= end:
                o.phase = Phase.AFTER


# ---------------------------------------------------------------------- checks
def wait_healthy(urls: Sequence[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for url in urls:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not healthy within {timeout_s:.0f} s")
            time.sleep(1.0)


def leak_check(cluster: Cluster, settle_s: float) -> dict[str, dict[str, float | None]]:
    """Idle in-use gauges of every engine, read after ``settle_s`` (leases and grants
    expire) and two short probe requests ~1 s apart (the connector's stats ride on
    engine steps; the probe is shorter than a chunk, so it moves no KV). None: the
    engine does not export that gauge (a decoder has no send slots)."""
    time.sleep(settle_s)
    out: dict[str, dict[str, float | None]] = {}
    for name, s in sorted(cluster.engines.items()):
        for _ in range(2):
            with contextlib.suppress(Exception):
                s.completion("the cache", max_tokens=2, timeout_s=30)
            time.sleep(1.2)
        text = s.metrics()
        out[cluster.series(name)] = {g: metric_value(text, g) for g in (*LEAK_GAUGES, CACHE_GAUGE)}
    return out


def role_gauges(series: str) -> tuple[str, ...]:
    """The leak gauges an engine of this role must export."""
    if series.startswith("P"):
        return ("vllm:lmcache_pd_send_slots_in_use", "vllm:lmcache_pd_holds_outstanding")
    return ("vllm:lmcache_pd_receive_slots_leased", "vllm:lmcache_pd_receive_slots_granted")


def rss_report(
    samples: list[Sample],
    ready_at: dict[str, float],
    warmup_s: float,
    window: int,
    tolerance: float,
    per_process: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per series (process group, or each process with ``per_process``): first/last MB,
    growth after warm-up (median of the last ``window`` samples against the median of
    the first ``window`` samples from ``warmup_s`` after the process group answered
    /health: a restarted engine warms up anew)."""
    by: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        for series, mb in (s.procs_mb if per_process else s.rss_mb).items():
            by.setdefault(series, []).append((s.t_s, mb))
    out: dict[str, dict[str, Any]] = {}
    for series, points in by.items():
        start = ready_at.get(series.split("/")[0], points[0][0])
        steady = [mb for t, mb in points if t >= start + warmup_s]
        row: dict[str, Any] = {
            "samples": len(points),
            "first_mb": points[0][1],
            "last_mb": points[-1][1],
            "steady_samples": len(steady),
            "ready_at_s": round(start, 1),
        }
        if len(steady) >= 2 * window:
            head = statistics.median(steady[:window])
            tail = statistics.median(steady[-window:])
            row.update(
                head_mb=round(head, 1),
                tail_mb=round(tail, 1),
                growth=round(tail / head - 1, 4),
                max_over_min=round(max(steady) / min(steady), 4),
            )
            row["flat"] = abs(row["growth"]) <= tolerance
        else:
            row["flat"] = None  # too short-lived to judge (e.g. an old generation)
        out[series] = row
    return out


def reference_check(
    a: argparse.Namespace, model: Path, work: Path, prompts: Prompts, sample: list[Outcome]
) -> dict[str, Any]:
    """Greedy output of the sampled requests from one plain engine (non-streamed)."""
    ref = VLLMServer(
        model,
        work / "reference.log",
        name="reference",
        max_model_len=a.max_model_len,
        env={} if a.no_bind else {"VLLM_CPU_OMP_THREADS_BIND": "0"},
    )
    mismatches: list[int] = []
    with ref, httpx.Client() as client:
        for o in sample:
            kind = Kind.CHAT if o.kind.chat else Kind.COMPLETION
            want, _ = send(client, ref.url, kind, prompts.get(o.i), a.max_tokens, 120)
            if want != o.text:
                mismatches.append(o.i)
    return {"checked": len(sample), "mismatches": mismatches}


def log_counts(work: Path, line: str) -> dict[str, int]:
    """How often ``line`` occurs in each decoder log."""
    out: dict[str, int] = {}
    for log in sorted(work.glob("D*.log")):
        n = log.read_text(errors="replace").count(line)
        if n:
            out[log.name] = n
    return out


def proxy_figures(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    names = (
        "lmcache_pd_proxy_decode_only_fallbacks_total",
        "lmcache_pd_proxy_errors_total",
    )
    return {n: metric_value(text, n) or 0.0 for n in names}


# ---------------------------------------------------------------------- output
def summarize(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)  # one line per row in logs too
    r = result["requests"]
    t = Table(title="soak 2P2D: requests")
    for col in ("sent", "ok", "failed", "past deadline", "late starts", "fallbacks", "tokens"):
        t.add_column(col, justify="right")
    tok = result["tokens"]
    t.add_row(
        str(r["sent"]),
        str(r["ok"]),
        str(r["failed"]),
        str(r["past_deadline"]),
        str(r["late_starts"]),
        f"{result['proxy'].get('lmcache_pd_proxy_decode_only_fallbacks_total', 0):.0f}",
        f"{tok.get('checked', 0) - len(tok.get('mismatches', []))}/{tok.get('checked', 0)} same",
    )
    console.print(t)
    t = Table(title="latency by phase (ms)")
    for col in ("phase", "n", "failed", "p50", "p99", "max", "ttft p50", "ttft p99"):
        t.add_column(col, justify="right")
    for phase, row in result["latency"].items():
        t.add_row(
            phase,
            str(row["n"]),
            str(row["failed"]),
            *(
                f"{row[k] * 1e3:.0f}"
                for k in ("p50_s", "p99_s", "max_s", "ttft_p50_s", "ttft_p99_s")
            ),
        )
    console.print(t)
    t = Table(title="RSS (MB) after warm-up")
    cols = ("process group", "first", "head", "tail", "growth", "flat", "most grown process")
    for col in cols:
        t.add_column(col, justify="right")
    for series, row in sorted(result["rss"].items()):
        growth = row.get("growth")
        procs = [
            (r["growth"], name.split("/", 1)[1], r["tail_mb"] - r["head_mb"])
            for name, r in result["rss_per_process"].items()
            if name.startswith(series + "/") and r.get("growth") is not None
        ]
        top = max(procs, default=None)
        t.add_row(
            series,
            f"{row['first_mb']:.0f}",
            f"{row.get('head_mb', float('nan')):.0f}",
            f"{row.get('tail_mb', float('nan')):.0f}",
            "-" if growth is None else f"{growth * 100:+.2f} %",
            {True: "yes", False: "NO", None: "n/a"}[row["flat"]],
            "-" if top is None else f"{top[1]} {top[0] * 100:+.1f} % ({top[2]:+.0f} MB)",
        )
    console.print(t)
    t = Table(title="slots in use when idle (must be 0; '-': not this role's)")
    t.add_column("engine")
    for col in ("leased", "granted", "send in use", "holds", "ready (cache)"):
        t.add_column(col, justify="right")
    for series, row in result["leaks"].items():
        cells = [row[g] for g in (*LEAK_GAUGES, CACHE_GAUGE)]
        t.add_row(series, *("-" if v is None else f"{v:.0f}" for v in cells))
    console.print(t)
    verdict = "PASS" if result["passed"] else "FAIL: " + "; ".join(result["failures"])
    console.print(f"[bold]{verdict}[/bold]")


def plot(result: dict[str, Any], path: Path) -> None:
    fig, (ax0, ax1, ax2) = shared.pyplot().subplots(3, 1, figsize=(10, 10), sharex=True)
    series: dict[str, list[tuple[float, float]]] = {}
    for s in result["rss_samples"]:
        for name, mb in s["rss_mb"].items():
            series.setdefault(name, []).append((s["t_s"], mb))
    warmup = result["config"]["warmup_s"]
    tol = result["config"]["rss_tolerance"] * 100
    for name, pts in sorted(series.items()):
        (line,) = ax0.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=1.2)
        row = result["rss"].get(name, {})
        head = row.get("head_mb")
        if head:  # growth against the median just after this group's warm-up
            steady = [(t, mb) for t, mb in pts if t >= row["ready_at_s"] + warmup]
            growth = [(mb / head - 1) * 100 for _, mb in steady]
            ax1.plot([t for t, _ in steady], growth, lw=1.2, color=line.get_color())
    ax0.set_ylabel("RSS MB (process group)")
    ax0.set_title("soak 2P2D: RSS of every process group (engine: API server + engine core)")
    ax0.legend(fontsize=7, ncol=4)
    ax1.axhspan(-tol, tol, color="green", alpha=0.08)
    ax1.set_ylabel(f"RSS after warm-up, % (band: +-{tol:.0f} %)")
    rows = result["rows"]
    ok = [r for r in rows if r["ok"]]
    bad = [r for r in rows if not r["ok"]]
    ax2.scatter([r["sent_s"] for r in ok], [r["latency_s"] * 1e3 for r in ok], s=4, label="ok")
    if bad:
        ax2.scatter(
            [r["sent_s"] for r in bad],
            [r["latency_s"] * 1e3 for r in bad],
            s=12,
            c="red",
            label="failed",
        )
    ax2.axhline(result["config"]["deadline_s"] * 1e3, color="grey", ls=":", label="deadline")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency ms (log)")
    ax2.set_xlabel("seconds since the load started")
    ax2.legend(fontsize=7)
    colors = {e.value: c for e, c in zip(Event, ("red", "green", "orange", "blue"), strict=True)}
    for t, name in result["events"]:
        for ax in (ax0, ax1, ax2):
            ax.axvline(t, color=colors.get(name, "black"), ls="--", lw=0.8)
        ax0.annotate(name, (t, ax0.get_ylim()[1]), rotation=90, fontsize=7, va="top", ha="right")
    shared.save_figure(fig, path)


# ---------------------------------------------------------------------- main
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = shared.engine_parser(__doc__, "100 requests")
    p.add_argument("--requests", type=int, default=None, help="default 1000 (--quick 100)")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (open loop)")
    p.add_argument("--concurrency", type=int, default=8, help="most requests in flight")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--prefixes", type=int, default=6, help="shared prompt prefixes")
    p.add_argument("--prefix-words", type=int, default=140)
    p.add_argument("--suffix-words", type=int, default=120)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-blocks", type=int, default=128, help="paged KV blocks per engine")
    p.add_argument("--kill-at", type=float, default=0.3, help="fraction of requests sent")
    p.add_argument("--restart-at", type=float, default=0.5, help="fraction of requests sent")
    p.add_argument("--deadline-s", type=float, default=15.0, help="a request slower is a stall")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--connect-timeout-s", type=float, default=3.0, help="prefillers'")
    p.add_argument("--lease-ttl-s", type=float, default=10.0, help="decoders' pd_lease_ttl_s")
    p.add_argument("--transfer-timeout-s", type=float, default=20.0, help="decoders'")
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--max-seconds", type=float, default=None, help="load cap (default 3 x N/rate)")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling interval")
    p.add_argument(
        "--warmup-s", type=float, default=None, help="per process (default 20 %% of load)"
    )
    p.add_argument("--rss-window", type=int, default=5, help="samples per median")
    p.add_argument("--rss-tolerance", type=float, default=0.05)
    p.add_argument("--check-every", type=int, default=10, help="token check sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bind", action="store_true", help="do not pin engines to cores")
    a = p.parse_args(argv)
    a.requests = a.requests or (100 if a.quick else 1000)
    errors = []
    if a.requests < 10:
        errors.append("--requests must be at least 10")
    if a.rate <= 0 or a.concurrency < 1:
        errors.append("--rate must be > 0 and --concurrency >= 1")
    if not 0 <= a.kill_at <= a.restart_at < 1:
        errors.append("need 0 <= --kill-at <= --restart-at < 1")
    if errors:
        p.error("; ".join(errors))
    load_s = a.requests / a.rate
    a.max_seconds = a.max_seconds or 3 * load_s + 120
    a.warmup_s = a.warmup_s if a.warmup_s is not None else 0.2 * load_s
    return a


def latency_table(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for phase in Phase:
        rows = [o for o in outcomes if o.phase is phase]
        ok = [o for o in rows if o.ok]
        lat = [o.latency_s for o in ok]
        ttft = [o.ttft_s for o in ok if o.ttft_s == o.ttft_s]
        out[phase.value] = {
            "n": len(rows),
            "failed": len(rows) - len(ok),
            "p50_s": shared.pct(lat, 0.5),
            "p99_s": shared.pct(lat, 0.99),
            "max_s": max(lat) if lat else float("nan"),
            "ttft_p50_s": shared.pct(ttft, 0.5),
            "ttft_p99_s": shared.pct(ttft, 0.99),
        }
    return out


@contextlib.contextmanager
def cluster_running(cluster: Cluster, timeout_s: float) -> Iterator[Cluster]:
    try:
        cluster.start(timeout_s)
        yield cluster
    finally:
        cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    work = shared.prepare_run(a.work_dir, "lmcache-pd-soak-")
    spec = TinySpec()
    model = shared.build_model(a.model_dir, work, spec)
    prompts = Prompts(a.seed, a.prefixes, a.prefix_words, a.suffix_words)
    cluster = Cluster(a, model, work)
    soak = Soak(a, cluster, prompts)
    failures: list[str] = []
    t_start = time.time()
    leaks: dict[str, dict[str, float | None]] = {}
    proxy: dict[str, float] = {}
    prompt_tokens: list[int] = []
    with cluster_running(cluster, a.start_timeout_s):
        d0 = cluster.engines["D0"]
        prompt_tokens = [len(d0.tokenize(prompts.get(i))) for i in range(len(prompts.prefixes))]
        print(f"2P2D up; proxy {cluster.proxy_url}; prompt tokens {prompt_tokens}", flush=True)
        soak.t0 = time.monotonic()
        cluster.clock = soak.now
        sampler = Sampler(cluster, a.sample_s, soak.now)
        with sampler:
            soak.run()
            try:
                wait_healthy([s.url for s in cluster.engines.values()], a.start_timeout_s)
                leaks = leak_check(cluster, a.lease_ttl_s + 5)
            except Exception as exc:
                failures.append(f"leak check: {type(exc).__name__}: {exc}"[:500])
            proxy = proxy_figures(cluster.proxy_url)
    samples = sampler.samples
    outcomes = soak.outcomes
    sample = [o for o in outcomes if o.ok and o.i % a.check_every == 0]
    try:
        tokens = reference_check(a, model, work, prompts, sample)
    except Exception as exc:
        tokens = {"checked": 0, "mismatches": [], "error": f"{type(exc).__name__}: {exc}"[:500]}
        failures.append(f"reference engine: {tokens['error']}")
    rss = rss_report(samples, cluster.ready_at, a.warmup_s, a.rss_window, a.rss_tolerance)
    rss_procs = rss_report(
        samples, cluster.ready_at, a.warmup_s, a.rss_window, a.rss_tolerance, per_process=True
    )
    late = [o for o in outcomes if o.ok and o.latency_s > a.deadline_s]
    failed = [o for o in outcomes if not o.ok]
    stalled = log_counts(work, STALL_LINE)
    lease_drops = log_counts(work, LEASE_DROP_LINE)
    if len(outcomes) < a.requests:
        failures.append(f"only {len(outcomes)} of {a.requests} requests sent")
    if failed:
        failures.append(f"{len(failed)} failed requests (first: #{failed[0].i} {failed[0].error})")
    if late:
        failures.append(f"{len(late)} requests past {a.deadline_s:.0f} s")
    if stalled:
        failures.append(f"decoder logs report missed transfer deadlines: {stalled}")
    if soak.fault_error:
        failures.append(f"fault thread: {soak.fault_error}")
    if len(soak.events) < len(Event):
        failures.append(f"only {[e.value for _, e in soak.events]} happened")
    for series, row in rss.items():
        if row["flat"] is False:
            failures.append(f"RSS of {series} grew {row['growth'] * 100:+.1f} % after warm-up")
    for series, row in leaks.items():
        for g in LEAK_GAUGES:
            value = row[g]
            if value is None and g in role_gauges(series):
                failures.append(f"{series}: {g} not on /metrics")
            elif value:
                failures.append(f"{series}: {g} = {value:.0f} when idle")
    if tokens.get("mismatches"):
        failures.append(f"tokens differ from the reference engine: {tokens['mismatches'][:20]}")
    result = {
        "benchmark": "soak",
        "config": {
            k: v for k, v in vars(a).items() if k not in ("json", "png", "model_dir", "work_dir")
        }
        | {
            "model": asdict(spec),
            "prompt_tokens_of_prefix_samples": prompt_tokens,
            **shared.host_load(),
        },
        "requests": {
            "sent": len(outcomes),
            "ok": len(outcomes) - len(failed),
            "failed": len(failed),
            "past_deadline": len(late),
            "late_starts": soak.late_starts,
            "load_seconds": round(max((o.sent_s for o in outcomes), default=0.0), 1),
            "by_kind": {k.value: sum(o.kind is k for o in outcomes) for k in Kind},
        },
        "latency": latency_table(outcomes),
        "events": [(t, e.value) for t, e in soak.events],
        "rss": rss,
        "leaks": leaks,
        "proxy": proxy,
        "decoder_stall_lines": stalled,
        "decoder_lease_drops": lease_drops,
        "rss_per_process": rss_procs,
        "tokens": tokens,
        "failed_requests": [
            {"i": o.i, "kind": o.kind.value, "sent_s": o.sent_s, "error": o.error} for o in failed
        ],
        "rows": [
            {
                "i": o.i,
                "kind": o.kind.value,
                "sent_s": o.sent_s,
                "ok": o.ok,
                "latency_s": round(o.latency_s, 4),
                "ttft_s": round(o.ttft_s, 4) if o.ttft_s == o.ttft_s else None,
                "phase": o.phase.value,
            }
            for o in outcomes
        ],
        "rss_samples": [{"t_s": s.t_s, "rss_mb": s.rss_mb} for s in samples],
        "rss_process_samples": [{"t_s": s.t_s, "procs_mb": s.procs_mb} for s in samples],
        "passed": not failures,
        "failures": failures,
        "seconds": round(time.time() - t_start, 1),
    }
    summarize(result)
    shared.write_outputs(result, a.json, a.png, lambda path: plot(result, path), indent=1)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
