"""Consumer side of the handoff: lease slots, accept writes, hand chunks on verified.

The receiver owns a registered receive buffer of ``pd_buffer_size`` bytes split into
chunk slots, a ROUTER socket on ``pd_bind_host:pd_peer_init_port`` and one background
thread serving it (a :class:`~lmcache_pd.control.RouterLoop`: plain blocking ZMQ, no
asyncio, so a message is handled as soon as it arrives). Per Offer it answers ``Accept``
(chunks it already holds, in the buffer or in a tier ``store``, are listed in ``have``
and not resent; the rest get slots under a **lease**), ``Busy`` (no room now) or
``Error``. Each NIXL WRITE group's notification names the chunks that landed. On
``Done`` with every group landed, the chunks become *ready*; a lease that sees no
``Done`` within its TTL expires and its slots are freed: a dead sender never leaks slots.

Checksums (no pass of their own): a ready chunk keeps the ``kvsum64`` digest its sender
took in its gather and is checked by the first pass that reads it anyway, whichever
comes first: the store thread's read for the copy into the tier ``store`` (a chunk
enters a tier only verified), or the engine's scatter into paged KV
(:meth:`Receiver.acquire_checked` hands out the expected digest with the bytes, the
scatter hashes what it reads and the engine reports with :meth:`Receiver.settle`).
:meth:`Receiver.acquire` and :meth:`Receiver.read` check unverified chunks themselves.
A chunk that fails is dropped from the buffer (its slot freed once no reader pins it)
and from the store, never handed on as good, counted (``checksum_failures``) and
logged (rate-limited); the engine recomputes its tokens.

Credits: each connected sender may be lent a **grant** of free slots (at Hello, then with
every ``Committed``) which it writes into before asking; its ``Push`` then turns the grant
into an ordinary lease (the ``Push`` plays the part of ``Offer`` and ``Done`` at once).
Notifications that land before their ``Push`` are kept with the grant. An unused grant is
freed after ``pd_lease_ttl_s``; grants evict only ready chunks the tier store also holds,
and together never take more than half of the buffer.

Ready chunks stay in the buffer (LRU; unpinned ones are evicted for new leases) and are
copied into the ``store`` when one is configured. Engine-facing calls (``lookup``,
``wait_for``, ``acquire``/``release``, ``read``) are thread-safe.

While no lease is outstanding the thread blocks on the socket: zero CPU when idle. With a
lease outstanding it polls NIXL notifications with backoff (target-side progress): from
50 us up to 250 us while data is due, 10 ms for leases waiting on a slow sender; a
message arriving meanwhile waits at most one gap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import zmq

from lmcache_pd import checksum
from lmcache_pd.buffer import SlotBuffer, slots_for
from lmcache_pd.config import Config
from lmcache_pd.control import BlockingRouter, Codec, RouterLoop
from lmcache_pd.layout import KVLayout
from lmcache_pd.metrics import Counters, RateLimitedLog
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
    LeaseReply,
    Message,
    Offer,
    Push,
)
from lmcache_pd.tiers.base import Store
from lmcache_pd.tp import TPMappingError, check_tp
from lmcache_pd.transports.base import MemKind, Transport, TransportError

log = logging.getLogger(__name__)

ChunkData = memoryview | bytes | torch.Tensor  # chunk bytes as acquire() hands them out
_POLL_MIN_S = 50e-6
_POLL_FAST_MAX_S = 250e-6
_POLL_SLOW_MAX_S = 10e-3
_FAST_WINDOW_S = 0.5
_RECENT_KEYS = 4096  # keys made ready lately, told to senders so they can skip them
_RECENT_PER_REPLY = 1024
_FAILURE_LOG_EVERY_S = 10.0  # checksum failures: one log line per this interval at most


@dataclass
class _Lease:
    lease: int
    req_id: str
    identity: bytes
    keys: list[bytes]
    nbytes: list[int]
    checksums: list[int]
    have: list[int]
    want: list[int]
    slots: list[int]
    granted_at: float
    deadline: float
    landed: set[int] = field(default_factory=set)  # positions in ``want``
    done: Done | None = None  # set when the sender's WRITEs are posted (Push) or done (Done)
    done_at: float = 0.0  # when ``done`` was set (monotonic)
    early: list[tuple[int, int]] = field(default_factory=list)  # grant: notifs before Push
    missing: list[bytes] = field(default_factory=list)  # Push: skipped keys not held here


@dataclass
class _Ready:
    slot: int
    nbytes: int
    pins: int = 0
    # the sender's digest, still to be checked at the first read (NO_CHECKSUM: checked
    # already, or not hashed)
    checksum: int = NO_CHECKSUM
    rejected: bool = False  # failed its checksum: gone from ``_ready``, slot freed unpinned


@dataclass
class _PeerInfo:
    agent: str
    hello: Hello
    leases: set[int] = field(default_factory=set)
    grant: int | None = None  # lease id of the slots lent to this sender now
    want_grant: int = 0
    recent_seen: int = 0  # last ``_recent`` sequence number told to this sender


class Receiver:
    """Decoder-side handoff endpoint. ``start()`` it; ``close()`` it."""

    def __init__(
        self,
        cfg: Config,
        layout: KVLayout,
        transport: Transport,
        *,
        port: int | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        store: Store | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        self.layout = layout
        self.transport = transport
        self.store = store
        self.compat = Compat.of(layout, cfg.chunk_size, cfg.hash_algorithm, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.port = cfg.port_for_rank("pd_peer_init_port", tp_rank) if port is None else port
        self.codec = Codec(secret or cfg.auth_secret(), cfg.pd_max_frame_bytes)
        self.counters = Counters("receiver")
        slot_bytes = layout.bytes_per_chunk(cfg.chunk_size)
        self.buffer = SlotBuffer(
            slot_bytes,
            slots_for(cfg.pd_buffer_size, slot_bytes),
            transport,
            cfg.pd_buffer_device,
        )
        self._lock = threading.Condition()
        self._ready: OrderedDict[bytes, _Ready] = OrderedDict()
        self._leases: dict[int, _Lease] = {}
        self._grants: dict[int, _Lease] = {}  # lent slots not yet pushed into
        self._to_store: list[bytes] = []  # committed, not yet queued for the store
        self._store_pins: dict[bytes, int] = {}  # acquire() pins held in the store, per key
        self._store_queue: queue.SimpleQueue[tuple[bytes, _Ready] | None] = queue.SimpleQueue()
        self._store_thread: threading.Thread | None = None
        self._recent: deque[tuple[int, bytes]] = deque(maxlen=_RECENT_KEYS)
        self._recent_seq = 0
        # rejected chunks a reader still pins (slots freed at their last release)
        self._doomed: dict[bytes, list[_Ready]] = {}
        self._failures_unlogged = 0
        self._failure_logged_at = -_FAILURE_LOG_EVERY_S
        self._notif_log = RateLimitedLog(log)
        self._peers: dict[bytes, _PeerInfo] = {}
        self._next_lease = 1
        self._ctx: zmq.Context | None = None
        self._loop: RouterLoop | None = None
        self._delay = _POLL_MIN_S  # the next gap between notification polls
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Receiver:
        """Bind (raises if the port is taken) and start serving in a background thread."""
        self._ctx = zmq.Context()
        try:
            router = BlockingRouter(
                self._ctx, self.codec, self.cfg.pd_bind_host, self.port, self.counters
            )
        except BaseException:
            self._ctx.term()
            raise
        self.endpoint, self.port = router.endpoint, router.port
        self._loop = RouterLoop(
            self._ctx,
            router,
            self._on_message,
            name="receiver",
            next_timeout_s=self._next_timeout_s,
            fine_timers=True,
            on_tick=self._tick,
        ).start()
        log.info(
            "receiver listening on %s: %d slots x %d bytes (%s)",
            self.endpoint,
            self.buffer.num_slots,
            self.buffer.slot_bytes,
            self.buffer.kind.value,
        )
        return self

    @property
    def alive(self) -> bool:
        """Started and its thread still serving (a failing message never stops it)."""
        return self._loop is not None and self._loop.alive

    def close(self) -> None:
        """Stop the thread, close the socket, free leases and the buffer registration."""
        if self._loop is not None:
            if self._loop.close():
                assert self._ctx is not None
                self._ctx.term()
            self._loop = None
        if self._store_thread is not None:
            self._store_queue.put(None)  # copies queued before still land in the store
            self._store_thread.join(30.0)
        with self._lock:
            self._leases.clear()
            self._grants.clear()
            self._ready.clear()
            self._doomed.clear()
            self._lock.notify_all()
        self.buffer.close()

    # ------------------------------------------------------------------ serving
    def _on_message(self, identity: bytes, msg: Message, payload: list[bytes]) -> None:
        """One message, on the loop thread: answered at once, or (Push/Done) once its
        data has landed."""
        try:
            reply, out = self._handle(identity, msg, payload)
        except Exception as exc:  # never let one message kill the receiver
            log.exception("receiver failed handling %s", type(msg).__name__)
            reply, out = Error(code=ErrorCode.INTERNAL, message=str(exc)), []
        if reply is not None:
            self._send(identity, reply, out)
        self._store_committed()

    def _send(self, identity: bytes, msg: Message, payload: Sequence[bytes] = ()) -> None:
        assert self._loop is not None
        self._loop.send(identity, msg, payload)

    def _answer(self, lease: _Lease, answer: Committed | Error) -> None:
        """A lease's final answer (loop thread): a signed NIXL notification to the
        sender's agent when its Push/Done asked (``lease.done.reply_by_notif``), else a
        ZMQ reply.
        A notification that cannot be sent goes over ZMQ (the sender looks there too),
        with a warning."""
        peer = self._peers.get(lease.identity)
        if lease.done is not None and lease.done.reply_by_notif and peer is not None:
            notif = self.codec.pack_notif(LeaseReply(lease=lease.lease, reply=answer))
            try:
                self.transport.notify(peer.agent, notif)
                self.counters.inc("notif_replies")
                return
            except TransportError as exc:
                self.counters.inc("notif_reply_failures")
                self._notif_log.warning(
                    "answering %s by NIXL notification failed (%s): sent over ZMQ instead; "
                    "set pd_reply_by_notif: false on senders this receiver cannot reach "
                    "over NIXL",
                    peer.agent,
                    exc,
                )
        self._send(lease.identity, answer)

    def _handle(
        self, identity: bytes, msg: Message, payload: list[bytes]
    ) -> tuple[Message | None, list[bytes]]:
        if isinstance(msg, Hello):
            return self._on_hello(identity, msg, payload)
        if isinstance(msg, Offer):
            return self._on_offer(identity, msg), []
        if isinstance(msg, Push):
            return self._on_push(identity, msg), []
        if isinstance(msg, Done):
            return self._on_done(identity, msg), []
        if isinstance(msg, Cancel):
            with self._lock:
                lease = self._leases.get(msg.lease)
                if lease is not None and lease.identity == identity:
                    self._drop_lease(lease, f"cancelled by sender: {msg.reason}")
                grant = self._grants.get(msg.lease)
                if grant is not None and grant.identity == identity:
                    self._drop_grant(grant)
            return None, []
        req_id = getattr(msg, "req_id", None)
        return Error(
            req_id=req_id,
            code=ErrorCode.BAD_REQUEST,
            message=f"{type(msg).__name__} is not a request a receiver accepts",
        ), []

    def _on_hello(
        self, identity: bytes, msg: Hello, payload: list[bytes]
    ) -> tuple[Message, list[bytes]]:
        problems = self.compat.diff(msg.compat)
        if problems:
            self.counters.inc("incompatible")
            text = "incompatible KV layout: " + "; ".join(problems)
            log.error("refused sender %s: %s", msg.agent, text)
            return Error(code=ErrorCode.INCOMPATIBLE, message=text), []
        try:  # a sender at another TP size is fine when its ranks split the heads
            check_tp(self.layout.model_kv_heads, msg.compat.tp_size, "sender tp_size")
        except TPMappingError as exc:
            self.counters.inc("incompatible")
            log.error("refused sender %s: %s", msg.agent, exc)
            return Error(code=ErrorCode.INCOMPATIBLE, message=str(exc)), []
        if len(payload) != 1:
            return Error(code=ErrorCode.MALFORMED, message="Hello needs one metadata frame"), []
        try:
            agent = self.transport.add_peer(payload[0])
        except Exception as exc:
            return Error(code=ErrorCode.TRANSFER, message=f"bad transport metadata: {exc}"), []
        with self._lock:
            # a sender that reconnects (new socket identity) replaces its old entry
            for old in [i for i, p in self._peers.items() if p.agent == agent and i != identity]:
                self._drop_peer_grant(self._peers.pop(old))
            self._drop_peer_grant(self._peers.get(identity))
            # a new sender hears of the recent keys too (first reply): it can skip them
            peer = self._peers[identity] = _PeerInfo(
                agent=agent, hello=msg, want_grant=msg.want_grant
            )
            grant = self._issue_grant(identity, peer, msg.want_grant)
        ack = HelloAck(
            agent=self.transport.name,
            num_slots=self.buffer.num_slots,
            slot_bytes=self.buffer.slot_bytes,
            slot_descs=self.buffer.descs,
            mem_kind="VRAM" if self.buffer.kind is MemKind.VRAM else "DRAM",
            grant=grant,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            rank_ports=self._rank_ports(),
        )
        return ack, [self.transport.metadata()]

    def _rank_ports(self) -> list[int]:
        """Every TP rank's control port as configured ([] when ports are chosen free)."""
        try:
            ports = [self.cfg.port_for_rank("pd_peer_init_port", r) for r in range(self.tp_size)]
        except ValueError:
            return []
        return ports if all(ports) and ports[self.tp_rank] == self.port else []

    # ------------------------------------------------------------------ credits
    def _issue_grant(
        self, identity: bytes, peer: _PeerInfo, want: int, reuse: Sequence[int] = ()
    ) -> Grant | None:
        """Lend ``peer`` up to ``want`` slots for its next request: ``reuse`` (slots of
        its last grant it did not use) first, then free slots, then - only when a tier
        ``store`` also holds every ready chunk, so dedupe loses nothing - slots of the
        least recently used unpinned ready chunks. Grants together take at most half
        the buffer, shared evenly by the connected senders. Lock held."""
        half = self.buffer.num_slots // 2
        cap = max(1, half // max(1, len(self._peers)))
        granted = sum(len(g.slots) for g in self._grants.values())
        n = min(want, cap, max(0, half - granted))  # ``reuse`` is no longer in _grants
        slots = list(reuse[:n])
        if len(reuse) > n:
            self.buffer.free(list(reuse[n:]))
        if n > len(slots):
            slots += self._take_slots(n - len(slots), stored_only=True, partial=True) or []
        if not slots:
            return None
        now = time.monotonic()
        lease = _Lease(
            lease=self._next_lease,
            req_id="",
            identity=identity,
            keys=[],
            nbytes=[],
            checksums=[],
            have=[],
            want=[],
            slots=slots,
            granted_at=now,
            deadline=now + self.cfg.pd_lease_ttl_s,
        )
        self._next_lease += 1
        self._grants[lease.lease] = lease
        peer.grant = lease.lease
        self.counters.inc("grants")
        return Grant(lease=lease.lease, slots=slots, ttl_s=self.cfg.pd_lease_ttl_s)

    def _current_grant(self, identity: bytes, peer: _PeerInfo) -> Grant | None:
        """The grant to state in a reply: the sender's one replaces its grant with it
        (None: it has none). One past half its life is renewed. Lock held."""
        now = time.monotonic()
        lease = self._grants.get(peer.grant) if peer.grant is not None else None
        if lease is not None and lease.deadline - now >= self.cfg.pd_lease_ttl_s / 2:
            return Grant(lease=lease.lease, slots=lease.slots, ttl_s=lease.deadline - now)
        reuse: list[int] = []
        if lease is not None:  # renewed under a new lease id with the same slots
            self._grants.pop(lease.lease, None)
            reuse = lease.slots
        elif peer.want_grant <= 0:
            return None
        return self._issue_grant(identity, peer, max(peer.want_grant, len(reuse)), reuse)

    def _drop_grant(self, grant: _Lease) -> None:
        """Take a grant back and free its slots (lock held)."""
        self._grants.pop(grant.lease, None)
        self.buffer.free(grant.slots)
        peer = self._peers.get(grant.identity)
        if peer is not None and peer.grant == grant.lease:
            peer.grant = None

    def _drop_peer_grant(self, peer: _PeerInfo | None) -> None:
        if peer is not None and peer.grant is not None:
            grant = self._grants.get(peer.grant)
            if grant is not None:
                self._drop_grant(grant)
            peer.grant = None

    def _recent_for(self, peer: _PeerInfo) -> list[bytes]:
        """Keys made ready since ``peer`` was last told (newest last, capped). Lock held.
        Walks back from the newest only as far as needed: a commit costs what it adds,
        not the length of ``_recent``."""
        out: list[bytes] = []
        for seq, key in reversed(self._recent):
            if seq <= peer.recent_seen or len(out) == _RECENT_PER_REPLY:
                break
            out.append(key)
        peer.recent_seen = self._recent_seq
        out.reverse()
        return out

    def _on_push(self, identity: bytes, msg: Push) -> Message | None:
        def err(code: ErrorCode, text: str) -> Error:
            return Error(req_id=msg.req_id, code=code, message=text)

        with self._lock:
            peer = self._peers.get(identity)
            if peer is None:
                return err(
                    ErrorCode.UNKNOWN_PEER, "no Hello from this sender (receiver restarted?)"
                )
            lease = self._grants.get(msg.lease)
            if lease is None or lease.identity != identity:
                return err(
                    ErrorCode.UNKNOWN_LEASE,
                    f"grant {msg.lease} unknown or expired (TTL {self.cfg.pd_lease_ttl_s}s)",
                )
            problem = self._check_chunks(msg.keys, msg.nbytes, msg.checksums, len(lease.slots))
            if problem is None and any(len(k) != 16 for k in msg.skipped):
                problem = "skipped chunk keys must be 16 bytes"
            if problem is not None:
                self._drop_grant(lease)
                return err(ErrorCode.BAD_REQUEST, problem)
            del self._grants[lease.lease]
            peer.grant = None
            peer.want_grant = msg.want_grant
            k = len(msg.keys)
            leftover = lease.slots[k:]
            now = time.monotonic()
            lease.req_id = msg.req_id
            lease.keys, lease.nbytes = list(msg.keys), list(msg.nbytes)
            lease.checksums = list(msg.checksums)
            lease.want, lease.slots = list(range(k)), lease.slots[:k]
            lease.done = Done(
                req_id=msg.req_id, lease=lease.lease, reply_by_notif=msg.reply_by_notif
            )
            lease.done_at = now
            lease.granted_at, lease.deadline = now, now + self.cfg.pd_lease_ttl_s
            lease.missing = [key for key in msg.skipped if not self._held(key)]
            self._issue_grant(identity, peer, msg.want_grant, leftover)  # told in Committed
            self._leases[lease.lease] = lease
            peer.leases.add(lease.lease)
            self.counters.inc("requests")
            self.counters.inc("pushes")
            self.counters.inc("dedupe_hits", len(msg.skipped) - len(lease.missing))
            early, lease.early = lease.early, []
        for first, count in early:
            self._land(lease, first, count)
        if len(lease.landed) == len(lease.want):
            with self._lock:
                committed = self._commit(lease)
            self._answer(lease, committed)
        return None  # else committed when the last data notification arrives

    def _held(self, key: bytes) -> bool:
        return key in self._ready or (self.store is not None and key in self.store)

    def _on_offer(self, identity: bytes, msg: Offer) -> Message:
        bad = self._check_offer(identity, msg)
        if bad is not None:
            return bad
        self.counters.inc("requests")
        with self._lock:
            # a sender that offers does not write into its grant for this request (it
            # holds its connection's lock until our reply, which states a new grant):
            # its slots are better used here
            self._drop_peer_grant(self._peers.get(identity))
            have = [i for i, k in enumerate(msg.keys) if self._held(k)]
            want = [i for i, k in enumerate(msg.keys) if not self._held(k)]
            for i in have:
                if msg.keys[i] in self._ready:
                    self._ready.move_to_end(msg.keys[i])
            slots = self._take_slots(len(want))
            if slots is None:
                self.counters.inc("busy")
                return Busy(req_id=msg.req_id, retry_after_s=self.cfg.pd_busy_retry_after_s)
            now = time.monotonic()
            lease = _Lease(
                lease=self._next_lease,
                req_id=msg.req_id,
                identity=identity,
                keys=list(msg.keys),
                nbytes=list(msg.nbytes),
                checksums=list(msg.checksums),
                have=have,
                want=want,
                slots=slots,
                granted_at=now,
                deadline=now + self.cfg.pd_lease_ttl_s,
            )
            self._next_lease += 1
            if want:
                self._leases[lease.lease] = lease
                self._peers[identity].leases.add(lease.lease)
            self.counters.inc("dedupe_hits", len(have))
        return Accept(
            req_id=msg.req_id,
            have=have,
            want=want,
            slots=slots,
            lease=lease.lease,
            lease_ttl_s=self.cfg.pd_lease_ttl_s,
        )

    def _check_offer(self, identity: bytes, msg: Offer) -> Error | None:
        def err(code: ErrorCode, text: str) -> Error:
            return Error(req_id=msg.req_id, code=code, message=text)

        if identity not in self._peers:
            return err(ErrorCode.UNKNOWN_PEER, "no Hello from this sender (receiver restarted?)")
        problem = self._check_chunks(msg.keys, msg.nbytes, msg.checksums, self.buffer.num_slots)
        return None if problem is None else err(ErrorCode.BAD_REQUEST, problem)

    def _check_chunks(
        self, keys: list[bytes], nbytes: list[int], checksums: list[int], room: int
    ) -> str | None:
        """What is wrong with a chunk list of an Offer or Push (``room`` slots), if anything."""
        if not len(keys) == len(nbytes) == len(checksums):
            return "keys, nbytes and checksums differ in length"
        if len(keys) > room:
            return (
                f"{len(keys)} chunks exceed the receive buffer ({room} slots available of "
                f"{self.buffer.num_slots}); send in batches"
            )
        if any(len(k) != 16 for k in keys):
            return "chunk keys must be 16 bytes"
        if any(not 0 < n <= self.buffer.slot_bytes for n in nbytes):
            return f"chunk sizes must be in 1..{self.buffer.slot_bytes} bytes"
        return None

    def _take_slots(
        self, n: int, stored_only: bool = False, partial: bool = False
    ) -> list[int] | None:
        """Free slots for ``n`` chunks, evicting unpinned ready chunks (LRU) if needed
        (``stored_only``: only chunks the tier store holds too). Called with the lock
        held. Not enough room: None, or with ``partial`` as many slots as there are."""
        free = self.buffer.free_count
        if free < n:
            evictable = [
                k
                for k, r in self._ready.items()
                if r.pins == 0 and (not stored_only or (self.store is not None and k in self.store))
            ]
            if free + len(evictable) < n:
                if not partial:
                    return None
                n = free + len(evictable)
            for key in evictable[: n - free]:
                self.buffer.free([self._ready.pop(key).slot])
        return self.buffer.alloc(n)

    def _on_done(self, identity: bytes, msg: Done) -> Message | None:
        with self._lock:
            lease = self._leases.get(msg.lease)
            if lease is None or lease.identity != identity or lease.req_id != msg.req_id:
                return Error(
                    req_id=msg.req_id,
                    code=ErrorCode.UNKNOWN_LEASE,
                    message=f"lease {msg.lease} unknown or expired "
                    f"(TTL {self.cfg.pd_lease_ttl_s}s)",
                )
            lease.done, lease.done_at = msg, time.monotonic()
            if len(lease.landed) != len(lease.want):
                return None  # committed when the last data notification arrives
            committed = self._commit(lease)
        self._answer(lease, committed)
        return None

    @staticmethod
    def _land(lease: _Lease, first: int, count: int) -> None:
        """Mark ``want[first:first+count]`` landed. No checksum pass here: each chunk's
        digest is checked by the first pass that reads it (see the module docstring)."""
        lease.landed.update(range(first, min(first + count, len(lease.want))))

    def _commit(self, lease: _Lease) -> Committed:
        """Publish a fully landed lease's chunks, each with the digest its first read
        checks (so ``Committed.bad`` is empty: a chunk that fails is dropped then, see
        :meth:`settle`). Called with the lock held."""
        stored = list(lease.have)
        moved = 0
        verify = self.cfg.pd_verify_checksums
        for i, slot in zip(lease.want, lease.slots, strict=True):
            key, nbytes = lease.keys[i], lease.nbytes[i]
            stored.append(i)
            if key in self._ready:  # a concurrent lease won: ours is a duplicate
                self.buffer.free([slot])
                continue
            expected = lease.checksums[i] if verify else NO_CHECKSUM
            self._ready[key] = _Ready(slot=slot, nbytes=nbytes, checksum=expected)
            self._recent_seq += 1
            self._recent.append((self._recent_seq, key))
            if self.store is not None:
                self._to_store.append(key)  # after the reply: off the sender's wait
            moved += nbytes
        self.counters.inc("chunks", len(lease.want))
        self.counters.inc("bytes", moved)
        self._forget_lease(lease)
        self._lock.notify_all()
        grant, recent = None, []
        peer = self._peers.get(lease.identity)
        if peer is not None:
            grant = self._current_grant(lease.identity, peer)
            recent = self._recent_for(peer)
        return Committed(
            req_id=lease.req_id,
            stored=sorted(stored),
            bad=[],
            missing=lease.missing,
            grant=grant,
            recent=recent,
        )

    def _store_committed(self) -> None:
        """Hand chunks committed since the last call to the store thread (loop thread,
        right after their ``Committed`` went out). Each is pinned until it is copied,
        so it cannot be evicted; until then the buffer still holds it."""
        if not self._to_store or self.store is None:
            return
        keys, self._to_store = self._to_store, []
        with self._lock:
            for key in keys:
                entry = self._ready.get(key)
                if entry is not None:
                    entry.pins += 1
                    self._store_queue.put((key, entry))
        if self._store_thread is None:
            self._store_thread = threading.Thread(
                target=self._store_loop, name="lmcache-pd-rx-store", daemon=True
            )
            self._store_thread.start()

    def _store_loop(self) -> None:
        """Copies committed chunks into the tier store, off the loop thread (blocks on
        its queue: no spinning); a chunk not verified yet is hashed by that copy (the
        store's checked put: the CPU tier hashes each word as it copies it into its
        slot) and enters the store only when it matches, else it is settled as failed
        (dropped from the buffer; nothing of it was stored). ``None`` stops it."""
        assert self.store is not None
        while (item := self._store_queue.get()) is not None:
            key, entry = item
            try:
                with self._lock:
                    live, expected = self._ready.get(key) is entry, entry.checksum
                if live:
                    data = self.buffer.to_host(entry.slot, entry.nbytes)  # VRAM: a copy
                    try:
                        self.store.put(key, data, checksum=expected)
                        ok = True
                    except checksum.ChecksumMismatch:
                        ok = False
                    if expected != NO_CHECKSUM:
                        self.settle(key, expected, ok, "the copy into the tier store")
            except Exception:  # a failing tier must not stop the receiver
                log.exception("copying a received chunk into the tier store failed")
            finally:
                with self._lock:
                    self._unpin(key, entry)

    def _forget_lease(self, lease: _Lease) -> None:
        self._leases.pop(lease.lease, None)
        peer = self._peers.get(lease.identity)
        if peer is not None:
            peer.leases.discard(lease.lease)

    def _drop_lease(self, lease: _Lease, reason: str) -> None:
        """Free a lease's slots (lock held)."""
        self._forget_lease(lease)
        self.buffer.free(lease.slots)
        log.warning("lease %d of request %s dropped: %s", lease.lease, lease.req_id, reason)

    # ------------------------------------------------------------------ progress
    def _tick(self) -> None:
        """After every wake-up of the loop thread (a message, a poll gap's end): poll
        NIXL notifications while leases are outstanding, commit leases whose data all
        landed, expire leases and grants."""
        if not self._leases:
            self._expire_grants()
            self._delay = _POLL_MIN_S
            return
        answers, landed = self._take_notifications()
        for lease, answer in answers:  # Committed first: a sender waits on it
            self._answer(lease, answer)
        self._expire_grants()
        for lease, error in self._expire_leases():
            self._answer(lease, error)
        self._store_committed()
        self._delay = self._next_gap(landed)

    def _next_timeout_s(self) -> float | None:
        """How long the loop thread may wait for a message: the poll gap while leases
        are outstanding, else until the first grant expires (None: no timer)."""
        if self._leases:
            return self._delay
        with self._lock:
            deadlines = [g.deadline for g in self._grants.values()]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _take_notifications(self) -> tuple[list[tuple[_Lease, Committed]], bool]:
        """Mark the chunks named by new notifications landed; commit leases that are
        done and fully landed. Returns their answers and whether anything arrived."""
        replies: list[tuple[_Lease, Committed]] = []
        notifs = self.transport.notifications()
        for _peer, text in notifs:
            notif = LeaseNotif.decode(text)
            if notif is None:
                continue
            lease = self._leases.get(notif.lease)
            if lease is None:
                grant = self._grants.get(notif.lease)
                if grant is not None:  # landed before its Push: kept for it
                    grant.early.append((notif.first, notif.count))
                continue
            self._land(lease, notif.first, notif.count)
            if lease.done is not None and len(lease.landed) == len(lease.want):
                with self._lock:
                    replies.append((lease, self._commit(lease)))
        return replies, bool(notifs)

    def _expire_leases(self) -> list[tuple[_Lease, Error]]:
        """Drop leases past their TTL; a sender that already said Done gets an Error."""
        now = time.monotonic()
        replies: list[tuple[_Lease, Error]] = []
        with self._lock:
            for lease in [ls for ls in self._leases.values() if ls.deadline <= now]:
                self.counters.inc("lease_expiries")
                self._drop_lease(lease, f"no Done within {self.cfg.pd_lease_ttl_s}s (sender dead?)")
                if lease.done is not None:
                    error = Error(
                        req_id=lease.req_id,
                        code=ErrorCode.TIMEOUT,
                        message="data never arrived before the lease expired",
                    )
                    replies.append((lease, error))
        return replies

    def _next_gap(self, landed: bool) -> float:
        """The next poll gap: the shortest while something landed or a sender said its
        WRITEs are posted (Push, Done: the data is due any moment, for at most
        ``_FAST_WINDOW_S``), then growing up to ``_POLL_FAST_MAX_S`` while a lease is
        young or due, up to ``_POLL_SLOW_MAX_S`` for leases that wait on a slow sender."""
        now = time.monotonic()
        due = young = False
        for ls in self._leases.values():
            if ls.done is not None:
                due = due or now - ls.done_at < _FAST_WINDOW_S
                young = True
            else:
                young = young or now - ls.granted_at < _FAST_WINDOW_S
        if landed or due:
            return _POLL_MIN_S
        return min(self._delay * 1.5, _POLL_FAST_MAX_S if young else _POLL_SLOW_MAX_S)

    def _expire_grants(self) -> None:
        now = time.monotonic()
        with self._lock:
            for grant in [g for g in self._grants.values() if g.deadline <= now]:
                self.counters.inc("grant_expiries")
                self._drop_grant(grant)

    # ------------------------------------------------------------------ engine side
    def lookup(self, keys: Sequence[bytes]) -> int:
        """Length of the longest prefix of ``keys`` held (buffer or store)."""
        with self._lock:
            n = 0
            for key in keys:
                if not self._held(key):
                    break
                n += 1
            return n

    def wait_for(self, keys: Sequence[bytes], timeout_s: float) -> int:
        """Block until every key is held or ``timeout_s`` passes; returns the prefix held."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                n = 0
                for key in keys:
                    if not self._held(key):
                        break
                    n += 1
                left = deadline - time.monotonic()
                if n == len(keys) or left <= 0:
                    return n
                self._lock.wait(left)

    def acquire(self, keys: Sequence[bytes]) -> list[ChunkData | None]:
        """Pin and return the verified bytes of each key (None where not held, or where
        the chunk failed its checksum: it is then dropped). Buffer-resident chunks are
        returned without a copy (a memoryview, or a uint8 CUDA tensor for a VRAM buffer)
        and stay pinned until :meth:`release`; the rest are read from the store (outside
        the lock: a disk read never blocks the receiver). A chunk not verified yet is
        hashed here, a pass of its own: the engine uses :meth:`acquire_checked` and
        checks the digest in its scatter instead."""
        out, expected = self.acquire_checked(keys)
        for i, (data, digest) in enumerate(zip(out, expected, strict=True)):
            if data is not None and digest != NO_CHECKSUM:
                ok = checksum.matches(data, digest)
                self.settle(keys[i], digest, ok, "a read")
                if not ok:
                    out[i] = None
        return out

    def acquire_checked(self, keys: Sequence[bytes]) -> tuple[list[ChunkData | None], list[int]]:
        """:meth:`acquire` without checking: each chunk's bytes (pinned until
        :meth:`release`) and the digest they must hash to (``NO_CHECKSUM``: verified
        already, not hashed, or read from a tier, which holds verified chunks only).
        The caller checks the digest in the pass it makes over the bytes anyway and
        reports the outcome with :meth:`settle` before trusting what it wrote."""
        out: list[ChunkData | None] = []
        expected: list[int] = []
        from_store: list[int] = []
        with self._lock:
            for key in keys:
                entry = self._ready.get(key)
                if entry is not None and key not in self._store_pins:
                    entry.pins += 1
                    self._ready.move_to_end(key)
                    out.append(self.buffer.chunk(entry.slot, entry.nbytes))
                    expected.append(entry.checksum)
                else:
                    from_store.append(len(out))
                    out.append(None)
                    expected.append(NO_CHECKSUM)
            if self.store is not None:  # recorded before the read: see _take_from_store
                for i in from_store:
                    self._store_pins[keys[i]] = self._store_pins.get(keys[i], 0) + 1
        if self.store is not None and from_store:
            self._take_from_store(keys, from_store, out)
        return out, expected

    def settle(self, key: bytes, expected: int, ok: bool, where: str = "the engine's load") -> None:
        """The outcome of checking ``key``'s bytes against ``expected`` (a digest
        :meth:`acquire_checked` handed out). A match marks the chunk verified (later
        reads skip the check); a mismatch drops it from the buffer and the store,
        counts it and logs (rate-limited). Whichever reader reports first decides."""
        if expected == NO_CHECKSUM:
            return
        with self._lock:
            entry = self._ready.get(key)
            if entry is None or entry.checksum != expected:
                return  # rejected or verified by another reader already
            if ok:
                entry.checksum = NO_CHECKSUM
                return
            self._reject(key, entry, where)
        if self.store is not None and key in self.store:  # a copy made in a race: gone too
            self.store.evict(key)

    def _reject(self, key: bytes, entry: _Ready, where: str) -> None:
        """Drop a ready chunk that failed its checksum (lock held); its slot is freed
        now, or at the last :meth:`release` of a reader that pins it."""
        entry.rejected = True
        if self._ready.get(key) is entry:
            del self._ready[key]
        if entry.pins:
            self._doomed.setdefault(key, []).append(entry)
        else:
            self.buffer.free([entry.slot])
        self.counters.inc("checksum_failures")
        self._failures_unlogged += 1
        now = time.monotonic()
        if now - self._failure_logged_at >= _FAILURE_LOG_EVERY_S:
            log.error(
                "%d received chunk(s) failed their %s checksum (latest %s, found by %s): "
                "dropped, never loaded or stored; the engine recomputes their tokens",
                self._failures_unlogged,
                checksum.ALGORITHM,
                key.hex(),
                where,
            )
            self._failures_unlogged, self._failure_logged_at = 0, now

    def _unpin(self, key: bytes, entry: _Ready) -> None:
        """Undo one pin of ``entry`` (lock held); a rejected chunk's slot is freed at
        its last."""
        entry.pins -= 1
        if entry.rejected and entry.pins == 0:
            self.buffer.free([entry.slot])
            doomed = [e for e in self._doomed.get(key, []) if e is not entry]
            if doomed:
                self._doomed[key] = doomed
            else:
                self._doomed.pop(key, None)

    def _take_from_store(
        self, keys: Sequence[bytes], from_store: list[int], out: list[ChunkData | None]
    ) -> None:
        """Pin ``keys[i]`` for each ``i`` in ``from_store`` in the store with one
        ``acquire_many`` (a remote tier's chunks in one round trip), outside the lock: a
        disk or network read never blocks the receiver.

        Each pin is recorded where it was taken (``_store_pins`` counts the store's per
        key). While a key has store pins, further acquires pin the store too, even once
        the key is in the buffer; a key pinned in the buffer stays there, so it gains no
        store pins meanwhile. A key's pins are thus all of one kind, and :meth:`release`
        undoes the right one."""
        assert self.store is not None
        try:
            got = self.store.acquire_many([keys[i] for i in from_store])
        except BaseException:
            self._drop_store_pins([keys[i] for i in from_store])
            raise
        misses = []
        for i, view in zip(from_store, got, strict=True):
            if view is None:
                misses.append(keys[i])
            else:
                out[i] = view
        self._drop_store_pins(misses)

    def _drop_store_pins(self, keys: Sequence[bytes]) -> None:
        """Forget one store-pin record of each of ``keys``."""
        with self._lock:
            for key in keys:
                n = self._store_pins.get(key, 0) - 1
                if n > 0:
                    self._store_pins[key] = n
                else:
                    self._store_pins.pop(key, None)

    def release(self, keys: Sequence[bytes]) -> None:
        """Unpin keys returned by :meth:`acquire` / :meth:`acquire_checked` (in the
        buffer or in the store)."""
        in_store: list[bytes] = []
        with self._lock:
            for key in keys:
                pins = self._store_pins.get(key, 0)
                if pins:
                    in_store.append(key)
                    if pins > 1:
                        self._store_pins[key] = pins - 1
                    else:
                        del self._store_pins[key]
                    continue
                doomed = self._doomed.get(key)
                entry = doomed[0] if doomed else self._ready.get(key)
                if entry is not None and entry.pins > 0:
                    self._unpin(key, entry)
        if in_store:
            assert self.store is not None
            for key in in_store:
                self.store.release(key)

    def read(self, key: bytes) -> bytes | None:
        """A verified copy of one chunk's bytes, or None (not held, or it failed its
        checksum and was dropped)."""
        (view,), (expected,) = self.acquire_checked([key])
        try:
            if view is None:
                return None
            data = view.cpu().numpy().tobytes() if isinstance(view, torch.Tensor) else bytes(view)
            if expected != NO_CHECKSUM:
                ok = checksum.matches(data, expected)
                self.settle(key, expected, ok, "a read")
                if not ok:
                    return None
            return data
        finally:
            self.release([key])

    def drop(self, keys: Sequence[bytes]) -> None:
        """Forget ready chunks (unpinned ones) and free their slots."""
        with self._lock:
            for key in keys:
                entry = self._ready.get(key)
                if entry is not None and entry.pins == 0:
                    del self._ready[key]
                    self.buffer.free([entry.slot])

    def ready_keys(self) -> list[bytes]:
        """Keys of the chunks held in the receive buffer (KV events)."""
        with self._lock:
            return list(self._ready)

    def slot_usage(self) -> dict[str, int]:
        """Slots free, leased and holding ready chunks (for leak checks)."""
        with self._lock:
            leased = sum(len(ls.slots) for ls in self._leases.values())
            return {
                "free": self.buffer.free_count,
                "leased": leased,
                "granted": sum(len(g.slots) for g in self._grants.values()),
                "ready": len(self._ready),
                # chunks that failed their checksum, freed at their reader's release
                "rejected": sum(len(d) for d in self._doomed.values()),
                "total": self.buffer.num_slots,
            }

    def stats(self) -> dict[str, int]:
        with self._lock:
            peers = len(self._peers)
        return {
            "peers": peers,
            **self.counters.snapshot(),
            **{f"slots_{k}": v for k, v in self.slot_usage().items()},
        }
