"""KV events of our tiers: store, evict and clear for the receive buffer, CPU and disk
tiers, decoded with vLLM's own msgspec types; the snapshot after a restart that reloads
the disk tier; a slow subscriber never blocks the engine-facing calls."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.events import (
    END_SEQ,
    SNAPSHOT_SEQ,
    BlockStored,
    KVEventBatch,
    KVEventPublisher,
    TierName,
    decode_batch,
    encode_batch,
    seq_bytes,
)
from lmcache_pd.tiers.cpu import CPUStore
from lmcache_pd.tiers.disk import DiskStore

vllm_events = pytest.importorskip("vllm.distributed.kv_events")

CS = 4
FP = bytes(range(16))
CHUNK = b"\x07" * 64


def replay(endpoint: str, start: int, timeout_s: float = 5.0) -> list[tuple[int, Any]]:
    """vLLM's replay protocol (REQ-style: empty delimiter, 8-byte start seq); batches
    decoded with vLLM's own ``KVEventBatch``."""
    decoder = msgspec.msgpack.Decoder(vllm_events.KVEventBatch)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    out: list[tuple[int, Any]] = []
    try:
        sock.send_multipart((b"", seq_bytes(start)))
        while True:
            assert sock.poll(int(timeout_s * 1000)), "no replay answer"
            _, _topic, seq, payload = sock.recv_multipart()
            n = int.from_bytes(seq, "big", signed=True)
            if n == END_SEQ:
                return out
            out.append((n, decoder.decode(payload)))
    finally:
        sock.close()


def events_of(batches: list[tuple[int, Any]]) -> list[Any]:
    return [e for _, b in batches for e in b.events]


@pytest.fixture
def hasher() -> ChunkHasher:
    return ChunkHasher(FP, CS)


def test_store_evict_clear_every_tier(tmp_path: Path, hasher: ChunkHasher) -> None:
    cpu = CPUStore(16 * len(CHUNK), len(CHUNK), backend="numpy")
    disk = DiskStore(tmp_path / "disk", 1 << 20, FP)
    buffer: set[bytes] = set()
    pub = KVEventPublisher(
        hasher,
        {
            TierName.BUFFER: lambda: list(buffer),
            TierName.CPU: cpu.keys_lru,
            TierName.DISK: disk.keys_lru,
        },
        poll_s=60.0,
        disk_root=disk.root,
    )
    try:
        tokens = list(range(100, 110))  # 2 full chunks + 2 tokens
        k0, k1 = hasher.keys(tokens)
        assert pub.learn(tokens)
        cpu.put(k0, CHUNK)
        cpu.put(k1, CHUNK)
        assert pub.flush()
        got = events_of(replay(pub.replay_endpoint, 0))
        assert isinstance(got[0], vllm_events.AllBlocksCleared)  # a fresh publisher
        stored = [e for e in got if isinstance(e, vllm_events.BlockStored)]
        by_hash = {e.block_hashes[0]: e for e in stored}
        assert set(by_hash) == {k0, k1}
        assert by_hash[k0].parent_block_hash is None
        assert by_hash[k1].parent_block_hash == k0
        assert by_hash[k0].token_ids == tokens[:4]
        assert by_hash[k1].token_ids == tokens[4:8]
        assert {e.block_size for e in stored} == {CS}
        assert {e.medium for e in stored} == {vllm_events.MEDIUM_CPU}

        # disk: STORAGE; the receive buffer shares CPU with the CPU tier (announced once)
        disk.put(k0, CHUNK)
        assert disk.flush(5)
        buffer.add(k0)
        assert pub.flush()
        last = pub.stats.batches
        new = events_of(replay(pub.replay_endpoint, last - 1))
        assert [(type(e).__name__, e.medium, e.block_hashes) for e in new] == [
            ("BlockStored", "STORAGE", [k0])
        ]

        # evict from CPU: still in the buffer -> no removal; then out of the buffer too
        before = pub.stats.batches
        assert cpu.evict(k0)
        assert pub.flush()
        assert pub.stats.batches == before
        buffer.discard(k0)
        assert pub.flush()
        removed = events_of(replay(pub.replay_endpoint, before))
        assert len(removed) == 1 and isinstance(removed[0], vllm_events.BlockRemoved)
        assert removed[0].block_hashes == [k0] and removed[0].medium == "CPU"

        # a chunk whose tokens come later is announced when they do
        late = list(range(500, 504))
        (k2,) = hasher.keys(late)
        cpu.put(k2, CHUNK)
        assert pub.flush()
        assert pub.stats.unannounced == 1
        mark = pub.stats.batches
        pub.learn(late)
        assert pub.flush()
        (ev,) = events_of(replay(pub.replay_endpoint, mark))
        assert ev.block_hashes == [k2] and ev.token_ids == late

        # every tier empty: one AllBlocksCleared
        mark = pub.stats.batches
        cpu.clear()
        for key in disk.keys_lru():
            disk.evict(key)
        assert pub.flush()
        (ev,) = events_of(replay(pub.replay_endpoint, mark))
        assert isinstance(ev, vllm_events.AllBlocksCleared)
    finally:
        pub.close()
        disk.close()
        cpu.close()


