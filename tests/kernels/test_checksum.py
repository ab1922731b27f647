"""The chunk checksum (kvsum64): one digest for the same bytes whichever way it is
computed (numpy reference, native C, torch ops, fused into CPU gather/scatter, CUDA
kernels on a GPU), and the corruptions it exists to catch."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import numpy as np
import pytest
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
)

from .helpers import CUDA_FORMATS, KV_FORMATS, bits, make_caches, make_layout

ALL_FORMATS = (*KV_FORMATS, PagedFormat.MLA)


@pytest.fixture(params=["native", "fallback"])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on the native C helpers and again on the numpy/torch fallback."""
    if request.param == "native":
        try:
            native.compiler()
        except RuntimeError as exc:
            pytest.skip(f"no C compiler: {exc}")
        if native.library() is None:  # a compiler but no library: a real failure
            pytest.fail(f"native helpers did not build: {native.unavailable_reason()}")
        yield "native"
        return
    old = native.reset_for_tests(None, "disabled by the test")
    try:
        yield "fallback"
    finally:
        native.reset_for_tests(*old)


def test_known_answers() -> None:
    """Pinned digests: any change to the definition must be deliberate (peers and GPUs
    running another version would reject every chunk)."""
    assert checksum.reference_digest(b"") == 1
    assert checksum.reference_digest(b"lmcache-pd") == 0x1C8B13552C29709
    assert checksum.reference_digest(bytes(range(256)) * 33) == 0xF212B69A3AA79212
    assert int(checksum.KEY_TABLE[0]) == 0x864D9D168B83F985


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 4095, 4096 + 13, 65536 + 5, 300_001])
def test_implementations_agree(n: int, impl: str) -> None:
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    want = checksum.reference_digest(data)
    assert checksum.digest(data) == want
    assert checksum.digest(torch.from_numpy(data)) == want
    assert checksum.finish(checksum.torch_sum(torch.from_numpy(data)), n) == want
    dst = np.zeros_like(data)
    assert checksum.copy_digest(dst, data) == want
    assert np.array_equal(dst, data)


def test_parts_add_up_in_any_split(impl: str) -> None:
    data = np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8)
    want = checksum.reference_digest(data)
    for cuts in ([8], [4096, 4104], [8 * 511, 8 * 513, 40000]):
        edges = [0, *cuts, data.size]
        total = sum(checksum.partial_sum(data[a:b], a) for a, b in itertools.pairwise(edges))
        assert checksum.finish(total & checksum.MASK, data.size) == want
    with pytest.raises(ValueError, match="multiple of 8"):
        checksum.partial_sum(data[3:], 3)


