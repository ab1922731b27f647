"""Head pieces in bytes: cutting a TP rank's chunks for a receiver rank at another TP
size, and assembling the pieces a rank received back into its chunk.

:mod:`lmcache_pd.tp` says which heads go where; this module moves them. A chunk holds
``[layers, kv, tokens, heads, head_size]`` (see :mod:`lmcache_pd.layout`), so a head
range is strided inside it: the sender copies each piece into a send slot of its own
(one strided copy) and the loading rank copies each piece into its place in a chunk
scratch before the scatter into paged KV. Neither copy runs when both sides run the
same TP: every piece is then a whole chunk under its own key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache_pd.kernels.geometry import TORCH_DTYPES
from lmcache_pd.layout import KVLayout
from lmcache_pd.sender import OutChunk, Sender, SendResult
from lmcache_pd.tp import Piece, piece_key, receiver_pieces


def _heads_view(data: torch.Tensor, layout: KVLayout, heads: int, tokens: int) -> torch.Tensor:
    """``data`` (flat uint8) as ``[layers, kv, tokens, heads, head_size]`` elements."""
    width = layout.num_layers * layout.kv_factor * tokens * heads * layout.head_size
    typed = data[: width * layout.dtype_size].view(TORCH_DTYPES[layout.dtype])
    return typed.view(layout.num_layers, layout.kv_factor, tokens, heads, layout.head_size)


def tokens_in(layout: KVLayout, heads: int, nbytes: int) -> int:
    """Tokens in ``nbytes`` of a piece holding ``heads`` heads (-1: not a whole number)."""
    per_token = layout.bytes_per_token // layout.num_kv_heads * heads
    return nbytes // per_token if nbytes % per_token == 0 else -1


def send_pieces(
    sender: Sender, endpoint: str, req_id: str, chunks: Sequence[OutChunk]
) -> SendResult:
    """``sender.send`` of our rank's ``chunks`` to the receiver rank at ``endpoint``, as
    the head pieces that rank takes from us (none: nothing is sent). Same TP: the chunks
    as they are. The caller still owns the chunks' slots; piece slots are freed here."""
    layout = sender.layout
    total = layout.model_kv_heads
    dst_rank, dst_size, _ = sender.receiver_tp(endpoint)
    pieces = [
        p
        for p in receiver_pieces(total, sender.compat.tp_size, dst_size, dst_rank)
        if p.src == sender.tp_rank
    ]
    if not pieces:
        return SendResult(req_id, 0, 0, 0, 0, 0.0)
    out: list[OutChunk] = []
    scratch: list[int] = []
    try:
        for piece in pieces:
            whole = piece.heads.count == layout.num_kv_heads
            slots = [] if whole else sender.alloc(len(chunks))
            scratch += slots
            for i, c in enumerate(chunks):
                key = piece_key(c.key, piece, total, dst_size)
                if whole:
                    out.append(OutChunk(key, c.slot, c.nbytes, c.checksum))
                    continue
                nbytes = cut(sender, c, slots[i], piece)
                out.append(OutChunk(key, slots[i], nbytes))
        return sender.send(endpoint, req_id, out)
    finally:
        sender.free(scratch)


def cut(sender: Sender, chunk: OutChunk, slot: int, piece: Piece) -> int:
    """Copy ``piece``'s heads of ``chunk`` (in its send slot) into send slot ``slot``;
    returns the piece's bytes."""
    layout = sender.layout
    tokens = tokens_in(layout, layout.num_kv_heads, chunk.nbytes)
    if tokens <= 0:
        raise ValueError(f"chunk of {chunk.nbytes} bytes is not a whole number of tokens")
    src = _heads_view(sender.buffer.slot_tensor(chunk.slot), layout, layout.num_kv_heads, tokens)
    dst = _heads_view(sender.buffer.slot_tensor(slot), layout, piece.heads.count, tokens)
    lo = piece.src_offset
    dst.copy_(src[:, :, :, lo : lo + piece.heads.count, :])
    return dst.numel() * layout.dtype_size


def assemble(
    layout: KVLayout, pieces: Sequence[Piece], views: Sequence[torch.Tensor], out: torch.Tensor
) -> int:
    """Place each piece (flat uint8 ``views``, in ``pieces`` order) at its heads inside
    ``out`` (a flat uint8 chunk scratch of this rank's ``layout``); returns the chunk's
    bytes, or -1 when the pieces disagree on the token count (the chunk is then unusable)."""
    pairs = zip(pieces, views, strict=True)
    counts = {tokens_in(layout, p.heads.count, v.numel()) for p, v in pairs}
    if len(counts) != 1 or min(counts) <= 0:
        return -1
    tokens = counts.pop()
    dst = _heads_view(out, layout, layout.num_kv_heads, tokens)
    for piece, view in zip(pieces, views, strict=True):
        src = _heads_view(view, layout, piece.heads.count, tokens)
        lo = piece.dst_offset
        dst[:, :, :, lo : lo + piece.heads.count, :].copy_(src)
    return tokens * layout.bytes_per_token
