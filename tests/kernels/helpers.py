"""Test helpers for the paged-KV kernels: cache builders and a naive per-token reference.

The reference addresses every format by its documented meaning (indexing the tensor
exactly as the engine backend does), independently of ``kernels.geometry``'s strides.
"""

from __future__ import annotations

import torch

from lmcache_pd.kernels import PagedFormat, torch_dtype
from lmcache_pd.layout import AttentionKind, KVLayout

DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
INT_BY_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
KV_FORMATS = (
    PagedFormat.FLASH_ATTN,
    PagedFormat.FLASHINFER,
    PagedFormat.CPU_VLLM,
    PagedFormat.VLLM_4D,
)
# Formats with a CUDA kernel (CPU_VLLM is vLLM's CPU backend: torch path only).
CUDA_FORMATS = (
    PagedFormat.FLASH_ATTN,
    PagedFormat.FLASHINFER,
    PagedFormat.VLLM_4D,
    PagedFormat.MLA,
)


def make_layout(
    layers: int, heads: int, head_size: int, dtype: str, block_size: int, mla: bool
) -> KVLayout:
    return KVLayout(
        num_layers=layers,
        num_kv_heads=1 if mla else heads,
        head_size=head_size,
        dtype=dtype,
        block_size=block_size,
        attention=AttentionKind.MLA if mla else AttentionKind.KV_SPLIT,
        model="test",
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """Same-width integer view: compares bit patterns (NaN payloads included)."""
    return t.view(INT_BY_WIDTH[t.element_size()])


def random_like_bits(
    shape: tuple[int, ...], layout: KVLayout, gen: torch.Generator
) -> torch.Tensor:
    """A tensor of ``shape`` in the layout dtype filled with random bit patterns."""
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * layout.dtype_size), generator=gen)
    return raw.to(torch.uint8).view(torch_dtype(layout))


def make_caches(
    fmt: PagedFormat,
    layout: KVLayout,
    num_blocks: int,
    gen: torch.Generator,
    variant: str = "plain",
) -> list[torch.Tensor]:
    """Per-layer caches of ``fmt``. ``variant``: plain | permuted | shared (one buffer)."""
    n, h, d, nl = layout.block_size, layout.num_kv_heads, layout.head_size, layout.num_layers
    if fmt is PagedFormat.FLASH_ATTN:
        if variant == "permuted":  # physical [2, B, H, N, D] seen as [2, B, N, H, D]
            return [random_like_bits((2, num_blocks, h, n, d), layout, gen).transpose(2, 3)
                    for _ in range(nl)]  # fmt: skip
        shape: tuple[int, ...] = (2, num_blocks, n, h, d)
    elif fmt is PagedFormat.FLASHINFER:
        shape = (num_blocks, 2, n, h, d)
    elif fmt is PagedFormat.MLA:
        shape = (num_blocks, 1, n, d) if variant == "permuted" else (num_blocks, n, d)
    else:
        if fmt is PagedFormat.VLLM_4D and variant == "permuted":  # physical [B, N, H, 2D]
            return [random_like_bits((num_blocks, n, h, 2 * d), layout, gen).permute(0, 2, 1, 3)
                    for _ in range(nl)]  # fmt: skip
        shape = (num_blocks, h, n, 2 * d)
    if variant == "shared":
        return list(random_like_bits((nl, *shape), layout, gen).unbind(0))
    return [random_like_bits(shape, layout, gen) for _ in range(nl)]


def token_view(
    fmt: PagedFormat, t: torch.Tensor, layout: KVLayout, b: int, n: int, k: int
) -> torch.Tensor:
    """The ``[heads, head_size]`` KV of (block b, offset n, K/V k) in one layer tensor."""
    bs, d = layout.block_size, layout.head_size
    if fmt is PagedFormat.FLASH_ATTN:
        return t[k, b, n]
    if fmt is PagedFormat.FLASHINFER:
        return t[b, k, n]
    if fmt is PagedFormat.MLA:
        return (t[b, 0, n] if t.dim() == 4 else t[b, n]).unsqueeze(0)
    if fmt is PagedFormat.CPU_VLLM:
        # vLLM's CPU backend (vec ISAs): per (block, head) page, K as [D, N] then V [N, D]
        page = t.reshape(t.shape[0], t.shape[1], 2, bs * d)[b, :, k]  # [H, N*D]
        if k == 0:
            return page.reshape(-1, d, bs)[:, :, n]
        return page.reshape(-1, bs, d)[:, n]
    return t[b, :, n, k * d : (k + 1) * d]  # VLLM_4D


def ref_gather(
    fmt: PagedFormat, caches: list[torch.Tensor], slots: list[int], layout: KVLayout
) -> torch.Tensor:
    out = torch.zeros(layout.chunk_shape(len(slots)), dtype=torch_dtype(layout))
    for layer, t in enumerate(caches):
        for i, s in enumerate(slots):
            if s < 0:
                continue
            b, n = divmod(s, layout.block_size)
            for k in range(layout.kv_factor):
                bits(out[layer, k, i]).copy_(bits(token_view(fmt, t, layout, b, n, k)))
    return out


def ref_scatter(
    fmt: PagedFormat,
    chunk: torch.Tensor,
    caches: list[torch.Tensor],
    slots: list[int],
    layout: KVLayout,
) -> None:
    for layer, t in enumerate(caches):
        for i, s in enumerate(slots):
            if s < 0:
                continue
            b, n = divmod(s, layout.block_size)
            for k in range(layout.kv_factor):
                bits(token_view(fmt, t, layout, b, n, k)).copy_(bits(chunk[layer, k, i]))
