"""In-process transport: WRITEs are ``memmove`` between registered regions of one process.

Implements :class:`~lmcache_pd.transports.base.Transport` without NIXL, for fast tests
of the sender/receiver logic (leases, Busy, dedupe, expiry, verification). Agents meet
through a :class:`MemoryFabric` (one per test; a module default otherwise): an agent's
``metadata()`` is its name, ``add_peer`` looks that name up in the fabric. A WRITE
checks every descriptor against the registrations of both sides (an unregistered or
out-of-range address is a :class:`TransportError`, as NIXL would refuse it), copies the
bytes at once and then queues the notification at the target, so it is ``DONE`` as soon
as :meth:`MemoryTransport.write` returns and the target sees the notification on its
next :meth:`MemoryTransport.notifications` call. Nothing runs in the background.

Fault hooks for tests live in subclasses: override :meth:`MemoryTransport._copy` to
corrupt or drop bytes in flight; ``close()`` an agent to make its peers' WRITEs fail.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from lmcache_pd.transports.base import (
    Desc,
    DescListHandle,
    MemKind,
    RegistrationHandle,
    TransferHandle,
    TransferTimeout,
    Transport,
    TransportError,
    XferState,
)


@dataclass(frozen=True)
class _Region:
    addr: int
    nbytes: int
    kind: MemKind

    def holds(self, addr: int, nbytes: int) -> bool:
        return self.addr <= addr and addr + nbytes <= self.addr + self.nbytes


@dataclass(frozen=True)
class _DescList:
    agent: str  # whose memory the descriptors address
    descs: tuple[Desc, ...]
    kind: MemKind


class MemoryFabric:
    """Where in-process agents find each other by name."""

    def __init__(self) -> None:
        self._agents: dict[str, MemoryTransport] = {}
        self._lock = threading.Lock()

    def join(self, agent: MemoryTransport) -> None:
        with self._lock:
            if agent.name in self._agents:
                raise TransportError(f"memory agent name {agent.name!r} is taken")
            self._agents[agent.name] = agent

    def leave(self, name: str) -> None:
        with self._lock:
            self._agents.pop(name, None)

    def get(self, name: str) -> MemoryTransport | None:
        with self._lock:
            return self._agents.get(name)


DEFAULT_FABRIC = MemoryFabric()
_names = itertools.count(1)


class MemoryTransport(Transport):
    """One in-process agent (DRAM only: a VRAM registration is refused)."""

    def __init__(self, name: str | None = None, fabric: MemoryFabric = DEFAULT_FABRIC) -> None:
        self.name = name or f"memory-{next(_names)}"
        self.fabric = fabric
        self._regs: dict[RegistrationHandle, _Region] = {}
        self._lists: dict[DescListHandle, _DescList] = {}
        self._xfers: dict[TransferHandle, XferState] = {}
        self._peers: set[str] = set()
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        fabric.join(self)

    # --- memory -----------------------------------------------------------------
    def register(
        self, addr: int, nbytes: int, kind: MemKind = MemKind.DRAM, device: int = 0
    ) -> RegistrationHandle:
        if kind is not MemKind.DRAM:
            raise TransportError(f"the memory transport moves host memory only, not {kind.value}")
        if addr <= 0 or nbytes <= 0:
            raise TransportError(f"cannot register {nbytes} bytes at {addr:#x}")
        handle = RegistrationHandle(next(self._ids))
        with self._lock:
            self._regs[handle] = _Region(addr, nbytes, kind)
        return handle

    def deregister(self, handle: RegistrationHandle) -> None:
        with self._lock:
            self._regs.pop(handle, None)

    def _registered(self, addr: int, nbytes: int) -> bool:
        with self._lock:
            return any(r.holds(addr, nbytes) for r in self._regs.values())

    # --- peers ------------------------------------------------------------------
    def metadata(self) -> bytes:
        return self.name.encode()

    def add_peer(self, metadata: bytes) -> str:
        try:
            name = metadata.decode()
        except UnicodeDecodeError:
            raise TransportError("memory transport metadata is an agent name (UTF-8)") from None
        if self.fabric.get(name) is None:
            raise TransportError(f"no memory agent named {name!r} in this fabric")
        self._peers.add(name)
        return name

    def remove_peer(self, peer: str) -> None:
        self._peers.discard(peer)

    def connect(self, peer: str) -> None:
        if peer not in self._peers:
            raise TransportError(f"unknown peer {peer!r}: add_peer its metadata first")

    # --- descriptor lists -------------------------------------------------------
    def _prep(self, agent: str, descs: Sequence[Desc], kind: MemKind) -> DescListHandle:
        handle = DescListHandle(next(self._ids))
        with self._lock:
            self._lists[handle] = _DescList(agent, tuple((a, n, d) for a, n, d in descs), kind)
        return handle

    def prep_local(self, descs: Sequence[Desc], kind: MemKind = MemKind.DRAM) -> DescListHandle:
        for addr, nbytes, _dev in descs:
            if not self._registered(addr, nbytes):
                raise TransportError(f"local descriptor {addr:#x}+{nbytes} is not registered")
        return self._prep(self.name, descs, kind)

    def prep_remote(
        self, peer: str, descs: Sequence[Desc], kind: MemKind = MemKind.DRAM
    ) -> DescListHandle:
        if peer not in self._peers:
            raise TransportError(f"unknown peer {peer!r}: add_peer its metadata first")
        return self._prep(peer, descs, kind)

    def release_prepped(self, handle: DescListHandle) -> None:
        with self._lock:
            self._lists.pop(handle, None)

    # --- transfers --------------------------------------------------------------
    def _copy(self, dst: int, src: int, nbytes: int) -> None:
        """Move the bytes of one descriptor pair (override to inject faults)."""
        ctypes.memmove(dst, src, nbytes)

    def write(
        self,
        local: DescListHandle,
        local_idx: Sequence[int],
        remote: DescListHandle,
        remote_idx: Sequence[int],
        notif: bytes = b"",
    ) -> TransferHandle:
        with self._lock:
            src_list, dst_list = self._lists.get(local), self._lists.get(remote)
        if src_list is None or dst_list is None or src_list.agent != self.name:
            raise TransportError("WRITE with an unknown or released descriptor list")
        if len(local_idx) != len(remote_idx):
            raise TransportError(f"WRITE of {len(local_idx)} local to {len(remote_idx)} remote")
        target = self.fabric.get(dst_list.agent)
        if target is None or target._closed:
            raise TransportError(f"peer {dst_list.agent!r} is gone")
        try:
            pairs = [
                (src_list.descs[i], dst_list.descs[j])
                for i, j in zip(local_idx, remote_idx, strict=True)
            ]
        except IndexError:
            raise TransportError("WRITE descriptor index out of range") from None
        for (s_addr, s_len, _), (d_addr, d_len, _) in pairs:
            if s_len != d_len:
                raise TransportError(f"descriptor sizes differ: {s_len} local, {d_len} remote")
            if not self._registered(s_addr, s_len) or not target._registered(d_addr, d_len):
                raise TransportError("WRITE touches unregistered memory")
        for (s_addr, s_len, _), (d_addr, _, _) in pairs:
            self._copy(d_addr, s_addr, s_len)
        target._deliver(self.name, notif)
        handle = TransferHandle(next(self._ids))
        with self._lock:
            self._xfers[handle] = XferState.DONE
        return handle

    def _deliver(self, peer: str, notif: bytes) -> None:
        if notif:
            with self._lock:
                self._inbox.append((peer, notif))

    def poll(self, handle: TransferHandle) -> XferState:
        with self._lock:
            state = self._xfers.get(handle)
        if state is None:
            raise TransportError(f"unknown transfer handle {handle}")
        return state

    def wait(self, handle: TransferHandle, timeout_s: float) -> None:
        state = self.poll(handle)  # complete at post: nothing to wait for
        if state is XferState.ERR:
            raise TransportError("memory WRITE failed")
        if state is not XferState.DONE:
            raise TransferTimeout(f"memory WRITE not complete after {timeout_s:.1f}s")

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            self._xfers.pop(handle, None)

    def notify(self, peer: str, message: bytes) -> None:
        target = self.fabric.get(peer) if peer in self._peers else None
        if target is None or target._closed:
            raise TransportError(f"peer {peer!r} is unknown or gone")
        target._deliver(self.name, message)

    def notifications(self) -> list[tuple[str, bytes]]:
        with self._lock:
            out = list(self._inbox)
            self._inbox.clear()
        return out

    def close(self) -> None:
        self._closed = True
        self.fabric.leave(self.name)
        with self._lock:
            self._regs.clear()
            self._lists.clear()
            self._xfers.clear()
        self._peers.clear()
