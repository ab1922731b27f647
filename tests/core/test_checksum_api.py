"""The core's checksum API: digests anywhere, the verified copy and the verified scatter
(bad bytes are refused, by exception type, never by message)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcache_pd import checksum
from lmcache_pd.kernels import PagedFormat
from lmcache_pd.layout import KVLayout, preset
from lmcache_pd.protocol import CHECKSUM_ALGORITHM, NO_CHECKSUM, Compat


def test_digest_of_host_bytes_and_tensors_agree_and_is_never_no_checksum() -> None:
    data = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8)
    d = checksum.chunk_digest(memoryview(data))
    assert d == checksum.chunk_digest(torch.from_numpy(data).view(torch.int32)[:25_000])
    assert d == checksum.chunk_digest(data.tobytes()) != NO_CHECKSUM
    assert checksum.chunk_digest(b"") != NO_CHECKSUM
    assert checksum.ALGORITHM == "kvsum64"


def test_the_hello_compat_names_the_algorithm_and_old_peers_differ() -> None:
    """Peers agree on the chunk checksum at Hello: Compat carries it, and a peer from
    before the field (it hashed with xxh3-64 and sends none) differs by that field."""
    mine = Compat.of(preset("tiny"), 16, "xxh3_128")
    assert mine.checksum_algorithm == CHECKSUM_ALGORITHM == checksum.ALGORITHM
    fields = [f for f in mine.__struct_fields__ if f != "checksum_algorithm"]
    old = Compat(**{f: getattr(mine, f) for f in fields})
    assert old.checksum_algorithm == "xxh3_64"
    (problem,) = mine.diff(old)
    assert problem.startswith("checksum_algorithm")


def test_matches_checks_real_digests_and_passes_unhashed_chunks() -> None:
    data = np.arange(4096, dtype=np.uint8)
    good = checksum.chunk_digest(data)
    assert checksum.matches(data, good) and checksum.matches(data, NO_CHECKSUM)
    assert not checksum.matches(data, good ^ 1)


def test_copy_verified_copies_and_refuses_damage() -> None:
    src = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
    good = checksum.chunk_digest(src)
    dst = np.empty_like(src)
    assert checksum.copy_verified(dst, src, good) and np.array_equal(dst, src)
    src[777] ^= 4
    assert not checksum.copy_verified(dst, src, good)
    with pytest.raises(ValueError, match="destination holds"):
        checksum.copy_verified(dst[:-8], src, good)


def test_scatter_verified_raises_on_a_corrupted_chunk() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_size=16, dtype="float16", block_size=4)
    caches = [torch.randn(2, 6, 4, 2, 16).to(torch.float16) for _ in range(2)]
    slots = torch.tensor([5, 6, 7, 0, 1])
    out = torch.empty(5 * layout.bytes_per_token, dtype=torch.uint8)
    sent = checksum.gather_digest(caches, slots, out, layout, PagedFormat.FLASH_ATTN)
    assert sent == checksum.chunk_digest(out)
    fresh = [torch.zeros_like(c) for c in caches]
    checksum.scatter_verified(out, fresh, slots, layout, sent, PagedFormat.FLASH_ATTN)
    out[3] ^= 1
    with pytest.raises(checksum.ChecksumMismatch) as err:
        checksum.scatter_verified(out, fresh, slots, layout, sent, PagedFormat.FLASH_ATTN)
    assert err.value.expected == sent and err.value.got != sent
