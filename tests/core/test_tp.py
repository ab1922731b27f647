"""Tensor parallelism: head ranges, pieces between TP sizes, and mixed-TP handoffs.

The mapping tests are arithmetic. The handoff tests run real NIXL agents and ZMQ
sockets in one process: sender "ranks" of one TP size push (or are fetched from) to
receiver "ranks" of another; every receiver rank ends with exactly its heads of every
chunk, bit-exact, and no slot leaks anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import pytest
import torch

from lmcache_pd.control import Codec
from lmcache_pd.integration.vllm.launch import free_port
from lmcache_pd.layout import AttentionKind, KVLayout
from lmcache_pd.pieces import assemble, send_pieces
from lmcache_pd.protocol import ErrorCode, HandoffDone
from lmcache_pd.pull import Fetcher, FetchError, HoldServer
from lmcache_pd.receiver import Receiver
from lmcache_pd.sender import HandoffError, OutChunk, Sender
from lmcache_pd.tp import (
    HeadRange,
    TPMappingError,
    check_tp,
    piece_key,
    piece_keys,
    rank_heads,
    receiver_pieces,
    sender_pieces,
)
from lmcache_pd.transports.nixl import NixlTransport

from .helpers import CHUNK, hasher, make_config, receiver, sender

# 4 KV heads (the issue asks for >= 4), head size 8, fp32: 256 bytes per token
MODEL = KVLayout(num_layers=2, num_kv_heads=4, head_size=8, dtype="float32", model="tp-test")


def rank_layout(tp: int, rank: int, model: KVLayout = MODEL) -> KVLayout:
    heads = rank_heads(model.model_kv_heads, tp, rank)
    return model.with_heads(heads.start, heads.count)


# ---------------------------------------------------------------- mapping


def test_rank_heads_follow_vllm_split_and_replication() -> None:
    assert [rank_heads(8, 2, r) for r in range(2)] == [HeadRange(0, 4), HeadRange(4, 4)]
    assert [rank_heads(2, 4, r).start for r in range(4)] == [0, 0, 1, 1]  # replicated
    assert rank_heads(1, 8, 5) == HeadRange(0, 1)  # MLA: every rank holds the latent


@pytest.mark.parametrize(("heads", "tp"), [(4, 3), (6, 4), (8, 0)])
def test_unmappable_tp_names_tp_and_heads(heads: int, tp: int) -> None:
    with pytest.raises(TPMappingError, match=rf"tp_size.*{tp}") as exc:
        check_tp(heads, tp)
    if tp:
        assert f"num_kv_heads={heads}" in str(exc.value)


@pytest.mark.parametrize(
    ("heads", "tp_src", "tp_dst"),
    [(8, 1, 1), (8, 2, 2), (8, 2, 1), (8, 1, 2), (8, 4, 2), (8, 2, 4), (8, 8, 1), (2, 4, 1),
     (2, 1, 4), (1, 2, 1), (1, 1, 4), (1, 4, 2)],
)  # fmt: skip
def test_pieces_cover_every_receiver_range_once(heads: int, tp_src: int, tp_dst: int) -> None:
    for dst in range(tp_dst):
        want = rank_heads(heads, tp_dst, dst)
        pieces = receiver_pieces(heads, tp_src, tp_dst, dst)
        covered = [h for p in pieces for h in range(p.heads.start, p.heads.stop)]
        assert covered == list(range(want.start, want.stop))
        for p in pieces:  # each piece lies inside its sender's range, at the stated offsets
            have = rank_heads(heads, tp_src, p.src)
            assert have.start + p.src_offset == p.heads.start >= have.start
            assert p.heads.stop <= have.stop
            assert want.start + p.dst_offset == p.heads.start
    sent = {p for src in range(tp_src) for p in sender_pieces(heads, tp_src, tp_dst, src)}
    got = {p for dst in range(tp_dst) for p in receiver_pieces(heads, tp_src, tp_dst, dst)}
    assert sent == got  # both sides agree on who sends what


def test_same_tp_uses_chunk_keys_and_mixed_tp_piece_keys() -> None:
    key = bytes(range(16))
    same = receiver_pieces(8, 2, 2, 1)
    assert [p.src for p in same] == [1]
    assert piece_key(key, same[0], 8, 2) == key
    halves = receiver_pieces(8, 2, 1, 0)
    keys = piece_keys([key], halves, 8, 1)
    assert len(keys) == 2 and len(set(keys)) == 2 and key not in keys
    assert all(len(k) == 16 for k in keys)


def test_mla_is_served_by_one_rank_per_receiver() -> None:
    assert [p.src for p in receiver_pieces(1, 2, 1, 0)] == [0]
    assert [[p.src for p in receiver_pieces(1, 2, 4, d)] for d in range(4)] == [[0], [1], [0], [1]]


def test_fingerprint_is_tp_independent_and_store_fingerprint_is_not() -> None:
    halves = [rank_layout(2, r) for r in range(2)]
    assert halves[0].fingerprint() == halves[1].fingerprint() == MODEL.fingerprint()
    stores = {MODEL.store_fingerprint(), *(h.store_fingerprint() for h in halves)}
    assert len(stores) == 3
    mla = KVLayout(num_layers=2, num_kv_heads=1, head_size=8, attention=AttentionKind.MLA)
    assert mla.is_full and mla.store_fingerprint() == mla.fingerprint()


# ---------------------------------------------------------------- handoffs


def chunk_bytes(layout: KVLayout, rng: np.random.Generator, tokens: int = CHUNK) -> np.ndarray:
    """A random full-model chunk ``[layers, kv, tokens, heads, head_size]`` (fp32)."""
    shape = layout.chunk_shape(tokens)
    return rng.standard_normal(shape).astype(np.float32)


def heads_of(full: np.ndarray, layout: KVLayout) -> bytes:
    """The bytes a rank with ``layout`` holds of a full-model chunk."""
    start = layout.head_start
    return np.ascontiguousarray(full[:, :, :, start : start + layout.num_kv_heads]).tobytes()


def stage(tx: Sender, keys: list[bytes], fulls: list[np.ndarray]) -> list[OutChunk]:
    """This sender rank's heads of each chunk into its send slots."""
    slots = tx.alloc(len(keys))
    out = []
    for key, slot, full in zip(keys, slots, fulls, strict=True):
        data = heads_of(full, tx.layout)
        np.frombuffer(tx.buffer.view(slot, len(data)), dtype=np.uint8)[:] = np.frombuffer(
            data, dtype=np.uint8
        )
        out.append(OutChunk(key, slot, len(data)))
    return out


