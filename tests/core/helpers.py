"""In-process sender/receiver pairs for handoff tests (real NIXL agents, real ZMQ)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.config import Config, load_config
from lmcache_pd.layout import KVLayout, preset
from lmcache_pd.receiver import Receiver
from lmcache_pd.sender import OutChunk, Sender
from lmcache_pd.transports.nixl import NixlTransport

LAYOUT = preset("tiny")  # 1 KiB per token
CHUNK = 16  # 16 KiB chunks


def make_config(**overrides: object) -> Config:
    base: dict[str, object] = {
        "chunk_size": CHUNK,
        "pd_buffer_size": 8 * LAYOUT.bytes_per_chunk(CHUNK),
        "pd_connect_timeout_s": 3.0,
        "pd_transfer_timeout_s": 3.0,
        "pd_lease_ttl_s": 2.0,
        "pd_busy_max_retries": 5,
        "pd_busy_retry_after_s": 0.02,
    }
    base.update(overrides)
    return load_config(overrides=base)


def hasher(layout: KVLayout = LAYOUT) -> ChunkHasher:
    return ChunkHasher(layout.fingerprint(), CHUNK)


@contextmanager
def receiver(cfg: Config, layout: KVLayout = LAYOUT, **kw: object) -> Iterator[Receiver]:
    transport = NixlTransport()
    rx = Receiver(cfg, layout, transport, port=0, **kw).start()  # type: ignore[arg-type]
    try:
        yield rx
    finally:
        rx.close()
        transport.close()  # now, not whenever the GC gets to the agent


@contextmanager
def sender(cfg: Config, layout: KVLayout = LAYOUT) -> Iterator[Sender]:
    transport = NixlTransport()
    tx = Sender(cfg, layout, transport)
    try:
        yield tx
    finally:
        tx.close()
        transport.close()


def fill(
    tx: Sender, keys: Sequence[bytes], rng: np.random.Generator
) -> tuple[list[OutChunk], list[bytes]]:
    """Random chunk data into fresh send slots; returns chunks and a copy of the data."""
    nbytes = tx.layout.bytes_per_chunk(CHUNK)
    slots = tx.alloc(len(keys))
    chunks, data = [], []
    for key, slot in zip(keys, slots, strict=True):
        view = np.frombuffer(tx.buffer.view(slot, nbytes), dtype=np.uint8)
        view[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
        data.append(view.tobytes())
        chunks.append(OutChunk(key, slot, nbytes))
    return chunks, data
