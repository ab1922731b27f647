"""The push handoff end to end: bit-exact, dedupe, Busy, checksums, compat refusal."""

from __future__ import annotations

import threading
import time

import msgspec
import numpy as np
import pytest

from lmcache_pd.layout import KVLayout
from lmcache_pd.peer import make_requests, pattern, send_requests
from lmcache_pd.protocol import ErrorCode
from lmcache_pd.sender import HandoffError, OutChunk

from .helpers import CHUNK, LAYOUT, fill, hasher, make_config, receiver, sender


def test_round_trip_bit_exact_across_processes(spawn_receiver) -> None:
    """Receiver in another process verifies every byte of every committed chunk."""
    args = [
        "--layout",
        "tiny",
        "--chunk-size",
        str(CHUNK),
        "--buffer-bytes",
        str(1 << 20),
        "--verify",
    ]
    with spawn_receiver(*args) as rx_proc, sender(make_config()) as tx:
        prompts = make_requests(4, 5 * CHUNK + 3, seed=7)
        rows = send_requests(tx, rx_proc.endpoint, hasher(), prompts)
        stats = rx_proc.stop_stats()
    assert all(r["ok"] for r in rows), rows
    assert [r["chunks"] for r in rows] == [5, 5, 5, 5]
    assert stats["pattern_bad"] == 0
    assert stats["pattern_verified"] == sum(int(r["sent"]) for r in rows) == 16
    assert stats["checksum_failures"] == 0 if "checksum_failures" in stats else True


def test_round_trip_to_in_process_receiver_is_bit_exact() -> None:
    cfg = make_config()
    rng = np.random.default_rng(1)
    with receiver(cfg) as rx, sender(cfg) as tx:
        keys = hasher().keys(rng.integers(0, 1000, 4 * CHUNK).tolist())
        chunks, data = fill(tx, keys, rng)
        res = tx.send(rx.endpoint, "r1", chunks)
        tx.free([c.slot for c in chunks])
        assert (res.sent, res.dedup, res.bad) == (4, 0, 0)
        assert [rx.read(k) for k in keys] == data
        assert rx.lookup(keys) == 4
        assert rx.slot_usage()["leased"] == 0


def test_partial_last_chunk_moves_only_its_bytes() -> None:
    cfg = make_config(save_unfull_chunk=True)
    with receiver(cfg) as rx, sender(cfg) as tx:
        tokens = list(range(2 * CHUNK + 5))
        rows = send_requests(tx, rx.endpoint, hasher(), [tokens])
        keys = hasher().keys(tokens, include_partial=True)
        last = rx.read(keys[-1])
    assert rows[0]["ok"] and rows[0]["chunks"] == 3
    assert last is not None and len(last) == 5 * LAYOUT.bytes_per_token
    assert last == pattern(keys[-1], len(last)).tobytes()


def test_dedupe_moves_only_new_chunks() -> None:
    cfg = make_config()
    with receiver(cfg) as rx, sender(cfg) as tx:
        first, second = make_requests(2, 6 * CHUNK, seed=3)  # second shares 3 chunks
        rows = send_requests(tx, rx.endpoint, hasher(), [first, second])
        assert rows[0]["sent"] == 6 and rows[0]["dedup"] == 0
        assert rows[1]["sent"] == 3 and rows[1]["dedup"] == 3
        assert rows[1]["bytes"] == 3 * LAYOUT.bytes_per_chunk(CHUNK)
        assert rx.counters["dedupe_hits"] == 3


def test_busy_then_success_when_slots_free() -> None:
    cfg = make_config(pd_buffer_size=2 * LAYOUT.bytes_per_chunk(CHUNK), pd_busy_max_retries=50)
    with receiver(cfg) as rx, sender(cfg) as tx:
        rng = np.random.default_rng(5)
        held = hasher().keys(list(range(2 * CHUNK)))
        chunks, _ = fill(tx, held, rng)
        tx.send(rx.endpoint, "fill", chunks)
        tx.free([c.slot for c in chunks])
        rx.acquire(held)  # the engine pins both slots: nothing can be evicted
        timer = threading.Timer(0.3, rx.release, [held])
        timer.start()
        keys = hasher().keys(list(range(100, 100 + 2 * CHUNK)))
        chunks, data = fill(tx, keys, rng)
        res = tx.send(rx.endpoint, "after-busy", chunks)
        timer.join()
        assert res.sent == 2
        assert tx.counters["busy"] >= 1 and rx.counters["busy"] >= 1
        assert [rx.read(k) for k in keys] == data


