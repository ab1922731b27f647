"""Sender/receiver logic over the in-process memory transport: leases, Busy, dedupe,
expiry, checksum failures (found at a chunk's first read), cancels. Real ZMQ control
plane on 127.0.0.1, real slot buffers, no NIXL: each test takes well under a second
(the NIXL path is covered by test_handoff.py and test_faults.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import zmq

from lmcache_pd import checksum
from lmcache_pd.config import Config
from lmcache_pd.control import Codec, DealerClient, NotifInbox
from lmcache_pd.kernels import PagedFormat, scatter_checksum
from lmcache_pd.kernels import gather as paged_gather
from lmcache_pd.metrics import Counters
from lmcache_pd.protocol import (
    NO_CHECKSUM,
    Accept,
    Committed,
    Compat,
    Done,
    Error,
    ErrorCode,
    Hello,
    HelloAck,
    LeaseReply,
    Offer,
)
from lmcache_pd.receiver import Receiver
from lmcache_pd.sender import HandoffError, OutChunk, Sender
from lmcache_pd.tiers import build_tiers
from lmcache_pd.transports.base import Backoff, TransportError
from lmcache_pd.transports.memory import MemoryFabric, MemoryTransport

from .helpers import CHUNK, LAYOUT, hasher, make_config

CHUNK_BYTES = LAYOUT.bytes_per_chunk(CHUNK)


class CorruptingTransport(MemoryTransport):
    """Flips one byte of the first ``bad`` chunk copies (corruption in flight)."""

    def __init__(self, fabric: MemoryFabric, bad: int) -> None:
        super().__init__(fabric=fabric)
        self.bad = bad

    def _copy(self, dst: int, src: int, nbytes: int) -> None:
        super()._copy(dst, src, nbytes)
        if self.bad > 0:
            self.bad -= 1
            view = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(dst))
            view[0] ^= 0xFF


class MutedTransport(MemoryTransport):
    """Copies the bytes but never delivers the notifications (lost in flight)."""

    def write(self, local, local_idx, remote, remote_idx, notif=b""):  # type: ignore[no-untyped-def]
        return super().write(local, local_idx, remote, remote_idx, b"")


@pytest.fixture
def fabric() -> MemoryFabric:
    return MemoryFabric()


@contextmanager
def pair(
    cfg: Config,
    fabric: MemoryFabric,
    make_tx: Callable[[MemoryFabric], MemoryTransport] | None = None,
) -> Iterator[tuple[Receiver, Sender]]:
    rx = Receiver(cfg, LAYOUT, MemoryTransport(fabric=fabric), port=0).start()
    tx_transport = make_tx(fabric) if make_tx else MemoryTransport(fabric=fabric)
    tx = Sender(cfg, LAYOUT, tx_transport)
    try:
        yield rx, tx
    finally:
        tx.close()
        rx.close()


def fill(tx: Sender, keys: Sequence[bytes], seed: int) -> tuple[list[OutChunk], list[bytes]]:
    rng = np.random.default_rng(seed)
    chunks, data = [], []
    for key, slot in zip(keys, tx.alloc(len(keys)), strict=True):
        view = np.frombuffer(tx.buffer.view(slot, CHUNK_BYTES), dtype=np.uint8)
        view[:] = rng.integers(0, 256, CHUNK_BYTES, dtype=np.uint8)
        data.append(view.tobytes())
        chunks.append(OutChunk(key, slot, CHUNK_BYTES))
    return chunks, data


def keys(n: int, start: int = 0) -> list[bytes]:
    return hasher().keys(list(range(start, start + n * CHUNK)))


def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class RawSender:
    """Speaks the protocol by hand (to hold leases a real Sender would finish)."""

    def __init__(self, cfg: Config, rx: Receiver, fabric: MemoryFabric) -> None:
        self.ctx = zmq.Context()
        self.transport = MemoryTransport(fabric=fabric)
        self.client = DealerClient(
            self.ctx, Codec(cfg.auth_secret(), cfg.pd_max_frame_bytes), rx.endpoint, Counters("raw")
        )
        compat = Compat.of(LAYOUT, cfg.chunk_size, cfg.hash_algorithm)
        reply, _ = self.client.request(
            Hello(agent=self.transport.name, compat=compat), [self.transport.metadata()], 3.0
        )
        assert isinstance(reply, HelloAck)
        self.ack = reply

    def offer(self, req_id: str, offer_keys: list[bytes]) -> object:
        n = len(offer_keys)
        msg = Offer(req_id=req_id, keys=offer_keys, nbytes=[CHUNK_BYTES] * n, checksums=[1] * n)
        return self.client.request(msg, (), 3.0)[0]

    def close(self) -> None:
        self.client.close()
        self.transport.close()
        self.ctx.term()


def test_round_trip_moves_exact_bytes_and_frees_slots(fabric: MemoryFabric) -> None:
    with pair(make_config(), fabric) as (rx, tx):
        chunks, data = fill(tx, keys(3), seed=1)
        res = tx.send(rx.endpoint, "r1", chunks)
        assert (res.chunks, res.sent, res.dedup, res.bad) == (3, 3, 0, 0)
        assert res.bytes == 3 * CHUNK_BYTES
        assert [rx.read(c.key) for c in chunks] == data
        usage = rx.slot_usage()
        assert usage["leased"] == 0 and usage["ready"] == 3
        assert rx.counters["chunks"] == 3 and tx.counters["chunks"] == 3


def test_dedupe_resends_only_what_the_receiver_lacks(fabric: MemoryFabric) -> None:
    with pair(make_config(), fabric) as (rx, tx):
        first, _ = fill(tx, keys(2), seed=2)
        tx.send(rx.endpoint, "a", first)
        # same prefix plus one more chunk: the two held ones are listed in `have`
        more, data = fill(tx, keys(3), seed=3)
        res = tx.send(rx.endpoint, "b", more)
        assert (res.sent, res.dedup) == (1, 2)
        assert res.bytes == CHUNK_BYTES
        assert rx.read(more[2].key) == data[2]
        assert rx.counters["dedupe_hits"] == 2 and tx.counters["dedupe_hits"] == 2
        again = tx.send(rx.endpoint, "c", more)
        assert (again.sent, again.dedup, again.bytes) == (0, 3, 0)


def test_busy_then_lease_expiry_frees_the_slots(fabric: MemoryFabric) -> None:
    cfg = make_config(
        pd_buffer_size=4 * CHUNK_BYTES,
        pd_lease_ttl_s=0.6,
        pd_busy_max_retries=2,
        pd_busy_retry_after_s=0.01,
    )
    with pair(cfg, fabric) as (rx, tx):
        raw = RawSender(cfg, rx, fabric)
        try:
            held = raw.offer("hold", keys(4, start=1000))
            assert isinstance(held, Accept) and len(held.slots) == 4
            assert rx.slot_usage()["leased"] == 4
            chunks, data = fill(tx, keys(1), seed=4)
            with pytest.raises(HandoffError, match="stayed busy") as info:
                tx.send(rx.endpoint, "blocked", chunks)
            assert info.value.code is ErrorCode.TIMEOUT
            assert tx.counters["busy"] == 3 and rx.counters["busy"] == 3
            # the holder never sends Done: its lease expires and the slots come back
            assert wait_until(lambda: rx.slot_usage()["leased"] == 0, 5.0)
            assert rx.counters["lease_expiries"] == 1
            late = raw.client.request(Done(req_id="hold", lease=held.lease), (), 3.0)[0]
            assert isinstance(late, Error) and late.code is ErrorCode.UNKNOWN_LEASE
            res = tx.send(rx.endpoint, "after", chunks)
            assert res.sent == 1 and rx.read(chunks[0].key) == data[0]
        finally:
            raw.close()


def test_offer_beyond_the_buffer_and_bad_keys_are_refused(fabric: MemoryFabric) -> None:
    cfg = make_config(pd_buffer_size=2 * CHUNK_BYTES)
    with pair(cfg, fabric) as (rx, _tx):
        raw = RawSender(cfg, rx, fabric)
        try:
            too_many = raw.offer("big", keys(3))
            assert isinstance(too_many, Error) and too_many.code is ErrorCode.BAD_REQUEST
            assert "exceed the receive buffer" in too_many.message
            short_key = raw.offer("short", [b"k" * 8])
            assert isinstance(short_key, Error) and "16 bytes" in short_key.message
            assert rx.slot_usage()["leased"] == 0
        finally:
            raw.close()


def test_busy_clears_when_ready_chunks_can_be_evicted(fabric: MemoryFabric) -> None:
    """Unpinned ready chunks are evicted (LRU) for a new lease; pinned ones are not."""
    cfg = make_config(pd_buffer_size=2 * CHUNK_BYTES, pd_busy_max_retries=0)
    with pair(cfg, fabric) as (rx, tx):
        old, _ = fill(tx, keys(2), seed=5)
        tx.send(rx.endpoint, "old", old)
        tx.free([c.slot for c in old])  # the sender's buffer is 2 slots too
        pinned = rx.acquire([old[0].key, old[1].key])
        assert all(p is not None for p in pinned)
        new, data = fill(tx, keys(1, start=500), seed=6)
        with pytest.raises(HandoffError, match="stayed busy"):
            tx.send(rx.endpoint, "new", new)
        rx.release([old[0].key])
        assert tx.send(rx.endpoint, "new", new).sent == 1
        assert rx.read(new[0].key) == data[0]
        assert rx.read(old[0].key) is None and rx.read(old[1].key) is not None
        rx.release([old[1].key])


def test_corrupted_chunk_is_dropped_at_its_first_read_never_returned(
    fabric: MemoryFabric,
) -> None:
    """No checksum pass on landing: the commit goes through, the first read of the
    corrupted chunk finds it, drops it and counts it; the others read back exact."""
    with pair(make_config(), fabric, lambda f: CorruptingTransport(f, bad=1)) as (rx, tx):
        chunks, data = fill(tx, keys(3), seed=7)
        res = tx.send(rx.endpoint, "bad", chunks)
        assert (res.sent, res.bad) == (3, 0)
        assert rx.counters["checksum_failures"] == 0 and rx.lookup([chunks[0].key]) == 1
        assert rx.read(chunks[0].key) is None  # never handed on
        assert rx.counters["checksum_failures"] == 1 and tx.counters["checksum_failures"] == 0
        assert rx.lookup([chunks[0].key]) == 0 and rx.acquire([chunks[0].key]) == [None]
        rx.release([chunks[0].key])
        assert [rx.read(c.key) for c in chunks[1:]] == data[1:]
        assert rx.counters["checksum_failures"] == 1
        usage = rx.slot_usage()
        assert usage["leased"] == 0 and usage["ready"] == 2 and usage["rejected"] == 0
        assert usage["free"] + usage["granted"] == usage["total"] - 2
        # a resend of the same request moves only the dropped chunk
        res = tx.send(rx.endpoint, "bad-again", chunks)
        assert (res.sent, res.dedup) == (1, 2)
        assert rx.read(chunks[0].key) == data[0]


def _paged(n_blocks: int = 4) -> list[torch.Tensor]:
    """Paged KV of LAYOUT in the flash-attn format ``[2, blocks, block, heads, dim]``."""
    shape = (2, n_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_size)
    return [torch.zeros(shape, dtype=torch.float32) for _ in range(LAYOUT.num_layers)]


def test_engine_scatter_checks_the_digest_and_a_mismatch_drops_the_chunk(
    fabric: MemoryFabric,
) -> None:
    """The engine's path: acquire_checked hands out the sender's digest with the bytes,
    the scatter hashes what it reads (same pass), settle reports. The corrupted chunk is
    dropped (its slot freed at release), the good one is verified once and for all."""
    with pair(make_config(), fabric, lambda f: CorruptingTransport(f, bad=1)) as (rx, tx):
        chunks, data = fill(tx, keys(2, start=40), seed=17)
        tx.send(rx.endpoint, "load", chunks)
        ks = [c.key for c in chunks]
        views, sums = rx.acquire_checked(ks)
        assert sums == [checksum.chunk_digest(d) for d in data]  # the sender's digests
        slots = torch.arange(CHUNK, dtype=torch.int64)
        caches = _paged()
        got = [scatter_checksum(torch.frombuffer(bytearray(v), dtype=torch.uint8), caches,
                                slots, LAYOUT, PagedFormat.FLASH_ATTN) for v in views]  # fmt: skip
        assert got[0] != sums[0] and got[1] == sums[1]
        for key, expected, digest in zip(ks, sums, got, strict=True):
            rx.settle(key, expected, digest == expected)
        assert rx.counters["checksum_failures"] == 1 and rx.lookup(ks) == 0
        assert rx.lookup(ks[1:]) == 1
        assert rx.slot_usage()["rejected"] == 1  # still pinned by this reader
        rx.settle(ks[0], sums[0], False)  # a second report of the same chunk: counted once
        assert rx.counters["checksum_failures"] == 1
        rx.release(ks)
        usage = rx.slot_usage()
        assert usage["rejected"] == 0 and usage["ready"] == 1
        assert usage["free"] + usage["granted"] == usage["total"] - 1
        (view,), (digest,) = rx.acquire_checked(ks[1:])
        assert digest == NO_CHECKSUM and bytes(view) == data[1]  # verified: not rechecked
        rx.release(ks[1:])
        out = torch.empty(len(data[1]), dtype=torch.uint8)
        paged_gather(caches, slots, out, LAYOUT, PagedFormat.FLASH_ATTN)
        assert out.numpy().tobytes() == data[1]


def test_corrupted_chunk_never_enters_the_tier_store(fabric: MemoryFabric) -> None:
    """The store thread's read checks the digest before the copy: a corrupted chunk is
    dropped and never stored; good ones are stored and count as verified."""
    cfg = make_config(local_cpu=True, max_local_cpu_size=16 * CHUNK_BYTES / 1e9)
    store = build_tiers(cfg, LAYOUT)
    assert store is not None
    rx = Receiver(cfg, LAYOUT, MemoryTransport(fabric=fabric), port=0, store=store).start()
    tx = Sender(cfg, LAYOUT, CorruptingTransport(fabric, bad=1))
    try:
        chunks, data = fill(tx, keys(3, start=60), seed=18)
        assert tx.send(rx.endpoint, "stored", chunks).sent == 3
        assert wait_until(lambda: rx.counters["checksum_failures"] == 1)
        assert wait_until(lambda: store.contains([c.key for c in chunks[1:]]) == 2)
        assert chunks[0].key not in store and rx.lookup([chunks[0].key]) == 0
        assert [store.get(c.key) for c in chunks[1:]] == data[1:]
        assert rx.acquire_checked([c.key for c in chunks[1:]])[1] == [NO_CHECKSUM] * 2
        rx.release([c.key for c in chunks[1:]])
        assert wait_until(lambda: rx.slot_usage()["rejected"] == 0)
    finally:
        tx.close()
        rx.close()
        store.close()


def test_unverified_chunks_pass_when_verification_is_off(fabric: MemoryFabric) -> None:
    cfg = make_config(pd_verify_checksums=False)
    with pair(cfg, fabric, lambda f: CorruptingTransport(f, bad=1)) as (rx, tx):
        chunks, data = fill(tx, keys(1), seed=8)
        assert tx.send(rx.endpoint, "unverified", chunks).sent == 1
        assert rx.read(chunks[0].key) != data[0]  # corrupted, and nobody checked
        assert rx.counters["checksum_failures"] == 0


def test_lost_notifications_end_in_lease_expiry_and_a_timeout_error(
    fabric: MemoryFabric,
) -> None:
    cfg = make_config(pd_lease_ttl_s=0.5, pd_connect_timeout_s=3.0)
    with pair(cfg, fabric, lambda f: MutedTransport(fabric=f)) as (rx, tx):
        chunks, _ = fill(tx, keys(2), seed=9)
        started = time.monotonic()
        with pytest.raises(HandoffError, match="lease expired") as info:
            tx.send(rx.endpoint, "muted", chunks)
        assert info.value.code is ErrorCode.TIMEOUT
        assert time.monotonic() - started < 2.5
        assert rx.counters["lease_expiries"] == 1
        assert rx.slot_usage()["leased"] == 0 and rx.read(chunks[0].key) is None


def test_failed_write_cancels_the_lease_at_once(fabric: MemoryFabric) -> None:
    """The receiver's agent vanishes from the fabric: the WRITE fails at post, the
    sender sends Cancel and the receiver frees the slots without waiting for the TTL."""
    cfg = make_config(pd_lease_ttl_s=30.0)
    with pair(cfg, fabric) as (rx, tx):
        warm, _ = fill(tx, keys(1, start=900), seed=10)
        tx.send(rx.endpoint, "warm", warm)  # Hello done, remote lists prepared
        fabric.leave(rx.transport.name)
        chunks, _ = fill(tx, keys(2), seed=11)
        with pytest.raises(HandoffError, match=r"data transfer .* failed") as info:
            tx.send(rx.endpoint, "lost", chunks)
        assert info.value.code is ErrorCode.TRANSFER
        assert tx.counters["transfer_errors"] == 1
        assert wait_until(lambda: rx.slot_usage()["leased"] == 0, 2.0)
        assert rx.counters["lease_expiries"] == 0


def test_memory_transport_refuses_unregistered_memory(fabric: MemoryFabric) -> None:
    a, b = MemoryTransport(fabric=fabric), MemoryTransport(fabric=fabric)
    try:
        src, dst = bytearray(64), bytearray(64)
        src_addr = np.frombuffer(src, dtype=np.uint8).ctypes.data
        dst_addr = np.frombuffer(dst, dtype=np.uint8).ctypes.data
        a.register(src_addr, 64)
        with pytest.raises(TransportError, match="not registered"):
            a.prep_local([(dst_addr, 64, 0)])
        local = a.prep_local([(src_addr, 64, 0)])
        peer = a.add_peer(b.metadata())
        remote = a.prep_remote(peer, [(dst_addr, 64, 0)])
        with pytest.raises(TransportError, match="unregistered"):
            a.write(local, [0], remote, [0], b"n")
        b.register(dst_addr, 64)
        src[:] = bytes(range(64))
        a.wait(a.write(local, [0], remote, [0], b"n"), 1.0)
        assert dst == src and b.notifications() == [(a.name, b"n")]
        with pytest.raises(TransportError, match="no memory agent"):
            a.add_peer(b"nobody")
    finally:
        a.close()
        b.close()


def test_credit_path_pushes_into_the_grant_in_one_round_trip(fabric: MemoryFabric) -> None:
    with pair(make_config(), fabric) as (rx, tx):
        first, _ = fill(tx, keys(1), seed=12)
        tx.send(rx.endpoint, "first", first)  # HelloAck/Committed lend the next grant
        assert rx.slot_usage()["granted"] > 0
        pushes = tx.counters["pushes"]
        chunks, data = fill(tx, keys(2, start=300), seed=13)
        res = tx.send(rx.endpoint, "credit", chunks)
        assert (res.sent, res.dedup, res.bad) == (2, 0, 0)
        assert tx.counters["pushes"] == pushes + 1 and rx.counters["pushes"] >= 1
        assert [rx.read(c.key) for c in chunks] == data
        assert rx.slot_usage()["leased"] == 0


def test_credit_path_drops_a_corrupted_chunk_at_first_read(fabric: MemoryFabric) -> None:
    transports: list[CorruptingTransport] = []

    def make(f: MemoryFabric) -> MemoryTransport:
        transports.append(CorruptingTransport(f, bad=0))
        return transports[0]

    with pair(make_config(), fabric, make) as (rx, tx):
        warm, _ = fill(tx, keys(1, start=700), seed=14)
        tx.send(rx.endpoint, "warm", warm)
        transports[0].bad = 1
        pushes = tx.counters["pushes"]
        chunks, data = fill(tx, keys(2, start=800), seed=15)
        res = tx.send(rx.endpoint, "bad-credit", chunks)
        assert (res.sent, res.bad) == (2, 0)
        assert tx.counters["pushes"] == pushes + 1
        assert rx.read(chunks[0].key) is None and rx.read(chunks[1].key) == data[1]
        assert rx.counters["checksum_failures"] == 1
        assert rx.slot_usage()["leased"] == 0


def test_unused_grant_is_freed_after_the_lease_ttl(fabric: MemoryFabric) -> None:
    cfg = make_config(pd_lease_ttl_s=0.4)
    with pair(cfg, fabric) as (rx, tx):
        chunks, _ = fill(tx, keys(1), seed=16)
        tx.send(rx.endpoint, "once", chunks)
        assert rx.slot_usage()["granted"] > 0
        assert wait_until(lambda: rx.slot_usage()["granted"] == 0, 5.0)
        assert rx.counters["grant_expiries"] >= 1
        usage = rx.slot_usage()
        assert usage["free"] == usage["total"] - usage["ready"]


class NoNotifyTransport(MemoryTransport):
    """A receiver transport that cannot reach the sender's agent (one-way network)."""

    def notify(self, peer: str, message: bytes) -> None:
        raise TransportError(f"peer {peer!r} unreachable")


