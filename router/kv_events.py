"""KV-event subscriptions: which engine holds which prompt chunks, as the engines say.

One :class:`EngineEvents` per engine with an event endpoint (``decoder_events``) reads
the engine's vLLM-format KV-event stream (:mod:`lmcache_pd.events`: ZMQ PUB, replay and
snapshot on the next port) and keeps the :class:`HeldMap` of the ``cache_aware`` policy
exact for that engine. On (re)subscribe, after a sequence gap or a restart of the
publisher (its sequence starts over), and every ``events_resync_s``, it asks for a
snapshot and replaces what it knew of that engine.

Keys: the proxy hashes prompts with its own :class:`~lmcache_pd.chunks.ChunkHasher`
(no layout fingerprint), so engine block hashes are not comparable with ours. Like
llm-d's and Dynamo's routers, we re-hash the announced tokens: ``BlockStored`` gives a
chunk's tokens and its parent's engine hash; the proxy key is
``next_key(proxy key of the parent, tokens)``. Events whose ``block_size`` is not our
``chunk_size`` (vLLM's own GPU blocks, another chunk size) are counted and ignored.

Decoded with our own msgspec Structs (the same wire format as vLLM's); no vLLM here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import msgspec
import zmq
import zmq.asyncio

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.events import (
    END_SEQ,
    SNAPSHOT_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    decode_batch,
    seq_bytes,
)

log = logging.getLogger("lmcache_pd.router")

MAX_PENDING = 4096  # children waiting for their parent's BlockStored


class HeldMap:
    """Exact map from proxy chunk key to the bitmask of engines (by index) holding it."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.subscribed = 0  # bitmask of engines whose holdings come from events
        self.full_drops = 0
        self._map: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._map)

    def get(self, key: bytes) -> int:
        return self._map.get(key, 0)

    def add(self, key: bytes, index: int) -> None:
        mask = self._map.get(key)
        if mask is None and len(self._map) >= self.max_entries:
            self.full_drops += 1
            return
        self._map[key] = (mask or 0) | 1 << index

    def remove(self, key: bytes, index: int) -> None:
        mask = self._map.get(key, 0) & ~(1 << index)
        if mask:
            self._map[key] = mask
        else:
            self._map.pop(key, None)

    def clear(self, index: int) -> None:
        bit = 1 << index
        for key in [k for k, m in self._map.items() if m & bit]:
            self.remove(key, index)


