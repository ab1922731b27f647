"""The remote tier's config keys and ``remote_url`` parsing (no server needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lmcache_pd.config import LMCACHE_IGNORED_KEYS, ConfigError, RemoteSerde, load_config
from lmcache_pd.tiers.remote_url import RemoteScheme, RemoteURLError, parse_remote_url


def test_lmcache_remote_keys_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "chunk_size: 256\nremote_url: redis://10.0.0.5:6380/2\nremote_serde: naive\n"
        "remote_timeout_s: 0.25\nremote_write_queue_size: 16\n"
    )
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path, env={})
    assert cfg.remote_url == "redis://10.0.0.5:6380/2"
    assert cfg.remote_serde is RemoteSerde.NAIVE
    assert cfg.remote_timeout_s == 0.25 and cfg.remote_write_queue_size == 16
    assert not any("ignoring" in r.getMessage() for r in caplog.records)
    assert "remote_url" not in LMCACHE_IGNORED_KEYS
    assert "remote_serde" not in LMCACHE_IGNORED_KEYS


def test_remote_keys_from_environment() -> None:
    cfg = load_config(
        env={"LMCACHE_REMOTE_URL": "valkey://cache:6379", "LMCACHE_REMOTE_TIMEOUT_S": "2"}
    )
    assert cfg.remote_url == "valkey://cache:6379" and cfg.remote_timeout_s == 2.0


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg.remote_url is None and cfg.remote_serde is RemoteSerde.NAIVE
    assert cfg.remote_timeout_s > 0 and cfg.remote_write_queue_size > 0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"remote_serde": "pickle"}, "remote_serde: expected one of 'naive', got 'pickle'"),
        ({"remote_timeout_s": 0}, "remote_timeout_s: must be > 0"),
        ({"remote_write_queue_size": 0}, "remote_write_queue_size: must be > 0"),
        ({"remote_url": ["redis://a"]}, "remote_url: expected string or null"),
    ],
)
def test_bad_remote_keys_are_refused_by_name(overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides, env={})
    assert any(e.startswith(expected) for e in info.value.errors), info.value.errors


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "db", "path", "tls"),
    [
        ("redis://127.0.0.1:6379/0", RemoteScheme.REDIS, "127.0.0.1", 6379, 0, None, False),
        ("redis://cache", RemoteScheme.REDIS, "cache", 6379, 0, None, False),
        ("redis://cache:7000/3", RemoteScheme.REDIS, "cache", 7000, 3, None, False),
        ("rediss://cache:6380", RemoteScheme.REDISS, "cache", 6380, 0, None, True),
        ("valkey://10.1.2.3:6379/1", RemoteScheme.VALKEY, "10.1.2.3", 6379, 1, None, False),
        ("valkeys://cache", RemoteScheme.VALKEYS, "cache", 6379, 0, None, True),
        ("redis://[::1]:6379", RemoteScheme.REDIS, "::1", 6379, 0, None, False),
        (
            "unix:///run/redis/redis.sock",
            RemoteScheme.UNIX,
            None,
            6379,
            0,
            "/run/redis/redis.sock",
            False,
        ),
        ("unix:///tmp/r.sock?db=4", RemoteScheme.UNIX, None, 6379, 4, "/tmp/r.sock", False),
        ("unix://relative.sock", RemoteScheme.UNIX, None, 6379, 0, "relative.sock", False),
    ],
)
def test_url_forms(
    url: str,
    scheme: RemoteScheme,
    host: str | None,
    port: int,
    db: int,
    path: str | None,
    tls: bool,
) -> None:
    parsed = parse_remote_url(url)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.db, parsed.path, parsed.tls) == (
        scheme,
        host,
        port,
        db,
        path,
        tls,
    )


def test_password_is_used_and_never_logged() -> None:
    parsed = parse_remote_url("redis://app:s3cr%40t@cache:6379/0")
    assert parsed.username == "app" and parsed.password == "s3cr@t"
    assert "s3cr" not in parsed.redacted() and "***" in parsed.redacted()
    assert parsed.client_kwargs()["password"] == "s3cr@t"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "empty"),
        ("http://cache:6379", "scheme must be one of"),
        ("memcached://cache", "scheme must be one of"),
        ("redis://", "no host"),
        ("redis://:6379", "no host"),
        ("redis://cache:port", "port must be a number"),
        ("redis://cache:70000", "port must be a number"),
        ("redis://cache/db1", "database must be a number"),
        ("redis://cache/1?db=2", "database is given twice"),
        ("redis://cache?timeout=3", "unknown query parameter"),
        ("redis://cache#x", "fragment"),
        ("unix://", "needs a socket path"),
    ],
)
def test_malformed_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(RemoteURLError) as info:
        parse_remote_url(url)
    assert str(info.value).startswith("remote_url ") and why in str(info.value)
