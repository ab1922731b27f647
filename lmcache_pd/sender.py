"""Producer side of the handoff: gathered chunks -> offer -> one WRITE -> done.

The sender owns a registered send buffer (``pd_buffer_size`` bytes of chunk slots) that
the engine gathers chunks into (``alloc`` slots, fill ``buffer.view(slot)`` or
``buffer.slot_tensor(slot)``), and one DEALER connection per receiver endpoint. ``send``
is blocking and thread-safe (one request per peer at a time) and every step has a
deadline:

1. first contact: ``Hello`` (compat + NIXL metadata) -> ``HelloAck`` (receiver's slots
   and metadata, and usually a :class:`~lmcache_pd.protocol.Grant` of slots lent ahead);
   descriptor lists of the remote slots are prepared once per peer;
2. **credit path** (one round trip): when the chunks the receiver does not already hold
   (as far as this sender knows: what it committed there, and the ``recent`` keys each
   reply lists) fit the current grant, and the grant is younger than half its TTL, the
   chunks are written into it at once and one ``Push`` describes them ->
   ``Committed{stored, bad, missing, grant}``; ``missing`` skipped chunks go by step 3;
3. otherwise, per batch of at most the receiver's slot count: ``Offer`` -> ``Accept``
   (or ``Busy``: wait ``retry_after`` and retry, at most ``pd_busy_max_retries`` times),
   NIXL WRITEs of the wanted chunks into the leased slots, ``Done`` -> ``Committed``.

WRITEs go in groups of about ``pd_write_group_bytes`` (0: one WRITE per request), each
with a notification naming its chunks. Every reply may carry the next grant.

Checksums: each chunk carries the ``kvsum64`` digest (:mod:`lmcache_pd.checksum`) taken
by the pass that filled its slot (the engine's fused gather; :meth:`Sender.checksum` for
chunks placed otherwise, host or VRAM alike). The receiver checks it at the chunk's first
read, not on landing, so corruption in flight is not reported back in ``Committed``.

Failures raise :class:`HandoffError` naming the cause; a failed batch sends ``Cancel``
so the receiver frees its slots at once (its lease TTL covers a sender that dies).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from lmcache_pd import checksum
from lmcache_pd.buffer import SlotBuffer, slots_for
from lmcache_pd.config import Config
from lmcache_pd.control import Codec, ControlTimeout, DealerClient, NotifInbox, fine_timer_slack
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
    Grant,
    Hello,
    HelloAck,
    LeaseNotif,
    Message,
    Offer,
    Push,
)
from lmcache_pd.transports.base import (
    Backoff,
    MemKind,
    TransferTimeout,
    Transport,
    TransportError,
    XferState,
)

log = logging.getLogger(__name__)

MAX_KNOWN_KEYS = 65536  # per receiver: keys this sender believes it holds (skipped)
MAX_GRANT_WANT = 64  # slots asked to be lent ahead, at most
MAX_PEERS = 64  # receiver connections kept per sender (least recently used closed)
# the wait for an answer once our WRITEs completed (_await_answer): 50 us gaps for 0.5 s,
# then growing to 10 ms
_GAP_DUE_S = 50e-6
_DUE_WINDOW_S = 0.5
_GAP_IDLE_MAX_S = 10e-3


class HandoffError(RuntimeError):
    """A handoff failed; the message names the cause and what to check."""

    def __init__(
        self, message: str, code: ErrorCode | None = None, *, reconnect: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reconnect = reconnect  # a fresh Hello may succeed (receiver restarted)


def _no_error(reply: Message) -> Message:
    """``reply``, unless it is the receiver's ``Error``: that is raised."""
    if isinstance(reply, Error):
        raise HandoffError(f"receiver error ({reply.code.value}): {reply.message}", reply.code)
    return reply


