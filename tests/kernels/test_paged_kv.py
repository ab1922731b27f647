"""Round trips of the torch path against a naive reference, for every format x dtype.

Hypothesis draws small layouts, block sizes 16 and 128, cache variants (plain, permuted
HND views, all layers views of one buffer) and slot mappings (whole blocks in random
order with a partial tail, or random unique slots, optionally with padding slots).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_pd.kernels import PagedFormat, gather, scatter, torch_dtype

from .helpers import DTYPES, KV_FORMATS, bits, make_caches, make_layout, ref_gather, ref_scatter

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


ALL_FORMATS = [*KV_FORMATS, PagedFormat.MLA]


@st.composite
def cases(
    draw: st.DrawFn,
    fmt: PagedFormat | None = None,
    dtype: str | None = None,
    block_size: int | None = None,
) -> dict[str, object]:
    fmt = fmt or draw(st.sampled_from(ALL_FORMATS))
    layout = make_layout(
        layers=draw(st.integers(1, 3)),
        heads=draw(st.integers(1, 3)),
        head_size=draw(st.sampled_from([4, 8, 16, 24])),
        dtype=dtype or draw(st.sampled_from(DTYPES)),
        block_size=block_size or draw(st.sampled_from([16, 128])),
        mla=fmt is PagedFormat.MLA,
    )
    num_blocks = draw(st.integers(1, 5))
    total = num_blocks * layout.block_size
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mode = draw(st.sampled_from(["blocks", "random"]))
    if mode == "blocks":
        order = torch.randperm(num_blocks, generator=gen)
        offs = torch.arange(layout.block_size)
        slots = (order[:, None] * layout.block_size + offs).reshape(-1).tolist()
        slots = slots[: draw(st.integers(0, total))]
    else:
        count = draw(st.integers(0, min(total, 300)))
        slots = torch.randperm(total, generator=gen)[:count].tolist()
    if slots and draw(st.booleans()):
        for i in draw(st.lists(st.integers(0, len(slots) - 1), max_size=4)):
            slots[i] = -1
    variants = ["plain", "shared"]
    if fmt in (PagedFormat.FLASH_ATTN, PagedFormat.VLLM_4D, PagedFormat.MLA):
        variants.append("permuted")
    return {
        "fmt": fmt,
        "layout": layout,
        "caches": make_caches(fmt, layout, num_blocks, gen, draw(st.sampled_from(variants))),
        "slots": slots,
        "flat": draw(st.booleans()),
        "slot_dtype": draw(st.sampled_from([torch.int32, torch.int64])),
    }


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_format_dtype_block_size(
    fmt: PagedFormat, dtype: str, block_size: int, data: st.DataObject
) -> None:
    case = data.draw(cases(fmt, dtype, block_size))
    check_gather(case)
    check_scatter_round_trip(case)


@SETTINGS
@given(cases())
def test_gather_matches_reference(case: dict) -> None:
    check_gather(case)


@SETTINGS
@given(cases())
def test_scatter_matches_reference_and_round_trips(case: dict) -> None:
    check_scatter_round_trip(case)


def check_gather(case: dict) -> None:
    fmt, layout, caches, slots = case["fmt"], case["layout"], case["caches"], case["slots"]
    slot_t = torch.tensor(slots, dtype=case["slot_dtype"])
    expected = ref_gather(fmt, caches, slots, layout)
    if case["flat"]:
        pad = 64
        buf = torch.full((len(slots) * layout.bytes_per_token + pad,), 0xAB, dtype=torch.uint8)
        got = gather(caches, slot_t, buf, layout, fmt)
        assert bool((buf[-pad:] == 0xAB).all()), "gather wrote past the chunk"
    else:
        out = torch.full((len(slots) * layout.bytes_per_token,), 7, dtype=torch.uint8)
        out = out.view(torch_dtype(layout)).view(layout.chunk_shape(len(slots)))
        got = gather(caches, slot_t, out, layout, fmt)
    assert torch.equal(bits(got), bits(expected))


def check_scatter_round_trip(case: dict) -> None:
    fmt, layout, caches, slots = case["fmt"], case["layout"], case["caches"], case["slots"]
    slot_t = torch.tensor(slots, dtype=case["slot_dtype"])
    gen = torch.Generator().manual_seed(len(slots))
    shape = layout.chunk_shape(len(slots))
    raw = torch.randint(0, 256, (max(1, len(slots) * layout.bytes_per_token),), generator=gen)
    chunk_bytes = raw.to(torch.uint8)[: len(slots) * layout.bytes_per_token]
    chunk = chunk_bytes.view(torch_dtype(layout)).view(shape)
    expected = [c.clone() for c in caches]
    ref_scatter(fmt, chunk, expected, slots, layout)
    scatter(chunk_bytes if case["flat"] else chunk, caches, slot_t, layout, fmt)
    for got, want in zip(caches, expected, strict=True):
        assert torch.equal(bits(got), bits(want))
    # gather(scatter(chunk)) == chunk, with zeros where the slot is padding
    back = gather(caches, slot_t, torch.empty_like(chunk), layout, fmt)
    want = bits(chunk).clone()
    pad = torch.tensor([s < 0 for s in slots], dtype=torch.bool)
    want[:, :, pad] = 0
    assert torch.equal(bits(back), want)


def test_detected_format_round_trip_on_shared_cpu_buffer() -> None:
    layout = make_layout(4, 2, 32, "bfloat16", 16, mla=False)
    gen = torch.Generator().manual_seed(0)
    caches = make_caches(PagedFormat.CPU_VLLM, layout, 8, gen, "shared")
    slots = torch.tensor([5, 6, 7, 40, 41, -1, 100, 2])
    out = gather(caches, slots, torch.empty(layout.chunk_shape(8), dtype=torch.bfloat16), layout)
    assert torch.equal(
        bits(out), bits(ref_gather(PagedFormat.CPU_VLLM, caches, slots.tolist(), layout))
    )


def test_dict_of_layers_and_empty_slot_mapping() -> None:
    layout = make_layout(2, 2, 8, "float16", 16, mla=False)
    caches = make_caches(PagedFormat.FLASH_ATTN, layout, 3, torch.Generator().manual_seed(1))
    named = {f"model.layers.{i}.self_attn": t for i, t in enumerate(caches)}
    slots = torch.arange(20)
    out = gather(named, slots, torch.empty(20 * layout.bytes_per_token, dtype=torch.uint8), layout)
    assert torch.equal(
        bits(out), bits(ref_gather(PagedFormat.FLASH_ATTN, caches, list(range(20)), layout))
    )
    empty = torch.empty(0, dtype=torch.uint8)
    assert gather(caches, torch.empty(0, dtype=torch.int64), empty, layout).numel() == 0
    scatter(empty, caches, torch.empty(0, dtype=torch.int64), layout)


def test_fp8_layout_accepts_uint8_caches() -> None:
    layout = make_layout(2, 1, 16, "float8_e4m3fn", 16, mla=False)
    caches = [
        c.view(torch.uint8)
        for c in make_caches(PagedFormat.FLASHINFER, layout, 3, torch.Generator())
    ]
    slots = torch.tensor([47, 0, 16])
    out = gather(caches, slots, torch.empty(3 * layout.bytes_per_token, dtype=torch.uint8), layout)
    assert torch.equal(
        bits(out), bits(ref_gather(PagedFormat.FLASHINFER, caches, [47, 0, 16], layout))
    )


@pytest.mark.parametrize("pick", [[2, 1, 0], [0, 1, 3], [0, 2, 4]], ids=str)
def test_layers_of_one_buffer_in_any_spacing(pick: list[int]) -> None:
    """Reversed or unevenly spaced views of one buffer take the per-layer path, evenly
    spaced ones the fused path; both give the reference bytes."""
    layout = make_layout(3, 2, 8, "float16", 16, mla=False)
    big = make_layout(5, 2, 8, "float16", 16, mla=False)
    gen = torch.Generator().manual_seed(5)
    whole = make_caches(PagedFormat.FLASHINFER, big, 4, gen, "shared")
    caches = [whole[i] for i in pick]
    slots = torch.tensor([32, 33, 34, 35, 0, 1, 2, 3, -1, 60])
    out = torch.empty(10 * layout.bytes_per_token, dtype=torch.uint8)
    got = gather(caches, slots, out, layout)
    want = ref_gather(PagedFormat.FLASHINFER, caches, slots.tolist(), layout)
    assert torch.equal(bits(got), bits(want))
    fresh_whole = [torch.zeros_like(c) for c in whole]
    fresh = [fresh_whole[i] for i in pick]
    scatter(got, fresh, slots, layout)
    assert torch.equal(bits(gather(fresh, slots, torch.empty_like(out), layout)), bits(got))
