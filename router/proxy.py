"""OpenAI-compatible proxy process: the FastAPI app, its lifecycle and ``main``.

Owns the HTTP surface (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``, ``/metrics``, ``/v1/proxy/state``), the shared pooled upstream client
(``upstream.py``), the health checker and the optional ZMQ handoff listener. The request
flow itself lives in ``flow.py``; routing in ``policy.py``; settings and CLI flags in
``settings.py``.

Start it with ``lmcache-pd proxy --prefiller URL --decoder URL`` (see ``main``), in-process
with :func:`start_in_thread`, or as a child process with :func:`spawn`.
Imports no torch, numpy, NIXL or vLLM.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from lmcache_pd.config import ConfigError
from lmcache_pd.router.errors import ErrorType, error_body
from lmcache_pd.router.flow import (
    Endpoint,
    ProxyError,
    Router,
    UpstreamAnswer,
    reply_response,
    validate,
)
from lmcache_pd.router.handoff import HandoffListener
from lmcache_pd.router.metrics import ErrorKind, ProxyMetrics
from lmcache_pd.router.pool import HealthChecker
from lmcache_pd.router.relay import first_of
from lmcache_pd.router.settings import ProxySettings, settings_from_args
from lmcache_pd.router.upstream import Upstream, UpstreamError

log = logging.getLogger("lmcache_pd.router")
_JSON = "application/json"
_FORWARD_HEADERS = (b"authorization",)


def _auth_secret(settings: ProxySettings) -> bytes:
    """The control-plane secret, resolved like the engines resolve it (core config from
    ``--config`` if given, ``LMCACHE_*`` env, ``pd_auth_secret_file``)."""
    from lmcache_pd.config import load_config
    from lmcache_pd.router.settings import load_file

    if settings.config_file:
        return load_file(settings.config_file)[1].auth_secret()
    return load_config(None).auth_secret()


@dataclass
class _AppState:
    """What the routes of one app share: settings, metrics, and the router once the
    lifespan started it."""

    settings: ProxySettings
    metrics: ProxyMetrics
    router: Router | None = None

    def live(self) -> Router:
        if self.router is None:
            raise RuntimeError("proxy app used before its lifespan started")
        return self.router


def _lifespan(st: _AppState) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the upstream client, handoff listener, router and health checker with the
    app; stop them with it."""
    settings = st.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = Upstream(settings.max_connections, settings.connect_timeout_s)
        handoff = None
        if settings.handoff_port is not None:
            handoff = HandoffListener(
                _auth_secret(settings),
                settings.handoff_host,
                settings.handoff_port,
                avoid=(settings.port,),  # uvicorn binds it after this starts
            )
            await handoff.start()
        router = Router(settings, client, st.metrics, handoff)
        checker = HealthChecker(
            [router.prefill, router.decode],
            client,
            settings.health_interval_s,
            settings.health_timeout_s,
            settings.health_fail_threshold,
        )
        checker.start()
        router.events.start()
        st.router = router
        app.state.router = router
        log.warning(
            "lmcache-pd proxy on http://%s:%d: %d prefiller(s), %d decoder(s), "
            "policy %s, handoff %s",
            settings.host,
            settings.port,
            len(settings.prefillers),
            len(settings.decoders),
            settings.policy.value,
            handoff.address if handoff else "HTTP-only",
        )
        try:
            yield
        finally:
            await checker.stop()
            await router.events.stop()
            if handoff is not None:
                await handoff.stop()
            await client.close()

    return lifespan