@dataclass(frozen=True)
class OutChunk:
    """A chunk ready to send: its key, the send-buffer slot holding it, the used bytes,
    and its ``kvsum64`` digest (from the gather that filled the slot; computed at send
    time when None)."""

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
    local: Any = None  # our slots prepped at the receiver's slot size (None: self.local)
    tp_rank: int = 0  # the receiver's TP shape (HelloAck)
    tp_size: int = 1
    rank_ports: list[int] = field(default_factory=list)
    grant: Grant | None = None
    grant_at: float = 0.0
    known: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def learn(self, keys: Sequence[bytes]) -> None:
        """Remember keys the receiver holds (bounded, oldest forgotten first)."""
        for key in keys:
            self.known[key] = None
            self.known.move_to_end(key)
        while len(self.known) > MAX_KNOWN_KEYS:
            self.known.popitem(last=False)

    def take_grant(self, fresh: int) -> Grant | None:
        """The grant, if it fits ``fresh`` chunks and is within the first half of the
        time it had left when stated (so it cannot expire at the receiver before our
        Push lands). Used once either way: an Offer makes the receiver take it back."""
        grant, self.grant = self.grant, None
        if grant is None or fresh > len(grant.slots):
            return None
        if time.monotonic() - self.grant_at >= grant.ttl_s / 2:
            return None
        return grant

    def keep(self, reply: Committed) -> None:
        """Every reply states our grant (None: we have none) and what became held."""
        self.grant, self.grant_at = reply.grant, time.monotonic()
        self.learn(reply.recent)


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
        # our slots prepped at a smaller receiver slot size (a receiver TP rank holding
        # fewer heads than we do takes head pieces), one list per size, reused
        self._locals: dict[int, Any] = {}
        # slots asked to be lent ahead: as many as one request of ours could use (the
        # receiver lends at most half its buffer, shared by its connected senders)
        self._want_grant = min(self.buffer.num_slots, MAX_GRANT_WANT)
        self._ctx = zmq.Context()
        # answers by NIXL notification (pd_reply_by_notif), for every thread of ours
        self._inbox = NotifInbox(transport.notifications, self.codec, self.counters)
        self._peers: OrderedDict[str, _Peer] = OrderedDict()  # least recently used first
        self._connecting: dict[str, threading.Lock] = {}
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
        """The ``kvsum64`` digest of the first ``nbytes`` of a filled slot, host or VRAM
        (a pass of its own: the engine takes it in its gather instead), or
        ``NO_CHECKSUM`` with ``pd_verify_checksums: false``."""
        if not self.cfg.pd_verify_checksums:
            return NO_CHECKSUM
        if self.buffer.kind is MemKind.DRAM:
            return checksum.chunk_digest(self.buffer.view(slot, nbytes))
        return checksum.chunk_digest(self.buffer.slot_tensor(slot)[:nbytes])

    # ------------------------------------------------------------------ peers
    def _peer(self, endpoint: str) -> _Peer:
        """The connection to ``endpoint``, saying Hello first if there is none. Hellos
        to different receivers run in parallel: one unreachable decoder never holds up
        pushes to the others. At most ``MAX_PEERS`` connections are kept (the least
        recently used idle one is closed; it reconnects when needed again)."""
        with self._peers_lock:
            peer = self._peers.get(endpoint)
            if peer is not None:
                self._peers.move_to_end(endpoint)
                return peer
            connecting = self._connecting.setdefault(endpoint, threading.Lock())
        with connecting:
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
            with self._peers_lock:
                self._peers[endpoint] = peer
                idle = [p for p in self._peers.values() if p is not peer and not p.lock.locked()][
                    : max(0, len(self._peers) - MAX_PEERS)
                ]
            for old in idle:
                log.info("closing the least recently used connection to %s", old.endpoint)
                self._forget(old)
            return peer

    def _hello(self, endpoint: str, client: DealerClient) -> _Peer:
        hello = Hello(
            agent=self.transport.name,
            compat=self.compat,
            tp_rank=self.tp_rank,
            want_grant=self._want_grant,
        )
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
        try:
            agent = self.transport.add_peer(payload[0])
        except TransportError as exc:
            raise HandoffError(
                f"data transfer to {endpoint} failed: its transport agent: {exc}",
                ErrorCode.TRANSFER,
            ) from None
        descs = [(a, min(n, self.buffer.slot_bytes), d) for a, n, d in reply.slot_descs]
        remote = self.transport.prep_remote(agent, descs, MemKind(reply.mem_kind))
        self.transport.connect(agent)
        log.info("connected to receiver %s (%s, %d slots)", endpoint, agent, reply.num_slots)
        peer = _Peer(
            endpoint,
            client,
            agent,
            reply.num_slots,
            reply.slot_bytes,
            remote,
            threading.Lock(),
            local=self._local_at(reply.slot_bytes),
            tp_rank=reply.tp_rank,
            tp_size=reply.tp_size,
            rank_ports=list(reply.rank_ports),
        )
        peer.grant, peer.grant_at = reply.grant, time.monotonic()
        return peer

    def _local_at(self, slot_bytes: int) -> Any:
        """Our slots prepped for WRITEs into receive slots of ``slot_bytes`` (smaller
        than ours: each descriptor trimmed to it, prepped once per size)."""
        if slot_bytes >= self.buffer.slot_bytes:
            return None
        with self._peers_lock:
            local = self._locals.get(slot_bytes)
            if local is None:
                descs = [(a, slot_bytes, d) for a, _, d in self.buffer.descs]
                local = self._locals[slot_bytes] = self.transport.prep_local(
                    descs, self.buffer.kind
                )
            return local

    def receiver_tp(self, endpoint: str) -> tuple[int, int, list[int]]:
        """The TP ``(rank, size, every rank's port)`` of the receiver at ``endpoint``
        (saying Hello first if needed; ports are [] when that engine picks free ones)."""
        peer = self._peer(endpoint)
        return peer.tp_rank, peer.tp_size, list(peer.rank_ports)

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
            too_big = [c.nbytes for c in chunks if c.nbytes > peer.slot_bytes]
            if too_big:
                raise HandoffError(
                    f"chunks of {max(too_big)} bytes exceed the receive slots of {endpoint} "
                    f"({peer.slot_bytes} bytes): a TP rank's KV heads must be sent as "
                    "pieces (lmcache_pd.tp)",
                    ErrorCode.INCOMPATIBLE,
                )
            try:
                totals = self._send_batches(peer, req_id, chunks)
            except HandoffError as exc:
                if exc.code is ErrorCode.UNKNOWN_PEER or exc.reconnect:
                    self._forget(peer)  # the receiver restarted: re-Hello once
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
            fresh = [c for c in chunks if c.key not in peer.known]
            grant = peer.take_grant(len(fresh))
            if grant is not None:
                skipped = [c for c in chunks if c.key in peer.known]
                chunks, (sent, dedup, nbytes, bad) = self._push(peer, req_id, fresh, skipped, grant)
            for start in range(0, len(chunks), peer.num_slots):
                s, d, b, x = self._send_batch(peer, req_id, chunks[start : start + peer.num_slots])
                sent, dedup, nbytes, bad = sent + s, dedup + d, nbytes + b, bad + x
        if bad:
            raise HandoffError(
                f"{bad} chunk(s) of {req_id} were rejected by the receiver",
                ErrorCode.CHECKSUM,
            )
        return sent, dedup, nbytes, bad

    def _post_writes(
        self, peer: _Peer, lease: int, chunks: Sequence[OutChunk], slots: Sequence[int]
    ) -> list[Any]:
        """Post the WRITEs of ``chunks`` into remote ``slots`` in notified groups."""
        group_bytes = self.cfg.pd_write_group_bytes
        per_group = max(1, group_bytes // self.buffer.slot_bytes if group_bytes else len(chunks))
        handles: list[Any] = []
        try:
            for first in range(0, len(chunks), per_group):
                group = chunks[first : first + per_group]
                handles.append(
                    self.transport.write(
                        self.local if peer.local is None else peer.local,
                        [c.slot for c in group],
                        peer.remote,
                        list(slots[first : first + len(group)]),
                        LeaseNotif(lease, first, len(group)).encode(),
                    )
                )
        except BaseException:
            for handle in handles:
                self.transport.release(handle)
            raise
        return handles

    def _push(
        self,
        peer: _Peer,
        req_id: str,
        fresh: list[OutChunk],
        skipped: list[OutChunk],
        grant: Grant,
    ) -> tuple[list[OutChunk], tuple[int, int, int, int]]:
        """The credit path: WRITE ``fresh`` (the chunks the receiver lacks, as far as we
        know) into ``grant`` and send one ``Push`` naming ``skipped`` too. Returns the
        chunks still to send the slow way (skipped ones the receiver no longer holds) and
        ``(sent, dedup, bytes, bad)``."""
        push = Push(
            req_id=req_id,
            lease=grant.lease,
            keys=[c.key for c in fresh],
            nbytes=[c.nbytes for c in fresh],
            checksums=[c.checksum or NO_CHECKSUM for c in fresh],
            skipped=[c.key for c in skipped],
            want_grant=self._want_grant,
            reply_by_notif=self.cfg.pd_reply_by_notif,
        )
        self.counters.inc("pushes")
        reply = self._write_and_commit(peer, req_id, grant.lease, fresh, grant.slots, push)
        peer.learn([fresh[i].key for i in reply.stored if i not in reply.bad])
        for key in reply.missing:
            peer.known.pop(key, None)
        moved = sum(fresh[i].nbytes for i in reply.stored)
        sent = len(fresh) - len(reply.bad)
        dedup = len(skipped) - len(reply.missing)
        self.counters.inc("dedupe_hits", dedup)
        self._tally(sent, moved, len(reply.bad))
        missing = set(reply.missing)
        rest = [c for c in skipped if c.key in missing]
        return rest, (sent, dedup, moved, len(reply.bad))

    def _reply(self, peer: _Peer, req_id: str) -> Any:
        """The receiver's answer to a message already sent, within
        ``pd_connect_timeout_s``."""
        try:
            reply, _ = peer.client.recv(self.cfg.pd_connect_timeout_s, req_id)
        except ControlTimeout as exc:
            self._forget(peer)
            raise HandoffError(f"receiver stopped answering: {exc}", ErrorCode.TIMEOUT) from None
        return _no_error(reply)

    def _await_answer(self, peer: _Peer, req_id: str, lease: int, handles: list[Any]) -> Message:
        """Progress our WRITEs of ``lease`` until they complete (within
        ``pd_transfer_timeout_s``: else :class:`TransferTimeout`), then wait for the
        receiver's answer (within ``pd_connect_timeout_s``). The answer comes as a NIXL
        notification (``pd_reply_by_notif``, registered with the inbox) or over ZMQ
        (errors about the message itself; everything without ``pd_reply_by_notif``):
        both are polled. Polling also progresses the transport: NIXL-UCX sends a WRITE's
        notification from the first progress call after its flush completed, so the
        receiver's commit waits on these polls.

        Gaps between polls (this thread's timer slack set to 1 us): the WRITE schedule
        of :class:`~lmcache_pd.transports.base.Backoff` while WRITEs fly; once they
        completed, 50 us for 0.5 s (the answer is due), then growing to 10 ms (without
        ``pd_reply_by_notif``: from 1 ms at once). Gaps of 1 ms and more block on the
        ZMQ socket."""
        fine_timer_slack()
        write_deadline = time.monotonic() + self.cfg.pd_transfer_timeout_s
        written_at: float | None = None
        gaps = Backoff()
        while True:
            states = [self.transport.poll(handle) for handle in handles]
            if XferState.ERR in states:
                raise TransportError("a WRITE failed (receiver died or connection lost)")
            now = time.monotonic()
            if written_at is None and all(st is XferState.DONE for st in states):
                written_at = now  # the answer is due: by notification, polled soon
                gaps = (
                    Backoff(_GAP_DUE_S, _DUE_WINDOW_S, _GAP_IDLE_MAX_S)
                    if self.cfg.pd_reply_by_notif
                    else Backoff(1e-3, 0.0, _GAP_IDLE_MAX_S)
                )
            answer = None
            if self.cfg.pd_reply_by_notif and written_at is not None:
                # not before: NIXL sends our data notifications only once the WRITEs
                # completed, so no answer can come earlier, and its notification poll
                # progresses until idle (over TCP: pushing the WRITE without a break)
                answer = self._inbox.take(peer.agent, lease)
            if answer is None:
                answer = peer.client.recv_ready(req_id)
            if answer is not None:
                return _no_error(answer)
            if written_at is None and now >= write_deadline:
                raise TransferTimeout(
                    f"WRITEs not complete after {self.cfg.pd_transfer_timeout_s:.1f}s"
                )
            if written_at is not None and now - written_at >= self.cfg.pd_connect_timeout_s:
                self._forget(peer)
                raise HandoffError(
                    f"receiver {peer.endpoint} stopped answering: no answer to {req_id} "
                    f"within {self.cfg.pd_connect_timeout_s:.1f}s of its WRITEs"
                    + (
                        " (answers come by NIXL notification: if the receiver cannot reach "
                        "this sender's NIXL agent, set pd_reply_by_notif: false)"
                        if self.cfg.pd_reply_by_notif
                        else ""
                    ),
                    ErrorCode.TIMEOUT,
                )
            gap = gaps.next()
            if gap >= 1e-3:
                peer.client.poller.poll(int(gap * 1000))
            else:
                time.sleep(gap)

    def _request(self, peer: _Peer, msg: Offer) -> Any:
        peer.client.send(msg)
        return self._reply(peer, msg.req_id)

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
        reply = self._write_and_commit(peer, req_id, accept.lease, wanted, accept.slots, None)
        peer.learn([batch[i].key for i in reply.stored if i not in reply.bad])
        wanted_idx = set(accept.want)
        moved = sum(batch[i].nbytes for i in reply.stored if i in wanted_idx)
        sent = len(accept.want) - len(reply.bad)
        self._tally(sent, moved, len(reply.bad))
        return sent, len(accept.have), moved, len(reply.bad)

    def _tally(self, sent: int, moved: int, bad: int) -> None:
        """Count a committed batch: chunks that landed good, their bytes, rejections."""
        self.counters.inc("chunks", sent)
        self.counters.inc("bytes", moved)
        if bad:
            self.counters.inc("checksum_failures", bad)

    def _write_and_commit(
        self,
        peer: _Peer,
        req_id: str,
        lease: int,
        chunks: list[OutChunk],
        slots: Sequence[int],
        push: Push | None,
    ) -> Committed:
        """WRITE ``chunks`` into the remote ``slots`` of ``lease`` and get them committed:
        the credit path sends its ``push`` right after posting the WRITEs, the offer path
        a ``Done`` once they completed. A failure cancels the lease (its slots are freed
        at once) and raises :class:`HandoffError`."""
        handles: list[Any] = []
        if self.cfg.pd_reply_by_notif:
            self._inbox.expect(peer.agent, lease)
        try:
            if push is not None:  # first: it wakes the receiver, whose progress we need
                peer.client.send(push)
            handles = self._post_writes(peer, lease, chunks, slots)
            if push is None:
                peer.client.send(
                    Done(req_id=req_id, lease=lease, reply_by_notif=self.cfg.pd_reply_by_notif)
                )
            reply = self._await_answer(peer, req_id, lease, handles)
        except TransportError as exc:
            self.counters.inc("transfer_errors")
            self._cancel(peer, req_id, lease, str(exc))
            raise HandoffError(
                f"data transfer to {peer.endpoint} failed: {exc}",
                ErrorCode.TRANSFER,
                reconnect=push is not None,  # a restarted receiver fails the WRITE first
            ) from None
        except HandoffError as exc:
            if exc.code is not ErrorCode.TIMEOUT:
                self._cancel(peer, req_id, lease, str(exc))
            raise
        finally:
            self._inbox.forget(peer.agent, lease)
            for handle in handles:
                self.transport.release(handle)
        if not isinstance(reply, Committed):
            asked = "Push" if push is not None else "Done"
            raise HandoffError(f"unexpected reply to {asked}: {type(reply).__name__}")
        peer.keep(reply)
        return reply

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
        for local in self._locals.values():
            self.transport.release_prepped(local)
        self.buffer.close()
        self._ctx.term()
