"""Native CPU helpers, compiled at first use with the system C compiler (the CPU
analogue of the NVRTC kernels): no build step at install time.

Owns :data:`C_SOURCE` and its compilation (``cc -O3 -march=native``, cached on disk in
the kernel cache dir keyed by source, flags, compiler and CPU), loading with ctypes,
and the one warning when it cannot be built. Functions:

* ``kvsum_sum`` / ``kvsum_copy``: the chunk checksum's term sum (definition in
  :mod:`lmcache_pd.kernels.checksum`), alone or fused into a copy (one loop loads
  each word, stores it and adds its term);
* ``cpuv_gather_W`` / ``cpuv_scatter_W`` (W = element bytes): vLLM's CPU page format
  (CPU_VLLM) <-> chunk order for whole blocks of every layer in one call: K (stored
  transposed) by register tiles through an L1 stage that the chunk side streams in
  and out of, V by rows; optionally the checksum's term sum of every chunk byte,
  taken in the same loop that copies it; optionally stores that bypass the cache
  (large chunks, see ``torch_path.STREAM_BYTES``);
* ``pkv_gather`` / ``pkv_scatter``: the formats that keep a token's bytes contiguous
  and a block's tokens adjacent (FLASH_ATTN, FLASHINFER, MLA) <-> chunk order for any
  slot list (padding included), every layer and K/V half in one call: the slots are cut
  into runs of adjacent tokens once, then each run is one copy, hashed in the same loop
  by the same code as ``kvsum_copy`` (one implementation of the hash lanes).

Callers fall back to numpy/torch (same results, slower) when :func:`library` is None;
``LMCACHE_PD_NATIVE=0`` forces that (tests compare both).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
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
#define KVSUM_PREFETCH 1024 /* bytes ahead of the copy+hash loop's source (software) */
#define LOG_PERIOD 9u
#define K_SEG KVSUM_K_SEG

static inline uint64_t load64(const uint8_t* p) { uint64_t v; memcpy(&v, p, 8); return v; }

#if defined(__AVX512F__)
/* The hash lanes, one step: 16 words at q (chunk words whose keys are t[0..15] + seg,
   vs = seg in every lane) added into va/vb; with `copy` also stored at d (copy == 2:
   stores that bypass the cache, d 64-byte aligned). vpmuludq: the 32x32->64 product in
   one instruction (compilers pick vpmullq). Every AVX-512 loop that hashes uses this. */
static inline __attribute__((always_inline)) void kvsum_step16(
    uint8_t* d, const uint8_t* q, const uint64_t* t, const __m512i vs, __m512i* va,
    __m512i* vb, const int copy) {
    const __m512i w0 = _mm512_loadu_si512(q), w1 = _mm512_loadu_si512(q + 64);
    if (copy == 2) {
        _mm512_stream_si512((void*)d, w0);
        _mm512_stream_si512((void*)(d + 64), w1);
    } else if (copy) {
        _mm512_storeu_si512(d, w0);
        _mm512_storeu_si512(d + 64, w1);
    }
    const __m512i x0 = _mm512_xor_si512(w0, _mm512_add_epi64(_mm512_loadu_si512(t), vs));
    const __m512i x1 = _mm512_xor_si512(w1, _mm512_add_epi64(_mm512_loadu_si512(t + 8), vs));
    const __m512i p0 = _mm512_mul_epu32(x0, _mm512_srli_epi64(x0, 32));
    const __m512i p1 = _mm512_mul_epu32(x1, _mm512_srli_epi64(x1, 32));
    *va = _mm512_add_epi64(*va, _mm512_add_epi64(p0, w0));
    *vb = _mm512_add_epi64(*vb, _mm512_add_epi64(p1, w1));
}
#endif

/* term sum of nbytes at p, whose first byte is word `word0` of its chunk; with `copy`
   (a constant after inlining) each word is also stored to dst in the same loop, so a
   copy and its hash are one pass: the hash's arithmetic hides under the copy's loads.
   copy == 2: vector stores bypass the cache (dst 64-byte aligned, word0 % 8 == 0) */
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
        __m512i va = _mm512_setzero_si512(), vb = va;
        const __m512i vs = _mm512_set1_epi64((long long)seg);
        for (; k + 16 <= run; k += 16) {
            if (copy) { /* copies run on one core's fill buffers: ask for the source early */
                _mm_prefetch((const char*)(q + 8 * k + KVSUM_PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char*)(q + 8 * k + KVSUM_PREFETCH + 64), _MM_HINT_T0);
            }
            kvsum_step16(copy ? d + 8 * k : 0, q + 8 * k, t + k, vs, &va, &vb, copy);
        }
        a += (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(va, vb));
#elif defined(__AVX2__)
        __m256i va = _mm256_setzero_si256(), vb = va;
        const __m256i vs = _mm256_set1_epi64x((long long)seg);
#define LD(p) _mm256_loadu_si256((const __m256i*)(p))
#define ST(p, v) \
    (copy == 2 ? _mm256_stream_si256((__m256i*)(p), v) : _mm256_storeu_si256((__m256i*)(p), v))
#define TERM(w, x) _mm256_add_epi64(_mm256_mul_epu32(x, _mm256_srli_epi64(x, 32)), w)
        for (; k + 8 <= run; k += 8) {
            if (copy && (k & 15) == 0)
                _mm_prefetch((const char*)(q + 8 * k + KVSUM_PREFETCH), _MM_HINT_T0);
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

/* Transposes for CPU_VLLM's K pages: square tiles of 8x8 (2-byte) and 4x4 (4-byte)
   elements in SSE registers, the rest scalar. */
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

/* 2-byte elements with AVX2: two 8x8 tiles per 256-bit register (one per 128-bit
   lane; the unpacks work within lanes), paired so that one side of the transpose is
   16 contiguous elements: twice the tiles per shuffle of the SSE version.
   kt_fast_g_2: [D][N] page columns [0, gn) at s -> [gn][D] rows os apart at o;
   kt_fast_s_2: [gn][D] rows os apart at o -> page columns [0, gn) at s (row stride N).
   0 (nothing done) unless D % 16 == 0 and gn % 8 == 0. */
#if defined(__AVX2__)
static inline void tr8_lanes(__m256i a[8]) {
    __m256i b[8], c[8];
    for (int i = 0; i < 4; i++) {
        b[2 * i] = _mm256_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
        b[2 * i + 1] = _mm256_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        c[4 * i] = _mm256_unpacklo_epi32(b[4 * i], b[4 * i + 2]);
        c[4 * i + 1] = _mm256_unpackhi_epi32(b[4 * i], b[4 * i + 2]);
        c[4 * i + 2] = _mm256_unpacklo_epi32(b[4 * i + 1], b[4 * i + 3]);
        c[4 * i + 3] = _mm256_unpackhi_epi32(b[4 * i + 1], b[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        a[2 * j] = _mm256_unpacklo_epi64(c[j], c[j + 4]);
        a[2 * j + 1] = _mm256_unpackhi_epi64(c[j], c[j + 4]);
    }
}
static inline int kt_fast_g_2(const uint16_t* s, int64_t N, uint16_t* o, int64_t os,
                              int64_t D, int64_t gn) {
    if (D % 16 || gn % 8) return 0;
    for (int64_t d0 = 0; d0 < D; d0 += 16)
        for (int64_t c0 = 0; c0 < gn; c0 += 8) {
            __m256i a[8];
            for (int i = 0; i < 8; i++) {
                const __m128i lo = _mm_loadu_si128((const __m128i*)(s + (d0 + i) * N + c0));
                const __m128i hi = _mm_loadu_si128((const __m128i*)(s + (d0 + 8 + i) * N + c0));
                a[i] = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
            }
            tr8_lanes(a);
            for (int j = 0; j < 8; j++)
                _mm256_storeu_si256((__m256i*)(o + (c0 + j) * os + d0), a[j]);
        }
    return 1;
}
static inline int kt_fast_s_2(const uint16_t* o, int64_t os, uint16_t* s, int64_t N,
                              int64_t gn, int64_t D) {
    if (D % 16 || gn % 8) return 0;
    for (int64_t r0 = 0; r0 < gn; r0 += 8)
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            __m256i a[8];
            for (int i = 0; i < 8; i++)
                a[i] = _mm256_loadu_si256((const __m256i*)(o + (r0 + i) * os + d0));
            tr8_lanes(a);
            for (int j = 0; j < 8; j++) {
                _mm_storeu_si128((__m128i*)(s + (d0 + j) * N + r0), _mm256_castsi256_si128(a[j]));
                _mm_storeu_si128((__m128i*)(s + (d0 + 8 + j) * N + r0),
                                 _mm256_extracti128_si256(a[j], 1));
            }
        }
    return 1;
}
#define KT_FAST_G_2(s, N, o, os, D, gn) kt_fast_g_2(s, N, o, os, D, gn)
#define KT_FAST_S_2(o, os, s, N, gn, D) kt_fast_s_2(o, os, s, N, gn, D)
#else
#define KT_FAST_G_2(s, N, o, os, D, gn) 0
#define KT_FAST_S_2(o, os, s, N, gn, D) 0
#endif
#define KT_FAST_G_1(s, N, o, os, D, gn) 0
#define KT_FAST_S_1(o, os, s, N, gn, D) 0
#define KT_FAST_G_4(s, N, o, os, D, gn) 0
#define KT_FAST_S_4(o, os, s, N, gn, D) 0
#define KT_FAST_G_8(s, N, o, os, D, gn) 0
#define KT_FAST_S_8(o, os, s, N, gn, D) 0

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

/* vLLM CPU_VLLM pages, whole blocks of every layer in one call. Per (block, head) page
   (block blk[b] of layer l at layers[l] + blk[b]*sb + h*sh): K transposed, [D][N]
   elements; V [N][D] at +sk with rows sn bytes apart. Chunk [L][2][T][H][D]: block b's
   K is the contiguous piece of N tokens at token b*N of chunk[l][0], its V the same
   place in chunk[l][1]. cpuv_gather: pages -> chunk; cpuv_scatter: chunk -> pages, for
   blocks blk[b0..b1) (callers split the range across threads).

   K goes through an L1 stage of g whole tokens (all heads): the tiles transpose between
   the pages and the stage, and the stage <-> chunk move is one sequential copy, so the
   chunk side streams like memcpy (a tile's 8 rows 2 KiB apart written straight into the
   chunk left the prefetchers behind: 5 GB/s at DRAM sizes). V moves row by row (D
   elements, sequential on both sides). With a key table (chunk tokens a multiple of 8
   bytes), every chunk byte is hashed in the same loop that copies it (K: stage <-> chunk;
   V rows when D*W is a multiple of 8, else the V piece right after / before), and the
   term sum of all of them is returned (0 without a table). */
#define CPUV_STAGE 32768
#define CPUV_PAGE 8192 /* scatter: one K page, transposed in L1, then streamed */
/* tokens per stage: a multiple of 8 where possible; 0 when one token is too large */
static inline int64_t cpuv_group(int64_t tok, int64_t N) {
    int64_t g = CPUV_STAGE / tok;
    if (g > N) g = N;
    if (g > 8) g -= g % 8;
    return g;
}
/* nbytes src -> dst; with a table also the term sum of the bytes (chunk word word0 on).
   nt: stores that bypass the cache where dst is 64-byte aligned (callers fence). */
static inline uint64_t cpuv_move(uint8_t* dst, const uint8_t* src, int64_t nbytes,
                                 int64_t word0, const uint64_t* table, int64_t nt) {
#if defined(__AVX512F__) || defined(__AVX2__)
    nt = nt && ((uintptr_t)dst & 63) == 0;
#else
    nt = 0;
#endif
    if (table) {
        if (nt && (word0 & 7) == 0)
            return kvsum_impl(dst, src, (uint64_t)nbytes, (uint64_t)word0, table, 2);
        return kvsum_impl(dst, src, (uint64_t)nbytes, (uint64_t)word0, table, 1);
    }
#if defined(__AVX512F__)
    if (nt) {
        int64_t i = 0;
        for (; i + 128 <= nbytes; i += 128) { /* as kvsum_impl's copy, without the hash */
            _mm_prefetch((const char*)(src + i + KVSUM_PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char*)(src + i + KVSUM_PREFETCH + 64), _MM_HINT_T0);
            _mm512_stream_si512((void*)(dst + i), _mm512_loadu_si512(src + i));
            _mm512_stream_si512((void*)(dst + i + 64), _mm512_loadu_si512(src + i + 64));
        }
        for (; i + 64 <= nbytes; i += 64)
            _mm512_stream_si512((void*)(dst + i), _mm512_loadu_si512(src + i));
        memcpy(dst + i, src + i, (size_t)(nbytes - i));
        return 0;
    }
#elif defined(__AVX2__)
    if (nt) {
        int64_t i = 0;
        for (; i + 128 <= nbytes; i += 128) { /* as kvsum_impl's copy, without the hash */
            _mm_prefetch((const char*)(src + i + KVSUM_PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char*)(src + i + KVSUM_PREFETCH + 64), _MM_HINT_T0);
            for (int64_t k = 0; k < 128; k += 32)
                _mm256_stream_si256((__m256i*)(dst + i + k),
                                    _mm256_loadu_si256((const __m256i*)(src + i + k)));
        }
        for (; i + 32 <= nbytes; i += 32)
            _mm256_stream_si256((__m256i*)(dst + i), _mm256_loadu_si256((const __m256i*)(src + i)));
        memcpy(dst + i, src + i, (size_t)(nbytes - i));
        return 0;
    }
#endif
    memcpy(dst, src, (size_t)nbytes);
    return 0;
}
static inline void cpuv_fence(int64_t nt) {
#if defined(__SSE2__)
    if (nt) _mm_sfence();
#endif
}
/* kvsum_copy for large buffers: with nt, stores that bypass the cache where dst is
   64-byte aligned and word0 % 8 == 0 (else plain stores), fenced before returning.
   Callers split big copies into pieces on 4 KiB boundaries, one call per thread. */
uint64_t kvsum_copy_nt(uint8_t* dst, const uint8_t* src, uint64_t nbytes, uint64_t word0,
                       const uint64_t* table, int64_t nt) {
    const uint64_t acc = cpuv_move(dst, src, (int64_t)nbytes, (int64_t)word0, table, nt);
    cpuv_fence(nt);
    return acc;
}
/* CPU_VLLM's V: N tokens x H rows of `row` bytes, contiguous on the chunk side at c
   (chunk word word0 on), on the page side row (n, h) at p + n*sn + h*sh. scatter == 0:
   pages -> chunk, 1: chunk -> pages; each word hashed in the loop that moves it, the
   lanes kept in registers across all N*H rows (one reduction, not one per 256-byte
   row). Needs rows of whole 128-byte steps and a table (else 0 is returned: callers
   then move the rows by cpuv_move); nt as cpuv_move (callers fence). */
static inline int cpuv_rows_ok(int64_t row, const uint64_t* table) {
#if defined(__AVX512F__)
    return table && row % 128 == 0;
#else
    (void)row;
    (void)table;
    return 0;
#endif
}
static inline uint64_t cpuv_rows(uint8_t* c, uint8_t* p, int64_t N, int64_t H, int64_t sn,
                                 int64_t sh, int64_t row, uint64_t word0,
                                 const uint64_t* table, const int scatter, int64_t nt) {
    uint64_t acc = 0;
#if defined(__AVX512F__)
    uint8_t* d0 = scatter ? p : c;
    nt = nt && ((uintptr_t)d0 & 63) == 0 && (!scatter || (sn % 64 == 0 && sh % 64 == 0));
    const uint64_t rw = (uint64_t)row / 8;
    __m512i va = _mm512_setzero_si512(), vb = va;
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            uint8_t* cr = c + (n * H + h) * row;
            uint8_t* pr = p + n * sn + h * sh;
            const uint8_t* q = scatter ? cr : pr;
            uint8_t* d = scatter ? pr : cr;
            const uint64_t w = word0 + (uint64_t)(n * H + h) * rw, j0 = w & (PERIOD - 1);
            if (j0 + rw > PERIOD) { /* the row crosses a key period: the general loop */
                acc += kvsum_impl(d, q, (uint64_t)row, w, table, nt ? 2 : 1);
                continue;
            }
            const __m512i vs = _mm512_set1_epi64((long long)((w >> LOG_PERIOD) * K_SEG));
            for (uint64_t k = 0; k < rw; k += 16) {
                if (nt)
                    kvsum_step16(d + 8 * k, q + 8 * k, table + j0 + k, vs, &va, &vb, 2);
                else
                    kvsum_step16(d + 8 * k, q + 8 * k, table + j0 + k, vs, &va, &vb, 1);
            }
        }
    acc += (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(va, vb));
#else
    (void)c; (void)p; (void)N; (void)H; (void)sn; (void)sh; (void)row; (void)word0;
    (void)table; (void)scatter; (void)nt;
#endif
    return acc;
}
#define CPUV_DEFINE(T, W)                                                                 \
uint64_t cpuv_gather_##W(uint8_t* chunk, const int64_t* layers, int64_t L,                \
                         const int64_t* blk, int64_t b0, int64_t b1, int64_t tokens, int64_t H, \
                         int64_t D, int64_t N, int64_t sb, int64_t sh, int64_t sk,        \
                         int64_t sn, const uint64_t* table, int64_t nt) {                 \
    const int64_t tok = H * D * W, piece = N * tok, row = D * W, g = cpuv_group(tok, N);  \
    const uint64_t* vtab = row % 8 == 0 ? table : 0; /* V rows hashed as copied */        \
    uint8_t stage[CPUV_STAGE] __attribute__((aligned(64)));                              \
    uint64_t acc = 0;                                                                     \
    for (int64_t l = 0; l < L; l++) {                                                     \
        const uint8_t* base = (const uint8_t*)layers[l];                                  \
        uint8_t* ck = chunk + 2 * l * tokens * tok;                                       \
        for (int64_t b = b0; b < b1; b++) {                                               \
            const uint8_t* page = base + blk[b] * sb;                                     \
            uint8_t* ok = ck + b * piece;                                                 \
            uint8_t* ov = ok + tokens * tok;                                              \
            for (int64_t n0 = 0; g && n0 < N; n0 += g) {                                  \
                const int64_t gn = N - n0 < g ? N - n0 : g;                               \
                for (int64_t h = 0; h < H; h++) {                                         \
                    const T* s = (const T*)(page + h * sh) + n0;                          \
                    T* o = (T*)stage + h * D;                                             \
                    if (!KT_FAST_G_##W(s, N, o, H * D, D, gn)) {                          \
                        KT_TRANSPOSE(T, W, s, N, o, H * D, D, gn)                         \
                    }                                                                     \
                }                                                                         \
                uint8_t* dst = ok + n0 * tok;                                             \
                acc += cpuv_move(dst, stage, gn * tok, (dst - chunk) / 8, table, nt);         \
            }                                                                             \
            if (!g) {                                                                     \
                for (int64_t h = 0; h < H; h++) {                                         \
                    const T* s = (const T*)(page + h * sh);                               \
                    T* o = (T*)ok + h * D;                                                \
                    KT_TRANSPOSE(T, W, s, N, o, H * D, D, N)                              \
                }                                                                         \
                if (table) acc += kvsum_impl(0, ok, piece, (ok - chunk) / 8, table, 0);   \
            }                                                                             \
            if (cpuv_rows_ok(row, vtab))                                                  \
                acc += cpuv_rows(ov, (uint8_t*)page + sk, N, H, sn, sh, row,              \
                                 (uint64_t)(ov - chunk) / 8, vtab, 0, nt);                \
            else                                                                          \
                for (int64_t n = 0; n < N; n++)                                           \
                    for (int64_t h = 0; h < H; h++) {                                     \
                        uint8_t* dst = ov + n * tok + h * row;                            \
                        acc += cpuv_move(dst, page + sk + h * sh + n * sn, row,           \
                                         (dst - chunk) / 8, vtab, nt);                    \
                    }                                                                     \
            if (table && !vtab) acc += kvsum_impl(0, ov, piece, (ov - chunk) / 8, table, 0); \
        }                                                                                 \
    }                                                                                     \
    cpuv_fence(nt);                                                                       \
    return acc;                                                                           \
}                                                                                         \
uint64_t cpuv_scatter_##W(const uint8_t* chunk, const int64_t* layers, int64_t L,         \
                          const int64_t* blk, int64_t b0, int64_t b1, int64_t tokens, int64_t H, \
                          int64_t D, int64_t N, int64_t sb, int64_t sh, int64_t sk,       \
                          int64_t sn, const uint64_t* table, int64_t nt) {                \
    const int64_t tok = H * D * W, piece = N * tok, row = D * W, g = cpuv_group(tok, N);  \
    const uint64_t* vtab = row % 8 == 0 ? table : 0;                                      \
    uint8_t stage[CPUV_STAGE] __attribute__((aligned(64)));                              \
    uint8_t kpage[CPUV_PAGE] __attribute__((aligned(64)));                               \
    uint64_t acc = 0;                                                                     \
    for (int64_t l = 0; l < L; l++) {                                                     \
        uint8_t* base = (uint8_t*)layers[l];                                              \
        const uint8_t* ck = chunk + 2 * l * tokens * tok;                                 \
        for (int64_t b = b0; b < b1; b++) {                                               \
            uint8_t* page = base + blk[b] * sb;                                           \
            const uint8_t* ok = ck + b * piece;                                           \
            const uint8_t* ov = ok + tokens * tok;                                        \
            for (int64_t n0 = 0; g && n0 < N; n0 += g) {                                  \
                const int64_t gn = N - n0 < g ? N - n0 : g;                               \
                const uint8_t* src = ok + n0 * tok;                                       \
                acc += cpuv_move(stage, src, gn * tok, (src - chunk) / 8, table, 0);         \
                for (int64_t h = 0; h < H; h++) {                                         \
                    T* s = (T*)(page + h * sh) + n0;                                      \
                    const T* o = (const T*)stage + h * D;                                 \
                    if (nt && gn == N && N * D * W <= CPUV_PAGE) {                        \
                        if (!KT_FAST_S_##W(o, H * D, (T*)kpage, N, gn, D)) {              \
                            KT_TRANSPOSE(T, W, o, H * D, (T*)kpage, N, gn, D)             \
                        }                                                                 \
                        cpuv_move((uint8_t*)s, kpage, N * D * W, 0, 0, nt);               \
                    } else if (!KT_FAST_S_##W(o, H * D, s, N, gn, D)) {                   \
                        KT_TRANSPOSE(T, W, o, H * D, s, N, gn, D)                         \
                    }                                                                     \
                }                                                                         \
            }                                                                             \
            if (!g) {                                                                     \
                if (table) acc += kvsum_impl(0, ok, piece, (ok - chunk) / 8, table, 0);   \
                for (int64_t h = 0; h < H; h++) {                                         \
                    T* s = (T*)(page + h * sh);                                           \
                    const T* o = (const T*)ok + h * D;                                    \
                    KT_TRANSPOSE(T, W, o, H * D, s, N, N, D)                              \
                }                                                                         \
            }                                                                             \
            if (table && !vtab) acc += kvsum_impl(0, ov, piece, (ov - chunk) / 8, table, 0); \
            if (cpuv_rows_ok(row, vtab))                                                  \
                acc += cpuv_rows((uint8_t*)ov, page + sk, N, H, sn, sh, row,              \
                                 (uint64_t)(ov - chunk) / 8, vtab, 1, nt);                \
            else                                                                          \
                for (int64_t n = 0; n < N; n++)                                           \
                    for (int64_t h = 0; h < H; h++) {                                     \
                        const uint8_t* src = ov + n * tok + h * row;                      \
                        acc += cpuv_move(page + sk + h * sh + n * sn, src, row,           \
                                         (src - chunk) / 8, vtab, nt);                    \
                    }                                                                     \
        }                                                                                 \
    }                                                                                     \
    cpuv_fence(nt);                                                                       \
    return acc;                                                                           \
}
CPUV_DEFINE(uint8_t, 1)
CPUV_DEFINE(uint16_t, 2)
CPUV_DEFINE(uint32_t, 4)
CPUV_DEFINE(uint64_t, 8)

/* Paged formats that keep a token's bytes (all heads, tok bytes) contiguous and the
   tokens of a block adjacent (FLASH_ATTN, FLASHINFER, MLA): chunk token t of kv half k
   of layer l lives at layers[l] + k*sk + (slot/N)*sb + (slot%N)*tok. Tokens [t0, t1) of
   the slot list are taken PKV_WINDOW at a time: the window is cut once into runs of
   consecutive slots adjacent in the layer (within a block, or across blocks when
   sb == N*tok), then for every layer and half each run is one cpuv_move (copied and,
   with a table, hashed in the same loop; nt as for CPU_VLLM). Negative slots: gather
   writes zeros, scatter skips them; their chunk bytes are hashed all the same. Returns
   the term sum of the chunk bytes of tokens [t0, t1) of every layer and half (0 without
   a table; a table needs tok % 8 == 0). */
#define PKV_WINDOW 512
static inline int64_t pkv_runs(int64_t* off, int64_t* first, const int64_t* slots, int64_t t,
                               int64_t t1, int64_t N, int64_t sb, int64_t tok) {
    const int joined = sb == N * tok;
    int64_t nr = 0;
    while (t < t1) {
        const int64_t s = slots[t];
        int64_t e = t + 1;
        if (s < 0) {
            while (e < t1 && slots[e] < 0) e++;
            off[nr] = -1;
        } else {
            while (e < t1 && slots[e] == s + (e - t) && (joined || slots[e] % N)) e++;
            off[nr] = (s / N) * sb + (s % N) * tok;
        }
        first[nr++] = t;
        t = e;
    }
    first[nr] = t1;
    return nr;
}
static inline uint64_t pkv_copy(uint8_t* chunk, const int64_t* layers, int64_t L, int64_t K,
                                const int64_t* slots, int64_t t0, int64_t t1, int64_t tokens,
                                int64_t tok, int64_t N, int64_t sb, int64_t sk,
                                const uint64_t* table, int64_t nt, const int scatter) {
    int64_t off[PKV_WINDOW], first[PKV_WINDOW + 1];
    uint64_t acc = 0;
    for (int64_t w0 = t0; w0 < t1; w0 += PKV_WINDOW) {
        const int64_t w1 = t1 - w0 < PKV_WINDOW ? t1 : w0 + PKV_WINDOW;
        const int64_t nr = pkv_runs(off, first, slots, w0, w1, N, sb, tok);
        for (int64_t l = 0; l < L; l++)
            for (int64_t k = 0; k < K; k++) {
                uint8_t* cache = (uint8_t*)layers[l] + k * sk;
                uint8_t* part = chunk + (l * K + k) * tokens * tok;
                for (int64_t r = 0; r < nr; r++) {
                    uint8_t* c = part + first[r] * tok;
                    const int64_t n = (first[r + 1] - first[r]) * tok, word0 = (c - chunk) / 8;
                    if (off[r] < 0) {
                        if (!scatter) memset(c, 0, (size_t)n);
                        if (table) acc += kvsum_impl(0, c, (uint64_t)n, (uint64_t)word0, table, 0);
                    } else if (scatter) {
                        acc += cpuv_move(cache + off[r], c, n, word0, table, nt);
                    } else {
                        acc += cpuv_move(c, cache + off[r], n, word0, table, nt);
                    }
                }
            }
    }
    cpuv_fence(nt);
    return acc;
}
uint64_t pkv_gather(uint8_t* chunk, const int64_t* layers, int64_t L, int64_t K,
                    const int64_t* slots, int64_t t0, int64_t t1, int64_t tokens, int64_t tok,
                    int64_t N, int64_t sb, int64_t sk, const uint64_t* table, int64_t nt) {
    return pkv_copy(chunk, layers, L, K, slots, t0, t1, tokens, tok, N, sb, sk, table, nt, 0);
}
uint64_t pkv_scatter(const uint8_t* chunk, const int64_t* layers, int64_t L, int64_t K,
                     const int64_t* slots, int64_t t0, int64_t t1, int64_t tokens, int64_t tok,
                     int64_t N, int64_t sb, int64_t sk, const uint64_t* table, int64_t nt) {
    return pkv_copy((uint8_t*)chunk, layers, L, K, slots, t0, t1, tokens, tok, N, sb, sk,
                    table, nt, 1);
}
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
        lib.kvsum_copy_nt.restype = u64
        lib.kvsum_copy_nt.argtypes = (ptr, ptr, u64, u64, ptr, i64)
        self.sum = lib.kvsum_sum
        self.copy = lib.kvsum_copy
        self.copy_nt = lib.kvsum_copy_nt
        self.cpuv_gather: dict[int, Any] = {}
        self.cpuv_scatter: dict[int, Any] = {}
        for w in ELEMENT_WIDTHS:
            for table, name in (
                (self.cpuv_gather, f"cpuv_gather_{w}"),
                (self.cpuv_scatter, f"cpuv_scatter_{w}"),
            ):
                fn = getattr(lib, name)
                fn.restype = u64
                fn.argtypes = (ptr, ptr, i64, ptr, *(i64,) * 10, ptr, i64)
                table[w] = fn
        self.pkv: dict[str, Any] = {}
        for op in ("gather", "scatter"):
            fn = getattr(lib, f"pkv_{op}")
            fn.restype = u64
            fn.argtypes = (ptr, ptr, i64, i64, ptr, *(i64,) * 7, ptr, i64)
            self.pkv[op] = fn
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


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()


def pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The helper threads that run one piece each of a split native call (the CPU_VLLM
    and run gathers/scatters of ``torch_path``, big ``checksum.copy_sum`` copies; the
    calls release the GIL): grown to ``workers``, never shrunk."""
    global _POOL, _POOL_WORKERS
    with _POOL_LOCK:
        if _POOL is None or _POOL_WORKERS < workers:
            _POOL = concurrent.futures.ThreadPoolExecutor(workers, "lmcache-pd-cpuv")
            _POOL_WORKERS = workers
        return _POOL


def run_pieces(edges: Sequence[int], piece: Callable[[int, int], int]) -> int:
    """``piece(a, b)`` over each range between consecutive ``edges`` (at least two): the
    first on this thread, the others on the :func:`pool` threads; the sum of their
    results (not reduced). It never returns or raises while a piece still runs: the
    pieces write into the caller's buffers."""
    if len(edges) == 2:
        return piece(edges[0], edges[1])
    helpers = pool(len(edges) - 2)
    futures = [helpers.submit(piece, a, b) for a, b in itertools.pairwise(edges[1:])]
    try:
        total = piece(edges[0], edges[1])
    finally:
        concurrent.futures.wait(futures)
    return total + sum(f.result() for f in futures)


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new one on first use."""
    global _POOL, _POOL_WORKERS, _POOL_LOCK
    _POOL, _POOL_WORKERS, _POOL_LOCK = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


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