def _forwarded_headers(raw_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers sent on to the engines: JSON content type and the client's auth."""
    headers = {"content-type": _JSON}
    for name, value in raw_headers:
        if name.lower() in _FORWARD_HEADERS:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
    return headers


async def _answer(
    st: _AppState,
    endpoint: Endpoint,
    raw_headers: list[tuple[bytes, bytes]],
    raw: bytes,
    receive: Any,
) -> Response:
    """The response to one POST (body already read); never raises ProxyError."""
    try:
        try:
            payload = validate(endpoint, msgspec.json.decode(raw))
        except msgspec.DecodeError as exc:
            raise ProxyError(
                400, f"request body is not valid JSON: {exc}", ErrorKind.BAD_REQUEST
            ) from None
        serving = st.live().serve(endpoint, payload, _forwarded_headers(raw_headers))
        resp = await first_of(serving, receive)
    except ProxyError as exc:
        if exc.kind is ErrorKind.BAD_REQUEST:
            st.metrics.errors.labels(exc.kind.value).inc()
        return exc.response()
    except UpstreamAnswer as exc:
        return exc.response()
    if resp is None:
        st.metrics.errors.labels(ErrorKind.CLIENT_DISCONNECT.value).inc()
        return Response(status_code=499)
    return resp


async def _models(st: _AppState) -> Response:
    """The first healthy engine's ``/v1/models`` answer."""
    router = st.live()
    for engine in router.decode.healthy() + router.prefill.healthy():
        try:
            reply = await router.client.request(
                "GET", engine.url + "/v1/models", timeout_s=st.settings.connect_timeout_s * 2
            )
        except UpstreamError:
            continue
        return reply_response(reply)
    return ProxyError(503, "no healthy engine answers /v1/models", ErrorKind.NO_ENGINE).response()


def _health(router: Router) -> Response:
    """Every engine's role, state and load; 503 while no decoder is healthy."""
    ok = bool(router.decode.healthy())
    body = {
        "status": "ok" if ok else "unavailable",
        "engines": [
            {
                "role": e.role.value,
                "url": e.url,
                "state": e.state.value,
                "inflight": e.inflight,
                "last_error": e.last_error,
            }
            for e in router.prefill.engines + router.decode.engines
        ],
    }
    return Response(msgspec.json.encode(body), 200 if ok else 503, media_type=_JSON)


def _proxy_state(router: Router) -> Response:
    """Requests in flight, the last finished ones, prefix map and handoff state."""
    policy = router.decode.policy
    body = {
        "inflight": len(router.table),
        "max_inflight": router.table.max_inflight,
        "finished": [r.to_dict() for r in list(router.table.finished)[-20:]],
        "finished_kept": len(router.table.finished),
        "prefix_map": len(getattr(policy, "prefixes", ())),
        "held_map": len(getattr(policy, "held", ())),
        "kv_events": [sub.status() for sub in router.events.subs],
        "handoff_pending": router.handoff.pending if router.handoff else 0,
        "handoff_address": router.handoff.address if router.handoff else None,
    }
    return Response(msgspec.json.encode(body), media_type=_JSON)


def _add_routes(app: FastAPI, st: _AppState) -> None:
    """The HTTP surface: the two OpenAI POST routes, models, health, metrics, state."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """404/405 and friends, OpenAI-shaped like every other error of the proxy."""
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = error_body(message, exc.status_code, ErrorType.INVALID_REQUEST)
        return Response(body, exc.status_code, media_type=_JSON)

    async def handle(request: Request, endpoint: Endpoint) -> Response:
        body = await request.body()
        return await _answer(st, endpoint, request.headers.raw, body, request.receive)

    @app.post(Endpoint.COMPLETIONS.value)
    async def completions(request: Request) -> Response:
        return await handle(request, Endpoint.COMPLETIONS)

    @app.post(Endpoint.CHAT.value)
    async def chat_completions(request: Request) -> Response:
        return await handle(request, Endpoint.CHAT)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await _models(st)

    @app.get("/health")
    async def health() -> Response:
        return _health(st.live())

    @app.get("/metrics")
    async def prom() -> Response:
        data, ctype = st.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/proxy/state")
    async def proxy_state() -> Response:
        return _proxy_state(st.live())


def create_app(settings: ProxySettings) -> FastAPI:
    """The proxy as an ASGI app; engines, health checks and sockets start with it."""
    st = _AppState(settings, ProxyMetrics())
    app = FastAPI(
        title="lmcache-pd proxy",
        lifespan=_lifespan(st),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    _add_routes(app, st)
    app.state.metrics = st.metrics
    app.state.answer = functools.partial(_answer, st)
    return app


class ProxyApp:
    """ASGI entry: the two hot POST routes go straight to the flow (skipping FastAPI's
    routing and dependency solving, ~100 us a request here); all else to FastAPI."""

    _FAST = {e.value: e for e in Endpoint}

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.fastapi = create_app(settings)
        self._answer = self.fastapi.state.answer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        endpoint = self._FAST.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            return await self.fastapi(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                err = ProxyError(
                    400,
                    f"request body over {self.settings.max_body_bytes} bytes",
                    ErrorKind.BAD_REQUEST,
                )
                return await err.response()(scope, receive, send)
            chunks.append(chunk)
            more = msg.get("more_body", False)
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        response = await self._answer(endpoint, scope["headers"], raw, receive)
        return await response(scope, receive, send)


def _uvicorn_config(app: ProxyApp, settings: ProxySettings, sock_port: int) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=sock_port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        loop="auto",
        http="auto",
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ProxyHandle:
    """A proxy running in a thread of this process (tests, in-process embedding)."""

    url: str
    app: ProxyApp
    server: Any
    thread: threading.Thread

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_in_thread(settings: ProxySettings, timeout_s: float = 10.0) -> ProxyHandle:
    """Start the proxy on ``settings.host:settings.port`` (0 = a free port) in a thread."""
    import uvicorn

    if settings.port == 0:
        settings = msgspec.structs.replace(settings, port=free_port(settings.host))
    app = ProxyApp(settings)
    server = uvicorn.Server(_uvicorn_config(app, settings, settings.port))
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.run, name="lmcache-pd-proxy", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"proxy did not start on {settings.host}:{settings.port}")
        time.sleep(0.01)
    return ProxyHandle(f"http://{settings.host}:{settings.port}", app, server, thread)


def spawn(
    argv: list[str], timeout_s: float = 15.0, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``lmcache-pd proxy ARGV`` as a child process; wait until it listens.

    Returns ``(process, base_url)``. ``--port`` is chosen free when not in ``argv``.
    The caller terminates the process.
    """
    argv = list(argv)
    if "--port" not in argv:
        argv += ["--port", str(free_port())]
    port = int(argv[argv.index("--port") + 1])
    host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from lmcache_pd.router.proxy import main; sys.exit(main(sys.argv[1:]))",
        *argv,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return proc, url
        time.sleep(0.05)
    proc.terminate()
    raise RuntimeError(f"proxy did not listen on {url} within {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    """``lmcache-pd proxy`` entry point."""
    try:
        settings = settings_from_args(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"lmcache-pd proxy: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(ProxyApp(settings), settings, settings.port))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