class EngineEvents:
    """The subscription to one engine's KV events."""

    def __init__(
        self,
        index: int,
        endpoint: str,
        replay_endpoint: str,
        hasher: ChunkHasher,
        held: HeldMap,
        *,
        resync_s: float = 10.0,
        timeout_s: float = 2.0,
        max_keys: int = 1_000_000,
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.hasher = hasher
        self.held = held
        self.resync_s = resync_s
        self.timeout_s = timeout_s
        self.max_keys = max_keys
        self.last_seq = -1
        self.snapshots = 0
        self.ignored = 0  # events of another block size, or malformed batches
        self.unresolved = 0  # children whose parent was never announced
        self._proxy_key: OrderedDict[bytes, bytes] = OrderedDict()  # engine -> proxy key
        self._media: dict[bytes, set[str]] = {}  # proxy key -> media holding it
        self._pending: OrderedDict[bytes, list[BlockStored]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._ctx: zmq.asyncio.Context | None = None
        held.subscribed |= 1 << index

    def status(self) -> dict[str, object]:
        """For ``/v1/proxy/state``."""
        return {
            "decoder": self.index,
            "endpoint": self.endpoint,
            "last_seq": self.last_seq,
            "snapshots": self.snapshots,
            "chunks": len(self._media),
            "ignored": self.ignored,
            "unresolved": self.unresolved,
        }

    # --- lifecycle ---

    def start(self, ctx: zmq.asyncio.Context) -> None:
        self._ctx = ctx
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        assert self._ctx is not None
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.endpoint)
        try:
            next_sync = 0.0
            while True:
                if time.monotonic() >= next_sync:
                    await self.resync()
                    next_sync = time.monotonic() + self.resync_s
                wait_ms = max(1, int((next_sync - time.monotonic()) * 1000))
                if not await sub.poll(wait_ms):
                    continue
                frames = await sub.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self.ignored += 1
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                if seq <= self.last_seq and seq != 0:
                    continue  # already in the snapshot
                if seq != self.last_seq + 1:  # a gap, or the publisher started over
                    next_sync = 0.0
                    continue
                self.last_seq = seq
                self._apply_payload(frames[2])
        finally:
            sub.close()

    async def resync(self) -> bool:
        """Replace this engine's holdings with its snapshot. False when it did not
        answer within ``timeout_s`` (what we knew is kept)."""
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.replay_endpoint)
        try:
            await sock.send_multipart((b"", seq_bytes(SNAPSHOT_SEQ)))
            batches: list[tuple[int, bytes]] = []
            while True:
                if not await sock.poll(int(self.timeout_s * 1000)):
                    log.debug(
                        "engine %d: no KV-event snapshot from %s", self.index, self.replay_endpoint
                    )
                    return False
                frames = await sock.recv_multipart()
                if len(frames) != 4 or len(frames[2]) != 8:
                    self.ignored += 1
                    return False
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    break
                batches.append((seq, frames[3]))
        finally:
            sock.close()
        self.held.clear(self.index)
        self._media.clear()
        self._pending.clear()
        for seq, payload in batches:
            self._apply_payload(payload)
            self.last_seq = seq
        self.snapshots += 1
        return True

    # --- applying events ---

    def _apply_payload(self, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError:
            self.ignored += 1
            return
        self.apply(batch.events)

    def apply(self, events: Sequence[KVEvent]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                self._stored(ev)
            elif isinstance(ev, BlockRemoved):
                self._removed(ev)
            elif isinstance(ev, AllBlocksCleared):
                self.held.clear(self.index)
                self._media.clear()
                self._pending.clear()

    def _stored(self, ev: BlockStored) -> None:
        if (
            ev.block_size != self.hasher.chunk_size
            or len(ev.token_ids) != len(ev.block_hashes) * ev.block_size
        ):
            self.ignored += 1
            return
        parent = ev.parent_block_hash
        prev: bytes | None = None
        if parent is not None:
            key = self._key_of(parent)
            if key is None:  # the parent comes later (snapshot order) or never
                self._pending.setdefault(_as_bytes(parent), []).append(ev)
                while len(self._pending) > MAX_PENDING:
                    self._pending.popitem(last=False)
                    self.unresolved += 1
                return
            prev = key
        cs = ev.block_size
        medium = ev.medium or ""
        for i, engine_hash in enumerate(ev.block_hashes):
            prev = self.hasher.next_key(prev, ev.token_ids[i * cs : (i + 1) * cs])
            eh = _as_bytes(engine_hash)
            self._proxy_key[eh] = prev
            self._proxy_key.move_to_end(eh)
            self._media.setdefault(prev, set()).add(medium)
            self.held.add(prev, self.index)
            for child in self._pending.pop(eh, []):
                self._stored(child)
        while len(self._proxy_key) > self.max_keys:
            self._proxy_key.popitem(last=False)

    def _removed(self, ev: BlockRemoved) -> None:
        medium = ev.medium or ""
        for engine_hash in ev.block_hashes:
            key = self._key_of(engine_hash)
            if key is None:
                continue
            media = self._media.get(key)
            if media is None:
                continue
            media.discard(medium)
            if not media:
                del self._media[key]
                self.held.remove(key, self.index)

    def _key_of(self, engine_hash: bytes | int) -> bytes | None:
        return self._proxy_key.get(_as_bytes(engine_hash))


def _as_bytes(h: bytes | int) -> bytes:
    return h if isinstance(h, bytes) else h.to_bytes(16, "big", signed=h < 0)


class Subscriptions:
    """The proxy's :class:`EngineEvents`, one per decoder with a ``decoder_events`` entry."""

    def __init__(self, subs: list[EngineEvents]) -> None:
        self.subs = subs
        self._ctx: zmq.asyncio.Context | None = None

    @classmethod
    def for_decoders(
        cls,
        endpoints: Sequence[tuple[str, int] | None],
        held: HeldMap | None,
        hasher: ChunkHasher,
        resync_s: float,
    ) -> Subscriptions:
        subs: list[EngineEvents] = []
        if any(endpoints) and held is None:
            log.warning(
                "decoder_events are set but the policy is not cache_aware: KV events unused"
            )
            return cls(subs)
        for i, ep in enumerate(endpoints):
            if ep is None or held is None:
                continue
            host, port = ep
            subs.append(
                EngineEvents(
                    i,
                    f"tcp://{host}:{port}",
                    f"tcp://{host}:{port + 1}",
                    hasher,
                    held,
                    resync_s=resync_s,
                )
            )
        return cls(subs)

    def start(self) -> None:
        if not self.subs:
            return
        self._ctx = zmq.asyncio.Context()
        for sub in self.subs:
            sub.start(self._ctx)
            log.info("decoder %d: KV events from %s", sub.index, sub.endpoint)

    async def stop(self) -> None:
        for sub in self.subs:
            await sub.stop()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
