"""Registered slot buffers: the memory KV chunks are gathered into and written to.

A :class:`SlotBuffer` is one allocation of ``num_slots * slot_bytes`` bytes (CPU, pinned
when CUDA is available, or CUDA memory), registered once with the transport and split
into fixed-size chunk slots. Slot ``i`` starts at ``base + i * slot_bytes``; a chunk of
``t`` tokens uses the first ``t * bytes_per_token`` bytes of its slot (chunk format in
``layout.py``). The buffer hands out slots with :meth:`alloc` (bounded wait) and takes
them back with :meth:`free`; it never allocates on the hot path.
"""

from __future__ import annotations

import mmap
import threading
import time

import numpy as np
import torch

from lmcache_pd.config import BufferDevice, ConfigError
from lmcache_pd.transports.base import Desc, MemKind, Transport

ALIGN = 64


def host_buffer(nbytes: int) -> np.ndarray:
    """Page-aligned, pre-faulted host memory, backed by transparent huge pages where the
    kernel allows (``madvise``): fewer page-table walks for cma/RDMA registration and
    copies. Freed when the array is garbage collected."""
    mem = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mem.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    arr = np.frombuffer(mem, dtype=np.uint8, count=nbytes)
    arr[::4096] = 0  # fault every page in now, not on the first transfer
    return arr


def slots_for(buffer_bytes: int, slot_bytes: int) -> int:
    """How many slots fit; a clear error when not even one does."""
    n = buffer_bytes // slot_bytes
    if n < 1:
        raise ConfigError(
            [
                f"pd_buffer_size: {buffer_bytes} bytes is smaller than one chunk "
                f"({slot_bytes} bytes); raise pd_buffer_size or lower chunk_size"
            ]
        )
    return n


class SlotBuffer:
    """A registered buffer of equal chunk slots with a free list."""

    def __init__(
        self,
        slot_bytes: int,
        num_slots: int,
        transport: Transport | None = None,
        device: BufferDevice = BufferDevice.CPU,
    ) -> None:
        self.slot_bytes = (slot_bytes + ALIGN - 1) // ALIGN * ALIGN
        self.num_slots = num_slots
        self.device = device
        total = self.slot_bytes * num_slots
        if device is BufferDevice.CUDA:
            if not torch.cuda.is_available():
                raise ConfigError(["pd_buffer_device: 'cuda' requested but no CUDA device"])
            self.tensor = torch.empty(total, dtype=torch.uint8, device="cuda")
            self.kind, self.device_id = MemKind.VRAM, self.tensor.device.index or 0
        elif torch.cuda.is_available():  # pinned host memory for fast H2D/D2H
            self.tensor = torch.zeros(total, dtype=torch.uint8, pin_memory=True)
            self.kind, self.device_id = MemKind.DRAM, 0
        else:
            self.tensor = torch.from_numpy(host_buffer(total))
            self.kind, self.device_id = MemKind.DRAM, 0
        self.base = self.tensor.data_ptr()
        self.descs: list[Desc] = [
            (self.base + i * self.slot_bytes, self.slot_bytes, self.device_id)
            for i in range(num_slots)
        ]
        self._np = self.tensor.numpy() if self.kind is MemKind.DRAM else None
        self._free = list(range(num_slots - 1, -1, -1))
        self._cond = threading.Condition()
        self.transport = transport
        self._reg = (
            transport.register(self.base, total, self.kind, self.device_id) if transport else None
        )

    # --- access -----------------------------------------------------------------
    def view(self, slot: int, nbytes: int | None = None) -> memoryview:
        """Writable bytes of ``slot`` (CPU buffers only), the first ``nbytes`` if given."""
        if self._np is None:
            raise TypeError("view() needs a CPU buffer; use slot_tensor() for CUDA")
        start = slot * self.slot_bytes
        end = start + (self.slot_bytes if nbytes is None else nbytes)
        return self._np[start:end].data

    def chunk(self, slot: int, nbytes: int) -> memoryview | torch.Tensor:
        """The first ``nbytes`` of ``slot`` where they live: a memoryview for CPU
        buffers, a uint8 tensor slice for CUDA buffers. No copy."""
        if self._np is not None:
            return self.view(slot, nbytes)
        start = slot * self.slot_bytes
        return self.tensor[start : start + nbytes]

    def to_host(self, slot: int, nbytes: int) -> memoryview:
        """The first ``nbytes`` of ``slot`` as host bytes (a copy only for CUDA)."""
        if self._np is not None:
            return self.view(slot, nbytes)
        start = slot * self.slot_bytes
        return self.tensor[start : start + nbytes].cpu().numpy().data

    def slot_tensor(self, slot: int) -> torch.Tensor:
        """A flat uint8 tensor view of ``slot`` (CPU or CUDA)."""
        start = slot * self.slot_bytes
        return self.tensor[start : start + self.slot_bytes]

    # --- allocation -------------------------------------------------------------
    def alloc(self, n: int, timeout_s: float = 0.0) -> list[int]:
        """Take ``n`` free slots, waiting up to ``timeout_s`` for them; raises
        ``TimeoutError`` (nothing taken) if they do not free up in time."""
        if n > self.num_slots:
            raise ValueError(f"asked for {n} slots; the buffer has {self.num_slots}")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._free) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no {n} free send slots within {timeout_s:.1f}s "
                        f"({len(self._free)}/{self.num_slots} free)"
                    )
                self._cond.wait(left)
            return [self._free.pop() for _ in range(n)]

    def free(self, slots: list[int]) -> None:
        with self._cond:
            self._free.extend(slots)
            self._cond.notify_all()

    @property
    def free_count(self) -> int:
        with self._cond:
            return len(self._free)

    def close(self) -> None:
        if self.transport is not None and self._reg is not None:
            self.transport.deregister(self._reg)
            self._reg = None
