"""The remote tier: KV chunks in a Redis or Valkey server shared by many engines and hosts.

Keys are namespaced by the layout fingerprint and the chunk size,
``lmcpd:v1:<fingerprint hex>:<chunk tokens>:<chunk key hex>``, so a server shared by
different models (or chunk sizes) never hands one model another's chunk. A value is the
disk tier's chunk header (magic, version, key, fingerprint, length, xxh3-64 checksum; see
:mod:`lmcache_pd.tiers.disk`) followed by the chunk's bytes. A value that fails its header
or checksum (flipped, truncated, written for another layout) is a miss: it is deleted,
counted and logged.

Reads are batched: :meth:`RemoteStore.held` asks about a whole prompt's chunks in one
round trip and one command (``EVALSHA`` of a script that answers per key and moves no
values; a pipeline of ``EXISTS`` where the server refuses scripts),
:meth:`RemoteStore.get_many` fetches many chunks in one pipelined round trip. Writes go
behind a bounded queue drained by one thread (``remote_write_queue_size``): a full queue
drops the write and counts it, the engine never waits on the server. A put either copies
the bytes or borrows them until written (``on_written``; the tiered store lends its pinned
CPU slots), and each ``SET`` goes out as header + payload buffers, so the payload is never
copied on the way out. The writer skips chunks the server already holds (one existence
check per batch) so engines sharing a prefix do not resend it.

Peer-to-peer holder index (``enable_p2p``, :mod:`lmcache_pd.p2p`): next to a chunk's
key, ``...:p2p:<chunk key hex>`` names the p2p endpoint of an engine that holds the chunk
in its CPU tier (last writer wins, expiring after ``p2p_holder_ttl_s``). Engines
:meth:`RemoteStore.advertise` what they hold; the write-behind thread sets the entries
(batched, pipelined, off the hot path), and :meth:`RemoteStore.held_with_holders` answers
"value held, else who holds it" per key in the lookup's one round trip.

Faults: every socket wait (connect, each read) is bounded by ``remote_timeout_s`` and
redis-py does not retry, so no call waits longer than that on a dead or stalled server.
The first error turns the tier off with one warning; while off every call is a miss (the
engine recomputes) and every write is dropped, without touching the network. The writer
thread re-probes (``PING``) with exponential backoff and turns the tier back on with one
info line. Nothing is loaded from the server without its checksum, so a restart or a
half-written value never loads corrupt bytes.

The server's address (``remote_url``): :mod:`lmcache_pd.tiers.remote_url`. Eviction is
the server's: run it with ``maxmemory`` and ``maxmemory-policy allkeys-lru`` (see
docs/remote-tier.md). Values are never pickled; they are raw bytes.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import redis
import redis.backoff
import redis.exceptions
import redis.retry
import xxhash

from lmcache_pd.protocol import NO_CHECKSUM
from lmcache_pd.tiers.base import Buffer, Store, verify
from lmcache_pd.tiers.cpu import as_byte_view
from lmcache_pd.tiers.disk import (
    FORMAT_VERSION,
    HEADER_SIZE,
    Fault,
    HeaderProblem,
    encode_header,
    parse_header,
)
from lmcache_pd.tiers.metrics import Count, DropReason, TierCounters, TierMetrics, tier_metrics
from lmcache_pd.tiers.remote_url import RemoteURL, parse_remote_url

log = logging.getLogger(__name__)

NAMESPACE = "lmcpd"
PROBE_BACKOFF_S = (1.0, 30.0)  # first re-probe of a down server, then doubling to the max
MAX_BATCH_ITEMS = 64
MAX_BATCH_BYTES = 256 << 20
READ_SIZE = 1 << 20  # socket read size: large values arrive in few reads
SMALL_VALUE = 64 << 10  # values up to this size are sent as one joined buffer


class RemoteEvent(str, enum.Enum):
    """The remote tier's own counts (its state, not chunk traffic), in ``stats()``."""

    LOOKUPS = "lookups"  # prompt lookups answered by the server (one round trip each)
    DOWN_EVENTS = "down_events"  # times the tier turned itself off
    RECOVERIES = "recoveries"  # times it came back
    PROBES = "probes"  # PINGs sent while off