def test_an_answer_that_cannot_go_by_notification_goes_over_zmq(
    fabric: MemoryFabric, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config()
    rx = Receiver(cfg, LAYOUT, NoNotifyTransport(fabric=fabric), port=0).start()
    tx = Sender(cfg, LAYOUT, MemoryTransport(fabric=fabric))
    try:
        chunks, data = fill(tx, keys(2), seed=21)
        with caplog.at_level("WARNING"):
            assert tx.send(rx.endpoint, "oneway", chunks).sent == 2
        assert [rx.read(c.key) for c in chunks] == data
        assert rx.counters["notif_reply_failures"] == 1 and rx.counters["notif_replies"] == 0
        assert "sent over ZMQ instead" in caplog.text and "pd_reply_by_notif" in caplog.text
    finally:
        tx.close()
        rx.close()


def test_notification_inbox_takes_only_signed_expected_answers(fabric: MemoryFabric) -> None:
    """The sender's inbox files signed LeaseReply notifications by (agent, lease): a
    forged one (wrong key) is dropped and counted, one nobody waits for is dropped,
    other users' notifications are ignored, and an answer is taken once."""
    cfg = make_config()
    codec = Codec(cfg.auth_secret(), cfg.pd_max_frame_bytes)
    forger = Codec(b"not-the-shared-secret-at-all", cfg.pd_max_frame_bytes)
    rx_side, tx_side = MemoryTransport(fabric=fabric), MemoryTransport(fabric=fabric)
    peer = rx_side.add_peer(tx_side.metadata())
    agent = tx_side.add_peer(rx_side.metadata())
    counters = Counters("inbox")
    inbox = NotifInbox(tx_side.notifications, codec, counters)
    answer = Committed(req_id="r", stored=[0], bad=[])
    try:
        inbox.expect(agent, 7)
        rx_side.notify(peer, forger.pack_notif(LeaseReply(lease=7, reply=answer)))
        rx_side.notify(peer, codec.pack_notif(LeaseReply(lease=8, reply=answer)))  # unexpected
        rx_side.notify(peer, b"lmcpd:7:0:1")  # a data notification: not ours to take
        assert inbox.take(agent, 7) is None
        assert counters["auth_failures"] == 1
        rx_side.notify(peer, codec.pack_notif(LeaseReply(lease=7, reply=answer)))
        assert inbox.take(agent, 7) == answer
        assert inbox.take(agent, 7) is None  # taken once
        inbox.expect(agent, 9)
        inbox.forget(agent, 9)  # gave up (timeout): a late answer is dropped
        rx_side.notify(peer, codec.pack_notif(LeaseReply(lease=9, reply=answer)))
        assert inbox.take(agent, 9) is None
        with pytest.raises(TransportError):
            rx_side.notify("nobody", b"x")
    finally:
        rx_side.close()
        tx_side.close()


def test_backoff_holds_the_first_gap_then_grows_to_its_cap() -> None:
    gaps = Backoff(first_s=50e-6, hold_s=60.0, max_s=250e-6)
    assert [gaps.next() for _ in range(5)] == [50e-6] * 5  # within the hold
    gaps = Backoff(first_s=50e-6, hold_s=0.0, max_s=250e-6)
    seq = [gaps.next() for _ in range(8)]
    assert seq[0] == 50e-6 and seq[1] == pytest.approx(75e-6)
    assert seq == sorted(seq) and seq[-1] == 250e-6
    gaps.reset()
    assert gaps.next() == 50e-6
