"""TieredStore and build_tiers: promotion, cross-tier lookup, write-behind from CPU
slots, checked puts (a mismatch reaches no tier), a disabled disk with CPU still
serving, log lines, metrics."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lmcache_pd import checksum
from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.config import Config
from lmcache_pd.layout import preset
from lmcache_pd.tiers import (
    CPUStore,
    DiskStore,
    TieredStore,
    build_tiers,
    log_lookup,
    log_store,
    tier_metrics,
)

from .tier_helpers import key_of, payload

TINY = preset("tiny")  # 1 KiB per token
CHUNK = 16
SLOT = TINY.bytes_per_chunk(CHUNK)  # 16 KiB


def make_cfg(tmp_path: Path, cpu_chunks: int = 4, disk_chunks: int = 64, **kw) -> Config:
    return Config(
        chunk_size=CHUNK,
        max_local_cpu_size=cpu_chunks * SLOT / 1e9,
        local_disk=f"file://{tmp_path / 'disk'}",
        max_local_disk_size=disk_chunks * (SLOT + 80) / 1e9,
        **kw,
    )


@pytest.fixture
def tiers(tmp_path: Path):
    store = build_tiers(make_cfg(tmp_path), TINY, registry=CollectorRegistry())
    yield store
    store.close()


def test_build_tiers_from_config(tmp_path: Path) -> None:
    store = build_tiers(make_cfg(tmp_path), TINY)
    assert isinstance(store, TieredStore)
    assert store.cpu is not None and store.cpu.slot_bytes == SLOT and store.cpu.num_slots == 4
    assert store.disk is not None and store.disk.root == (tmp_path / "disk").resolve()
    assert store.disk.fingerprint == TINY.fingerprint()
    assert store.slab_regions() == store.cpu.slab_regions()
    store.close()
    assert build_tiers(Config(local_cpu=False), TINY) is None
    cpu_only = build_tiers(Config(chunk_size=CHUNK, max_local_cpu_size=0.001), TINY)
    assert cpu_only is not None and cpu_only.disk is None
    disk_only = build_tiers(make_cfg(tmp_path, local_cpu=False), TINY)
    assert disk_only is not None and disk_only.cpu is None
    disk_only.close()
    with pytest.raises(ValueError, match="max_local_cpu_size"):
        build_tiers(Config(chunk_size=CHUNK, max_local_cpu_size=1e-6), TINY)


def test_put_writes_behind_and_disk_hit_promotes(tiers: TieredStore) -> None:
    for i in range(8):  # CPU holds 4: the first 4 are evicted from CPU, kept on disk
        assert tiers.put(key_of(i), payload(i, SLOT))
        assert tiers.flush(10)
    assert tiers.cpu.keys_lru() == [key_of(i) for i in range(4, 8)]
    assert tiers.disk.contains([key_of(i) for i in range(8)]) == 8
    assert tiers.cpu.stats()["pinned"] == 0  # write-behind pins were released
    assert bytes(tiers.get(key_of(1))) == payload(1, SLOT)  # disk hit ...
    assert key_of(1) in tiers.cpu  # ... promoted
    assert tiers.stats()["promotions"] == 1
    out = bytearray(SLOT)
    assert tiers.get_into(key_of(2), out) == SLOT and out == payload(2, SLOT)
    assert key_of(2) in tiers.cpu and tiers.stats()["promotions"] == 2
    with tiers.pinned(key_of(3)) as view:  # zero-copy view of the promoted CPU slot
        assert view is not None and bytes(view) == payload(3, SLOT)
        assert tiers.cpu.refs(key_of(3)) == 1
    assert tiers.cpu.refs(key_of(3)) == 0
    assert tiers.get(key_of(99)) is None
    s = tiers.stats()
    assert s["disk.hits"] == 3 and s["cpu.hits"] == 0 and s["disk.misses"] == 1


def test_contains_is_longest_prefix_across_tiers(tiers: TieredStore) -> None:
    for i in range(6):
        tiers.put(key_of(i), payload(i, 100))
    tiers.flush(10)
    tiers.cpu.evict(key_of(0))  # 0 only on disk
    tiers.disk.evict(key_of(1))  # 1 only in CPU
    keys = [key_of(i) for i in range(8)]
    assert tiers.contains(keys) == 6
    tiers.evict(key_of(3))
    assert tiers.contains(keys) == 3 and key_of(3) not in tiers


def test_lookup_logs_lmcache_line(tiers: TieredStore, caplog: pytest.LogCaptureFixture) -> None:
    hasher = ChunkHasher(TINY.fingerprint(), CHUNK)
    tokens = list(range(5 * CHUNK + 3))
    for key in hasher.keys(tokens)[:3]:
        tiers.put(key, bytes(SLOT))
    with caplog.at_level(logging.INFO, logger="lmcache_pd"):
        res = tiers.lookup(tokens, hasher, num_computed_tokens=16)
    assert (res.hit_chunks, res.hit_tokens, res.total_tokens) == (3, 48, 83)
    assert res.hit_keys == hasher.keys(tokens)[:3]
    assert "Total tokens 83, hit tokens: 48, need to load: 32" in caplog.text
    assert log_lookup(32, 24) == "Total tokens 32, hit tokens: 24, need to load: 24"
    msg = log_store(31, 31, 3_800_000, 0.0019)
    assert msg.startswith("Stored 31 out of total 31 tokens. size: 0.0038 gb")
    assert msg.endswith("throughput: 2.00 GB/s")


def test_cpu_keeps_serving_when_disk_fills(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        cpu = CPUStore(8 * SLOT, SLOT, backend="numpy")
        disk = DiskStore(mnt, 10**9, TINY.fingerprint())
        tiers = TieredStore(cpu, disk)
        for i in range(8):
            assert tiers.put(key_of(i), payload(i, SLOT))
            tiers.flush(10)
        assert disk.disabled is not None
        assert cpu.stats()["pinned"] == 0
        for i in range(8):  # every chunk still served from CPU
            assert bytes(tiers.get(key_of(i))) == payload(i, SLOT)
        assert tiers.contains([key_of(i) for i in range(8)]) == 8
        assert tiers.put(key_of(20), payload(20, SLOT))  # puts keep working
        tiers.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_write_behind_leaves_cpu_room(tmp_path: Path) -> None:
    """A burst larger than the CPU tier: write-behind pins at most half the slots, so
    the newest chunks still land in CPU and every chunk reaches disk."""
    cpu = CPUStore(4 * SLOT, SLOT, backend="numpy")
    disk = DiskStore(tmp_path / "d", 10**8, TINY.fingerprint(), queue_size=64)
    tiers = TieredStore(cpu, disk)
    for i in range(12):
        assert tiers.put(key_of(i), payload(i, SLOT))
    assert key_of(11) in cpu and cpu.stats()["dropped_writes"] == 0
    assert tiers.flush(10)
    assert disk.contains([key_of(i) for i in range(12)]) == 12
    assert cpu.stats()["pinned"] == 0 and tiers._wb_pins == 0
    for i in range(12):
        assert bytes(tiers.get(key_of(i))) == payload(i, SLOT)
    tiers.close()


def test_cpu_full_of_pins_still_writes_disk(tmp_path: Path) -> None:
    cpu = CPUStore(SLOT, SLOT, backend="numpy")
    disk = DiskStore(tmp_path / "d", 10**8, TINY.fingerprint())
    tiers = TieredStore(cpu, disk)
    tiers.put(key_of(0), payload(0, SLOT))
    with tiers.pinned(key_of(0)):
        assert tiers.put(key_of(1), payload(1, SLOT))  # CPU has no free slot: disk only
        tiers.flush(10)
        assert key_of(1) not in cpu and key_of(1) in disk
        with tiers.pinned(key_of(1)) as view:  # no room to promote: a private copy
            assert view is not None and bytes(view) == payload(1, SLOT)
    assert cpu.refs(key_of(0)) == 0
    tiers.close()


def test_restart_serves_from_disk(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    first = build_tiers(cfg, TINY)
    for i in range(6):
        first.put(key_of(i), payload(i, SLOT - i))
    first.close()
    second = build_tiers(cfg, TINY)
    assert second.contains([key_of(i) for i in range(6)]) == 6
    for i in range(6):
        assert bytes(second.get(key_of(i))) == payload(i, SLOT - i)
    second.close()


def test_shared_registry_metrics(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    a = build_tiers(make_cfg(tmp_path), TINY, registry=registry)
    b = build_tiers(make_cfg(tmp_path / "b"), TINY, registry=registry)  # no clash
    assert tier_metrics(registry) is tier_metrics(registry)
    a.put(key_of(1), payload(1, 100))
    a.flush(10)
    a.cpu.evict(key_of(1))
    a.get(key_of(1))

    def value(name: str, tier: str) -> float | None:
        return registry.get_sample_value(f"lmcache_pd_tier_{name}", {"tier": tier})

    assert value("bytes_written_total", "disk") == 100
    assert value("hits_total", "disk") == 1 and value("misses_total", "cpu") == 1
    assert value("promotions_total", "disk") == 1
    a.close()
    b.close()


def test_checked_put_reaches_no_tier_on_a_mismatch(tiers: TieredStore, tmp_path: Path) -> None:
    """A put carrying the digest: bytes that do not match it reach neither the CPU tier
    (hashed in its copy) nor disk (nothing queued); matching bytes reach both, bit-exact.
    Without a CPU tier the disk tier hashes before it queues."""
    good = payload(1, SLOT)
    digest = checksum.chunk_digest(good)
    bad = bytearray(good)
    bad[SLOT - 1] ^= 0x80
    with pytest.raises(checksum.ChecksumMismatch):
        tiers.put(key_of(1), bytes(bad), checksum=digest)
    assert tiers.flush(10)
    assert key_of(1) not in tiers and tiers.get(key_of(1)) is None
    assert tiers.disk is not None and key_of(1) not in tiers.disk
    assert tiers.stats()["cpu.checksum_mismatches"] == 1
    assert tiers.put(key_of(1), good, checksum=digest)
    assert tiers.flush(10)
    assert tiers.disk.get(key_of(1)) == good and tiers.get(key_of(1)) == good

    disk_only = TieredStore(None, DiskStore(tmp_path / "only", 8 * (SLOT + 80), TINY.fingerprint()))
    try:
        with pytest.raises(checksum.ChecksumMismatch):
            disk_only.put(key_of(2), bytes(bad), checksum=digest)
        assert disk_only.flush(10) and key_of(2) not in disk_only
        assert disk_only.put(key_of(2), good, checksum=digest)
        assert disk_only.flush(10) and disk_only.get(key_of(2)) == good
    finally:
        disk_only.close()
