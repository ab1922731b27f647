"""Worker half of the connector (runs in each vLLM worker process).

Owns what holds chunks in this process: the CPU/disk tiers (``kv_both``), the handoff
:class:`~lmcache_pd.receiver.Receiver` (``kv_consumer``, with the tiers behind it) or the
:class:`~lmcache_pd.integration.vllm.producer.Producer` (``kv_producer``). It serves the
scheduler's lookups, scatters held chunks into paged KV for the loads the scheduler
planned, and gathers fully computed chunks out of paged KV for saves and pushes — all
layers of a chunk at once with :mod:`lmcache_pd.kernels.paged_kv`.

Loads run in ``start_load_kv`` (the request is not in the forward of that step: loads
are async in vLLM's terms). A load whose chunks are still landing from a prefiller waits
in a helper thread, bounded by ``pd_transfer_timeout_s``; under the standard contract
that thread first fetches them (:class:`~lmcache_pd.pull.Fetcher`: the prefiller pushes
its held chunks to our receiver); with ``enable_p2p`` (``kv_both``) it first has the peer
engine that holds them push them here (:mod:`lmcache_pd.p2p`). Chunks that cannot be loaded
are reported as invalid blocks: vLLM then recomputes them (policy ``recompute``) or
fails the request (policy ``fail``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lmcache_pd.checksum import ChecksumMismatch, matches
from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.config import Config
from lmcache_pd.control import tcp_endpoint
from lmcache_pd.integration.vllm import cpu_paged
from lmcache_pd.integration.vllm.common import (
    KVRole,
    LoadSpec,
    PDConnectorMetadata,
    SaveSpec,
    agent_name,
    layout_from_tensors,
    layout_from_vllm_config,
    lookup_endpoint,
    ordered_layers,
    slot_mapping,
)
from lmcache_pd.integration.vllm.lookup import LookupServer
from lmcache_pd.integration.vllm.worker_spin import limit_worker_spin
from lmcache_pd.kernels import paged_kv
from lmcache_pd.layout import KVLayout
from lmcache_pd.pieces import assemble
from lmcache_pd.protocol import NO_CHECKSUM
from lmcache_pd.pull import Fetcher, FetchError
from lmcache_pd.tiers import TieredStore, build_tiers, log_store
from lmcache_pd.tp import HeadRange, Piece, piece_keys, rank_heads, receiver_pieces

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from lmcache_pd.integration.vllm.producer import Producer
    from lmcache_pd.p2p import PeerSharing
    from lmcache_pd.receiver import Receiver

log = logging.getLogger("lmcache_pd.vllm")

# vLLM's worker main thread busy-polls its shared-memory queue in Python for a second
# after every step, holding the GIL; our handoff threads (push, receive) then only run
# at GIL switch points, 5 ms apart by default, which stretched a 4 MB push to ~0.5 s
# here. A shorter switch interval lets them in promptly; the spinning thread loses
# nothing that matters.
GIL_SWITCH_INTERVAL_S = 2e-4
# an idle step (nothing scheduled, a load in flight) waits at most this long for the load
IDLE_STEP_WAIT_S = 0.01

# "the whole chunk under its own key": what a rank takes from a sender at its own TP size
_WHOLE = Piece(src=-1, dst=-1, heads=HeadRange(0, 0), src_offset=0, dst_offset=0)


class ChunkSource(Protocol):
    """Where loads read chunks from: the tiers, or the receiver (tiers behind it)."""

    def lookup(self, keys: Sequence[bytes]) -> int: ...

    def wait_for(self, keys: Sequence[bytes], timeout_s: float) -> int: ...

    def acquire(self, keys: Sequence[bytes]) -> list[memoryview | bytes | torch.Tensor | None]: ...

    def acquire_checked(
        self, keys: Sequence[bytes]
    ) -> tuple[list[memoryview | bytes | torch.Tensor | None], list[int]]:
        """:meth:`acquire` plus the digest each chunk must still be checked against
        (``NO_CHECKSUM``: verified already); the load checks it in its scatter."""
        ...

    def settle(self, key: bytes, expected: int, ok: bool, where: str = ...) -> None:
        """The outcome of that check (a mismatch drops the chunk)."""
        ...

    def release(self, keys: Sequence[bytes]) -> None: ...


class TierSource:
    """:class:`ChunkSource` over a :class:`TieredStore` (pins chunks while loading)."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def lookup(self, keys: Sequence[bytes]) -> int:
        return self.store.contains(keys)

    def wait_for(self, keys: Sequence[bytes], timeout_s: float) -> int:
        return self.store.contains(keys)

    def acquire(self, keys: Sequence[bytes]) -> list[memoryview | bytes | None]:
        return self.store.acquire_many(keys)  # remote chunks: one round trip

    def acquire_checked(
        self, keys: Sequence[bytes]
    ) -> tuple[list[memoryview | bytes | torch.Tensor | None], list[int]]:
        # tiers hold verified chunks only (and check their own headers on disk/remote)
        return list(self.acquire(keys)), [NO_CHECKSUM] * len(keys)

    def settle(self, key: bytes, expected: int, ok: bool, where: str = "") -> None:
        pass  # never handed out a digest to check

    def release(self, keys: Sequence[bytes]) -> None:
        for k in keys:
            self.store.release(k)


