"""Tensor parallelism: which KV heads each TP rank holds, and how chunks map between a
prefiller and a decoder running different TP sizes.

A chunk's identity (its key) never depends on TP: keys are computed over the model's
total KV heads (:meth:`KVLayout.fingerprint`). Under TP, rank ``r`` of ``tp`` holds a
contiguous **head range** of every chunk (vLLM's split: ``H / tp`` heads each, or, when
``tp > H``, one head replicated over ``tp / H`` ranks; MLA's single latent is the
``H = 1`` case, replicated on every rank).

Between a sender at ``tp_src`` and a receiver at ``tp_dst`` the unit moved is a
**piece**: the heads one sender rank gives one receiver rank (their ranges' overlap;
for replicated heads one sender rank is chosen, rotating by receiver rank). When both
sides run the same TP, every piece is a receiver rank's whole range and chunk keys are
used as they are: nothing changes against TP=1. Otherwise the receiver rank stores each
piece under :func:`piece_key` and loads a chunk only when every piece of it is held
(:func:`receiver_pieces` says which, in a fixed order both sides agree on).

No torch here: this is arithmetic over ranks and heads; the byte copies live with the
sender (``producer``) and the loading worker.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache


class TPMappingError(ValueError):
    """A TP size that cannot split the model's KV heads; the message names both."""


@dataclass(frozen=True)
class HeadRange:
    """KV heads ``[start, start + count)`` of the model."""

    start: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count

    def overlap(self, other: HeadRange) -> HeadRange | None:
        lo, hi = max(self.start, other.start), min(self.stop, other.stop)
        return HeadRange(lo, hi - lo) if hi > lo else None


@dataclass(frozen=True)
class Piece:
    """Heads ``heads`` of a chunk, moved from sender rank ``src`` to receiver rank ``dst``.
    ``offset`` is where they start inside the sender's range (``src_heads``) and inside
    the receiver's range (``dst_offset``)."""

    src: int
    dst: int
    heads: HeadRange
    src_offset: int
    dst_offset: int


def check_tp(total_heads: int, tp: int, what: str = "tp_size") -> None:
    """Raise :class:`TPMappingError` unless ``tp`` ranks can split ``total_heads``."""
    if tp < 1:
        raise TPMappingError(f"{what} must be >= 1, got {tp}")
    if total_heads < 1:
        raise TPMappingError(f"num_kv_heads must be >= 1, got {total_heads}")
    if total_heads % tp and tp % total_heads:
        raise TPMappingError(
            f"{what}={tp} cannot split num_kv_heads={total_heads}: one must divide the other"
        )


def rank_heads(total_heads: int, tp: int, rank: int) -> HeadRange:
    """The KV heads TP rank ``rank`` of ``tp`` holds (vLLM's split)."""
    check_tp(total_heads, tp)
    if not 0 <= rank < tp:
        raise TPMappingError(f"tp_rank={rank} is outside tp_size={tp}")
    if tp <= total_heads:
        per = total_heads // tp
        return HeadRange(rank * per, per)
    return HeadRange(rank * total_heads // tp, 1)  # replicated heads


@lru_cache(maxsize=256)
def receiver_pieces(total_heads: int, tp_src: int, tp_dst: int, dst: int) -> tuple[Piece, ...]:
    """The pieces receiver rank ``dst`` needs of every chunk, ordered by head. Sender
    ranks holding the same (replicated) heads are tried starting at ``dst % tp_src``."""
    check_tp(total_heads, tp_src, "sender tp_size")
    want = rank_heads(total_heads, tp_dst, dst)
    pieces: list[Piece] = []
    covered = want.start
    order = [(dst + i) % tp_src for i in range(tp_src)]
    while covered < want.stop:
        for src in order:
            have = rank_heads(total_heads, tp_src, src)
            part = have.overlap(HeadRange(covered, want.stop - covered))
            if part is not None and part.start == covered:
                pieces.append(
                    Piece(src, dst, part, part.start - have.start, part.start - want.start)
                )
                covered = part.stop
                break
        else:  # unreachable for a valid TP pair; guard against an endless loop
            raise TPMappingError(f"no sender rank of tp_size={tp_src} holds KV head {covered}")
    return tuple(pieces)


@lru_cache(maxsize=256)
def sender_pieces(total_heads: int, tp_src: int, tp_dst: int, src: int) -> tuple[Piece, ...]:
    """The pieces sender rank ``src`` sends of every chunk, by receiver rank."""
    check_tp(total_heads, tp_dst, "receiver tp_size")
    return tuple(
        p
        for dst in range(tp_dst)
        for p in receiver_pieces(total_heads, tp_src, tp_dst, dst)
        if p.src == src
    )


def is_whole(piece: Piece, total_heads: int, tp_dst: int) -> bool:
    """Whether ``piece`` is its receiver rank's whole range (stored under the chunk key)."""
    return piece.heads == rank_heads(total_heads, tp_dst, piece.dst)


def piece_key(key: bytes, piece: Piece, total_heads: int, tp_dst: int) -> bytes:
    """The key a receiver rank holds ``piece`` of chunk ``key`` under: the chunk key
    itself for a whole range, else a digest of the key and the heads (same length)."""
    if is_whole(piece, total_heads, tp_dst):
        return key
    tag = f"heads:{piece.heads.start}:{piece.heads.count}".encode()
    return hashlib.blake2b(key + tag, digest_size=len(key)).digest()


def piece_keys(
    keys: list[bytes], pieces: tuple[Piece, ...], total_heads: int, tp_dst: int
) -> list[bytes]:
    """``keys`` expanded to the keys of each chunk's ``pieces``, chunk by chunk: a
    receiver holds chunk ``i`` when it holds entries ``i * len(pieces) ..`` of this."""
    return [piece_key(k, p, total_heads, tp_dst) for k in keys for p in pieces]
