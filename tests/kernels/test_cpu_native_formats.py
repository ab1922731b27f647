"""FLASH_ATTN, FLASHINFER and MLA on the native CPU path (one C call copies every layer's
contiguous token runs, hashing each run as it is copied) against the naive reference
and the numpy/torch fallback (``LMCACHE_PD_NATIVE=0``): same bytes, digests equal to
``kvsum64`` of the gathered chunk, scatter writing only the target slots. Several block
sizes, layer counts, element widths, whole blocks in random order with a partial
tail, random single slots, padding slots, adjacent blocks (runs across blocks), tokens
whose chunk bytes are not 8-byte aligned, the streamed and thread-split modes, and the
library built without AVX-512 / AVX2."""

from __future__ import annotations

import platform
from collections.abc import Iterator

import pytest
import torch

from lmcache_pd.kernels import (
    PagedFormat,
    checksum,
    gather_checksum,
    native,
    scatter_checksum,
    torch_path,
)
from lmcache_pd.kernels.geometry import validate_caches
from lmcache_pd.layout import KVLayout

from .helpers import bits, make_caches, make_layout, ref_gather, ref_scatter
from .native_checks import check_gather_scatter, native_library

FORMATS = (PagedFormat.FLASH_ATTN, PagedFormat.FLASHINFER, PagedFormat.MLA)


@pytest.fixture(scope="module")
def native_lib() -> native.NativeLib:
    return native_library()


