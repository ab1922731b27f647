"""Chunk checksum ``kvsum64``: one 64-bit digest, the same on CPU and GPU, computed inside
the copy that already touches the bytes.

Owns the definition (constants, key table, final mix), the pure-numpy reference, the
fast CPU implementation (a few lines of C compiled at first use with the system C
compiler and cached on disk next to the CUDA kernels, the CPU analogue of NVRTC) and
the torch implementation for CUDA tensors. The CUDA gather/scatter kernels
(:mod:`lmcache_pd.kernels.cuda_kernels`) accumulate the same sum in their launch.

Definition, for ``n`` bytes ``b`` (little-endian 64-bit words ``w_i``, the last one
zero-padded; ``P`` = :data:`PERIOD` = 4096; arithmetic mod 2**64)::

    key_i  = T[i mod P] + (i div P) * K_SEG        T[j] = mix64(SEED + (j + 1) * GOLDEN)
    x_i    = w_i XOR key_i
    term_i = lo32(x_i) * hi32(x_i) + w_i           (a 32x32->64 product, as in XXH3/NH)
    S      = sum of term_i
    digest = mix64(S XOR (n * K_LEN)), and 1 where that is 0 (0 means "not hashed")

``mix64`` is the splitmix64 finaliser (a bijection). Because ``S`` is a plain sum of
independent per-word terms, any split of the words (CPU cache blocks, CUDA threads,
thread blocks folded with atomics) gives the same digest: lanes are summed, never
chained.

Strength (accidental corruption; this is not a MAC: anyone can forge a collision):

* one flipped bit, or any change confined to one 64-bit word in its low half, changes
  ``term_i`` except when the other half of ``x_i`` is exactly 1 (odds 2**-32 for a
  random key); a change in the high half always changes it. ``mix64`` is a bijection,
  so a changed ``S`` always changes the digest;
* swapped or moved blocks/pages/tokens: the key of every word differs by position
  (``T`` within 32 KiB, ``K_SEG`` across them), so moved data lands on other keys and
  the sum changes except by chance (about 2**-64 per event, as for random damage);
* zeroed pages: a zero word still contributes ``lo32(key)*hi32(key)``, not 0;
* truncation/extension: ``n`` is mixed into the digest, and missing words drop terms.

Chunks up to 2**64 bytes; keys repeat only for words 2**64 / K_SEG-cycles apart.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Union

import numpy as np
import torch

from . import native

log = logging.getLogger(__name__)

NAME = "kvsum64"
PERIOD = 512
LOG_PERIOD = 9
SEED = 0x6C6D63616368652D  # "lmcache-"
GOLDEN = 0x9E3779B97F4A7C15
K_SEG = 0xD6E8FEB86659FD93
K_LEN = 0xC2B2AE3D27D4EB4F
MASK = (1 << 64) - 1
WORD = 8

Buffer = Union[np.ndarray, torch.Tensor, memoryview, bytes, bytearray]


def mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2**64)."""
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _make_table() -> np.ndarray:
    with np.errstate(over="ignore"):
        j = np.arange(1, PERIOD + 1, dtype=np.uint64)
        t = _mix64_np(np.uint64(SEED) + j * np.uint64(GOLDEN))
    t.flags.writeable = False
    return t


KEY_TABLE: np.ndarray = _make_table()  # uint64[PERIOD]


def finish(total: int, nbytes: int) -> int:
    """The digest of ``nbytes`` bytes whose term sum is ``total``; never 0."""
    return mix64((total ^ (nbytes * K_LEN)) & MASK) or 1


# --- reference (numpy, vectorised, no compiled code of ours) -------------------------


def _as_u8(buf: Buffer) -> np.ndarray:
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise ValueError(f"expected a CPU buffer, got a tensor on {buf.device}")
        if not buf.is_contiguous():
            raise ValueError("checksum buffers must be contiguous")
        return buf.reshape(-1).view(torch.uint8).numpy()
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    if not arr.flags.c_contiguous:
        raise ValueError("checksum buffers must be contiguous")
    return arr.reshape(-1).view(np.uint8)


