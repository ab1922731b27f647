"""Paged-KV kernel benchmark: gather/scatter GB/s beside a plain copy of the same bytes.

``lmcache-pd bench kernels [--quick] [--json F] [--png P] [--device auto|cpu|cuda]``

For ``llama-8b`` (paged formats: vLLM CPU backend and flash-attn on CPU; flash-attn and
vLLM's 4-D view on GPU) and the ``deepseek-mla`` MLA layout, chunks of 256 up to 8192
tokens are gathered out of, and scattered into, a paged cache whose blocks sit in random
order. Each figure is the best of interleaved repetitions of copy, gather and scatter
in one run (best, not mean: a busy shared host only ever adds time), so
``gather_over_copy`` / ``scatter_over_copy`` compare like with like. The copy is the
best plain copy of the same contiguous bytes this host does: on CPU the fastest of
``torch``'s copy, glibc ``memcpy`` split across torch's threads, and the native copy
split likewise with stores that bypass the cache (``checksum.copy_plain``, the loop the
kernels use, without the hash); each is in the JSON (``copy_torch_gbps``,
``copy_memcpy_gbps``, ``copy_stream_gbps``). GPU: device-to-device copy.
Targets: >= 0.5 of memcpy on CPU, >= 0.8 of the D2D copy on GPU.

The same run also times ``gather_checksum``/``scatter_checksum`` (the chunk checksum
computed inside the copy) against plain gather/scatter (target >= 0.9), and a copy
with the checksum (the receiver's verified copy into a tier) against the plain copy
(target >= 0.95).

``--quick`` caps layers and tokens so it finishes in well under a minute on 2 cores.
Every loop is bounded in count and in time (``--budget-s`` per measurement).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmcache_pd.kernels import (
    PagedFormat,
    checksum,
    cuda_kernels,
    gather,
    gather_checksum,
    native,
    scatter,
    scatter_checksum,
    torch_dtype,
)
from lmcache_pd.layout import KVLayout, preset

TARGETS = {"cpu": 0.5, "cuda": 0.8}
CHECKSUM_TARGET = 0.9  # gather/scatter with the fused checksum vs without
COPY_HASH_TARGET = 0.95  # copy + checksum vs copy (the receiver's verified copy)
FULL_TOKENS = (256, 1024, 4096, 8192)
QUICK_TOKENS = (256, 1024, 4096)
QUICK_LAYER_CAP = {"llama-8b": 8, "deepseek-mla": 8}


@dataclass
class Row:
    layout: str
    fmt: str
    layers: int
    tokens: int
    mib: float
    copy_gbps: float  # the best plain copy: max of the three below (GPU: torch's)
    copy_torch_gbps: float
    copy_memcpy_gbps: float | None  # CPU only
    copy_stream_gbps: float | None  # CPU only
    gather_gbps: float
    scatter_gbps: float
    gather_over_copy: float
    scatter_over_copy: float
    copy_sum_gbps: float
    gather_sum_gbps: float
    scatter_sum_gbps: float
    copy_sum_over_copy: float
    gather_sum_over_gather: float
    scatter_sum_over_scatter: float


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmcache-pd bench kernels", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer layers/tokens/reps (< 1 min)")
    p.add_argument("--json", type=Path, help="write results as JSON here")
    p.add_argument("--png", type=Path, help="draw GB/s vs tokens here (matplotlib, Agg)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default 10)")
    p.add_argument("--tokens", type=int, nargs="+", help="override the token counts")
    p.add_argument("--layers", type=int, default=0, help="cap every layout's layers")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--budget-s", type=float, default=3.0, help="time cap per measurement")
    return p.parse_args(argv)


def _cases(device: str, quick: bool, layer_cap: int) -> list[tuple[str, KVLayout, PagedFormat]]:
    kv_fmts = (
        [PagedFormat.CPU_VLLM, PagedFormat.FLASH_ATTN]
        if device == "cpu"
        else [PagedFormat.FLASH_ATTN, PagedFormat.VLLM_4D]
    )
    out = []
    for name, fmts in (("llama-8b", kv_fmts), ("deepseek-mla", [PagedFormat.MLA])):
        layout = preset(name)
        cap = layer_cap or (QUICK_LAYER_CAP[name] if quick else 0)
        if cap:
            layout = KVLayout(**{**_fields(layout), "num_layers": min(cap, layout.num_layers)})
        out += [(name, layout, f) for f in fmts]
    return out


def _fields(layout: KVLayout) -> dict[str, object]:
    return {f: getattr(layout, f) for f in layout.__struct_fields__}


def _make_caches(
    layout: KVLayout, fmt: PagedFormat, num_blocks: int, device: str
) -> list[torch.Tensor]:
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    shapes = {
        PagedFormat.FLASH_ATTN: (2, num_blocks, n, h, d),
        PagedFormat.CPU_VLLM: (num_blocks, h, n, 2 * d),
        PagedFormat.VLLM_4D: (num_blocks, h, n, 2 * d),
        PagedFormat.MLA: (num_blocks, n, d),
    }
    # One buffer viewed per layer, as vLLM allocates it; filled so pages are resident.
    whole = torch.empty((layout.num_layers, *shapes[fmt]), dtype=torch_dtype(layout), device=device)
    whole.view(torch.uint8).fill_(0x3C)
    return list(whole.unbind(0))


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":

        def timed(fn: Callable[[], object]) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3

        return timed

    def timed_cpu(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return timed_cpu


def _measure(
    name: str, layout: KVLayout, fmt: PagedFormat, tokens: int, device: str, reps: int,
    budget_s: float,
) -> Row:  # fmt: skip
    bs = layout.block_size
    blocks = (tokens + bs - 1) // bs
    num_blocks = blocks + max(4, blocks // 4)  # some spare pages, in random order
    caches = _make_caches(layout, fmt, num_blocks, device)
    gen = torch.Generator().manual_seed(tokens)
    order = torch.randperm(num_blocks, generator=gen)[:blocks]
    slots = (order[:, None] * bs + torch.arange(bs)).reshape(-1)[:tokens].to(device)
    nbytes = tokens * layout.bytes_per_token
    chunk = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src = torch.full_like(chunk, 7)
    # Each copy writes its own destination: a destination another copy just left dirty
    # in the cache (this host's L3 holds most chunks) makes the next copy's streamed
    # stores pay for that, and the order of the ops would pick the winner (measured).
    dst = torch.empty_like(chunk)
    dst_sum = torch.empty_like(chunk)
    ops: dict[str, Callable[[], object]] = {
        "copy": lambda: dst.copy_(src),
        **(_cpu_copies(src) if device == "cpu" else {}),
        "copy_sum": lambda: _copy_sum(dst_sum, src),
        "gather": lambda: gather(caches, slots, chunk, layout, fmt),
        "gather_sum": lambda: gather_checksum(caches, slots, chunk, layout, fmt),
        "scatter": lambda: scatter(chunk, caches, slots, layout, fmt),
        "scatter_sum": lambda: scatter_checksum(chunk, caches, slots, layout, fmt),
    }
    timed = _timer(device)
    for fn in ops.values():  # warm-up: first-touch, kernel compile/load
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in ops}
    deadline = time.monotonic() + budget_s
    for _ in range(reps):  # bounded in count and in time
        for key, fn in ops.items():
            times[key].append(timed(fn))
        if time.monotonic() > deadline:
            break
    gbps = {k: nbytes / min(v) / 1e9 for k, v in times.items()}  # best of the reps
    copy_torch = gbps["copy"]
    gbps["copy"] = max(copy_torch, gbps.get("copy_stream", 0.0), gbps.get("copy_memcpy", 0.0))
    return Row(
        layout=name,
        fmt=fmt.value,
        layers=layout.num_layers,
        tokens=tokens,
        mib=round(nbytes / 2**20, 2),
        copy_gbps=round(gbps["copy"], 3),
        copy_torch_gbps=round(copy_torch, 3),
        copy_memcpy_gbps=round(gbps["copy_memcpy"], 3) if "copy_memcpy" in gbps else None,
        copy_stream_gbps=round(gbps["copy_stream"], 3) if "copy_stream" in gbps else None,
        gather_gbps=round(gbps["gather"], 3),
        scatter_gbps=round(gbps["scatter"], 3),
        gather_over_copy=round(gbps["gather"] / gbps["copy"], 3),
        scatter_over_copy=round(gbps["scatter"] / gbps["copy"], 3),
        copy_sum_gbps=round(gbps["copy_sum"], 3),
        gather_sum_gbps=round(gbps["gather_sum"], 3),
        scatter_sum_gbps=round(gbps["scatter_sum"], 3),
        copy_sum_over_copy=round(gbps["copy_sum"] / gbps["copy"], 3),
        gather_sum_over_gather=round(gbps["gather_sum"] / gbps["gather"], 3),
        scatter_sum_over_scatter=round(gbps["scatter_sum"] / gbps["scatter"], 3),
    )


def _cpu_copies(src: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The plain copies besides torch's that may be the fastest on this CPU: glibc
    ``memcpy`` and the streamed native copy, each split across torch's threads like the
    fused copy (``checksum.split_edges``), each into a destination of its own."""
    dst, dst_stream = torch.empty_like(src), torch.empty_like(src)

    def piece(a: int, b: int) -> int:  # a foreign call: releases the GIL
        ctypes.memmove(dst.data_ptr() + a, src.data_ptr() + a, b - a)
        return 0

    def memcpy() -> None:  # split as copy_plain splits
        native.run_pieces(checksum.split_edges(src.numel()), piece)

    return {"copy_memcpy": memcpy, "copy_stream": lambda: checksum.copy_plain(dst_stream, src)}


