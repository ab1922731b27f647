"""Wrong shapes, dtypes, layouts, slots and buffers raise ValueError naming the expectation."""

from __future__ import annotations

import pytest
import torch

from lmcache_pd.kernels import PagedFormat, detect_format, expected_layer_shape, gather, scatter

from .helpers import make_caches, make_layout

LAYOUT = make_layout(2, 2, 8, "bfloat16", 16, mla=False)
MLA = make_layout(2, 1, 16, "bfloat16", 16, mla=True)


def caches(fmt: PagedFormat = PagedFormat.FLASH_ATTN, layout=LAYOUT, blocks: int = 3):
    return make_caches(fmt, layout, blocks, torch.Generator().manual_seed(0))


def buf(tokens: int, layout=LAYOUT) -> torch.Tensor:
    return torch.empty(tokens * layout.bytes_per_token, dtype=torch.uint8)


SLOTS = torch.tensor([0, 1, 17])


def test_wrong_head_size_names_expected_shape() -> None:
    bad = [torch.zeros(2, 3, 16, 2, 4, dtype=torch.bfloat16) for _ in range(2)]
    with pytest.raises(ValueError, match=r"expected shape \[2, B, 16, 2, 8\]"):
        gather(bad, SLOTS, buf(3), LAYOUT, PagedFormat.FLASH_ATTN)


def test_wrong_dtype() -> None:
    bad = [c.float() for c in caches()]
    with pytest.raises(ValueError, match=r"dtype must be torch\.bfloat16"):
        gather(bad, SLOTS, buf(3), LAYOUT, PagedFormat.FLASH_ATTN)


def test_wrong_format_for_tensor() -> None:
    with pytest.raises(ValueError, match=r"FLASHINFER .*expected shape \[B, 2, 16, 2, 8\]"):
        scatter(buf(3), caches(PagedFormat.FLASH_ATTN), SLOTS, LAYOUT, PagedFormat.FLASHINFER)


def test_wrong_layer_count() -> None:
    with pytest.raises(ValueError, match="expected 2 per-layer KV tensors"):
        gather(caches()[:1], SLOTS, buf(3), LAYOUT)


def test_layers_must_match() -> None:
    layers = caches()
    layers[1] = make_caches(PagedFormat.FLASH_ATTN, LAYOUT, 4, torch.Generator())[1]
    with pytest.raises(ValueError, match=r"kv_caches\[1\].*must match layer 0"):
        gather(layers, SLOTS, buf(3), LAYOUT)


def test_mla_format_needs_mla_layout_and_back() -> None:
    with pytest.raises(ValueError, match="MLA paged format needs an MLA layout"):
        gather(caches(), SLOTS, buf(3), LAYOUT, PagedFormat.MLA)
    with pytest.raises(ValueError, match=r"use PagedFormat\.MLA"):
        gather(caches(PagedFormat.MLA, MLA), SLOTS, buf(3, MLA), MLA, PagedFormat.FLASH_ATTN)


def test_chunk_shape_dtype_and_size() -> None:
    with pytest.raises(ValueError, match=r"expected shape \[2, 2, 3, 2, 8\]"):
        gather(caches(), SLOTS, torch.empty(2, 2, 4, 2, 8, dtype=torch.bfloat16), LAYOUT)
    with pytest.raises(ValueError, match=r"with dtype torch\.bfloat16"):
        gather(caches(), SLOTS, torch.empty(2, 2, 3, 2, 8, dtype=torch.float16), LAYOUT)
    with pytest.raises(ValueError, match="3 tokens need 384 bytes"):
        gather(caches(), SLOTS, buf(2), LAYOUT)
    with pytest.raises(ValueError, match="must be contiguous"):
        gather(caches(), SLOTS, buf(6)[::2], LAYOUT)
    with pytest.raises(ValueError, match="not a multiple of the bfloat16 element size 2"):
        gather(caches(), SLOTS, buf(4)[1:], LAYOUT)


