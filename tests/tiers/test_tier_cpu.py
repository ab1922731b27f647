"""CPU tier: bit-exact puts/gets, checked puts (digest hashed in the copy), slab layout,
LRU order and bounds, pins, metrics."""

from __future__ import annotations

import threading
import tracemalloc
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from lmcache_pd import checksum
from lmcache_pd.tiers import CPUStore, tier_metrics

from .tier_helpers import key_of, payload

SLOT = 4096


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_put_get_bit_exact(backend: str) -> None:
    store = CPUStore(8 * SLOT, SLOT, backend=backend)
    full, part = payload(1, SLOT), payload(2, 1000)
    assert store.put(key_of(1), full)
    assert store.put(key_of(2), memoryview(part))
    assert store.get(key_of(1)) == full
    assert store.get(key_of(2)) == part  # partial chunk: first bytes of a slot
    assert store.length(key_of(2)) == 1000
    out = bytearray(SLOT)
    assert store.get_into(key_of(2), out) == 1000 and bytes(out[:1000]) == part
    floats = np.arange(SLOT // 4, dtype=np.float32)  # a non-byte buffer format
    assert store.put(key_of(3), floats)
    assert np.frombuffer(store.get(key_of(3)), dtype=np.float32).tolist() == floats.tolist()
    with store.pinned(key_of(1)) as view:
        assert view is not None and view.readonly and bytes(view) == full
        assert store.refs(key_of(1)) == 1
    assert store.refs(key_of(1)) == 0
    assert store.get(key_of(99)) is None
    s = store.stats()
    assert s["hits"] == 5 and s["misses"] == 1 and s["entries"] == 3
    assert s["used_bytes"] == SLOT + 1000 + SLOT


def test_slabs_and_regions() -> None:
    store = CPUStore(10 * SLOT, SLOT, backend="numpy", max_slab_bytes=4 * SLOT)
    regions = store.slab_regions()
    assert [n for _, n in regions] == [4 * SLOT, 4 * SLOT, 2 * SLOT]
    for (addr, _), slab in zip(regions, store.slabs(), strict=True):
        assert addr == slab.ctypes.data
    for i in range(10):
        store.put(key_of(i), payload(i, SLOT))
    for i in range(10):  # every chunk lies inside a registered region
        addr, length = store.slot_address(key_of(i))
        assert length == SLOT
        assert any(a <= addr and addr + length <= a + n for a, n in regions)
        assert store.get(key_of(i)) == payload(i, SLOT)
    torch_store = CPUStore(2 * SLOT, SLOT, backend="torch")
    ((addr, n),) = torch_store.slab_regions()
    assert addr == torch_store.slabs()[0].data_ptr() and n == 2 * SLOT


def test_put_allocates_nothing_per_chunk() -> None:
    store = CPUStore(4 * SLOT, SLOT, backend="numpy", prefault=True)
    data = [payload(i, SLOT) for i in range(16)]
    store.put(key_of(100), data[0])  # warm up lazily created objects
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(16):
            assert store.put(key_of(i), data[i])
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(d.size_diff for d in after.compare_to(before, "filename"))
    assert grown < SLOT, f"puts allocated {grown} bytes"


def test_oversize_and_pinned_full() -> None:
    store = CPUStore(2 * SLOT, SLOT, backend="numpy")
    assert not store.put(key_of(0), bytes(SLOT + 1))
    assert store.stats()["rejected_too_large"] == 1
    assert store.put(key_of(1), payload(1, SLOT)) and store.put(key_of(2), payload(2, SLOT))
    v1, v2 = store.acquire(key_of(1)), store.acquire(key_of(2))
    assert v1 is not None and v2 is not None
    assert not store.put(key_of(3), payload(3, SLOT))  # every slot pinned: dropped
    assert not store.evict(key_of(1))  # pinned chunks are not evicted
    assert bytes(v1) == payload(1, SLOT) and bytes(v2) == payload(2, SLOT)
    store.release(key_of(1))
    assert store.put(key_of(3), payload(3, SLOT))  # evicts 1, the only unpinned one
    assert key_of(1) not in store and bytes(v2) == payload(2, SLOT)
    store.release(key_of(2))
    with pytest.raises(KeyError):
        store.release(key_of(2))
    assert store.stats()["dropped_writes"] == 2


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "get", "evict", "acquire", "release"]),
        st.integers(0, 11),
        st.integers(0, SLOT),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 6), ops=OPS)
def test_lru_model(slots: int, ops: list[tuple[str, int, int]]) -> None:
    """Random workload against a reference LRU: same contents, order, sizes, pins."""
    store = CPUStore(slots * SLOT, SLOT, backend="numpy")
    model: OrderedDict[bytes, bytes] = OrderedDict()
    pins: dict[bytes, int] = {}
    for op, i, n in ops:
        key = key_of(i)
        if op == "put":
            data = payload(i * 7919 + n, n)
            if key in model:
                model.move_to_end(key)
                assert store.put(key, data)
                continue
            if len(model) >= slots:
                victim = next((k for k in model if not pins.get(k)), None)
                if victim is None:
                    assert not store.put(key, data)
                    continue
                del model[victim]
            model[key] = data
            assert store.put(key, data)
        elif op == "get":
            got = store.get(key)
            assert got == model.get(key)
            if key in model:
                model.move_to_end(key)
        elif op == "evict":
            assert store.evict(key) == (key in model and not pins.get(key))
            if key in model and not pins.get(key):
                del model[key]
        elif op == "acquire":
            view = store.acquire(key)
            assert (view is None) == (key not in model)
            if view is not None:
                assert bytes(view) == model[key]
                model.move_to_end(key)
                pins[key] = pins.get(key, 0) + 1
        elif pins.get(key):
            store.release(key)
            pins[key] -= 1
        assert store.keys_lru() == list(model)
        s = store.stats()
        assert s["entries"] == len(model) <= slots
        assert s["used_bytes"] == sum(len(v) for v in model.values()) <= store.capacity_bytes
        assert s["pinned"] == sum(1 for k in model if pins.get(k))
    for key, data in model.items():
        assert store.get(key) == data


