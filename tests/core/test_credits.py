"""The credit path: slots lent ahead (Grant) make a request one control round trip.

Real NIXL agents and ZMQ sockets in one process. A sender that holds a grant writes at
once and sends one ``Push``; bytes arrive bit-exact, dedupe still skips what the receiver
holds (and recovers when the receiver dropped it), stale or expired grants fall back to
Offer/Accept, and unused grants come back to the free pool: nothing leaks.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from lmcache_pd.control import Codec, DealerClient
from lmcache_pd.metrics import Counters
from lmcache_pd.protocol import Error, ErrorCode, Push

from .helpers import CHUNK, fill, hasher, make_config, receiver, sender


def keys_of(rng: np.random.Generator, n: int) -> list[bytes]:
    return hasher().keys(rng.integers(0, 1000, n * CHUNK).tolist())


def wait_until(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_requests_after_hello_take_one_round_trip_and_arrive_bit_exact() -> None:
    cfg = make_config(pd_buffer_size=16 * 16 * 1024)  # 16 slots: grants of up to 4
    rng = np.random.default_rng(1)
    with receiver(cfg) as rx, sender(cfg) as tx:
        for i in range(5):
            keys = keys_of(rng, 1 + i % 3)
            chunks, data = fill(tx, keys, rng)
            res = tx.send(rx.endpoint, f"r{i}", chunks)
            tx.free([c.slot for c in chunks])
            assert (res.sent, res.bad) == (len(keys), 0)
            assert [rx.read(k) for k in keys] == data
        # every request went by Push: no Offer/Accept, no Done
        assert tx.counters["pushes"] == 5 and rx.counters["pushes"] == 5
        assert rx.counters["requests"] == 5
        usage = rx.slot_usage()
        assert usage["leased"] == 0
        assert usage["free"] + usage["ready"] + usage["granted"] == usage["total"]
        assert usage["granted"] > 0  # the next request's slots are already lent


def test_request_larger_than_the_grant_takes_the_offer_path() -> None:
    cfg = make_config(pd_buffer_size=8 * 16 * 1024)  # grants of at most 4
    rng = np.random.default_rng(2)
    with receiver(cfg) as rx, sender(cfg) as tx:
        chunks, data = fill(tx, keys_of(rng, 5), rng)
        res = tx.send(rx.endpoint, "big", chunks)
        assert res.sent == 5 and tx.counters["pushes"] == 0
        # the Offer took the sender's unused grant back (no Busy), the reply lent anew
        assert rx.counters["busy"] == 0
        assert [rx.read(c.key) for c in chunks] == data


def test_shared_prefix_is_skipped_without_asking() -> None:
    cfg = make_config(pd_buffer_size=16 * 16 * 1024)
    rng = np.random.default_rng(3)
    with receiver(cfg) as rx, sender(cfg) as tx:
        tokens = rng.integers(0, 1000, 4 * CHUNK).tolist()
        first = hasher().keys(tokens[: 2 * CHUNK])
        both = hasher().keys(tokens)
        a, _ = fill(tx, first, rng)
        tx.send(rx.endpoint, "a", a)
        b, data = fill(tx, both, rng)
        res = tx.send(rx.endpoint, "b", b)
        assert (res.sent, res.dedup) == (2, 2)
        assert tx.counters["pushes"] == 2
        assert [rx.read(k) for k in both[2:]] == data[2:]


def test_chunks_the_receiver_dropped_are_sent_again() -> None:
    cfg = make_config(pd_buffer_size=16 * 16 * 1024)
    rng = np.random.default_rng(4)
    with receiver(cfg) as rx, sender(cfg) as tx:
        keys = keys_of(rng, 2)
        a, data = fill(tx, keys, rng)
        tx.send(rx.endpoint, "a", a)
        rx.drop(keys)  # evicted behind the sender's back
        res = tx.send(rx.endpoint, "again", a)
        assert res.sent == 2 and res.dedup == 0
        assert [rx.read(k) for k in keys] == data


def test_other_senders_chunks_are_learned_from_replies() -> None:
    cfg = make_config(pd_buffer_size=32 * 16 * 1024)
    rng = np.random.default_rng(5)
    with receiver(cfg) as rx, sender(cfg) as one, sender(cfg) as two:
        keys = keys_of(rng, 2)
        a, _ = fill(one, keys, rng)
        one.send(rx.endpoint, "from-one", a)
        warm, _ = fill(two, keys_of(rng, 1), rng)
        two.send(rx.endpoint, "warm-up", warm)  # its reply lists what `one` stored
        b, _ = fill(two, keys, rng)
        res = two.send(rx.endpoint, "from-two", b)
        assert (res.sent, res.dedup) == (0, 2)


def test_stale_grant_is_not_used_and_unused_grants_come_back() -> None:
    cfg = make_config(pd_buffer_size=16 * 16 * 1024, pd_lease_ttl_s=0.6)
    rng = np.random.default_rng(6)
    with receiver(cfg) as rx, sender(cfg) as tx:
        chunks, _ = fill(tx, keys_of(rng, 1), rng)
        tx.send(rx.endpoint, "first", chunks)
        assert tx.counters["pushes"] == 1
        time.sleep(0.4)  # past half the grant's life: the sender must not write into it
        later, data = fill(tx, keys_of(rng, 1), rng)
        tx.send(rx.endpoint, "later", later)
        assert tx.counters["pushes"] == 1  # went by Offer/Accept
        assert rx.read(later[0].key) == data[0]
        assert wait_until(lambda: rx.slot_usage()["granted"] == 0, 3.0)
        usage = rx.slot_usage()
        assert usage["free"] + usage["ready"] == usage["total"]
        assert rx.counters["grant_expiries"] >= 1


def test_a_sender_gone_with_a_grant_leaks_nothing() -> None:
    cfg = make_config(pd_buffer_size=16 * 16 * 1024, pd_lease_ttl_s=0.5)
    with receiver(cfg) as rx:
        with sender(cfg) as tx:
            chunks, _ = fill(tx, keys_of(np.random.default_rng(7), 1), np.random.default_rng(7))
            tx.send(rx.endpoint, "x", chunks)
        assert rx.slot_usage()["granted"] > 0
        assert wait_until(lambda: rx.slot_usage()["granted"] == 0, 3.0)
        usage = rx.slot_usage()
        assert usage["leased"] == 0 and usage["free"] + usage["ready"] == usage["total"]


def test_push_on_an_unknown_grant_or_malformed_is_refused() -> None:
    cfg = make_config(pd_buffer_size=16 * 16 * 1024)
    with receiver(cfg) as rx, sender(cfg) as tx:
        chunks, _ = fill(tx, keys_of(np.random.default_rng(8), 1), np.random.default_rng(8))
        tx.send(rx.endpoint, "x", chunks)  # connects; the peer identity is the sender's
        codec = Codec(cfg.auth_secret(), cfg.pd_max_frame_bytes)
        stranger = DealerClient(tx._ctx, codec, rx.endpoint, Counters("t"))
        try:
            reply, _ = stranger.request(
                Push(req_id="p", lease=999, keys=[b"k" * 16], nbytes=[1], checksums=[0]),
                (),
                3.0,
            )
            assert isinstance(reply, Error) and reply.code is ErrorCode.UNKNOWN_PEER
        finally:
            stranger.close()
        peer = next(iter(tx._peers.values()))
        grant = peer.grant
        assert grant is not None
        with peer.lock:
            reply, _ = peer.client.request(
                Push(req_id="m", lease=grant.lease, keys=[b"short"], nbytes=[1], checksums=[0]),
                (),
                3.0,
            )
            assert isinstance(reply, Error) and reply.code is ErrorCode.BAD_REQUEST
            assert "16 bytes" in reply.message
            peer.grant = None  # taken back by the receiver
            reply, _ = peer.client.request(
                Push(req_id="u", lease=grant.lease, keys=[], nbytes=[], checksums=[]), (), 3.0
            )
            assert isinstance(reply, Error) and reply.code is ErrorCode.UNKNOWN_LEASE
        usage = rx.slot_usage()
        assert usage["granted"] == 0 and usage["free"] + usage["ready"] == usage["total"]
        # the sender recovers: the next request goes by Offer/Accept and gets a new grant
        more, data = fill(tx, keys_of(np.random.default_rng(9), 1), np.random.default_rng(9))
        assert tx.send(rx.endpoint, "after", more).sent == 1
        assert rx.read(more[0].key) == data[0]


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_grants_never_take_more_than_half_the_buffer(chunks: int) -> None:
    cfg = make_config(pd_buffer_size=8 * 16 * 1024)
    rng = np.random.default_rng(10 + chunks)
    with receiver(cfg) as rx, sender(cfg) as a, sender(cfg) as b, sender(cfg) as c:
        for i, tx in enumerate((a, b, c)):
            got, _ = fill(tx, keys_of(rng, min(chunks, 2)), rng)
            tx.send(rx.endpoint, f"s{i}", got)
        assert rx.slot_usage()["granted"] <= 4


@pytest.mark.parametrize("group_bytes", [0, 16 * 1024, 1 << 30])
def test_write_group_size_is_configurable(group_bytes: int) -> None:
    """One WRITE per request (0, as over TCP), one per chunk, or a big group: same bytes."""
    cfg = make_config(pd_buffer_size=32 * 16 * 1024, pd_write_group_bytes=group_bytes)
    rng = np.random.default_rng(20)
    with receiver(cfg) as rx, sender(cfg) as tx:
        for i in range(2):  # the first by Offer/Accept, the second by Push
            chunks, data = fill(tx, keys_of(rng, 4), rng)
            assert tx.send(rx.endpoint, f"g{i}", chunks).sent == 4
            assert [rx.read(c.key) for c in chunks] == data
            tx.free([c.slot for c in chunks])


def test_negative_write_group_size_is_refused() -> None:
    from lmcache_pd.config import ConfigError

    with pytest.raises(ConfigError, match="pd_write_group_bytes"):
        make_config(pd_write_group_bytes=-1)


@pytest.mark.parametrize("by_notif", [True, False])
def test_answers_come_by_nixl_notification_unless_turned_off(by_notif: bool) -> None:
    """pd_reply_by_notif (default): the receiver answers each Push/Done with a signed
    NIXL notification to the sender's agent, not a ZMQ reply; off, every answer is a
    ZMQ reply. Both paths, credit and offer, land the same bytes."""
    cfg = make_config(pd_buffer_size=8 * 16 * 1024, pd_reply_by_notif=by_notif)
    rng = np.random.default_rng(11)
    with receiver(cfg) as rx, sender(cfg) as tx:
        for i, n in enumerate((1, 2, 5)):  # 5 > the grant of 4: the offer path (Done)
            chunks, data = fill(tx, keys_of(rng, n), rng)
            assert tx.send(rx.endpoint, f"n{i}", chunks).sent == n
            tx.free([c.slot for c in chunks])
            assert [rx.read(c.key) for c in chunks] == data
        assert tx.counters["pushes"] == 2
        # counted right after the notification left: the sender may be faster
        assert wait_until(lambda: rx.counters["notif_replies"] == (3 if by_notif else 0), 2.0)
        assert rx.counters["notif_reply_failures"] == 0
        assert rx.slot_usage()["leased"] == 0
