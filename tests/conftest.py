"""Shared test fixtures: a per-session control-plane secret and peer processes.

Every test process gets ``LMCACHE_PD_AUTH_SECRET`` so nothing is written to ``~``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

os.environ.setdefault("LMCACHE_PD_AUTH_SECRET", secrets.token_hex(32))
os.environ.setdefault("LMCACHE_PD_NIXL_LOG", "WARNING")


@dataclass
class PeerProc:
    proc: subprocess.Popen[str]
    endpoint: str = ""
    stats: dict[str, object] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def read_tagged(self, tag: str, timeout_s: float = 60.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"peer exited rc={self.proc.poll()} before {tag}")
            self.lines.append(line)
            if line.startswith(tag + " "):
                return line[len(tag) + 1 :].strip()
        raise TimeoutError(tag)

    def stop(self) -> dict[str, object]:
        """Close stdin (the receiver's stop signal) and collect its STATS."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.stats = json.loads(self.read_tagged("STATS", 30))
        self.proc.wait(30)
        return self.stats


def spawn_peer(role: str, *args: str, env: dict[str, str] | None = None) -> PeerProc:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmcache_pd.peer", role, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return PeerProc(proc)


@contextmanager
def receiver_process(*args: str) -> Iterator[PeerProc]:
    peer = spawn_peer("receiver", *args)
    try:
        peer.endpoint = peer.read_tagged("READY", 60)
        yield peer
    finally:
        if peer.proc.poll() is None and not peer.stats:
            peer.proc.kill()
            peer.proc.wait(10)


@pytest.fixture
def spawn_receiver():
    return receiver_process
