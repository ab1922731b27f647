"""The torch copy path: gather/scatter with index_select/index_copy_, no per-token loop.

Used for CPU tensors (vLLM's CPU backend, the CPU tiers and tests) and as the reference
the CUDA kernels are checked against on a GPU. Inputs arrive validated by
:mod:`lmcache_pd.kernels.geometry`.

How it stays near memcpy speed:

* every copy moves raw bytes through the widest integer view (int64 where sizes and
  offsets allow), so no dtype arithmetic and bit-exact results;
* a "row" is the longest contiguous run shared by cache and chunk: one head
  (``head_size`` elements), all heads of a token when they are adjacent, and, when the
  slot mapping holds aligned runs of consecutive slots (whole or half blocks, as engines
  allocate them), ``r`` consecutive tokens at once, up to a whole block page;
* one ``index_select`` (gather) or ``index_copy_`` (scatter) per layer, K/V half and
  segment; the row index table is computed once per call and shared by all layers.

vLLM's CPU page format (``CPU_VLLM``, K stored transposed) moves its whole blocks by the
native library instead (:mod:`lmcache_pd.kernels.native`): K and V of every layer in one
call, or one per torch thread on a split block range for chunks of
:data:`PARALLEL_BYTES` or more (the calls release the GIL), checksum included. So do
FLASH_ATTN, FLASHINFER and MLA caches whose tokens are contiguous runs
(:func:`runs_library`): every token of every layer in one native call (split from
:data:`RUNS_PARALLEL_BYTES`), padding included; these torch ops remain their fallback.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from . import checksum, native
from .geometry import Geometry

_UNIT_DTYPES: dict[int, torch.dtype] = {
    16: torch.complex128,  # moved, never computed on: bit-exact, faster index_copy_
    8: torch.int64,
    4: torch.int32,
    2: torch.int16,
    1: torch.uint8,
}


@dataclass(frozen=True)
class _Segment:
    """Tokens ``[t0, t1)`` copied as rows of ``r`` tokens; ``idx[k]`` are row ids."""

    t0: int
    t1: int
    r: int
    idx: torch.Tensor  # [kv_factor, rows in the segment], in units of r*row elements


def _unit(geom: Geometry, es: int, offsets: list[int], widest: int) -> int:
    """Widest copy unit (bytes, <= ``widest``) dividing every row, stride and offset."""
    sizes = [geom.row, geom.stride_k, geom.stride_b, geom.stride_n, geom.stride_h]
    values = [s * es for s in sizes] + offsets
    for w in (16, 8, 4, 2):
        if w > widest:
            continue
        if all(v % w == 0 for v in values):
            return w
    return 1


def _run_length(geom: Geometry, slots: torch.Tensor) -> int:
    """Largest ``r`` such that ``slots`` (non-negative) are aligned runs of ``r``."""
    n = slots.numel()
    if geom.rows != 1 or geom.stride_n != geom.row or n < 2:
        return 1
    cands = {geom.block_size} | {1 << i for i in range(geom.block_size.bit_length())}
    for r in sorted(cands, reverse=True):
        if r < 2 or geom.block_size % r or n < r:
            continue
        row_len = r * geom.row
        if geom.stride_b % row_len or (geom.kv_factor > 1 and geom.stride_k % row_len):
            continue
        s = slots[: (n // r) * r].view(-1, r)
        # aligned start and consecutive slots <=> each run equals its aligned base + 0..r-1
        expected = torch.div(s[:, :1], r, rounding_mode="floor") * r + _arange(r, s.device)
        if bool((s == expected).all()):
            return r
    return 1


def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64)


def _segment(geom: Geometry, slots: torch.Tensor, t0: int, t1: int, r: int) -> _Segment:
    starts = slots[t0:t1:r]
    blocks = torch.div(starts, geom.block_size, rounding_mode="floor")
    base = blocks * (geom.stride_b - geom.block_size * geom.stride_n) + starts * geom.stride_n
    if geom.rows > 1:
        heads = _arange(geom.rows, slots.device) * geom.stride_h
        base = (base[:, None] + heads[None, :]).reshape(-1)
    k_off = _arange(geom.kv_factor, slots.device) * geom.stride_k
    idx = torch.div(k_off[:, None] + base[None, :], r * geom.row, rounding_mode="floor")
    return _Segment(t0, t1, r, idx)


def _plan(geom: Geometry, slots: torch.Tensor, nonneg: bool) -> list[_Segment]:
    """Split tokens into a run-merged main segment and a per-token tail."""
    n = slots.numel()
    r = _run_length(geom, slots) if nonneg else 1
    main = (n // r) * r
    segs = [_segment(geom, slots, 0, main, r)] if main else []
    if main < n:
        segs.append(_segment(geom, slots, main, n, 1))
    return segs


def _layer_rows(t: torch.Tensor, geom: Geometry, unit: int, r: int) -> torch.Tensor:
    """One layer's storage as ``[M, r*row]`` rows of ``unit``-wide integers (no copy)."""
    es = t.element_size()
    row_len = r * geom.row
    last = (
        (geom.kv_factor - 1) * geom.stride_k
        + (geom.num_blocks - 1) * geom.stride_b
        + (geom.block_size - r) * geom.stride_n
        + (geom.rows - 1) * geom.stride_h
    )
    nbytes = (last + row_len) * es
    flat = torch.empty(0, dtype=torch.uint8, device=t.device)
    flat.set_(t.untyped_storage(), t.storage_offset() * es, (nbytes,), (1,))
    return flat.view(_UNIT_DTYPES[unit]).view(-1, row_len * es // unit)


def _chunk_rows(
    chunk_bytes: torch.Tensor, geom: Geometry, es: int, unit: int, tokens: int,
    layer: int, k: int, seg: _Segment,
) -> torch.Tensor:  # fmt: skip
    """Rows of chunk ``[layer, k, seg.t0:seg.t1]`` as ``unit``-wide integers (no copy)."""
    tok = geom.rows * geom.row * es
    start = ((layer * geom.kv_factor + k) * tokens + seg.t0) * tok
    part = chunk_bytes[start : start + (seg.t1 - seg.t0) * tok]
    return part.view(_UNIT_DTYPES[unit]).view(-1, seg.r * geom.row * es // unit)


def _setup(
    layers: list[torch.Tensor], geom: Geometry, chunk: torch.Tensor, widest: int
) -> tuple[int, int, torch.Tensor]:
    es = layers[0].element_size()
    offsets = [int(t.storage_offset()) * es for t in layers] + [int(chunk.storage_offset()) * es]
    unit = _unit(geom, es, offsets, widest)
    return es, unit, chunk.reshape(-1).view(torch.uint8)


def check_slots(slots: torch.Tensor, geom: Geometry) -> bool:
    """Raise ``ValueError`` for a slot beyond the cache; return whether any is negative.

    One reduction (a sync on GPU) for both facts.
    """
    lo, hi = (int(v) for v in torch.aminmax(slots))
    if hi >= geom.num_slots:
        raise ValueError(
            f"slot {hi} out of range: the cache has {geom.num_blocks} blocks "
            f"x {geom.block_size} = {geom.num_slots} slots"
        )
    return lo < 0


def _fused_rows(
    layers: list[torch.Tensor], geom: Geometry, unit: int, r: int
) -> tuple[torch.Tensor, int] | None:
    """All layers as one ``[M, r*row]`` view when they are evenly spaced in one storage.

    That is how vLLM allocates its cache; then one index_select/index_copy_ moves the
    whole chunk. Returns (rows view, rows per layer step) or None.
    """
    first = layers[0]
    es = first.element_size()
    row_bytes = r * geom.row * es
    one = _layer_rows(first, geom, unit, r)
    if len(layers) == 1:
        return one, 0
    ptrs = [t.data_ptr() for t in layers]
    step = ptrs[1] - ptrs[0]
    if step <= 0 or step % row_bytes or ptrs != list(range(ptrs[0], ptrs[-1] + 1, step)):
        return None
    # Evenly spaced: fuse only if every layer lies inside layer 0's allocation.
    storage = first.untyped_storage()
    nbytes = (len(layers) - 1) * step + one.numel() * unit
    start = first.storage_offset() * es
    if start + nbytes > storage.nbytes():
        return None
    flat = torch.empty(0, dtype=torch.uint8, device=first.device)
    flat.set_(storage, start, (nbytes,), (1,))
    return flat.view(_UNIT_DTYPES[unit]).view(-1, row_bytes // unit), step // row_bytes


def _fused_index(seg: _Segment, num_layers: int, layer_step: int) -> torch.Tensor:
    """Row ids in chunk order ``[layer, kv, token-row]`` over the fused view."""
    if num_layers == 1:
        return seg.idx.reshape(-1)
    steps = _arange(num_layers, seg.idx.device) * layer_step
    return (steps[:, None, None] + seg.idx[None]).reshape(-1)


PIECE_BYTES = 2 << 20  # chunk bytes per copy call when hashing: hashed while still cached
# CPU_VLLM chunks at least this large are written with stores that bypass the cache
# (gather: the chunk; scatter: the pages): they would not stay cached anyway, and the
# destination lines need not be read first (3 memory passes -> 2).
STREAM_BYTES = 16 << 20
# CPU_VLLM chunks at least this large are split across torch's CPU threads (the torch
# ops this path replaced ran on all of them too).
PARALLEL_BYTES = 1 << 20
# The same for the plain run copies (FLASH_ATTN, FLASHINFER, MLA): they move ~15 GB/s
# on one core, and a helper thread's round trip (~0.1 ms, often more on a busy 2-core
# host) made 8-9 MiB chunks no faster, only noisier; from 32 MiB it halves the time.
RUNS_PARALLEL_BYTES = 16 << 20


class SumAccumulator:
    """Adds the checksum term sums of chunk byte ranges as the copy touches them."""

    def __init__(self, chunk: torch.Tensor) -> None:
        self.base = chunk.data_ptr()
        self.total = 0

    def add(self, part: torch.Tensor) -> None:
        off = part.data_ptr() - self.base
        self.total = (self.total + checksum.partial_sum(part, off)) & checksum.MASK


def hashable_in_pass(geom: Geometry, es: int) -> bool:
    """Whether every token's bytes start at a multiple of 8 in the chunk (so pieces
    split at token rows can be hashed on their own)."""
    return (geom.rows * geom.row * es) % checksum.WORD == 0


def _rows_op(
    op: str, cache_rows: torch.Tensor, idx: torch.Tensor, part: torch.Tensor,
    acc: SumAccumulator | None, align: int = 1,
) -> None:  # fmt: skip
    """One index_select (gather) / index_copy_ (scatter) between ``cache_rows`` and the
    contiguous chunk rows ``part``; with ``acc``, in L2-sized pieces of whole tokens
    (``align`` rows), each hashed right after it is written / before it is read."""
    if acc is None:
        if op == "gather":
            torch.index_select(cache_rows, 0, idx, out=part)
        else:
            cache_rows.index_copy_(0, idx, part)
        return
    row_bytes = part.shape[1] * part.element_size()
    step = max(1, PIECE_BYTES // (row_bytes * align)) * align
    for a in range(0, idx.numel(), step):
        p, i = part[a : a + step], idx[a : a + step]
        if op == "gather":
            torch.index_select(cache_rows, 0, i, out=p)
        else:
            cache_rows.index_copy_(0, i, p)
        acc.add(p)  # just written (gather) or just read (scatter): still in cache


def _copy(
    op: str, layers: list[torch.Tensor], geom: Geometry, slots: torch.Tensor,
    chunk: torch.Tensor, nonneg: bool, acc: SumAccumulator | None = None,
) -> None:  # fmt: skip
    if geom.k_transposed:
        _copy_k_transposed(op, layers, geom, slots, chunk, acc)
        return
    tokens = slots.numel()
    segs = _plan(geom, slots, nonneg)
    # index_select is fastest on int64 rows, index_copy_ on 16-byte elements (measured).
    es, unit, chunk_bytes = _setup(layers, geom, chunk, 8 if op == "gather" else 16)
    if len(segs) == 1:
        fused = _fused_rows(layers, geom, unit, segs[0].r)
        if fused is not None:
            rows, step = fused
            idx = _fused_index(segs[0], len(layers), step)
            chunk_rows = chunk_bytes.view(_UNIT_DTYPES[unit]).view(idx.numel(), -1)
            _rows_op(op, rows, idx, chunk_rows, acc, _token_rows(geom, segs[0].r))
            return
    for layer, t in enumerate(layers):
        cache = {s.r: _layer_rows(t, geom, unit, s.r) for s in segs}
        for k in range(geom.kv_factor):
            for s in segs:
                part = _chunk_rows(chunk_bytes, geom, es, unit, tokens, layer, k, s)
                _rows_op(op, cache[s.r], s.idx[k], part, acc, _token_rows(geom, s.r))


def _token_rows(geom: Geometry, r: int) -> int:
    """Rows per token (``rows`` heads when heads are separate rows; 1 for r-token rows)."""
    return geom.rows if r == 1 else 1


def _k_view(t: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """K of a ``k_transposed`` layer as a ``[B, N, H, D]`` strided integer view."""
    ti = t.view(_UNIT_DTYPES[t.element_size()])
    n = geom.block_size
    shape = (geom.num_blocks, n, geom.rows, geom.row)
    return torch.as_strided(ti, shape, (geom.stride_b, 1, geom.stride_h, n), ti.storage_offset())


def _full_block_prefix(slots: torch.Tensor, n: int) -> int:
    """Length of the longest prefix made of whole blocks (aligned runs of ``n``)."""
    main = (slots.numel() // n) * n
    if main and slots.device.type == "cpu":  # numpy: a few us less per call than torch ops
        a = slots[:main].numpy().reshape(-1, n)
        if (a[:, 0] % n).any() or not (a - a[:, :1] == np.arange(n)).all():
            return 0
    elif main:
        s = slots[:main].view(-1, n)
        expected = torch.div(s[:, :1], n, rounding_mode="floor") * n + _arange(n, s.device)
        if not bool((s == expected).all()):
            return 0
    return main


def _copy_k_transposed(
    op: str, layers: list[torch.Tensor], geom: Geometry, slots: torch.Tensor,
    chunk: torch.Tensor, acc: SumAccumulator | None = None,
) -> None:  # fmt: skip
    """CPU_VLLM (K ``[D, N]`` per block and head, V ``[N, D]``). The longest prefix of
    whole blocks: with the native library, K (tiled transpose) and V (rows) of every
    layer in one call that hashes each piece while hot; without it, K by a strided
    torch copy. The rest (all tokens without the library; else the partial tail): K by
    (block, offset) advanced indexing, V as rows of ``head_size`` like any format."""
    n = geom.block_size
    main = _full_block_prefix(slots, n)
    lib = native.library()
    if lib is not None and main:
        blocks = torch.div(slots[:main:n], n, rounding_mode="floor").contiguous()
        _native_blocks(op, lib, layers, geom, blocks, chunk, acc)
        if main < slots.numel():
            _k_transposed_torch(op, layers, geom, slots, chunk, acc, main, 0)
        return
    page = n * geom.row
    if not (geom.stride_b % page == 0 and geom.stride_h % page == 0):
        main = 0
    _k_transposed_torch(op, layers, geom, slots, chunk, acc, 0, main)


def _native_blocks(
    op: str, lib: native.NativeLib, layers: list[torch.Tensor], geom: Geometry,
    blocks: torch.Tensor, chunk: torch.Tensor, acc: SumAccumulator | None,
) -> None:  # fmt: skip
    """Whole blocks ``blocks`` (the chunk's first tokens) of every layer, K and V, by
    the native library: one call, or one per torch thread (the block range split, the
    calls run with the GIL released) for chunks of :data:`PARALLEL_BYTES` or more; with
    ``acc``, the term sum of the chunk bytes moved is added."""
    es = layers[0].element_size()
    ptrs = (ctypes.c_int64 * len(layers))(*(t.data_ptr() for t in layers))
    fn = lib.cpuv_gather[es] if op == "gather" else lib.cpuv_scatter[es]
    if acc is not None and chunk.data_ptr() != acc.base:
        raise AssertionError("the accumulator must belong to the chunk being copied")
    table = checksum.KEY_TABLE.ctypes.data if acc is not None else None
    nbytes = chunk.numel() * chunk.element_size()
    nblk = blocks.numel()

    def run(b0: int, b1: int) -> int:
        return int(
            fn(
                chunk.data_ptr(), ptrs, len(layers), blocks.data_ptr(), b0, b1,
                chunk.shape[2], geom.rows, geom.row, geom.block_size, geom.stride_b * es,
                geom.stride_h * es, geom.stride_k * es, geom.stride_n * es, table,
                int(nbytes >= STREAM_BYTES),
            )
        )  # fmt: skip

    parts = min(torch.get_num_threads(), nblk) if nbytes >= PARALLEL_BYTES else 1
    if parts <= 1:
        total = run(0, nblk)
    else:
        total = native.run_pieces([nblk * i // parts for i in range(parts + 1)], run)
    if acc is not None:
        acc.total = (acc.total + total) & checksum.MASK


def runs_library(geom: Geometry, layers: list[torch.Tensor]) -> native.NativeLib | None:
    """The native library when ``geom`` keeps each token's bytes (all heads) contiguous
    and a block's tokens adjacent (FLASH_ATTN, FLASHINFER, MLA as engines allocate them)
    on CPU tensors: a chunk is then a list of contiguous runs, moved by
    :func:`_native_runs`. None otherwise, or when the library is unavailable."""
    if geom.k_transposed or geom.rows != 1 or geom.stride_n != geom.row:
        return None
    if layers[0].device.type != "cpu":
        return None
    return native.library()


def _native_runs(
    op: str, lib: native.NativeLib, layers: list[torch.Tensor], geom: Geometry,
    slots: torch.Tensor, chunk: torch.Tensor, hashed: bool,
) -> int:  # fmt: skip
    """Every token of ``slots`` (negative: padding) of every layer and K/V half by the
    native library's run copy: one call, or one per torch thread on a split token range
    for chunks of :data:`RUNS_PARALLEL_BYTES` or more, stores that bypass the cache from
    :data:`STREAM_BYTES`, as for CPU_VLLM. ``hashed`` (tokens 8-byte aligned in the
    chunk): returns the term sum of all chunk bytes, taken in the copy loop; else 0."""
    es = layers[0].element_size()
    ptrs = (ctypes.c_int64 * len(layers))(*(t.data_ptr() for t in layers))
    slots = slots.contiguous()
    tokens, n = slots.numel(), geom.block_size
    table = checksum.KEY_TABLE.ctypes.data if hashed else None
    nbytes = chunk.numel() * chunk.element_size()
    fn = lib.pkv[op]

    def run(t0: int, t1: int) -> int:
        return int(
            fn(
                chunk.data_ptr(), ptrs, len(layers), geom.kv_factor,
                slots.data_ptr(), t0, t1, tokens, geom.row * es, n, geom.stride_b * es,
                geom.stride_k * es, table, int(nbytes >= STREAM_BYTES),
            )
        )  # fmt: skip

    split = nbytes >= max(PARALLEL_BYTES, RUNS_PARALLEL_BYTES)
    parts = min(torch.get_num_threads(), tokens) if split else 1
    if parts <= 1:
        return run(0, tokens) & checksum.MASK
    # split at block boundaries where the chunk holds whole blocks (runs stay whole)
    cuts = [min(tokens, (tokens * i // parts + n // 2) // n * n) for i in range(1, parts)]
    return native.run_pieces([0, *cuts, tokens], run) & checksum.MASK


def _k_transposed_torch(
    op: str, layers: list[torch.Tensor], geom: Geometry, slots: torch.Tensor,
    chunk: torch.Tensor, acc: SumAccumulator | None, t0: int, main: int,
) -> None:  # fmt: skip
    """Tokens ``[t0, T)`` of a CPU_VLLM copy by torch ops: the first ``main`` of them
    whole blocks (K as one strided copy), the others one by one; V as rows."""
    n, h, d = geom.block_size, geom.rows, geom.row
    es = layers[0].element_size()
    tokens = slots.numel()
    _, unit, chunk_bytes = _setup(layers, geom, chunk, 8 if op == "gather" else 16)
    v_seg = _Segment(t0, tokens, 1, _segment(geom, slots, t0, tokens, 1).idx[1])
    m1 = t0 + main
    blocks = torch.div(slots[t0:m1:n], n, rounding_mode="floor")
    if main and op == "scatter":
        heads = _arange(h, slots.device) * geom.stride_h
        page_idx = torch.div(
            (blocks * geom.stride_b)[:, None] + heads[None, :], n * d, rounding_mode="floor"
        ).reshape(-1)
    rb = torch.div(slots[m1:], n, rounding_mode="floor")
    ro = slots[m1:] - rb * n
    ci = chunk.view(_UNIT_DTYPES[es])
    for layer, t in enumerate(layers):
        k_part = ci[layer, 0]  # [T, H, D]
        k_view = _k_view(t, geom)
        if main:
            whole = k_part[t0:m1].view(-1, n, h, d)
            if op == "gather":  # one strided pass beats pages + transpose here (measured)
                torch.index_select(k_view, 0, blocks, out=whole)
            else:  # transpose into page order, then whole D*N pages with index_copy_
                pages = _layer_rows(t, geom, unit, n)  # rows of D*N elements
                tmp = whole.permute(0, 2, 3, 1).contiguous().view(-1).view(_UNIT_DTYPES[unit])
                pages.index_copy_(0, page_idx, tmp.view(-1, pages.shape[1]))
            if acc is not None:
                acc.add(k_part[t0:m1])
        if m1 < tokens:
            if op == "gather":
                k_part[m1:] = k_view[rb, ro]
            else:
                k_view.index_put_((rb, ro), k_part[m1:])
            if acc is not None:
                acc.add(k_part[m1:])
        v_rows = _layer_rows(t, geom, unit, 1)
        v_part = _chunk_rows(chunk_bytes, geom, es, unit, tokens, layer, 1, v_seg)
        _rows_op(op, v_rows, v_seg.idx, v_part, acc, h)


def gather(
    layers: list[torch.Tensor], geom: Geometry, slots: torch.Tensor, chunk: torch.Tensor,
    hashed: bool = False,
) -> int | None:  # fmt: skip
    """Paged KV at ``slots`` -> ``chunk`` (chunk format); negative slots give zeros.
    ``hashed``: also return the chunk's checksum term sum, computed piece by piece as
    the pieces are written (with padding slots, or tokens not 8-byte aligned in the
    chunk, in a pass over the finished chunk instead)."""
    es = chunk.element_size()
    fused = hashed and hashable_in_pass(geom, es) and chunk.device.type == "cpu"
    lib = runs_library(geom, layers)
    if lib is not None:
        check_slots(slots, geom)  # the range check; padding is handled natively
        total = _native_runs("gather", lib, layers, geom, slots, chunk, fused)
        if not hashed:
            return None
        return total if fused else checksum.partial_sum(chunk)
    acc = SumAccumulator(chunk) if fused else None
    if not check_slots(slots, geom):
        _copy("gather", layers, geom, slots, chunk, nonneg=True, acc=acc)
        if acc is not None:
            return acc.total
    else:
        _copy("gather", layers, geom, slots.clamp_min(0), chunk, nonneg=False)
        chunk.view(_UNIT_DTYPES[es])[:, :, slots < 0] = 0
    return checksum.partial_sum(chunk) if hashed else None


def scatter(
    chunk: torch.Tensor, layers: list[torch.Tensor], geom: Geometry, slots: torch.Tensor,
    hashed: bool = False,
) -> int | None:  # fmt: skip
    """``chunk`` -> paged KV at ``slots``; negative slots are skipped. ``hashed``: also
    return the term sum of all of ``chunk``'s bytes (padding tokens included), taken
    as each piece is read."""
    es = chunk.element_size()
    fused = hashed and hashable_in_pass(geom, es) and chunk.device.type == "cpu"
    lib = runs_library(geom, layers)
    if lib is not None:
        check_slots(slots, geom)  # the range check; padding is skipped natively
        total = checksum.partial_sum(chunk) if hashed and not fused else None
        got = _native_runs("scatter", lib, layers, geom, slots, chunk, fused)
        return got if fused else total
    total = None
    if check_slots(slots, geom):
        if hashed:
            total = checksum.partial_sum(chunk)
        keep = slots >= 0
        chunk = chunk.view(_UNIT_DTYPES[es])[:, :, keep].contiguous()
        slots = slots[keep]
        fused = False
    elif hashed and not fused:
        total = checksum.partial_sum(chunk)
    acc = SumAccumulator(chunk) if fused else None
    if slots.numel():
        _copy("scatter", layers, geom, slots, chunk, nonneg=True, acc=acc)
    return acc.total if acc is not None else total
