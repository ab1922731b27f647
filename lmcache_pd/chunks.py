"""Token chunking and prefix-chain hashing: the chunk keys every process agrees on.

A prompt's token ids are split into ``chunk_size`` chunks. Chunk ``i`` is keyed by

    h_i = H(h_{i-1} || le32(tokens of chunk i)),   h_{-1} = seed

where ``seed = H("lmcache-pd/v1" || layout fingerprint || chunk_size)`` and ``H`` is a
fixed 128-bit hash (xxh3-128 by default, blake2b-128 as an alternative). Python's
``hash()`` is never used: it differs between processes. A key therefore names a chunk
*and everything before it*, so equal keys mean equal KV for the same model/layout.

Imports no torch and no numpy: the router uses this module.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence

import xxhash

KEY_BYTES = 16


class HashAlgorithm(str, enum.Enum):
    XXH3_128 = "xxh3_128"
    BLAKE2B_128 = "blake2b_128"


def _digest(algorithm: HashAlgorithm, data: bytes) -> bytes:
    if algorithm is HashAlgorithm.XXH3_128:
        return xxhash.xxh3_128_digest(data)
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def chain_seed(
    fingerprint: bytes, chunk_size: int, algorithm: HashAlgorithm = HashAlgorithm.XXH3_128
) -> bytes:
    """Seed of the prefix chain: binds keys to a layout fingerprint and chunk size."""
    return _digest(algorithm, b"lmcache-pd/v1" + fingerprint + struct.pack("<I", chunk_size))


def chunk_spans(
    num_tokens: int, chunk_size: int, include_partial: bool = False
) -> list[tuple[int, int]]:
    """``(start, end)`` token ranges of the chunks of a prompt.

    Full chunks only, unless ``include_partial`` (LMCache's ``save_unfull_chunk``), in
    which case a shorter last chunk is included too.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    full = num_tokens // chunk_size
    spans = [(i * chunk_size, (i + 1) * chunk_size) for i in range(full)]
    if include_partial and full * chunk_size < num_tokens:
        spans.append((full * chunk_size, num_tokens))
    return spans


def _pack_tokens(tokens: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None


class ChunkHasher:
    """Computes prefix-chain keys for one (layout fingerprint, chunk size, algorithm)."""

    def __init__(
        self,
        fingerprint: bytes,
        chunk_size: int,
        algorithm: HashAlgorithm | str = HashAlgorithm.XXH3_128,
    ) -> None:
        self.chunk_size = chunk_size
        self.algorithm = HashAlgorithm(algorithm)
        self.seed = chain_seed(fingerprint, chunk_size, self.algorithm)

    def next_key(self, prev: bytes | None, tokens: Sequence[int]) -> bytes:
        """Key of the chunk ``tokens`` after the chunk keyed ``prev`` (None: the first)."""
        return _digest(self.algorithm, (prev or self.seed) + _pack_tokens(tokens))

    def keys(self, tokens: Sequence[int], include_partial: bool = False) -> list[bytes]:
        """Prefix-chain keys of ``tokens``: one per chunk (see :func:`chunk_spans`)."""
        keys: list[bytes] = []
        prev = self.seed
        for start, end in chunk_spans(len(tokens), self.chunk_size, include_partial):
            prev = _digest(self.algorithm, prev + _pack_tokens(tokens[start:end]))
            keys.append(prev)
        return keys


def longest_prefix(keys: Sequence[bytes], held: object) -> int:
    """Number of leading ``keys`` that are ``in held`` (a set, dict or store)."""
    n = 0
    for key in keys:
        if key not in held:  # type: ignore[operator]
            break
        n += 1
    return n
