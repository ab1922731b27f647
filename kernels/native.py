"""Native CPU helpers, compiled at first use with the system C compiler (the CPU
analogue of the NVRTC kernels): no build step at install time.

Owns :data:`C_SOURCE` and its compilation (``cc -O3 -march=native``, cached on disk in
the kernel cache dir keyed by source, flags, compiler and CPU), loading with ctypes,
and the one warning when it cannot be built. Functions:

* ``kvsum_sum`` / ``kvsum_copy``: the chunk checksum's term sum (definition in
  :mod:`lmcache_pd.kernels.checksum`), alone or fused into a copy (one loop loads
  each word, stores it and adds its term);
* ``kt_gather_W`` / ``kt_scatter_W``: vLLM CPU_VLLM's transposed K pages <-> chunk
  order for whole blocks (W = element bytes), tiled so both sides stay in L1.

Callers fall back to numpy/torch (same results, slower) when :func:`library` is None;
``LMCACHE_PD_NATIVE=0`` forces that (tests compare both).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

K_SEG = 0xD6E8FEB86659FD93  # must equal checksum.K_SEG (a test checks)

C_SOURCE = (
    r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
"""
    + f"#define KVSUM_K_SEG 0x{K_SEG:X}ULL\n"
    + r"""
#define PERIOD 512u
#define LOG_PERIOD 9u
#define K_SEG KVSUM_K_SEG

static inline uint64_t load64(const uint8_t* p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* term sum of nbytes at p, whose first byte is word `word0` of its chunk; with `copy`
   (a constant after inlining) each word is also stored to dst in the same loop, so a
   copy and its hash are one pass: the hash's arithmetic hides under the copy's loads */
static inline uint64_t kvsum_impl(uint8_t* dst, const uint8_t* p, uint64_t nbytes,
                                  uint64_t word0, const uint64_t* table, const int copy) {
    uint64_t acc = 0, nw = nbytes / 8, i = 0;
    while (i < nw) {
        const uint64_t w0 = word0 + i, j0 = w0 & (PERIOD - 1), seg = (w0 >> LOG_PERIOD) * K_SEG;
        uint64_t run = PERIOD - j0;
        if (run > nw - i) run = nw - i;
        const uint8_t* q = p + 8 * i;
        uint8_t* d = copy ? dst + 8 * i : 0;
        const uint64_t* t = table + j0;
        uint64_t a = 0, k = 0;
#if defined(__AVX512F__)
        /* vpmuludq: the 32x32->64 product in one instruction (compilers pick vpmullq) */
        __m512i va = _mm512_setzero_si512(), vb = va;
        const __m512i vs = _mm512_set1_epi64((long long)seg);
#define LD(p) _mm512_loadu_si512(p)
#define ST(p, v) _mm512_storeu_si512(p, v)
#define TERM(w, x) _mm512_add_epi64(_mm512_mul_epu32(x, _mm512_srli_epi64(x, 32)), w)
        for (; k + 16 <= run; k += 16) {
            const __m512i w0 = LD(q + 8 * k), w1 = LD(q + 8 * k + 64);
            if (copy) {
                ST(d + 8 * k, w0);
                ST(d + 8 * k + 64, w1);
            }
            const __m512i x0 = _mm512_xor_si512(w0, _mm512_add_epi64(LD(t + k), vs));
            const __m512i x1 = _mm512_xor_si512(w1, _mm512_add_epi64(LD(t + k + 8), vs));
            va = _mm512_add_epi64(va, TERM(w0, x0));
            vb = _mm512_add_epi64(vb, TERM(w1, x1));
        }
        a += (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(va, vb));
#undef LD
#undef ST
#undef TERM
#elif defined(__AVX2__)
        __m256i va = _mm256_setzero_si256(), vb = va;
        const __m256i vs = _mm256_set1_epi64x((long long)seg);
#define LD(p) _mm256_loadu_si256((const __m256i*)(p))
#define ST(p, v) _mm256_storeu_si256((__m256i*)(p), v)
#define TERM(w, x) _mm256_add_epi64(_mm256_mul_epu32(x, _mm256_srli_epi64(x, 32)), w)
        for (; k + 8 <= run; k += 8) {
            const __m256i w0 = LD(q + 8 * k), w1 = LD(q + 8 * k + 32);
            if (copy) {
                ST(d + 8 * k, w0);
                ST(d + 8 * k + 32, w1);
            }
            const __m256i x0 = _mm256_xor_si256(w0, _mm256_add_epi64(LD(t + k), vs));
            const __m256i x1 = _mm256_xor_si256(w1, _mm256_add_epi64(LD(t + k + 4), vs));
            va = _mm256_add_epi64(va, TERM(w0, x0));
            vb = _mm256_add_epi64(vb, TERM(w1, x1));
        }
        uint64_t lanes[4];
        _mm256_storeu_si256((__m256i*)lanes, _mm256_add_epi64(va, vb));
        a += lanes[0] + lanes[1] + lanes[2] + lanes[3];
#undef LD
#undef ST
#undef TERM
#endif
        for (; k < run; k++) {
            const uint64_t w = load64(q + 8 * k), x = w ^ (t[k] + seg);
            if (copy) memcpy(d + 8 * k, &w, 8);
            a += (uint64_t)(uint32_t)x * (uint64_t)(uint32_t)(x >> 32) + w;
        }
        acc += a;
        i += run;
    }
    if (nbytes % 8) {
        uint8_t last[8] = {0};
        memcpy(last, p + 8 * nw, nbytes % 8);
        if (copy) memcpy(dst + 8 * nw, last, nbytes % 8);
        const uint64_t wi = word0 + nw, w = load64(last);
        const uint64_t x = w ^ (table[wi & (PERIOD - 1)] + (wi >> LOG_PERIOD) * K_SEG);
        acc += (uint64_t)(uint32_t)x * (x >> 32) + w;
    }
    return acc;
}

uint64_t kvsum_sum(const uint8_t* p, uint64_t nbytes, uint64_t word0, const uint64_t* table) {
    return kvsum_impl(0, p, nbytes, word0, table, 0);
}

/* copy src -> dst (nbytes, not overlapping) and return the term sum, in one loop */
uint64_t kvsum_copy(uint8_t* dst, const uint8_t* src, uint64_t nbytes, uint64_t word0,
                    const uint64_t* table) {
    return kvsum_impl(dst, src, nbytes, word0, table, 1);
}

/* vLLM CPU_VLLM pages: per (block, head) K is stored transposed, [D][N] elements.
   kt_gather: whole blocks blk[0..nblk) -> dst [nblk*N][H][D] (chunk order);
   kt_scatter: the inverse. sb/sh: byte strides of block and head. Square tiles: 8x8
   (2-byte) and 4x4 (4-byte) elements transposed in SSE registers, the rest scalar. */
#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
static inline void tr_u16(const uint16_t* s, int64_t ss, uint16_t* o, int64_t os) {
    __m128i a[8], b[8], c[8];
    for (int i = 0; i < 8; i++) a[i] = _mm_loadu_si128((const __m128i*)(s + i * ss));
    for (int i = 0; i < 4; i++) {
        b[2 * i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
        b[2 * i + 1] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        c[4 * i] = _mm_unpacklo_epi32(b[4 * i], b[4 * i + 2]);
        c[4 * i + 1] = _mm_unpackhi_epi32(b[4 * i], b[4 * i + 2]);
        c[4 * i + 2] = _mm_unpacklo_epi32(b[4 * i + 1], b[4 * i + 3]);
        c[4 * i + 3] = _mm_unpackhi_epi32(b[4 * i + 1], b[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        _mm_storeu_si128((__m128i*)(o + (2 * j) * os), _mm_unpacklo_epi64(c[j], c[j + 4]));
        _mm_storeu_si128((__m128i*)(o + (2 * j + 1) * os), _mm_unpackhi_epi64(c[j], c[j + 4]));
    }
}
static inline void tr_u32(const uint32_t* s, int64_t ss, uint32_t* o, int64_t os) {
    __m128 r0 = _mm_loadu_ps((const float*)(s)), r1 = _mm_loadu_ps((const float*)(s + ss));
    __m128 r2 = _mm_loadu_ps((const float*)(s + 2 * ss));
    __m128 r3 = _mm_loadu_ps((const float*)(s + 3 * ss));
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    _mm_storeu_ps((float*)(o), r0);
    _mm_storeu_ps((float*)(o + os), r1);
    _mm_storeu_ps((float*)(o + 2 * os), r2);
    _mm_storeu_ps((float*)(o + 3 * os), r3);
}
#define TR_2(s, ss, o, os) tr_u16(s, ss, o, os)
#define TR_4(s, ss, o, os) tr_u32(s, ss, o, os)
#define TS_2 8
#define TS_4 4
#endif
#ifndef TS_2
#define TS_2 0
#define TR_2(s, ss, o, os)
#endif
#ifndef TS_4
#define TS_4 0
#define TR_4(s, ss, o, os)
#endif
#define TS_1 0
#define TR_1(s, ss, o, os)
#define TS_8 0
#define TR_8(s, ss, o, os)

/* one [R][C] matrix at s (row stride ss) -> [C][R] at o (row stride os), elements T */
#define KT_TRANSPOSE(T, W, s, ss, o, os, R, C)                                            \
    for (int64_t r0 = 0; r0 < (R); r0 += 8)                                               \
        for (int64_t c0 = 0; c0 < (C); c0 += 8) {                                         \
            const int64_t r1 = r0 + 8 < (R) ? r0 + 8 : (R), c1 = c0 + 8 < (C) ? c0 + 8 : (C); \
            if (TS_##W && r1 - r0 == 8 && c1 - c0 == 8) {                                 \
                for (int64_t i = 0; TS_##W && i < 8; i += (TS_##W ? TS_##W : 8))           \
                    for (int64_t j = 0; j < 8; j += (TS_##W ? TS_##W : 8))                 \
                        TR_##W((s) + (r0 + i) * (ss) + c0 + j, ss,                         \
                               (o) + (c0 + j) * (os) + r0 + i, os);                        \
                continue;                                                                 \
            }                                                                             \
            for (int64_t r = r0; r < r1; r++)                                             \
                for (int64_t c = c0; c < c1; c++) (o)[c * (os) + r] = (s)[r * (ss) + c];  \
        }

#define KT_DEFINE(T, W)                                                                   \
void kt_gather_##W(uint8_t* dst, const uint8_t* base, const int64_t* blk, int64_t nblk,   \
                   int64_t H, int64_t D, int64_t N, int64_t sb, int64_t sh) {             \
    for (int64_t b = 0; b < nblk; b++)                                                    \
        for (int64_t h = 0; h < H; h++) {                                                 \
            const T* s = (const T*)(base + blk[b] * sb + h * sh);                         \
            T* o = (T*)dst + b * N * H * D + h * D;                                       \
            KT_TRANSPOSE(T, W, s, N, o, H * D, D, N)                                      \
        }                                                                                 \
}                                                                                         \
void kt_scatter_##W(const uint8_t* src, uint8_t* base, const int64_t* blk, int64_t nblk,  \
                    int64_t H, int64_t D, int64_t N, int64_t sb, int64_t sh) {            \
    for (int64_t b = 0; b < nblk; b++)                                                    \
        for (int64_t h = 0; h < H; h++) {                                                 \
            T* s = (T*)(base + blk[b] * sb + h * sh);                                     \
            const T* o = (const T*)src + b * N * H * D + h * D;                           \
            KT_TRANSPOSE(T, W, o, H * D, s, N, N, D)                                      \
        }                                                                                 \
}
KT_DEFINE(uint8_t, 1)
KT_DEFINE(uint16_t, 2)
KT_DEFINE(uint32_t, 4)
KT_DEFINE(uint64_t, 8)
"""
)

