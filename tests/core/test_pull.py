"""The standard PD contract's core: a prefiller holds chunks, a decoder fetches them.

Real NIXL agents and ZMQ sockets in one process: a :class:`HoldServer` in front of a
sender, a :class:`Fetcher` next to a receiver. Bytes arrive bit-exact through the same
Offer/Accept/WRITE/Done handoff as push-ahead; unknown, expired and repeated fetches are
refused without touching other holds; no slot leaks on either side.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from lmcache_pd.config import Config
from lmcache_pd.control import Codec
from lmcache_pd.protocol import (
    DecodeParams,
    ErrorCode,
    HandoffDone,
    KVTransferParams,
    standard_prefill_params,
)
from lmcache_pd.pull import Fetcher, FetchError, HoldServer
from lmcache_pd.receiver import Receiver
from lmcache_pd.sender import HandoffError, OutChunk, Sender

from .helpers import CHUNK, fill, hasher, make_config, receiver, sender


def push_fn(tx: Sender):
    def push(endpoint: str, req_id: str, chunks: list[OutChunk], total: int) -> HandoffDone:
        try:
            res = tx.send(endpoint, req_id, chunks)
            return HandoffDone(req_id, ok=True, chunks=res.sent, dedup=res.dedup)
        except HandoffError as exc:
            return HandoffDone(req_id, ok=False, error=str(exc))

    return push


@contextmanager
def pair(cfg: Config) -> Iterator[tuple[Sender, HoldServer, Receiver, Fetcher]]:
    codec = Codec(cfg.auth_secret(), cfg.pd_max_frame_bytes)
    with receiver(cfg) as rx, sender(cfg) as tx:
        holds = HoldServer(cfg, codec, push_fn(tx), tx.free, port=0)
        fetcher = Fetcher(cfg, codec, rx.endpoint)
        try:
            yield tx, holds, rx, fetcher
        finally:
            fetcher.close()
            holds.close()


def test_fetch_moves_held_chunks_bit_exact_and_frees_slots() -> None:
    cfg = make_config()
    rng = np.random.default_rng(5)
    with pair(cfg) as (tx, holds, rx, fetcher):
        keys = hasher().keys(rng.integers(0, 1000, 3 * CHUNK).tolist())
        chunks, data = fill(tx, keys, rng)
        holds.hold("h1", chunks, 3 * CHUNK)
        assert tx.buffer.free_count == tx.buffer.num_slots - 3
        done = fetcher.fetch(holds.endpoint, "h1")
        assert (done.ok, done.chunks, done.dedup) == (True, 3, 0)
        assert [rx.read(k) for k in keys] == data
        assert holds.outstanding() == 0
        assert tx.buffer.free_count == tx.buffer.num_slots
        assert rx.slot_usage()["leased"] == 0


def test_second_fetch_dedupes_against_what_the_receiver_holds() -> None:
    cfg = make_config()
    rng = np.random.default_rng(6)
    with pair(cfg) as (tx, holds, rx, fetcher):
        keys = hasher().keys(rng.integers(0, 1000, 4 * CHUNK).tolist())
        first, _ = fill(tx, keys[:2], rng)
        holds.hold("a", first, 2 * CHUNK)
        fetcher.fetch(holds.endpoint, "a")
        again, _ = fill(tx, keys, rng)
        holds.hold("b", again, 4 * CHUNK)
        done = fetcher.fetch(holds.endpoint, "b")
        assert (done.chunks, done.dedup) == (2, 2)
        assert rx.lookup(keys) == 4


def test_unknown_and_repeated_fetches_are_refused_without_harm() -> None:
    cfg = make_config()
    rng = np.random.default_rng(7)
    with pair(cfg) as (tx, holds, _rx, fetcher):
        keys = hasher().keys(rng.integers(0, 1000, 2 * CHUNK).tolist())
        chunks, _ = fill(tx, keys, rng)
        holds.hold("mine", chunks, 2 * CHUNK)
        with pytest.raises(FetchError) as err:
            fetcher.fetch(holds.endpoint, "never-issued")
        assert err.value.code is ErrorCode.UNKNOWN_LEASE
        assert holds.outstanding() == 1  # the refused fetch touched nothing else
        fetcher.fetch(holds.endpoint, "mine")
        with pytest.raises(FetchError) as again:
            fetcher.fetch(holds.endpoint, "mine")  # one-shot
        assert again.value.code is ErrorCode.UNKNOWN_LEASE
        assert holds.counters["fetch_refused"] == 2
        assert tx.buffer.free_count == tx.buffer.num_slots


def test_fetch_for_another_rank_is_refused() -> None:
    cfg = make_config()
    codec = Codec(cfg.auth_secret(), cfg.pd_max_frame_bytes)
    with pair(cfg) as (_tx, holds, rx, _fetcher):
        other = Fetcher(cfg, codec, rx.endpoint, tp_rank=1)
        try:
            with pytest.raises(FetchError) as err:
                other.fetch(holds.endpoint, "x")
            assert err.value.code is ErrorCode.BAD_REQUEST
            assert "rank" in str(err.value)
        finally:
            other.close()


def test_unfetched_hold_expires_and_frees_its_slots() -> None:
    cfg = make_config(pd_lease_ttl_s=0.3)
    rng = np.random.default_rng(8)
    with pair(cfg) as (tx, holds, _rx, fetcher):
        chunks, _ = fill(tx, hasher().keys(rng.integers(0, 1000, 2 * CHUNK).tolist()), rng)
        holds.hold("late", chunks, 2 * CHUNK)
        deadline = time.monotonic() + 5
        # the server thread takes the hold out of the table, then frees its slots: wait
        # for both (CI once read between the two: 6 of 8 slots free)
        while (
            holds.outstanding() or tx.buffer.free_count < tx.buffer.num_slots
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holds.outstanding() == 0
        assert holds.counters["hold_expiries"] == 1
        assert tx.buffer.free_count == tx.buffer.num_slots
        with pytest.raises(FetchError):
            fetcher.fetch(holds.endpoint, "late")


def test_dead_prefiller_fails_the_fetch_within_the_deadline() -> None:
    cfg = make_config(pd_connect_timeout_s=0.5, pd_transfer_timeout_s=0.5)
    codec = Codec(cfg.auth_secret(), cfg.pd_max_frame_bytes)
    with sender(cfg) as tx:
        holds = HoldServer(cfg, codec, push_fn(tx), tx.free, port=0)
        endpoint = holds.endpoint
        holds.close()  # the prefiller is gone
    fetcher = Fetcher(cfg, codec, "tcp://127.0.0.1:9")
    try:
        t0 = time.monotonic()
        with pytest.raises(FetchError) as err:
            fetcher.fetch(endpoint, "h")
        assert err.value.code is ErrorCode.TIMEOUT
        assert time.monotonic() - t0 < 3.0
    finally:
        fetcher.close()


def test_unreachable_receiver_reports_a_failed_push_and_frees_slots() -> None:
    cfg = make_config(pd_connect_timeout_s=0.5)
    rng = np.random.default_rng(9)
    codec = Codec(cfg.auth_secret(), cfg.pd_max_frame_bytes)
    with pair(cfg) as (tx, holds, _rx, _fetcher):
        nowhere = Fetcher(cfg, codec, "tcp://127.0.0.1:9")  # a receiver nobody runs
        try:
            chunks, _ = fill(tx, hasher().keys(rng.integers(0, 1000, CHUNK).tolist()), rng)
            holds.hold("h", chunks, CHUNK)
            with pytest.raises(FetchError) as err:
                nowhere.fetch(holds.endpoint, "h")
            assert err.value.code is ErrorCode.TRANSFER
            assert tx.buffer.free_count == tx.buffer.num_slots
        finally:
            nowhere.close()


def test_wrongly_signed_fetch_is_dropped() -> None:
    cfg = make_config(pd_connect_timeout_s=0.3, pd_transfer_timeout_s=0.3)
    rng = np.random.default_rng(10)
    with pair(cfg) as (tx, holds, rx, _fetcher):
        chunks, _ = fill(tx, hasher().keys(rng.integers(0, 1000, CHUNK).tolist()), rng)
        holds.hold("h", chunks, CHUNK)
        intruder = Fetcher(cfg, Codec(b"another-secret-of-32-bytes-long!"), rx.endpoint)
        try:
            with pytest.raises(FetchError):
                intruder.fetch(holds.endpoint, "h")
        finally:
            intruder.close()
        assert holds.counters["auth_failures"] == 1
        assert holds.outstanding() == 1  # still there for the real decoder


# --- kv_transfer_params as orchestrators send them ------------------------------------


def test_standard_prefill_params_parse_as_a_hold_request() -> None:
    params = KVTransferParams.from_request(standard_prefill_params())
    assert params is not None and not params.push_ahead


def test_push_ahead_params_name_the_decoder_per_rank() -> None:
    params = KVTransferParams.from_request(
        {"do_remote_decode": True, "req_id": "r", "decoder_host": "h", "decoder_init_port": 7300}
    )
    assert params is not None and params.push_ahead
    assert params.decoder_endpoint(1) == "tcp://h:7301"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"do_remote_decode": True, "decoder_host": "h"}, "decoder_init_port"),
        ({"do_remote_decode": True, "decoder_host": "h", "decoder_init_port": 1}, "req_id"),
        ({"do_remote_decode": True, "decoder_init_port": "x"}, "decoder_init_port"),
    ],
)
def test_malformed_prefill_params_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        KVTransferParams.from_request(params)


def test_decode_params_round_trip_as_json_unchanged() -> None:
    import json

    out = DecodeParams(
        remote_engine_id="e",
        remote_host="127.0.0.1",
        remote_port=5000,
        lmcache_pd_hold="abc",
        lmcache_pd_pull_ports=[5000, 5001],
        lmcache_pd_chunks=3,
        lmcache_pd_tokens=200,
        lmcache_pd_tp_size=2,
    ).to_dict()
    assert out["do_remote_prefill"] is True and out["do_remote_decode"] is False
    back = DecodeParams.from_request(json.loads(json.dumps(out)))
    assert back is not None and back.pulls
    assert back.pull_endpoint(1) == "tcp://127.0.0.1:5001"
    with pytest.raises(ValueError, match="TP rank 2"):
        back.pull_endpoint(2)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("not-a-dict", "expected an object"),
        ({"do_remote_prefill": True, "lmcache_pd_chunks": "three"}, "lmcache_pd_chunks"),
        ({"do_remote_prefill": True, "lmcache_pd_chunks": -1}, "negative"),
        ({"do_remote_prefill": True, "lmcache_pd_hold": "h"}, "lmcache_pd_pull_ports"),
        ({"do_remote_prefill": True, "lmcache_pd_pull_ports": "5000"}, "lmcache_pd_pull_ports"),
        ({"do_remote_prefill": True, "remote_port": [1]}, "remote_port"),
    ],
)
def test_malformed_decode_params_name_the_field(params: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DecodeParams.from_request(params)


def test_decode_params_without_remote_prefill_are_not_ours() -> None:
    assert DecodeParams.from_request(None) is None
    assert DecodeParams.from_request({"do_remote_prefill": False}) is None
