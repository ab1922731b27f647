"""The disk tier: one checksummed file per chunk, written behind, LRU by size.

File format (little endian), ``<hex of key>.kv`` directly in the tier's directory::

    offset  size  field
    0       4     magic b"LPDK"
    4       2     format version (1)
    6       2     header size (80)
    8       1     key length (1..32)
    9       3     reserved (0)
    12      32    key, zero padded
    44      16    layout fingerprint (KVLayout.fingerprint())
    60      8     payload length in bytes
    68      8     xxh3-64 of the payload
    76      4     reserved (0)
    80      ...   payload (the chunk's bytes)

Writes go through a bounded queue to one writer thread (write-behind): a full queue drops
the write and counts it, the engine never blocks. A file is written under a temporary
name and renamed into place, so readers see either no file or a whole one; the checksum
catches anything a crash or a bad disk leaves behind. A corrupt, truncated or foreign
(other layout fingerprint) file is a miss: it is deleted, counted and logged. The index
is rebuilt from the directory on start (headers checked, LRU order from mtimes, which
hits refresh). File names come from the key's hex digits only and are opened with
``O_NOFOLLOW``, so no key reaches outside the directory. When the directory is missing
and cannot be created, or a write fails (disk full, read-only, permissions), the tier
disables itself with one error line and every call becomes a miss; the CPU tier keeps
serving. ``fsync`` is off by default (the checksum makes a torn file a miss, not a bad
load); turn it on for durability across power loss.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import itertools
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from pathlib import Path

import xxhash

from lmcache_pd.protocol import NO_CHECKSUM
from lmcache_pd.tiers.base import Buffer, Store, verify
from lmcache_pd.tiers.cpu import as_byte_view
from lmcache_pd.tiers.metrics import Count, DropReason, TierCounters, TierMetrics, tier_metrics

log = logging.getLogger(__name__)

MAGIC = b"LPDK"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHB3x32s16sQQ4x")
HEADER_SIZE = HEADER.size  # 80
MAX_KEY_BYTES = 32
SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"
BLOCK = 1 << 20  # read/write + hash granularity: keeps the hashed block in cache
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# errnos that mean "no room": the disk or quota is full, or the file would be too large
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

Done = Callable[[], None]


def encode_header(key: bytes, fingerprint: bytes, length: int, checksum: int) -> bytes:
    return HEADER.pack(
        MAGIC, FORMAT_VERSION, HEADER_SIZE, len(key), key, fingerprint, length, checksum
    )


class Fault(str, enum.Enum):
    """What is wrong with a stored chunk entry."""

    UNREADABLE = "unreadable"  # cannot be opened or read
    TRUNCATED = "truncated"  # shorter (or longer) than its header says
    NOT_A_CHUNK = "not_a_chunk"  # bad magic
    VERSION = "version"  # another format version
    KEY_MISMATCH = "key_mismatch"  # the header names another key
    FOREIGN = "foreign"  # written for another layout (fingerprint)
    SYMLINK = "symlink"  # a symlink where a chunk file belongs
    CHECKSUM = "checksum"  # payload checksum mismatch


class HeaderProblem(str):
    """Why an entry is not valid: the message (a ``str``, so callers can log it as is)
    and its :class:`Fault` (what callers branch on)."""

    fault: Fault

    def __new__(cls, message: str, fault: Fault) -> HeaderProblem:
        self = super().__new__(cls, message)
        self.fault = fault
        return self


def parse_header(
    head: bytes | memoryview, key: bytes, size: int, fingerprint: bytes
) -> tuple[int, int] | HeaderProblem:
    """Check a chunk header (the first ``HEADER_SIZE`` bytes of an entry of ``size``
    bytes in all) for ``key`` and the layout ``fingerprint``: ``(payload length,
    xxh3-64 checksum)``, or why it is not a valid entry. Shared by the disk and remote
    tiers."""
    if len(head) < HEADER_SIZE:
        return HeaderProblem(
            f"truncated header ({len(head)} of {HEADER_SIZE} bytes)", Fault.TRUNCATED
        )
    magic, version, hsize, klen, kfield, fp, length, checksum = HEADER.unpack(head)
    if magic != MAGIC:
        return HeaderProblem("not a chunk file (bad magic)", Fault.NOT_A_CHUNK)
    if version != FORMAT_VERSION or hsize != HEADER_SIZE:
        return HeaderProblem(
            f"format version {version} (header {hsize}), expected {FORMAT_VERSION}",
            Fault.VERSION,
        )
    if klen != len(key) or kfield[:klen] != key:
        return HeaderProblem("key in header does not match the file name", Fault.KEY_MISMATCH)
    if fp != fingerprint:
        return HeaderProblem(
            f"written for another layout (fingerprint {fp.hex()}, ours {fingerprint.hex()})",
            Fault.FOREIGN,
        )
    if size != HEADER_SIZE + length:
        return HeaderProblem(
            f"truncated or padded: {size} bytes on disk, header says {HEADER_SIZE + length}",
            Fault.TRUNCATED,
        )
    return length, checksum


def _check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"chunk keys are bytes, got {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"chunk key must be 1..{MAX_KEY_BYTES} bytes, got {len(key)}")
    return bytes(key)


def key_from_name(name: str) -> bytes | None:
    """The key a file name ``<hex>.kv`` stands for, or None if it is not one of ours."""
    if not name.endswith(SUFFIX):
        return None
    stem = name[: -len(SUFFIX)]
    if not 2 <= len(stem) <= 2 * MAX_KEY_BYTES or len(stem) % 2:
        return None
    try:
        key = bytes.fromhex(stem)
    except ValueError:
        return None
    return key if key.hex() == stem else None


class DiskStore(Store):
    """Checksummed one-file-per-chunk store under ``path``, at most ``capacity_bytes``
    (headers included), for chunks of the layout with ``fingerprint``."""

    tier = "disk"

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        fingerprint: bytes,
        *,
        queue_size: int = 64,
        fsync: bool = False,
        verify_on_start: bool = True,
        metrics: TierMetrics | None = None,
    ) -> None:
        if len(fingerprint) != 16:
            raise ValueError(f"layout fingerprint must be 16 bytes, got {len(fingerprint)}")
        self.fingerprint = bytes(fingerprint)
        self.capacity_bytes = int(capacity_bytes)
        self.fsync = fsync
        self.root = Path(os.path.abspath(os.fspath(path)))
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size
        self._pending: set[bytes] = set()
        self._used = 0
        self._disabled: str | None = None
        self._tmp_ids = itertools.count()
        self._metrics = metrics if metrics is not None else tier_metrics()
        self._counts = TierCounters(
            self._metrics,
            self.tier,
            self.capacity_bytes,
            (
                Count.HITS,
                Count.MISSES,
                Count.BYTES_WRITTEN,
                Count.BYTES_READ,
                Count.EVICTIONS,
                Count.DROPPED_WRITES,
                Count.QUEUE_FULL_DROPS,
                Count.REJECTED_TOO_LARGE,
                Count.DUPLICATE_PUTS,
                Count.CORRUPT_FILES,
                Count.FOREIGN_FILES,
                Count.WRITE_ERRORS,
                Count.FILES_LOADED,
            ),
        )
        self._queue: queue.Queue[tuple[bytes, memoryview, Done | None] | None] = queue.Queue(
            maxsize=max(1, queue_size)
        )
        self._open(verify_on_start)
        self._thread = threading.Thread(target=self._writer, name="lmcache-pd-disk", daemon=True)
        self._thread.start()

    # --- start-up: directory, probe, index rebuild ---

    def _open(self, verify: bool) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.root = self.root.resolve()
            probe = self.root / f"{TMP_PREFIX}probe-{os.getpid()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _OPEN_FLAGS, 0o644)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            self._disable(f"cannot use the directory: {exc}", exc.errno)
            return
        t0 = time.perf_counter()
        found: list[tuple[int, bytes, int]] = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name.startswith(TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)  # left by a crash mid-write
                    continue
                key = key_from_name(entry.name)
                if key is None:
                    continue  # not ours: left alone
                if entry.is_symlink():
                    link = HeaderProblem("is a symlink", Fault.SYMLINK)
                    self._corrupt(key, Path(entry.path), link, miss=False)
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                if verify:
                    problem = self._check_file(entry.path, key, st.st_size)
                    if problem is not None:
                        self._corrupt(key, Path(entry.path), problem, miss=False)
                        continue
                found.append((st.st_mtime_ns, key, st.st_size))
        found.sort()
        victims: list[bytes] = []
        with self._lock:
            for _, key, size in found:
                self._index[key] = size
                self._used += size
            self._counts.set(Count.FILES_LOADED, len(found))
            victims = self._make_room_locked(0)
            self._update_gauges_locked()
        self._unlink_all(victims)
        if found:
            log.info(
                "disk tier %s: index rebuilt with %d chunk files (%.3f GB) in %.2f s",
                self.root,
                len(found),
                self._used / 1e9,
                time.perf_counter() - t0,
            )

    def _check_file(self, path: str, key: bytes, size: int) -> HeaderProblem | None:
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except OSError as exc:
            return HeaderProblem(f"cannot open: {exc.strerror}", Fault.UNREADABLE)
        try:
            head = os.pread(fd, HEADER_SIZE, 0)
        finally:
            os.close(fd)
        parsed = self._parse_header(head, key, size)
        return parsed if isinstance(parsed, HeaderProblem) else None

    def _parse_header(self, head: bytes, key: bytes, size: int) -> tuple[int, int] | HeaderProblem:
        return parse_header(head, key, size, self.fingerprint)

    # --- paths ---

    def path_for(self, key: bytes | str) -> Path:
        """The file of ``key`` (bytes, or its hex string). Raises ValueError for anything
        that is not a key; the result is always directly inside the tier's directory."""
        if isinstance(key, str):
            try:
                raw = bytes.fromhex(key)
            except ValueError:
                raise ValueError(f"not a chunk key (hex expected): {key!r}") from None
            key = raw
        name = _check_key(key).hex() + SUFFIX
        path = self.root / name
        if os.path.dirname(os.path.normpath(path)) != str(self.root):
            raise ValueError(f"chunk path escapes the disk tier directory: {path}")
        return path

    # --- write-behind ---

    def put(
        self,
        key: bytes,
        data: Buffer,
        on_written: Done | None = None,
        *,
        checksum: int = NO_CHECKSUM,
    ) -> bool:
        """Queue a write of ``data`` under ``key``; False if dropped. Without
        ``on_written`` the bytes are copied. With it, ``data`` is borrowed: it must stay
        valid and unchanged until ``on_written()`` is called (exactly once, also when the
        write is dropped or fails).
        ``checksum``: the bytes are hashed first (a pass of their own) and nothing is
        queued unless they match (``ChecksumMismatch``, after ``on_written``; see
        :meth:`Store.put`)."""
        verify(data, checksum, "chunk put into the disk tier", on_written)
        key = _check_key(key)
        view = as_byte_view(data)
        reason: DropReason | None = None
        duplicate = False
        with self._lock:
            if self._disabled is not None:
                reason = DropReason.DISABLED
            elif key in self._index or key in self._pending:
                self._counts.inc(Count.DUPLICATE_PUTS)
                duplicate = True
            elif HEADER_SIZE + view.nbytes > self.capacity_bytes:
                reason = DropReason.TOO_LARGE
            elif self._queue.full():
                reason = DropReason.QUEUE_FULL
            else:
                self._pending.add(key)
        if duplicate or reason is not None:
            if on_written is not None:
                on_written()
            if reason is None:
                return True  # already held or queued
            self._counts.drop(reason)
            return False
        if on_written is None:
            view = memoryview(view.tobytes())
        try:
            self._queue.put_nowait((key, view, on_written))
        except queue.Full:
            with self._lock:
                self._pending.discard(key)
            if on_written is not None:
                on_written()
            self._counts.drop(DropReason.QUEUE_FULL)
            return False
        return True

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            key, view, done = item
            try:
                if self._disabled is None:
                    self._write(key, view)
            except OSError as exc:
                self._counts.inc(Count.WRITE_ERRORS)
                self._disable(f"writing {key.hex()}{SUFFIX} failed: {exc}", exc.errno)
            except Exception:
                log.exception("disk tier: unexpected error writing %s", key.hex())
            finally:
                with self._lock:
                    self._pending.discard(key)
                if done is not None:
                    try:
                        done()
                    except Exception:
                        log.exception("disk tier: on_written callback failed")
                self._queue.task_done()

    def _write(self, key: bytes, view: memoryview) -> None:
        length = view.nbytes
        size = HEADER_SIZE + length
        with self._lock:
            victims = self._make_room_locked(size)
        self._unlink_all(victims)
        final = self.path_for(key)
        tmp = self.root / f"{TMP_PREFIX}{key.hex()}-{os.getpid()}-{next(self._tmp_ids)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644)
        try:
            try:
                hasher = xxhash.xxh3_64()
                pos = 0
                while pos < length:
                    block = view[pos : pos + BLOCK]
                    hasher.update(block)
                    _pwrite_all(fd, block, HEADER_SIZE + pos)
                    pos += block.nbytes
                header = encode_header(key, self.fingerprint, length, hasher.intdigest())
                _pwrite_all(fd, memoryview(header), 0)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._used -= old
            self._index[key] = size
            self._used += size
            self._counts.inc(Count.BYTES_WRITTEN, length)
            self._update_gauges_locked()

    def _make_room_locked(self, size: int) -> list[bytes]:
        victims: list[bytes] = []
        while self._index and self._used + size > self.capacity_bytes:
            key, old = self._index.popitem(last=False)
            self._used -= old
            victims.append(key)
        if victims:
            self._counts.inc(Count.EVICTIONS, len(victims))
            self._update_gauges_locked()
        return victims

    def _unlink_all(self, keys: list[bytes]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                try:
                    os.unlink(self.path_for(key))
                except OSError as exc:
                    log.warning("disk tier: cannot delete %s: %s", key.hex(), exc)

    def _update_gauges_locked(self) -> None:
        self._counts.gauges(self._used, len(self._index))

    def _disable(self, why: str, err: int | None = None) -> None:
        """Stop using the tier (``why`` is logged; ``err`` is the errno that caused it,
        if an OSError did)."""
        with self._lock:
            if self._disabled is not None:
                return
            self._disabled = why
            self._index.clear()
            self._used = 0
            self._update_gauges_locked()
        hint = ""
        if err in _DISK_FULL:
            hint = " (the disk is full: free space or lower max_local_disk_size)"
        log.error(
            "disk tier at %s disabled: %s%s. lmcache-pd keeps serving from the CPU tier "
            "without disk; fix the directory (or unset local_disk) and restart to re-enable "
            "it.",
            self.root,
            why,
            hint,
        )

    @property
    def disabled(self) -> str | None:
        """Why the tier disabled itself, or None while it works."""
        return self._disabled

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done; False on timeout."""
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

    def __contains__(self, key: object) -> bool:
        return self._disabled is None and key in self._index

    def _membership(self) -> Container[object]:
        return self._index if self._disabled is None else ()

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: bytes) -> memoryview | None:
        """The chunk (a fresh writable buffer), checksum verified; None on a miss."""
        return self._read(key, None)

    def get_into(self, key: bytes, out: Buffer) -> int | None:
        view = self._read(key, as_byte_view(out))
        return None if view is None else view.nbytes

    def _miss(self) -> None:
        self._counts.inc(Count.MISSES)

    def _read(self, key: bytes, out: memoryview | None) -> memoryview | None:
        if self._disabled is not None or key not in self._index:
            self._miss()
            return None
        path = self.path_for(key)
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            with self._lock:
                size = self._index.pop(key, None)
                if size is not None:
                    self._used -= size
            self._miss()
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._corrupt(key, path, HeaderProblem("is a symlink", Fault.SYMLINK))
            else:
                log.warning("disk tier: cannot open %s: %s (a miss)", path, exc)
                self._miss()
            return None
        try:
            parsed = self._parse_header(os.pread(fd, HEADER_SIZE, 0), key, os.fstat(fd).st_size)
            if isinstance(parsed, HeaderProblem):
                self._corrupt(key, path, parsed)
                return None
            length, checksum = parsed
            if out is None:
                dst = memoryview(bytearray(length))
            elif out.nbytes < length:
                raise ValueError(f"buffer of {out.nbytes} bytes is too small for {length}")
            else:
                dst = out[:length]
            hasher = xxhash.xxh3_64()
            pos = 0
            while pos < length:
                block = dst[pos : pos + BLOCK]
                got = os.preadv(fd, [block], HEADER_SIZE + pos)
                if got <= 0:
                    problem = HeaderProblem("truncated while reading", Fault.TRUNCATED)
                    self._corrupt(key, path, problem)
                    return None
                hasher.update(block[:got])
                pos += got
        finally:
            os.close(fd)
        if hasher.intdigest() != checksum:
            self._corrupt(key, path, HeaderProblem("checksum mismatch (xxh3-64)", Fault.CHECKSUM))
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            self._counts.inc(Count.HITS)
            self._counts.inc(Count.BYTES_READ, length)
        with contextlib.suppress(OSError):
            os.utime(path)  # keeps the LRU order across restarts
        return dst

    def _corrupt(self, key: bytes, path: Path, why: HeaderProblem, miss: bool = True) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size
            self._counts.inc(Count.CORRUPT_FILES)
            if miss:
                self._counts.inc(Count.MISSES)
            if why.fault is Fault.FOREIGN:
                self._counts.inc(Count.FOREIGN_FILES)
            self._update_gauges_locked()
        log.warning(
            "disk tier: %s %s; deleted it%s",
            path,
            why,
            " and counted a miss (the chunk is recomputed or resent)" if miss else "",
        )

    def keys_lru(self) -> list[bytes]:
        """Held keys, least recently used first."""
        with self._lock:
            return list(self._index)

    # --- eviction, stats, close ---

    def evict(self, key: bytes) -> bool:
        with self._lock:
            size = self._index.pop(key, None)
            if size is None:
                return False
            self._used -= size
            self._update_gauges_locked()
        self._unlink_all([key])
        return True

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            out: dict[str, int | float] = dict(self._counts.snapshot())
            out.update(
                entries=len(self._index),
                used_bytes=self._used,
                capacity_bytes=self.capacity_bytes,
                queued=self._queue.qsize(),
                disabled=int(self._disabled is not None),
            )
        return out

    def close(self) -> None:
        """Finish queued writes and stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        data = data[n:]
        offset += n
