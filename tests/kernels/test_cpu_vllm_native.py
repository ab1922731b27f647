"""vLLM's CPU page format (CPU_VLLM) on the native path (one C call moves K and V of
the whole blocks of every layer, hashing each piece while hot) against the naive
reference and the numpy/torch fallback (``LMCACHE_PD_NATIVE=0``): same bytes, same
digest, for 1-, 2- and 4-byte elements, whole blocks in random order with a partial
last block, padding slots, and tokens whose chunk bytes are not 8-byte aligned."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import torch

from lmcache_pd.kernels import (
    PagedFormat,
    checksum,
    gather,
    gather_checksum,
    native,
    scatter_checksum,
    torch_path,
)
from lmcache_pd.layout import KVLayout

from .helpers import bits, make_caches, make_layout, ref_gather
from .native_checks import IMPLS, check_gather_scatter, native_library, run_impl

FMT = PagedFormat.CPU_VLLM
DTYPES = ("float8_e4m3fn", "bfloat16", "float32")  # 1, 2, 4 bytes


@pytest.fixture(scope="module")
def native_lib() -> native.NativeLib:
    return native_library()


def _slots(layout: KVLayout, num_blocks: int, whole: int, tail: int, pad: bool,
           gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """``whole`` blocks in random order, then ``tail`` tokens of another block."""
    n = layout.block_size
    order = torch.randperm(num_blocks, generator=gen)
    slots = (order[:whole, None] * n + torch.arange(n)).reshape(-1)
    slots = torch.cat([slots, order[whole] * n + torch.arange(tail)])
    if pad:
        slots[[3, -1]] = -1
    return slots


def _cases() -> Iterator[tuple[str, int, int, int, str, int, bool]]:
    """(dtype, heads, head_size, block_size, cache variant, tail tokens, padding)."""
    for dtype in DTYPES:
        yield dtype, 4, 32, 16, "shared", 5, False  # evenly spaced layers of one buffer
        yield dtype, 3, 24, 16, "plain", 0, False  # separate tensors, whole blocks only
        yield dtype, 2, 16, 8, "plain", 7, True  # partial block and padding slots
    yield "float8_e4m3fn", 1, 4, 16, "shared", 3, False  # 4-byte tokens: not 8-aligned
    yield "bfloat16", 2, 128, 32, "shared", 31, False
    # the K stage (32 KiB of whole tokens): 4 tokens a group, 24 + 8, and none (direct)
    yield "float32", 16, 128, 16, "shared", 2, False
    yield "bfloat16", 5, 128, 32, "plain", 9, False
    yield "float32", 33, 256, 16, "shared", 1, True
    # V rows of 384 bytes (48 words, hashed in registers across rows): some rows cross
    # a 512-word key period and take the general loop
    yield "bfloat16", 1, 192, 16, "shared", 3, False
    yield "bfloat16", 3, 192, 16, "plain", 5, True


@pytest.mark.parametrize("mode", ["cached", "streamed", "split"])
@pytest.mark.parametrize(("dtype", "heads", "head_size", "block_size", "variant", "tail", "pad"),
                         list(_cases()), ids=str)  # fmt: skip
def test_native_gather_scatter_match_reference_and_fallback(
    native_lib: native.NativeLib, dtype: str, heads: int, head_size: int, block_size: int,
    variant: str, tail: int, pad: bool, mode: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``mode``: ``streamed`` counts every chunk as large enough for the stores that
    bypass the cache; ``split`` for the block range split across 3 threads (the paths
    big chunks take)."""
    if mode == "streamed":
        monkeypatch.setattr(torch_path, "STREAM_BYTES", 0)
    if mode == "split":
        monkeypatch.setattr(torch_path, "PARALLEL_BYTES", 0)
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        try:
            _check_case(dtype, heads, head_size, block_size, variant, tail, pad)
        finally:
            torch.set_num_threads(threads)
        return
    _check_case(dtype, heads, head_size, block_size, variant, tail, pad)


