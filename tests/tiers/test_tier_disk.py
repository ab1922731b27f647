"""Disk tier on real files: format, restart, corruption, confinement, LRU, full disk,
write-behind drops and concurrent readers."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import struct
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_pd.layout import preset
from lmcache_pd.tiers import DiskStore
from lmcache_pd.tiers.disk import (
    HEADER_SIZE,
    MAGIC,
    Fault,
    HeaderProblem,
    encode_header,
    parse_header,
)

from .tier_helpers import key_of, payload

MB = 1 << 20


@pytest.fixture
def make(tmp_path: Path, fingerprint: bytes) -> Iterator:
    stores: list[DiskStore] = []

    def _make(cap: int = 64 * MB, path: Path | None = None, **kw: object) -> DiskStore:
        store = DiskStore(path or tmp_path / "disk", cap, fingerprint, **kw)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield _make
    for s in stores:
        s.close()


def put_all(store: DiskStore, items: dict[int, int]) -> None:
    for i, n in items.items():
        assert store.put(key_of(i), payload(i, n))
    assert store.flush(30)


def test_put_get_bit_exact_and_format(make, fingerprint: bytes) -> None:
    store = make()
    put_all(store, {1: MB + 5, 2: 10, 3: 0})
    for i, n in {1: MB + 5, 2: 10, 3: 0}.items():
        assert bytes(store.get(key_of(i))) == payload(i, n)
        out = bytearray(2 * MB)
        assert store.get_into(key_of(i), out) == n and bytes(out[:n]) == payload(i, n)
    raw = store.path_for(key_of(1)).read_bytes()
    magic, version, hsize, klen = struct.unpack_from("<4sHHB", raw)
    assert (magic, version, hsize, klen) == (MAGIC, 1, HEADER_SIZE, 16)
    assert raw[12:28] == key_of(1) and raw[44:60] == fingerprint
    length, checksum = struct.unpack_from("<QQ", raw, 60)
    assert length == MB + 5 and checksum == xxhash.xxh3_64_intdigest(raw[HEADER_SIZE:])
    assert store.path_for(key_of(1)).name == key_of(1).hex() + ".kv"
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    s = store.stats()
    assert s["hits"] == 6 and s["entries"] == 3 and s["bytes_written"] == MB + 15
    assert store.get(key_of(9)) is None and store.stats()["misses"] == 1


def test_restart_rebuilds_index(make, tmp_path: Path) -> None:
    store = make()
    for i in range(6):  # mtimes are coarse (a few ms): space the writes out
        put_all(store, {i: 1000 + i})
        time.sleep(0.01)
    for i in (0, 1):
        time.sleep(0.01)
        store.get(key_of(i))  # hits refresh mtimes: 0 and 1 become most recent
    store.close()
    (store.root / ".tmp-deadbeef-1-1").write_bytes(b"half a chunk")  # crash leftover
    (store.root / "notes.txt").write_text("not ours")
    again = make()
    assert again.keys_lru() == [key_of(i) for i in (2, 3, 4, 5, 0, 1)]
    assert again.contains([key_of(i) for i in range(8)]) == 6
    for i in range(6):
        assert bytes(again.get(key_of(i))) == payload(i, 1000 + i)
    assert not (again.root / ".tmp-deadbeef-1-1").exists()
    assert (again.root / "notes.txt").exists()  # foreign names are left alone
    assert again.stats()["files_loaded"] == 6


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage", ["truncate", "flip_payload", "flip_header_len", "foreign", "empty", "symlink"]
)
@pytest.mark.parametrize("when", ["read", "restart"])
def test_damaged_file_is_a_deleted_miss(
    make, tmp_path: Path, damage: str, when: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = make()
    put_all(store, {1: 50_000, 2: 50_000})
    path = store.path_for(key_of(1))
    if damage == "truncate":
        os.truncate(path, HEADER_SIZE + 20_000)
    elif damage == "flip_payload":
        _flip(path, HEADER_SIZE + 12_345)
    elif damage == "flip_header_len":
        _flip(path, 61)
    elif damage == "empty":
        os.truncate(path, 0)
    elif damage == "symlink":
        target = tmp_path / "outside.kv"
        target.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(target)
    else:
        other = DiskStore(tmp_path / "other", 64 * MB, preset("llama-8b").fingerprint())
        other.put(key_of(1), payload(1, 50_000))
        other.flush()
        other.close()
        os.replace(other.path_for(key_of(1)), path)
    if when == "restart":
        store.close()
        store = make()
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.tiers.disk"):
        assert store.get(key_of(1)) is None
    assert not os.path.lexists(path)
    s = store.stats()
    assert s["corrupt_files"] == 1 and s["misses"] == 1
    assert s["foreign_files"] == (damage == "foreign")
    if when == "read":
        assert "deleted it and counted a miss" in caplog.text
    if damage == "symlink":
        assert (tmp_path / "outside.kv").exists()  # the link target is untouched
    assert key_of(1) not in store
    assert bytes(store.get(key_of(2))) == payload(2, 50_000)


def test_keys_cannot_escape_the_directory(make, tmp_path: Path) -> None:
    store = make()
    evil = b"../../etc/x"
    assert store.put(evil, b"payload")
    assert store.flush(10)
    path = store.path_for(evil)
    assert path.parent == store.root and path.name == evil.hex() + ".kv"
    assert bytes(store.get(evil)) == b"payload"
    assert not (tmp_path / "etc").exists()
    assert sorted(p.name for p in store.root.iterdir()) == [evil.hex() + ".kv"]
    for bad in ("../../etc/x", "/etc/passwd", "..", "ab/cd", "0g", ""):
        with pytest.raises(ValueError):
            store.path_for(bad)
    assert store.path_for(key_of(3).hex()) == store.path_for(key_of(3))
    for bad_key in (b"", b"x" * 33):
        with pytest.raises(ValueError):
            store.put(bad_key, b"1")
    with pytest.raises(TypeError):
        store.put("../../etc/x", b"1")  # type: ignore[arg-type]


def test_size_bound_evicts_lru(make) -> None:
    size = HEADER_SIZE + 10_000
    store = make(cap=3 * size)
    put_all(store, {0: 10_000, 1: 10_000, 2: 10_000})
    store.get(key_of(0))
    put_all(store, {3: 10_000})  # evicts 1, the least recently used
    assert store.keys_lru() == [key_of(2), key_of(0), key_of(3)]
    assert not store.path_for(key_of(1)).exists()
    assert store.stats()["used_bytes"] == 3 * size and store.stats()["evictions"] == 1
    assert not store.put(key_of(9), bytes(3 * size))  # larger than the tier
    assert store.stats()["rejected_too_large"] == 1


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "put", "get", "evict"]), st.integers(0, 9), st.integers(0, 3000)
        ),
        max_size=30,
    )
)
def test_lru_model(tmp_path: Path, fingerprint: bytes, ops) -> None:
    cap = 4 * (HEADER_SIZE + 1500)
    d = Path(tempfile.mkdtemp(dir=tmp_path))  # hypothesis reuses tmp_path
    store = DiskStore(d, cap, fingerprint)
    model: OrderedDict[bytes, bytes] = OrderedDict()
    try:
        for op, i, n in ops:
            key = key_of(i)
            if op == "put":
                data = payload(i * 31 + n, n)
                ok = store.put(key, data)
                store.flush()
                if HEADER_SIZE + n > cap:
                    assert not ok
                elif key not in model:
                    model[key] = data
                    while sum(HEADER_SIZE + len(v) for v in model.values()) > cap:
                        model.popitem(last=False)
            elif op == "get":
                got = store.get(key)
                assert (None if got is None else bytes(got)) == model.get(key)
                if key in model:
                    model.move_to_end(key)
            else:
                assert store.evict(key) == (key in model)
                model.pop(key, None)
            assert store.keys_lru() == list(model)
            used = sum(HEADER_SIZE + len(v) for v in model.values())
            assert store.stats()["used_bytes"] == used <= cap
            on_disk = sorted(p.name for p in d.iterdir())
            assert on_disk == sorted(k.hex() + ".kv" for k in model)
    finally:
        store.close()


def test_full_queue_drops_without_blocking(make) -> None:
    store = make(queue_size=2)
    gate = threading.Event()
    assert store.put(key_of(0), payload(0, 1000), on_written=gate.wait)  # stalls the writer
    time.sleep(0.2)  # the writer has taken item 0 and waits in its callback
    t0 = time.perf_counter()
    results = [store.put(key_of(i), payload(i, 1000)) for i in range(1, 6)]
    assert time.perf_counter() - t0 < 0.5
    assert results == [True, True, False, False, False]
    assert store.stats()["dropped_writes"] == 3 and store.stats()["queue_full_drops"] == 3
    gate.set()
    assert store.flush(10)
    assert store.contains([key_of(i) for i in range(6)]) == 3


def test_borrowed_buffer_released_exactly_once(make) -> None:
    store = make(queue_size=1)
    released: list[int] = []
    for i in range(20):
        store.put(key_of(i), payload(i, 20_000), on_written=lambda i=i: released.append(i))
    store.put(key_of(0), b"dup", on_written=lambda: released.append(-1))
    assert store.flush(10)
    assert sorted(released) == [-1, *range(20)]


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_disables_tier(make, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tiny_tmpfs(tmp_path / "small", "1m") as mnt:
        store = make(cap=64 * MB, path=mnt)
        with caplog.at_level(logging.ERROR, logger="lmcache_pd.tiers.disk"):
            for i in range(8):
                store.put(key_of(i), payload(i, 256 * 1024))
                store.flush(10)
        assert store.disabled is not None and "No space left" in store.disabled
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "disabled" in errors[0].getMessage()
        assert "CPU tier" in errors[0].getMessage()
        assert "the disk is full" in errors[0].getMessage()  # ENOSPC, by errno
        assert not store.put(key_of(20), b"x")
        assert key_of(0) not in store and store.get(key_of(0)) is None
        assert store.stats()["disabled"] == 1 and store.stats()["write_errors"] == 1
        assert not [p for p in mnt.iterdir() if p.name.startswith(".tmp-")]
        store.close()


def test_unusable_directory_disables_tier(make, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    store = make(path=blocker / "disk")
    assert store.disabled is not None and "cannot use the directory" in store.disabled
    assert not store.put(key_of(1), b"abc") and store.get(key_of(1)) is None
    with tiny_tmpfs(tmp_path / "ro", "1m") as mnt:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        ro = make(path=mnt)
        assert ro.disabled is not None and "Read-only" in ro.disabled


def test_header_problems_are_typed() -> None:
    key, fp = key_of(3), b"f" * 16
    head = encode_header(key, fp, 10, 123)
    assert parse_header(head, key, len(head) + 10, fp) == (10, 123)
    cases = {
        Fault.TRUNCATED: parse_header(head[:20], key, 30, fp),
        Fault.NOT_A_CHUNK: parse_header(b"X" + head[1:], key, len(head) + 10, fp),
        Fault.KEY_MISMATCH: parse_header(head, key_of(4), len(head) + 10, fp),
        Fault.FOREIGN: parse_header(head, key, len(head) + 10, b"g" * 16),
    }
    for fault, problem in cases.items():
        assert isinstance(problem, HeaderProblem) and problem.fault is fault, (fault, problem)
        assert str(problem)  # a message to log


def test_concurrent_readers_never_see_half_written_chunks(make) -> None:
    store = make(cap=16 * MB)  # room for ~10 chunks: the writer also evicts
    n = 1_500_000
    chunks = {i: payload(i, n) for i in range(24)}
    errors: list[str] = []
    done = threading.Event()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        out = bytearray(n)
        while not done.is_set():
            i = rng.randrange(24)
            got = store.get(key_of(i))
            if got is not None and bytes(got) != chunks[i]:
                errors.append(f"chunk {i} torn (get)")
            got_n = store.get_into(key_of(i), out)
            if got_n is not None and (got_n != n or out != chunks[i]):
                errors.append(f"chunk {i} torn (get_into)")

    readers = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in readers:
        t.start()
    for rnd in range(3):
        for i in range(24):
            store.put(key_of(i), chunks[i])
        store.flush(30)
        if rnd < 2:
            for i in range(0, 24, 3):  # rewrite some chunks next round
                store.evict(key_of(i))
    done.set()
    for t in readers:
        t.join()
    assert not errors
    s = store.stats()
    assert s["corrupt_files"] == 0 and s["hits"] > 0
