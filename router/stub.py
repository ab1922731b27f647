"""A stub OpenAI engine: a real HTTP server that answers at once and records requests.

Used by the proxy tests (as prefiller / decoder stand-ins that record what they receive)
and by ``benchmarks/proxy.py`` (as the baseline server). It is a plain ASGI app served
by uvicorn, answering ``/v1/completions``, ``/v1/chat/completions`` (JSON or SSE),
``/tokenize`` (one deterministic id per whitespace-separated word), ``/v1/models`` and
``/health``. Knobs: ``delay_s`` (and ``jitter``) before answering, ``stream_chunks`` /
``stream_interval_s`` for SSE, ``healthy``, ``fail_status``. A client that goes away
mid-answer is recorded in ``cancelled``.

Run standalone: ``python -m lmcache_pd.router.stub --port N [--name NAME]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

_JSON_HDR = [(b"content-type", b"application/json")]
_SSE_HDR = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def word_tokens(text: str) -> list[int]:
    """Deterministic token ids: one per whitespace-separated word (crc32 mod 50000)."""
    return [zlib.crc32(w.encode()) % 50_000 for w in text.split()]


def _text_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


class StubEngine:
    """The ASGI app plus its recorded traffic."""

    def __init__(
        self,
        name: str = "stub",
        stream_chunks: int = 4,
        record: int = 10_000,
        journal: list[tuple[str, str, dict[str, Any]]] | None = None,
    ) -> None:
        self.name = name
        self.journal = journal  # shared between stubs: global arrival order
        self.on_request: Callable[[str, dict[str, Any]], None] | None = None
        self.stream_chunks = stream_chunks
        self.stream_interval_s = 0.0
        self.delay_s = 0.0
        self.jitter = 0.0  # delay is uniform in delay_s * [1 - jitter, 1 + jitter]
        self._rng = random.Random(0)
        self.healthy = True
        self.fail_status = 0
        self.requests: deque[tuple[str, dict[str, Any]]] = deque(maxlen=record)
        self.cancelled: list[str] = []
        self.served = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ---- answers --------------------------------------------------------------
    def completion(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        chat = path.endswith("chat/completions")
        out: dict[str, Any] = {
            "id": f"cmpl-{self.name}-{self.served}",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": body.get("model", "stub"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length",
                    **(
                        {"message": {"role": "assistant", "content": "hi"}}
                        if chat
                        else {"text": " hi"}
                    ),
                }
            ],
            "usage": {
                "prompt_tokens": len(word_tokens(_text_of(body))),
                "completion_tokens": 1,
                "total_tokens": 0,
            },
        }
        params = body.get("kv_transfer_params")
        if isinstance(params, dict) and params.get("do_remote_decode"):
            out["kv_transfer_params"] = {
                "req_id": params.get("req_id"),
                "remote_engine_id": self.name,
                "chunks": 2,
            }
        return out

    def sse_events(self, path: str) -> list[bytes]:
        chat = path.endswith("chat/completions")
        events = []
        for i in range(self.stream_chunks):
            delta = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
            ev = {
                "id": f"cmpl-{self.name}",
                "object": "chunk",
                "model": "stub",
                "choices": [{"index": 0, **delta, "finish_reason": None}],
            }
            events.append(b"data: " + msgspec.json.encode(ev) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    # ---- ASGI -----------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"], scope["method"]
        chunks = []
        more = True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        if method == "GET" and path == "/health":
            return await self._reply(send, 200 if self.healthy else 503, b"{}")
        if method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": "stub", "object": "model"}]}
            return await self._reply(send, 200, msgspec.json.encode(models))
        try:
            body = msgspec.json.decode(raw) if raw else {}
        except msgspec.DecodeError:
            return await self._reply(send, 400, b'{"error": {"message": "bad json"}}')
        if path == "/tokenize":
            tokens = word_tokens(_text_of(body))
            return await self._reply(
                send,
                200,
                msgspec.json.encode(
                    {"tokens": tokens, "count": len(tokens), "max_model_len": 4096}
                ),
            )
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return await self._reply(send, 404, b'{"error": {"message": "not found"}}')
        self.requests.append((path, body))
        self.served += 1
        if self.journal is not None:
            self.journal.append((self.name, path, body))
        if self.on_request is not None:
            self.on_request(path, body)
        tag = str((body.get("kv_transfer_params") or {}).get("req_id", self.served))
        delay = self.delay_s * (1 + self.jitter * (2 * self._rng.random() - 1))
        if delay > 0 and not await self._sleep_or_disconnect(receive, delay, tag):
            return
        if self.fail_status:
            return await self._reply(send, self.fail_status, b'{"error": {"message": "stub"}}')
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HDR})
            try:
                for ev in self.sse_events(path):
                    if self.stream_interval_s and not await self._sleep_or_disconnect(
                        receive, self.stream_interval_s, tag
                    ):
                        return
                    await send({"type": "http.response.body", "body": ev, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                self.cancelled.append(tag)
            return None
        return await self._reply(send, 200, msgspec.json.encode(self.completion(path, body)))

    async def _sleep_or_disconnect(self, receive: Any, seconds: float, tag: str) -> bool:
        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(gone())
        done, _ = await asyncio.wait((watch,), timeout=seconds)
        if done:
            self.cancelled.append(tag)
            return False
        watch.cancel()
        return True

    @staticmethod
    async def _reply(send: Any, status: int, data: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": _JSON_HDR})
        await send({"type": "http.response.body", "body": data})

    # ---- serving --------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> StubEngine:
        """Serve in a daemon thread (port 0: a free port); returns self with ``url`` set."""
        import uvicorn

        from lmcache_pd.router.proxy import free_port

        port = port or free_port(host)
        config = uvicorn.Config(
            self, host=host, port=port, log_level="error", access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None
        self._thread = threading.Thread(target=self._server.run, daemon=True, name=self.name)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"stub engine {self.name} did not start")
            time.sleep(0.01)
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="stub")
    p.add_argument("--stream-chunks", type=int, default=4)
    p.add_argument("--delay-ms", type=float, default=0.0, help="service time per request")
    p.add_argument("--jitter", type=float, default=0.0, help="service time +- this fraction")
    args = p.parse_args(argv)
    import uvicorn

    engine = StubEngine(args.name, args.stream_chunks, record=1)
    engine.delay_s = args.delay_ms / 1000
    engine.jitter = args.jitter
    uvicorn.run(
        engine, host=args.host, port=args.port, log_level="error", access_log=False, lifespan="off"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