def test_concurrent_readers_see_whole_chunks() -> None:
    """Writers cycle keys through few slots (constant eviction) while readers pin and
    check: a reader never sees a half-written or reused slot."""
    store = CPUStore(4 * SLOT, SLOT, backend="numpy")
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            store.put(key_of(i % 12), payload(i % 12, SLOT))
            i += 1

    def reader() -> None:
        for r in range(3000):
            i = r % 12
            with store.pinned(key_of(i)) as view:
                if view is not None and bytes(view) != payload(i, SLOT):
                    errors.append(f"chunk {i} torn")
            got = store.get(key_of(i))
            if got is not None and got != payload(i, SLOT):
                errors.append(f"chunk {i} torn (get)")

    threads = [threading.Thread(target=writer) for _ in range(2)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads + readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert store.stats()["pinned"] == 0


def test_metrics_in_registry() -> None:
    registry = CollectorRegistry()
    metrics = tier_metrics(registry)
    assert tier_metrics(registry) is metrics
    store = CPUStore(SLOT, SLOT, backend="numpy", metrics=metrics)
    store.put(key_of(1), payload(1, 100))
    store.put(key_of(2), payload(2, 100))
    store.get(key_of(2))
    store.get(key_of(1))

    def value(name: str) -> float | None:
        return registry.get_sample_value(f"lmcache_pd_tier_{name}", {"tier": "cpu"})

    assert value("hits_total") == 1 and value("misses_total") == 1
    assert value("evictions_total") == 1 and value("bytes_written_total") == 200
    assert value("entries") == 1 and value("capacity_bytes") == SLOT


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_pinned_slab_on_cuda_host() -> None:
    import torch

    store = CPUStore(4 * SLOT, SLOT)  # auto: torch, page-locked on a CUDA host
    assert store.backend == "torch" and store.pinned_memory
    assert all(t.is_pinned() for t in store.slabs())
    store.put(key_of(1), payload(1, SLOT))
    addr, n = store.slot_address(key_of(1))
    slab = store.slabs()[0]
    offset = addr - slab.data_ptr()
    gpu = slab[offset : offset + n].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert gpu.cpu().numpy().tobytes() == payload(1, SLOT)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_checked_put_stores_only_matching_bytes(backend: str) -> None:
    """A put carrying the chunk's digest: the right one stores bit-exact bytes (hashed in
    the copy), a wrong one stores nothing, frees its slot, counts the mismatch and
    raises; where nothing is copied (held already, no free slot, too large) the bytes
    are still checked, so a return always means they matched."""
    store = CPUStore(2 * SLOT, SLOT, backend=backend)
    good, part = payload(1, SLOT), payload(2, 1000)
    digest = checksum.chunk_digest(good)
    bad = bytearray(good)
    bad[1234] ^= 0x10
    with pytest.raises(checksum.ChecksumMismatch):
        store.put(key_of(1), bytes(bad), checksum=digest)
    assert key_of(1) not in store and store.get(key_of(1)) is None
    s = store.stats()
    assert s["free_slots"] == 2 and s["entries"] == 0 and s["used_bytes"] == 0
    assert s["checksum_mismatches"] == 1 and s["dropped_writes"] == 1
    assert store.reserve(key_of(1), SLOT) is not None  # not left "being written"
    store.abort(key_of(1))

    assert store.put(key_of(1), good, checksum=digest)
    assert store.put(key_of(2), memoryview(part), checksum=checksum.chunk_digest(part))
    assert store.get(key_of(1)) == good and store.get(key_of(2)) == part
    assert store.stats()["free_slots"] == 0

    # nothing copied: a duplicate, then no free slot (both pinned), then too large
    with pytest.raises(checksum.ChecksumMismatch):
        store.put(key_of(1), bytes(bad), checksum=digest)
    assert store.put(key_of(1), good, checksum=digest) and store.get(key_of(1)) == good
    with store.pinned(key_of(1)), store.pinned(key_of(2)):
        with pytest.raises(checksum.ChecksumMismatch):
            store.put(key_of(3), bytes(bad), checksum=digest)
        assert not store.put(key_of(3), good, checksum=digest)
    big = payload(4, SLOT + 8)
    with pytest.raises(checksum.ChecksumMismatch):
        store.put(key_of(4), big, checksum=digest)
    assert not store.put(key_of(4), big, checksum=checksum.chunk_digest(big))
    assert store.get(key_of(1)) == good and store.get(key_of(2)) == part
    assert key_of(3) not in store and key_of(4) not in store