C_FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-shared", "-fPIC", "-fno-strict-aliasing")
ELEMENT_WIDTHS = (1, 2, 4, 8)


class NativeLib:
    """The loaded library with typed entry points."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        u64, i64, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
        lib.kvsum_sum.restype = u64
        lib.kvsum_sum.argtypes = (ptr, u64, u64, ptr)
        lib.kvsum_copy.restype = u64
        lib.kvsum_copy.argtypes = (ptr, ptr, u64, u64, ptr)
        self.sum = lib.kvsum_sum
        self.copy = lib.kvsum_copy
        self.kt_gather: dict[int, Any] = {}
        self.kt_scatter: dict[int, Any] = {}
        for w in ELEMENT_WIDTHS:
            for table, name in (
                (self.kt_gather, f"kt_gather_{w}"),
                (self.kt_scatter, f"kt_scatter_{w}"),
            ):
                fn = getattr(lib, name)
                fn.restype = None
                fn.argtypes = (ptr, ptr, ptr, i64, i64, i64, i64, i64, i64)
                table[w] = fn
        self.path = path
        self._lib = lib


_LOCK = threading.Lock()
_LIB: NativeLib | None = None
_ERROR: str | None = None


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = ("flags", "Features", "model name")
    return "\n".join(sorted({ln for ln in info.splitlines() if ln.startswith(keep)}))


def compiler() -> str:
    """``$CC``, else ``cc``/``gcc``/``clang`` from PATH; RuntimeError when none."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    return cc


