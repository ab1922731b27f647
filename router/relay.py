"""Relaying an upstream streaming answer to the client, byte for byte.

:class:`RelayResponse` is an ASGI response that copies the engine's raw body chunks
(SSE events) to the client as they arrive, and watches for the client going away: a
disconnect closes the upstream connection at once (vLLM aborts the request when its
client disconnects), whether or not the engine is producing bytes at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from lmcache_pd.router.table import RequestState
from lmcache_pd.router.upstream import Stream, UpstreamError
from starlette.responses import Response

log = logging.getLogger("lmcache_pd.router")


def _sse_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "code": 502}}
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


class RelayResponse(Response):
    """Streams an open upstream :class:`Stream` to the client; calls ``on_close`` once."""

    def __init__(self, upstream: Stream, on_close: Callable[[RequestState, str], None]) -> None:
        self.upstream = upstream
        self.status_code = upstream.status
        self.on_close = on_close
        self.background = None
        self.raw_headers = upstream.raw_headers

    async def _copy(self, send: Any) -> tuple[RequestState, str]:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        state, error = RequestState.DONE, ""
        try:
            async for chunk in self.upstream.chunks():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            state, error = RequestState.FAILED, f"decoder stream broke: {exc}"
            log.warning("%s", error)
            await send({"type": "http.response.body", "body": _sse_error(error), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return state, error

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        state, error = RequestState.CANCELLED, "client disconnected"
        copy = asyncio.ensure_future(self._copy(send))
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((copy, watch), return_when=asyncio.FIRST_COMPLETED)
            if copy.done() and not copy.cancelled() and copy.exception() is None:
                state, error = copy.result()
        finally:
            self.on_close(state, error)
            copy.cancel()
            watch.cancel()
            self.upstream.close()
            with contextlib.suppress(BaseException):
                await asyncio.gather(copy, watch, return_exceptions=True)
