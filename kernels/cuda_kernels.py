"""CUDA gather/scatter kernels, compiled at run time with NVRTC through cuda-python.

Owns the CUDA C++ source, its NVRTC compilation (lazy, cached on disk keyed by the
source hash, the options, the NVRTC version and the target arch, so installing needs
no compiler step), module loading per device, the device-side pointer table of layer
base addresses, and the ``cuLaunchKernel`` call on the current torch stream.

One launch covers all layers: the grid is ``(token groups, layers)``, the layer's base
address comes from a pointer table, and each thread block copies the ``kv_factor x
rows`` rows of ``blockDim.y`` tokens (one token per ``threadIdx.y``; several only when
a token's bytes are few, as with MLA) with the widest vector (16, 8, 4, 2 or 1 bytes)
that every address, stride and row size allows. Slots that are negative or past the cache are
padding: zeros on gather, skipped on scatter (no host sync, no stray write).

cuda-python is imported lazily: without it (or without a GPU) the package still works
and the torch path is used; :func:`unavailable_reason` says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checksum
from .geometry import Geometry

log = logging.getLogger(__name__)

KERNEL_NAME_PREFIXES = ("gather", "scatter")
VECTOR_WIDTHS = (16, 8, 4, 2, 1)

CUDA_SOURCE = r"""
// lmcache-pd paged KV <-> chunk copies. Chunk format: [layers, kv, tokens, rows, row].
template <typename V, bool TO_CHUNK>
__device__ __forceinline__ void copy_token(
    const unsigned long long* __restrict__ layer_ptrs, char* __restrict__ chunk,
    const long long* __restrict__ slots, int num_tokens, int kv_factor, int rows,
    long long row_bytes, long long stride_k, long long stride_b, long long stride_n,
    long long stride_h, int block_size, long long num_slots)
{
    // blockDim.y tokens per block (small rows), blockDim.x threads per token.
    const int t = blockIdx.x * blockDim.y + threadIdx.y;
    if (t >= num_tokens) return;
    const int layer = blockIdx.y;
    const long long slot = slots[t];
    const bool valid = slot >= 0 && slot < num_slots;
    if (!TO_CHUNK && !valid) return;
    const char* base = reinterpret_cast<const char*>(layer_ptrs[layer]);
    if (valid) base += (slot / block_size) * stride_b + (slot % block_size) * stride_n;
    // Per-token indices fit in 32 bits (64-bit division is slow on GPUs).
    const int units = (int)(row_bytes / (long long)sizeof(V));
    const int total = kv_factor * rows * units;
    const long long tok_bytes = (long long)rows * row_bytes;
    char* chunk_tok = chunk + ((long long)layer * kv_factor * num_tokens + t) * tok_bytes;
    const long long kv_step = (long long)num_tokens * tok_bytes;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const int r = i / units;
        const int u = i - r * units;
        const int k = r / rows;
        const int h = r - k * rows;
        const long long off = (long long)u * (long long)sizeof(V);
        V* c = reinterpret_cast<V*>(chunk_tok + k * kv_step + h * row_bytes + off);
        const long long cache_off = k * stride_k + h * stride_h + off;
        if (TO_CHUNK) {
            V v{};
            if (valid) v = *reinterpret_cast<const V*>(base + cache_off);
            *c = v;
        } else {
            *reinterpret_cast<V*>(const_cast<char*>(base) + cache_off) = *c;
        }
    }
}

// Checksum variants (kvsum64, see lmcache_pd.kernels.checksum): the same copy, and each
// 64-bit word that passes through a register adds its term to a per-block sum, folded
// into one of KVSUM_SLOTS device accumulators (one atomic per thread block). Every
// chunk byte is hashed, padding tokens included (zeros on gather; read, not stored,
// on scatter). Whole-word vectors only (16 or 8 bytes).
#define KVSUM_MASK 511ULL
#define KVSUM_LOG_PERIOD 9
#define KVSUM_K_SEG 0xD6E8FEB86659FD93ULL
#define KVSUM_SLOTS 64

__device__ __forceinline__ unsigned long long kvsum_term(
    unsigned long long w, unsigned long long i, const unsigned long long* __restrict__ table)
{
    const unsigned long long x =
        w ^ (table[i & KVSUM_MASK] + (i >> KVSUM_LOG_PERIOD) * KVSUM_K_SEG);
    return (unsigned long long)(unsigned int)x * (unsigned long long)(unsigned int)(x >> 32) + w;
}

