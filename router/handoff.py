"""Handoff-complete listener: the proxy's ZMQ PULL socket for ``HandoffDone``.

The prefiller PUSHes a signed ``HandoffDone{req_id, ok, chunks, error}`` to the address
the proxy named in ``kv_transfer_params.proxy_notify`` once the KV is (or failed to be)
in place at the decoder. A notice may arrive before or after the prefiller's HTTP
response; both orders are handled: the proxy registers a waiter before sending the
prefill request, and notices nobody waits for are kept in a bounded LRU for a while.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import zmq.asyncio

from lmcache_pd.control import Codec, PullServer
from lmcache_pd.metrics import Counters
from lmcache_pd.protocol import HandoffDone

log = logging.getLogger("lmcache_pd.router")


class HandoffListener:
    def __init__(
        self,
        secret: bytes,
        host: str,
        port: int,
        max_pending: int = 10_000,
        orphan_ttl_s: float = 60.0,
        avoid: Sequence[int] = (),
    ) -> None:
        """``port`` 0: a free port, none of ``avoid`` (the proxy's HTTP port, bound
        after this listener starts)."""
        self.secret = secret
        self.avoid = tuple(avoid)
        self.host = host
        self.port = port
        self.max_pending = max_pending
        self.orphan_ttl_s = orphan_ttl_s
        self.counters = Counters("proxy")
        self._waiters: dict[str, asyncio.Future[HandoffDone]] = {}
        self._early: OrderedDict[str, tuple[float, HandoffDone]] = OrderedDict()
        self._ctx: zmq.asyncio.Context | None = None
        self._server: PullServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.address = ""

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._server = PullServer(
            self._ctx, Codec(self.secret), self.host, self.port, self.counters, self.avoid
        )
        self.address = self._server.endpoint
        self._task = asyncio.get_running_loop().create_task(self._run())
        log.info("waiting for HandoffDone notices on %s", self.address)

    def expect(self, req_id: str) -> asyncio.Future[HandoffDone]:
        """Register interest in ``req_id``; call before sending the prefill request."""
        fut: asyncio.Future[HandoffDone] = asyncio.get_running_loop().create_future()
        early = self._early.pop(req_id, None)
        if early is not None:
            fut.set_result(early[1])
        elif len(self._waiters) < self.max_pending:
            self._waiters[req_id] = fut
        return fut

    def discard(self, req_id: str) -> None:
        fut = self._waiters.pop(req_id, None)
        if fut is not None and not fut.done():
            fut.cancel()

    async def wait(
        self, req_id: str, fut: asyncio.Future[HandoffDone], timeout_s: float
    ) -> HandoffDone | None:
        """The notice for ``req_id``, or None after ``timeout_s``."""
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            self.discard(req_id)

    def _deliver(self, msg: HandoffDone) -> None:
        fut = self._waiters.pop(msg.req_id, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(msg)
            return
        now = time.monotonic()
        self._early[msg.req_id] = (now, msg)
        while self._early and (
            len(self._early) > self.max_pending
            or next(iter(self._early.values()))[0] < now - self.orphan_ttl_s
        ):
            self._early.popitem(last=False)

    async def _run(self) -> None:
        assert self._server is not None
        while True:
            try:
                msg = await self._server.recv()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handoff listener: receive failed")
                await asyncio.sleep(0.1)
                continue
            if isinstance(msg, HandoffDone):
                self._deliver(msg)
            else:
                log.warning("handoff listener: ignoring unexpected %s", type(msg).__name__)

    @property
    def pending(self) -> int:
        return len(self._waiters) + len(self._early)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for fut in self._waiters.values():
            fut.cancel()
        self._waiters.clear()
        if self._server is not None:
            self._server.close()
        if self._ctx is not None:
            self._ctx.term()