def tp_rank_and_size() -> tuple[int, int]:
    try:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # not initialised (unit use)
        return 0, 1


def as_byte_tensor(data: memoryview | bytes | torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over ``data`` without a copy (read-only views included; a
    VRAM receive buffer already hands out CUDA tensors)."""
    if isinstance(data, torch.Tensor):
        return data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns on read-only buffers
        return torch.frombuffer(data, dtype=torch.uint8)


class WorkerSide:
    """State of the worker-side connector for one worker process."""

    def __init__(self, vllm_config: VllmConfig, role: KVRole, cfg: Config) -> None:
        self.role = role
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.expected_layout = layout_from_vllm_config(vllm_config)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.chunk_size = cfg.chunk_size
        self.layout: KVLayout | None = None
        self.kv_caches: list[torch.Tensor] = []
        self._staging: torch.Tensor | None = None  # device bounce buffer (GPU caches only)
        self.store: TieredStore | None = None
        self.source: ChunkSource | None = None
        self.receiver: Receiver | None = None
        self.producer: Producer | None = None
        self.fetcher: Fetcher | None = None
        self.p2p: PeerSharing | None = None
        self.lookup_server: LookupServer | None = None
        self.tp_rank, self.tp_size = 0, 1
        self._lock = threading.Lock()
        self._load_done = threading.Condition(self._lock)
        self._finished_loads: set[str] = set()
        self._loads_in_flight = 0  # load specs started, not yet finished
        self._invalid_blocks: set[int] = set()
        self._waiters: ThreadPoolExecutor | None = None
        self._scratch: torch.Tensor | None = None
        self._assembly: torch.Tensor | None = None
        self._page_map: cpu_paged.PageMap | None = None
        self.loaded_tokens = 0
        self.stored_tokens = 0
        self.load_failures = 0
        # (seconds, bytes) of each load into paged KV (the connector's stats)
        self.on_loaded: Callable[[float, int], None] | None = None

    # --- setup ---

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM allocated the KV caches (once, before serving): learn their layout, then
        start what this role runs (tiers, receiver or producer) and the lookup server."""
        self.tp_rank, self.tp_size = tp_rank_and_size()
        layout = self._adopt_caches(kv_caches)
        self._scratch = torch.empty(layout.bytes_per_chunk(self.chunk_size), dtype=torch.uint8)
        self._assembly = torch.empty_like(self._scratch)  # head pieces -> one chunk (mixed TP)
        self._start_role(layout)
        ktc = self.vllm_config.kv_transfer_config
        assert ktc is not None
        self.lookup_server = LookupServer(
            lookup_endpoint(str(ktc.engine_id), self.tp_rank),
            self._lookup if self.p2p is None else self._lookup_with_peers,
            self._pull_address,
        )

    def _adopt_caches(self, kv_caches: dict[str, torch.Tensor]) -> KVLayout:
        """Check the KV tensors against the model config, keep them in layer order and
        probe vLLM's CPU page format where it applies; returns the layout to move."""
        layers = ordered_layers(kv_caches)
        layout = layout_from_tensors(self.expected_layout, kv_caches)
        heads = rank_heads(layout.model_kv_heads, self.tp_size, self.tp_rank)
        if heads.count != layout.num_kv_heads:
            raise ValueError(
                f"TP rank {self.tp_rank} of {self.tp_size} holds {layout.num_kv_heads} KV "
                f"heads, expected {heads.count} of the model's {layout.model_kv_heads}"
            )
        self.layout = layout.with_heads(heads.start, heads.count)
        self.kv_caches = [t for _, t in layers]
        layout = self.layout
        first = self.kv_caches[0]
        log.info(
            "lmcache-pd worker rank %d: role=%s, %d layers, KV tensor %s %s, layout %s, "
            "%d bytes/token",
            self.tp_rank,
            self.role.value,
            len(layers),
            list(first.shape),
            first.dtype,
            layout,
            layout.bytes_per_token,
        )
        if first.device.type == "cpu" and first.dim() == 4 and not layout.is_mla:
            # vLLM's CPU backend: learn its ISA-specific block layout (see cpu_paged)
            cc = self.vllm_config.cache_config
            isa = cpu_paged.backend_isa(
                self.vllm_config.model_config.dtype,
                layout.block_size,
                layout.head_size,
                str(cc.cache_dtype),
            )
            self._page_map = cpu_paged.probe_page_map(
                first, isa, str(cc.cache_dtype), self.vllm_config.model_config.dtype
            )
            log.info("CPU attention backend, ISA %s: KV block layout probed", isa)
        self.hasher = ChunkHasher(layout.fingerprint(), self.chunk_size, self.cfg.hash_algorithm)
        return layout

    def _start_role(self, layout: KVLayout) -> None:
        """The tiers (all but kv_producer), and the receiver + fetcher (kv_consumer) or
        the producer (kv_producer)."""
        limit_worker_spin(self.cfg.pd_worker_spin_s)  # else our threads stall after steps
        if self.cfg.enable_p2p and self.role is not KVRole.BOTH:
            log.warning("enable_p2p applies to kv_both engines only; ignored (%s)", self.role.value)
        if self.role is not KVRole.PRODUCER:
            self.store = build_tiers(self.cfg, layout)
        if self.role is KVRole.BOTH:
            if self.store is None:
                raise ValueError(
                    "kv_both needs a tier: set local_cpu: true with max_local_cpu_size > 0 "
                    "and/or local_disk with max_local_disk_size > 0"
                )
            self.source = TierSource(self.store)
            if self.cfg.enable_p2p:
                self._start_p2p(layout)
        else:
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        if self.role is KVRole.CONSUMER:
            from lmcache_pd.receiver import Receiver
            from lmcache_pd.transports.nixl import NixlTransport

            transport = NixlTransport(
                agent_name(self.role, self.tp_rank),
                backends=self.cfg.nixl_backends,
                bind_host=self.cfg.pd_bind_host,
            )
            self.receiver = Receiver(
                self.cfg,
                layout,
                transport,
                tp_rank=self.tp_rank,
                tp_size=self.tp_size,
                store=self.store,
            ).start()
            self.source = self.receiver
            self._waiters = ThreadPoolExecutor(4, thread_name_prefix="lmcache-pd-load")
            self.fetcher = Fetcher(
                self.cfg,
                self.receiver.codec,
                tcp_endpoint(self.cfg.advertised_host(), self.receiver.port),
                tp_rank=self.tp_rank,
                tp_size=self.tp_size,
            )
        elif self.role is KVRole.PRODUCER:
            from lmcache_pd.integration.vllm.producer import Producer

            self.producer = Producer(self.cfg, layout, self.tp_rank, self.tp_size)

    def _start_p2p(self, layout: KVLayout) -> None:
        """kv_both with ``enable_p2p``: a receiver and a sender beside the tiers, the p2p
        endpoint, and loads through :class:`~lmcache_pd.p2p.PeerSource` (a load whose
        chunks a peer holds waits for that peer's push in a helper thread)."""
        from lmcache_pd.p2p import PeerSharing

        assert self.store is not None
        if self.store.remote is None:
            log.warning(
                "enable_p2p needs the remote tier (remote_url; its index says which peer "
                "holds a chunk): peer-to-peer fetch is off"
            )
            return
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self.p2p = PeerSharing(
            self.cfg, layout, self.store, tp_rank=self.tp_rank, tp_size=self.tp_size
        )
        self.source = self.p2p.source
        self._waiters = ThreadPoolExecutor(4, thread_name_prefix="lmcache-pd-load")

    def _lookup_with_peers(self, keys: list[bytes], source_tp: int = 0) -> int:
        """The scheduler's lookup with p2p on: chunks held here or by one peer."""
        assert self.p2p is not None
        return self.p2p.source.lookup_with_peers(keys)

    def _pull_address(self) -> tuple[str, int] | None:
        holds = self.producer.holds if self.producer is not None else None
        return (holds.host, holds.port) if holds is not None else None

    def _lookup(self, keys: list[bytes], source_tp: int = 0) -> int:
        if self.source is None:
            return 0
        pieces = self._pieces(source_tp)
        return self.source.lookup(self._piece_keys(keys, pieces)) // len(pieces)

    def _pieces(self, source_tp: int) -> tuple[Piece, ...]:
        """The head pieces of each chunk this rank takes from a sender at TP
        ``source_tp`` (0 or ours: one, the whole chunk under its own key)."""
        if source_tp in (0, self.tp_size):
            return (_WHOLE,)
        assert self.layout is not None
        return receiver_pieces(self.layout.model_kv_heads, source_tp, self.tp_size, self.tp_rank)

    def _piece_keys(self, keys: Sequence[bytes], pieces: Sequence[Piece]) -> list[bytes]:
        """``keys`` expanded to the keys of their pieces, chunk by chunk."""
        if pieces == (_WHOLE,):
            return list(keys)
        assert self.layout is not None
        return piece_keys(list(keys), tuple(pieces), self.layout.model_kv_heads, self.tp_size)

    # --- loads ---

    def start_load(self, meta: PDConnectorMetadata) -> None:
        with self._lock:
            self._loads_in_flight += len(meta.loads)  # each ends in _finish_load
        for spec in meta.loads:
            source = self.source
            if source is None or spec.error is not None:
                self._finish_load(spec, spec.start)
                continue
            pieces = self._pieces(spec.source_tp)
            held = source.lookup(self._piece_keys(spec.keys, pieces)) // len(pieces)
            if spec.pull is not None:
                assert self._waiters is not None
                if held < len(spec.keys):
                    self._waiters.submit(self._load_after_fetch, spec)
                    continue
                self._waiters.submit(self._fetch, spec)  # frees the prefiller's hold now
                self._load(spec)
            elif spec.wait_s > 0 and held < len(spec.keys):
                assert self._waiters is not None
                self._waiters.submit(self._load_after_wait, spec)
            else:
                self._load(spec)

    def _fetch(self, spec: LoadSpec) -> bool:
        """Have the prefiller in ``spec.pull`` push its held chunks to our receiver (at
        another TP size: every prefiller rank holding heads of ours, one by one)."""
        assert self.fetcher is not None and spec.pull is not None
        t0 = time.monotonic()
        try:
            sources = sorted({p.src for p in self._pieces(spec.source_tp)} - {-1})
            for src in sources or [self.tp_rank]:
                endpoint = spec.pull.pull_endpoint(src)
                done = self.fetcher.fetch(endpoint, spec.pull.lmcache_pd_hold or "")
        except (FetchError, ValueError) as exc:
            log.warning(
                "request %s: fetching its KV failed after %.2f s: %s; the rest is recomputed "
                "or the request fails (load_failure_policy=%s)",
                spec.req_id,
                time.monotonic() - t0,
                exc,
                self.cfg.load_failure_policy.value,
            )
            return False
        log.info(
            "request %s: fetched %d chunk(s) from %s in %.1f ms (%d already held here)",
            spec.req_id,
            done.chunks,
            endpoint,
            (time.monotonic() - t0) * 1e3,
            done.dedup,
        )
        return True

    def _load_after_fetch(self, spec: LoadSpec) -> None:
        self._fetch(spec)
        self._load(spec)

    def _load_after_wait(self, spec: LoadSpec) -> None:
        assert self.source is not None
        t0 = time.monotonic()
        pieces = self._pieces(spec.source_tp)
        held = self.source.wait_for(self._piece_keys(spec.keys, pieces), spec.wait_s)
        held //= len(pieces)
        if held < len(spec.keys):
            log.warning(
                "request %s: only %d of %d chunks arrived within %.1f s (pd_transfer_timeout_s)"
                "; the rest is recomputed or the request fails (load_failure_policy=%s)",
                spec.req_id,
                held,
                len(spec.keys),
                time.monotonic() - t0,
                self.cfg.load_failure_policy.value,
            )
        self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        assert self.source is not None and self.layout is not None
        cs = self.chunk_size
        t0 = time.perf_counter()
        done_end = spec.start
        views: list[memoryview | bytes | torch.Tensor | None] = []
        pieces = self._pieces(spec.source_tp)
        keys = self._piece_keys(spec.keys, pieces)
        try:
            views, sums = self.source.acquire_checked(keys)
            for i in range(len(spec.keys)):
                c = spec.first_chunk + i
                lo, hi = c * cs, (c + 1) * cs
                part = slice(i * len(pieces), (i + 1) * len(pieces))
                expected = self._check_pieces(keys[part], views[part], sums[part])
                chunk = self._chunk(pieces, views[part])
                if chunk is None:
                    break
                slots = slot_mapping(spec.block_ids, self.block_size, spec.start, spec.end, lo, hi)
                self._scatter(chunk, slots, keys[part][0], expected)
                done_end = min(hi, spec.end)
        except Exception as exc:
            log.error("request %s: load failed at token %d: %s", spec.req_id, done_end, exc)
        finally:
            if views:
                self.source.release(keys)
        dt = time.perf_counter() - t0
        n = done_end - spec.start
        if n > 0:
            nbytes = n * self.layout.bytes_per_token
            log.info(
                "Retrieved %d out of %d required tokens (request %s). size: %.4f gb, "
                "cost %.4f ms, throughput: %.2f GB/s",
                n,
                spec.end - spec.start,
                spec.req_id,
                nbytes / 1e9,
                dt * 1e3,
                nbytes / dt / 1e9 if dt > 0 else 0.0,
            )
            if self.on_loaded is not None:
                self.on_loaded(dt, nbytes)
        self._finish_load(spec, done_end)

    def _chunk(
        self, pieces: Sequence[Piece], views: Sequence[memoryview | bytes | torch.Tensor | None]
    ) -> torch.Tensor | None:
        """One chunk as a flat uint8 tensor: its one view, or its head pieces assembled
        into the scratch chunk. None when a piece is missing (the chunk is not loaded)."""
        if any(v is None for v in views):
            return None
        if pieces == (_WHOLE,):
            return as_byte_tensor(views[0])  # type: ignore[arg-type]
        assert self.layout is not None and self._assembly is not None
        parts = [as_byte_tensor(v) for v in views]  # type: ignore[arg-type]
        n = assemble(self.layout, pieces, parts, self._assembly)
        if n < 0:
            log.error("head pieces of one chunk disagree on their token count; not loaded")
            return None
        return self._assembly[:n]

    def _finish_load(self, spec: LoadSpec, done_end: int) -> None:
        bad: set[int] = set()
        if done_end < spec.end:
            first_bad = done_end // self.block_size
            last = (spec.end - 1) // self.block_size
            bad = set(spec.block_ids[first_bad : last + 1])
            log.warning(
                "request %s: tokens [%d, %d) not loaded; reporting %d block(s) as invalid",
                spec.req_id,
                done_end,
                spec.end,
                len(bad),
            )
        with self._lock:
            self.loaded_tokens += done_end - spec.start
            self.load_failures += bool(bad)
            self._invalid_blocks |= bad
            self._finished_loads.add(spec.req_id)
            self._loads_in_flight -= 1
            self._load_done.notify_all()

    # --- saves ---

    def save(self, meta: PDConnectorMetadata) -> None:
        for spec in meta.saves:
            if self.role is KVRole.PRODUCER:
                assert self.producer is not None
                self.producer.stage(spec, self._gather_into)
            else:
                self._save_to_tiers(spec)

    def _gather_into(self, spec: SaveSpec, index: int, out: torch.Tensor) -> int:
        """Gather chunk ``spec.first_chunk + index`` of the request into ``out`` (a send
        slot) and return its ``kvsum64`` digest, hashed in the same pass
        (``NO_CHECKSUM`` with ``pd_verify_checksums: false``)."""
        return self._gather(spec, index, out, self.cfg.pd_verify_checksums)

    def _gather(self, spec: SaveSpec, index: int, out: torch.Tensor, hashed: bool) -> int:
        assert self.layout is not None
        cs = self.chunk_size
        c = spec.first_chunk + index
        slots = slot_mapping(
            spec.block_ids, self.block_size, 0, spec.total_tokens, c * cs, (c + 1) * cs
        )
        digest = NO_CHECKSUM
        target = out
        if self._page_map is None and out.device != self.kv_caches[0].device:
            target = self._device_staging(out.numel())  # GPU caches, host send buffer/tier
        if self._page_map is not None:
            pm = self._page_map
            if hashed:
                digest = cpu_paged.gather_checksum(self.kv_caches, slots, out, self.layout, pm)
            else:
                cpu_paged.gather(self.kv_caches, slots, out, self.layout, pm)
        elif hashed:  # CUDA caches: the kernel adds the digest up in its launch
            digest = paged_kv.gather_checksum(self.kv_caches, slots, target, self.layout)
        else:
            paged_kv.gather(self.kv_caches, slots, target, self.layout)
        if target is not out:
            out.copy_(target)
        return digest

    def _check_pieces(
        self,
        keys: Sequence[bytes],
        views: Sequence[memoryview | bytes | torch.Tensor | None],
        sums: Sequence[int],
    ) -> int:
        """The digest the scatter of one chunk must check: its own for a whole chunk.
        Head pieces (mixed TP) are assembled before the scatter, so each unverified
        piece is checked here, a pass of its own (raises :class:`ChecksumMismatch`)."""
        if len(views) == 1:
            return sums[0]
        assert self.source is not None
        for key, view, expected in zip(keys, views, sums, strict=True):
            if view is None or expected == NO_CHECKSUM:
                continue
            ok = matches(view, expected)
            self.source.settle(key, expected, ok, "the engine's load")
            if not ok:
                raise ChecksumMismatch(expected, 0, f"head piece {key.hex()}")
        return NO_CHECKSUM

    def _scatter(
        self,
        chunk: torch.Tensor,
        slots: torch.Tensor,
        key: bytes = b"",
        expected: int = NO_CHECKSUM,
    ) -> None:
        """Scatter one chunk into paged KV. With an ``expected`` digest (not
        ``NO_CHECKSUM``) the scatter hashes the bytes it reads in the same pass and
        reports to the source; a mismatch raises :class:`ChecksumMismatch` (the KV just
        written is then not trusted: its blocks are reported invalid)."""
        assert self.layout is not None
        hashed = expected != NO_CHECKSUM
        got = NO_CHECKSUM
        if self._page_map is not None:
            pm = self._page_map
            if hashed:
                got = cpu_paged.scatter_checksum(chunk, self.kv_caches, slots, self.layout, pm)
            else:
                cpu_paged.scatter(chunk, self.kv_caches, slots, self.layout, pm)
        else:
            if chunk.device != self.kv_caches[0].device:  # host chunk into GPU caches
                staged = self._device_staging(chunk.numel())
                staged.copy_(chunk)
                chunk = staged
            if hashed:  # CUDA caches: the kernel adds the digest up in its launch
                got = paged_kv.scatter_checksum(chunk, self.kv_caches, slots, self.layout)
            else:
                paged_kv.scatter(chunk, self.kv_caches, slots, self.layout)
        if hashed:
            assert self.source is not None
            self.source.settle(key, expected, got == expected, "the engine's load")
            if got != expected:
                raise ChecksumMismatch(expected, got, f"chunk {key.hex()}")

    def _device_staging(self, nbytes: int) -> torch.Tensor:
        """A reusable uint8 buffer on the caches' device (no allocation per chunk)."""
        device = self.kv_caches[0].device
        buf = self._staging
        if buf is None or buf.device != device or buf.numel() < nbytes:
            buf = self._staging = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buf[:nbytes]

    def _save_to_tiers(self, spec: SaveSpec) -> None:
        store, scratch, layout = self.store, self._scratch, self.layout
        if store is None or scratch is None or layout is None:
            return
        t0 = time.perf_counter()
        stored = 0
        for i, key in enumerate(spec.keys):
            if key in store:
                continue
            self._gather(spec, i, scratch, hashed=False)
            if store.put(key, scratch.numpy().data):
                stored += self.chunk_size
        dt = time.perf_counter() - t0
        if stored:
            self.stored_tokens += stored
            log_store(stored, spec.total_tokens, stored * layout.bytes_per_token, dt, logger=log)

    # --- completion reporting ---

    def get_finished(
        self, finished_req_ids: set[str], idle: bool = False
    ) -> tuple[set[str] | None, set[str] | None]:
        """Loads finished since the last step. ``idle``: this step computed nothing
        (vLLM steps back to back while a request waits for its KV); then wait up to
        ``IDLE_STEP_WAIT_S`` for a load in flight to finish, so a waiting engine does
        not spin its cores (which starves the handoff threads on a small host)."""
        if self.producer is not None and finished_req_ids:
            self.producer.forget(finished_req_ids)
        with self._lock:
            if idle and not self._finished_loads and self._loads_in_flight:
                self._load_done.wait(IDLE_STEP_WAIT_S)
            done, self._finished_loads = self._finished_loads, set()
        return None, (done or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            bad, self._invalid_blocks = self._invalid_blocks, set()
        return bad

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "loaded_tokens": self.loaded_tokens,
            "stored_tokens": self.stored_tokens,
        }
        if self.store is not None:
            out.update(self.store.stats())
        if self.receiver is not None:
            out.update(self.receiver.stats())
        if self.p2p is not None:
            out.update(self.p2p.stats())
        return out

    def shutdown(self) -> None:
        if self.lookup_server is not None:
            self.lookup_server.close()
            self.lookup_server = None
        if self._waiters is not None:
            self._waiters.shutdown(wait=False, cancel_futures=True)
            self._waiters = None
        if self.fetcher is not None:
            self.fetcher.close()
            self.fetcher = None
        if self.producer is not None:
            self.producer.close()
            self.producer = None
        if self.receiver is not None:
            self.receiver.close()
            self.receiver.transport.close()
            self.receiver = None
        if self.p2p is not None:
            self.p2p.close()
            self.p2p = None
        if self.store is not None:
            self.store.flush(timeout=5.0)
            self.store.close()
            self.store = None
