"""ZMQ control plane: signed multipart framing and the sockets that carry it.

Wire form of one message (a ZMQ multipart message)::

    [header, payload_0, ..., payload_n, mac]

or, for the few messages that ride a NIXL notification (``protocol.LeaseReply``), one
byte string ``SIGNED_NOTIF_PREFIX + header + mac`` with the same MAC over ``[header]``
(:meth:`Codec.pack_notif` / :meth:`Codec.unpack_notif`).

``header`` is the msgpack-encoded :mod:`lmcache_pd.protocol` message, payload frames are
opaque bytes (NIXL metadata) sent zero-copy, and ``mac`` is HMAC-SHA256 over every frame
(length-prefixed) with the shared secret. Receivers check the frame count and sizes first
(oversize -> ``Error`` reply), then the MAC (bad or missing -> dropped, counted, logged),
then decode strictly (malformed -> ``Error`` reply). Nothing is ever unpickled.

Sockets:
- :class:`BlockingRouter` (ROUTER for a server thread polling several sockets; replies
  by peer identity) and :class:`RouterLoop` (that thread: messages in, replies from
  worker threads out, timers, sub-ms poll gaps; the receiver, the prefiller's pull
  endpoint and the p2p endpoint),
- :class:`DealerClient` (blocking DEALER with deadlines, the sender) and
  :class:`NotifInbox` (the sender's answers that come as signed NIXL notifications),
- :class:`PushClient` / :class:`PullServer` (prefiller -> proxy notifications).
Every wait is bounded: ``zmq.Poller`` / ``asyncio`` timeouts, never a spin.
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import logging
import math
import queue
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import zmq
import zmq.asyncio

from lmcache_pd.metrics import Counters, RateLimitedLog
from lmcache_pd.protocol import (
    SIGNED_NOTIF_PREFIX,
    Error,
    ErrorCode,
    LeaseReply,
    Message,
    Msg,
    ProtocolError,
    decode,
    encode,
)

log = logging.getLogger(__name__)

MAC_BYTES = 32
_FRAME_LEN = struct.Struct("<Q")
_T = TypeVar("_T")
MAX_PAYLOAD_FRAMES = 4


class AuthError(Exception):
    """A frame with a missing or wrong signature."""


class ControlTimeout(TimeoutError):
    """A control-plane wait passed its deadline."""


def tcp_endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


def _max_msg_size(codec: Codec) -> int:
    """ZMQ's hard cap: above the codec's limit so oversize frames get an Error reply."""
    return 2 * codec.max_bytes + 65536


def _bind(
    sock: zmq.Socket, codec: Codec, host: str, port: int, avoid: Sequence[int] = ()
) -> tuple[int, str]:
    """Bind ``sock`` on ``host:port`` (0 = a free port, none of ``avoid``: ports this
    process is about to listen on itself, which the OS may hand out meanwhile); returns
    ``(port, endpoint)``."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, _max_msg_size(codec))
    if port == 0:
        port = sock.bind_to_random_port(f"tcp://{host}")
        for _ in range(8):
            if port not in avoid:
                break
            taken = port
            port = sock.bind_to_random_port(f"tcp://{host}")
            sock.unbind(tcp_endpoint(host, taken))
    else:
        sock.bind(tcp_endpoint(host, port))
    return port, tcp_endpoint(host, port)