def reference_sum(buf: Buffer, byte_offset: int = 0) -> int:
    """Term sum of ``buf``'s bytes at ``byte_offset`` of a chunk (numpy, slow, exact)."""
    _check_offset(byte_offset)
    data = _as_u8(buf)
    n = data.size
    pad = (-n) % WORD
    if pad:
        data = np.concatenate([data, np.zeros(pad, dtype=np.uint8)])
    w = data.view("<u8").astype(np.uint64)
    with np.errstate(over="ignore"):
        i = np.arange(w.size, dtype=np.uint64) + np.uint64(byte_offset // WORD)
        key = KEY_TABLE[(i & np.uint64(PERIOD - 1)).astype(np.intp)]
        key = key + (i >> np.uint64(LOG_PERIOD)) * np.uint64(K_SEG)
        x = w ^ key
        term = (x & np.uint64(0xFFFFFFFF)) * (x >> np.uint64(32)) + w
        return int(term.sum(dtype=np.uint64))


def reference_digest(buf: Buffer) -> int:
    """The digest of a whole chunk, by the numpy reference."""
    return finish(reference_sum(buf), _as_u8(buf).size)


def _check_offset(byte_offset: int) -> None:
    if byte_offset < 0 or byte_offset % WORD:
        raise ValueError(f"byte_offset must be a non-negative multiple of 8, got {byte_offset}")


# --- fast CPU implementation: C compiled at first use (lmcache_pd.kernels.native) ---


def c_library() -> native.NativeLib | None:
    """The compiled CPU library, or None (warned once) where it cannot be built."""
    return native.library()


def implementation() -> str:
    """``"c"`` or ``"numpy (<why>)"``: what CPU checksums run on here."""
    return "c" if native.library() is not None else f"numpy ({native.unavailable_reason()})"


_TABLE_PTR = KEY_TABLE.ctypes.data


def _ptr_len(buf: Buffer, writable: bool = False) -> tuple[int, int, object]:
    """(address, nbytes, keep-alive) of a contiguous CPU buffer."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise ValueError(f"expected a CPU buffer, got a tensor on {buf.device}")
        if not buf.is_contiguous():
            raise ValueError("checksum buffers must be contiguous")
        return buf.data_ptr(), buf.numel() * buf.element_size(), buf
    arr = _as_u8(buf)
    if writable and not arr.flags.writeable:
        raise ValueError("destination buffer is read-only")
    return arr.ctypes.data, arr.size, arr


# Big native checksum calls are split across torch's CPU threads, one piece per thread on
# SPLIT_ALIGN boundaries (each call releases the GIL; the pieces' term sums add mod 2**64,
# each keyed from its own byte offset), on the helper threads the native gathers use
# (native.pool). One core copies and hashes ~15 GB/s, what it copies alone, so the copy
# with the hash keeps up with torch's copy (2 threads here) only when it is split too; a
# helper thread's round trip (~0.1 ms, more on a busy 2-core host) made 2-4 MiB no faster
# split (measured), like the run copies' torch_path.RUNS_PARALLEL_BYTES reasoning.
PARALLEL_BYTES = 8 << 20
# From this size a copy's stores bypass the cache (as torch_path.STREAM_BYTES for the
# native gathers): the destination lines need not be read first (3 memory passes -> 2);
# bench kernels --quick: copy+sum / copy 0.83-0.84 at 9 MiB streamed vs 0.54-0.67 not.
STREAM_BYTES = 8 << 20
SPLIT_ALIGN = 4096


def split_edges(n: int) -> list[int]:
    """Piece edges of an ``n``-byte native copy or hash (also ``bench kernels``' split
    memcpy baseline): ``[0, n]``, or one piece per torch thread from
    :data:`PARALLEL_BYTES` (edges on :data:`SPLIT_ALIGN` boundaries)."""
    parts = min(torch.get_num_threads(), n // SPLIT_ALIGN) if n >= PARALLEL_BYTES else 1
    if parts <= 1:
        return [0, n]
    return [0, *(n * i // parts // SPLIT_ALIGN * SPLIT_ALIGN for i in range(1, parts)), n]


def _split_call(n: int, piece: Callable[[int, int], int]) -> int:
    """``piece(a, b)`` over the byte ranges of :func:`split_edges` (see
    :func:`native.run_pieces`); the sum of their results mod 2**64."""
    return native.run_pieces(split_edges(n), piece) & MASK


def partial_sum(buf: Buffer, byte_offset: int = 0) -> int:
    """Term sum of a contiguous CPU buffer that starts ``byte_offset`` bytes (a multiple
    of 8) into its chunk. Sums of disjoint parts add (mod 2**64) to the chunk's sum.
    Buffers of :data:`PARALLEL_BYTES` or more are hashed on several threads."""
    _check_offset(byte_offset)
    if isinstance(buf, torch.Tensor) and buf.device.type == "cuda":
        return cuda_sum(buf, byte_offset)
    lib = c_library()
    if lib is None:
        return reference_sum(buf, byte_offset)
    addr, n, _keep = _ptr_len(buf)
    if not n:
        return 0
    w0 = byte_offset // WORD
    return _split_call(n, lambda a, b: int(lib.sum(addr + a, b - a, w0 + a // WORD, _TABLE_PTR)))


def copy_sum(dst: Buffer, src: Buffer, byte_offset: int = 0) -> int:
    """Copy ``src`` into ``dst`` (same size, CPU, contiguous, not overlapping) and return
    the term sum of the bytes, each word hashed as it is copied (one loop): one pass over
    memory. From :data:`PARALLEL_BYTES` the copy is split across torch's threads, from
    :data:`STREAM_BYTES` its stores bypass the cache; the result is the same."""
    _check_offset(byte_offset)
    return _copy(dst, src, byte_offset, hashed=True)


def copy_plain(dst: Buffer, src: Buffer) -> None:
    """The same copy as :func:`copy_sum` (split, stores that bypass the cache) without the
    hash: the best plain copy this host does, which ``bench kernels`` compares against."""
    _copy(dst, src, 0, hashed=False)


def _copy(dst: Buffer, src: Buffer, byte_offset: int, hashed: bool) -> int:
    lib = c_library()
    d_addr, d_n, _kd = _ptr_len(dst, writable=True)
    s_addr, s_n, _ks = _ptr_len(src)
    if d_n != s_n:
        raise ValueError(f"copy: destination holds {d_n} bytes, source {s_n}")
    if lib is None:
        _as_u8(dst)[:] = _as_u8(src) if not isinstance(src, torch.Tensor) else src.numpy()
        return reference_sum(src, byte_offset) if hashed else 0
    if not s_n:
        return 0
    w0 = byte_offset // WORD
    table = _TABLE_PTR if hashed else None  # NULL: the native loop only moves the bytes
    if s_n < PARALLEL_BYTES and s_n < STREAM_BYTES:
        if not hashed:
            ctypes.memmove(d_addr, s_addr, s_n)
            return 0
        return int(lib.copy(d_addr, s_addr, s_n, w0, table))
    nt = int(s_n >= STREAM_BYTES)
    fn = lib.copy_nt

    def piece(a: int, b: int) -> int:
        return int(fn(d_addr + a, s_addr + a, b - a, w0 + a // WORD, table, nt))

    return _split_call(s_n, piece)


def nbytes_of(buf: Buffer) -> int:
    if isinstance(buf, torch.Tensor):
        return buf.numel() * buf.element_size()
    return _as_u8(buf).size


def digest(buf: Buffer) -> int:
    """The digest of a whole chunk (CPU buffer, or a CUDA tensor)."""
    return finish(partial_sum(buf), nbytes_of(buf))


def copy_digest(dst: Buffer, src: Buffer) -> int:
    """Copy a whole chunk ``src`` -> ``dst`` and return its digest, in one pass."""
    return finish(copy_sum(dst, src), nbytes_of(src))


# --- CUDA tensors: torch ops (a separate pass; the kernels fuse it into their copy) ---

_DEVICE_TABLES: dict[torch.device, torch.Tensor] = {}


def device_table(device: torch.device) -> torch.Tensor:
    """:data:`KEY_TABLE` as an int64 tensor on ``device`` (cached)."""
    t = _DEVICE_TABLES.get(device)
    if t is None:
        t = torch.from_numpy(KEY_TABLE.view(np.int64).copy()).to(device)
        _DEVICE_TABLES[device] = t
    return t


def torch_sum(buf: torch.Tensor, byte_offset: int = 0) -> int:
    """Term sum with torch ops on any device (int64 arithmetic wraps like uint64)."""
    _check_offset(byte_offset)
    flat = buf.reshape(-1).view(torch.uint8)
    n = flat.numel()
    if n == 0:
        return 0
    pad = (-n) % WORD
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8, device=flat.device)])
    w = flat.view(torch.int64)
    i = torch.arange(w.numel(), dtype=torch.int64, device=w.device) + byte_offset // WORD
    key = device_table(w.device)[i & (PERIOD - 1)] + (i >> LOG_PERIOD) * _signed(K_SEG)
    x = w ^ key
    lo = x & 0xFFFFFFFF
    hi = (x >> 32) & 0xFFFFFFFF  # arithmetic shift: mask the sign copies
    return int((lo * hi + w).sum(dtype=torch.int64).item()) & MASK


def cuda_sum(buf: torch.Tensor, byte_offset: int = 0) -> int:
    """Term sum of a CUDA tensor (torch ops; syncs)."""
    return torch_sum(buf.contiguous(), byte_offset)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v