def _copy_sum(dst: torch.Tensor, src: torch.Tensor) -> int:
    """A verified copy: copy + checksum in one pass (CPU: native loop that stores and
    hashes each word; GPU: copy, then the hash by torch ops as a separate pass)."""
    if dst.device.type == "cuda":
        dst.copy_(src)
        return checksum.torch_sum(dst)
    return checksum.copy_sum(dst, src)


def _print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("layout", "format", "layers", "tokens", "MiB", "torch copy GB/s",
                "memcpy GB/s", "streamed copy GB/s", "gather GB/s",
                "scatter GB/s", "gather/copy", "scatter/copy", "copy+sum/copy",
                "gather+sum/gather", "scatter+sum/scatter"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("layout", "format") else "right")
    for r in rows:
        table.add_row(
            r.layout, r.fmt, str(r.layers), str(r.tokens), f"{r.mib:.0f}",
            f"{r.copy_torch_gbps:.2f}",
            "-" if r.copy_memcpy_gbps is None else f"{r.copy_memcpy_gbps:.2f}",
            "-" if r.copy_stream_gbps is None else f"{r.copy_stream_gbps:.2f}",
            f"{r.gather_gbps:.2f}", f"{r.scatter_gbps:.2f}",
            f"{r.gather_over_copy:.2f}", f"{r.scatter_over_copy:.2f}",
            f"{r.copy_sum_over_copy:.2f}", f"{r.gather_sum_over_gather:.2f}",
            f"{r.scatter_sum_over_scatter:.2f}",
        )  # fmt: skip
    Console(width=200).print(table)


