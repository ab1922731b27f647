"""Gather/scatter for vLLM's CPU attention backend, whose pages are ISA-specific.

vLLM's CPU backend keeps each layer as ``[num_blocks, kv_heads, block_size,
2*head_size]`` but the bytes inside a block depend on the attention ISA it picked: with
the ``vec`` ISA (fp32 on x86 without AMX) K is stored **transposed** (``[head_size,
block_size]`` per head) and V as ``[block_size, head_size]``; AMX/bf16 packs again
differently. Assuming ``[block_size, head_size]`` for K copies a whole block correctly
but scrambles any partial block, so the KV of a chunk that does not cover whole blocks
comes back wrong.

So we do not assume: at ``register_kv_caches`` we run the backend's own
``cpu_attn_reshape_and_cache`` on a scratch block with digit-encoded values and read
back where each (K|V, token, head, dim) element lands. When that map is the
``CPU_VLLM`` page format (the ``vec``/``vec16`` ISAs: K ``[D, N]``, V ``[N, D]`` per
block and head), gather and scatter are the kernels' single implementation of that
format (:mod:`lmcache_pd.kernels`, native tiled transposes for K, checksums fused).
Any other map (AMX and other packed ISAs) is copied through the probed element map
with index_select / index_copy (bit-exact, slower), with one warning.
Chunks keep lmcache-pd's chunk format ``[layers, 2, tokens, kv_heads, head_size]``,
so a CPU decoder and a GPU prefiller exchange the same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmcache_pd.kernels import PagedFormat, checksum
from lmcache_pd.kernels import gather as kernel_gather
from lmcache_pd.kernels import gather_checksum as kernel_gather_checksum
from lmcache_pd.kernels import scatter as kernel_scatter
from lmcache_pd.kernels import scatter_checksum as kernel_scatter_checksum
from lmcache_pd.layout import KVLayout

log = logging.getLogger("lmcache_pd.vllm")

_INT_BY_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
_DIGIT_BITS = 4  # digits 1..16 are exact in fp8 e4m3, fp16, bf16 and fp32


@dataclass(frozen=True)
class PageMap:
    """Element offsets, inside one block of one layer, of each token's K and V."""

    block_size: int
    block_stride: int  # elements between consecutive blocks of a layer tensor
    block_elems: int  # elements of one block (kv_heads * block_size * 2 * head_size)
    k_pos: torch.Tensor  # int64 [block_size, kv_heads * head_size]
    v_pos: torch.Tensor  # int64 [block_size, kv_heads * head_size]
    isa: str
    fmt: PagedFormat | None = None  # CPU_VLLM when the map is that format, else None


def _reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    isa: str,
    cache_dtype: str,
) -> None:
    from vllm import _custom_ops as ops

    b, h, n, _ = cache.shape
    view = cache.view((b, h, n * 2, -1))
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        key,
        value,
        key_cache,
        value_cache,
        slots,
        isa,
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype=cache_dtype,
    )


def probe_page_map(
    layer: torch.Tensor, isa: str, cache_dtype: str = "auto", model_dtype: torch.dtype | None = None
) -> PageMap:
    """Learn where the backend's ``reshape_and_cache`` puts each element of a block.

    ``layer`` is one real layer tensor (only its shape, dtype and strides are used).
    Raises ``ValueError`` if an element lands outside its block or twice.
    """
    _, heads, n, two_d = layer.shape
    d = two_d // 2
    if not layer[0].is_contiguous():
        raise ValueError(f"CPU KV layer with strides {layer.stride()}: blocks not contiguous")
    src_dtype = model_dtype or layer.dtype
    elems = heads * n * two_d
    count = 2 * n * heads * d  # K and V elements of one block
    ids = torch.arange(count, dtype=torch.int64).view(2, n, heads, d)
    digits = max(1, (count - 1).bit_length() + _DIGIT_BITS - 1) // _DIGIT_BITS
    found = torch.zeros(elems, dtype=torch.int64)
    written = torch.zeros(elems, dtype=torch.bool)
    slots = torch.arange(n, 2 * n, dtype=torch.int64)  # block 1 of a 2-block scratch
    for k in range(digits):
        digit = ((ids >> (_DIGIT_BITS * k)) & ((1 << _DIGIT_BITS) - 1)) + 1  # 1..16
        vals = digit.to(torch.float32).to(src_dtype)
        cache = torch.zeros((2, heads, n, two_d), dtype=layer.dtype)
        _reshape_and_cache(vals[0].clone(), vals[1].clone(), cache, slots, isa, cache_dtype)
        if bool(cache[0].view(-1).to(torch.float32).ne(0).any()):
            raise ValueError("probe wrote outside its block: unsupported CPU KV layout")
        got = cache[1].reshape(-1).to(torch.float32).round().to(torch.int64)
        written |= got > 0
        found += (got - 1).clamp(min=0) << (_DIGIT_BITS * k)
    pos = torch.full((count,), -1, dtype=torch.int64)
    where = written.nonzero().flatten()
    idx = found[where]
    if bool((idx >= count).any()) or where.numel() != count:
        raise ValueError(
            f"CPU KV layout probe ({isa}): {where.numel()} of {count} elements located; "
            "unsupported layout"
        )
    pos[idx] = where
    if bool((pos < 0).any()):
        raise ValueError(f"CPU KV layout probe ({isa}): some elements were not written")
    pos = pos.view(2, n, heads * d)
    fmt = PagedFormat.CPU_VLLM if _is_cpu_vllm(pos, heads, n, d) else None
    if fmt is None:
        log.warning(
            "vLLM CPU attention ISA %s packs KV blocks in a layout other than CPU_VLLM; "
            "using the probed element map (bit-exact, slower than the page copy)",
            isa,
        )
    return PageMap(
        block_size=n,
        block_stride=int(layer.stride(0)),
        block_elems=elems,
        k_pos=pos[0].contiguous(),
        v_pos=pos[1].contiguous(),
        isa=isa,
        fmt=fmt,
    )


