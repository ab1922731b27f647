"""vLLM-format KV-cache events for the chunks lmcache-pd holds (receive buffer, CPU, disk).

External routers (llm-d's precise prefix-cache scorer, Dynamo's KV router) and our own
proxy learn where prefixes live from vLLM's KV-event stream. This module publishes our
chunks on that stream format, so they subscribe to an lmcache-pd engine exactly as to
vLLM's own publisher (``--kv-events-config``):

* wire: ZMQ PUB multipart ``(topic, seq as 8-byte big-endian, msgpack KVEventBatch)``;
  ``KVEventBatch = [ts, [events...]]`` of ``BlockStored`` / ``BlockRemoved`` /
  ``AllBlocksCleared`` (tagged maps, tag field ``type`` = class name), the layout of
  ``vllm.distributed.kv_events`` (tests decode ours with vLLM's own types);
* replay: a ROUTER on ``port + 1`` answers vLLM's replay request (a REQ/DEALER sends the
  start seq as 8 bytes) with every buffered batch from that seq on, then the end marker
  ``(b"", seq=-1, b"")``; our extension: start seq ``SNAPSHOT_SEQ`` (-2) answers one
  batch holding a ``BlockStored`` for every chunk held now, under the seq of the last
  batch published, so a late or restarted subscriber gets the current state.

Mapping (what a router must configure): one event block = one lmcache-pd chunk, so
``block_size`` is our ``chunk_size`` (routers that hash tokens themselves, llm-d and
Dynamo, must use that block size for this stream). ``block_hashes[0]`` is the chunk's
16-byte prefix-chain key (:mod:`lmcache_pd.chunks`), ``parent_block_hash`` the previous
chunk's key (None for the first chunk) and ``token_ids`` the chunk's tokens. Media:
the receive buffer and the CPU tier are ``CPU``, the disk tier is ``STORAGE`` (vLLM's
names); a chunk held by two tiers of one medium is announced once and removed when the
last of them drops it. The remote tier is shared by engines and not announced.

Where the state comes from: the publisher thread diffs each tier's key set every
``poll_s`` (a timed wait, no spinning) and turns what appeared and vanished into events.
Tokens come from the prompts the engine sees (:meth:`KVEventPublisher.learn`): a chunk
whose tokens are not known yet is announced once they are; with a disk tier the tokens
are kept next to the chunk files (``<disk>/lmcpd-tokens/<key hex>``), so chunks reloaded
after a restart are announced at once. A fresh publisher first sends ``AllBlocksCleared``
(forget what an earlier run of this engine said); a poll that finds every tier empty
after holding chunks sends ``AllBlocksCleared`` instead of one removal per chunk.

Never blocks the engine: :meth:`learn` only puts on a bounded queue (full: dropped and
counted in ``dropped``); the PUB socket drops for a slow or gone subscriber (ZMQ
high-water mark; the subscriber sees a seq gap and can replay); replay answers are sent
without blocking (dropped and counted when the peer's queue is full).

Imports no torch, no vLLM: the router decodes the same Structs.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from lmcache_pd.chunks import ChunkHasher

log = logging.getLogger("lmcache_pd.events")

END_SEQ = -1  # vLLM's end-of-replay marker
SNAPSHOT_SEQ = -2  # our extension: the current state instead of buffered batches
TOKENS_DIR = "lmcpd-tokens"


class Medium(str, enum.Enum):
    """vLLM's medium names (``vllm.distributed.kv_events.MEDIUM_*``)."""

    GPU = "GPU"
    CPU = "CPU"
    STORAGE = "STORAGE"


class TierName(str, enum.Enum):
    """A place lmcache-pd holds chunks in, and the medium it is announced as."""

    BUFFER = "buffer"
    CPU = "cpu"
    DISK = "disk"

    @property
    def medium(self) -> Medium:
        return Medium.STORAGE if self is TierName.DISK else Medium.CPU