// Terms of the 64-bit words of one vector (little-endian: x is the low half).
__device__ __forceinline__ unsigned long long kvsum_vec(
    const uint4& v, unsigned long long word, const unsigned long long* __restrict__ table)
{
    return kvsum_term(((unsigned long long)v.y << 32) | v.x, word, table)
        + kvsum_term(((unsigned long long)v.w << 32) | v.z, word + 1, table);
}

__device__ __forceinline__ unsigned long long kvsum_vec(
    const uint2& v, unsigned long long word, const unsigned long long* __restrict__ table)
{
    return kvsum_term(((unsigned long long)v.y << 32) | v.x, word, table);
}

template <typename V, bool TO_CHUNK>
__device__ __forceinline__ void copy_token_hash(
    const unsigned long long* __restrict__ layer_ptrs, char* __restrict__ chunk,
    const long long* __restrict__ slots, int num_tokens, int kv_factor, int rows,
    long long row_bytes, long long stride_k, long long stride_b, long long stride_n,
    long long stride_h, int block_size, long long num_slots,
    unsigned long long* __restrict__ sums, const unsigned long long* __restrict__ table)
{
    static_assert(sizeof(V) % 8 == 0, "checksum kernels move whole 64-bit words");
    const int t = blockIdx.x * blockDim.y + threadIdx.y;
    const int layer = blockIdx.y;
    unsigned long long acc = 0;
    if (t < num_tokens) {  // no early return: the whole block meets at __syncthreads
        const long long slot = slots[t];
        const bool valid = slot >= 0 && slot < num_slots;
        const char* base = reinterpret_cast<const char*>(layer_ptrs[layer]);
        if (valid) base += (slot / block_size) * stride_b + (slot % block_size) * stride_n;
        const int units = (int)(row_bytes / (long long)sizeof(V));
        const int total = kv_factor * rows * units;
        const long long tok_bytes = (long long)rows * row_bytes;
        char* chunk_tok = chunk + ((long long)layer * kv_factor * num_tokens + t) * tok_bytes;
        const long long kv_step = (long long)num_tokens * tok_bytes;
        for (int i = threadIdx.x; i < total; i += blockDim.x) {
            const int r = i / units;
            const int u = i - r * units;
            const int k = r / rows;
            const int h = r - k * rows;
            const long long off = (long long)u * (long long)sizeof(V);
            V* c = reinterpret_cast<V*>(chunk_tok + k * kv_step + h * row_bytes + off);
            const long long cache_off = k * stride_k + h * stride_h + off;
            V v{};
            if (TO_CHUNK) {
                if (valid) v = *reinterpret_cast<const V*>(base + cache_off);
                *c = v;
            } else {
                v = *c;
                if (valid) *reinterpret_cast<V*>(const_cast<char*>(base) + cache_off) = v;
            }
            const unsigned long long word =
                (unsigned long long)(reinterpret_cast<char*>(c) - chunk) >> 3;
            acc += kvsum_vec(v, word, table);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ unsigned long long warp_sums[32];
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int warps = (blockDim.x * blockDim.y + 31) / 32;
    if ((tid & 31) == 0) warp_sums[tid >> 5] = acc;
    __syncthreads();
    if (tid == 0) {
        unsigned long long s = 0;
        for (int w = 0; w < warps; w++) s += warp_sums[w];
        atomicAdd(&sums[(blockIdx.x * 7 + blockIdx.y) & (KVSUM_SLOTS - 1)], s);
    }
}

#define LMC_PARAMS                                                                    \
    const unsigned long long* __restrict__ layer_ptrs, char* __restrict__ chunk,      \
    const long long* __restrict__ slots, int num_tokens, int kv_factor, int rows,     \
    long long row_bytes, long long stride_k, long long stride_b, long long stride_n,  \
    long long stride_h, int block_size, long long num_slots
#define LMC_ARGS layer_ptrs, chunk, slots, num_tokens, kv_factor, rows, row_bytes,    \
    stride_k, stride_b, stride_n, stride_h, block_size, num_slots
#define LMC_DEFINE(WIDTH, V)                                                          \
    extern "C" __global__ void gather_v##WIDTH(LMC_PARAMS) {                          \
        copy_token<V, true>(LMC_ARGS); }                                              \
    extern "C" __global__ void scatter_v##WIDTH(LMC_PARAMS) {                         \
        copy_token<V, false>(LMC_ARGS); }

