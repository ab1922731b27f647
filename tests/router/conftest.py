"""Fixtures for the proxy tests: stub engines (real HTTP servers) and a proxy in a thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from lmcache_pd.router.proxy import ProxyHandle, free_port, start_in_thread
from lmcache_pd.router.settings import ProxySettings, settings_from_args
from lmcache_pd.router.stub import StubEngine

# fast health checks and short deadlines for tests
FAST = {
    "health_interval_s": 0.1,
    "health_timeout_s": 0.5,
    "health_fail_threshold": 1,
    "connect_timeout_s": 0.5,
}


@pytest.fixture
def journal() -> list[tuple[str, str, dict[str, Any]]]:
    return []


@pytest.fixture
def stubs(journal: list) -> Iterator[Callable[..., StubEngine]]:
    started: list[StubEngine] = []

    def make(name: str, **knobs: Any) -> StubEngine:
        engine = StubEngine(name, journal=journal)
        for key, value in knobs.items():
            setattr(engine, key, value)
        started.append(engine.start())
        return engine

    yield make
    for engine in started:
        engine.stop()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyHandle]]:
    handles: list[ProxyHandle] = []

    def make(
        argv: list[str], config: dict[str, Any] | None = None, **overrides: Any
    ) -> ProxyHandle:
        argv = [*argv, "--port", "0"]
        if config:
            path = tmp_path / f"proxy{len(handles)}.yaml"
            path.write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
            argv += ["--config", str(path)]
        settings: ProxySettings = settings_from_args(argv)
        settings = msgspec.structs.replace(settings, **{**FAST, **overrides})
        handle = start_in_thread(settings)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=20.0) as c:
        yield c


@pytest.fixture
def dead_url() -> Callable[[], str]:
    """Makes URLs nothing listens on (connection refused)."""
    return lambda: f"http://127.0.0.1:{free_port()}"