COUNTS = (
    Count.HITS,
    Count.MISSES,
    Count.BYTES_WRITTEN,
    Count.BYTES_READ,
    Count.DROPPED_WRITES,
    Count.QUEUE_FULL_DROPS,
    Count.DUPLICATE_PUTS,
    Count.CORRUPT_FILES,  # values: flipped, truncated, foreign, of another type
    Count.FOREIGN_FILES,
    Count.WRITE_ERRORS,
)


class RemoteState(str, enum.Enum):
    UP = "up"
    DOWN = "down"
    CLOSED = "closed"


class DownCause(str, enum.Enum):
    """Why the tier turned itself off (from the redis-py exception type)."""

    TIMEOUT = "timeout"
    AUTH = "authentication"
    LOADING = "server loading its dataset"
    CONNECTION = "connection error"
    ERROR = "server error"


def _call_done(item: _Write) -> None:
    done, item.done = item.done, None
    if done is not None:
        try:
            done()
        except Exception:
            log.exception("remote tier: on_written callback failed")


def down_cause(exc: BaseException) -> DownCause:
    if isinstance(exc, (redis.exceptions.TimeoutError, TimeoutError)):
        return DownCause.TIMEOUT
    if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError)):
        return DownCause.AUTH
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return DownCause.LOADING
    if isinstance(exc, (redis.exceptions.ConnectionError, OSError)):
        return DownCause.CONNECTION
    return DownCause.ERROR


class _Write(msgspec.Struct):
    key: bytes
    payload: memoryview  # a private copy, or borrowed until ``done`` is called
    done: Callable[[], None] | None = None


class _Advert(msgspec.Struct, frozen=True):
    """A holder-index entry to set: ``key`` is held by the p2p ``endpoint``."""

    key: bytes
    endpoint: bytes
    ttl_s: float


MAX_PENDING_ADVERTS = 4096  # holder entries waiting for the writer; beyond: dropped


# One round trip, one command for a whole prompt: per-key existence, no values moved.
EXISTS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('EXISTS', key) end
return out
"""


# Per key: 1 when the value is held, else the holder entry (a p2p endpoint) or 0.
# KEYS = value keys then holder keys, in the same order.
HOLDERS_LUA = """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then out[i] = 1
  else out[i] = redis.call('GET', KEYS[n + i]) or 0 end