def test_busy_forever_fails_bounded() -> None:
    cfg = make_config(
        pd_buffer_size=LAYOUT.bytes_per_chunk(CHUNK),
        pd_busy_max_retries=3,
        pd_busy_retry_after_s=0.01,
    )
    with receiver(cfg) as rx, sender(cfg) as tx:
        rng = np.random.default_rng(6)
        held = hasher().keys(list(range(CHUNK)))
        chunks, _ = fill(tx, held, rng)
        tx.send(rx.endpoint, "fill", chunks)
        tx.free([c.slot for c in chunks])
        rx.acquire(held)
        other, _ = fill(tx, hasher().keys(list(range(7, 7 + CHUNK))), rng)
        started = time.monotonic()
        with pytest.raises(HandoffError, match="stayed busy"):
            tx.send(rx.endpoint, "never", other)
        assert time.monotonic() - started < 5
        assert tx.counters["busy"] == 4
        assert rx.slot_usage()["leased"] == 0


def test_flipped_byte_is_found_at_first_read_and_never_handed_on() -> None:
    """Over real NIXL: the commit does not hash (no pass of its own); the first read
    checks the sender's kvsum64 digest, drops the corrupted chunk and counts it."""
    cfg = make_config()
    with receiver(cfg) as rx, sender(cfg) as tx:
        rng = np.random.default_rng(9)
        keys = hasher().keys(list(range(2 * CHUNK)))
        chunks, data = fill(tx, keys, rng)
        sealed = [OutChunk(c.key, c.slot, c.nbytes, tx.checksum(c.slot, c.nbytes)) for c in chunks]
        tx.buffer.view(sealed[1].slot)[123] ^= 0x40  # corrupted after the checksum was taken
        res = tx.send(rx.endpoint, "corrupt", sealed)
        assert (res.sent, res.bad) == (2, 0) and rx.counters["checksum_failures"] == 0
        assert rx.read(keys[1]) is None  # the first read finds it
        assert rx.counters["checksum_failures"] == 1
        assert rx.lookup([keys[1]]) == 0 and rx.read(keys[1]) is None
        assert rx.lookup([keys[0]]) == 1 and rx.read(keys[0]) == data[0]  # the good one kept
        usage = rx.slot_usage()
        assert usage["leased"] == 0 and usage["ready"] == 1
        assert usage["free"] + usage["ready"] + usage["granted"] == usage["total"]


def test_other_checksum_algorithm_refused_at_hello_naming_the_field() -> None:
    cfg = make_config()
    with receiver(cfg) as rx, sender(cfg) as tx:
        assert tx.compat.checksum_algorithm == "kvsum64"
        tx.compat = msgspec.structs.replace(tx.compat, checksum_algorithm="xxh3_64")
        chunks, _ = fill(tx, hasher().keys(list(range(CHUNK))), np.random.default_rng(1))
        with pytest.raises(HandoffError, match="checksum_algorithm") as info:
            tx.send(rx.endpoint, "x", chunks)
        assert info.value.code is ErrorCode.INCOMPATIBLE
        assert "'kvsum64'" in str(info.value) and "'xxh3_64'" in str(info.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dtype": "float16"}, "dtype"),
        ({"num_layers": 3}, "num_layers"),
        ({"model": "other"}, "model"),
    ],
)
def test_incompatible_layout_refused_at_hello(change: dict[str, object], field: str) -> None:
    cfg = make_config()
    other = KVLayout(**{**{f: getattr(LAYOUT, f) for f in LAYOUT.__struct_fields__}, **change})
    with receiver(cfg) as rx, sender(cfg, other) as tx:
        keys = hasher(other).keys(list(range(CHUNK)))
        chunks, _ = fill(tx, keys, np.random.default_rng(0))
        with pytest.raises(HandoffError, match=f"incompatible KV layout: {field}") as info:
            tx.send(rx.endpoint, "x", chunks)
        assert info.value.code is ErrorCode.INCOMPATIBLE
        assert rx.counters["incompatible"] == 1


def test_chunk_size_mismatch_refused() -> None:
    with receiver(make_config()) as rx, sender(make_config(chunk_size=8)) as tx:
        chunks, _ = fill(tx, hasher().keys(list(range(CHUNK)))[:1], np.random.default_rng(0))
        with pytest.raises(HandoffError, match="chunk_size"):
            tx.send(rx.endpoint, "x", chunks)


def test_reconnecting_sender_replaces_its_old_peer_entry() -> None:
    cfg = make_config()
    with receiver(cfg) as rx, sender(cfg) as tx:
        rng = np.random.default_rng(11)
        for i in range(3):
            chunks, data = fill(tx, hasher().keys(list(range(i, i + CHUNK))), rng)
            assert tx.send(rx.endpoint, f"r{i}", chunks).sent == 1
            tx.free([c.slot for c in chunks])
            tx._forget(tx._peers[rx.endpoint])  # as after a timeout: new socket, new Hello
        assert rx.stats()["peers"] == 1
        assert rx.read(chunks[0].key) == data[0]