def test_snapshot_after_restart_reloads_disk(tmp_path: Path, hasher: ChunkHasher) -> None:
    tokens = list(range(7, 19))  # 3 chunks
    keys = hasher.keys(tokens)
    disk = DiskStore(tmp_path / "d", 1 << 20, FP)
    pub = KVEventPublisher(hasher, {TierName.DISK: disk.keys_lru}, disk_root=disk.root)
    pub.learn(tokens)
    for k in keys:
        disk.put(k, CHUNK)
    assert disk.flush(5)
    assert pub.flush()
    port = pub.port
    pub.close()
    disk.close()

    # restart: the disk tier reloads its files; tokens come from the token files
    disk2 = DiskStore(tmp_path / "d", 1 << 20, FP)
    pub2 = KVEventPublisher(
        hasher, {TierName.DISK: disk2.keys_lru}, port=port, disk_root=disk2.root
    )
    try:
        ((seq, batch),) = replay(pub2.replay_endpoint, SNAPSHOT_SEQ)
        assert seq == pub2.stats.batches - 1
        by_hash = {e.block_hashes[0]: e for e in batch.events}
        assert set(by_hash) == set(keys)
        assert by_hash[keys[2]].parent_block_hash == keys[1]
        assert by_hash[keys[2]].token_ids == tokens[8:12]
        assert {e.medium for e in batch.events} == {"STORAGE"}
    finally:
        pub2.close()
        disk2.close()


def test_slow_or_gone_subscriber_never_blocks(hasher: ChunkHasher) -> None:
    cpu = CPUStore(8 * len(CHUNK), len(CHUNK), backend="numpy")
    pub = KVEventPublisher(hasher, {TierName.CPU: cpu.keys_lru}, queue_size=8, hwm=4)
    ctx = zmq.Context.instance()
    slow = ctx.socket(zmq.SUB)  # subscribes and never reads
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.SUBSCRIBE, b"")
    slow.setsockopt(zmq.LINGER, 0)
    slow.connect(pub.endpoint)
    gone = ctx.socket(zmq.DEALER)  # asks for a replay, then disappears
    gone.setsockopt(zmq.LINGER, 0)
    gone.connect(pub.replay_endpoint)
    gone.send_multipart((b"", seq_bytes(0)))
    gone.close()
    try:
        t0 = time.monotonic()
        worst = 0.0
        for i in range(20_000):
            t = time.monotonic()
            pub.learn([i, i + 1, i + 2, i + 3])
            worst = max(worst, time.monotonic() - t)
        assert time.monotonic() - t0 < 10.0
        assert worst < 1.0, f"learn() blocked {worst:.3f} s"  # loaded CI boxes stall
        assert pub.stats.dropped > 0  # bounded queue: drops counted, not waited for
        for i in range(8):  # a flood of published batches past the slow SUB's HWM
            cpu.put(hasher.keys([i, i + 1, i + 2, i + 3])[0], CHUNK)
            pub.learn([i, i + 1, i + 2, i + 3])
            assert pub.flush()
        assert pub.stats.stored >= 8
        ((_, batch),) = replay(pub.replay_endpoint, SNAPSHOT_SEQ)  # still serving
        assert len(batch.events) == 8
    finally:
        slow.close()
        pub.close()
        cpu.close()


def test_our_structs_and_vllms_agree_both_ways() -> None:
    ours = KVEventBatch(
        ts=1.0,
        events=[
            BlockStored(
                block_hashes=[b"k" * 16],
                parent_block_hash=None,
                token_ids=[1, 2, 3, 4],
                block_size=4,
                lora_id=None,
                medium="CPU",
                lora_name=None,
            )
        ],
    )
    theirs = msgspec.msgpack.decode(encode_batch(ours), type=vllm_events.KVEventBatch)
    assert theirs.events[0].token_ids == [1, 2, 3, 4]
    assert theirs.events[0].block_hashes == [b"k" * 16]
    back = vllm_events.KVEventBatch(
        ts=2.0,
        events=[
            vllm_events.BlockStored(
                block_hashes=[7],
                parent_block_hash=None,
                token_ids=[5],
                block_size=16,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                group_idx=0,
            ),
            vllm_events.BlockRemoved(block_hashes=[b"k" * 16], medium="CPU"),
            vllm_events.AllBlocksCleared(),
        ],
        data_parallel_rank=1,
    )
    decoded = decode_batch(msgspec.msgpack.encode(back))
    assert [type(e).__name__ for e in decoded.events] == [
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
    ]
    assert decoded.events[0].block_hashes == [7] and decoded.data_parallel_rank == 1
