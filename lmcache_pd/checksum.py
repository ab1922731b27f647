"""Chunk checksums for the handoff: what the sender puts on the wire and how a consumer
checks a chunk inside the copy it makes anyway.

Owns the core-side API over :mod:`lmcache_pd.kernels.checksum` (the ``kvsum64``
definition, identical on CPU and GPU): :data:`ALGORITHM`, :func:`chunk_digest` for a
chunk already in a send slot (DRAM: native C; VRAM: torch ops on the device),
:func:`chunk_copy_digest` / :func:`copy_verified` for the receiver's copy into a tier (copy
and hash in one pass: the CPU tier's checked put) and :func:`scatter_verified` /
:func:`gather_digest` for the engine's paged KV (the hash rides in the gather/scatter
pass; CUDA kernels fold it into their launch). Digests are never 0, so
``protocol.NO_CHECKSUM`` (0) keeps meaning "not hashed".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from lmcache_pd.kernels import PagedFormat, gather_checksum, scatter_checksum
from lmcache_pd.kernels import checksum as kvsum
from lmcache_pd.kernels.geometry import KVShapeLike
from lmcache_pd.protocol import CHECKSUM_ALGORITHM, NO_CHECKSUM

ALGORITHM = kvsum.NAME  # "kvsum64": in the Hello compat, so peers agree on it
if ALGORITHM != CHECKSUM_ALGORITHM:  # the wire names the algorithm the kernels implement
    raise ImportError(f"protocol names {CHECKSUM_ALGORITHM!r}, the kernels compute {ALGORITHM!r}")
ChunkBytes = Union[memoryview, bytes, bytearray, np.ndarray, torch.Tensor]


class ChecksumMismatch(ValueError):
    """A chunk's bytes do not hash to the digest its sender computed."""

    def __init__(self, expected: int, got: int, what: str = "chunk") -> None:
        super().__init__(f"{what} failed its {ALGORITHM} checksum: {got:#x} != {expected:#x}")
        self.expected, self.got = expected, got


def chunk_digest(data: ChunkBytes) -> int:
    """The digest of a whole chunk, wherever it lives (host bytes or a CUDA tensor)."""
    if isinstance(data, torch.Tensor):
        return kvsum.digest(data.reshape(-1).view(torch.uint8))
    return kvsum.digest(data)


def matches(data: ChunkBytes, expected: int) -> bool:
    """Whether ``data`` hashes to ``expected`` (a separate pass: prefer the fused ones);
    ``NO_CHECKSUM`` (not hashed) matches anything."""
    return expected == NO_CHECKSUM or chunk_digest(data) == expected


def copy_verified(dst: ChunkBytes, src: ChunkBytes, expected: int) -> bool:
    """Copy ``src`` into ``dst`` (host buffers of equal size) hashing it in the same
    pass; False (and ``dst`` must then be discarded) when the digest differs."""
    return kvsum.copy_digest(dst, src) == expected


def chunk_copy_digest(dst: ChunkBytes, src: ChunkBytes) -> int:
    """Copy the whole chunk ``src`` into ``dst`` (host buffers of equal size) and return
    its digest, hashed in the same pass (split across threads for big chunks)."""
    return kvsum.copy_digest(dst, src)


def gather_digest(
    kv_caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    out: torch.Tensor,
    layout: KVShapeLike,
    fmt: PagedFormat | None = None,
) -> int:
    """Gather a chunk out of paged KV into ``out`` and return its digest (one pass)."""
    return gather_checksum(list(kv_caches), slots, out, layout, fmt)


def scatter_verified(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    layout: KVShapeLike,
    expected: int,
    fmt: PagedFormat | None = None,
) -> None:
    """Scatter a chunk into paged KV, hashing it in the same pass; raises
    :class:`ChecksumMismatch` when it differs (the KV written is then corrupt: report
    its blocks as not loaded)."""
    got = scatter_checksum(chunk, list(kv_caches), slots, layout, fmt)
    if got != expected:
        raise ChecksumMismatch(expected, got)