def _check_case(
    dtype: str, heads: int, head_size: int, block_size: int, variant: str, tail: int, pad: bool
) -> None:
    layout = make_layout(3, heads, head_size, dtype, block_size, mla=False)
    gen = torch.Generator().manual_seed(heads * 1000 + head_size + tail)
    num_blocks = 7
    caches = make_caches(FMT, layout, num_blocks, gen, variant)
    slots = _slots(layout, num_blocks, 5, tail, pad, gen)
    check_gather_scatter(FMT, layout, caches, slots, gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_call_matches_fallback_on_many_blocks(
    native_lib: native.NativeLib, dtype: str
) -> None:
    """A llama-like page (8 heads x 128, block 16) over 40 blocks of 4 layers: the one
    native call and the torch fallback write identical chunks and caches."""
    layout = make_layout(4, 8, 128, dtype, 16, mla=False)
    gen = torch.Generator().manual_seed(3)
    caches = make_caches(FMT, layout, 48, gen, "shared")
    slots = _slots(layout, 48, 40, 9, False, gen)
    nbytes = slots.numel() * layout.bytes_per_token
    outs, digests, written = {}, {}, {}
    for impl in IMPLS:
        out = torch.empty(nbytes, dtype=torch.uint8)
        digests[impl] = run_impl(impl, lambda: gather_checksum(caches, slots, out, layout, FMT))  # noqa: B023
        outs[impl] = out
        fresh = [torch.zeros_like(c) for c in caches]
        back = run_impl(impl, lambda: scatter_checksum(out, fresh, slots, layout, FMT))  # noqa: B023
        assert back == digests[impl]
        written[impl] = fresh
    assert torch.equal(outs["native"], outs["fallback"])
    assert digests["native"] == digests["fallback"] == checksum.digest(outs["native"])
    for a, b in zip(written["native"], written["fallback"], strict=True):
        assert torch.equal(bits(a), bits(b))


def test_split_path_works_in_a_forked_child(
    native_lib: native.NativeLib, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper threads are started again in a child forked after the parent used
    them (a copied pool would wait forever for threads that do not exist there)."""
    monkeypatch.setattr(torch_path, "PARALLEL_BYTES", 0)
    layout = make_layout(2, 4, 32, "bfloat16", 16, mla=False)
    gen = torch.Generator().manual_seed(9)
    caches = make_caches(FMT, layout, 6, gen, "shared")
    slots = _slots(layout, 6, 4, 0, False, gen)
    want = bits(ref_gather(FMT, caches, slots.tolist(), layout)).reshape(-1).view(torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = torch.empty_like(want)
        gather(caches, slots, out, layout, FMT)  # the parent's pool exists now
        assert torch.equal(out, want)
        pid = os.fork()
        if pid == 0:  # child: exit code 0 only when the split gather is right
            # (no torch op big enough to go parallel here: torch's OpenMP threads do
            # not survive a fork either)
            ok = False
            try:
                fresh = torch.empty_like(want)
                gather(caches, slots, fresh, layout, FMT)
                ok = fresh.numpy().tobytes() == want.numpy().tobytes()
            finally:
                os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung in a split gather")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(threads)


def test_full_block_prefix_finds_only_aligned_whole_blocks() -> None:
    """The whole-block prefix the native call takes (computed with numpy for CPU slots):
    aligned runs of ``n`` only; a misaligned start, a gap, a swap or a repeat in the
    prefix gives 0; a tail shorter than a block is left out; strided slot views too."""
    n = 4
    cases = {
        (8, 9, 10, 11, 0, 1, 2, 3, 20): 8,
        (8, 9, 10, 11, 0, 1, 2, 3): 8,
        (0, 1, 2): 0,
        (1, 2, 3, 4): 0,  # consecutive but not aligned to a block
        (4, 5, 7, 6): 0,
        (4, 5, 6, 6): 0,
        (0, 1, 2, 3, 5, 6, 7, 8): 0,
    }
    for slots, want in cases.items():
        t = torch.tensor(slots, dtype=torch.int64)
        assert torch_path._full_block_prefix(t, n) == want, slots
        strided = torch.stack([t, torch.full_like(t, -7)], dim=1)[:, 0]
        assert not strided.is_contiguous()
        assert torch_path._full_block_prefix(strided, n) == want, slots
