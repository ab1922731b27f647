"""Scheduler -> worker chunk lookup over a local ZMQ IPC socket.

vLLM's CPU build runs workers in separate processes from the scheduler, while the chunks
(tiers, received transfers) live in the worker. The worker serves
``lookup(keys) -> longest held prefix`` on an IPC socket in a per-user 0700 directory;
the scheduler asks every TP rank and takes the minimum. The same socket tells the
scheduler each rank's pull endpoint (a prefiller's :class:`~lmcache_pd.pull.HoldServer`),
which it returns in the standard contract's ``kv_transfer_params``. The server thread blocks in
``poll`` (no spinning); the client has a deadline and treats a timeout as a miss.
Messages are msgpack (msgspec), never pickle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence

import msgspec
import zmq

log = logging.getLogger("lmcache_pd.vllm")


class LookupRequest(msgspec.Struct, frozen=True):
    keys: list[bytes]
    want_endpoint: bool = False
    source_tp: int = 0  # the prefiller's TP size when the chunks come from one (0: ours)


class LookupReply(msgspec.Struct, frozen=True):
    hit: int
    error: str = ""
    pull_host: str = ""  # the rank's pull endpoint; "" where the rank has none
    pull_port: int = 0


_enc = msgspec.msgpack.Encoder()
_dec_req = msgspec.msgpack.Decoder(LookupRequest)
_dec_rep = msgspec.msgpack.Decoder(LookupReply)


class LookupServer:
    """Answers lookups with ``lookup_fn(keys)`` on ``endpoint`` from one thread."""

    def __init__(
        self,
        endpoint: str,
        lookup_fn: Callable[[list[bytes], int], int],
        pull_address: Callable[[], tuple[str, int] | None] = lambda: None,
    ) -> None:
        self.endpoint = endpoint
        self._fn = lookup_fn
        self._pull_address = pull_address
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        path = endpoint.removeprefix("ipc://")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmcache-pd-lookup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._sock.poll(500):
                    continue
                raw = self._sock.recv()
            except zmq.ZMQError:
                break
            try:
                req = _dec_req.decode(raw)
                if req.want_endpoint:
                    host, port = self._pull_address() or ("", 0)
                    reply = LookupReply(hit=0, pull_host=host, pull_port=port)
                else:
                    reply = LookupReply(hit=int(self._fn(req.keys, req.source_tp)))
            except Exception as exc:  # one bad request must not kill the server
                log.warning("lookup failed: %s", exc)
                reply = LookupReply(hit=0, error=str(exc))
            try:
                self._sock.send(_enc.encode(reply))
            except zmq.ZMQError:
                break

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        if self._thread.is_alive():  # inside a lookup: closing its socket under it is undefined
            log.error("lookup server thread did not stop within 2 s; left running")
            return
        self._sock.close(linger=0)
        self._ctx.term()
        with contextlib.suppress(OSError):
            os.unlink(self.endpoint.removeprefix("ipc://"))


class LookupClient:
    """Asks each worker rank's :class:`LookupServer`; a rank that does not answer
    within ``timeout_s`` counts as a miss (and its socket is rebuilt)."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float = 2.0) -> None:
        self.endpoints = list(endpoints)
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = zmq.Context()
        self._socks: list[zmq.Socket | None] = [None] * len(self.endpoints)
        self._lock = threading.Lock()
        self._pull_addresses: list[tuple[str, int]] | None = None

    def _sock(self, i: int) -> zmq.Socket:
        sock = self._socks[i]
        if sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            sock.connect(self.endpoints[i])
            self._socks[i] = sock
        return sock

    def lookup(self, keys: list[bytes], source_tp: int = 0) -> int:
        """Chunks of ``keys`` every rank holds (a prefix); ``source_tp``: count a chunk
        from a prefiller at that TP size only when all its head pieces are held."""
        if not keys:
            return 0
        payload = _enc.encode(LookupRequest(keys=keys, source_tp=source_tp))
        best = len(keys)
        with self._lock:
            for i in range(len(self.endpoints)):
                sock = self._sock(i)
                try:
                    sock.send(payload)
                    reply = _dec_rep.decode(sock.recv())
                except zmq.ZMQError as exc:
                    log.warning(
                        "lookup on %s got no answer in %d ms (%s); treating as a miss",
                        self.endpoints[i],
                        self.timeout_ms,
                        exc,
                    )
                    sock.close(linger=0)
                    self._socks[i] = None
                    return 0
                best = min(best, reply.hit)
        return best

    def pull_addresses(self) -> list[tuple[str, int]] | None:
        """Every rank's pull endpoint ``(host, port)`` (cached once all answered); None
        if one did not."""
        if self._pull_addresses is not None:
            return self._pull_addresses
        payload = _enc.encode(LookupRequest(keys=[], want_endpoint=True))
        out = []
        with self._lock:
            for i in range(len(self.endpoints)):
                sock = self._sock(i)
                try:
                    sock.send(payload)
                    reply = _dec_rep.decode(sock.recv())
                except zmq.ZMQError as exc:
                    log.warning("rank %d did not say its pull endpoint (%s)", i, exc)
                    sock.close(linger=0)
                    self._socks[i] = None
                    return None
                if not reply.pull_host:
                    return None
                out.append((reply.pull_host, reply.pull_port))
        self._pull_addresses = out
        return out

    def close(self) -> None:
        with self._lock:
            for sock in self._socks:
                if sock is not None:
                    sock.close(linger=0)
            self._socks = [None] * len(self.endpoints)
        self._ctx.term()