class Codec:
    """Packs messages into signed frames and unpacks them, with size limits."""

    def __init__(self, secret: bytes, max_bytes: int = 4 * 1024 * 1024) -> None:
        if len(secret) < 16:
            raise ValueError("control-plane secret must be at least 16 bytes")
        self._secret = secret
        self.max_bytes = max_bytes

    def _mac(self, frames: Sequence[bytes | memoryview]) -> bytes:
        """HMAC-SHA256 over every frame, each prefixed with its length (8 bytes LE), in
        one call (OpenSSL's one-shot HMAC: no Python object per frame)."""
        signed = b"".join(part for f in frames for part in (_FRAME_LEN.pack(len(f)), f))
        return hmac.digest(self._secret, signed, "sha256")

    def pack(self, msg: Msg, payload: Sequence[bytes] = ()) -> list[bytes]:
        frames = [encode(msg), *payload]
        return [*frames, self._mac(frames)]

    def pack_notif(self, msg: Msg) -> bytes:
        """``msg`` signed as one byte string for a transport notification:
        ``SIGNED_NOTIF_PREFIX + header + mac`` (the MAC as over ZMQ frames)."""
        header = encode(msg)
        return SIGNED_NOTIF_PREFIX + header + self._mac([header])

    def unpack_notif(self, data: bytes) -> Message | None:
        """The message in a notification from :meth:`pack_notif`; None for one that is
        not ours (no prefix: other users of the agent). Raises AuthError for a wrong or
        missing signature, ProtocolError for a malformed or oversize one."""
        if not data.startswith(SIGNED_NOTIF_PREFIX):
            return None
        body = memoryview(data)[len(SIGNED_NOTIF_PREFIX) :]
        if len(body) > self.max_bytes:
            raise ProtocolError(ErrorCode.OVERSIZE, f"notification of {len(body)} bytes")
        header, mac = body[:-MAC_BYTES], body[-MAC_BYTES:]
        if len(body) <= MAC_BYTES or not hmac.compare_digest(self._mac([header]), bytes(mac)):
            raise AuthError("missing or wrong HMAC signature")
        return decode(header)

    def check_size(self, frames: Sequence[bytes | memoryview]) -> None:
        """Raise ``ProtocolError(OVERSIZE)`` for too many or too large frames."""
        if not 2 <= len(frames) <= MAX_PAYLOAD_FRAMES + 2:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"expected 2..{MAX_PAYLOAD_FRAMES + 2} frames (header, payload, mac), "
                f"got {len(frames)}",
            )
        total = sum(len(f) for f in frames)
        if total > self.max_bytes:
            raise ProtocolError(
                ErrorCode.OVERSIZE, f"message of {total} bytes exceeds limit {self.max_bytes}"
            )

    def unpack(self, frames: Sequence[bytes | memoryview]) -> tuple[Message, list[bytes]]:
        """Check size, signature, then decode. Raises ProtocolError or AuthError."""
        self.check_size(frames)
        *body, mac = frames
        if len(mac) != MAC_BYTES or not hmac.compare_digest(self._mac(body), bytes(mac)):
            raise AuthError("missing or wrong HMAC signature")
        msg = decode(body[0])
        return msg, [bytes(f) for f in body[1:]]


class _Inbound:
    """Shared accounting for frames that fail checks."""

    def __init__(self, codec: Codec, counters: Counters) -> None:
        self.codec = codec
        self.counters = counters
        self._auth_log = RateLimitedLog(log)
        self._bad_log = RateLimitedLog(log)

    def classify(self, frames: list[bytes]) -> tuple[Message, list[bytes]] | Error | None:
        """A decoded message, an Error to reply with, or None to drop silently."""
        return self._checked(lambda: self.codec.unpack(frames), "control message")

    def classify_notif(self, data: bytes) -> Message | None:
        """The signed message in a transport notification; None for one that is not
        ours or is unsigned; a malformed one as the Error it would be answered with
        (an inbox takes only the messages it expects)."""
        return self._checked(lambda: self.codec.unpack_notif(data), "signed notification")

    def _checked(self, unpack: Callable[[], _T], what: str) -> _T | Error | None:
        """``unpack()``, or what a failed check turns into: None (bad signature) or an
        Error (malformed, oversize); each counted and logged (rate-limited)."""
        try:
            return unpack()
        except AuthError:
            self.counters.inc("auth_failures")
            self._auth_log.warning(
                "dropped a %s with a missing or wrong signature: check that both sides use "
                "the same pd_auth_secret / pd_auth_secret_file",
                what,
            )
            return None
        except ProtocolError as exc:
            name = "oversize_frames" if exc.code is ErrorCode.OVERSIZE else "malformed_frames"
            self.counters.inc(name)
            self._bad_log.warning("rejected a %s: %s", what, exc)
            return Error(code=exc.code, message=exc.message)


