"""End-to-end benchmark with real vLLM engines: TTFT/TPOT of 1P1D vs one engine, and
prefix reuse through the kv_both tiers.

    python benchmarks/e2e.py [--quick] --json F --png P
    lmcache-pd bench e2e [--quick] --json F --png P

All in one run, on a random-weight Llama built locally (big enough that prefill
dominates on CPU), with fresh random prompts and vLLM's prefix cache off everywhere:

* ``single``: one plain engine;
* ``ours``: prefiller (kv_producer) + decoder (kv_consumer) with LMCachePDConnector,
  through the lmcache-pd proxy (push-ahead: the proxy names the decoder, the prefiller
  pushes while the proxy waits for HandoffDone);
* ``standard``: the same two engines driven by the standard vLLM PD contract, as vLLM's
  proxy example, Ray Serve LLM or llm-d send it (prefill with ``do_remote_decode`` and
  max_tokens 1, then decode with the returned ``kv_transfer_params``; the decoder fetches
  the held KV from the prefiller); TTFT counts from the prefill request;
* ``nixl``: the same two-step flow with vLLM's own ``NixlConnector``
  (``kv_buffer_device: cpu``), through the same proxy in HTTP-only mode;
* ``reuse``: one kv_both engine (CPU tier), TTFT of a prompt whose prefix of L tokens is
  held (warm) vs the same prompt shape with a fresh prefix (cold), L growing;
* deployment shapes (``--shape``, comma-separated; default ``1p1d``, which is ``ours``
  above): ``2p2d`` (2 prefillers on core 0, 2 decoders on core 1, round robin) and the
  mixed-TP shapes ``tp2-tp1``, ``tp1-tp2``, ``tp2-tp2`` (prefiller TP - decoder TP; a
  TP=2 engine runs ``--tensor-parallel-size 2`` with ``VLLM_CPU_OMP_THREADS_BIND=0|1``,
  a TP=2 decoder's rank r listens on ``pd_peer_init_port`` + r), each through the
  lmcache-pd proxy, reported next to ``single`` and ``ours`` in the same table, JSON
  and PNG. A shape the engines refuse fails alone with the engine's error.

TTFT = time to the first streamed token; TPOT = mean gap between later tokens. Engines
run one configuration at a time (this box has 2 cores) and are always stopped. The idle
CPU of every engine process group is measured over a few seconds before its requests.
Figures on a shared CPU box are noisy: compare rows of the same run only.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from lmcache_pd.integration.vllm.launch import VLLMServer, free_port, free_port_pair
from lmcache_pd.protocol import standard_prefill_params

sys.path.append(str(Path(__file__).resolve().parent))  # benchmarks/_common.py
import _common as shared


class Shape(str, enum.Enum):
    """A deployment shape: prefillers x decoders and their tensor-parallel sizes."""

    P1D1 = "1p1d"
    P2D2 = "2p2d"
    TP2_TP1 = "tp2-tp1"
    TP1_TP2 = "tp1-tp2"
    TP2_TP2 = "tp2-tp2"


@dataclass(frozen=True)
class ShapeSpec:
    prefillers: int
    decoders: int
    prefill_tp: int
    decode_tp: int


SHAPES: dict[Shape, ShapeSpec] = {
    Shape.P1D1: ShapeSpec(1, 1, 1, 1),
    Shape.P2D2: ShapeSpec(2, 2, 1, 1),
    Shape.TP2_TP1: ShapeSpec(1, 1, 2, 1),
    Shape.TP1_TP2: ShapeSpec(1, 1, 1, 2),
    Shape.TP2_TP2: ShapeSpec(1, 1, 2, 2),
}


def parse_shapes(text: str) -> list[Shape]:
    """``--shape`` value: comma-separated shape names, each once."""
    out: list[Shape] = []
    for name in (x.strip().lower() for x in text.split(",")):
        if not name:
            continue
        try:
            shape = Shape(name)
        except ValueError:
            known = ", ".join(s.value for s in Shape)
            raise argparse.ArgumentTypeError(f"unknown shape {name!r} (known: {known})") from None
        if shape not in out:
            out.append(shape)
    if not out:
        raise argparse.ArgumentTypeError("--shape names no shape")
    return out


def stream_completion(
    url: str, prompt: list[int], max_tokens: int, **extra: Any
) -> dict[str, float]:
    """One streamed greedy completion: ttft_s, tpot_s, e2e_s."""
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        **extra,
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            payload = json.loads(line[5:])
            if payload.get("choices") and payload["choices"][0].get("text") is not None:
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("no tokens streamed")
    ttft = stamps[0] - t0
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return {"ttft_s": ttft, "tpot_s": tpot, "e2e_s": stamps[-1] - t0}


def standard_completion(
    prefill_url: str, decode_url: str, prompt: list[int], max_tokens: int
) -> dict[str, float]:
    """One request through the standard PD contract; times count from the prefill."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    body["kv_transfer_params"] = standard_prefill_params()
    t0 = time.perf_counter()
    resp = httpx.post(f"{prefill_url}/v1/completions", json=body, timeout=600)
    if resp.status_code != 200:
        raise RuntimeError(f"prefill HTTP {resp.status_code}: {resp.text[:300]}")
    params = resp.json().get("kv_transfer_params")
    if not params:
        raise RuntimeError("the prefill response carries no kv_transfer_params")
    row = stream_completion(decode_url, prompt, max_tokens, kv_transfer_params=params)
    shift = time.perf_counter() - t0 - row["e2e_s"]
    return {"ttft_s": row["ttft_s"] + shift, "tpot_s": row["tpot_s"], "e2e_s": row["e2e_s"] + shift}


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    ttft = [r["ttft_s"] for r in rows]
    tpot = [r["tpot_s"] for r in rows]
    return {
        "requests": len(rows),
        "ttft_p50_s": shared.pct(ttft, 0.5),
        "ttft_p99_s": shared.pct(ttft, 0.99),
        "tpot_p50_s": shared.pct(tpot, 0.5),
        "tpot_p99_s": shared.pct(tpot, 0.99),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else float("nan"),
    }