def test_slot_checks() -> None:
    with pytest.raises(ValueError, match=r"slot 48 out of range.*3 blocks x 16 = 48 slots"):
        gather(caches(), torch.tensor([0, 48]), buf(2), LAYOUT)
    with pytest.raises(ValueError, match="out of range"):
        scatter(buf(1), caches(), torch.tensor([999]), LAYOUT)
    with pytest.raises(ValueError, match="int32 or int64"):
        gather(caches(), SLOTS.float(), buf(3), LAYOUT)
    with pytest.raises(ValueError, match="1-D"):
        gather(caches(), SLOTS.view(1, 3), buf(3), LAYOUT)


def test_backend_choice() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        gather(caches(), SLOTS, buf(3), LAYOUT, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gather(caches(), SLOTS, buf(3), LAYOUT, backend="cuda")


def test_detect_format() -> None:
    assert detect_format(caches(PagedFormat.FLASH_ATTN)[0], LAYOUT) is PagedFormat.FLASH_ATTN
    assert detect_format(caches(PagedFormat.FLASHINFER)[0], LAYOUT) is PagedFormat.FLASHINFER
    assert detect_format(caches(PagedFormat.CPU_VLLM)[0], LAYOUT) is PagedFormat.CPU_VLLM
    assert detect_format(caches(PagedFormat.MLA, MLA)[0], MLA) is PagedFormat.MLA
    with pytest.raises(ValueError, match="ambiguous"):
        detect_format(torch.zeros(2, 2, 16, 2, 8, dtype=torch.bfloat16), LAYOUT)
    with pytest.raises(ValueError, match=r"no paged format matches.*CPU_VLLM \[B, 2, 16, 16\]"):
        detect_format(torch.zeros(5, 7, dtype=torch.bfloat16), LAYOUT)


def test_cpu_format_needs_contiguous_pages() -> None:
    bad = torch.zeros(3, 16, 2, 16, dtype=torch.bfloat16).transpose(1, 2)  # [B, H, N, 2D]
    with pytest.raises(ValueError, match="page must be contiguous"):
        gather([bad, bad], SLOTS, buf(3), LAYOUT, PagedFormat.CPU_VLLM)


def test_expected_layer_shape_strings() -> None:
    assert expected_layer_shape(PagedFormat.CPU_VLLM, LAYOUT, 10) == "[10, 2, 16, 16]"
    assert expected_layer_shape(PagedFormat.MLA, MLA) == "[B, 16, 16] or [B, 1, 16, 16]"


def test_checks_hold_after_a_cached_validation() -> None:
    """The validation kept for a set of cache tensors never vouches for other input: a
    list with one layer swapped for a bad tensor, the same layer 0 changed in place, or
    another format or layout is checked in full again (and the good call still works)."""
    good = caches()
    out = buf(3)
    gather(good, SLOTS, out, LAYOUT, PagedFormat.FLASH_ATTN)  # validated, result kept
    again = torch.empty_like(out)
    gather(list(good), SLOTS, again, LAYOUT, PagedFormat.FLASH_ATTN)  # a new list: a hit
    assert torch.equal(again, out)
    with pytest.raises(ValueError, match=r"kv_caches\[1\] has shape"):
        gather([good[0], good[1][:, :2]], SLOTS, out, LAYOUT, PagedFormat.FLASH_ATTN)
    with pytest.raises(ValueError, match=r"kv_caches\[1\] has shape .* dtype torch.float32"):
        gather([good[0], good[1].float()], SLOTS, out, LAYOUT, PagedFormat.FLASH_ATTN)
    with pytest.raises(ValueError, match=r"FLASHINFER .*expected shape"):
        gather(good, SLOTS, out, LAYOUT, PagedFormat.FLASHINFER)
    with pytest.raises(ValueError, match="expected 3 per-layer KV tensors"):
        gather(good, SLOTS, out, make_layout(3, 2, 8, "bfloat16", 16, mla=False))
    wide = make_layout(2, 2, 16, "bfloat16", 16, mla=False)
    with pytest.raises(ValueError, match=r"expected shape \[2, B, 16, 2, 16\]"):
        gather(good, SLOTS, buf(3, wide), wide, PagedFormat.FLASH_ATTN)
    first = good[0]
    first.set_(first.untyped_storage(), 0, (2, 3, 16, 2, 4), (384, 128, 8, 4, 1))
    with pytest.raises(ValueError, match=r"expected shape \[2, B, 16, 2, 8\]"):
        gather(good, SLOTS, out, LAYOUT, PagedFormat.FLASH_ATTN)
