"""The tiered store (CPU over disk over remote), its factory from config, prompt lookup
and the LMCache-style log lines.

:class:`TieredStore` is the one :class:`~lmcache_pd.tiers.base.Store` the receiver and the
vLLM connector hold. A put lands in the CPU tier and is written behind to disk (the disk
writer reads the CPU slot in place, pinned, so no extra copy) and to the remote tier (a
Redis/Valkey server shared across hosts; see :mod:`lmcache_pd.tiers.remote`); a get is
served from CPU, else from disk, else from remote, and a disk or remote hit is promoted
(copied up) into the CPU tier. A lookup of a prompt returns the longest prefix of its chunk
keys held in any tier: CPU and disk are index lookups, the remote tier is asked about the
keys they lack in one round trip. :meth:`TieredStore.acquire_many` fetches every remote
chunk of a load in one round trip. With peer-to-peer fetch on (:meth:`TieredStore.set_holder`)
every chunk that lands in the CPU tier is advertised in the remote tier's holder index, and
:meth:`TieredStore.lookup_holders` returns, in the lookup's one round trip, which peer
holds the chunks no tier has.
:func:`build_tiers` builds it from a :class:`~lmcache_pd.config.Config` and a
:class:`~lmcache_pd.layout.KVLayout`.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry

from lmcache_pd.chunks import ChunkHasher, chunk_spans
from lmcache_pd.protocol import NO_CHECKSUM
from lmcache_pd.tiers.base import Buffer, Store, verify
from lmcache_pd.tiers.cpu import CPUStore
from lmcache_pd.tiers.disk import DiskStore
from lmcache_pd.tiers.metrics import TierMetrics, tier_metrics
from lmcache_pd.tiers.remote import RemoteStore
from lmcache_pd.tiers.remote_url import RemoteURLError, parse_remote_url

if TYPE_CHECKING:
    from lmcache_pd.config import Config
    from lmcache_pd.layout import KVLayout

log = logging.getLogger("lmcache_pd")


def log_store(
    stored_tokens: int,
    total_tokens: int,
    nbytes: int,
    seconds: float,
    logger: logging.Logger | None = None,
) -> str:
    """Log (INFO) and return LMCache's store line:
    ``Stored 31 out of total 31 tokens. size: 0.0038 gb, cost 1.9182 ms, throughput: 1.98 GB/s``.
    """
    gbps = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    msg = (
        f"Stored {stored_tokens} out of total {total_tokens} tokens. "
        f"size: {nbytes / 1e9:.4f} gb, cost {seconds * 1e3:.4f} ms, "
        f"throughput: {gbps:.2f} GB/s"
    )
    (logger or log).info(msg)
    return msg


def log_lookup(
    total_tokens: int,
    hit_tokens: int,
    num_computed_tokens: int = 0,
    logger: logging.Logger | None = None,
) -> str:
    """Log (INFO) and return LMCache's lookup line:
    ``Total tokens 32, hit tokens: 24, need to load: 8`` (hits beyond what the engine
    already computed, ``num_computed_tokens``)."""
    need = max(hit_tokens - num_computed_tokens, 0)
    msg = f"Total tokens {total_tokens}, hit tokens: {hit_tokens}, need to load: {need}"
    (logger or log).info(msg)
    return msg


class LookupResult(msgspec.Struct, frozen=True):
    """A prompt's lookup: its chunk keys, how many lead chunks are held, as tokens."""

    keys: list[bytes]
    hit_chunks: int
    hit_tokens: int
    total_tokens: int

    @property
    def hit_keys(self) -> list[bytes]:
        return self.keys[: self.hit_chunks]


