"""``lmcache-pd check kernels``: compile the CUDA kernels with NVRTC; round trip on a GPU.

Owns the self-test behind the CLI. Without cuda-python it prints why and exits 0
("skipped"); a compile failure exits 1; with a CUDA device it also runs a gather +
scatter round trip (checked bit-exact against the torch path) and prints GB/s beside a
device-to-device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

import torch

from . import checksum, cuda_kernels
from .geometry import KVShape, KVShapeLike, PagedFormat, torch_dtype
from .paged_kv import gather, gather_checksum, scatter, scatter_checksum

DEFAULT_ARCHS = ("sm_80", "sm_90")


def _parse(argv: list[str], shapes: Mapping[str, KVShapeLike]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmcache-pd check kernels", description=__doc__)
    p.add_argument(
        "--arch",
        action="append",
        help=f"NVRTC target(s), e.g. sm_90 or compute_90 (default: {' '.join(DEFAULT_ARCHS)})",
    )
    p.add_argument("--layout", default="llama-8b", choices=sorted(shapes))
    p.add_argument("--tokens", type=int, default=2048, help="tokens in the GPU round trip")
    p.add_argument("--iters", type=int, default=20, help="timed iterations on a GPU")
    return p.parse_args(argv)


def _compile_all(archs: list[str]) -> bool:
    ok = True
    for arch in archs:
        cubin = arch.startswith("sm_")
        t0 = time.perf_counter()
        try:
            binary = cuda_kernels.compile_source(arch, cubin)
        except cuda_kernels.KernelCompileError as exc:
            print(f"FAIL {arch}: {exc}")
            ok = False
            continue
        missing = [n for n in cuda_kernels.kernel_names() if n.encode() not in binary]
        kind = "cubin" if cubin else "ptx"
        ms = (time.perf_counter() - t0) * 1e3
        if missing:
            print(f"FAIL {arch}: {kind} lacks kernels {missing}")
            ok = False
        else:
            n = len(cuda_kernels.kernel_names())
            print(f"ok   {arch}: {n} kernels, {len(binary)} bytes {kind}, {ms:.0f} ms")
    return ok


def _caches(layout: KVShape, num_blocks: int, device: str) -> list[torch.Tensor]:
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    shape = (num_blocks, n, d) if layout.is_mla else (2, num_blocks, n, h, d)
    out = []
    for _ in range(layout.num_layers):
        raw = torch.randint(-128, 127, (*shape[:-1], d * layout.dtype_size), device=device)
        out.append(raw.to(torch.int8).view(torch_dtype(layout)))
    return out


def _gpu_round_trip(shape: KVShapeLike, tokens: int, iters: int) -> bool:
    layout = KVShape.of(shape)
    dev = "cuda"
    fmt = PagedFormat.MLA if layout.is_mla else PagedFormat.FLASH_ATTN
    blocks_needed = (tokens + layout.block_size - 1) // layout.block_size
    num_blocks = 2 * blocks_needed
    caches = _caches(layout, num_blocks, dev)
    perm = torch.randperm(num_blocks, device=dev)[:blocks_needed]
    offs = torch.arange(layout.block_size, device=dev)
    slots = (perm[:, None] * layout.block_size + offs[None, :]).reshape(-1)[:tokens]
    nbytes = tokens * layout.bytes_per_token
    out = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    ref = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    gather(caches, slots, out, layout, fmt, backend="cuda")
    gather(caches, slots, ref, layout, fmt, backend="torch")
    torch.cuda.synchronize()
    if not torch.equal(out, ref):
        print("FAIL gather: CUDA kernel differs from the torch path")
        return False
    fresh = [torch.zeros_like(c) for c in caches]
    scatter(out, fresh, slots, layout, fmt, backend="cuda")
    back = torch.empty_like(out)
    gather(fresh, slots, back, layout, fmt, backend="torch")
    if not torch.equal(back, out):
        print("FAIL scatter: round trip is not bit-exact")
        return False
    copy_dst = torch.empty_like(out)

    def timed(fn: object) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()  # type: ignore[operator]
        start.record()
        for _ in range(iters):
            fn()  # type: ignore[operator]
        end.record()
        end.synchronize()
        return nbytes * iters / (start.elapsed_time(end) * 1e-3) / 1e9

    digest = gather_checksum(caches, slots, out, layout, fmt, backend="cuda")
    if digest != checksum.reference_digest(out.cpu().numpy()):
        print("FAIL checksum: the gather kernel's digest differs from the CPU reference")
        return False
    if scatter_checksum(out, fresh, slots, layout, fmt, backend="cuda") != digest:
        print("FAIL checksum: the scatter kernel's digest differs from the gather's")
        return False
    copy = timed(lambda: copy_dst.copy_(out))
    g = timed(lambda: gather(caches, slots, out, layout, fmt, backend="cuda"))
    s = timed(lambda: scatter(out, caches, slots, layout, fmt, backend="cuda"))
    gs = timed(lambda: gather_checksum(caches, slots, out, layout, fmt, backend="cuda"))
    ss = timed(lambda: scatter_checksum(out, caches, slots, layout, fmt, backend="cuda"))
    print(
        f"ok   round trip {layout.model or 'layout'} {fmt.name} {tokens} tokens "
        f"({nbytes / 2**20:.0f} MiB): gather {g:.1f} GB/s ({g / copy:.2f}x copy), "
        f"scatter {s:.1f} GB/s ({s / copy:.2f}x copy), D2D copy {copy:.1f} GB/s"
    )
    print(
        f"ok   checksum ({checksum.NAME}) matches the CPU reference; with it gather "
        f"{gs:.1f} GB/s ({gs / g:.2f}x without), scatter {ss:.1f} GB/s ({ss / s:.2f}x "
        "without; both include the host sync that reads the digest)"
    )
    return True


def main(argv: list[str], shapes: Mapping[str, KVShapeLike]) -> int:
    """Run the check; ``shapes`` are the named layouts ``--layout`` chooses from (the
    core's presets: :mod:`lmcache_pd.kernel_check` passes them)."""
    args = _parse(argv, shapes)
    try:
        cuda_kernels._bindings()
    except ImportError as exc:
        print(f"kernels check: skipped (cuda-python not installed: {exc}).")
        print("Install the CUDA extra to compile the kernels: pip install 'lmcache-pd[cuda]'")
        return 0
    try:
        major, minor = cuda_kernels.nvrtc_version()
    except Exception as exc:  # libnvrtc missing or unloadable
        print(f"FAIL NVRTC could not be loaded: {exc}")
        print("Install it with: pip install 'nvidia-cuda-nvrtc-cu12>=12.6,<13'")
        return 1
    archs = args.arch or list(DEFAULT_ARCHS)
    print(f"NVRTC {major}.{minor}: compiling paged KV kernels for {', '.join(archs)}")
    if not _compile_all(archs):
        return 1
    reason = cuda_kernels.unavailable_reason()
    if reason is not None:
        print(f"GPU round trip skipped: {reason}")
        return 0
    try:
        ok = _gpu_round_trip(shapes[args.layout], args.tokens, args.iters)
    except Exception as exc:
        print(f"FAIL GPU round trip: {type(exc).__name__}: {exc}")
        return 1
    return 0 if ok else 1
