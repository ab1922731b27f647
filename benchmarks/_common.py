"""The plumbing the benchmarks share, one implementation of each; it measures nothing.

Owns:

* every benchmark's output: ``--json`` / ``--png`` (:func:`add_output_args`) and the tail
  that writes them (:func:`write_outputs`), matplotlib without a display
  (:func:`pyplot`, :func:`save_figure`);
* the tier benchmarks' rounds (``tiers``, ``remote``): the result's first and last keys
  (:func:`run_header`, :func:`rounds_header`, :func:`ratio_summary`), ``--quick/--chunks/--reps``
  (:func:`rounds_parser`), the run's tail (:func:`report`), the random
  llama-8b chunks (:func:`chunk_rounds`), timed calls in alternating order, GB/s from
  median times, the "tier vs baseline" ratio table and bar chart;
* the vLLM-engine benchmarks' set-up (``e2e``, ``kv_share``, ``soak``): their common
  arguments (:func:`engine_parser`), work folder and auth secret (:func:`prepare_run`),
  the random-weight Llama (:func:`llama_spec`, :func:`build_model`), the
  ``LMCachePDConnector`` ``kv_transfer_config`` (:func:`connector_config`), engines
  started and always stopped (:func:`running`), a child process stopped
  (:func:`stop_process`), the host's load (:func:`host_load`) and percentiles (:func:`pct`).

A benchmark imports it by file (``benchmarks/`` is not a package): it appends its own
folder to ``sys.path``, then ``import _common as shared``. The leading underscore keeps it
out of ``lmcache-pd bench``'s list of benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcache_pd.integration.vllm.tiny_model import TinySpec, make_tiny_model

if TYPE_CHECKING:
    import numpy as np

    from lmcache_pd.integration.vllm.launch import VLLMServer

CHUNK_TOKENS = 256  # tokens per chunk of the tier benchmarks (32 MiB of llama-8b)
CONNECTOR = {
    "kv_connector": "LMCachePDConnector",
    "kv_connector_module_path": "lmcache_pd.integration.vllm",
}


# ---------------------------------------------------------------------- output
def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--json F`` and ``--png P`` (paths; their folders are made when written)."""
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--png", type=Path, help="write a chart (PNG)")


def write_outputs(
    result: Mapping[str, Any],
    json_path: Path | None,
    png_path: Path | None,
    plot: Callable[[Path], object],
    indent: int = 2,
) -> None:
    """Write ``result`` as JSON to ``json_path`` and ``plot(png_path)``, each when given."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=indent) + "\n")
    if png_path:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        plot(png_path)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display), imported when first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out, write and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


# ---------------------------------------------------------------------- tier benchmarks
def run_header(name: str, quick: bool) -> dict[str, Any]:
    """The first keys of a result: which benchmark, how long a run, on what host."""
    return {
        "benchmark": name,
        "quick": quick,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def ratio_summary(ratios: Mapping[str, float], target: float, t0: float) -> dict[str, Any]:
    """The closing keys of a result: its ratios, the target each must reach, whether it
    does, and the seconds since ``t0`` (``time.perf_counter``)."""
    return {
        "ratios": dict(ratios),
        "target": target,
        "meets_target": {k: v >= target for k, v in ratios.items()},
        "elapsed_s": time.perf_counter() - t0,
    }


def report(
    result: dict[str, Any],
    args: argparse.Namespace,
    table: Callable[[dict[str, Any]], object],
    plot: Callable[[dict[str, Any], Path], object],
) -> int:
    """A run's tail: print ``table(result)``, write ``--json`` and ``--png``; exit status 0."""
    table(result)
    write_outputs(result, args.json, args.png, lambda path: plot(result, path))
    return 0


def rounds_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--quick``, ``--chunks``, ``--reps``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="4 chunks, 5 rounds (< 1 min)")
    parser.add_argument("--chunks", type=int, help="32 MiB chunks per round (default 8)")
    parser.add_argument("--reps", type=int, help="measured rounds (default 7)")
    return parser


def chunk_rounds(quick: bool, chunks: int | None, reps: int | None) -> tuple[list[np.ndarray], int]:
    """``chunks`` random llama-8b chunks of :data:`CHUNK_TOKENS` tokens (default 4 quick,
    8 full; seeded) and the measured rounds (``reps``, default 5 quick, 7 full)."""
    import numpy as np

    from lmcache_pd.layout import preset

    slot = preset("llama-8b").bytes_per_chunk(CHUNK_TOKENS)
    rng = np.random.default_rng(1)
    src = [rng.integers(0, 256, slot, dtype=np.uint8) for _ in range(chunks or (4 if quick else 8))]
    return src, reps or (5 if quick else 7)