@contextmanager
def ranks(tp_src: int, tp_dst: int) -> Iterator[tuple[list[Sender], list[Receiver]]]:
    # 24 slots: pieces take a whole slot each, and grants hold up to half the buffer
    cfg = make_config(pd_buffer_size=24 * MODEL.bytes_per_chunk(CHUNK))
    with ExitStack() as stack:
        rxs = [
            stack.enter_context(receiver(cfg, rank_layout(tp_dst, r), tp_rank=r, tp_size=tp_dst))
            for r in range(tp_dst)
        ]
        txs = []
        for r in range(tp_src):
            tx = stack.enter_context(sender(cfg, rank_layout(tp_src, r)))
            tx.tp_rank = r
            tx.compat.tp_size = tp_src
            txs.append(tx)
        yield txs, rxs


def load_rank(rx: Receiver, keys: list[bytes], tp_src: int) -> list[bytes | None]:
    """What a loading rank does: every chunk from its pieces, or None if one is missing."""
    layout, tp_dst = rx.layout, rx.tp_size
    pieces = (
        receiver_pieces(layout.model_kv_heads, tp_src, tp_dst, rx.tp_rank)
        if tp_src != tp_dst
        else None
    )
    out: list[bytes | None] = []
    scratch = torch.empty(layout.bytes_per_chunk(CHUNK), dtype=torch.uint8)
    for key in keys:
        if pieces is None:
            out.append(rx.read(key))
            continue
        parts = [rx.read(k) for k in piece_keys([key], pieces, layout.model_kv_heads, tp_dst)]
        if any(p is None for p in parts):
            out.append(None)
            continue
        views = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in parts]  # type: ignore[arg-type]
        n = assemble(layout, pieces, views, scratch)
        out.append(scratch[:n].numpy().tobytes() if n > 0 else None)
    return out


@pytest.mark.parametrize(("tp_src", "tp_dst"), [(2, 1), (1, 2), (2, 2), (4, 2), (1, 4)])
def test_mixed_tp_push_gives_every_rank_its_heads_bit_exact(tp_src: int, tp_dst: int) -> None:
    rng = np.random.default_rng(tp_src * 10 + tp_dst)
    keys = hasher(MODEL).keys(rng.integers(0, 1000, 3 * CHUNK).tolist())
    fulls = [chunk_bytes(MODEL, rng) for _ in keys]
    with ranks(tp_src, tp_dst) as (txs, rxs):
        for tx in txs:
            chunks = stage(tx, keys, fulls)
            try:
                for rx in rxs:
                    send_pieces(tx, rx.endpoint, "req", chunks)
            finally:
                tx.free([c.slot for c in chunks])
        for rx in rxs:
            got = load_rank(rx, keys, tp_src)
            assert got == [heads_of(f, rx.layout) for f in fulls]
            assert rx.slot_usage()["leased"] == 0
        for tx in txs:
            assert tx.buffer.free_count == tx.buffer.num_slots  # piece slots freed too


def test_chunk_missing_a_piece_is_never_loaded() -> None:
    """A sender rank that dies after its peer pushed: the receiver holds half of every
    chunk, and the loading rank sees no chunk at all."""
    rng = np.random.default_rng(3)
    keys = hasher(MODEL).keys(rng.integers(0, 1000, 2 * CHUNK).tolist())
    fulls = [chunk_bytes(MODEL, rng) for _ in keys]
    with ranks(2, 1) as (txs, rxs):
        chunks = stage(txs[0], keys, fulls)  # rank 1 never sends
        send_pieces(txs[0], rxs[0].endpoint, "req", chunks)
        txs[0].free([c.slot for c in chunks])
        pieces = receiver_pieces(4, 2, 1, 0)
        flat = piece_keys(keys, pieces, 4, 1)
        assert rxs[0].lookup(flat) == 1  # the first piece of chunk 0 only
        assert rxs[0].lookup(flat) // len(pieces) == 0
        assert load_rank(rxs[0], keys, 2) == [None, None]