@pytest.fixture
def split_small(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Native sums and copies split (3 threads) from 64 KiB, streamed from 128 KiB:
    the threaded paths at sizes a test can check against the numpy reference."""
    if native.library() is None:
        pytest.skip(f"native helpers unavailable: {native.unavailable_reason()}")
    monkeypatch.setattr(checksum, "PARALLEL_BYTES", 64 << 10)
    monkeypatch.setattr(checksum, "STREAM_BYTES", 128 << 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        yield 64 << 10
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("delta", [-8, 0, 5, 8, 4096 + 13, (64 << 10) + 3, (200 << 10) + 1])
@pytest.mark.parametrize("byte_offset", [0, 8, 8 * 517])
@pytest.mark.parametrize("misalign", [0, 8, 24])
def test_split_copy_sum_is_the_single_thread_sum(
    split_small: int, delta: int, byte_offset: int, misalign: int
) -> None:
    """copy_sum / partial_sum split across threads (and with stores that bypass the
    cache) give the single-call native result and the reference, at sizes around the
    threshold, chunk offsets that are not piece-aligned, and buffers not 64-byte aligned
    (no streamed stores then); the copy is bit-exact."""
    n = split_small + delta
    rng = np.random.default_rng(n + byte_offset + misalign)
    src_all = rng.integers(0, 256, n + misalign, dtype=np.uint8)
    dst_all = np.zeros(n + misalign + 64, dtype=np.uint8)
    src, dst = src_all[misalign:], dst_all[misalign : misalign + n]
    lib = native.library()
    assert lib is not None
    one = int(lib.sum(src.ctypes.data, n, byte_offset // 8, checksum.KEY_TABLE.ctypes.data))
    want = checksum.reference_sum(src, byte_offset)
    assert one == want
    assert checksum.copy_sum(dst, src, byte_offset) == want
    assert np.array_equal(dst, src)
    assert not dst_all[:misalign].any() and not dst_all[misalign + n :].any()
    assert checksum.partial_sum(src, byte_offset) == want
    assert checksum.copy_digest(dst, src) == checksum.reference_digest(src)
    dst_all[:] = 0
    checksum.copy_plain(dst, src)  # the same copy without the hash (bench baseline)
    assert np.array_equal(dst, src)
    assert not dst_all[:misalign].any() and not dst_all[misalign + n :].any()


def test_copy_sum_at_the_real_thresholds() -> None:
    """Unpatched: a copy just past PARALLEL_BYTES and one past STREAM_BYTES (odd sizes:
    a tail word) equal the numpy reference, bit-exact copies, with the hash and without
    (``copy_plain``)."""
    if native.library() is None:
        pytest.skip(f"native helpers unavailable: {native.unavailable_reason()}")
    for n in (checksum.PARALLEL_BYTES + 13, checksum.STREAM_BYTES + 4096 + 5):
        src = torch.randint(
            0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)
        )
        dst = torch.empty_like(src)
        assert checksum.copy_sum(dst, src, 8) == checksum.reference_sum(src, 8)
        assert torch.equal(dst, src)
        dst.zero_()
        checksum.copy_plain(dst, src)
        assert torch.equal(dst, src)


def _corruptions(data: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    for pos in (0, 1, 4095, 4096, 30000, data.size - 1):
        for bit in (0, 7):
            bad = data.copy()
            bad[pos] ^= 1 << bit
            yield f"flip byte {pos} bit {bit}", bad
    pages = data.reshape(-1, 4096)
    swapped = pages.copy()
    swapped[[1, 5]] = pages[[5, 1]]
    yield "swapped 4 KiB pages", swapped.reshape(-1)
    far = pages.copy()
    far[[0, 8]] = pages[[8, 0]]  # 32 KiB apart: the key table's period
    yield "swapped pages a key period apart", far.reshape(-1)
    zeroed = data.copy()
    zeroed[8192:12288] = 0
    yield "zeroed page", zeroed
    words = data.view(np.uint64).copy()
    words[[10, 11]] = words[[11, 10]]
    yield "swapped adjacent words", words.view(np.uint8)
    yield "truncated by a word", data[:-8]
    yield "extended by zeros", np.concatenate([data, np.zeros(8, np.uint8)])


def test_detects_accidental_corruption() -> None:
    data = np.random.default_rng(2).integers(0, 256, 64 * 1024, dtype=np.uint8)
    good = checksum.digest(data)
    for what, bad in _corruptions(data):
        assert checksum.digest(bad) != good, what
    zeros = np.zeros(64 * 1024, np.uint8)
    assert checksum.digest(zeros) != checksum.digest(zeros[:-8])


def test_native_constants_match_the_definition() -> None:
    assert native.K_SEG == checksum.K_SEG
    src = cuda_kernels.CUDA_SOURCE
    k_seg = re.search(r"#define KVSUM_K_SEG 0x([0-9A-Fa-f]+)ULL", src)
    mask = re.search(r"#define KVSUM_MASK (\d+)ULL", src)
    log_p = re.search(r"#define KVSUM_LOG_PERIOD (\d+)", src)
    slots = re.search(r"#define KVSUM_SLOTS (\d+)", src)
    assert k_seg and mask and log_p and slots
    assert int(k_seg.group(1), 16) == checksum.K_SEG
    assert int(mask.group(1)) == checksum.PERIOD - 1
    assert 1 << int(log_p.group(1)) == checksum.PERIOD
    assert int(slots.group(1)) == cuda_kernels.SUM_SLOTS


def _case(fmt: PagedFormat, dtype: str, block_size: int, seed: int):  # type: ignore[no-untyped-def]
    layout = make_layout(3, 4, 32, dtype, block_size, mla=fmt is PagedFormat.MLA)
    gen = torch.Generator().manual_seed(seed)
    caches = make_caches(fmt, layout, 8, gen, "shared")
    return layout, caches, gen


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_fused_gather_scatter_digest_is_the_chunk_digest(
    fmt: PagedFormat, dtype: str, impl: str
) -> None:
    """Whole blocks in random order, then a partial block, then padding: the digest from
    the fused pass equals the reference digest of the bytes, and the bytes equal a plain
    gather's; scatter_checksum reads back the same digest and writes the same KV."""
    for block_size, pad in ((16, False), (16, True), (8, False)):
        layout, caches, gen = _case(fmt, dtype, block_size, block_size + pad)
        order = torch.randperm(8, generator=gen)[:5]
        slots = (order[:, None] * block_size + torch.arange(block_size)).reshape(-1)
        slots = torch.cat([slots, torch.tensor([7 * block_size + 3, 2])])
        if pad:
            slots[[0, -1]] = -1
        nbytes = slots.numel() * layout.bytes_per_token
        out = torch.empty(nbytes, dtype=torch.uint8)
        ref = torch.empty_like(out)
        got = gather_checksum(caches, slots, out, layout, fmt)
        gather(caches, slots, ref, layout, fmt)
        assert torch.equal(out, ref)
        assert got == checksum.reference_digest(ref.numpy()), (block_size, pad)
        fresh = [torch.zeros_like(c) for c in caches]
        plain = [torch.zeros_like(c) for c in caches]
        assert scatter_checksum(out, fresh, slots, layout, fmt) == got
        scatter(out, plain, slots, layout, fmt)
        for a, b in zip(fresh, plain, strict=True):
            assert torch.equal(bits(a), bits(b))


def test_scatter_checksum_sees_a_corrupted_chunk() -> None:
    layout, caches, _ = _case(PagedFormat.FLASH_ATTN, "bfloat16", 16, 0)
    slots = torch.arange(64)
    out = torch.empty(64 * layout.bytes_per_token, dtype=torch.uint8)
    sent = gather_checksum(caches, slots, out, layout)
    out[1000] ^= 0x10
    fresh = [torch.zeros_like(c) for c in caches]
    assert scatter_checksum(out, fresh, slots, layout) != sent


def test_cpu_vllm_native_and_torch_paths_move_the_same_bytes() -> None:
    layout, caches, gen = _case(PagedFormat.CPU_VLLM, "bfloat16", 16, 5)
    slots = torch.randperm(8 * 16, generator=gen)[:40]
    slots[:32] = (torch.tensor([6, 1])[:, None] * 16 + torch.arange(16)).reshape(-1)
    out = {}
    for name in ("native", "fallback"):
        old = None if name == "native" else native.reset_for_tests(None, "test")
        try:
            buf = torch.empty(40 * layout.bytes_per_token, dtype=torch.uint8)
            gather(caches, slots, buf, layout, PagedFormat.CPU_VLLM)
            fresh = [torch.zeros_like(c) for c in caches]
            scatter(buf, fresh, slots, layout, PagedFormat.CPU_VLLM)
            out[name] = (buf, fresh)
        finally:
            if old is not None:
                native.reset_for_tests(*old)
    assert torch.equal(out["native"][0], out["fallback"][0])
    for a, b in zip(out["native"][1], out["fallback"][1], strict=True):
        assert torch.equal(bits(a), bits(b))


needs_gpu = pytest.mark.skipif(
    cuda_kernels.unavailable_reason() is not None,
    reason=f"no CUDA kernels here: {cuda_kernels.unavailable_reason()}",
)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", CUDA_FORMATS, ids=lambda f: f.name)
def test_gpu_kernels_compute_the_cpu_digest(fmt: PagedFormat) -> None:
    """The CUDA kernels' in-launch sum gives the digest the CPU computes for the same
    bytes (padding and past-the-cache slots included), gather and scatter alike."""
    for dtype in ("float32", "bfloat16", "float8_e5m2"):
        layout, host, gen = _case(fmt, dtype, 16, 11)
        caches = [c.cuda() for c in host]
        slots = torch.randperm(8 * 16, generator=gen)[:70]
        slots[::9] = -1
        slots[4] = 8 * 16 + 3
        slots = slots.cuda()
        out = torch.empty(70 * layout.bytes_per_token, dtype=torch.uint8, device="cuda")
        got = gather_checksum(caches, slots, out, layout, fmt, backend="cuda")
        cpu = out.cpu()
        assert got == checksum.reference_digest(cpu.numpy()) == checksum.digest(out)
        fresh = [torch.zeros_like(c) for c in caches]
        assert scatter_checksum(out, fresh, slots, layout, fmt, backend="cuda") == got
        out[5] ^= 1
        assert scatter_checksum(out, fresh, slots, layout, fmt, backend="cuda") != got