class BlockingRouter:
    """ROUTER socket served by a thread that polls it with other sockets (``sock`` goes
    into the thread's ``zmq.Poller``); replies by identity. Not thread-safe."""

    def __init__(
        self, ctx: zmq.Context, codec: Codec, host: str, port: int, counters: Counters
    ) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.port, self.endpoint = _bind(self.sock, codec, host, port)
        self.codec = codec
        self._inbound = _Inbound(codec, counters)

    def recv_ready(self) -> list[tuple[bytes, Message, list[bytes]]]:
        """Every message queued now (call when ``sock`` polled readable); bad frames are
        answered with ``Error`` or dropped, never returned."""
        out: list[tuple[bytes, Message, list[bytes]]] = []
        while True:
            try:
                identity, *frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            result = self._inbound.classify(frames)
            if result is None:
                continue
            if isinstance(result, Error):
                self.send(identity, result)
                continue
            out.append((identity, result[0], result[1]))

    def send(self, identity: bytes, msg: Msg, payload: Sequence[bytes] = ()) -> None:
        try:
            self.sock.send_multipart([identity, *self.codec.pack(msg, payload)], zmq.NOBLOCK)
        except zmq.Again:  # the peer is gone or not reading: it times out on its side
            log.warning("reply %s to a gone peer dropped", type(msg).__name__)

    def close(self) -> None:
        self.sock.close(linger=0)


_PR_SET_TIMERSLACK = 29  # prctl option (linux/prctl.h)


_slack = threading.local()