def rounds_header(src: Sequence[np.ndarray], reps: int) -> dict[str, Any]:
    """The keys of a result that say what each round moved: layout, chunk size, chunks."""
    return {
        "layout": "llama-8b",
        "chunk_size_tokens": CHUNK_TOKENS,
        "chunk_bytes": src[0].nbytes,
        "chunks": len(src),
        "reps": reps,
    }


def chunk_key(i: int, salt: int = 0) -> bytes:
    """A 16-byte key, distinct per ``(i, salt)``."""
    return (salt * 1_000_003 + i).to_bytes(8, "little") * 2


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_in_turn(steps: Sequence[tuple[str, Callable[[], object]]], rep: int) -> dict[str, float]:
    """Seconds of each named step, run in order on odd rounds and reversed on even ones
    (neither side always goes first)."""
    return {name: timed(fn) for name, fn in (steps if rep % 2 else steps[::-1])}


def median_gbps(samples: Mapping[str, Sequence[float]], total_bytes: int) -> dict[str, float]:
    """GB/s of moving ``total_bytes`` in the median of each name's seconds."""
    return {k: total_bytes / statistics.median(v) / 1e9 for k, v in samples.items()}


def print_ratio_table(
    title: str,
    baseline: str,
    rows: Sequence[tuple[str, float, float, float]],
    target: float,
    notes: Sequence[str] = (),
) -> None:
    """A table of ``(path, tier GB/s, baseline GB/s, ratio)`` rows, each ratio marked
    against ``target``, then one line per note."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("path")
    for col in ("tier GB/s", baseline, "ratio"):
        table.add_column(col, justify="right")
    table.add_column(f"≥ {target}")
    for name, tier, base, ratio in rows:
        ok = "[green]yes[/green]" if ratio >= target else "[red]no[/red]"
        table.add_row(name, f"{tier:.2f}", f"{base:.2f}", f"{ratio:.2f}", ok)
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note)


def ratio_bars(
    ax: Any,
    names: Sequence[str],
    tier: Sequence[float],
    base: Sequence[float],
    ratios: Sequence[float],
    labels: tuple[str, str],
) -> None:
    """Baseline and tier GB/s side by side per path, the tier's bar labelled with its
    ratio; ``labels``: (baseline, tier) legend entries."""
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], base, 0.4, label=labels[0], color="#999999")
    ax.bar([x + 0.2 for x in xs], tier, 0.4, label=labels[1], color="#1f77b4")
    for x, t, r in zip(xs, tier, ratios, strict=True):
        ax.text(x + 0.2, t, f"{r:.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("GB/s")
    ax.set_ylim(0, max([*tier, *base]) * 1.35)


# ---------------------------------------------------------------------- engine benchmarks
def engine_parser(doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--quick``, ``--json``, ``--png``,
    ``--model-dir`` and ``--work-dir``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    p.add_argument("--quick", action="store_true", help=quick_help)
    add_output_args(p)
    p.add_argument("--model-dir", default=None, help="where to build/reuse the model")
    p.add_argument("--work-dir", default=None, help="logs (default: a temp dir)")
    return p


def prepare_run(work_dir: str | None, prefix: str) -> Path:
    """The run's work folder (``work_dir``, or a new temporary one named ``prefix...``);
    a fresh ``LMCACHE_PD_AUTH_SECRET`` for its engines unless one is set."""
    os.environ.setdefault("LMCACHE_PD_AUTH_SECRET", secrets.token_hex(32))
    work = Path(work_dir or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def llama_spec(hidden: int, layers: int, vocab: int, max_positions: int) -> TinySpec:
    """A random-weight Llama ``hidden`` wide: 64-wide heads, four per KV head."""
    heads = max(1, hidden // 64)
    return TinySpec(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=max(1, heads // 4),
        head_size=64,
        intermediate=hidden * 3,
        vocab=vocab,
        max_positions=max_positions,
    )


def build_model(model_dir: str | None, work: Path, spec: TinySpec) -> Path:
    """Build (or reuse) the model of ``spec`` in ``model_dir`` (default ``work/model``)."""
    model = make_tiny_model(Path(model_dir) if model_dir else work / "model", spec)
    print(f"model {spec} in {model}; logs in {work}", flush=True)
    return model


def connector_config(role: str, **extra: Any) -> dict[str, Any]:
    """An engine's ``kv_transfer_config`` for ``LMCachePDConnector`` in ``role``."""
    return {**CONNECTOR, "kv_role": role, "kv_connector_extra_config": extra}


@contextlib.contextmanager
def running(servers: Sequence[VLLMServer], timeout_s: float = 600) -> Iterator[None]:
    """Start ``servers``, wait until each is ready; stop them all on the way out."""
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(timeout_s)
        yield
    finally:
        for s in servers:
            s.stop()


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGTERM ``proc``; SIGKILL it if it is still there after ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


def host_load() -> dict[str, Any]:
    """The host's CPUs and load average when a run starts (a result's ``config``)."""
    return {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values``, linearly interpolated (NaN when empty)."""
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)
