"""Dedupe through the tiers, end to end: real sender, real receiver, real NIXL agents and
ZMQ sockets, a CPU+disk TieredStore on real files. Chunks a receiver holds only in a tier
(after a restart: only on disk) are reported in ``Accept.have`` and never resent."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmcache_pd.tiers import build_tiers
from tests.core.helpers import CHUNK, LAYOUT, fill, hasher, make_config, receiver, sender


def test_receiver_skips_chunks_held_in_tiers_across_restart(tmp_path: Path) -> None:
    slot = LAYOUT.bytes_per_chunk(CHUNK)
    cfg = make_config(
        local_disk=f"file://{tmp_path / 'kv'}",
        max_local_disk_size=64 * (slot + 80) / 1e9,
        max_local_cpu_size=16 * slot / 1e9,
    )
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, 50_000, 6 * CHUNK).tolist()
    keys = hasher().keys(tokens)

    # 1. first request: all 6 chunks move, the receiver stores them in the tiers
    tiers = build_tiers(cfg, LAYOUT)
    assert tiers is not None
    with receiver(cfg, store=tiers) as rx, sender(cfg) as tx:
        chunks, data = fill(tx, keys, rng)
        res = tx.send(rx.endpoint, "first", chunks)
        tx.free([c.slot for c in chunks])
        assert (res.sent, res.dedup, res.bad) == (6, 0, 0)
    assert tiers.flush(10)
    assert tiers.contains(keys) == 6
    tiers.close()
    assert len(list((tmp_path / "kv").glob("*.kv"))) == 6

    # 2. restart: a new receiver (empty receive buffer) over the same disk directory
    tiers = build_tiers(cfg, LAYOUT)
    assert tiers is not None
    assert tiers.cpu is not None and len(tiers.cpu) == 0 and tiers.contains(keys) == 6
    with receiver(cfg, store=tiers) as rx, sender(cfg) as tx:
        assert rx.slot_usage()["ready"] == 0
        chunks, _ = fill(tx, keys, rng)  # different bytes: a resend would be caught below
        res = tx.send(rx.endpoint, "again", chunks)
        tx.free([c.slot for c in chunks])
        assert (res.sent, res.dedup) == (0, 6)
        assert rx.counters["dedupe_hits"] == 6
        assert rx.slot_usage()["leased"] == 0 and rx.slot_usage()["ready"] == 0
        # the engine reads the chunks through the receiver: served from disk, promoted
        assert [rx.read(k) for k in keys] == data
        assert tiers.stats()["promotions"] == 6

        # 3. a longer prompt sharing the 6-chunk prefix: only the 2 new chunks move
        more = tokens + rng.integers(0, 50_000, 2 * CHUNK).tolist()
        more_keys = hasher().keys(more)
        chunks, more_data = fill(tx, more_keys, rng)
        res = tx.send(rx.endpoint, "longer", chunks)
        tx.free([c.slot for c in chunks])
        assert (res.sent, res.dedup) == (2, 6)
        assert [rx.read(k) for k in more_keys[6:]] == more_data[6:]
    assert tiers.flush(10)
    assert tiers.disk is not None and tiers.disk.contains(more_keys) == 8
    s = tiers.stats()
    assert s["disk.corrupt_files"] == 0 and s["cpu.pinned"] == 0
    tiers.close()
