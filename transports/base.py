"""The Transport protocol: what the sender and receiver need from a data plane.

A transport knows bytes and addresses, not tokens. Its life cycle:

1. ``register(addr, nbytes, kind)`` the buffers that will be read or written (once);
2. exchange ``metadata()`` with the peer over the control plane and ``add_peer`` it;
3. ``prep_local`` / ``prep_remote`` descriptor lists once per buffer and peer;
4. per transfer ``write(...)`` by descriptor indices with a notification message, then
   ``wait(handle, deadline)`` (bounded, backing off; never spins);
5. the target learns of arrivals with ``notifications()`` (it must call this while a
   transfer is expected: without a progress thread, some paths only move when polled);
6. either side may ``notify(peer, message)`` a peer it added: a message not bound to a
   transfer, read by the peer's ``notifications()`` (the receiver's commit reply).
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Sequence
from typing import NewType

Desc = tuple[int, int, int]  # (address, nbytes, device id)

# Opaque handles: each transport mints its own values; callers only pass them back to
# the method named beside them. Distinct types, so one is never passed for another.
RegistrationHandle = NewType("RegistrationHandle", object)  # register -> deregister
DescListHandle = NewType(
    "DescListHandle", object
)  # prep_local/prep_remote -> write, release_prepped
TransferHandle = NewType("TransferHandle", object)  # write -> poll, wait, release


class MemKind(str, enum.Enum):
    DRAM = "DRAM"
    VRAM = "VRAM"


class XferState(str, enum.Enum):
    DONE = "DONE"
    PROC = "PROC"
    ERR = "ERR"


class Backoff:
    """The gaps between polls of something due soon (a WRITE's completion, an answer):
    ``first_s`` for the first ``hold_s`` seconds, then growing 1.5x per poll up to
    ``max_s``. The defaults are the WRITE schedule: a small WRITE completes within the
    first millisecond; a large one is progressed at least every 250 us (over TCP the
    initiator's progress calls are what refill the socket). Gaps this short need the
    thread's timer slack lowered (``control.fine_timer_slack``), or each lasts 50 us
    more."""

    def __init__(self, first_s: float = 50e-6, hold_s: float = 1e-3, max_s: float = 250e-6) -> None:
        self.first_s, self.hold_s, self.max_s = first_s, hold_s, max_s
        self.reset()

    def reset(self) -> None:
        """Start over: the next gap is ``first_s`` again."""
        self._gap = self.first_s
        self._until = time.monotonic() + self.hold_s

    def next(self) -> float:
        """The next gap, in seconds."""
        gap = self._gap
        if time.monotonic() >= self._until:
            self._gap = min(self._gap * 1.5, self.max_s)
        return gap


class TransportError(RuntimeError):
    """A transfer failed; the message says what to check."""


class TransferTimeout(TransportError, TimeoutError):
    """A transfer did not complete before its deadline."""


class Transport(abc.ABC):
    """A data plane able to WRITE registered local memory into a peer's registered memory."""

    name: str

    @abc.abstractmethod
    def register(
        self, addr: int, nbytes: int, kind: MemKind = MemKind.DRAM, device: int = 0
    ) -> RegistrationHandle:
        """Register memory for transfers; returns a handle for :meth:`deregister`."""

    @abc.abstractmethod
    def deregister(self, handle: RegistrationHandle) -> None: ...

    @abc.abstractmethod
    def metadata(self) -> bytes:
        """Opaque bytes a peer passes to :meth:`add_peer` to reach this agent."""

    @abc.abstractmethod
    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata; returns the peer's name."""

    @abc.abstractmethod
    def remove_peer(self, peer: str) -> None: ...

    @abc.abstractmethod
    def connect(self, peer: str) -> None:
        """Establish the connection now (so the first transfer doesn't pay for it)."""

    @abc.abstractmethod
    def prep_local(self, descs: Sequence[Desc], kind: MemKind = MemKind.DRAM) -> DescListHandle:
        """Prepare a reusable local descriptor list (indices refer to ``descs``)."""

    @abc.abstractmethod
    def prep_remote(
        self, peer: str, descs: Sequence[Desc], kind: MemKind = MemKind.DRAM
    ) -> DescListHandle:
        """Prepare a reusable descriptor list of the peer's memory."""

    @abc.abstractmethod
    def release_prepped(self, handle: DescListHandle) -> None: ...

    @abc.abstractmethod
    def write(
        self,
        local: DescListHandle,
        local_idx: Sequence[int],
        remote: DescListHandle,
        remote_idx: Sequence[int],
        notif: bytes = b"",
    ) -> TransferHandle:
        """Post one WRITE of ``local[local_idx[i]] -> remote[remote_idx[i]]``; the peer
        receives ``notif`` after the data. Returns a handle for :meth:`poll`/:meth:`wait`."""

    @abc.abstractmethod
    def poll(self, handle: TransferHandle) -> XferState: ...

    @abc.abstractmethod
    def wait(self, handle: TransferHandle, timeout_s: float) -> None:
        """Block (with backoff) until done; raise TransferTimeout / TransportError."""

    @abc.abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Release a transfer handle (safe to call on an unfinished one: it is aborted)."""

    @abc.abstractmethod
    def notify(self, peer: str, message: bytes) -> None:
        """Send ``message`` to ``peer`` (added with :meth:`add_peer`) on its own, not
        bound to a transfer; it reads it with :meth:`notifications`. Returns once it is
        queued; raises :class:`TransportError` for an unknown or unreachable peer."""

    @abc.abstractmethod
    def notifications(self) -> list[tuple[str, bytes]]:
        """Notifications received since the last call, as ``(peer, message)``; also
        progresses the target side."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every registration, prepared list and peer."""
