"""The probed CPU page map against vLLM's own ``cpu_attn_reshape_and_cache`` (no engine).

vLLM's CPU backend stores K transposed inside a block (``vec`` ISA); a chunk that covers
part of a block must still come back bit-exact. Also: slot mappings and the lookup RPC.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmcache_pd.integration.vllm import cpu_paged
from lmcache_pd.integration.vllm.common import lookup_endpoint, slot_mapping
from lmcache_pd.integration.vllm.lookup import LookupClient, LookupServer
from lmcache_pd.kernels import PagedFormat, checksum
from lmcache_pd.layout import KVLayout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [32, 128])
def test_probe_gather_scatter_match_the_backend(dtype: torch.dtype, block_size: int) -> None:
    blocks, heads, d, layers = 6, 2, 32, 2
    isa = cpu_paged.backend_isa(dtype, block_size, d, "auto")
    caches = [torch.zeros(blocks, heads, block_size, 2 * d, dtype=dtype) for _ in range(layers)]
    pm = cpu_paged.probe_page_map(caches[0], isa)
    gen = torch.Generator().manual_seed(0)
    tokens = block_size + block_size // 2 + 3  # a partial block at the end
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    keys = [torch.randn(tokens, heads, d, generator=gen).to(dtype) for _ in range(layers)]
    vals = [torch.randn(tokens, heads, d, generator=gen).to(dtype) for _ in range(layers)]
    for cache, k, v in zip(caches, keys, vals, strict=True):
        cpu_paged._reshape_and_cache(k, v, cache, slots, isa, "auto")
    layout = KVLayout(
        num_layers=layers,
        num_kv_heads=heads,
        head_size=d,
        dtype=str(dtype).removeprefix("torch."),
        block_size=block_size,
    )
    out = torch.empty(layout.bytes_per_chunk(tokens), dtype=torch.uint8)
    cpu_paged.gather(caches, slots, out, layout, pm)
    chunk = out.view(dtype).view(layout.chunk_shape(tokens))
    for i in range(layers):
        assert torch.equal(chunk[i, 0], keys[i]) and torch.equal(chunk[i, 1], vals[i])
    fresh = [torch.zeros_like(c) for c in caches]
    padded = slots.clone()
    padded[-3:] = -1  # padding slots are skipped
    cpu_paged.scatter(out, fresh, padded, layout, pm)
    again = torch.empty_like(out)
    cpu_paged.gather(fresh, slots[:-3], again, layout, pm)
    n = (tokens - 3) * layout.bytes_per_token
    want = chunk[:, :, : tokens - 3].contiguous().view(torch.uint8).reshape(-1)
    assert torch.equal(again[:n], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vec_isa_map_is_the_kernels_cpu_vllm_format(dtype: torch.dtype) -> None:
    """The probe recognises the vec ISAs' pages as CPU_VLLM, so gather/scatter run the
    kernels' single implementation; the element map (other ISAs) moves the same bytes,
    and the checksum variants give the digest of the chunk bytes either way."""
    blocks, heads, d, layers, n = 6, 2, 32, 2, 32
    isa = cpu_paged.backend_isa(dtype, n, d, "auto")
    gen = torch.Generator().manual_seed(1)
    caches = [torch.randn(blocks, heads, n, 2 * d, generator=gen).to(dtype) for _ in range(2)]
    pm = cpu_paged.probe_page_map(caches[0], isa)
    if isa in ("vec", "vec16"):
        assert pm.fmt is PagedFormat.CPU_VLLM
    generic = dataclasses.replace(pm, fmt=None)
    layout = KVLayout(
        num_layers=layers,
        num_kv_heads=heads,
        head_size=d,
        dtype=str(dtype).removeprefix("torch."),
        block_size=n,
    )
    slots = torch.cat([torch.arange(3 * n, 4 * n), torch.arange(n, n + 5), torch.tensor([-1])])
    nbytes = layout.bytes_per_chunk(slots.numel())
    outs = []
    for m in (pm, generic):
        out = torch.empty(nbytes, dtype=torch.uint8)
        digest = cpu_paged.gather_checksum(caches, slots, out, layout, m)
        assert digest == checksum.reference_digest(out.numpy())
        fresh = [torch.zeros_like(c) for c in caches]
        assert cpu_paged.scatter_checksum(out, fresh, slots, layout, m) == digest
        outs.append((out, fresh))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_slot_mapping_marks_outside_tokens() -> None:
    slots = slot_mapping([7, 3], block_size=4, start=2, end=6, lo=0, hi=8)
    assert slots.tolist() == [-1, -1, 30, 31, 12, 13, -1, -1]


def test_lookup_rpc_roundtrip() -> None:
    held = {b"a" * 16, b"b" * 16}

    seen_tp: list[int] = []

    def longest_prefix(keys: list[bytes], source_tp: int) -> int:
        seen_tp.append(source_tp)
        return next((i for i, k in enumerate(keys) if k not in held), len(keys))

    endpoint = lookup_endpoint("test-engine-lookup", 0)
    server = LookupServer(endpoint, longest_prefix)
    client = LookupClient([endpoint], timeout_s=2.0)
    try:
        assert client.lookup([b"a" * 16, b"b" * 16, b"c" * 16]) == 2
        assert client.lookup([b"c" * 16, b"a" * 16]) == 0
        assert client.lookup([]) == 0
        assert client.lookup([b"a" * 16], source_tp=2) == 1
        assert seen_tp == [0, 0, 2]  # the prefiller's TP size reaches every rank
    finally:
        client.close()
        server.close()
