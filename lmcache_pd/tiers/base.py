"""The Store interface every tier implements (CPU, disk) and that the receiver consults.

A store maps a 16-byte chunk key (see ``lmcache_pd.chunks``) to the bytes of one chunk in
the chunk format (see ``lmcache_pd.layout``). Stores are thread-safe.

A put may carry the chunk's expected ``kvsum64`` digest (``checksum``; see
``lmcache_pd.checksum``): the bytes are then stored only if they hash to it, and
:func:`verify` is the check for a tier that does not hash inside its own copy.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Container, Iterator, Sequence
from types import ModuleType

from lmcache_pd.chunks import longest_prefix
from lmcache_pd.protocol import NO_CHECKSUM

Buffer = bytes | bytearray | memoryview


def _kvsum() -> ModuleType:
    """:mod:`lmcache_pd.checksum` (it loads torch: only where a digest is checked)."""
    from lmcache_pd import checksum

    return checksum


def mismatch(expected: int, got: int, what: str) -> Exception:
    """The ``lmcache_pd.checksum.ChecksumMismatch`` a checked put raises."""
    return _kvsum().ChecksumMismatch(expected, got, what)


def verify(
    data: Buffer, checksum: int, what: str = "chunk", on_fail: Callable[[], None] | None = None
) -> None:
    """Raise ``lmcache_pd.checksum.ChecksumMismatch`` unless ``data`` hashes to
    ``checksum`` (``NO_CHECKSUM``: nothing to check). A pass over the bytes of its own:
    the CPU tier hashes inside its copy instead (:func:`copy_hashed`). ``on_fail`` is
    called before anything is raised (a put that borrows ``data`` hands it back)."""
    if checksum == NO_CHECKSUM:
        return
    try:
        got = _kvsum().chunk_digest(data)
        if got != checksum:
            raise mismatch(checksum, got, what)
    except BaseException:
        if on_fail is not None:
            on_fail()
        raise


def copy_hashed(dst: memoryview, src: memoryview, checksum: int) -> int:
    """Copy ``src`` into ``dst`` (equal sizes); with a ``checksum`` to check, hash the
    bytes in that same copy and return their digest (else ``NO_CHECKSUM``)."""
    if checksum == NO_CHECKSUM:
        dst[:] = src
        return NO_CHECKSUM
    return _kvsum().chunk_copy_digest(dst, src)


class Store(abc.ABC):
    """A key -> chunk-bytes store with bounded size."""

    @abc.abstractmethod
    def put(self, key: bytes, data: Buffer, *, checksum: int = NO_CHECKSUM) -> bool:
        """Store a copy of ``data`` under ``key``. Returns False if it was not stored
        (too large, tier disabled, queue full). Never blocks on I/O for long.

        ``checksum``: the chunk's expected digest (``NO_CHECKSUM``: not checked). The
        bytes are then stored only if they hash to it: a tier that copies them hashes
        in that copy (the CPU tier), others hash first (:func:`verify`). A mismatch
        stores nothing in any tier (a slot taken for it is freed, nothing is published
        or queued) and raises ``lmcache_pd.checksum.ChecksumMismatch``; a return, True
        or False, means the bytes matched (also when nothing was copied: held already,
        no room)."""

    @abc.abstractmethod
    def get(self, key: bytes) -> bytes | memoryview | None:
        """The chunk's bytes, or None on a miss (a corrupt entry is a miss)."""

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is held (cheap; no I/O beyond an index lookup)."""

    def contains(self, keys: Sequence[bytes]) -> int:
        """Length of the longest prefix of ``keys`` held in this store."""
        return longest_prefix(keys, self._membership())

    def _membership(self) -> Container[object]:
        """What ``key in`` is asked of for each key by :meth:`contains`: the store
        itself; a tier with a plain in-memory index returns the index (no method call
        per key), an unavailable tier an empty container."""
        return self

    @abc.abstractmethod
    def evict(self, key: bytes) -> bool:
        """Drop ``key``; returns whether it was held."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int | float]:
        """Counters: hits, misses, bytes, evictions, ..."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, registrations, files)."""

    # --- zero-copy and copy-into access (additive; defaults built on ``get``) ---

    def get_into(self, key: bytes, out: Buffer) -> int | None:
        """Copy the chunk into ``out`` (writable, large enough); its length, or None."""
        data = self.get(key)
        if data is None:
            return None
        n = len(data)
        memoryview(out).cast("B")[:n] = memoryview(data).cast("B")
        return n

    def acquire(self, key: bytes) -> memoryview | None:
        """A read-only view of the chunk that stays valid (pinned against eviction and
        reuse) until :meth:`release` is called with the same key; None on a miss."""
        data = self.get(key)
        return None if data is None else memoryview(data).toreadonly()

    def acquire_many(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        """:meth:`acquire` of each of ``keys`` (a tier behind a network batches them
        into one round trip); release each non-None."""
        return [self.acquire(key) for key in keys]

    def release(self, key: bytes) -> None:  # noqa: B027 - optional hook
        """Undo one :meth:`acquire` of ``key``."""

    @contextlib.contextmanager
    def pinned(self, key: bytes) -> Iterator[memoryview | None]:
        """``with store.pinned(key) as view:`` -- :meth:`acquire` then :meth:`release`."""
        view = self.acquire(key)
        try:
            yield view
        finally:
            if view is not None:
                self.release(key)