def _plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.layout, r.fmt), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, ((lay, fmt), rs) in zip(axes[0], groups.items(), strict=True):
        x = [r.tokens for r in rs]
        ax.plot(x, [r.copy_gbps for r in rs], "k--", label="best plain copy (ratio base)")
        if rs[0].copy_stream_gbps is not None:
            ax.plot(x, [r.copy_torch_gbps for r in rs], ":", color="grey", label="torch copy")
        ax.plot(x, [r.gather_gbps for r in rs], "o-", label="gather")
        ax.plot(x, [r.scatter_gbps for r in rs], "s-", label="scatter")
        ax.plot(x, [r.gather_sum_gbps for r in rs], "o:", label="gather + checksum")
        ax.plot(x, [r.scatter_sum_gbps for r in rs], "s:", label="scatter + checksum")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_ylim(bottom=0)
        ax.set_title(f"{lay} / {fmt} ({rs[0].layers} layers)")
        ax.set_xlabel("tokens per chunk")
        ax.set_ylabel("GB/s")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device")
        return 2
    reps = args.reps or 10
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens_list = args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS)
    backend = "torch"
    if device == "cuda":
        backend = "cuda" if cuda_kernels.available() else "torch (cuda-python missing)"
    rows = []
    for name, layout, fmt in _cases(device, args.quick, args.layers):
        for tokens in tokens_list:
            rows.append(_measure(name, layout, fmt, tokens, device, reps, args.budget_s))
    target = TARGETS[device]
    g_min = min(r.gather_over_copy for r in rows)
    s_min = min(r.scatter_over_copy for r in rows)
    summary = {
        "gather_over_copy_median": round(statistics.median(r.gather_over_copy for r in rows), 3),
        "scatter_over_copy_median": round(statistics.median(r.scatter_over_copy for r in rows), 3),
        "gather_over_copy_min": g_min,
        "scatter_over_copy_min": s_min,
        "target": target,
        "meets_target": g_min >= target and s_min >= target,
        "gather_sum_over_gather_min": min(r.gather_sum_over_gather for r in rows),
        "scatter_sum_over_scatter_min": min(r.scatter_sum_over_scatter for r in rows),
        "copy_sum_over_copy_min": min(r.copy_sum_over_copy for r in rows),
        "checksum_target": CHECKSUM_TARGET,
        "copy_hash_target": COPY_HASH_TARGET,
        "checksum_cpu_impl": checksum.implementation(),
    }
    summary["meets_checksum_target"] = (
        summary["gather_sum_over_gather_min"] >= CHECKSUM_TARGET
        and summary["scatter_sum_over_scatter_min"] >= CHECKSUM_TARGET
    )
    dev_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    title = (
        f"lmcache-pd kernels on {device} ({dev_name}, backend {backend}"
        f"{f', {torch.get_num_threads()} thread(s)' if device == 'cpu' else ''}"
        f"{', quick' if args.quick else ''}; best of {reps} interleaved reps)"
    )
    _print_table(rows, title)
    print(
        f"gather/copy median {summary['gather_over_copy_median']:.2f} "
        f"(min {g_min:.2f}), scatter/copy median {summary['scatter_over_copy_median']:.2f} "
        f"(min {s_min:.2f}); target >= {target} -> "
        f"{'met' if summary['meets_target'] else 'NOT met'}"
    )
    print(
        f"checksum ({summary['checksum_cpu_impl']} on CPU): gather+sum/gather min "
        f"{summary['gather_sum_over_gather_min']:.2f}, scatter+sum/scatter min "
        f"{summary['scatter_sum_over_scatter_min']:.2f} (target >= {CHECKSUM_TARGET}: "
        f"{'met' if summary['meets_checksum_target'] else 'NOT met'}); copy+sum/copy min "
        f"{summary['copy_sum_over_copy_min']:.2f} (target >= {COPY_HASH_TARGET})"
    )
    if args.json:
        doc = {
            "benchmark": "kernels",
            "device": device,
            "device_name": dev_name,
            "backend": backend,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "quick": args.quick,
            "reps": reps,
            "results": [asdict(r) for r in rows],
            "summary": summary,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.png:
        _plot(rows, args.png, title)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