def _is_cpu_vllm(pos: torch.Tensor, heads: int, n: int, d: int) -> bool:
    """Whether a probed ``[2, N, H*D]`` element map is the CPU_VLLM page format."""
    tok = torch.arange(n, dtype=torch.int64)[:, None, None]
    head = torch.arange(heads, dtype=torch.int64)[None, :, None]
    dim = torch.arange(d, dtype=torch.int64)[None, None, :]
    page = head * (2 * n * d)
    k = (page + dim * n + tok).reshape(n, heads * d)
    v = (page + n * d + tok * d + dim).reshape(n, heads * d)
    return bool(torch.equal(pos[0], k) and torch.equal(pos[1], v))


def _flat(layer: torch.Tensor, pm: PageMap) -> torch.Tensor:
    ti = layer.view(_INT_BY_WIDTH[layer.element_size()])
    extent = (layer.shape[0] - 1) * pm.block_stride + pm.block_elems
    return torch.as_strided(ti, (extent,), (1,), ti.storage_offset())


def _indices(pm: PageMap, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.div(slots, pm.block_size, rounding_mode="floor")
    offs = slots - blocks * pm.block_size
    base = (blocks * pm.block_stride)[:, None]
    return (base + pm.k_pos[offs]).reshape(-1), (base + pm.v_pos[offs]).reshape(-1)


def _chunk_view(
    buf: torch.Tensor, layout: KVLayout, tokens: int, dtype: torch.dtype
) -> torch.Tensor:
    need = tokens * layout.bytes_per_token
    flat = buf.view(torch.uint8).reshape(-1)
    if flat.numel() < need:
        raise ValueError(f"chunk buffer of {flat.numel()} bytes; {tokens} tokens need {need}")
    width = torch.empty((), dtype=dtype).element_size()
    return flat[:need].view(_INT_BY_WIDTH[width]).view(layout.chunk_shape(tokens))


def gather(
    layers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    out: torch.Tensor,
    layout: KVLayout,
    pm: PageMap,
) -> None:
    """Copy the KV of ``slots`` (all layers) into ``out`` (chunk format; negative slots
    give zeros)."""
    slots = slots.to(torch.int64)
    if pm.fmt is not None:
        kernel_gather(list(layers), slots, out, layout, pm.fmt)
        return
    chunk = _chunk_view(out, layout, slots.numel(), layers[0].dtype)
    keep = slots >= 0
    all_kept = bool(keep.all())
    k_idx, v_idx = _indices(pm, slots.clamp(min=0))
    for i, layer in enumerate(layers):
        flat = _flat(layer, pm)
        chunk[i, 0].view(-1).copy_(flat.index_select(0, k_idx))
        chunk[i, 1].view(-1).copy_(flat.index_select(0, v_idx))
    if not all_kept:
        chunk[:, :, ~keep] = 0


def scatter(
    chunk_buf: torch.Tensor,
    layers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    layout: KVLayout,
    pm: PageMap,
) -> None:
    """Copy a chunk into the paged KV at ``slots``; negative slots are skipped."""
    slots = slots.to(torch.int64)
    if pm.fmt is not None:
        kernel_scatter(chunk_buf, list(layers), slots, layout, pm.fmt)
        return
    chunk = _chunk_view(chunk_buf, layout, slots.numel(), layers[0].dtype)
    keep = slots >= 0
    if not bool(keep.any()):
        return
    k_idx, v_idx = _indices(pm, slots[keep])
    for i, layer in enumerate(layers):
        flat = _flat(layer, pm)
        flat.index_copy_(0, k_idx, chunk[i, 0][keep].reshape(-1))
        flat.index_copy_(0, v_idx, chunk[i, 1][keep].reshape(-1))


def gather_checksum(
    layers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    out: torch.Tensor,
    layout: KVLayout,
    pm: PageMap,
) -> int:
    """:func:`gather` returning the chunk's checksum (fused for CPU_VLLM; a pass over
    the written bytes for other maps)."""
    slots = slots.to(torch.int64)
    if pm.fmt is not None:
        return kernel_gather_checksum(list(layers), slots, out, layout, pm.fmt)
    gather(layers, slots, out, layout, pm)
    return checksum.digest(out.view(torch.uint8).reshape(-1)[: _nbytes(layout, slots)])


def scatter_checksum(
    chunk_buf: torch.Tensor,
    layers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    layout: KVLayout,
    pm: PageMap,
) -> int:
    """:func:`scatter` returning the checksum of the chunk bytes it read; compare it
    with the sender's before trusting the loaded KV."""
    slots = slots.to(torch.int64)
    if pm.fmt is not None:
        return kernel_scatter_checksum(chunk_buf, list(layers), slots, layout, pm.fmt)
    scatter(chunk_buf, layers, slots, layout, pm)
    return checksum.digest(chunk_buf.view(torch.uint8).reshape(-1)[: _nbytes(layout, slots)])


def _nbytes(layout: KVLayout, slots: torch.Tensor) -> int:
    return slots.numel() * layout.bytes_per_token


def backend_isa(model_dtype: torch.dtype, block_size: int, head_size: int, cache_dtype: str) -> str:
    """The ISA vLLM's CPU attention backend picks for these settings."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(model_dtype, block_size, head_size, cache_dtype)
