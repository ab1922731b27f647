"""Helpers of the tier tests: deterministic keys and chunk payloads."""

from __future__ import annotations

import hashlib


def key_of(i: int) -> bytes:
    """A deterministic 16-byte chunk key."""
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def payload(i: int, n: int) -> bytes:
    """``n`` deterministic pseudo-random bytes for chunk ``i``."""
    seed = hashlib.blake2b(f"payload-{i}".encode(), digest_size=64).digest()
    reps = n // len(seed) + 1
    raw = bytearray((seed * reps)[:n])
    # make every 64-byte block different so a misplaced block is caught
    for off in range(0, n, 4096):
        raw[off : off + 4] = off.to_bytes(4, "little")
    return bytes(raw)
