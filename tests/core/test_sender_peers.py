"""A prefiller's connections to many decoders (xPyD): bounded, parallel, reconnecting.

Real NIXL agents and ZMQ sockets in one process.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lmcache_pd import sender as sender_mod
from lmcache_pd.protocol import ErrorCode
from lmcache_pd.receiver import Receiver
from lmcache_pd.sender import HandoffError

from .helpers import CHUNK, LAYOUT, fill, hasher, make_config, receiver, sender


def test_an_unreachable_decoder_does_not_hold_up_the_others() -> None:
    cfg = make_config(pd_connect_timeout_s=2.0)
    rng = np.random.default_rng(1)
    with receiver(cfg) as rx, sender(cfg) as tx:
        dead_chunks, _ = fill(tx, hasher().keys(rng.integers(0, 999, CHUNK).tolist()), rng)
        errors: list[BaseException] = []

        def push_to_nowhere() -> None:
            try:
                tx.send("tcp://127.0.0.1:9", "dead", dead_chunks)
            except HandoffError as exc:
                errors.append(exc)

        stuck = threading.Thread(target=push_to_nowhere)
        stuck.start()
        time.sleep(0.2)  # the dead Hello is now waiting for its deadline
        chunks, data = fill(tx, hasher().keys(rng.integers(0, 999, 2 * CHUNK).tolist()), rng)
        t0 = time.monotonic()
        assert tx.send(rx.endpoint, "live", chunks).sent == 2
        assert time.monotonic() - t0 < 1.5  # not behind the 2 s dead Hello
        assert [rx.read(c.key) for c in chunks] == data
        stuck.join(10)
        assert errors and errors[0].code is ErrorCode.TIMEOUT  # type: ignore[attr-defined]


def test_connections_are_bounded_and_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender_mod, "MAX_PEERS", 2)
    cfg = make_config()
    rng = np.random.default_rng(2)
    with receiver(cfg) as a, receiver(cfg) as b, receiver(cfg) as c, sender(cfg) as tx:
        for rx in (a, b, c, a):
            chunks, data = fill(tx, hasher().keys(rng.integers(0, 999, CHUNK).tolist()), rng)
            assert tx.send(rx.endpoint, "r", chunks).sent == 1
            assert rx.read(chunks[0].key) == data[0]
            tx.free([ch.slot for ch in chunks])
            assert len(tx._peers) <= 2
        assert list(tx._peers) == [c.endpoint, a.endpoint]  # b, least recently used, closed


def test_one_sender_pushing_from_two_threads_to_two_decoders_loses_nothing() -> None:
    """A prefiller's push thread and fetch threads share one sender and one NIXL agent.
    Before the transport serialized its agent calls (one lock), two threads
    progressing the same UCX worker lost WRITE completions after a few dozen handoffs:
    every later WRITE stayed "in progress" until its deadline."""
    cfg = make_config(pd_buffer_size=64 * LAYOUT.bytes_per_chunk(CHUNK))
    rounds, errors = 60, []
    with receiver(cfg) as rx_a, receiver(cfg) as rx_b, sender(cfg) as tx:

        def push(rx: Receiver, tag: str, seed: int) -> None:
            rng = np.random.default_rng(seed)
            for i in range(rounds):
                keys = hasher().keys(rng.integers(0, 1 << 30, 2 * CHUNK).tolist())
                chunks, data = fill(tx, keys, rng)
                try:
                    assert tx.send(rx.endpoint, f"{tag}{i}", chunks).sent == 2
                    assert [rx.read(k) for k in keys] == data
                except (HandoffError, AssertionError) as exc:
                    errors.append(f"{tag}{i}: {exc}")
                    return
                finally:
                    tx.free([c.slot for c in chunks])

        threads = [
            threading.Thread(target=push, args=(rx, tag, seed))
            for rx, tag, seed in ((rx_a, "a", 1), (rx_b, "b", 2))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert tx.buffer.free_count == tx.buffer.num_slots
        assert rx_a.slot_usage()["leased"] == rx_b.slot_usage()["leased"] == 0
