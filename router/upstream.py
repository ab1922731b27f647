"""The proxy's HTTP client to the engines: one pooled aiohttp session, errors made ours.

Why aiohttp and not httpx: measured on this project's 2-core box against the stub
engine, httpx.AsyncClient did 592 req/s at concurrency 1 and 285 req/s at 16;
aiohttp did 2,184 and 2,659 (``benchmarks/results/proxy_*.json`` has the proxy's
figures). The proxy's cost is mostly its client, so the client is the fast one.

Callers see :class:`Reply` (a fully read answer), :class:`Stream` (an open 200 answer to
relay) and three exceptions: :class:`ConnectFailed` (nothing reached the engine: safe to
retry elsewhere, and a reason to eject it), :class:`Deadline` and :class:`Broken`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec


class UpstreamError(Exception):
    """An engine request that did not produce an answer."""


class ConnectFailed(UpstreamError):
    """Could not connect (refused, unreachable, connect timeout)."""


class Deadline(UpstreamError):
    """No (complete) answer within the deadline."""


class Broken(UpstreamError):
    """The connection broke or the answer was malformed."""


_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"date",
        b"server",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
)


def relay_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """Engine response headers worth passing on (no hop-by-hop, no length), as ASGI wants."""
    return [(k.lower(), v) for k, v in raw if k.lower() not in _HOP_BY_HOP]


@dataclass
class Reply:
    status: int
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            return None


class Stream:
    """An open upstream answer (status 200) whose body is relayed chunk by chunk."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.raw_headers = relay_headers(resp.raw_headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except asyncio.TimeoutError:
            raise Deadline("engine stream idle past stream_idle_timeout_s") from None
        except aiohttp.ClientError as exc:
            raise Broken(f"engine stream broke: {exc!r}") from None

    def close(self) -> None:
        """Drop the connection (the engine sees its client go away and aborts)."""
        self._resp.close()


def _wrap(exc: BaseException) -> UpstreamError:
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return ConnectFailed(str(exc) or type(exc).__name__)
    if isinstance(exc, asyncio.TimeoutError):
        return Deadline("engine did not answer within the deadline")
    return Broken(f"{type(exc).__name__}: {exc}")


_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class Upstream:
    """Pooled keep-alive connections to every engine (create inside the event loop)."""

    def __init__(self, max_connections: int, connect_timeout_s: float) -> None:
        connector = aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=0, keepalive_timeout=4.0, ttl_dns_cache=300
        )
        # keepalive below uvicorn's (vLLM's) 5 s server-side timeout: no stale reuse
        self.session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # engines set no cookies; skip the jar
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
        )
        self.connect_timeout_s = connect_timeout_s
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}

    def _timeout(self, total: float | None, read: float | None = None) -> aiohttp.ClientTimeout:
        key = (total, read)
        t = self._timeouts.get(key)
        if t is None:
            t = aiohttp.ClientTimeout(
                total=total, sock_connect=self.connect_timeout_s, sock_read=read
            )
            if len(self._timeouts) < 64:  # a handful of configured deadlines
                self._timeouts[key] = t
        return t

    async def request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> Reply:
        """Send and read the whole answer within ``timeout_s``."""
        try:
            async with self.session.request(
                method, url, data=data, headers=headers, timeout=self._timeout(timeout_s)
            ) as resp:
                body = await resp.read()
                return Reply(resp.status, relay_headers(resp.raw_headers), body)
        except _ERRORS as exc:
            raise _wrap(exc) from None

    async def open(
        self,
        url: str,
        data: bytes,
        headers: Mapping[str, str],
        head_timeout_s: float,
        idle_timeout_s: float,
    ) -> Stream | Reply:
        """POST and return the open :class:`Stream` if the engine answers 200, else the
        whole :class:`Reply`. The head must come within ``head_timeout_s``; afterwards
        each body read may wait ``idle_timeout_s``."""
        try:
            resp = await asyncio.wait_for(
                self.session.post(
                    url, data=data, headers=headers, timeout=self._timeout(None, idle_timeout_s)
                ),
                head_timeout_s,
            )
        except _ERRORS as exc:
            raise _wrap(exc) from None
        if resp.status == 200:
            return Stream(resp)
        try:
            body = await asyncio.wait_for(resp.read(), head_timeout_s)
            return Reply(resp.status, relay_headers(resp.raw_headers), body)
        except _ERRORS as exc:
            raise _wrap(exc) from None
        finally:
            resp.release()

    async def close(self) -> None:
        await self.session.close()
