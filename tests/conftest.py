"""Shared test fixtures: a per-session control-plane secret and peer processes.

Every test process gets ``LMCACHE_PD_AUTH_SECRET`` so nothing is written to ``~``.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lmcache_pd.peer import PeerProcess
from lmcache_pd.tiers.redis_server import INSTALL_HINT, redis_server_binary

os.environ.setdefault("LMCACHE_PD_AUTH_SECRET", secrets.token_hex(32))
os.environ.setdefault("LMCACHE_PD_NIXL_LOG", "WARNING")


class ReceiverProc(PeerProcess):
    """A receiver process; ``endpoint`` once READY, ``stop_stats()`` collects STATS."""

    endpoint = ""

    def stop_stats(self) -> dict[str, object]:
        self.close_stdin()
        stats = json.loads(self.read_tagged("STATS", 30))
        self.stop()
        return stats


@contextmanager
def receiver_process(*args: str) -> Iterator[ReceiverProc]:
    peer = ReceiverProc("receiver", *args)
    try:
        peer.endpoint = peer.read_tagged("READY", 60)
        yield peer
    finally:
        if peer.proc.poll() is None:
            peer.proc.kill()
            peer.proc.wait(10)


@pytest.fixture
def spawn_receiver():
    return receiver_process


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """The ``redis-server`` binary of the remote-tier tests: skip with the reason where
    it is missing, fail under CI (``CI=true``), where .ci/run installs it."""
    binary = redis_server_binary()
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the remote-tier tests: {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    return binary