# --- wire format (vLLM's KVEventBatch; vllm/distributed/kv_events.py) ----------------


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[bytes | int]
    medium: str | None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _ENCODER.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one batch (ours or vLLM's); raises ``msgspec.DecodeError`` when malformed."""
    return _DECODER.decode(payload)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


# --- chunk tokens ---------------------------------------------------------------------


class _Tokens(msgspec.Struct, array_like=True):
    parent: bytes | None
    tokens: list[int]


class TokenIndex:
    """Bounded LRU: chunk key -> (parent key, the chunk's tokens)."""

    def __init__(self, hasher: ChunkHasher, max_entries: int = 65_536) -> None:
        self.hasher = hasher
        self.max_entries = max_entries
        self._map: OrderedDict[bytes, _Tokens] = OrderedDict()

    def learn(self, tokens: Sequence[int]) -> list[bytes]:
        """Index every full chunk of ``tokens``; returns their keys."""
        try:
            keys = self.hasher.keys(tokens)
        except ValueError:
            return []
        cs = self.hasher.chunk_size
        parent: bytes | None = None
        for i, key in enumerate(keys):
            if key in self._map:
                self._map.move_to_end(key)
            else:
                self._map[key] = _Tokens(parent, list(tokens[i * cs : (i + 1) * cs]))
            parent = key
        while len(self._map) > self.max_entries:
            self._map.popitem(last=False)
        return keys

    def get(self, key: bytes) -> _Tokens | None:
        return self._map.get(key)

    def put(self, key: bytes, entry: _Tokens) -> None:
        self._map[key] = entry
        while len(self._map) > self.max_entries:
            self._map.popitem(last=False)


class _TokenFiles:
    """Tokens of disk-held chunks, one small msgpack file per chunk beside the chunks."""

    def __init__(self, disk_root: Path) -> None:
        self.root = disk_root / TOKENS_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(_Tokens)

    def read(self, key: bytes) -> _Tokens | None:
        try:
            return self._dec.decode((self.root / key.hex()).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("kv events: unreadable token file for %s (%s); ignored", key.hex(), exc)
            return None

    def write(self, key: bytes, entry: _Tokens) -> None:
        path = self.root / key.hex()
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(self._enc.encode(entry))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("kv events: cannot keep the tokens of %s: %s", key.hex(), exc)

    def remove(self, key: bytes) -> None:
        with contextlib.suppress(OSError):
            (self.root / key.hex()).unlink()


# --- the publisher --------------------------------------------------------------------

KeySource = Callable[[], Sequence[bytes]]


class _Op(enum.Enum):
    LEARN = "learn"
    POLL = "poll"
    STOP = "stop"


@dataclass
class PublisherStats:
    batches: int = 0
    stored: int = 0
    removed: int = 0
    cleared: int = 0
    dropped: int = 0  # learn() calls dropped: queue full
    replay_dropped: int = 0  # replay/snapshot frames dropped: the peer did not read
    unannounced: int = 0  # chunks held whose tokens are not known (yet)
    by_medium: dict[str, int] = field(default_factory=dict)


class KVEventPublisher:
    """Publishes the chunks held in ``sources`` as vLLM KV events (see module doc)."""

    def __init__(
        self,
        hasher: ChunkHasher,
        sources: dict[TierName, KeySource],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        replay_port: int | None = None,
        topic: str = "",
        disk_root: Path | None = None,
        poll_s: float = 0.5,
        queue_size: int = 10_000,
        buffer_batches: int = 1_000,
        hwm: int = 10_000,
        max_tokens_entries: int = 65_536,
        forward: Callable[[list[KVEvent]], None] | None = None,
    ) -> None:
        self.hasher = hasher
        self.block_size = hasher.chunk_size
        self.sources = dict(sources)
        # also hand stores/removals to vLLM's own publisher (must not block)
        self.forward = forward
        self.poll_s = poll_s
        self.topic = topic.encode()
        self.tokens = TokenIndex(hasher, max_tokens_entries)
        self.token_files = _TokenFiles(disk_root) if disk_root is not None else None
        self.stats = PublisherStats()
        self._queue: queue.Queue[tuple[_Op, Any]] = queue.Queue(maxsize=max(1, queue_size))
        self._held: dict[TierName, set[bytes]] = {t: set() for t in self.sources}
        self._announced: dict[Medium, set[bytes]] = {}
        self._on_file: set[bytes] = set()  # disk keys whose token file is written
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self._seq = -1
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self.port = self._bind(self._pub, host, port)
        self._replay = self._ctx.socket(zmq.ROUTER)
        self._replay.setsockopt(zmq.SNDHWM, hwm)
        self._replay.setsockopt(zmq.LINGER, 0)
        self.replay_port = self._bind(
            self._replay, host, self.port + 1 if replay_port is None else replay_port
        )
        self.endpoint = f"tcp://{host}:{self.port}"
        self.replay_endpoint = f"tcp://{host}:{self.replay_port}"
        self._stopped = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="lmcache-pd-events", daemon=True)
        self._thread.start()
        log.info(
            "kv events: publishing on %s (replay/snapshot %s), block_size=%d",
            self.endpoint,
            self.replay_endpoint,
            self.block_size,
        )

    @staticmethod
    def _bind(sock: zmq.Socket[bytes], host: str, port: int) -> int:
        if port == 0:
            return int(sock.bind_to_random_port(f"tcp://{host}"))
        sock.bind(f"tcp://{host}:{port}")
        return port

    # --- engine-facing: never blocks ---

    def learn(self, tokens: Sequence[int]) -> bool:
        """The prompt ``tokens`` of a request (its chunks' tokens become known). Returns
        False when dropped (queue full; counted)."""
        return self._offer(_Op.LEARN, list(tokens))

    def poke(self) -> bool:
        """Poll the tiers now instead of at the next tick."""
        return self._offer(_Op.POLL, None)

    def _offer(self, op: _Op, arg: Any) -> bool:
        try:
            self._queue.put_nowait((op, arg))
        except queue.Full:
            self.stats.dropped += 1
            return False
        self._wake()
        return True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # pipe full: a wake-up is pending
            os.write(self._wake_w, b"x")

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything offered so far is processed and one poll ran (tests)."""
        done = threading.Event()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._queue.put((_Op.POLL, done), timeout=0.1)
                self._wake()
                break
            except queue.Full:
                continue
        return done.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            with contextlib.suppress(queue.Full):
                self._queue.put((_Op.STOP, None), timeout=1.0)
            self._wake()
            self._thread.join(timeout=5.0)
        if self._thread.is_alive():  # closing its sockets under it is undefined
            log.error("KV event publisher thread did not stop within 5 s; left running")
            return
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._pub.close(0)
        self._replay.close(0)
        self._ctx.term()

    # --- the publisher thread ---

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._replay, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._publish([AllBlocksCleared()])
        next_poll = 0.0
        while True:
            now = time.monotonic()
            if now >= next_poll:
                self._guard(self._poll)
                next_poll = time.monotonic() + self.poll_s
            wait_ms = max(0, int((next_poll - time.monotonic()) * 1000))
            ready = dict(poller.poll(timeout=wait_ms))  # blocks: no spinning
            if self._replay in ready:
                self._guard(self._serve_replay)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            while True:
                try:
                    op, arg = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is _Op.STOP:
                    return
                if op is _Op.LEARN:
                    self._guard(functools.partial(self._learn, arg))
                else:
                    self._guard(self._poll)
                    next_poll = time.monotonic() + self.poll_s
                    if isinstance(arg, threading.Event):
                        arg.set()

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # the publisher outlives any one bad poll or request
            log.exception("kv events: publisher step failed")

    def _learn(self, tokens: list[int]) -> None:
        keys = self.tokens.learn(tokens)
        fresh = [k for k in keys if any(k in held for held in self._held.values())]
        if fresh:
            self._announce(fresh)
            self._count_unannounced()

    def _poll(self) -> None:
        appeared: dict[TierName, list[bytes]] = {}
        vanished: dict[TierName, list[bytes]] = {}
        for tier, source in self.sources.items():
            now = set(source())
            before = self._held[tier]
            appeared[tier] = [k for k in now if k not in before]
            vanished[tier] = [k for k in before if k not in now]
            self._held[tier] = now
        events: list[KVEvent] = []
        forwarded: list[KVEvent] = []  # on vLLM's stream a clear would drop its GPU blocks
        was_announcing = any(self._announced.values())
        if was_announcing and not any(self._held.values()):
            forwarded += [
                BlockRemoved(block_hashes=list(keys), medium=medium.value)
                for medium, keys in self._announced.items()
                if keys
            ]
            self._announced = {}
            events.append(AllBlocksCleared())
            self.stats.cleared += 1
        else:
            events += self._removals(vanished)
            forwarded += events
        self._forget_token_files(vanished)
        new = [k for keys in appeared.values() for k in keys]
        stores = self._stores(new)
        events += stores
        forwarded += stores
        if events:
            self._publish(events, forwarded)
        if new or any(vanished.values()):
            self._count_unannounced()

    def _count_unannounced(self) -> None:
        self.stats.unannounced = sum(
            1
            for tier, keys in self._held.items()
            for k in keys
            if k not in self._announced.get(tier.medium, ())
        )

    def _removals(self, vanished: dict[TierName, list[bytes]]) -> list[KVEvent]:
        out: dict[Medium, list[bytes]] = {}
        for tier, keys in vanished.items():
            medium = tier.medium
            ann = self._announced.get(medium, set())
            for key in keys:
                if key in ann and not self._held_in(medium, key):
                    ann.discard(key)
                    out.setdefault(medium, []).append(key)
        events: list[KVEvent] = []
        for medium, keys in out.items():
            events.append(BlockRemoved(block_hashes=list(keys), medium=medium.value))
            self.stats.removed += len(keys)
        return events

    def _held_in(self, medium: Medium, key: bytes) -> bool:
        return any(key in keys for tier, keys in self._held.items() if tier.medium is medium)

    def _forget_token_files(self, vanished: dict[TierName, list[bytes]]) -> None:
        if self.token_files is None:
            return
        for key in vanished.get(TierName.DISK, ()):
            self.token_files.remove(key)
            self._on_file.discard(key)

    def _tokens_of(self, key: bytes) -> _Tokens | None:
        entry = self.tokens.get(key)
        if (
            entry is None
            and self.token_files is not None
            and key in self._held.get(TierName.DISK, ())
        ):
            entry = self.token_files.read(key)
            if entry is not None:
                self.tokens.put(key, entry)
                self._on_file.add(key)
        return entry

    def _stores(self, keys: Sequence[bytes]) -> list[KVEvent]:
        events: list[KVEvent] = []
        for key in keys:
            entry = self._tokens_of(key)
            if entry is None:
                continue
            for tier, held in self._held.items():
                if key not in held:
                    continue
                if tier is TierName.DISK and self.token_files is not None:
                    if key not in self._on_file:
                        self.token_files.write(key, entry)
                        self._on_file.add(key)
                ann = self._announced.setdefault(tier.medium, set())
                if key in ann:
                    continue
                ann.add(key)
                events.append(self._stored(key, entry, tier.medium))
        return events

    def _stored(self, key: bytes, entry: _Tokens, medium: Medium) -> BlockStored:
        self.stats.stored += 1
        self.stats.by_medium[medium.value] = self.stats.by_medium.get(medium.value, 0) + 1
        return BlockStored(
            block_hashes=[key],
            parent_block_hash=entry.parent,
            token_ids=entry.tokens,
            block_size=self.block_size,
            lora_id=None,
            medium=medium.value,
            lora_name=None,
        )

    def _announce(self, keys: Sequence[bytes]) -> None:
        events = self._stores(keys)
        if events:
            self._publish(events)

    def _publish(self, events: list[KVEvent], forwarded: list[KVEvent] | None = None) -> None:
        if self.forward is not None:
            fwd: list[KVEvent] = (
                [e for e in events if not isinstance(e, AllBlocksCleared)]
                if forwarded is None
                else forwarded
            )
            if fwd:
                self.forward(fwd)
        self._seq += 1
        payload = encode_batch(KVEventBatch(ts=time.time(), events=events))
        # PUB never blocks: a subscriber past its high-water mark misses frames
        self._pub.send_multipart((self.topic, seq_bytes(self._seq), payload))
        self._buffer.append((self._seq, payload))
        self.stats.batches += 1

    def snapshot(self) -> KVEventBatch:
        """Every announced chunk as one batch (called on the publisher thread)."""
        events: list[KVEvent] = []
        for medium, keys in self._announced.items():
            for key in keys:
                entry = self.tokens.get(key)
                if entry is not None:
                    events.append(
                        BlockStored(
                            block_hashes=[key],
                            parent_block_hash=entry.parent,
                            token_ids=entry.tokens,
                            block_size=self.block_size,
                            lora_id=None,
                            medium=medium.value,
                            lora_name=None,
                        )
                    )
        return KVEventBatch(ts=time.time(), events=events)

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart(zmq.NOBLOCK)
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("kv events: malformed replay request (%d frames); ignored", len(frames))
            return
        ident = frames[0]
        start = int.from_bytes(frames[2], "big", signed=True)
        if start == SNAPSHOT_SEQ:
            self._self_poll_for_snapshot()
            payload = encode_batch(self.snapshot())
            if not self._send_replay((ident, b"", self.topic, seq_bytes(self._seq), payload)):
                return
        else:
            for seq, payload in self._buffer:
                if seq >= start and not self._send_replay(
                    (ident, b"", self.topic, seq_bytes(seq), payload)
                ):
                    return
        self._send_replay((ident, b"", b"", seq_bytes(END_SEQ), b""))

    def _self_poll_for_snapshot(self) -> None:
        self._poll()  # the snapshot reflects the tiers now, not at the last tick

    def _send_replay(self, frames: tuple[bytes, ...]) -> bool:
        try:
            self._replay.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.stats.replay_dropped += 1
            return False
