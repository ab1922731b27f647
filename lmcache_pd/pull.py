"""The standard vLLM PD contract: the prefiller holds chunks until a decoder fetches them.

Orchestrators other than our proxy (vLLM's disaggregated proxy example, Ray Serve LLM,
llm-d, Dynamo) never name the decoder before the prefill: the prefill response's
``kv_transfer_params`` (:class:`~lmcache_pd.protocol.DecodeParams`) travel to whichever
decoder they pick. So the prefiller keeps the request's gathered chunks (in its send
buffer) under a one-shot **hold** id, and the decoder, handed the params, asks for them:

- :class:`HoldServer` (prefiller worker, one per TP rank) owns the holds and a ROUTER
  pull endpoint. A signed ``Fetch{hold, receiver}`` makes it push the held chunks to that
  receiver with the ordinary handoff (Offer/Accept/WRITE/Done: dedupe, checksums and
  leases as in push-ahead; one protocol, one data path), then answer ``HandoffDone``.
  Under mixed TP several decoder ranks fetch one hold, each the head pieces it needs
  (:mod:`lmcache_pd.tp`); the hold is one-shot per decoder rank and its slots are freed
  once every rank that needs this one has fetched (or at expiry). A hold nobody
  fetches within ``pd_lease_ttl_s`` is dropped and its slots freed; a fetch for a hold
  that was never issued, expired or was already fetched is refused with
  ``Error(UNKNOWN_LEASE)`` and counted. The thread blocks in ``poll`` until the
  next message or hold deadline: no spinning.
- :class:`Fetcher` (decoder worker) sends the ``Fetch`` and waits for the answer,
  bounded by ``pd_connect_timeout_s + pd_transfer_timeout_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zmq

from lmcache_pd.config import Config
from lmcache_pd.control import (
    BlockingRouter,
    Codec,
    ControlTimeout,
    DealerClient,
    RouterLoop,
    tcp_endpoint,
)
from lmcache_pd.metrics import Counters
from lmcache_pd.protocol import Error, ErrorCode, Fetch, HandoffDone, Message, Msg
from lmcache_pd.sender import OutChunk
from lmcache_pd.tp import TPMappingError, sender_pieces

log = logging.getLogger(__name__)

# (receiver endpoint, hold id, chunks, prompt tokens) -> outcome; the slots stay the hold's
PushFn = Callable[[str, str, list[OutChunk], int], HandoffDone]
FreeFn = Callable[[list[int]], None]

MAX_HOLDS = 4096  # more holds than this: the oldest is dropped (its decoder recomputes)
MAX_FETCH_PEERS = 64  # decoder-side connections kept to prefiller pull endpoints


class FetchError(RuntimeError):
    """A fetch failed; ``code`` says why (``UNKNOWN_LEASE``, ``TIMEOUT``, ...)."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Hold:
    hold_id: str
    chunks: list[OutChunk]
    total_tokens: int
    deadline: float
    served: set[int] = field(default_factory=set)  # decoder ranks that fetched it
    pushing: int = 0  # pushes of it in flight
    done: bool = False  # no longer fetchable: its slots go once ``pushing`` is 0


