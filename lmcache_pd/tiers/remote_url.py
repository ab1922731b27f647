"""``remote_url``: the remote tier's server address, parsed and checked.

Forms: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS), ``valkey://``
and ``valkeys://`` (aliases: Valkey speaks the same protocol), ``unix:///path.sock[?db=N]``.
Anything else is a :class:`RemoteURLError` whose message names the key and the problem.
The password never appears in :meth:`RemoteURL.redacted`, the form used in log lines.
"""

from __future__ import annotations

import enum
import urllib.parse
from typing import Any

import msgspec

DEFAULT_PORT = 6379


class RemoteScheme(str, enum.Enum):
    """URL schemes of ``remote_url``; ``valkey`` is an alias of ``redis`` (same protocol)."""

    REDIS = "redis"
    REDISS = "rediss"
    VALKEY = "valkey"
    VALKEYS = "valkeys"
    UNIX = "unix"


class RemoteURLError(ValueError):
    """A ``remote_url`` that cannot be used; the message names the key and the problem."""


class RemoteURL(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed ``remote_url``."""

    scheme: RemoteScheme
    host: str | None = None
    port: int = DEFAULT_PORT
    path: str | None = None  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme in (RemoteScheme.REDISS, RemoteScheme.VALKEYS)

    def redacted(self) -> str:
        """The URL for log lines: no password."""
        auth = f"{self.username or ''}:***@" if self.password else ""
        if self.scheme is RemoteScheme.UNIX:
            return f"unix://{auth}{self.path}" + (f"?db={self.db}" if self.db else "")
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.scheme.value}://{auth}{host}:{self.port}/{self.db}"

    def client_kwargs(self) -> dict[str, Any]:
        """Connection arguments for ``redis.Redis`` (timeouts and retries are added by
        the store)."""
        common: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
        }
        if self.scheme is RemoteScheme.UNIX:
            return {**common, "unix_socket_path": self.path}
        return {**common, "host": self.host, "port": self.port, "ssl": self.tls}


def parse_remote_url(url: str) -> RemoteURL:
    """Parse ``remote_url``: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://``
    (TLS), ``valkey://`` / ``valkeys://`` (aliases), ``unix:///path/to.sock[?db=N]``.
    Raises :class:`RemoteURLError` naming what is wrong."""

    def bad(why: str) -> RemoteURLError:
        return RemoteURLError(f"remote_url {url!r}: {why}")

    if not isinstance(url, str) or not url.strip():
        raise bad("empty")
    try:
        parts = urllib.parse.urlsplit(url.strip())
    except ValueError as exc:
        raise bad(str(exc)) from None
    try:
        scheme = RemoteScheme(parts.scheme.lower())
    except ValueError:
        names = ", ".join(f"{s.value}://" for s in RemoteScheme)
        raise bad(f"scheme must be one of {names}") from None
    if parts.fragment:
        raise bad("a '#fragment' has no meaning here")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise bad(f"unknown query parameter(s) {unknown}; only 'db' is understood")
    db_text: str | None = query["db"][-1] if "db" in query else None
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    if scheme is RemoteScheme.UNIX:
        path = urllib.parse.unquote((parts.hostname or "") + parts.path)
        if parts.netloc and not parts.path:
            path = urllib.parse.unquote(parts.netloc.rpartition("@")[2])
        if not path:
            raise bad("unix:// needs a socket path, e.g. unix:///run/redis/redis.sock")
        return RemoteURL(
            scheme=scheme,
            path=path,
            db=_db(db_text, bad),
            username=username,
            password=password,
        )
    host = parts.hostname
    if not host:
        raise bad("no host; expected e.g. redis://127.0.0.1:6379/0")
    try:
        port = parts.port
    except ValueError:
        raise bad("port must be a number in 1..65535") from None
    if port is not None and not 1 <= port <= 65535:
        raise bad("port must be a number in 1..65535")
    path = parts.path.strip("/")
    if path:
        if db_text is not None:
            raise bad("the database is given twice (path and ?db=)")
        db_text = path
    return RemoteURL(
        scheme=scheme,
        host=host,
        port=port if port is not None else DEFAULT_PORT,
        db=_db(db_text, bad),
        username=username,
        password=password,
    )


def _db(text: str | None, bad: Any) -> int:
    if text is None or text == "":
        return 0
    if not text.isdigit():
        raise bad(f"database must be a number >= 0, got {text!r}")
    return int(text)
