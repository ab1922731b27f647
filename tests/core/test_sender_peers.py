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
from lmcache_pd.sender import HandoffError

from .helpers import CHUNK, fill, hasher, make_config, receiver, sender


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