def test_partial_last_chunk_crosses_tp_sizes() -> None:
    rng = np.random.default_rng(4)
    keys = hasher(MODEL).keys(rng.integers(0, 1000, CHUNK).tolist())
    fulls = [chunk_bytes(MODEL, rng, tokens=5)]  # a 5-token tail chunk
    with ranks(1, 2) as (txs, rxs):
        chunks = stage(txs[0], keys, fulls)
        for rx in rxs:
            send_pieces(txs[0], rx.endpoint, "req", chunks)
        txs[0].free([c.slot for c in chunks])
        for rx in rxs:
            assert load_rank(rx, keys, 1) == [heads_of(fulls[0], rx.layout)]


def test_unmappable_sender_tp_is_refused_at_hello() -> None:
    cfg = make_config()
    with receiver(cfg, MODEL) as rx, sender(cfg, rank_layout(2, 0)) as tx:
        tx.compat.tp_size = 3  # 3 ranks cannot split 4 heads
        chunks = stage(
            tx,
            hasher(MODEL).keys(list(range(CHUNK))),
            [chunk_bytes(MODEL, np.random.default_rng(1))],
        )
        with pytest.raises(
            HandoffError, match="sender tp_size=3 cannot split num_kv_heads=4"
        ) as exc:
            tx.send(rx.endpoint, "req", chunks)
        assert exc.value.code is ErrorCode.INCOMPATIBLE
        tx.free([c.slot for c in chunks])


def test_hold_fetched_by_two_decoder_ranks_then_freed() -> None:
    """Standard contract, prefiller TP=1 -> decoder TP=2: each decoder rank fetches the
    one hold for its half; the hold is one-shot per rank and freed after both."""
    rng = np.random.default_rng(9)
    keys = hasher(MODEL).keys(rng.integers(0, 1000, 2 * CHUNK).tolist())
    fulls = [chunk_bytes(MODEL, rng) for _ in keys]
    with ranks(1, 2) as (txs, rxs):
        tx = txs[0]
        cfg = tx.cfg
        codec = Codec(cfg.auth_secret(), cfg.pd_max_frame_bytes)

        def push(endpoint: str, req_id: str, chunks: list[OutChunk], total: int) -> HandoffDone:
            res = send_pieces(tx, endpoint, req_id, chunks)
            return HandoffDone(req_id, ok=True, chunks=res.sent)

        holds = HoldServer(cfg, codec, push, tx.free, port=0, tp_size=1, total_heads=4)
        fetchers = [
            Fetcher(cfg, codec, rx.endpoint, tp_rank=r, tp_size=2) for r, rx in enumerate(rxs)
        ]
        try:
            holds.hold("h", stage(tx, keys, fulls), 2 * CHUNK)
            assert fetchers[0].fetch(holds.endpoint, "h").chunks == 2
            assert holds.outstanding() == 1  # rank 1 has not fetched yet
            with pytest.raises(FetchError) as exc:  # one-shot per rank
                fetchers[0].fetch(holds.endpoint, "h")
            assert exc.value.code is ErrorCode.UNKNOWN_LEASE
            assert fetchers[1].fetch(holds.endpoint, "h").chunks == 2
            assert holds.outstanding() == 0
            assert tx.buffer.free_count == tx.buffer.num_slots
            for rx in rxs:
                assert load_rank(rx, keys, 1) == [heads_of(f, rx.layout) for f in fulls]
            bad = Fetcher(cfg, codec, rxs[0].endpoint, tp_rank=0, tp_size=3)
            try:  # 3 decoder ranks cannot split 4 heads: refused naming both
                with pytest.raises(FetchError, match="receiver tp_size=3") as exc:
                    bad.fetch(holds.endpoint, "h")
                assert exc.value.code is ErrorCode.BAD_REQUEST
            finally:
                bad.close()
        finally:
            for f in fetchers:
                f.close()
            holds.close()


def test_hello_ack_states_the_receiver_tp_shape_and_rank_ports() -> None:
    """A decoder configured with a per-rank port list: every rank's HelloAck names its
    rank, the TP size and the list, so a prefiller at another TP size finds each rank."""
    ports = [free_port(), free_port()]
    cfg = make_config(pd_peer_init_port=ports)
    rx = Receiver(cfg, rank_layout(2, 1), NixlTransport(), tp_rank=1, tp_size=2).start()
    try:
        assert rx.port == ports[1]
        with sender(cfg, MODEL) as tx:
            assert tx.receiver_tp(rx.endpoint) == (1, 2, ports)
    finally:
        rx.close()
        rx.transport.close()