#define LMC_DEFINE_SUM(WIDTH, V)                                                      \
    extern "C" __global__ void gather_sum_v##WIDTH(LMC_PARAMS,                        \
        unsigned long long* __restrict__ sums, const unsigned long long* __restrict__ table) { \
        copy_token_hash<V, true>(LMC_ARGS, sums, table); }                            \
    extern "C" __global__ void scatter_sum_v##WIDTH(LMC_PARAMS,                       \
        unsigned long long* __restrict__ sums, const unsigned long long* __restrict__ table) { \
        copy_token_hash<V, false>(LMC_ARGS, sums, table); }

LMC_DEFINE(16, uint4)
LMC_DEFINE(8, uint2)
LMC_DEFINE(4, unsigned int)
LMC_DEFINE(2, unsigned short)
LMC_DEFINE(1, unsigned char)
LMC_DEFINE_SUM(16, uint4)
LMC_DEFINE_SUM(8, uint2)
"""

NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17", "--device-as-default-execution-space")

_ARG_TYPES = (
    ctypes.c_void_p,  # layer_ptrs
    ctypes.c_void_p,  # chunk
    ctypes.c_void_p,  # slots
    ctypes.c_int,  # num_tokens
    ctypes.c_int,  # kv_factor
    ctypes.c_int,  # rows
    ctypes.c_longlong,  # row_bytes
    ctypes.c_longlong,  # stride_k
    ctypes.c_longlong,  # stride_b
    ctypes.c_longlong,  # stride_n
    ctypes.c_longlong,  # stride_h
    ctypes.c_int,  # block_size
    ctypes.c_longlong,  # num_slots
)


class KernelCompileError(RuntimeError):
    """NVRTC rejected the source; the message carries the compile log."""


HASH_WIDTHS = (16, 8)  # checksum kernels move whole 64-bit words
SUM_SLOTS = 64  # device accumulators the checksum kernels spread their atomics over


def kernel_names() -> list[str]:
    """Every ``extern "C"`` entry point in :data:`CUDA_SOURCE`."""
    plain = [f"{p}_v{w}" for w in VECTOR_WIDTHS for p in KERNEL_NAME_PREFIXES]
    return plain + [f"{p}_sum_v{w}" for w in HASH_WIDTHS for p in KERNEL_NAME_PREFIXES]


def _bindings() -> tuple[Any, Any]:
    """(driver, nvrtc) modules of cuda-python; raises ImportError when missing."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        from cuda import cuda as driver  # cuda-python < 12.6 layout
        from cuda import nvrtc
    return driver, nvrtc


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run here, or None when they can."""
    try:
        _bindings()
    except ImportError as exc:
        return f"cuda-python is not installed ({exc}); pip install 'lmcache-pd[cuda]'"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def available() -> bool:
    return unavailable_reason() is None


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result, raising on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")
    return values[0] if len(values) == 1 else tuple(values)


def nvrtc_version() -> tuple[int, int]:
    _, nvrtc = _bindings()
    return tuple(_check(nvrtc.nvrtcVersion(), "nvrtcVersion"))


def supported_archs() -> list[int]:
    """Compute capabilities (e.g. 90) this NVRTC can emit SASS for."""
    _, nvrtc = _bindings()
    return [int(a) for a in _check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


def target_for(capability: int) -> tuple[str, bool]:
    """(arch option value, is_cubin): SASS when NVRTC knows the arch, else PTX."""
    archs = supported_archs()
    if capability in archs:
        return f"sm_{capability}", True
    lower = [a for a in archs if a <= capability]
    if not lower:
        raise KernelCompileError(f"NVRTC {nvrtc_version()} cannot target sm_{capability}")
    return f"compute_{max(lower)}", False


def cache_dir() -> Path:
    """``$LMCACHE_PD_KERNEL_CACHE`` or ``$XDG_CACHE_HOME/lmcache_pd/kernels``."""
    env = os.environ.get("LMCACHE_PD_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmcache_pd" / "kernels"


def cache_key(arch: str, cubin: bool) -> str:
    ver = ".".join(map(str, nvrtc_version()))
    text = "\0".join([CUDA_SOURCE, *NVRTC_OPTIONS, ver])
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    return f"paged_kv_{digest}_{arch}.{'cubin' if cubin else 'ptx'}"


def compile_source(arch: str, cubin: bool = True) -> bytes:
    """Compile :data:`CUDA_SOURCE` with NVRTC (no GPU needed); returns CUBIN or PTX."""
    _, nvrtc = _bindings()
    prog = _check(
        nvrtc.nvrtcCreateProgram(CUDA_SOURCE.encode(), b"paged_kv.cu", 0, [], []),
        "nvrtcCreateProgram",
    )
    try:
        opts = [o.encode() for o in (*NVRTC_OPTIONS, f"--gpu-architecture={arch}")]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise KernelCompileError(
                f"NVRTC failed for {arch}: {err!r}\n{log.decode(errors='replace')}"
            )
        if cubin:
            size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            out = b" " * size
            _check(nvrtc.nvrtcGetCUBIN(prog, out), "nvrtcGetCUBIN")
        else:
            size = _check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            out = b" " * size
            _check(nvrtc.nvrtcGetPTX(prog, out), "nvrtcGetPTX")
        return out
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def load_binary(arch: str, cubin: bool = True) -> bytes:
    """Compiled kernels for ``arch`` from the disk cache, compiling them on a miss."""
    path = cache_dir() / cache_key(arch, cubin)
    try:
        return path.read_bytes()
    except OSError:
        pass
    binary = compile_source(arch, cubin)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(binary)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a recompile next time
    return binary


class _DeviceKernels:
    """The loaded module and function handles for one CUDA device.

    Everything runs in the device's primary context (the one torch's runtime uses),
    made current around each call when the calling thread has another or none, so
    launches from worker threads and multi-GPU processes work.
    """

    def __init__(self, device: int) -> None:
        driver, _ = _bindings()
        self.driver = driver
        _check(driver.cuInit(0), "cuInit")
        torch.cuda.init()
        dev = _check(driver.cuDeviceGet(device), "cuDeviceGet")
        self.ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        major, minor = torch.cuda.get_device_capability(device)
        arch, cubin = target_for(major * 10 + minor)
        binary = load_binary(arch, cubin)
        with self.current():
            self.module = _check(driver.cuModuleLoadData(binary), "cuModuleLoadData")
            self.functions = {
                name: _check(driver.cuModuleGetFunction(self.module, name.encode()), f"get {name}")
                for name in kernel_names()
            }
        self.ptr_tables: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.device = device

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """Make this device's primary context current for the block (if it is not)."""
        cur = _check(self.driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(cur) == int(self.ctx):
            yield
            return
        _check(self.driver.cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            self.driver.cuCtxPopCurrent()

    def pointer_table(self, ptrs: tuple[int, ...]) -> torch.Tensor:
        """Device int64 tensor of layer base addresses (cached: vLLM's never move)."""
        table = self.ptr_tables.get(ptrs)
        if table is None:
            table = torch.tensor(ptrs, dtype=torch.int64, device=f"cuda:{self.device}")
            self.ptr_tables[ptrs] = table
            while len(self.ptr_tables) > 64:
                self.ptr_tables.popitem(last=False)
        else:
            self.ptr_tables.move_to_end(ptrs)
        return table


_DEVICES: dict[int, _DeviceKernels] = {}


_FAILED: dict[int, str] = {}


def _kernels_for(device: int) -> _DeviceKernels:
    if device not in _DEVICES:
        _DEVICES[device] = _DeviceKernels(device)
    return _DEVICES[device]


def ready(device: int) -> bool:
    """Whether the kernels load on ``device``; a failure is logged once and remembered.

    ``backend="auto"`` uses this to fall back to the torch path (say, libnvrtc missing
    on a GPU host) instead of failing every request.
    """
    if device in _DEVICES:
        return True
    if device in _FAILED or not available():
        return False
    try:
        _kernels_for(device)
    except Exception as exc:
        _FAILED[device] = f"{type(exc).__name__}: {exc}"
        log.warning(
            "lmcache-pd CUDA kernels unavailable on cuda:%d (%s); using the torch path. "
            "Run `lmcache-pd check kernels` for details.",
            device,
            _FAILED[device],
        )
        return False
    return True


def vector_width(values: list[int]) -> int:
    """Widest vector (bytes) dividing every address, stride and size in ``values``."""
    for w in VECTOR_WIDTHS:
        if all(v % w == 0 for v in values):
            return w
    return 1


@dataclass(frozen=True)
class LaunchParams:
    """Scalar kernel arguments and launch shape for one gather/scatter (no pointers).

    Byte strides and sizes as the kernel uses them; ``width`` is the vector width in
    bytes; the grid is ``(ceil(tokens / tokens_per_block), layers)`` and a block is
    ``(threads, tokens_per_block)``.
    """

    tokens: int
    layers: int
    kv_factor: int
    rows: int
    row_bytes: int
    stride_k: int
    stride_b: int
    stride_n: int
    stride_h: int
    block_size: int
    num_slots: int
    width: int
    threads: int
    tokens_per_block: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (-(-self.tokens // self.tokens_per_block), self.layers, 1)

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.threads, self.tokens_per_block, 1)


def launch_params(
    layers: list[torch.Tensor], geom: Geometry, tokens: int, chunk: torch.Tensor
) -> LaunchParams:
    """Compute the kernel arguments (pure Python: testable without a GPU)."""
    es = layers[0].element_size()
    row_bytes = geom.row * es
    strides = [s * es for s in (geom.stride_k, geom.stride_b, geom.stride_n, geom.stride_h)]
    ptrs = [t.data_ptr() for t in layers]
    width = vector_width([row_bytes, *strides, *ptrs, chunk.data_ptr()])
    units = geom.kv_factor * geom.rows * (row_bytes // width)
    threads = max(32, min(512, (units + 31) // 32 * 32))
    return LaunchParams(
        tokens=tokens,
        layers=len(layers),
        kv_factor=geom.kv_factor,
        rows=geom.rows,
        row_bytes=row_bytes,
        stride_k=strides[0],
        stride_b=strides[1],
        stride_n=strides[2],
        stride_h=strides[3],
        block_size=geom.block_size,
        num_slots=geom.num_slots,
        width=width,
        threads=threads,
        tokens_per_block=max(1, 256 // threads),
    )


def launch(
    op: str,
    layers: list[torch.Tensor],
    geom: Geometry,
    slots: torch.Tensor,
    chunk: torch.Tensor,
    sums: torch.Tensor | None = None,
) -> None:
    """Launch ``gather`` or ``scatter`` for all layers on the current torch stream.

    ``sums``: a zeroed int64 CUDA tensor of :data:`SUM_SLOTS` accumulators; the
    checksum variant of the kernel adds the chunk's term sum into it (needs a vector
    width of 8 or 16 bytes: see :func:`launch_hashed`).
    """
    if op not in KERNEL_NAME_PREFIXES:
        raise ValueError(f"op must be one of {KERNEL_NAME_PREFIXES}, got {op!r}")
    driver, _ = _bindings()
    device = slots.device.index if slots.device.index is not None else 0
    kernels = _kernels_for(device)
    p = launch_params(layers, geom, slots.numel(), chunk)
    table = kernels.pointer_table(tuple(t.data_ptr() for t in layers))
    args: tuple[Any, ...] = (
        table.data_ptr(), chunk.data_ptr(), slots.data_ptr(), p.tokens, p.kv_factor, p.rows,
        p.row_bytes, p.stride_k, p.stride_b, p.stride_n, p.stride_h, p.block_size,
        p.num_slots,
    )  # fmt: skip
    types: tuple[Any, ...] = _ARG_TYPES
    name = f"{op}_v{p.width}"
    if sums is not None:
        if p.width not in HASH_WIDTHS:
            raise ValueError(f"checksum kernels need 8- or 16-byte vectors, got {p.width}")
        if sums.numel() != SUM_SLOTS or sums.dtype != torch.int64 or sums.device != slots.device:
            raise ValueError(f"sums must be int64[{SUM_SLOTS}] on {slots.device}")
        keys = checksum.device_table(slots.device)
        args += (sums.data_ptr(), keys.data_ptr())
        types += (ctypes.c_void_p, ctypes.c_void_p)
        name = f"{op}_sum_v{p.width}"
    stream = driver.CUstream(torch.cuda.current_stream(device).cuda_stream)
    with kernels.current():
        _check(
            driver.cuLaunchKernel(
                kernels.functions[name], *p.grid, *p.block, 0, stream, (args, types), 0
            ),
            f"cuLaunchKernel {name}",
        )


def launch_hashed(
    op: str, layers: list[torch.Tensor], geom: Geometry, slots: torch.Tensor,
    chunk: torch.Tensor,
) -> int:  # fmt: skip
    """:func:`launch` with the chunk checksum's term sum computed in the same launch;
    returns it (waits for the stream). Where the vector width is below 8 bytes (odd
    strides), the plain kernel runs and the chunk is hashed by torch ops after it."""
    p = launch_params(layers, geom, slots.numel(), chunk)
    if p.width not in HASH_WIDTHS:
        log.debug("checksum: %d-byte vectors, hashing in a second pass", p.width)
        launch(op, layers, geom, slots, chunk)
        return checksum.torch_sum(chunk)
    sums = torch.zeros(SUM_SLOTS, dtype=torch.int64, device=slots.device)
    launch(op, layers, geom, slots, chunk, sums)
    return int(sums.sum().item()) & checksum.MASK