def fine_timer_slack() -> None:
    """Let this thread's timed sleeps end within 1 us of their deadline (Linux; a no-op
    where prctl is missing). Cheap to call again: set once per thread."""
    if getattr(_slack, "fine", False):
        return
    _slack.fine = True
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class RouterLoop:
    """One thread serving a :class:`BlockingRouter`: each message goes to
    ``on_message(identity, msg, payload)`` on that thread, which may answer at once with
    :meth:`send`; worker threads hand replies back with :meth:`reply` (the loop thread
    sends them: ZMQ sockets are not thread-safe) or just :meth:`wake` it. Between
    messages it waits at most ``next_timeout_s()`` seconds (None: until a message or a
    wake) and calls ``on_tick()`` after every wake-up (timers such as expiries, polling).

    Waits of a millisecond or more block in ``zmq_poll``; shorter ones (its timeout has
    millisecond resolution) check the sockets, sleep on this thread and check again, so a
    message waits at most that long. With ``fine_timers`` those sleeps last what they
    ask for: the thread's timer slack (Linux: 50 us by default, which would double a
    50 us gap) is set to 1 us. ``start()`` it; ``close()`` it."""

    def __init__(
        self,
        ctx: zmq.Context,
        router: BlockingRouter,
        on_message: Callable[[bytes, Message, list[bytes]], None],
        *,
        name: str,
        next_timeout_s: Callable[[], float | None] = lambda: None,
        on_tick: Callable[[], None] = lambda: None,
        fine_timers: bool = False,
    ) -> None:
        self.router = router
        self._fine_timers = fine_timers
        self._on_message = on_message
        self._next_timeout_s = next_timeout_s
        self._on_tick = on_tick
        addr = f"inproc://lmcache-pd-{name}-{id(self)}"
        self._wake_in = ctx.socket(zmq.PULL)
        self._wake_in.setsockopt(zmq.LINGER, 0)
        self._wake_in.bind(addr)
        self._wake_out = ctx.socket(zmq.PUSH)
        self._wake_out.setsockopt(zmq.LINGER, 0)
        self._wake_out.connect(addr)
        self._wake_lock = threading.Lock()
        self._replies: queue.SimpleQueue[tuple[bytes, Message]] = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"lmcache-pd-{name}", daemon=True)

    def start(self) -> RouterLoop:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """The loop thread is serving."""
        return self._thread.is_alive()

    def wake(self) -> None:
        """Make the loop thread run ``on_tick`` and recompute its timeout now."""
        with self._wake_lock:
            if not self._stop:
                self._wake_out.send(b"", zmq.NOBLOCK)

    def reply(self, identity: bytes, msg: Message) -> None:
        """Send ``msg`` to ``identity`` from the loop thread (any thread may call this)."""
        self._replies.put((identity, msg))
        self.wake()

    def send(self, identity: bytes, msg: Msg, payload: Sequence[bytes] = ()) -> None:
        """Send ``msg`` now: on the loop thread only (``on_message``, ``on_tick``)."""
        self.router.send(identity, msg, payload)

    def _wait(self, poller: zmq.Poller) -> dict[zmq.Socket, int]:
        timeout_s = self._next_timeout_s()
        if timeout_s is None:
            return dict(poller.poll())
        if timeout_s >= 1e-3:
            return dict(poller.poll(math.ceil(timeout_s * 1000)))
        events = dict(poller.poll(0))
        if not events and timeout_s > 0:
            time.sleep(timeout_s)
            events = dict(poller.poll(0))
        return events

    def _run(self) -> None:
        if self._fine_timers:
            fine_timer_slack()
        poller = zmq.Poller()
        poller.register(self.router.sock, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        while not self._stop:
            try:
                events = self._wait(poller)
            except zmq.ZMQError:
                break
            if self._wake_in in events:
                while True:
                    try:
                        self._wake_in.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            while True:
                try:
                    identity, msg = self._replies.get_nowait()
                except queue.Empty:
                    break
                self.router.send(identity, msg)
            if self.router.sock in events:
                for identity, msg, payload in self.router.recv_ready():
                    self._on_message(identity, msg, payload)
            self._on_tick()

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop the thread (it finishes the message at hand) and close the sockets.
        False when the thread did not stop in time: its sockets stay open (closing them
        under it is undefined), so the owner must not ``term()`` their context, which
        would block until they close."""
        with self._wake_lock:
            self._stop = True
            self._wake_out.send(b"", zmq.NOBLOCK)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():  # its sockets are still in use: leave them open
            log.error("%s did not stop within %.0fs", self._thread.name, timeout_s)
            return False
        self.router.close()
        self._wake_in.close(linger=0)
        self._wake_out.close(linger=0)
        return True


class DealerClient:
    """Blocking DEALER connection to one receiver. Not thread-safe: one request at a time
    (callers hold a lock). Every request has a deadline."""

    def __init__(self, ctx: zmq.Context, codec: Codec, endpoint: str, counters: Counters) -> None:
        self.ctx = ctx
        self.codec = codec
        self.endpoint = endpoint
        self.counters = counters
        self._inbound = _Inbound(codec, counters)
        self._open()

    def _open(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, _max_msg_size(self.codec))
        self.sock.connect(self.endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def send(self, msg: Msg, payload: Sequence[bytes] = ()) -> None:
        self.sock.send_multipart(self.codec.pack(msg, payload), copy=False)

    def recv(self, timeout_s: float, req_id: str | None = None) -> tuple[Message, list[bytes]]:
        """Next valid reply (for ``req_id`` if given) within ``timeout_s``; replies to
        other requests (late answers after a timeout) are discarded."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self._queued(req_id)
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0 or not self.poller.poll(max(1, int(left * 1000))):
                raise ControlTimeout(
                    f"no reply from {self.endpoint} within {timeout_s:.1f}s "
                    f"(receiver down, unreachable or overloaded?)"
                )

    def recv_ready(self, req_id: str) -> Message | None:
        """The reply to ``req_id`` if one is queued now (never blocks)."""
        found = self._queued(req_id)
        return None if found is None else found[0]

    def _queued(self, req_id: str | None) -> tuple[Message, list[bytes]] | None:
        """The first queued reply for ``req_id`` (any, if None), or an ``Error``; the
        frames before it (other requests' replies, bad frames) are dropped."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            result = self._inbound.classify(frames)
            if result is None:
                continue
            if isinstance(result, Error):
                return result, []
            if req_id is None or getattr(result[0], "req_id", req_id) == req_id:
                return result

    def request(
        self, msg: Msg, payload: Sequence[bytes] = (), timeout_s: float = 10.0
    ) -> tuple[Message, list[bytes]]:
        self.send(msg, payload)
        return self.recv(timeout_s, getattr(msg, "req_id", None))

    def reset(self) -> None:
        """Drop queued frames and reconnect (after a timeout)."""
        self.sock.close(linger=0)
        self._open()

    def close(self) -> None:
        self.sock.close(linger=0)


class NotifInbox:
    """Signed answers that arrive as transport notifications (``LeaseReply``, see
    :meth:`Codec.pack_notif`), for the threads of one sender: each registers the
    ``(agent, lease)`` it waits on with :meth:`expect` before asking; whichever thread
    polls (:meth:`take`) files what came for the others. Answers nobody waits for (late
    ones after a timeout) are dropped, as are unsigned ones (counted ``auth_failures``).
    ``poll`` returns ``(agent, message)`` pairs: the transport's ``notifications``."""

    def __init__(
        self, poll: Callable[[], list[tuple[str, bytes]]], codec: Codec, counters: Counters
    ) -> None:
        self._poll = poll
        self._inbound = _Inbound(codec, counters)
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, int], Message | None] = {}

    def expect(self, agent: str, lease: int) -> None:
        with self._lock:
            self._waiting[(agent, lease)] = None

    def forget(self, agent: str, lease: int) -> None:
        with self._lock:
            self._waiting.pop((agent, lease), None)

    def take(self, agent: str, lease: int) -> Message | None:
        """The answer for ``lease`` from ``agent`` if it came (then no longer
        expected); polls the transport once."""
        with self._lock:
            for peer, text in self._poll():
                msg = self._inbound.classify_notif(text)
                if isinstance(msg, LeaseReply) and (peer, msg.lease) in self._waiting:
                    self._waiting[(peer, msg.lease)] = msg.reply
            answer = self._waiting.get((agent, lease))
            if answer is not None:
                del self._waiting[(agent, lease)]
            return answer


