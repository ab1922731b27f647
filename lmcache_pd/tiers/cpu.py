"""The CPU tier: chunks in preallocated slabs, LRU eviction, pins against eviction.

Memory is allocated once, at construction, as a few large slabs (torch uint8 tensors,
page-locked when CUDA is available, or numpy arrays) cut into fixed-size slots of
``slot_bytes`` (a layout's ``bytes_per_chunk``). A put copies the chunk into a free slot
(evicting the least recently used unpinned chunk when none is free) and records its
length, so a partial last chunk uses the first bytes of a slot. Nothing is allocated per
put. A put that carries the chunk's digest (the receiver's store copy) hashes the bytes
in that same copy and publishes the chunk only if they match. The slabs' addresses are
exposed by :meth:`CPUStore.slab_regions` so the transport can register them once and send
chunks straight from a slot.

Readers either copy out (:meth:`CPUStore.get`, :meth:`CPUStore.get_into`) or pin the
chunk and read its slot in place (:meth:`CPUStore.acquire` / :meth:`CPUStore.release`, or
``with store.pinned(key) as view``). A pinned chunk is never evicted or overwritten.
A chunk becomes visible only after its bytes are fully copied, so no reader ever sees a
half-written slot. All methods are thread-safe; copies run outside the lock.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Container
from typing import Any

import numpy as np

from lmcache_pd.protocol import NO_CHECKSUM
from lmcache_pd.tiers.base import Buffer, Store, copy_hashed, mismatch, verify
from lmcache_pd.tiers.metrics import Count, DropReason, TierCounters, TierMetrics, tier_metrics

log = logging.getLogger(__name__)

DEFAULT_MAX_SLAB_BYTES = 1 << 30


def as_byte_view(data: Buffer) -> memoryview:
    """``data`` as a flat unsigned-byte memoryview (no copy)."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class _Entry:
    __slots__ = ("length", "refs", "slot")

    def __init__(self, slot: int, length: int) -> None:
        self.slot = slot
        self.length = length
        self.refs = 0


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class CPUStore(Store):
    """Fixed-slot LRU chunk store in preallocated host memory.

    ``capacity_bytes // slot_bytes`` slots are allocated in slabs of at most
    ``max_slab_bytes``. ``backend`` is ``"torch"``, ``"numpy"`` or ``"auto"`` (torch when
    importable). ``pin_memory`` defaults to whether CUDA is available (torch backend
    only). ``prefault`` touches every page up front so first puts pay no page faults.
    """

    tier = "cpu"

    def __init__(
        self,
        capacity_bytes: int,
        slot_bytes: int,
        *,
        backend: str = "auto",
        pin_memory: bool | None = None,
        max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES,
        prefault: bool = False,
        metrics: TierMetrics | None = None,
    ) -> None:
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be > 0, got {slot_bytes}")
        num_slots = int(capacity_bytes) // slot_bytes
        if num_slots <= 0:
            raise ValueError(
                f"CPU tier of {capacity_bytes} bytes holds no chunk of {slot_bytes} bytes; "
                "raise max_local_cpu_size"
            )
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.capacity_bytes = num_slots * slot_bytes
        self.slots_per_slab = max(1, min(num_slots, max_slab_bytes // slot_bytes))
        self.backend, self.pinned_memory = self._resolve_backend(backend, pin_memory)
        self._slabs: list[Any] = []  # keeps the tensors / arrays alive
        self._views: list[memoryview] = []
        self._regions: list[tuple[int, int]] = []
        left = num_slots
        while left > 0:
            count = min(left, self.slots_per_slab)
            self._allocate_slab(count * slot_bytes, prefault)
            left -= count
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, _Entry] = OrderedDict()
        self._writing: dict[bytes, int] = {}
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._used = 0
        self._metrics = metrics if metrics is not None else tier_metrics()
        self._counts = TierCounters(
            self._metrics,
            self.tier,
            self.capacity_bytes,
            (
                Count.HITS,
                Count.MISSES,
                Count.BYTES_WRITTEN,
                Count.BYTES_READ,
                Count.EVICTIONS,
                Count.DROPPED_WRITES,
                Count.REJECTED_TOO_LARGE,
                Count.DUPLICATE_PUTS,
                Count.CHECKSUM_MISMATCHES,
            ),
        )
        log.info(
            "CPU tier: %d slots of %d bytes (%.3f GB) in %d slab(s), backend=%s, pinned=%s",
            num_slots,
            slot_bytes,
            self.capacity_bytes / 1e9,
            len(self._slabs),
            self.backend,
            self.pinned_memory,
        )

    # --- allocation ---

    @staticmethod
    def _resolve_backend(backend: str, pin_memory: bool | None) -> tuple[str, bool]:
        if backend not in ("auto", "torch", "numpy"):
            raise ValueError(f"backend must be auto, torch or numpy, got {backend!r}")
        if backend == "auto":
            try:
                import torch  # noqa: F401
            except ImportError:
                backend = "numpy"
            else:
                backend = "torch"
        if backend == "numpy":
            if pin_memory:
                raise ValueError("pin_memory needs the torch backend")
            return backend, False
        pin = _cuda_available() if pin_memory is None else pin_memory
        return backend, pin

    def _allocate_slab(self, nbytes: int, prefault: bool) -> None:
        if self.backend == "torch":
            import torch

            tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned_memory)
            array = tensor.numpy()
            self._slabs.append(tensor)
            addr = int(tensor.data_ptr())
        else:
            array = np.empty(nbytes, dtype=np.uint8)
            self._slabs.append(array)
            addr = int(array.ctypes.data)
        if prefault:
            array[::4096] = 0
        self._views.append(array.data.cast("B"))
        self._regions.append((addr, nbytes))

    def slab_regions(self) -> list[tuple[int, int]]:
        """``(address, nbytes)`` of every slab, for one-time transport registration."""
        return list(self._regions)

    def slabs(self) -> list[Any]:
        """The slab objects themselves (torch tensors or numpy arrays)."""
        return list(self._slabs)

    def slot_address(self, key: bytes) -> tuple[int, int] | None:
        """``(address, length)`` of a held chunk's bytes (pin it while the address is
        used), or None."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return None
            slab, within = divmod(entry.slot, self.slots_per_slab)
            return self._regions[slab][0] + within * self.slot_bytes, entry.length

    def _slot_view(self, slot: int, length: int) -> memoryview:
        slab, within = divmod(slot, self.slots_per_slab)
        start = within * self.slot_bytes
        return self._views[slab][start : start + length]

    # --- slot bookkeeping (call with the lock held) ---

    def _take_slot_locked(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, entry in self._index.items():
            if entry.refs == 0:
                del self._index[key]
                self._used -= entry.length
                self._counts.inc(Count.EVICTIONS)
                return entry.slot
        return None

    def _publish_locked(self, key: bytes, slot: int, length: int) -> None:
        del self._writing[key]
        self._index[key] = _Entry(slot, length)
        self._used += length
        self._counts.inc(Count.BYTES_WRITTEN, length)
        self._counts.gauges(self._used, len(self._index))

    # --- writes ---

    def reserve(self, key: bytes, nbytes: int) -> memoryview | None:
        """A writable view of a free slot for ``nbytes`` of ``key``'s chunk, for a caller
        that fills it in place (disk promotion, a transport landing bytes). Follow with
        :meth:`commit` or :meth:`abort`. None when the key is held or being written, the
        chunk is too large, or every slot is pinned."""
        if nbytes > self.slot_bytes:
            self._counts.drop(DropReason.TOO_LARGE)
            return None
        with self._lock:
            if key in self._index or key in self._writing:
                return None
            slot = self._take_slot_locked()
            if slot is None:
                self._counts.drop(DropReason.NO_FREE_SLOT)
                return None
            self._writing[key] = slot
        return self._slot_view(slot, nbytes)

    def commit(self, key: bytes, nbytes: int) -> None:
        """Publish a chunk written through :meth:`reserve`."""
        with self._lock:
            self._publish_locked(key, self._writing[key], nbytes)

    def abort(self, key: bytes) -> None:
        """Give back a slot taken by :meth:`reserve` without publishing it."""
        with self._lock:
            slot = self._writing.pop(key, None)
            if slot is not None:
                self._free.append(slot)

    def put(self, key: bytes, data: Buffer, *, checksum: int = NO_CHECKSUM) -> bool:
        """Copy ``data`` into a free slot and publish it (see :meth:`Store.put`). With a
        ``checksum`` the copy hashes each word as it stores it (``copy_digest``: one
        pass) and the chunk is published only on a match; on a mismatch the slot goes
        back to the free list unpublished (no reader ever saw it) and
        ``ChecksumMismatch`` is raised. Where nothing is copied (held already, too
        large, no free slot) the bytes are hashed on their own, so a return always
        means they matched."""
        src = as_byte_view(data)
        n = src.nbytes
        if n > self.slot_bytes:
            verify(src, checksum, "chunk put into the CPU tier")
            self._counts.drop(DropReason.TOO_LARGE)
            log.warning("CPU tier: chunk of %d bytes exceeds the %d-byte slot", n, self.slot_bytes)
            return False
        with self._lock:
            entry = self._index.get(key)
            slot = None
            held = entry is not None or key in self._writing
            if held:
                if entry is not None:
                    self._index.move_to_end(key)
                self._counts.inc(Count.DUPLICATE_PUTS)
            else:
                slot = self._take_slot_locked()
                if slot is None:
                    self._counts.drop(DropReason.NO_FREE_SLOT)
                else:
                    self._writing[key] = slot
        if slot is None:
            verify(src, checksum, "chunk put into the CPU tier")
            return held
        try:
            got = copy_hashed(self._slot_view(slot, n), src, checksum)
        except BaseException:
            self.abort(key)
            raise
        if got != checksum:
            self.abort(key)
            self._counts.drop(DropReason.CHECKSUM)
            raise mismatch(checksum, got, "chunk put into the CPU tier")
        with self._lock:
            self._publish_locked(key, slot, n)
        return True

    # --- reads ---

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def _membership(self) -> Container[object]:
        return self._index

    def __len__(self) -> int:
        return len(self._index)

    def acquire(self, key: bytes, *, record: bool = True) -> memoryview | None:
        """Pin ``key`` and return a read-only view of its slot (see :meth:`release`).
        ``record=False``: an internal pin (write-behind) that counts no hit and does not
        refresh the LRU position."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                if record:
                    self._counts.inc(Count.MISSES)
                return None
            entry.refs += 1
            if not record:
                return self._slot_view(entry.slot, entry.length).toreadonly()
            self._index.move_to_end(key)
            self._counts.inc(Count.HITS)
            self._counts.inc(Count.BYTES_READ, entry.length)
            slot, length = entry.slot, entry.length
        return self._slot_view(slot, length).toreadonly()

    def release(self, key: bytes) -> None:
        with self._lock:
            entry = self._index.get(key)
            if entry is None or entry.refs <= 0:
                raise KeyError(f"release of a chunk that is not acquired: {key.hex()}")
            entry.refs -= 1

    def get(self, key: bytes) -> bytes | None:
        view = self.acquire(key)
        if view is None:
            return None
        try:
            return view.tobytes()
        finally:
            self.release(key)

    def get_into(self, key: bytes, out: Buffer) -> int | None:
        view = self.acquire(key)
        if view is None:
            return None
        try:
            n = view.nbytes
            as_byte_view(out)[:n] = view
            return n
        finally:
            self.release(key)

    def keys_lru(self) -> list[bytes]:
        """Held keys, least recently used first."""
        with self._lock:
            return list(self._index)

    def length(self, key: bytes) -> int | None:
        entry = self._index.get(key)
        return None if entry is None else entry.length

    def refs(self, key: bytes) -> int:
        entry = self._index.get(key)
        return 0 if entry is None else entry.refs

    # --- eviction, stats ---

    def evict(self, key: bytes) -> bool:
        """Drop ``key``. A pinned chunk is not dropped (returns False, logged)."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return False
            if entry.refs:
                log.debug("CPU tier: not evicting pinned chunk %s", key.hex())
                return False
            del self._index[key]
            self._used -= entry.length
            self._free.append(entry.slot)
            self._counts.gauges(self._used, len(self._index))
            return True

    def clear(self) -> None:
        """Drop every unpinned chunk."""
        for key in self.keys_lru():
            self.evict(key)

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            out: dict[str, int | float] = dict(self._counts.snapshot())
            out.update(
                entries=len(self._index),
                used_bytes=self._used,
                capacity_bytes=self.capacity_bytes,
                slots=self.num_slots,
                free_slots=len(self._free),
                pinned=sum(1 for e in self._index.values() if e.refs),
            )
        return out

    def close(self) -> None:
        with self._lock:
            self._index.clear()
            self._writing.clear()
            self._free = list(range(self.num_slots - 1, -1, -1))
            self._used = 0