class TieredStore(Store):
    """CPU tier over disk tier over remote tier, any of which may be absent (not all);
    promotes disk and remote hits into CPU."""

    def __init__(
        self,
        cpu: CPUStore | None,
        disk: DiskStore | None,
        remote: RemoteStore | None = None,
        *,
        promote: bool = True,
        metrics: TierMetrics | None = None,
    ) -> None:
        if cpu is None and disk is None and remote is None:
            raise ValueError("a TieredStore needs a CPU, disk or remote tier")
        self.cpu = cpu
        self.disk = disk
        self.remote = remote
        self.promote = promote
        self._lock = threading.Lock()
        self._fallback: collections.Counter[bytes] = collections.Counter()
        self._promotions = 0
        self._wb_pins = 0
        # Write-behind reads CPU slots in place (pinned); at most half the slots may be
        # pinned that way so the CPU tier always has room for new chunks. Beyond that the
        # disk write gets its own copy.
        self.max_write_pins = max(1, cpu.num_slots // 2) if cpu is not None else 0
        self._metrics = metrics if metrics is not None else tier_metrics()
        self._m_promotions = {
            tier: self._metrics.promotions.labels(tier=tier) for tier in ("disk", "remote")
        }
        self._remote_promotions = 0
        self._holder: tuple[str, float] | None = None  # (p2p endpoint, entry TTL)

    def set_holder(self, endpoint: str, ttl_s: float) -> None:
        """Advertise chunks that land in the CPU tier, and those read from it, as held by
        the p2p ``endpoint`` (an entry expires ``ttl_s`` after its chunk was last stored
        or read here); needs the remote tier."""
        self._holder = (endpoint, ttl_s)

    def _advertise(self, key: bytes) -> None:
        holder, remote = self._holder, self.remote
        if holder is not None and remote is not None and remote.disabled is None:
            remote.advertise([key], holder[0], holder[1])

    # --- writes ---

    def put(self, key: bytes, data: Buffer, *, checksum: int = NO_CHECKSUM) -> bool:
        """Copy into the CPU tier and queue write-behinds to disk and remote (both read
        the CPU slot in place, pinned, while pins are available; else they copy). True
        when held by (or queued for) at least one tier. A chunk the CPU tier already held
        (put before, or promoted from disk or remote) is not sent to the remote again.

        ``checksum`` (see :meth:`Store.put`): the CPU tier hashes the bytes in its copy
        (without a CPU tier they are hashed first); a mismatch raises
        ``ChecksumMismatch`` before anything reaches disk or remote."""
        cpu, disk, remote = self.cpu, self.disk, self.remote
        known = cpu is not None and key in cpu
        if cpu is not None:
            stored = cpu.put(key, data, checksum=checksum)  # raises on a mismatch
        else:
            verify(data, checksum, "chunk put into the tiers")
            stored = False
        if stored and not known:
            self._advertise(key)
        queued = False
        if disk is not None and disk.disabled is None and key not in disk:
            view = self._lend(key) if stored else None
            if view is not None:
                queued = disk.put(key, view, on_written=lambda: self._unpin_written(cpu, key))
            else:
                queued = disk.put(key, data)
        if remote is not None and remote.disabled is None and not known:
            view = self._lend(key) if stored else None
            if view is not None:
                ok = remote.put(key, view, on_written=lambda: self._unpin_written(cpu, key))
            else:
                ok = remote.put(key, data)
            queued = ok or queued
        return stored or queued

    def _lend(self, key: bytes) -> memoryview | None:
        """The CPU slot of ``key`` pinned for a write-behind (release with
        :meth:`_unpin_written`), or None when no pin is free."""
        cpu = self.cpu
        if cpu is None:
            return None
        with self._lock:
            room = self._wb_pins < self.max_write_pins
            self._wb_pins += room
        if not room:
            return None
        view = cpu.acquire(key, record=False)
        if view is None:
            self._unpin_written(None, key)
        return view

    def _unpin_written(self, cpu: CPUStore | None, key: bytes) -> None:
        with self._lock:
            self._wb_pins -= 1
        if cpu is not None:
            cpu.release(key)

    # --- reads ---

    def _local(self, key: object) -> bool:
        return (self.cpu is not None and key in self.cpu) or (
            self.disk is not None and key in self.disk
        )

    def __contains__(self, key: object) -> bool:
        """Held in the CPU or disk tier: an index lookup, never a network call (callers
        test keys one by one, some under locks). :meth:`contains` also asks the remote
        tier, once per prompt."""
        return self._local(key)

    def contains(self, keys: Sequence[bytes]) -> int:
        """Longest prefix of ``keys`` held in any tier: CPU and disk by index, then the
        keys past their prefix are asked of the remote tier in one round trip."""
        n = self._contains_local(keys)
        remote = self.remote
        if n == len(keys) or remote is None or remote.disabled is not None:
            return n
        rest = keys[n:]
        for key, held in zip(rest, remote.held(rest), strict=True):
            if not held and not self._local(key):
                break
            n += 1
        return n

    def _contains_local(self, keys: Sequence[bytes]) -> int:
        cpu, disk = self.cpu, self.disk
        if disk is None or disk.disabled is not None:
            return cpu.contains(keys) if cpu is not None else 0
        if cpu is None:
            return disk.contains(keys) if disk is not None else 0
        n = 0
        for key in keys:
            if key not in cpu and key not in disk:
                break
            n += 1
        return n

    def lookup(
        self,
        tokens: Sequence[int],
        hasher: ChunkHasher,
        *,
        include_partial: bool = False,
        num_computed_tokens: int = 0,
        log_line: bool = True,
    ) -> LookupResult:
        """Hash ``tokens`` into chunk keys and find the longest held prefix; logs
        ``Total tokens N, hit tokens: H, need to load: L`` unless ``log_line`` is False."""
        keys = hasher.keys(tokens, include_partial=include_partial)
        hit = self.contains(keys)
        spans = chunk_spans(len(tokens), hasher.chunk_size, include_partial)
        hit_tokens = spans[hit - 1][1] if hit else 0
        if log_line:
            log_lookup(len(tokens), hit_tokens, num_computed_tokens)
        return LookupResult(keys, hit, hit_tokens, len(tokens))

    def _promote(self, key: bytes, data: Buffer, tier: str = "disk") -> None:
        if self.cpu is not None and self.promote and self.cpu.put(key, data):
            self._advertise(key)
            with self._lock:
                self._promotions += 1
                self._remote_promotions += tier == "remote"
            self._m_promotions[tier].inc()

    def _remote_up(self) -> RemoteStore | None:
        remote = self.remote
        return remote if remote is not None and remote.disabled is None else None

    def get(self, key: bytes) -> bytes | memoryview | None:
        if self.cpu is not None:
            data = self.cpu.get(key)
            if data is not None:
                return data
        if self.disk is not None:
            view = self.disk.get(key)
            if view is not None:
                self._promote(key, view)
                return view
        remote = self._remote_up()
        if remote is None:
            return None
        view = remote.get(key)
        if view is not None:
            self._promote(key, view, "remote")
        return view

    def get_into(self, key: bytes, out: Buffer) -> int | None:
        if self.cpu is not None:
            n = self.cpu.get_into(key, out)
            if n is not None:
                return n
        if self.disk is not None:
            n = self.disk.get_into(key, out)
            if n is not None:
                self._promote(key, memoryview(out).cast("B")[:n])
                return n
        remote = self._remote_up()
        if remote is None:
            return None
        n = remote.get_into(key, out)
        if n is not None:
            self._promote(key, memoryview(out).cast("B")[:n], "remote")
        return n

    def acquire(self, key: bytes) -> memoryview | None:
        """Pin and view the chunk; a disk or remote hit is promoted first and the CPU slot
        pinned (when the CPU tier has no room, a private copy is returned)."""
        return self.acquire_many([key])[0]

    def acquire_many(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        """:meth:`acquire` of each of ``keys``; the chunks neither CPU nor disk holds
        are fetched from the remote tier in one round trip. Release each non-None."""
        out: list[memoryview | None] = []
        missing: list[int] = []
        for i, key in enumerate(keys):
            view = self._acquire_local(key)
            out.append(view)
            if view is None:
                missing.append(i)
        remote = self._remote_up()
        if missing and remote is not None:
            got = remote.get_many([keys[i] for i in missing])
            for i, data in zip(missing, got, strict=True):
                if data is not None:
                    out[i] = self._pin_promoted(keys[i], data, "remote")
        return out

    def acquire_local(self, keys: Sequence[bytes]) -> list[memoryview]:
        """The longest prefix of ``keys`` the CPU or disk tier holds, pinned (no remote
        call); release each."""
        out: list[memoryview] = []
        for key in keys:
            view = self._acquire_local(key)
            if view is None:
                break
            out.append(view)
        return out

    def lookup_holders(self, keys: Sequence[bytes]) -> tuple[int, list[str | None]]:
        """The longest prefix of ``keys`` held in any tier, and for each key after it the
        p2p endpoint the holder index names (None: nobody known). One remote round trip
        for both (the same as :meth:`contains`)."""
        n = self._contains_local(keys)
        remote = self._remote_up()
        if n == len(keys) or remote is None:
            return n, [None] * (len(keys) - n)
        rest = keys[n:]
        answers = remote.held_with_holders(rest)
        i = 0
        while i < len(rest) and (answers[i] is True or self._local(rest[i])):
            i += 1
        holders = [a if isinstance(a, str) else None for a in answers[i:]]
        return n + i, holders

    def _acquire_local(self, key: bytes) -> memoryview | None:
        cpu = self.cpu
        if cpu is not None:
            view = cpu.acquire(key)
            if view is not None:
                self._advertise(key)  # in use here: the holder entry lives on
                return view
        if self.disk is None:
            return None
        data = self.disk.get(key)
        if data is None:
            return None
        return self._pin_promoted(key, data, "disk")

    def _pin_promoted(self, key: bytes, data: memoryview, tier: str) -> memoryview:
        cpu = self.cpu
        if cpu is not None and self.promote:
            self._promote(key, data, tier)
            view = cpu.acquire(key, record=False)
            if view is not None:
                return view
        with self._lock:
            self._fallback[key] += 1
        return data.toreadonly()

    def release(self, key: bytes) -> None:
        with self._lock:
            if self._fallback[key] > 0:
                self._fallback[key] -= 1
                if not self._fallback[key]:
                    del self._fallback[key]
                return
            self._fallback.pop(key, None)
        if self.cpu is None:
            raise KeyError(f"release of a chunk that is not acquired: {key.hex()}")
        self.cpu.release(key)

    # --- the rest of Store ---

    def evict(self, key: bytes) -> bool:
        held = False
        if self.cpu is not None:
            held = self.cpu.evict(key) or held
        if self.disk is not None:
            held = self.disk.evict(key) or held
        if self.remote is not None:
            held = self.remote.evict(key) or held  # shared: gone for every engine
        return held

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued disk and remote writes; False on timeout."""
        ok = self.disk.flush(timeout) if self.disk is not None else True
        return (self.remote.flush(timeout) if self.remote is not None else True) and ok

    def slab_regions(self) -> list[tuple[int, int]]:
        """The CPU tier's slabs ``(address, nbytes)`` for transport registration."""
        return self.cpu.slab_regions() if self.cpu is not None else []

    def tier_stats(self) -> dict[str, dict[str, int | float]]:
        out: dict[str, dict[str, int | float]] = {}
        if self.cpu is not None:
            out["cpu"] = self.cpu.stats()
        if self.disk is not None:
            out["disk"] = self.disk.stats()
        if self.remote is not None:
            out["remote"] = self.remote.stats()
        return out

    def stats(self) -> dict[str, int | float]:
        """Every tier's counters as ``"<tier>.<name>"``, plus ``promotions`` (all) and
        ``remote_promotions``."""
        out: dict[str, int | float] = {
            "promotions": self._promotions,
            "remote_promotions": self._remote_promotions,
        }
        for tier, counts in self.tier_stats().items():
            out.update({f"{tier}.{name}": value for name, value in counts.items()})
        return out

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
        if self.disk is not None:
            self.disk.close()
        if self.cpu is not None:
            self.cpu.close()


def build_tiers(
    cfg: Config,
    layout: KVLayout,
    *,
    registry: CollectorRegistry | None = None,
    backend: str = "auto",
    pin_memory: bool | None = None,
) -> TieredStore | None:
    """The tiers ``cfg`` asks for (``local_cpu`` / ``max_local_cpu_size``,
    ``local_disk`` / ``max_local_disk_size``, ``remote_url``), slots sized to ``layout``'s
    chunks of ``cfg.chunk_size`` tokens; None when no tier is configured. Sizes are
    decimal GB. A disk directory that cannot be used disables the disk tier (logged), it
    does not raise. A malformed ``remote_url`` leaves the remote tier out, an unreachable
    one starts it turned off (re-probed); either says why once, neither raises."""
    metrics = tier_metrics(registry)
    slot_bytes = layout.bytes_per_chunk(cfg.chunk_size)
    cpu: CPUStore | None = None
    if cfg.local_cpu and cfg.max_local_cpu_size > 0:
        capacity = int(cfg.max_local_cpu_size * 1e9)
        if capacity < slot_bytes:
            raise ValueError(
                f"max_local_cpu_size={cfg.max_local_cpu_size} GB holds no chunk of "
                f"{slot_bytes / 1e9:.4f} GB (chunk_size={cfg.chunk_size} tokens x "
                f"{layout.bytes_per_token} bytes/token); raise it or set local_cpu: false"
            )
        cpu = CPUStore(
            capacity, slot_bytes, backend=backend, pin_memory=pin_memory, metrics=metrics
        )
    disk: DiskStore | None = None
    path = cfg.local_disk_path()
    if path is not None and cfg.max_local_disk_size > 0:
        disk = DiskStore(
            path,
            int(cfg.max_local_disk_size * 1e9),
            layout.store_fingerprint(),
            queue_size=cfg.disk_write_queue_size,
            metrics=metrics,
        )
    remote = build_remote(cfg, layout, metrics)
    if cpu is None and disk is None and remote is None:
        return None
    return TieredStore(cpu, disk, remote, metrics=metrics)


def build_remote(cfg: Config, layout: KVLayout, metrics: TierMetrics) -> RemoteStore | None:
    """The remote tier of ``cfg.remote_url``, or None (unset, or malformed: logged once)."""
    if not cfg.remote_url:
        return None
    try:
        url = parse_remote_url(cfg.remote_url)
    except RemoteURLError as exc:
        log.warning("%s; lmcache-pd starts without the remote tier", exc)
        return None
    return RemoteStore(
        url,
        layout.store_fingerprint(),
        cfg.chunk_size,
        timeout_s=cfg.remote_timeout_s,
        queue_size=cfg.remote_write_queue_size,
        metrics=metrics,
    )
