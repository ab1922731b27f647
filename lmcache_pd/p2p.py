"""Peer-to-peer fetch between ``kv_both`` engines (LMCache's P2P sharing), over the handoff.

An engine B that misses a prefix in its own tiers fetches the chunks from a peer engine A
that holds them in its CPU (or disk) tier, over NIXL, instead of recomputing them:

- **Who holds what** lives in the remote tier's index (:mod:`lmcache_pd.tiers.remote`):
  every chunk that lands in an engine's CPU tier is advertised as
  ``...:p2p:<chunk key> = <its p2p endpoint>`` with a TTL (``p2p_holder_ttl_s``), batched
  by the remote tier's writer thread. B's prompt lookup asks "value held, else who holds
  it" per key in the one round trip it makes anyway
  (:meth:`~lmcache_pd.tiers.manager.TieredStore.lookup_holders`). A stale entry (A
  restarted, the chunk evicted) is just a miss: A sends the prefix it still holds.
- **The wire** is the handoff: B sends A's :class:`PeerServer` a signed
  ``FetchKeys{keys, receiver}``; A copies the longest prefix of those keys it holds from
  its tiers into its :class:`~lmcache_pd.sender.Sender`'s send slots (pinned while
  copied) and pushes them to B's :class:`~lmcache_pd.receiver.Receiver` with the ordinary
  flow (Hello once, credits or Offer/Accept, checksummed WRITE groups, leases, dedupe
  against B's tiers), then answers ``HandoffDone``. B loads them like pushed chunks.
- **Bounds.** B waits at most ``pd_connect_timeout_s + pd_transfer_timeout_s`` for the
  answer; a peer that does not answer is a miss (B recomputes) and is not asked again for
  ``PEER_DOWN_S``. A peer serves at most ``MAX_INFLIGHT`` fetches at a time (more are
  answered ``ok=False`` at once) and drops requests its asker stopped waiting for. Send
  slots are freed when the push ends, receive slots are leased: nothing leaks.

:class:`PeerSharing` builds the pieces for one worker rank; :class:`PeerSource` is the
worker's chunk source with p2p on (its ``lookup_with_peers`` answers the scheduler).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq

from lmcache_pd.config import Config
from lmcache_pd.control import BlockingRouter, Codec, RouterLoop, tcp_endpoint
from lmcache_pd.layout import KVLayout
from lmcache_pd.metrics import Counters
from lmcache_pd.protocol import Error, ErrorCode, FetchKeys, HandoffDone, Message
from lmcache_pd.pull import Fetcher, FetchError
from lmcache_pd.receiver import ChunkData, Receiver
from lmcache_pd.sender import HandoffError, OutChunk, Sender
from lmcache_pd.tiers.manager import TieredStore
from lmcache_pd.transports.nixl import NixlTransport

log = logging.getLogger(__name__)

MAX_FETCH_KEYS = 4096  # keys one FetchKeys may name
MAX_INFLIGHT = 8  # fetches a peer serves at once; more are refused (the asker recomputes)
PEER_DOWN_S = 30.0  # a peer that timed out is not asked again for this long
KEY_BYTES = 16


class PeerServer:
    """Engine A: serves ``FetchKeys`` from its tiered store through its sender.

    A ROUTER on ``p2p_host:p2p_init_ports[rank]`` (0 = a free port) served by a
    :class:`~lmcache_pd.control.RouterLoop` thread; pushes run on a small pool and
    their answers go back through it (no spinning)."""

    def __init__(
        self,
        cfg: Config,
        codec: Codec,
        store: TieredStore,
        sender: Sender,
        *,
        tp_rank: int = 0,
        port: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.sender = sender
        self.tp_rank = tp_rank
        self.counters = Counters("p2p_server")
        self._ctx = zmq.Context()
        bind_port = cfg.port_for_rank("p2p_init_ports", tp_rank) if port is None else port
        self._router = BlockingRouter(self._ctx, codec, cfg.p2p_host, bind_port, self.counters)
        self.port = self._router.port
        self.endpoint = tcp_endpoint(cfg.p2p_advertised_host(), self.port)
        self._inflight = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="lmcache-pd-p2p-push")
        self._loop = RouterLoop(self._ctx, self._router, self._on_message, name="p2p").start()
        log.info("p2p endpoint serving held KV on %s (rank %d)", self.endpoint, tp_rank)

    def stats(self) -> dict[str, int]:
        return self.counters.snapshot()

    # ------------------------------------------------------------------ server thread
    def _refuse(self, identity: bytes, req_id: str | None, why: str) -> None:
        self.counters.inc("refused")
        self._router.send(identity, Error(req_id=req_id, code=ErrorCode.BAD_REQUEST, message=why))

    def _on_message(self, identity: bytes, msg: Message, _payload: list[bytes]) -> None:
        if not isinstance(msg, FetchKeys):
            why = f"{type(msg).__name__} is not a request a p2p endpoint accepts"
            self._refuse(identity, getattr(msg, "req_id", None), why)
            return
        if msg.tp_rank != self.tp_rank:
            why = f"fetch for TP rank {msg.tp_rank} reached rank {self.tp_rank}"
            self._refuse(identity, msg.req_id, why)
            return
        if not 0 < len(msg.keys) <= MAX_FETCH_KEYS or any(len(k) != KEY_BYTES for k in msg.keys):
            why = f"FetchKeys needs 1..{MAX_FETCH_KEYS} keys of {KEY_BYTES} bytes"
            self._refuse(identity, msg.req_id, why)
            return
        with self._lock:
            busy = self._inflight >= MAX_INFLIGHT
            self._inflight += not busy
        if busy:
            self.counters.inc("busy")
            self._router.send(identity, HandoffDone(msg.req_id, ok=False, error="peer busy"))
            return
        self.counters.inc("requests")
        deadline = time.monotonic() + self.cfg.pd_connect_timeout_s + self.cfg.pd_transfer_timeout_s
        self._pool.submit(self._serve, identity, msg, deadline)

    # ------------------------------------------------------------------ pushes
    def _serve(self, identity: bytes, msg: FetchKeys, deadline: float) -> None:
        try:
            done = self._push_held(msg, deadline)
        except Exception as exc:  # a bug guard: the asker must get an answer
            log.exception("p2p: serving %s failed", msg.req_id)
            done = HandoffDone(msg.req_id, ok=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._inflight -= 1
        if done is not None:
            self._loop.reply(identity, done)

    def _push_held(self, msg: FetchKeys, deadline: float) -> HandoffDone | None:
        """Copy the longest held prefix of ``msg.keys`` into send slots and push it to
        ``msg.receiver``; None when the asker has stopped waiting."""
        if time.monotonic() >= deadline:
            self.counters.inc("expired")
            return None
        keys = msg.keys[: self.sender.buffer.num_slots]
        views = self.store.acquire_local(keys)
        held = keys[: len(views)]
        self.counters.inc("keys_missed", len(msg.keys) - len(held))
        if not held:
            return HandoffDone(msg.req_id, ok=True)
        slots: list[int] = []
        try:
            slots = self.sender.alloc(len(held), timeout_s=min(1.0, self.cfg.pd_connect_timeout_s))
            chunks = [
                OutChunk(key, slot, _copy_into(self.sender, slot, view))
                for key, slot, view in zip(held, slots, views, strict=True)
            ]
        except TimeoutError:
            self.counters.inc("failures")
            return HandoffDone(msg.req_id, ok=False, error="send buffer full")
        except BaseException:
            self.sender.free(slots)
            raise
        finally:
            for key in held:
                self.store.release(key)
        try:
            result = self.sender.send(msg.receiver, msg.req_id, chunks)
        except HandoffError as exc:
            self.counters.inc("failures")
            log.warning("p2p: push of %d chunk(s) to %s failed: %s", len(held), msg.receiver, exc)
            return HandoffDone(msg.req_id, ok=False, error=str(exc))
        finally:
            self.sender.free(slots)
        self.counters.inc("chunks_served", result.sent)
        self.counters.inc("chunks_deduped", result.dedup)
        return HandoffDone(msg.req_id, ok=True, chunks=result.sent, dedup=result.dedup)

    def close(self) -> None:
        stopped = self._loop.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if stopped:
            self._ctx.term()


def _copy_into(sender: Sender, slot: int, view: memoryview) -> int:
    """Copy a chunk held in a tier into send slot ``slot``; its length in bytes."""
    n = view.nbytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns on read-only buffers
        src = torch.frombuffer(view, dtype=torch.uint8)
    sender.buffer.slot_tensor(slot)[:n].copy_(src)
    return n


class PeerClient(Fetcher):
    """Engine B: asks peers' :class:`PeerServer` to push chunks to our receiver (one
    connection per peer, as :class:`~lmcache_pd.pull.Fetcher`). Peers that time out are
    remembered as down for ``PEER_DOWN_S``."""

    def __init__(self, cfg: Config, codec: Codec, receiver: str, *, tp_rank: int = 0) -> None:
        super().__init__(cfg, codec, receiver, tp_rank=tp_rank)
        self.counters = Counters("p2p_client")
        self._down: dict[str, float] = {}

    def is_down(self, endpoint: str) -> bool:
        with self._lock:
            until = self._down.get(endpoint)
            if until is not None and until <= time.monotonic():
                del self._down[endpoint]
                until = None
        return until is not None

    def fetch_keys(self, endpoint: str, keys: Sequence[bytes], timeout_s: float) -> HandoffDone:
        """Have the peer at ``endpoint`` push ``keys`` (the prefix it holds) to our
        receiver; blocks until it did or ``timeout_s`` passed. Raises
        :class:`~lmcache_pd.pull.FetchError`."""
        msg = FetchKeys(
            req_id=f"p2p-{secrets.token_hex(8)}",
            keys=list(keys),
            receiver=self.receiver,
            tp_rank=self.tp_rank,
        )
        try:
            return self._request(endpoint, msg, timeout_s, "peer")
        except FetchError as exc:
            if exc.code is ErrorCode.TIMEOUT:
                with self._lock:
                    self._down[endpoint] = time.monotonic() + PEER_DOWN_S
            raise


class PeerSource:
    """The worker's chunk source with p2p on: the receiver (buffer, then the tiers
    behind it) for loads; peers fill what no tier holds.

    ``lookup``/``acquire``/``release`` see only what this engine can load now (the
    receive buffer, CPU, disk, remote values); :meth:`lookup_with_peers` (the scheduler's
    lookup) also counts the chunks a peer is known to hold, and :meth:`wait_for` (run
    off the forward path before such a load) fetches them."""

    def __init__(
        self, store: TieredStore, receiver: Receiver, client: PeerClient, own_endpoint: str
    ) -> None:
        self.store = store
        self.receiver = receiver
        self.client = client
        self.own_endpoint = own_endpoint
        self.counters = Counters("p2p")

    def lookup(self, keys: Sequence[bytes]) -> int:
        n = self.receiver.lookup(keys)
        return n if n == len(keys) else n + self.store.contains(keys[n:])

    def _plan(self, keys: Sequence[bytes]) -> tuple[int, str | None, int]:
        """(prefix held here, the peer to ask, how many keys after it that peer holds):
        one remote round trip."""
        n = self.receiver.lookup(keys)
        if n == len(keys):
            return n, None, 0
        m, holders = self.store.lookup_holders(keys[n:])
        n += m
        peer = holders[0] if holders else None
        if peer is None or peer == self.own_endpoint or self.client.is_down(peer):
            return n, None, 0
        run = 1
        while run < len(holders) and holders[run] == peer:
            run += 1
        return n, peer, run

    def lookup_with_peers(self, keys: Sequence[bytes]) -> int:
        """Longest prefix loadable here or from one peer (the holder index's)."""
        n, _peer, run = self._plan(keys)
        return n + run

    def wait_for(self, keys: Sequence[bytes], timeout_s: float) -> int:
        """Fetch the chunks after the locally held prefix from the peer that holds them
        (bounded by ``timeout_s`` and the handoff timeouts); the prefix held after."""
        n, peer, run = self._plan(keys)
        if peer is None:
            return n
        want = keys[n : n + run]
        cfg = self.client.cfg
        bound = min(timeout_s, cfg.pd_connect_timeout_s + cfg.pd_transfer_timeout_s)
        t0 = time.monotonic()
        self.counters.inc("fetches")
        try:
            done = self.client.fetch_keys(peer, want, bound)
        except FetchError as exc:
            self.counters.inc("peer_misses", len(want))
            log.warning(
                "p2p: fetching %d chunk(s) from %s failed after %.2f s (%s); they are recomputed",
                len(want),
                peer,
                time.monotonic() - t0,
                exc,
            )
            return n
        got = self.receiver.lookup(want)
        self.counters.inc("peer_hits", got)
        self.counters.inc("peer_misses", len(want) - got)
        log.info(
            "p2p: fetched %d of %d chunk(s) from peer %s in %.1f ms (%d moved, %d already "
            "here); peer_hits=%d peer_misses=%d",
            got,
            len(want),
            peer,
            (time.monotonic() - t0) * 1e3,
            done.chunks,
            done.dedup,
            self.counters["peer_hits"],
            self.counters["peer_misses"],
        )
        return n + got

    def acquire(self, keys: Sequence[bytes]) -> list[ChunkData | None]:
        return self.receiver.acquire(keys)

    def acquire_checked(self, keys: Sequence[bytes]) -> tuple[list[ChunkData | None], list[int]]:
        return self.receiver.acquire_checked(keys)

    def settle(self, key: bytes, expected: int, ok: bool, where: str = "the engine's load") -> None:
        self.receiver.settle(key, expected, ok, where)

    def release(self, keys: Sequence[bytes]) -> None:
        self.receiver.release(keys)


class PeerSharing:
    """P2P for one worker rank: a receiver (with the tiers behind it) and a sender, each
    on its own NIXL agent, the :class:`PeerServer`, the :class:`PeerClient` and the
    :class:`PeerSource`. Advertises this rank as the holder of what its CPU tier gets."""

    def __init__(
        self,
        cfg: Config,
        layout: KVLayout,
        store: TieredStore,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        receiver_port: int | None = None,
        server_port: int | None = None,
    ) -> None:
        if store.remote is None:
            raise ValueError(
                "enable_p2p needs the remote tier (remote_url): its index says which peer "
                "holds a chunk"
            )
        self.receiver = Receiver(
            cfg,
            layout,
            NixlTransport(backends=cfg.nixl_backends, bind_host=cfg.pd_bind_host),
            port=receiver_port,
            tp_rank=tp_rank,
            tp_size=tp_size,
            store=store,
        ).start()
        self.sender = Sender(
            cfg,
            layout,
            NixlTransport(backends=cfg.nixl_backends, bind_host=cfg.pd_bind_host),
            tp_size=tp_size,
            tp_rank=tp_rank,
        )
        codec = self.receiver.codec
        self.server = PeerServer(cfg, codec, store, self.sender, tp_rank=tp_rank, port=server_port)
        self.client = PeerClient(
            cfg,
            codec,
            tcp_endpoint(cfg.advertised_host(), self.receiver.port),
            tp_rank=tp_rank,
        )
        self.source = PeerSource(store, self.receiver, self.client, self.server.endpoint)
        store.set_holder(self.server.endpoint, cfg.p2p_holder_ttl_s)

    def stats(self) -> dict[str, int]:
        out = {f"p2p.{k}": v for k, v in self.source.counters.snapshot().items()}
        out.update({f"p2p.server.{k}": v for k, v in self.server.stats().items()})
        out.update({f"p2p.client.{k}": v for k, v in self.client.counters.snapshot().items()})
        return out

    def close(self) -> None:
        self.server.close()
        self.client.close()
        self.sender.close()
        self.sender.transport.close()
        self.receiver.close()
        self.receiver.transport.close()