def _slots(pattern: str, n: int, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """``blocks``: 5 whole blocks in random order, then 3 tokens of another one;
    ``adjacent``: blocks 1, 2, 3 in order (runs that span blocks) then block 0;
    ``random``: single slots anywhere, no repeats; ``padded``: ``blocks`` with padding."""
    if pattern == "random":
        return torch.randperm(num_blocks * n, generator=gen)[: 3 * n + 1]
    if pattern == "adjacent":
        return torch.cat([torch.arange(n, 4 * n), torch.arange(n // 2)])
    order = torch.randperm(num_blocks, generator=gen)
    slots = torch.cat([(order[:5, None] * n + torch.arange(n)).reshape(-1),
                       order[5] * n + torch.arange(3)])  # fmt: skip
    if pattern == "padded":
        slots[[0, 4, -1]] = -1
    return slots


def _cases() -> Iterator[tuple[PagedFormat, str, int, int, int, int, str, str]]:
    """(format, dtype, layers, heads, head_size, block_size, cache variant, slots)."""
    for fmt in FORMATS:
        heads = 1 if fmt is PagedFormat.MLA else 3
        for dtype, layers, head_size, block_size in (
            ("float8_e4m3fn", 1, 16, 8),
            ("bfloat16", 2, 24, 16),
            ("float32", 3, 8, 32),
        ):
            for variant, pattern in (
                ("shared", "blocks"),
                ("plain", "adjacent"),
                ("shared", "random"),
                ("plain", "padded"),
            ):
                yield fmt, dtype, layers, heads, head_size, block_size, variant, pattern
    # tokens of 4 bytes: not 8-byte aligned in the chunk (hashed in a pass after/before)
    yield PagedFormat.MLA, "float8_e4m3fn", 2, 1, 4, 16, "shared", "padded"
    yield PagedFormat.FLASH_ATTN, "bfloat16", 2, 1, 2, 16, "plain", "blocks"
    # llama-like token (8 heads x 128 x bf16) and an MLA latent of 576
    yield PagedFormat.FLASH_ATTN, "bfloat16", 2, 8, 128, 16, "shared", "blocks"
    yield PagedFormat.MLA, "bfloat16", 3, 1, 576, 16, "shared", "padded"


@pytest.mark.parametrize("mode", ["cached", "streamed", "split"])
@pytest.mark.parametrize(
    ("fmt", "dtype", "layers", "heads", "head_size", "block_size", "variant", "pattern"),
    list(_cases()), ids=str,
)  # fmt: skip
def test_native_formats_match_reference_and_fallback(
    native_lib: native.NativeLib, fmt: PagedFormat, dtype: str, layers: int, heads: int,
    head_size: int, block_size: int, variant: str, pattern: str, mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``mode``: ``streamed`` counts every chunk as large enough for the stores that
    bypass the cache; ``split`` for the token range split across 3 threads."""
    layout = make_layout(layers, heads, head_size, dtype, block_size, mla=fmt is PagedFormat.MLA)
    if mode == "streamed":
        monkeypatch.setattr(torch_path, "STREAM_BYTES", 0)
    if mode == "split":
        monkeypatch.setattr(torch_path, "PARALLEL_BYTES", 0)
        monkeypatch.setattr(torch_path, "RUNS_PARALLEL_BYTES", 0)
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        try:
            _check_case(fmt, layout, variant, pattern)
        finally:
            torch.set_num_threads(threads)
        return
    _check_case(fmt, layout, variant, pattern)


def _check_case(fmt: PagedFormat, layout: KVLayout, variant: str, pattern: str) -> None:
    gen = torch.Generator().manual_seed(layout.head_size * 100 + layout.block_size)
    num_blocks = 8
    caches = make_caches(fmt, layout, num_blocks, gen, variant)
    # the native run copy is what these caches take (not the torch fallback)
    geom = validate_caches(caches, layout, fmt)[1]
    assert torch_path.runs_library(geom, caches) is not None
    slots = _slots(pattern, layout.block_size, num_blocks, gen)
    check_gather_scatter(fmt, layout, caches, slots, gen)


@pytest.mark.parametrize("fmt", [PagedFormat.FLASH_ATTN, PagedFormat.MLA])
def test_round_trip_through_zeroed_caches_on_many_blocks(
    native_lib: native.NativeLib, fmt: PagedFormat
) -> None:
    """A llama-like token (8 heads x 128, bf16) or a 576 MLA latent, block 16, 40 blocks
    of 4 layers: the native gather, scattered into zeroed caches, writes exactly the
    gathered blocks (the rest stays zero) with the same digest both ways."""
    mla = fmt is PagedFormat.MLA
    layout = make_layout(4, 8, 576 if mla else 128, "bfloat16", 16, mla=mla)
    gen = torch.Generator().manual_seed(5)
    caches = make_caches(fmt, layout, 48, gen, "shared")
    order = torch.randperm(48, generator=gen)
    slots = torch.cat([(order[:40, None] * 16 + torch.arange(16)).reshape(-1),
                       order[40] * 16 + torch.arange(9)])  # fmt: skip
    out = torch.empty(slots.numel() * layout.bytes_per_token, dtype=torch.uint8)
    digest = gather_checksum(caches, slots, out, layout, fmt)
    assert digest == checksum.reference_digest(out.numpy())
    fresh = [torch.zeros_like(c) for c in caches]
    assert scatter_checksum(out, fresh, slots, layout, fmt) == digest
    expected = [torch.zeros_like(c) for c in caches]
    view = out.view(caches[0].dtype).view(layout.chunk_shape(slots.numel()))
    ref_scatter(fmt, view, expected, slots.tolist(), layout)
    for a, b in zip(fresh, expected, strict=True):
        assert torch.equal(bits(a), bits(b))


def test_permuted_heads_stay_on_the_torch_path(native_lib: native.NativeLib) -> None:
    """HND views (a token's heads not adjacent) are not contiguous runs: no native copy."""
    layout = make_layout(2, 3, 8, "bfloat16", 16, mla=False)
    gen = torch.Generator().manual_seed(1)
    caches = make_caches(PagedFormat.FLASH_ATTN, layout, 4, gen, "permuted")
    geom = validate_caches(caches, layout, PagedFormat.FLASH_ATTN)[1]
    assert torch_path.runs_library(geom, caches) is None


@pytest.mark.parametrize(
    "flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2")], ids=["avx2", "no-avx2"]
)
def test_narrower_builds_give_the_same_bytes_and_digests(
    native_lib: native.NativeLib, flags: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library built without AVX-512 (the AVX2 lanes) and without AVX2 (SSE tiles and
    scalar lanes), as on older CPUs: every format's native path still matches the
    reference, digests included."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 ISA flags")
    monkeypatch.setattr(native, "C_FLAGS", (*native.C_FLAGS, *flags))
    narrow = native.build()
    old = native.reset_for_tests(narrow, None)
    try:
        for fmt, dtype, heads, head_size in (
            (PagedFormat.FLASH_ATTN, "bfloat16", 3, 24),
            (PagedFormat.MLA, "float32", 1, 40),
            (PagedFormat.CPU_VLLM, "bfloat16", 2, 128),  # V rows of 256 bytes
            (PagedFormat.CPU_VLLM, "float32", 3, 8),
        ):
            layout = make_layout(2, heads, head_size, dtype, 16, mla=fmt is PagedFormat.MLA)
            gen = torch.Generator().manual_seed(head_size)
            caches = make_caches(fmt, layout, 8, gen, "shared")
            slots = _slots("padded", 16, 8, gen)
            want = bits(ref_gather(fmt, caches, slots.tolist(), layout))
            want = want.reshape(-1).view(torch.uint8)
            out = torch.empty_like(want)
            assert gather_checksum(caches, slots, out, layout, fmt) == checksum.digest(want)
            assert torch.equal(out, want), fmt
            # scatter back into zeroed caches: the gathered slots, nothing else
            view = want.view(caches[0].dtype).view(layout.chunk_shape(slots.numel()))
            expected = [torch.zeros_like(c) for c in caches]
            ref_scatter(fmt, view, expected, slots.tolist(), layout)
            fresh = [torch.zeros_like(c) for c in caches]
            assert scatter_checksum(want, fresh, slots, layout, fmt) == checksum.digest(want)
            for a, b in zip(fresh, expected, strict=True):
                assert torch.equal(bits(a), bits(b)), fmt
    finally:
        native.reset_for_tests(*old)
