"""The CUDA source compiles through NVRTC without a GPU; on a GPU it matches the torch path.

NVRTC tests skip (with the reason) only where cuda-python or libnvrtc cannot be loaded;
install ``.[cuda]`` (or ``.[dev]``, which includes them) to run them. GPU tests are
marked ``gpu`` and skip where torch sees no CUDA device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcache_pd import kernel_check as check_cli
from lmcache_pd.kernels import PagedFormat, cuda_kernels, gather, scatter

from .helpers import CUDA_FORMATS, DTYPES, bits, make_caches, make_layout


def _nvrtc_reason() -> str | None:
    try:
        cuda_kernels.nvrtc_version()
    except Exception as exc:  # ImportError, or libnvrtc not found
        return f"cuda-python/NVRTC unavailable: {exc}"
    return None


needs_nvrtc = pytest.mark.skipif(_nvrtc_reason() is not None, reason=str(_nvrtc_reason()))
needs_gpu = pytest.mark.skipif(
    cuda_kernels.unavailable_reason() is not None,
    reason=f"no CUDA kernels here: {cuda_kernels.unavailable_reason()}",
)


@needs_nvrtc
@pytest.mark.parametrize("arch,cubin", [("sm_80", True), ("sm_90", True), ("compute_80", False)])
def test_source_compiles(arch: str, cubin: bool) -> None:
    binary = cuda_kernels.compile_source(arch, cubin)
    for name in cuda_kernels.kernel_names():
        assert name.encode() in binary, name
    if not cubin:
        assert b"ld.global.nc.v4.u32" in binary, "16-byte vector loads expected in gather_v16"


@needs_nvrtc
def test_compile_error_is_reported() -> None:
    with pytest.raises(cuda_kernels.KernelCompileError, match="sm_1"):
        cuda_kernels.compile_source("sm_1")


@needs_nvrtc
def test_disk_cache_keyed_by_source_and_arch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMCACHE_PD_KERNEL_CACHE", str(tmp_path))
    first = cuda_kernels.load_binary("sm_90")
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [cuda_kernels.cache_key("sm_90", True)]
    assert "sm_90" in files[0].name and files[0].read_bytes() == first

    def no_compile(*_: object) -> bytes:
        raise AssertionError("cache miss: recompiled")

    monkeypatch.setattr(cuda_kernels, "compile_source", no_compile)
    assert cuda_kernels.load_binary("sm_90") == first
    assert cuda_kernels.cache_key("sm_80", True) != cuda_kernels.cache_key("sm_90", True)
    monkeypatch.setattr(cuda_kernels, "CUDA_SOURCE", cuda_kernels.CUDA_SOURCE + "// edit\n")
    assert cuda_kernels.cache_key("sm_90", True) != files[0].name


@needs_nvrtc
def test_target_for_falls_back_to_ptx() -> None:
    assert cuda_kernels.target_for(90) == ("sm_90", True)
    arch, cubin = cuda_kernels.target_for(999)
    assert arch.startswith("compute_") and not cubin


def test_vector_width() -> None:
    assert cuda_kernels.vector_width([4096, 256, 1 << 20]) == 16
    assert cuda_kernels.vector_width([4096, 24]) == 8
    assert cuda_kernels.vector_width([2, 4096]) == 2
    assert cuda_kernels.vector_width([4097]) == 1


@pytest.mark.parametrize("fmt", [PagedFormat.FLASH_ATTN, PagedFormat.MLA], ids=lambda f: f.name)
@pytest.mark.parametrize("tokens", [1, 7, 256, 1000])
def test_launch_shape_covers_every_token(fmt: PagedFormat, tokens: int) -> None:
    from lmcache_pd.kernels.geometry import validate_caches

    layout = make_layout(2, 8, 128, "bfloat16", 16, mla=fmt is PagedFormat.MLA)
    if fmt is PagedFormat.MLA:
        layout = make_layout(2, 1, 576, "bfloat16", 16, mla=True)
    caches = make_caches(fmt, layout, 2, torch.Generator())
    _, geom = validate_caches(caches, layout, fmt)
    chunk = torch.empty(tokens * layout.bytes_per_token, dtype=torch.uint8)
    p = cuda_kernels.launch_params(caches, geom, tokens, chunk)
    gx, gy, _ = p.grid
    bx, by, _ = p.block
    assert gy == 2 and bx % 32 == 0 and bx * by <= 512
    assert (gx - 1) * by < tokens <= gx * by  # every token once, no empty block
    assert p.row_bytes % p.width == 0


def test_auto_backend_falls_back_once_when_kernels_fail_to_load(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def broken(device: int) -> None:
        calls.append(device)
        raise OSError("libnvrtc.so.12: cannot open shared object file")

    monkeypatch.setattr(cuda_kernels, "available", lambda: True)
    monkeypatch.setattr(cuda_kernels, "_DeviceKernels", broken)
    monkeypatch.setattr(cuda_kernels, "_FAILED", {})
    monkeypatch.setattr(cuda_kernels, "_DEVICES", {})
    with caplog.at_level("WARNING"):
        assert not cuda_kernels.ready(0)
        assert not cuda_kernels.ready(0)
    assert calls == [0]
    assert "libnvrtc" in caplog.text and "using the torch path" in caplog.text


def test_check_cli_compiles_or_skips(capsys: pytest.CaptureFixture[str]) -> None:
    rc = check_cli.main(["--arch", "sm_90"])
    out = capsys.readouterr().out
    if _nvrtc_reason() is None:
        assert rc == 0 and f"ok   sm_90: {len(cuda_kernels.kernel_names())} kernels" in out
    else:
        assert "skipped" in out or "FAIL" in out


def test_check_cli_without_cuda_python_skips(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing() -> None:
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(cuda_kernels, "_bindings", missing)
    assert check_cli.main([]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "pip install 'lmcache-pd[cuda]'" in out
    assert "cuda-python is not installed" in str(cuda_kernels.unavailable_reason())


@needs_nvrtc
def test_cli_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "LMCACHE_PD_KERNEL_CACHE": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-m", "lmcache_pd.cli", "check", "kernels", "--arch", "sm_90"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok   sm_90" in res.stdout


@needs_nvrtc
def test_check_cli_fails_on_compile_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_cli.main(["--arch", "sm_1"]) == 1
    assert "FAIL sm_1" in capsys.readouterr().out


def _gpu_case(fmt: PagedFormat, dtype: str, variant: str, block_size: int) -> None:
    layout = make_layout(3, 4, 64, dtype, block_size, mla=fmt is PagedFormat.MLA)
    gen = torch.Generator().manual_seed(block_size)
    blocks = 6
    host = make_caches(fmt, layout, blocks, gen, variant)
    if variant == "shared":
        caches = list(torch.stack(host).cuda().unbind(0))
    else:
        caches = [c.cuda() for c in host]
    total = blocks * block_size
    slots = torch.randperm(total, generator=gen)[: total // 2]
    slots[::7] = -1
    slots[3] = total + 5  # past the cache: padding for the kernel
    slots = slots.cuda()
    nbytes = slots.numel() * layout.bytes_per_token
    got = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    gather(caches, slots, got, layout, fmt, backend="cuda")
    valid = torch.where(slots >= total, -1, slots)
    want = torch.empty_like(got)
    gather(caches, valid, want, layout, fmt, backend="torch")
    assert torch.equal(got, want), (fmt, dtype, variant, block_size)
    fresh = [torch.zeros_like(c) for c in caches]
    ref = [torch.zeros_like(c) for c in caches]
    scatter(got, fresh, slots, layout, fmt, backend="cuda")
    scatter(got, ref, valid, layout, fmt, backend="torch")
    for a, b in zip(fresh, ref, strict=True):
        assert torch.equal(bits(a), bits(b)), (fmt, dtype, variant, block_size)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", CUDA_FORMATS, ids=lambda f: f.name)
def test_gpu_kernels_match_torch_path(fmt: PagedFormat) -> None:
    variants = ["plain", "shared"]
    if fmt in (PagedFormat.FLASH_ATTN, PagedFormat.VLLM_4D, PagedFormat.MLA):
        variants.append("permuted")
    for dtype in DTYPES:
        for variant in variants:
            for block_size in (16, 128):
                _gpu_case(fmt, dtype, variant, block_size)


@pytest.mark.gpu
@needs_gpu
def test_gpu_check_cli_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_cli.main(["--arch", "sm_90", "--tokens", "512", "--iters", "3"]) == 0
    assert "round trip" in capsys.readouterr().out


def _emulate(op: str, layers: list[torch.Tensor], layout, fmt, slots: torch.Tensor, chunk) -> None:
    """Run the CUDA kernel's address arithmetic on CPU tensors, byte by byte."""
    from lmcache_pd.kernels.geometry import validate_caches

    _, geom = validate_caches(layers, layout, fmt)
    p = cuda_kernels.launch_params(layers, geom, slots.numel(), chunk)
    w, units = p.width, p.row_bytes // p.width
    t = torch.arange(p.tokens)[:, None, None, None]
    k = torch.arange(p.kv_factor)[None, :, None, None]
    h = torch.arange(p.rows)[None, None, :, None]
    u = torch.arange(units)[None, None, None, :]
    slot = slots[:, None, None, None]
    valid = (slot >= 0) & (slot < p.num_slots)
    base = torch.where(valid, (slot // p.block_size) * p.stride_b, 0)
    base = base + torch.where(valid, (slot % p.block_size) * p.stride_n, 0)
    cache_off = base + k * p.stride_k + h * p.stride_h + u * w
    byte = torch.arange(w)
    chunk_bytes = chunk.reshape(-1).view(torch.uint8)
    es = layers[0].element_size()
    for layer, tensor in enumerate(layers):
        start = tensor.storage_offset() * es
        assert (tensor.data_ptr() + cache_off[valid.expand_as(cache_off)]).remainder(w).eq(0).all()
        store = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())[start:]
        chunk_off = ((layer * p.kv_factor + k) * p.tokens + t) * p.rows * p.row_bytes
        chunk_off = (chunk_off + h * p.row_bytes + u * w).expand_as(cache_off)
        vmask = valid.expand_as(cache_off)
        src = (cache_off[..., None] + byte).reshape(-1)
        dst = (chunk_off[..., None] + byte).reshape(-1)
        m = vmask[..., None].expand(*vmask.shape, w).reshape(-1)
        if op == "gather":
            chunk_bytes[dst] = torch.where(m, store[src.clamp_min(0) * m], 0)
        else:
            store[src[m]] = chunk_bytes[dst[m]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e5m2"])
@pytest.mark.parametrize("fmt", CUDA_FORMATS, ids=lambda f: f.name)
def test_kernel_address_math_matches_torch_path(fmt: PagedFormat, dtype: str) -> None:
    """The launch arguments drive the kernel's formulas to the torch path's result."""
    for variant in ("plain", "shared", "permuted"):
        if variant == "permuted" and fmt is PagedFormat.FLASHINFER:
            continue
        layout = make_layout(2, 3, 16, dtype, 16, mla=fmt is PagedFormat.MLA)
        gen = torch.Generator().manual_seed(3)
        caches = make_caches(fmt, layout, 4, gen, variant)
        slots = torch.tensor([5, 63, -1, 16, 64, 0, 33, 200])  # 64, 200: past the cache
        got = torch.full((8 * layout.bytes_per_token,), 0x55, dtype=torch.uint8)
        _emulate("gather", caches, layout, fmt, slots, got)
        want = torch.empty_like(got)
        valid = torch.where(slots >= 64, -1, slots)
        gather(caches, valid, want, layout, fmt)
        assert torch.equal(got, want), variant
        fresh = [torch.zeros_like(c) for c in caches]
        ref = [torch.zeros_like(c) for c in caches]
        _emulate("scatter", fresh, layout, fmt, slots, got)
        scatter(got, ref, valid, layout, fmt)
        for a, b in zip(fresh, ref, strict=True):
            assert torch.equal(bits(a), bits(b)), variant


@pytest.mark.gpu
@needs_gpu
def test_gpu_launch_from_worker_thread() -> None:
    """Connectors gather on their own threads: the kernel must launch there too."""
    import threading

    layout = make_layout(2, 2, 64, "float16", 16, mla=False)
    caches = [c.cuda() for c in make_caches(PagedFormat.FLASH_ATTN, layout, 4, torch.Generator())]
    slots = torch.arange(40, device="cuda")
    results: dict[str, torch.Tensor] = {}

    def work() -> None:
        out = torch.empty(40 * layout.bytes_per_token, dtype=torch.uint8, device="cuda")
        results["cuda"] = gather(caches, slots, out, layout, backend="cuda")
        torch.cuda.synchronize()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    want = gather(caches, slots, torch.empty_like(results["cuda"]), layout, backend="torch")
    assert torch.equal(bits(results["cuda"]), bits(want))