class PushClient:
    """Fire-and-forget signed notifications (prefiller -> proxy), bounded send time."""

    def __init__(self, ctx: zmq.Context, codec: Codec, endpoint: str) -> None:
        self.codec = codec
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDTIMEO, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 10000)
        self.sock.connect(endpoint)

    def send(self, msg: Msg) -> bool:
        try:
            self.sock.send_multipart(self.codec.pack(msg))
            return True
        except zmq.Again:
            log.warning("notification %s dropped: peer not reachable", type(msg).__name__)
            return False

    def close(self) -> None:
        self.sock.close()


class PullServer:
    """asyncio PULL socket receiving signed notifications (the proxy's side)."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        codec: Codec,
        host: str,
        port: int,
        counters: Counters,
        avoid: Sequence[int] = (),
    ) -> None:
        self.sock = ctx.socket(zmq.PULL)
        self.port, self.endpoint = _bind(self.sock, codec, host, port, avoid)
        self._inbound = _Inbound(codec, counters)

    async def recv(self, timeout_s: float | None = None) -> Message:
        """Next valid message; bad frames are counted and skipped."""
        while True:
            frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout_s)
            result = self._inbound.classify(frames)
            if result is None or isinstance(result, Error):
                continue
            return result[0]

    def close(self) -> None:
        self.sock.close(linger=0)