def idle_cpu_pct(servers: Sequence[VLLMServer], seconds: float) -> dict[str, float]:
    """CPU (% of one core) each server's whole process group burns while idle."""
    procs: dict[str, list[psutil.Process]] = {}
    for s in servers:
        assert s.proc is not None
        root = psutil.Process(s.proc.pid)
        group = [root, *root.children(recursive=True)]
        for p in group:
            with contextlib.suppress(psutil.Error):
                p.cpu_percent(None)
        procs[s.name] = group
    time.sleep(seconds)
    out: dict[str, float] = {}
    for name, group in procs.items():
        total = 0.0
        for p in group:
            with contextlib.suppress(psutil.Error):
                total += p.cpu_percent(None)
        out[name] = round(total, 1)
    return out


@contextlib.contextmanager
def proxy(args: list[str]) -> Iterator[str]:
    from lmcache_pd.router.proxy import spawn

    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, url = spawn(args, timeout_s=30)
        yield url
    finally:
        if proc is not None:
            shared.stop_process(proc)


class Bench:
    def __init__(self, args: argparse.Namespace, model: Path, work: Path) -> None:
        self.a = args
        self.model = model
        self.work = work
        self.rng = random.Random(args.seed)
        self.idle: dict[str, float] = {}
        self.log = print if not args.quiet else (lambda *a, **k: None)

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.a.vocab) for _ in range(n)]

    def bind(self, core: int) -> dict[str, str]:
        """Pin a disaggregated engine's compute threads to one core (prefiller 0,
        decoder 1). By default every vLLM CPU engine computes on core 0, and an engine
        busy-polls its queue for a second after each step: two engines on one core
        then slow each other down by that much."""
        if self.a.no_bind or (os.cpu_count() or 1) < 2:
            return {}
        return {"VLLM_CPU_OMP_THREADS_BIND": str(core % (os.cpu_count() or 1))}

    def server(self, name: str, **kw: Any) -> VLLMServer:
        extra = ["--no-enable-prefix-caching", *kw.pop("extra_args", [])]
        return VLLMServer(
            self.model,
            self.work / f"{name}.log",
            name=name,
            max_model_len=self.a.max_model_len,
            kv_cache_space_gb=2,
            extra_args=extra,
            **kw,
        )

    def measure(
        self,
        url: str,
        label: str,
        n: int,
        one: Callable[[list[int], int], dict[str, float]] | None = None,
    ) -> list[dict[str, float]]:
        one = one or (lambda prompt, tokens: stream_completion(url, prompt, tokens))
        one(self.prompt(self.a.prompt_tokens), 4)  # warm-up
        rows = []
        for i in range(n):
            row = one(self.prompt(self.a.prompt_tokens), self.a.output_tokens)
            row.update({"mode": label, "i": i, "prompt_tokens": self.a.prompt_tokens})
            rows.append(row)
            self.log(f"  {label} #{i}: ttft {row['ttft_s'] * 1e3:.0f} ms")
        return rows

    def single(self) -> list[dict[str, float]]:
        s = self.server("single")
        with shared.running([s]):
            self.idle.update(idle_cpu_pct([s], self.a.idle_s))
            return self.measure(s.url, "single", self.a.requests)

    def ours(self) -> list[dict[str, float]]:
        kv_port = free_port()
        common = {"chunk_size": self.a.chunk_size, "pd_buffer_size": 256 << 20}
        p = self.server(
            "ours-prefiller",
            kv_transfer_config=shared.connector_config("kv_producer", **common),
            env=self.bind(0),
        )
        d = self.server(
            "ours-decoder",
            env=self.bind(1),
            kv_transfer_config=shared.connector_config(
                "kv_consumer", pd_peer_init_port=kv_port, max_local_cpu_size=0.5, **common
            ),
        )
        with shared.running([p, d]):
            self.idle.update(idle_cpu_pct([p, d], self.a.idle_s))
            argv = ["--prefiller", p.url, "--decoder", d.url]
            argv += ["--decoder-kv", f"127.0.0.1:{kv_port}", "--handoff-port", "0"]
            with proxy(argv) as url:
                rows = self.measure(url, "ours", self.a.requests)
            if "standard" not in self.a.skip:
                rows += self.measure(
                    d.url,
                    "standard",
                    self.a.requests,
                    lambda prompt, tokens: standard_completion(p.url, d.url, prompt, tokens),
                )
            return rows

    def tp_env(self, tp: int, core: int) -> dict[str, str]:
        """Cores of an engine: TP=1 on ``core`` (see :meth:`bind`), TP=2 one core per rank."""
        if tp == 1:
            return self.bind(core)
        if self.a.no_bind or (os.cpu_count() or 1) < tp:
            return {}
        return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(r) for r in range(tp))}

    def shape(self, shape: Shape) -> list[dict[str, float]]:
        """Prefillers and decoders of ``shape`` behind the lmcache-pd proxy."""
        spec = SHAPES[shape]
        common = {"chunk_size": self.a.chunk_size, "pd_buffer_size": 256 << 20}
        tag = shape.value

        def tp_args(tp: int) -> list[str]:
            return ["--tensor-parallel-size", str(tp)] if tp > 1 else []

        prefillers = [
            self.server(
                f"{tag}-prefiller{i}",
                kv_transfer_config=shared.connector_config("kv_producer", **common),
                env=self.tp_env(spec.prefill_tp, 0),
                extra_args=tp_args(spec.prefill_tp),
            )
            for i in range(spec.prefillers)
        ]
        kv_ports: list[int] = []
        for _ in range(spec.decoders):  # rank r listens on base + r
            base = free_port_pair(avoid=tuple(kv_ports)) if spec.decode_tp == 2 else free_port()
            kv_ports += [base + r for r in range(spec.decode_tp)]
        bases = kv_ports[:: spec.decode_tp]
        decoders = [
            self.server(
                f"{tag}-decoder{i}",
                kv_transfer_config=shared.connector_config(
                    "kv_consumer", pd_peer_init_port=bases[i], max_local_cpu_size=0.5, **common
                ),
                env=self.tp_env(spec.decode_tp, 1),
                extra_args=tp_args(spec.decode_tp),
            )
            for i in range(spec.decoders)
        ]
        with shared.running([*prefillers, *decoders]):
            self.idle.update(idle_cpu_pct([*prefillers, *decoders], self.a.idle_s))
            argv = [a for p in prefillers for a in ("--prefiller", p.url)]
            for d, base in zip(decoders, bases, strict=True):
                argv += ["--decoder", d.url, "--decoder-kv", f"127.0.0.1:{base}"]
            with proxy([*argv, "--handoff-port", "0"]) as url:
                return self.measure(url, tag, self.a.requests)

    def nixl_shim(self) -> str:
        """vLLM imports ``nixl._api``; the ``nixl-cu12`` wheel alone installs it as
        ``nixl_cu12``. A three-file alias package on PYTHONPATH (engines of this phase
        only) bridges the names, as the ``nixl`` meta package would."""
        try:
            import nixl._api  # noqa: F401

            return ""
        except ImportError:
            pass
        pkg = self.work / "nixl_shim" / "nixl"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("from nixl_cu12 import *  # noqa: F403\n")
        (pkg / "_api.py").write_text("from nixl_cu12._api import *  # noqa: F403\n")
        (pkg / "_bindings.py").write_text("from nixl_cu12._bindings import *  # noqa: F403\n")
        return str(pkg.parent)

    def nixl(self) -> list[dict[str, float]]:
        cfg = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
        env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"}
        shim = self.nixl_shim()
        if shim:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (shim, os.environ.get("PYTHONPATH")) if p
            )
        p = self.server(
            "nixl-prefiller",
            kv_transfer_config=cfg,
            env={**env, **self.bind(0), "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
        )
        d = self.server(
            "nixl-decoder",
            kv_transfer_config=cfg,
            env={**env, **self.bind(1), "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
        )
        with shared.running([p, d]):
            self.idle.update(idle_cpu_pct([p, d], self.a.idle_s))
            argv = ["--prefiller", p.url, "--decoder", d.url]
            argv += ["--decoder-kv", f"127.0.0.1:{free_port()}"]
            with proxy(argv) as url:
                return self.measure(url, "nixl", self.a.nixl_requests)

    def reuse(self) -> list[dict[str, Any]]:
        s = self.server(
            "reuse-kv_both",
            kv_transfer_config=shared.connector_config(
                "kv_both",
                chunk_size=self.a.chunk_size,
                local_cpu=True,
                max_local_cpu_size=1.0,
            ),
        )
        rows: list[dict[str, Any]] = []
        suffix = 16
        with shared.running([s]):
            self.idle.update(idle_cpu_pct([s], self.a.idle_s))
            stream_completion(s.url, self.prompt(64), 2)  # warm-up
            for length in self.a.reuse_lengths:
                cold, warm = [], []
                for _ in range(self.a.reuse_reps):
                    prefix = self.prompt(length)
                    # cold: a fresh prefix is computed (and stored in the tier)
                    cold.append(stream_completion(s.url, prefix + self.prompt(suffix), 2)["ttft_s"])
                    # warm: the same prefix with another suffix is loaded from the tier
                    warm.append(stream_completion(s.url, prefix + self.prompt(suffix), 2)["ttft_s"])
                row = {
                    "prefix_tokens": length,
                    "cold_ttft_s": statistics.median(cold),
                    "warm_ttft_s": statistics.median(warm),
                }
                row["speedup"] = row["cold_ttft_s"] / row["warm_ttft_s"]
                rows.append(row)
                self.log(
                    f"  reuse {length}: cold {row['cold_ttft_s'] * 1e3:.0f} ms, "
                    f"warm {row['warm_ttft_s'] * 1e3:.0f} ms, x{row['speedup']:.2f}"
                )
        return rows


MODE_LABELS = {
    "single": "one engine",
    "ours": "push-ahead\n(our proxy)\n1P1D",
    "standard": "standard\ncontract",
    "nixl": "vLLM\nNixlConnector",
    Shape.P2D2.value: "2P2D\n(our proxy)",
    Shape.TP2_TP1.value: "P TP2\nD TP1",
    Shape.TP1_TP2.value: "P TP1\nD TP2",
    Shape.TP2_TP2.value: "P TP2\nD TP2",
}
MODES = ["single", "ours", "standard", "nixl", *(s.value for s in Shape if s is not Shape.P1D1)]


def print_table(summary: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="e2e: TTFT / TPOT (ms)")
    for col in (
        "mode",
        "n",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "TTFT p50 / one engine",
    ):
        t.add_column(col, justify="right")
    base = summary.get("single", {}).get("ttft_p50_s")
    for mode in [m for m in MODES if m in summary]:
        row = summary[mode]
        ratio = f"{row['ttft_p50_s'] / base:.2f}" if base else "-"
        t.add_row(
            MODE_LABELS.get(mode, mode).replace("\n", " "),
            str(row["requests"]),
            *(
                f"{row[k] * 1e3:.1f}"
                for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")
            ),
            ratio,
        )
    Console(width=120).print(t)  # one line per row in logs too


def _p50_p99_bars(
    ax: Any, summary: dict[str, dict[str, float]], modes: list[str], metric: str
) -> None:
    """``metric``'s (``ttft``/``tpot``) p50 and p99 in ms side by side per mode."""
    xs = range(len(modes))
    for shift, q in ((-0.2, "p50"), (0.2, "p99")):
        ms = [summary[m][f"{metric}_{q}_s"] * 1e3 for m in modes]
        ax.bar([x + shift for x in xs], ms, 0.4, label=f"{metric.upper()} {q}")
    ax.set_xticks(list(xs), [MODE_LABELS.get(m, m) for m in modes], fontsize=8)


def plot(result: dict[str, Any], path: Path) -> None:
    reuse = result.get("reuse", [])
    modes = [m for m in MODES if m in result["summary"]]
    shapes = any(m in result["summary"] for m in MODES[4:])
    panels = 1 + bool(reuse) + shapes
    fig, axes = shared.pyplot().subplots(1, panels, figsize=(5.5 * panels + 1, 4))
    axes = list(axes) if panels > 1 else [axes]
    ax1 = axes[0]
    _p50_p99_bars(ax1, result["summary"], modes, "ttft")
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (log)")
    ax1.set_title(f"TTFT, {result['config']['prompt_tokens']}-token prompts")
    ax1.legend()
    if shapes:
        ax3 = axes[-1]
        _p50_p99_bars(ax3, result["summary"], modes, "tpot")
        ax3.set_ylabel("ms")
        ax3.set_title(f"TPOT, {result['config']['output_tokens']} output tokens")
        ax3.legend()
    if reuse:
        ax2 = axes[1]
        lengths = [r["prefix_tokens"] for r in reuse]
        ax2.plot(lengths, [r["cold_ttft_s"] * 1e3 for r in reuse], "o-", label="recompute")
        ax2.plot(lengths, [r["warm_ttft_s"] * 1e3 for r in reuse], "o-", label="tier hit")
        ax2.set_xlabel("shared prefix tokens")
        ax2.set_ylabel("TTFT ms")
        ax2.set_title(f"kv_both reuse (x{result['ratios'].get('reuse_ttft_speedup', 0):.1f})")
        ax2.legend()
    shared.save_figure(fig, path)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = shared.engine_parser(__doc__, "smaller model and fewer requests")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--output-tokens", type=int, default=None)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--nixl-requests", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--reuse-lengths", default=None, help="comma-separated prefix lengths")
    p.add_argument("--reuse-reps", type=int, default=None)
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument("--skip", default="", help="comma-separated: single,ours,standard,nixl,reuse")
    p.add_argument(
        "--shape",
        type=parse_shapes,
        default=[Shape.P1D1],
        help="comma-separated deployment shapes: " + ", ".join(s.value for s in Shape),
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bind", action="store_true", help="do not pin prefiller/decoder cores")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    a.hidden = a.hidden or (512 if q else 1024)
    a.layers = a.layers or (4 if q else 8)
    a.prompt_tokens = a.prompt_tokens or (1024 if q else 2048)
    a.output_tokens = a.output_tokens or (16 if q else 32)
    a.requests = a.requests or (6 if q else 16)
    a.nixl_requests = a.nixl_requests or (2 if q else 4)
    a.reuse_reps = a.reuse_reps or (1 if q else 3)
    lengths = a.reuse_lengths or ("256,1024,2048" if q else "256,512,1024,2048,3584")
    a.reuse_lengths = [int(x) for x in lengths.split(",")]
    a.vocab = 512
    a.skip = {x.strip() for x in a.skip.split(",") if x.strip()}
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    work = shared.prepare_run(a.work_dir, "lmcache-pd-e2e-")
    spec = shared.llama_spec(a.hidden, a.layers, a.vocab, a.max_model_len)
    model = shared.build_model(a.model_dir, work, spec)
    bench = Bench(a, model, work)
    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    phases: list[tuple[str, Callable[[], list[dict[str, float]]]]] = [("single", bench.single)]
    if Shape.P1D1 in a.shape:
        phases.append(("ours", bench.ours))
    for shape in a.shape:
        if shape is not Shape.P1D1:
            phases.append((shape.value, functools.partial(bench.shape, shape)))
    phases.append(("nixl", bench.nixl))
    t_start = time.time()
    for name, fn in phases:
        if name in a.skip:
            continue
        print(f"[{name}]", flush=True)
        try:
            got = fn()
        except Exception as exc:  # one failed configuration must not lose the others
            errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"  {name} failed: {errors[name][:300]}", flush=True)
            continue
        rows.extend(got)
        for mode in dict.fromkeys(r["mode"] for r in got):
            summary[str(mode)] = summarize([r for r in got if r["mode"] == mode])
    reuse: list[dict[str, Any]] = []
    if "reuse" not in a.skip:
        print("[reuse]", flush=True)
        try:
            reuse = bench.reuse()
        except Exception as exc:
            errors["reuse"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"  reuse failed: {errors['reuse'][:300]}", flush=True)
    ratios: dict[str, float] = {}
    if "single" in summary:
        base = summary["single"]["ttft_p50_s"]
        for m in MODES[1:]:
            if m in summary:
                ratios[f"{m}_ttft_p50_over_single"] = summary[m]["ttft_p50_s"] / base
                ratios[f"{m}_tpot_p50_over_single"] = (
                    summary[m]["tpot_p50_s"] / summary["single"]["tpot_p50_s"]
                )
    if "ours" in summary and "nixl" in summary:
        ratios["nixl_ttft_p50_over_ours"] = (
            summary["nixl"]["ttft_p50_s"] / summary["ours"]["ttft_p50_s"]
        )
    if reuse:
        ratios["reuse_ttft_speedup"] = reuse[-1]["speedup"]
    result = {
        "benchmark": "e2e",
        "config": {
            "quick": a.quick,
            "model": {
                "hidden": a.hidden,
                "layers": a.layers,
                "heads": spec.heads,
                "kv_heads": spec.kv_heads,
                "head_size": 64,
            },
            "prompt_tokens": a.prompt_tokens,
            "output_tokens": a.output_tokens,
            "shapes": [s.value for s in a.shape],
            "chunk_size": a.chunk_size,
            "max_model_len": a.max_model_len,
            **shared.host_load(),
        },
        "rows": rows,
        "summary": summary,
        "reuse": reuse,
        "ratios": ratios,
        "idle_cpu_pct": bench.idle,
        "errors": errors,
        "seconds": round(time.time() - t_start, 1),
    }
    print(
        json.dumps(
            {"summary": summary, "ratios": ratios, "idle_cpu_pct": bench.idle, "errors": errors},
            indent=2,
        )
    )
    print_table(summary)
    shared.write_outputs(result, a.json, a.png, lambda path: plot(result, path))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