def library_path() -> Path:
    """Where the library for this source, compiler and CPU is cached."""
    from .cuda_kernels import cache_dir  # the path helper only: no CUDA import

    cc = compiler()
    res = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    version = res.stdout.splitlines()[0] if res.stdout else cc
    text = "\0".join([C_SOURCE, *C_FLAGS, version, _cpu_id()])
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    return cache_dir() / f"native_{digest}_{platform.machine()}.so"


def build() -> NativeLib:
    """Compile (or reuse the cached build) and load; raises on any failure."""
    path = library_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".native-") as tmp:
            src = Path(tmp) / "lmcache_pd_native.c"
            src.write_text(C_SOURCE)
            out = Path(tmp) / "lib.so"
            res = subprocess.run(
                [compiler(), *C_FLAGS, "-o", str(out), str(src)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if res.returncode != 0:
                raise RuntimeError(f"C compile failed: {res.stderr.strip()[-2000:]}")
            os.replace(out, path)
    return NativeLib(path)


def library() -> NativeLib | None:
    """The library, built on first use; None (one warning per process) if it cannot be."""
    global _LIB, _ERROR
    if _LIB is not None or _ERROR is not None:
        return _LIB
    with _LOCK:
        if _LIB is None and _ERROR is None:
            if os.environ.get("LMCACHE_PD_NATIVE", "1") == "0":
                _ERROR = "disabled by LMCACHE_PD_NATIVE=0"
            else:
                try:
                    _LIB = build()
                except Exception as exc:
                    _ERROR = f"{type(exc).__name__}: {exc}"
            if _ERROR is not None:
                log.warning(
                    "lmcache-pd native CPU helpers unavailable (%s): chunk checksums and "
                    "CPU_VLLM K pages use the numpy/torch paths (same results, several "
                    "times slower)",
                    _ERROR,
                )
    return _LIB


def unavailable_reason() -> str | None:
    """Why :func:`library` is None, or None when it loaded (or was not tried yet)."""
    return _ERROR


def reset_for_tests(
    lib: NativeLib | None, error: str | None
) -> tuple[NativeLib | None, str | None]:
    """Swap the loaded state (tests force the fallback path); returns the old state."""
    global _LIB, _ERROR
    old = (_LIB, _ERROR)
    _LIB, _ERROR = lib, error
    return old
