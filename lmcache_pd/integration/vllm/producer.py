"""Prefiller side: gathered chunks -> decoder (push-ahead) or into a hold (standard).

In ``wait_for_save`` the worker gathers each fully computed chunk of a request straight
into a slot of the :class:`~lmcache_pd.sender.Sender`'s registered send buffer. When the
request's prefill is complete (its last save):

- push-ahead (our proxy named the decoder): the chunks go to one background thread which
  runs the blocking handoff (Offer/Accept/WRITE/Done, every step with a deadline) off the
  forward path to every decoder TP rank that takes heads of ours (rank r -> rank r at the
  same TP; head pieces at another TP, :mod:`lmcache_pd.pieces`), frees the slots, and
  PUSHes a signed ``HandoffDone`` to the proxy named in ``kv_transfer_params``;
- standard contract (no decoder named): the chunks are held by the
  :class:`~lmcache_pd.pull.HoldServer` until a decoder's ``Fetch`` names its receiver;
  the same handoff then pushes them there.

Threads block on queues and sockets: an idle prefiller burns no CPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq

from lmcache_pd.config import Config
from lmcache_pd.control import Codec, PushClient, tcp_endpoint
from lmcache_pd.integration.vllm.common import KVRole, SaveSpec, SendTarget, agent_name
from lmcache_pd.layout import KVLayout
from lmcache_pd.pieces import send_pieces
from lmcache_pd.protocol import HandoffDone
from lmcache_pd.pull import HoldServer
from lmcache_pd.sender import HandoffError, OutChunk, Sender
from lmcache_pd.tiers import log_store
from lmcache_pd.tp import sender_pieces
from lmcache_pd.transports.nixl import NixlTransport

log = logging.getLogger("lmcache_pd.vllm")

# gathers chunk ``index`` of a request into a send slot; returns its digest, taken in the
# same pass (protocol.NO_CHECKSUM when not hashed)
GatherFn = Callable[[SaveSpec, int, torch.Tensor], int]


class Producer:
    """Owns the sender, its transport, the push thread, the holds and the proxy notifiers."""

    def __init__(self, cfg: Config, layout: KVLayout, tp_rank: int, tp_size: int) -> None:
        self.cfg = cfg
        self.layout = layout
        self.tp_rank = tp_rank
        self.transport = NixlTransport(
            agent_name(KVRole.PRODUCER, tp_rank),
            backends=cfg.nixl_backends,
            bind_host=cfg.pd_bind_host,
        )
        self.sender = Sender(cfg, layout, self.transport, tp_size=tp_size, tp_rank=tp_rank)
        self._codec = Codec(cfg.auth_secret(), cfg.pd_max_frame_bytes)
        self._ctx = zmq.Context()
        self._notifiers: dict[str, PushClient] = {}
        self._pending: dict[str, list[OutChunk]] = {}
        self._failed: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lmcache-pd-push")
        self.holds = HoldServer(
            cfg,
            self._codec,
            self._push,
            self.sender.free,
            tp_rank=tp_rank,
            tp_size=tp_size,
            total_heads=layout.model_kv_heads,
        )
        self.tp_size = tp_size
        self.sent_chunks = 0
        self.failed_requests = 0
        # (seconds, bytes) of each completed push (the connector's stats)
        self.on_pushed: Callable[[float, int], None] | None = None

    def stage(self, spec: SaveSpec, gather_fn: GatherFn) -> None:
        """Gather ``spec``'s chunks into send slots; push them all on the last save."""
        chunks = self._pending.setdefault(spec.req_id, [])
        if spec.keys and spec.req_id not in self._failed:
            try:
                slots = self.sender.alloc(len(spec.keys), timeout_s=0.0)
            except (TimeoutError, ValueError) as exc:
                log.warning(
                    "request %s: send buffer full (%s); its KV will not be pushed and the "
                    "decoder recomputes it (raise pd_buffer_size)",
                    spec.req_id,
                    exc,
                )
                self._failed.add(spec.req_id)
            else:
                nbytes = self.layout.bytes_per_chunk(self.cfg.chunk_size)
                for i, (key, slot) in enumerate(zip(spec.keys, slots, strict=True)):
                    digest = gather_fn(spec, i, self.sender.buffer.slot_tensor(slot))
                    chunks.append(OutChunk(key, slot, nbytes, digest))
        if not spec.last:
            return
        chunks = self._pending.pop(spec.req_id, [])
        failed = spec.req_id in self._failed
        self._failed.discard(spec.req_id)
        if spec.hold is not None:
            if failed or not chunks:
                self.sender.free([c.slot for c in chunks])  # nothing held: decoder recomputes
            else:
                self.holds.hold(spec.hold, chunks, spec.total_tokens)
            return
        assert spec.target is not None
        if failed:
            self.sender.free([c.slot for c in chunks])
            self._notify(
                spec.target, HandoffDone(spec.target.req_id, ok=False, error="send buffer full")
            )
            return
        self._pool.submit(self._push_ahead, spec.target, chunks, spec.total_tokens)

    def _push_ahead(self, target: SendTarget, chunks: list[OutChunk], total: int) -> None:
        req_id = target.req_id or ""
        try:
            endpoints = self._decoder_endpoints(target)
        except (HandoffError, ValueError) as exc:  # its Hello failed: refused, unreachable
            self.failed_requests += 1
            where = f"{target.decoder_host}:{target.decoder_init_port}"
            log.error("request %s: push to %s failed: %s", req_id, where, exc)
            endpoints, done = [], HandoffDone(req_id, ok=False, error=str(exc))
        for endpoint in endpoints:
            done = self._push(endpoint, req_id, chunks, total)
            if not done.ok:
                break
        self.sender.free([c.slot for c in chunks])
        self._notify(target, done)

    def _decoder_endpoints(self, target: SendTarget) -> list[str]:
        """The control endpoints of the decoder's TP ranks that take heads of ours: rank
        r at the same TP size; learnt from its rank 0's HelloAck at another TP size."""
        _, size, ports = self.sender.receiver_tp(target.decoder_endpoint(0))  # all have a 0
        if size == self.tp_size:
            ranks = [self.tp_rank]
        else:
            heads = self.layout.model_kv_heads
            ranks = sorted({p.dst for p in sender_pieces(heads, self.tp_size, size, self.tp_rank)})
        if ports:  # as the decoder configured them (a per-rank list, or base + rank)
            return [tcp_endpoint(target.decoder_host or "", ports[r]) for r in ranks]
        return [target.decoder_endpoint(r) for r in ranks]

    def _push(self, endpoint: str, req_id: str, chunks: list[OutChunk], total: int) -> HandoffDone:
        """Hand our ``chunks`` (or the head pieces of them that the receiver rank takes)
        to the receiver at ``endpoint``; the slots stay the caller's. Runs on a push
        thread (push-ahead) or a fetch thread (standard contract)."""
        done = HandoffDone(req_id, ok=True)
        try:
            if chunks:
                result = send_pieces(self.sender, endpoint, req_id, chunks)
                done = HandoffDone(req_id, ok=True, chunks=result.sent, dedup=result.dedup)
                self.sent_chunks += result.sent
                if self.on_pushed is not None:
                    self.on_pushed(result.seconds, result.bytes)
                log_store(
                    len(chunks) * self.cfg.chunk_size,
                    total,
                    result.bytes,
                    result.seconds,
                    logger=log,
                )
                log.info(
                    "request %s: pushed %d chunk(s) to %s (%d already held there)",
                    req_id,
                    result.sent,
                    endpoint,
                    result.dedup,
                )
        except HandoffError as exc:
            self.failed_requests += 1
            log.error("request %s: push to %s failed: %s", req_id, endpoint, exc)
            done = HandoffDone(req_id, ok=False, error=str(exc))
        except Exception as exc:  # keep the push thread alive whatever happens
            self.failed_requests += 1
            log.exception("request %s: push to %s failed", req_id, endpoint)
            done = HandoffDone(req_id, ok=False, error=f"{type(exc).__name__}: {exc}")
        return done

    def _notify(self, target: SendTarget, msg: HandoffDone) -> None:
        if not target.proxy_notify or self.tp_rank != 0:
            return
        with self._lock:
            client = self._notifiers.get(target.proxy_notify)
            if client is None:
                client = PushClient(self._ctx, self._codec, target.proxy_notify)
                self._notifiers[target.proxy_notify] = client
        client.send(msg)

    def forget(self, finished_req_ids: Iterable[str]) -> None:
        """Free the slots of requests that finished before their last save (aborts)."""
        for req_id in finished_req_ids:
            chunks = self._pending.pop(req_id, None)
            self._failed.discard(req_id)
            if chunks:
                self.sender.free([c.slot for c in chunks])

    def close(self) -> None:
        self.holds.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for client in self._notifiers.values():
                client.close()
            self._notifiers.clear()
        self.sender.close()
        self._ctx.term()
        self.transport.close()