end
return out
"""


_STOP = object()
_WAKE = object()


class RemoteStore(Store):
    """Chunks of one layout (``fingerprint``) and chunk size in a Redis/Valkey server.

    ``timeout_s`` bounds every socket wait; ``queue_size`` bounds the write-behind queue;
    the tier re-probes a down server after ``probe_backoff_s[0]`` seconds, doubling up to
    ``probe_backoff_s[1]`` (default :data:`PROBE_BACKOFF_S`). ``namespace`` is the key
    prefix (one per fleet sharing a server).
    """

    tier = "remote"

    def __init__(
        self,
        url: str | RemoteURL,
        fingerprint: bytes,
        chunk_size: int,
        *,
        timeout_s: float = 0.5,
        queue_size: int = 64,
        probe_backoff_s: tuple[float, float] | None = None,
        namespace: str = NAMESPACE,
        metrics: TierMetrics | None = None,
    ) -> None:
        if len(fingerprint) != 16:
            raise ValueError(f"layout fingerprint must be 16 bytes, got {len(fingerprint)}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        if timeout_s <= 0:
            raise ValueError(f"remote_timeout_s must be > 0, got {timeout_s}")
        lo, hi = probe_backoff_s or PROBE_BACKOFF_S
        if not 0 < lo <= hi:
            raise ValueError(f"probe_backoff_s must be 0 < first <= max, got {probe_backoff_s}")
        self.url = url if isinstance(url, RemoteURL) else parse_remote_url(url)
        self.fingerprint = bytes(fingerprint)
        self.chunk_size = chunk_size
        self.timeout_s = float(timeout_s)
        self._probe_min, self._probe_max = float(lo), float(hi)
        self.prefix = f"{namespace}:v{FORMAT_VERSION}:{self.fingerprint.hex()}:{chunk_size}:"
        self._prefix_b = self.prefix.encode()
        self.client = redis.Redis(
            **self.url.client_kwargs(),
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            socket_read_size=READ_SIZE,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            health_check_interval=0,
            client_name="lmcache-pd",
        )
        self._lock = threading.Lock()
        self._state = RemoteState.UP
        self._down_since = 0.0
        self._backoff = self._probe_min
        self._next_probe = 0.0
        self._metrics = metrics if metrics is not None else tier_metrics()
        self._c = TierCounters(self._metrics, self.tier, 0, COUNTS)
        self._events: dict[RemoteEvent, int] = dict.fromkeys(RemoteEvent, 0)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size))
        self._warned_write_error = False
        self._lua = True
        self._exists_script = self.client.register_script(EXISTS_LUA)
        self._holders_script = self.client.register_script(HOLDERS_LUA)
        self._adverts = self._advert_drops = 0
        self._pending_adverts: list[_Advert] = []
        try:
            self.client.ping()
        except redis.exceptions.RedisError as exc:
            self._mark_down(exc, at_start=True)
        else:
            log.info(
                "remote tier: %s, keys %s*, timeout %.3f s",
                self.url.redacted(),
                self.prefix,
                self.timeout_s,
            )
        self._thread = threading.Thread(target=self._run, name="lmcache-pd-remote", daemon=True)
        self._thread.start()

    # --- keys ---

    def redis_key(self, key: bytes) -> bytes:
        """The server-side key of chunk ``key``."""
        if not isinstance(key, (bytes, bytearray)) or not 1 <= len(key) <= 32:
            raise ValueError(f"chunk keys are 1..32 bytes, got {key!r:.80}")
        return self._prefix_b + bytes(key).hex().encode()

    def holder_key(self, key: bytes) -> bytes:
        """The server-side key of chunk ``key``'s holder entry (p2p index)."""
        if not isinstance(key, (bytes, bytearray)) or not 1 <= len(key) <= 32:
            raise ValueError(f"chunk keys are 1..32 bytes, got {key!r:.80}")
        return self._prefix_b + b"p2p:" + bytes(key).hex().encode()

    # --- state: up, down (with one warning), re-probe with backoff ---

    @property
    def state(self) -> RemoteState:
        return self._state

    @property
    def disabled(self) -> str | None:
        """Why the tier is off, or None while it is on."""
        return None if self._state is RemoteState.UP else self._state.value

    def _up(self) -> bool:
        return self._state is RemoteState.UP

    def _mark_down(self, exc: BaseException, *, at_start: bool = False) -> None:
        with self._lock:
            if self._state is not RemoteState.UP:
                return
            self._state = RemoteState.DOWN
            self._down_since = time.monotonic()
            self._backoff = self._probe_min
            self._next_probe = self._down_since + self._backoff
            self._events[RemoteEvent.DOWN_EVENTS] += 1
        cause = down_cause(exc)  # (redis-py drops the failed connection itself)
        log.warning(
            "remote tier %s %s (%s: %s); lmcache-pd goes on without it (misses are "
            "recomputed, writes dropped) and re-probes it with backoff (%g..%g s)",
            self.url.redacted(),
            "unreachable at start" if at_start else "turned off",
            cause.value,
            exc,
            self._probe_min,
            self._probe_max,
        )
        if not at_start:
            try:
                self._queue.put_nowait(_WAKE)  # the writer starts probing
            except queue.Full:
                pass  # it is busy and re-checks the state after its batch

    def _probe(self) -> None:
        with self._lock:
            self._events[RemoteEvent.PROBES] += 1
        try:
            self.client.ping()
        except redis.exceptions.RedisError as exc:
            with self._lock:
                self._backoff = min(self._backoff * 2, self._probe_max)
                self._next_probe = time.monotonic() + self._backoff
            log.debug("remote tier %s: still down (%s)", self.url.redacted(), exc)
            return
        with self._lock:
            if self._state is not RemoteState.DOWN:
                return
            self._state = RemoteState.UP
            self._events[RemoteEvent.RECOVERIES] += 1
            down_s = time.monotonic() - self._down_since
        log.info("remote tier %s: back after %.1f s", self.url.redacted(), down_s)

    def _probe_wait(self) -> float | None:
        with self._lock:
            if self._state is not RemoteState.DOWN:
                return None
            return max(0.0, self._next_probe - time.monotonic())

    # --- the writer thread: write-behind and probing ---

    def _run(self) -> None:
        while True:
            wait = self._probe_wait()
            try:
                item = self._queue.get(timeout=wait) if wait != 0.0 else self._queue.get_nowait()
            except queue.Empty:
                self._probe()
                continue
            if item is _STOP:
                self._queue.task_done()
                return
            if item is _WAKE:
                self._flush_adverts()
                self._queue.task_done()
                continue
            batch: list[_Write] = [item]
            nbytes = item.payload.nbytes
            stop = False
            while len(batch) < MAX_BATCH_ITEMS and nbytes < MAX_BATCH_BYTES:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                if nxt is _WAKE:
                    self._queue.task_done()
                    continue
                batch.append(nxt)
                nbytes += nxt.payload.nbytes
            try:
                self._write_batch(batch)
            except Exception:
                log.exception("remote tier: unexpected error writing %d chunks", len(batch))
            finally:
                self._flush_adverts()
                for w in batch:
                    _call_done(w)
                    self._queue.task_done()
            if stop:
                self._queue.task_done()
                return

    def _write_batch(self, batch: list[_Write]) -> None:
        if not self._up():
            self._drop(len(batch), DropReason.DISABLED)
            return
        rkeys = [self.redis_key(w.key) for w in batch]
        try:
            held = self._exists(rkeys)
            todo = [(w, rkey) for w, rkey, h in zip(batch, rkeys, held, strict=True) if not h]
            if len(todo) < len(batch):
                self._c.inc(Count.DUPLICATE_PUTS, len(batch) - len(todo))
            if not todo:
                return
            results = self._send_sets(todo)
        except redis.exceptions.RedisError as exc:
            self._mark_down(exc)
            self._drop(len(batch), DropReason.DISABLED)
            return
        written = 0
        failed: list[BaseException] = []
        for (w, _), res in zip(todo, results, strict=True):
            if isinstance(res, BaseException):
                failed.append(res)
            else:
                written += w.payload.nbytes
        self._c.inc(Count.BYTES_WRITTEN, written)
        self._c.inc(Count.WRITE_ERRORS, len(failed))
        self._c.inc(Count.DROPPED_WRITES, len(failed))
        with self._lock:
            warn = bool(failed) and not self._warned_write_error
            self._warned_write_error |= warn
        if warn:
            log.warning(
                "remote tier %s refused a write: %s (with maxmemory set, use "
                "maxmemory-policy allkeys-lru so the server evicts instead of refusing; "
                "further refusals are only counted)",
                self.url.redacted(),
                failed[0],
            )

    def _flush_adverts(self) -> None:
        """Write the pending holder entries: pipelined ``SET ... PX`` in one round trip
        (writer thread)."""
        with self._lock:
            pending, self._pending_adverts = self._pending_adverts, []
        if not pending or not self._up():
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for ad in pending:
                ttl_ms = max(1, int(ad.ttl_s * 1000))
                pipe.set(self.holder_key(ad.key), ad.endpoint, px=ttl_ms)
            pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as exc:
            self._mark_down(exc)
            return
        with self._lock:
            self._adverts += len(pending)

    def _send_sets(self, todo: list[tuple[_Write, bytes]]) -> list[object]:
        """Pipelined ``SET key <header><payload>`` without joining header and payload:
        each command goes out as separate buffers (the payload straight from the
        caller's memory), then all replies are read."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            for w, rkey in todo:
                payload = w.payload
                header = encode_header(
                    w.key, self.fingerprint, payload.nbytes, xxhash.xxh3_64_intdigest(payload)
                )
                size = HEADER_SIZE + payload.nbytes
                head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(rkey), rkey, size)
                if payload.nbytes <= SMALL_VALUE:
                    conn.send_packed_command([head + header + payload + b"\r\n"], False)
                else:
                    conn.send_packed_command([head + header, payload, b"\r\n"], False)
            results: list[object] = []
            for _ in todo:
                try:
                    results.append(conn.read_response())
                except redis.exceptions.ResponseError as exc:  # e.g. OOM: per command
                    results.append(exc)
            return results
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _drop(self, n: int, reason: DropReason) -> None:
        for _ in range(n):
            self._c.drop(reason)

    # --- writes ---

    def put(
        self,
        key: bytes,
        data: Buffer,
        on_written: Callable[[], None] | None = None,
        *,
        checksum: int = NO_CHECKSUM,
    ) -> bool:
        """Queue ``data`` for the server; False if dropped (tier off, queue full). Never
        waits on the network. Without ``on_written`` the bytes are copied. With it,
        ``data`` is borrowed: it must stay valid and unchanged until ``on_written()`` is
        called (exactly once, also when the write is dropped or fails).
        ``checksum``: the bytes are hashed first (a pass of their own) and nothing is
        queued unless they match (``ChecksumMismatch``, after ``on_written``; see
        :meth:`Store.put`)."""
        verify(data, checksum, "chunk put into the remote tier", on_written)
        item = _Write(bytes(key), as_byte_view(data), on_written)
        if not self._up():
            self._drop(1, DropReason.DISABLED)
            _call_done(item)
            return False
        if self._queue.full():
            self._drop(1, DropReason.QUEUE_FULL)
            _call_done(item)
            return False
        if on_written is None:
            item.payload = memoryview(item.payload.tobytes())
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._drop(1, DropReason.QUEUE_FULL)
            _call_done(item)
            return False
        return True

    def advertise(self, keys: Sequence[bytes], endpoint: str, ttl_s: float) -> bool:
        """Note holder entries: ``endpoint`` (a p2p endpoint) holds ``keys``, for
        ``ttl_s`` seconds; the writer thread sets them in batches. Never waits; False
        (counted) when the tier is off or too many are pending."""
        if not keys:
            return True
        if not self._up():
            return False
        ads = [_Advert(bytes(k), endpoint.encode(), float(ttl_s)) for k in keys]
        with self._lock:
            room = MAX_PENDING_ADVERTS - len(self._pending_adverts)
            self._advert_drops += max(0, len(ads) - room)
            wake = not self._pending_adverts
            self._pending_adverts += ads[: max(0, room)]
        if wake:
            try:
                self._queue.put_nowait(_WAKE)
            except queue.Full:
                pass  # the writer is busy and flushes them after its batch
        return room >= len(ads)

    def held_with_holders(self, keys: Sequence[bytes]) -> list[bool | str]:
        """Per key: True when the server holds the chunk, else the p2p endpoint its
        holder entry names, else False. One round trip (one ``EVALSHA``; a pipeline of
        ``EXISTS`` + ``GET`` where scripts are refused). All False while the tier is off."""
        if not keys:
            return []
        if not self._up():
            return [False] * len(keys)
        vkeys = [self.redis_key(key) for key in keys]
        hkeys = [self.holder_key(key) for key in keys]
        try:
            if self._lua:
                try:
                    raw = list(self._holders_script(keys=[*vkeys, *hkeys]))
                except redis.exceptions.ResponseError:
                    self._lua = False  # said once by _exists on its next call
                    raw = self._holders_pipelined(vkeys, hkeys)
            else:
                raw = self._holders_pipelined(vkeys, hkeys)
        except redis.exceptions.RedisError as exc:
            self._mark_down(exc)
            return [False] * len(keys)
        with self._lock:
            self._events[RemoteEvent.LOOKUPS] += 1
        out: list[bool | str] = []
        for value in raw:
            if isinstance(value, bytes):
                out.append(value.decode(errors="replace"))
            else:
                out.append(bool(value))
        return out

    def _holders_pipelined(self, vkeys: list[bytes], hkeys: list[bytes]) -> list[object]:
        pipe = self.client.pipeline(transaction=False)
        for vkey, hkey in zip(vkeys, hkeys, strict=True):
            pipe.exists(vkey)
            pipe.get(hkey)
        res = pipe.execute()
        return [1 if res[2 * i] else (res[2 * i + 1] or 0) for i in range(len(vkeys))]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done (written or dropped); False on timeout."""
        q = self._queue
        deadline = None if timeout is None else time.monotonic() + timeout
        with q.all_tasks_done:
            while q.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                q.all_tasks_done.wait(remaining)
        return True

    # --- reads ---

    def held(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether the server holds each of ``keys``: one round trip (pipelined
        ``EXISTS``, no values move). All False while the tier is off."""
        if not keys:
            return []
        if not self._up():
            return [False] * len(keys)
        try:
            found = self._exists([self.redis_key(key) for key in keys])
        except redis.exceptions.RedisError as exc:
            self._mark_down(exc)
            return [False] * len(keys)
        with self._lock:
            self._events[RemoteEvent.LOOKUPS] += 1
        return [bool(n) for n in found]

    def _exists(self, rkeys: list[bytes]) -> list[int]:
        """Per-key existence in one round trip: one ``EVALSHA`` of :data:`EXISTS_LUA`, or
        a pipeline of ``EXISTS`` where the server refuses scripts (said once)."""
        if self._lua:
            try:
                return [int(n) for n in self._exists_script(keys=rkeys)]
            except redis.exceptions.ResponseError as exc:  # scripting off or not allowed
                self._lua = False
                log.warning(
                    "remote tier %s refuses Lua scripts (%s): lookups use a pipeline of "
                    "EXISTS instead (still one round trip, more client CPU)",
                    self.url.redacted(),
                    exc,
                )
        pipe = self.client.pipeline(transaction=False)
        for rkey in rkeys:
            pipe.exists(rkey)
        return [int(n) for n in pipe.execute()]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (bytes, bytearray)):
            return False
        return self.held([bytes(key)])[0]

    def contains(self, keys: Sequence[bytes]) -> int:
        """Length of the longest prefix of ``keys`` held (one round trip)."""
        n = 0
        for hit in self.held(keys):
            if not hit:
                break
            n += 1
        return n

    def get_many(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        """The chunks of ``keys`` (checksum verified) in one round trip; None for each
        miss. A corrupt, truncated or foreign value is a miss and is deleted."""
        if not keys:
            return []
        if not self._up():
            self._count_misses(len(keys))
            return [None] * len(keys)
        rkeys = [self.redis_key(k) for k in keys]
        try:
            pipe = self.client.pipeline(transaction=False)
            for rkey in rkeys:
                pipe.get(rkey)
            values = pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as exc:
            self._mark_down(exc)
            self._count_misses(len(keys))
            return [None] * len(keys)
        out: list[memoryview | None] = []
        bad: list[tuple[bytes, HeaderProblem]] = []
        hits = nbytes = 0
        for key, rkey, value in zip(keys, rkeys, values, strict=True):
            if value is None:
                out.append(None)
                continue
            if isinstance(value, redis.exceptions.ResponseError):  # e.g. WRONGTYPE
                why = HeaderProblem(f"cannot be read as a chunk ({value})", Fault.NOT_A_CHUNK)
                bad.append((rkey, why))
                out.append(None)
                continue
            if isinstance(value, BaseException):
                self._mark_down(value)
                out.append(None)
                continue
            view = memoryview(value)
            problem = self._check(key, view)
            if problem is not None:
                bad.append((rkey, problem))
                out.append(None)
                continue
            payload = view[HEADER_SIZE:]
            out.append(payload)
            hits += 1
            nbytes += payload.nbytes
        self._c.inc(Count.HITS, hits)
        self._c.inc(Count.MISSES, len(keys) - hits)
        self._c.inc(Count.BYTES_READ, nbytes)
        if bad:
            self._delete_corrupt(bad)
        return out

    def _check(self, key: bytes, view: memoryview) -> HeaderProblem | None:
        parsed = parse_header(view[:HEADER_SIZE], key, view.nbytes, self.fingerprint)
        if isinstance(parsed, HeaderProblem):
            return parsed
        _, checksum = parsed
        if xxhash.xxh3_64_intdigest(view[HEADER_SIZE:]) != checksum:
            return HeaderProblem("checksum mismatch (xxh3-64)", Fault.CHECKSUM)
        return None

    def _delete_corrupt(self, bad: list[tuple[bytes, HeaderProblem]]) -> None:
        self._c.inc(Count.CORRUPT_FILES, len(bad))
        self._c.inc(Count.FOREIGN_FILES, sum(why.fault is Fault.FOREIGN for _, why in bad))
        for rkey, why in bad:
            log.warning(
                "remote tier: value %s %s; deleting it and counting a miss (the chunk is "
                "recomputed)",
                rkey.decode(),
                why,
            )
        try:
            self.client.delete(*[rkey for rkey, _ in bad])
        except redis.exceptions.RedisError as exc:
            self._mark_down(exc)

    def _count_misses(self, n: int) -> None:
        self._c.inc(Count.MISSES, n)

    def get(self, key: bytes) -> memoryview | None:
        return self.get_many([key])[0]

    # --- the rest of Store ---

    def evict(self, key: bytes) -> bool:
        """Delete ``key`` from the server (shared: other engines lose it too)."""
        if not self._up():
            return False
        try:
            return bool(self.client.delete(self.redis_key(key)))
        except redis.exceptions.RedisError as exc:
            self._mark_down(exc)
            return False

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self._c.snapshot())
        with self._lock:
            out.update({event.value: n for event, n in self._events.items()})
            out.update(holder_adverts=self._adverts, holder_advert_drops=self._advert_drops)
        out.update(queued=self._queue.qsize(), disabled=int(self._state is not RemoteState.UP))
        return out

    def close(self) -> None:
        """Finish queued writes (bounded by the timeout per batch), stop the writer."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
        with self._lock:
            self._state = RemoteState.CLOSED
        self.client.close()
