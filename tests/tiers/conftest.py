"""Fixtures of the tier tests: the tiny layout's fingerprint and real redis-servers.

``redis_server`` is one server shared by the session (tests use their own key
namespaces); ``redis_factory`` starts dedicated servers for the fault tests (kill,
restart, pause) and stops them afterwards. Both use ``redis_binary`` (tests/conftest.py):
without the binary they skip with the reason, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lmcache_pd.layout import preset
from lmcache_pd.tiers.redis_server import RedisServer


@pytest.fixture
def fingerprint() -> bytes:
    return preset("tiny").fingerprint()


@pytest.fixture(scope="session")
def redis_server(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), binary=redis_binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_factory(redis_binary: str, tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []

    def start(**kwargs: object) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", binary=redis_binary, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