class HoldServer:
    """Prefiller side: holds staged chunks and serves ``Fetch`` on a pull endpoint."""

    def __init__(
        self,
        cfg: Config,
        codec: Codec,
        push: PushFn,
        free: FreeFn,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        total_heads: int = 1,
        port: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.tp_rank, self.tp_size, self.total_heads = tp_rank, tp_size, total_heads
        self.counters = Counters("hold")
        self._push = push
        self._free = free
        self._ctx = zmq.Context()
        bind_port = cfg.port_for_rank("pd_pull_port", tp_rank) if port is None else port
        self._router = BlockingRouter(self._ctx, codec, cfg.pd_bind_host, bind_port, self.counters)
        self.host, self.port = cfg.advertised_host(), self._router.port
        self.endpoint = tcp_endpoint(self.host, self.port)
        self._holds: OrderedDict[str, _Hold] = OrderedDict()  # insertion = deadline order
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="lmcache-pd-fetch-push")
        # the server thread: Fetches in, HandoffDone from the push threads out, expiries
        self._loop = RouterLoop(
            self._ctx,
            self._router,
            self._on_message,
            name="hold",
            next_timeout_s=self._next_deadline_s,
            on_tick=self._expire,
        ).start()
        log.info("pull endpoint for held KV on %s (rank %d)", self.endpoint, tp_rank)

    # ------------------------------------------------------------------ engine side
    def hold(self, hold_id: str, chunks: list[OutChunk], total_tokens: int) -> None:
        """Keep ``chunks`` (their send slots now belong to the hold) for one fetch."""
        dropped: list[_Hold] = []
        with self._lock:
            self._holds[hold_id] = _Hold(
                hold_id, chunks, total_tokens, time.monotonic() + self.cfg.pd_lease_ttl_s
            )
            while len(self._holds) > MAX_HOLDS:
                dropped.append(self._holds.popitem(last=False)[1])
        self.counters.inc("holds")
        for old in dropped:
            self._drop(old, f"more than {MAX_HOLDS} holds outstanding")
        self._loop.wake()  # the server thread recomputes its next deadline

    def outstanding(self) -> int:
        """Holds not yet fetched or expired (their slots are in use)."""
        with self._lock:
            return len(self._holds)

    def stats(self) -> dict[str, int]:
        return {"holds_outstanding": self.outstanding(), **self.counters.snapshot()}

    # ------------------------------------------------------------------ server thread
    def _next_deadline_s(self) -> float | None:
        with self._lock:
            if not self._holds:
                return None  # block until a message or a new hold
            first = next(iter(self._holds.values()))
        return max(1e-3, first.deadline - time.monotonic() + 1e-3)

    def _expire(self) -> None:
        now = time.monotonic()
        expired = []
        with self._lock:
            while self._holds:
                first = next(iter(self._holds.values()))
                if first.deadline > now:
                    break
                expired.append(self._holds.popitem(last=False)[1])
        for hold in expired:
            self.counters.inc("hold_expiries")
            self._drop(hold, f"not fetched within pd_lease_ttl_s={self.cfg.pd_lease_ttl_s}s")

    def _drop(self, hold: _Hold, why: str) -> None:
        """``hold`` (already out of the table) will not be fetched again: free its slots
        now, or when its last push in flight ends."""
        log.warning("held KV %s (%d chunk(s)) dropped: %s", hold.hold_id, len(hold.chunks), why)
        self._retire(hold)

    def _retire(self, hold: _Hold) -> None:
        with self._lock:
            hold.done = True
            free = hold.pushing == 0
        if free:
            self._free([c.slot for c in hold.chunks])

    def _refuse(self, identity: bytes, msg: Fetch, code: ErrorCode, text: str) -> None:
        self.counters.inc("fetch_refused")
        log.warning("refused a fetch of KV %s: %s", msg.req_id, text)
        self._router.send(identity, Error(req_id=msg.req_id, code=code, message=text))

    def _on_message(self, identity: bytes, msg: Message, _payload: list[bytes]) -> None:
        if not isinstance(msg, Fetch):
            self._router.send(
                identity,
                Error(
                    req_id=getattr(msg, "req_id", None),
                    code=ErrorCode.BAD_REQUEST,
                    message=f"{type(msg).__name__} is not a request a pull endpoint accepts",
                ),
            )
            return
        try:  # the decoder ranks this rank serves, at the decoder's TP size
            ranks = {
                p.dst
                for p in sender_pieces(self.total_heads, self.tp_size, msg.tp_size, self.tp_rank)
            }
        except TPMappingError as exc:
            self._refuse(identity, msg, ErrorCode.BAD_REQUEST, str(exc))
            return
        if msg.tp_rank not in ranks:
            self._refuse(
                identity,
                msg,
                ErrorCode.BAD_REQUEST,
                f"fetch for decoder TP rank {msg.tp_rank} of {msg.tp_size} reached prefiller "
                f"rank {self.tp_rank} of {self.tp_size}, which holds none of its KV heads",
            )
            return
        with self._lock:
            hold = self._holds.get(msg.req_id)
            if hold is not None and msg.tp_rank not in hold.served:
                hold.served.add(msg.tp_rank)
                hold.pushing += 1
                if hold.served >= ranks:  # every rank that needs it has asked: one-shot
                    del self._holds[msg.req_id]
                    hold.done = True
            else:
                hold = None
        if hold is None:
            self._refuse(
                identity,
                msg,
                ErrorCode.UNKNOWN_LEASE,
                f"no held KV {msg.req_id!r} for TP rank {msg.tp_rank}: never issued here, "
                f"already fetched, or expired (pd_lease_ttl_s={self.cfg.pd_lease_ttl_s}s)",
            )
            return
        self.counters.inc("fetches")
        self._pool.submit(self._push_then_reply, identity, msg, hold)

    def _push_then_reply(self, identity: bytes, msg: Fetch, hold: _Hold) -> None:
        try:
            done = self._push(msg.receiver, hold.hold_id, hold.chunks, hold.total_tokens)
        except Exception as exc:  # the push fn reports failures; this is a bug guard
            log.exception("push of held KV %s failed", hold.hold_id)
            done = HandoffDone(hold.hold_id, ok=False, error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            hold.pushing -= 1
            free = hold.done and hold.pushing == 0
        if free:
            self._free([c.slot for c in hold.chunks])
        self._loop.reply(identity, done)

    def close(self) -> None:
        """Stop serving and free every held slot."""
        stopped = self._loop.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            holds, self._holds = list(self._holds.values()), OrderedDict()
        for hold in holds:
            self._retire(hold)
        if stopped:
            self._ctx.term()


class Fetcher:
    """Decoder side: asks prefiller pull endpoints to push held KV to our receiver.
    Thread-safe; keeps one connection per endpoint (at most ``MAX_FETCH_PEERS``)."""

    def __init__(
        self, cfg: Config, codec: Codec, receiver: str, *, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        self.cfg = cfg
        self.codec = codec
        self.receiver = receiver
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.counters = Counters("fetch")
        self._ctx = zmq.Context()
        self._clients: OrderedDict[str, tuple[DealerClient, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    def _client(self, endpoint: str) -> tuple[DealerClient, threading.Lock]:
        with self._lock:
            entry = self._clients.get(endpoint)
            if entry is None:
                entry = (
                    DealerClient(self._ctx, self.codec, endpoint, self.counters),
                    threading.Lock(),
                )
                self._clients[endpoint] = entry
                while len(self._clients) > MAX_FETCH_PEERS:
                    _, (old, old_lock) = self._clients.popitem(last=False)
                    with old_lock:
                        old.close()
            self._clients.move_to_end(endpoint)
            return entry

    def _forget(self, endpoint: str) -> None:
        with self._lock:
            entry = self._clients.pop(endpoint, None)
        if entry is not None:
            entry[0].close()

    def fetch(self, endpoint: str, hold_id: str) -> HandoffDone:
        """Have ``endpoint`` push hold ``hold_id`` to our receiver; blocks until it
        did. Raises :class:`FetchError` (refused, unreachable, timed out)."""
        msg = Fetch(
            req_id=hold_id, receiver=self.receiver, tp_rank=self.tp_rank, tp_size=self.tp_size
        )
        timeout_s = self.cfg.pd_connect_timeout_s + self.cfg.pd_transfer_timeout_s
        return self._request(endpoint, msg, timeout_s, "prefiller")

    def _request(self, endpoint: str, msg: Msg, timeout_s: float, who: str) -> HandoffDone:
        """Send ``msg`` to ``endpoint`` and wait (at most ``timeout_s``, the connection's
        turn included) for the ``HandoffDone`` of the push it asks for. Raises
        :class:`FetchError` naming ``who`` and the cause; a timeout drops the connection
        (queued frames with it: the next request reconnects)."""
        client, lock = self._client(endpoint)
        self.counters.inc("requests")
        try:
            if not lock.acquire(timeout=timeout_s):
                raise ControlTimeout(f"connection to {endpoint} busy for {timeout_s:.1f}s")
            try:
                reply, _ = client.request(msg, (), timeout_s)
            finally:
                lock.release()
        except ControlTimeout as exc:
            self._forget(endpoint)
            self.counters.inc("timeouts")
            raise FetchError(f"{who} {endpoint} did not answer: {exc}", ErrorCode.TIMEOUT) from None
        except zmq.ZMQError as exc:
            self._forget(endpoint)
            self.counters.inc("failures")
            raise FetchError(f"fetch from {endpoint} failed: {exc}", ErrorCode.TRANSFER) from None
        if isinstance(reply, Error):
            self.counters.inc("failures")
            raise FetchError(f"{who} {endpoint} refused: {reply.message}", reply.code)
        if not isinstance(reply, HandoffDone):
            self.counters.inc("failures")
            raise FetchError(
                f"{who} {endpoint} answered a fetch with {type(reply).__name__}",
                ErrorCode.BAD_REQUEST,
            )
        if not reply.ok:
            self.counters.inc("failures")
            raise FetchError(f"{who} {endpoint} could not push: {reply.error}", ErrorCode.TRANSFER)
        return reply

    def close(self) -> None:
        with self._lock:
            entries, self._clients = list(self._clients.values()), OrderedDict()
        for client, _ in entries:
            client.close()
        self._ctx.term()
