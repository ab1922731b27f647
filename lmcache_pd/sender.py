"""Producer side of the handoff: gathered chunks -> offer -> one WRITE -> done.

The sender owns a registered send buffer (``pd_buffer_size`` bytes of chunk slots) that
the engine gathers chunks into (``alloc`` slots, fill ``buffer.view(slot)`` or
``buffer.slot_tensor(slot)``), and one DEALER connection per receiver endpoint. ``send``
is blocking and thread-safe (one request per peer at a time) and every step has a
deadline:

1. first contact: ``Hello`` (compat + NIXL metadata) -> ``HelloAck`` (receiver's slots
   and metadata); descriptor lists of the remote slots are prepared once per peer;
2. per batch of at most the receiver's slot count: ``Offer`` -> ``Accept`` (or ``Busy``:
   wait ``retry_after`` and retry, at most ``pd_busy_max_retries`` times);
3. NIXL WRITEs of the wanted chunks into the granted slots, in groups of about
   ``GROUP_BYTES``, each with a notification naming its chunks, so the receiver verifies
   a group while the next is in flight;
4. ``Done`` -> ``Committed{stored, bad}``.

Failures raise :class:`HandoffError` naming the cause; a failed batch sends ``Cancel``
so the receiver frees its slots at once (its lease TTL covers a sender that dies).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import xxhash
import zmq

from lmcache_pd.buffer import SlotBuffer, slots_for
from lmcache_pd.config import Config
from lmcache_pd.control import Codec, ControlTimeout, DealerClient
from lmcache_pd.layout import KVLayout
from lmcache_pd.metrics import Counters
from lmcache_pd.protocol import (
    NO_CHECKSUM,
    Accept,
    Busy,
    Cancel,
    Committed,
    Compat,
    Done,
    Error,
    ErrorCode,
    Hello,
    HelloAck,
    LeaseNotif,
    Offer,
)
from lmcache_pd.transports.base import MemKind, Transport, TransportError

log = logging.getLogger(__name__)

GROUP_BYTES = 16 * 1024 * 1024  # WRITE group size: verification overlaps later groups


class HandoffError(RuntimeError):
    """A handoff failed; the message names the cause and what to check."""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class OutChunk:
    """A chunk ready to send: its key, the send-buffer slot holding it, the used bytes,
    and its xxh3-64 checksum (computed at send time when None)."""

    key: bytes
    slot: int
    nbytes: int
    checksum: int | None = None


class SendResult(msgspec.Struct):
    req_id: str
    chunks: int
    sent: int
    dedup: int
    bytes: int
    seconds: float
    bad: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class _Peer:
    endpoint: str
    client: DealerClient
    agent: str
    num_slots: int
    slot_bytes: int
    remote: Any
    lock: threading.Lock


class Sender:
    """Prefiller-side handoff client. Thread-safe; ``close()`` it."""

    def __init__(
        self,
        cfg: Config,
        layout: KVLayout,
        transport: Transport,
        *,
        tp_size: int = 1,
        tp_rank: int = 0,
        secret: bytes | None = None,
        buffer_bytes: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.layout = layout
        self.transport = transport
        self.tp_rank = tp_rank
        self.compat = Compat.of(layout, cfg.chunk_size, cfg.hash_algorithm, tp_size)
        self.codec = Codec(secret or cfg.auth_secret(), cfg.pd_max_frame_bytes)
        self.counters = Counters("sender")
        slot_bytes = layout.bytes_per_chunk(cfg.chunk_size)
        self.buffer = SlotBuffer(
            slot_bytes,
            slots_for(buffer_bytes or cfg.pd_buffer_size, slot_bytes),
            transport,
            cfg.pd_buffer_device,
        )
        self.local = transport.prep_local(self.buffer.descs, self.buffer.kind)
        self._ctx = zmq.Context()
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()

    # ------------------------------------------------------------------ slots
    def alloc(self, n: int, timeout_s: float | None = None) -> list[int]:
        """Take ``n`` send slots (waits up to the transfer timeout for them to free)."""
        return self.buffer.alloc(
            n, self.cfg.pd_transfer_timeout_s if timeout_s is None else timeout_s
        )

    def free(self, slots: list[int]) -> None:
        self.buffer.free(slots)

    def checksum(self, slot: int, nbytes: int) -> int:
        """xxh3-64 of a gathered chunk, or ``NO_CHECKSUM`` where we do not verify
        (``pd_verify_checksums: false``, or a VRAM buffer the CPU cannot hash)."""
        if not self.cfg.pd_verify_checksums or self.buffer.kind is not MemKind.DRAM:
            return NO_CHECKSUM
        return xxhash.xxh3_64_intdigest(self.buffer.view(slot, nbytes)) or 1

    # ------------------------------------------------------------------ peers
    def _peer(self, endpoint: str) -> _Peer:
        with self._peers_lock:
            peer = self._peers.get(endpoint)
            if peer is not None:
                return peer
            client = DealerClient(self._ctx, self.codec, endpoint, self.counters)
            try:
                peer = self._hello(endpoint, client)
            except BaseException:
                client.close()
                raise
            self._peers[endpoint] = peer
            return peer

    def _hello(self, endpoint: str, client: DealerClient) -> _Peer:
        hello = Hello(agent=self.transport.name, compat=self.compat, tp_rank=self.tp_rank)
        try:
            reply, payload = client.request(
                hello, [self.transport.metadata()], self.cfg.pd_connect_timeout_s
            )
        except ControlTimeout as exc:
            raise HandoffError(f"cannot reach receiver: {exc}", ErrorCode.TIMEOUT) from None
        if isinstance(reply, Error):
            raise HandoffError(f"receiver {endpoint} refused Hello: {reply.message}", reply.code)
        if not isinstance(reply, HelloAck) or len(payload) != 1:
            raise HandoffError(f"receiver {endpoint} answered Hello with {type(reply).__name__}")
        if reply.slot_bytes < self.buffer.slot_bytes:
            raise HandoffError(
                f"receiver slots of {reply.slot_bytes} bytes are smaller than ours "
                f"({self.buffer.slot_bytes})",
                ErrorCode.INCOMPATIBLE,
            )
        agent = self.transport.add_peer(payload[0])
        descs = [(a, min(n, self.buffer.slot_bytes), d) for a, n, d in reply.slot_descs]
        remote = self.transport.prep_remote(agent, descs, MemKind(reply.mem_kind))
        self.transport.connect(agent)
        log.info("connected to receiver %s (%s, %d slots)", endpoint, agent, reply.num_slots)
        return _Peer(
            endpoint, client, agent, reply.num_slots, reply.slot_bytes, remote, threading.Lock()
        )

    def _forget(self, peer: _Peer) -> None:
        with self._peers_lock:
            if self._peers.get(peer.endpoint) is peer:
                del self._peers[peer.endpoint]
        peer.client.close()
        self.transport.release_prepped(peer.remote)
        self.transport.remove_peer(peer.agent)

    # ------------------------------------------------------------------ send
    def send(self, endpoint: str, req_id: str, chunks: Sequence[OutChunk]) -> SendResult:
        """Hand ``chunks`` (in prefix order) to the receiver at ``endpoint``.

        Blocks until the receiver committed them or a deadline passed. Chunks the
        receiver already holds are not resent (``dedup``). Raises :class:`HandoffError`.
        The caller still owns the send slots (free them after this returns).
        """
        self.counters.inc("requests")
        started = time.perf_counter()
        chunks = [
            c
            if c.checksum is not None
            else OutChunk(c.key, c.slot, c.nbytes, self.checksum(c.slot, c.nbytes))
            for c in chunks
        ]
        try:
            peer = self._peer(endpoint)
            try:
                totals = self._send_batches(peer, req_id, chunks)
            except HandoffError as exc:
                if exc.code is ErrorCode.UNKNOWN_PEER:  # the receiver restarted: re-Hello once
                    self._forget(peer)
                    totals = self._send_batches(self._peer(endpoint), req_id, chunks)
                else:
                    raise
        except HandoffError:
            self.counters.inc("failures")
            raise
        sent, dedup, nbytes, bad = totals
        return SendResult(
            req_id, len(chunks), sent, dedup, nbytes, time.perf_counter() - started, bad
        )

    def _send_batches(
        self, peer: _Peer, req_id: str, chunks: list[OutChunk]
    ) -> tuple[int, int, int, int]:
        sent = dedup = nbytes = bad = 0
        with peer.lock:
            for start in range(0, len(chunks), peer.num_slots):
                s, d, b, x = self._send_batch(peer, req_id, chunks[start : start + peer.num_slots])
                sent, dedup, nbytes, bad = sent + s, dedup + d, nbytes + b, bad + x
        if bad:
            raise HandoffError(
                f"{bad} chunk(s) of {req_id} failed the receiver's checksum (corrupted in flight)",
                ErrorCode.CHECKSUM,
            )
        return sent, dedup, nbytes, bad

    def _request(self, peer: _Peer, msg: Any) -> Any:
        try:
            reply, _ = peer.client.request(msg, (), self.cfg.pd_connect_timeout_s)
        except ControlTimeout as exc:
            self._forget(peer)
            raise HandoffError(f"receiver stopped answering: {exc}", ErrorCode.TIMEOUT) from None
        if isinstance(reply, Error):
            raise HandoffError(f"receiver error ({reply.code.value}): {reply.message}", reply.code)
        return reply

    def _offer(self, peer: _Peer, req_id: str, batch: list[OutChunk]) -> Accept:
        offer = Offer(
            req_id=req_id,
            keys=[c.key for c in batch],
            nbytes=[c.nbytes for c in batch],
            checksums=[c.checksum or NO_CHECKSUM for c in batch],
        )
        for attempt in range(self.cfg.pd_busy_max_retries + 1):
            reply = self._request(peer, offer)
            if isinstance(reply, Accept):
                return reply
            if not isinstance(reply, Busy):
                raise HandoffError(f"unexpected reply to Offer: {type(reply).__name__}")
            self.counters.inc("busy")
            if attempt < self.cfg.pd_busy_max_retries:
                time.sleep(min(max(reply.retry_after_s, 0.001), 1.0) * (1 + attempt / 4))
        raise HandoffError(
            f"receiver {peer.endpoint} stayed busy (receive buffer full) after "
            f"{self.cfg.pd_busy_max_retries} retries; raise its pd_buffer_size or lower the load",
            ErrorCode.TIMEOUT,
        )

    def _send_batch(
        self, peer: _Peer, req_id: str, batch: list[OutChunk]
    ) -> tuple[int, int, int, int]:
        accept = self._offer(peer, req_id, batch)
        if len(accept.want) != len(accept.slots) or any(
            not 0 <= i < len(batch) for i in accept.want
        ):
            raise HandoffError("receiver sent an inconsistent Accept")
        self.counters.inc("dedupe_hits", len(accept.have))
        if not accept.want:
            return 0, len(accept.have), 0, 0
        wanted = [batch[i] for i in accept.want]
        per_group = max(1, GROUP_BYTES // self.buffer.slot_bytes)
        handles: list[Any] = []
        try:
            for first in range(0, len(wanted), per_group):
                group = wanted[first : first + per_group]
                handles.append(
                    self.transport.write(
                        self.local,
                        [c.slot for c in group],
                        peer.remote,
                        accept.slots[first : first + per_group],
                        LeaseNotif(accept.lease, first, len(group)).encode(),
                    )
                )
            for handle in handles:
                self.transport.wait(handle, self.cfg.pd_transfer_timeout_s)
            reply = self._request(peer, Done(req_id=req_id, lease=accept.lease))
        except TransportError as exc:
            self.counters.inc("transfer_errors")
            self._cancel(peer, req_id, accept.lease, str(exc))
            raise HandoffError(
                f"data transfer to {peer.endpoint} failed: {exc}", ErrorCode.TRANSFER
            ) from None
        except HandoffError as exc:
            if exc.code is not ErrorCode.TIMEOUT:
                self._cancel(peer, req_id, accept.lease, str(exc))
            raise
        finally:
            for handle in handles:
                self.transport.release(handle)
        if not isinstance(reply, Committed):
            raise HandoffError(f"unexpected reply to Done: {type(reply).__name__}")
        wanted_idx = set(accept.want)
        moved = sum(batch[i].nbytes for i in reply.stored if i in wanted_idx)
        self.counters.inc("chunks", len(accept.want) - len(reply.bad))
        self.counters.inc("bytes", moved)
        if reply.bad:
            self.counters.inc("checksum_failures", len(reply.bad))
        return len(accept.want) - len(reply.bad), len(accept.have), moved, len(reply.bad)

    def _cancel(self, peer: _Peer, req_id: str, lease: int, reason: str) -> None:
        try:
            peer.client.send(Cancel(req_id=req_id, lease=lease, reason=reason[:200]))
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        with self._peers_lock:
            peers = list(self._peers.values())
        for peer in peers:
            self._forget(peer)
        self.transport.release_prepped(self.local)
        self.buffer.close()
        self._ctx.term()
