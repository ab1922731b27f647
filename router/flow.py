"""The two-step request: route, prefill (max_tokens=1), handoff wait, decode, relay.

Owns what happens to one request once its body is parsed:

1. tokenize the prompt on an engine (``POST /tokenize``) when the policy or
   ``disagg_min_tokens`` needs token ids; chunk keys via ``lmcache_pd.chunks``;
2. pick a decoder (policy), then unless the prompt is short, prefill on a prefiller
   with :class:`KVTransferParams` naming that decoder; a failed prefill (connect
   error, 5xx, timeout) is retried on another prefiller, then the request goes
   decode-only (counted);
3. optionally wait for the prefiller's ``HandoffDone`` (ZMQ) with a deadline;
4. send the decoder the original body with the returned ``kv_transfer_params``
   and relay its answer (SSE byte for byte, or the JSON body).

Errors are OpenAI-shaped: 400 bad body, 503 no healthy engine / overloaded,
504 deadline. Engine 4xx answers are passed through unchanged.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.responses import Response

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.metrics import RateLimitedLog
from lmcache_pd.protocol import HandoffDone
from lmcache_pd.router.errors import error_body
from lmcache_pd.router.handoff import HandoffListener
from lmcache_pd.router.kv_events import Subscriptions
from lmcache_pd.router.kv_params import KVTransferParams, decode_params
from lmcache_pd.router.metrics import ErrorKind, Mode, ProxyMetrics
from lmcache_pd.router.policy import CacheAware, Engine, Role, make_policy
from lmcache_pd.router.pool import EnginePool
from lmcache_pd.router.relay import RelayResponse
from lmcache_pd.router.settings import PolicyKind, ProxySettings
from lmcache_pd.router.table import RequestRecord, RequestState, RequestTable, TableFull
from lmcache_pd.router.upstream import (
    Broken,
    ConnectFailed,
    Deadline,
    Reply,
    Stream,
    Upstream,
    UpstreamError,
)

log = logging.getLogger("lmcache_pd.router")

HASH_FINGERPRINT = b"lmcache-pd-proxy"
_CHAT_TOKENIZE_KEYS = (
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "tools",
    "add_special_tokens",
    "documents",
)
_JSON = "application/json"


class Endpoint(str, enum.Enum):
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"


class ProxyError(Exception):
    """An error answered to the client as OpenAI-shaped JSON."""

    def __init__(self, status: int, message: str, kind: ErrorKind) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    def response(self) -> Response:
        return Response(error_body(self.message, self.status), self.status, media_type=_JSON)


class UpstreamAnswer(Exception):
    """An engine's own 4xx answer, passed to the client unchanged."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"HTTP {reply.status}")
        self.reply = reply

    def response(self) -> Response:
        return reply_response(self.reply)


def reply_response(reply: Reply) -> Response:
    """An engine's full answer as the client's response (status, headers, body as is)."""
    resp = Response(reply.body, reply.status)
    resp.raw_headers = [*reply.raw_headers, (b"content-length", str(len(reply.body)).encode())]
    return resp


def validate(endpoint: Endpoint, payload: object) -> dict[str, Any]:
    """The request body as a dict, or ProxyError(400) naming what is wrong."""
    if not isinstance(payload, dict):
        raise ProxyError(400, "request body must be a JSON object", ErrorKind.BAD_REQUEST)
    if endpoint is Endpoint.COMPLETIONS:
        prompt = payload.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ProxyError(
                400,
                "'prompt' is required: a string, a list of strings or a list of token ids",
                ErrorKind.BAD_REQUEST,
            )
    else:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ProxyError(400, "'messages' is required: a non-empty list", ErrorKind.BAD_REQUEST)
    if not isinstance(payload.get("stream", False), bool):
        raise ProxyError(400, "'stream' must be a boolean", ErrorKind.BAD_REQUEST)
    return payload


def _estimate_tokens(endpoint: Endpoint, payload: dict[str, Any]) -> int:
    """Rough token count (4 chars per token) when the engine cannot tokenize."""
    if endpoint is Endpoint.COMPLETIONS:
        prompt = payload["prompt"]
        if isinstance(prompt, str):
            return len(prompt) // 4
        first = prompt[0]
        return (
            len(first)
            if isinstance(first, list)
            else len(prompt)
            if isinstance(first, int)
            else len(str(first)) // 4
        )
    return (
        sum(len(str(m.get("content", ""))) for m in payload["messages"] if isinstance(m, dict)) // 4
    )


@dataclass
class _Request:
    """One request on its way through the flow: what the client sent, its record in the
    request table, its chunk keys and the decoder chosen for it (the same values every
    step needs, passed as one)."""

    endpoint: Endpoint
    payload: dict[str, Any]
    headers: dict[str, str]
    rec: RequestRecord
    keys: list[bytes]
    decoder: Engine

    @property
    def stream(self) -> bool:
        return bool(self.payload.get("stream", False))


class Router:
    """Routing state and the request flow of one proxy instance."""

    def __init__(
        self,
        settings: ProxySettings,
        client: Upstream,
        metrics: ProxyMetrics,
        handoff: HandoffListener | None = None,
    ) -> None:
        self.s = settings
        self.client = client
        self.metrics = metrics
        self.handoff = handoff
        kv = [settings.decoder_endpoint(i) for i in range(len(settings.decoders))]

        def policy() -> Any:
            return make_policy(
                settings.policy, settings.prefix_map_entries, settings.load_guard_factor
            )

        self.prefill = EnginePool(Role.PREFILLER, settings.prefillers, policy(), metrics)
        self.decode = EnginePool(Role.DECODER, settings.decoders, policy(), metrics, kv)
        self.table = RequestTable(settings.max_inflight, settings.finished_history)
        self.hasher = ChunkHasher(HASH_FINGERPRINT, settings.chunk_size, settings.hash_algorithm)
        decode_policy = self.decode.policy
        self.events = Subscriptions.for_decoders(
            [settings.events_endpoint(i) for i in range(len(settings.decoders))],
            decode_policy.held if isinstance(decode_policy, CacheAware) else None,
            self.hasher,
            settings.events_resync_s,
        )
        self._need_tokens = (
            settings.policy is PolicyKind.CACHE_AWARE or settings.disagg_min_tokens > 0
        )
        self._tok_turn = 0
        self._warn = RateLimitedLog(log)  # per-request warnings: bursts, then 1 per 10 s

    # ---- tokenization --------------------------------------------------------------
    async def _tokens(
        self, endpoint: Endpoint, payload: dict[str, Any], headers: dict[str, str]
    ) -> list[int] | None:
        body: dict[str, Any]
        if endpoint is Endpoint.COMPLETIONS:
            prompt = payload["prompt"]
            if isinstance(prompt, list):
                first = prompt[0]
                if isinstance(first, int):
                    return prompt if all(isinstance(x, int) for x in prompt) else None
                if isinstance(first, list):
                    return first
                prompt = first
            body = {"prompt": prompt}
        else:
            body = {"messages": payload["messages"]}
            body.update({k: payload[k] for k in _CHAT_TOKENIZE_KEYS if k in payload})
        if "model" in payload:
            body["model"] = payload["model"]
        engines = self.prefill.healthy() or self.decode.healthy()
        if not engines:
            return None
        self._tok_turn += 1
        engine = engines[self._tok_turn % len(engines)]
        try:
            reply = await self.client.request(
                "POST",
                engine.url + "/tokenize",
                msgspec.json.encode(body),
                headers,
                self.s.tokenize_timeout_s,
            )
            data = reply.json() if reply.status == 200 else None
            tokens = data.get("tokens") if isinstance(data, dict) else None
            if isinstance(tokens, list):
                return tokens
        except UpstreamError as exc:
            log.debug("tokenize on %s failed: %s", engine.url, exc)
        self.metrics.errors.labels(ErrorKind.TOKENIZE_FAILED.value).inc()
        return None

    # ---- the request -----------------------------------------------------------------
    async def _prompt_keys(
        self, endpoint: Endpoint, payload: dict[str, Any], headers: dict[str, str]
    ) -> tuple[list[bytes], int]:
        """Chunk keys of the prompt and its token count (-1 when not needed; an estimate
        when the engines could not tokenize it, and then no keys)."""
        if not self._need_tokens:
            return [], -1
        tokens = await self._tokens(endpoint, payload, headers)
        if tokens is None:
            return [], _estimate_tokens(endpoint, payload)
        try:
            return self.hasher.keys(tokens), len(tokens)
        except ValueError:
            return [], len(tokens)

    async def serve(
        self, endpoint: Endpoint, payload: dict[str, Any], headers: dict[str, str]
    ) -> Response:
        """Serve one validated request; raises ProxyError / UpstreamAnswer."""
        try:
            rec = self.table.open(endpoint.value)
        except TableFull as exc:
            raise ProxyError(503, f"proxy overloaded: {exc}", ErrorKind.OVERLOADED) from None
        self.metrics.table_size.set(len(self.table))
        handed_off = False
        try:
            keys, ntokens = await self._prompt_keys(endpoint, payload, headers)
            rec.prompt_tokens = ntokens
            choice = self.decode.choose(keys)
            if choice is None:
                raise ProxyError(503, "no healthy decoder engine", ErrorKind.NO_ENGINE)
            req = _Request(endpoint, payload, headers, rec, keys, choice.engine)
            # counted in flight from now on, so concurrent arrivals see this choice
            self.decode.acquire(req.decoder, keys)
            try:
                params: dict[str, Any] | None = None
                mode = Mode.DIRECT
                short = 0 <= ntokens < self.s.disagg_min_tokens
                if self.prefill.engines and not short:
                    params, mode = await self._prefill(req)
            except BaseException:
                self.decode.release(req.decoder)
                raise
            self.metrics.requests.labels(endpoint.value, mode.value).inc()
            rec.mode = mode.value
            # _decode owns the acquired decoder from here (releases or hands it on)
            resp = await self._decode(req, params)
            handed_off = isinstance(resp, RelayResponse)
            return resp
        except asyncio.CancelledError:
            self.table.close(rec, RequestState.CANCELLED, "client disconnected")
            raise
        except ProxyError as exc:
            self.metrics.errors.labels(exc.kind.value).inc()
            self.table.close(rec, RequestState.FAILED, exc.message)
            raise
        except UpstreamAnswer as exc:
            self.metrics.errors.labels(ErrorKind.UPSTREAM.value).inc()
            self.table.close(rec, RequestState.FAILED, str(exc))
            raise
        finally:
            if not handed_off:
                self.table.close(rec, RequestState.DONE)
            self.metrics.table_size.set(len(self.table))

    # ---- step 1: prefill ----------------------------------------------------------
    def _prefill_body(self, req: _Request, sent: KVTransferParams) -> bytes:
        body = dict(req.payload)
        body["max_tokens"] = 1
        if req.endpoint is Endpoint.CHAT:
            body["max_completion_tokens"] = 1
        body["stream"] = False
        # invalid or wasteful with one token and no stream: the prompt's KV is the same
        for key in ("stream_options", "min_tokens", "n", "best_of"):
            body.pop(key, None)
        body["kv_transfer_params"] = sent.to_dict()
        return msgspec.json.encode(body)

    async def _prefill(self, req: _Request) -> tuple[dict[str, Any] | None, Mode]:
        """Prefill on a prefiller (retried on another), or fall back to decode-only."""
        req.rec.state = RequestState.PREFILLING
        tried: set[Engine] = set()
        for attempt in range(1 + self.s.prefill_retries):
            choice = self.prefill.choose(req.keys, frozenset(tried))
            if choice is None:
                break
            tried.add(choice.engine)
            req_id = req.rec.req_id if attempt == 0 else f"{req.rec.req_id}-r{attempt}"
            try:
                result = await self._prefill_on(req, choice.engine, req_id)
            finally:
                if self.handoff is not None:
                    self.handoff.discard(req_id)  # whatever happened, no waiter stays
            if result is not None:
                return result
        self.metrics.fallbacks.inc()
        self._warn.warning(
            "%s: prefill failed on %d prefiller(s); decode-only on %s (the decoder "
            "recomputes the prompt); check the prefillers' logs and GET /health",
            req.rec.req_id,
            len(tried),
            req.decoder.url,
        )
        return None, Mode.FALLBACK

    async def _prefill_on(
        self, req: _Request, p: Engine, req_id: str
    ) -> tuple[dict[str, Any] | None, Mode] | None:
        """One prefill attempt on ``p``: the decode params, or None if ``p`` failed."""
        sent = KVTransferParams(
            req_id=req_id,
            decoder_host=req.decoder.kv_host,
            decoder_init_port=req.decoder.kv_port,
            proxy_notify=self.handoff.address if self.handoff else None,
        )
        fut = self.handoff.expect(req_id) if self.handoff else None
        reply = await self._post_prefill(req, p, req_id, self._prefill_body(req, sent))
        if reply is None:
            return None
        answer = reply.json()
        returned = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if fut is not None and not await self._handoff_done(req, req_id, fut):
            return None, Mode.FALLBACK
        return decode_params(sent, returned), Mode.DISAGG

    async def _post_prefill(
        self, req: _Request, p: Engine, req_id: str, data: bytes
    ) -> Reply | None:
        """POST the prefill step to ``p``: its 2xx answer, None when ``p`` failed (counted,
        ejected on connect failure); an engine 4xx is the client's fault (UpstreamAnswer)."""
        req.rec.prefiller = p.url
        t0 = time.perf_counter()
        self.prefill.acquire(p, req.keys)
        try:
            reply = await self.client.request(
                "POST", p.url + req.endpoint.value, data, req.headers, self.s.prefill_timeout_s
            )
        except ConnectFailed as exc:
            self.prefill.eject(p, f"connect failed: {exc}")
            self._prefill_failed(p, req_id, f"connect failed: {exc}")
            return None
        except UpstreamError as exc:
            self._prefill_failed(p, req_id, f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.prefill.release(p)
        if reply.status >= 500:
            self._prefill_failed(p, req_id, f"HTTP {reply.status}")
            return None
        if reply.status >= 400:
            raise UpstreamAnswer(reply)  # the client's request is at fault: same on D
        self.metrics.prefill_seconds.observe(time.perf_counter() - t0)
        return reply

    async def _handoff_done(
        self, req: _Request, req_id: str, fut: asyncio.Future[HandoffDone]
    ) -> bool:
        """Wait for the prefiller's HandoffDone: False when it reports a failed handoff
        (decode-only); True when it succeeded or did not come in time (decode anyway)."""
        assert self.handoff is not None
        req.rec.state = RequestState.HANDOFF
        t1 = time.perf_counter()
        done = await self.handoff.wait(req_id, fut, self.s.handoff_timeout_s)
        self.metrics.handoff_wait_seconds.observe(time.perf_counter() - t1)
        if done is None:
            self.metrics.errors.labels(ErrorKind.HANDOFF_TIMEOUT.value).inc()
            self._warn.warning(
                "%s: no HandoffDone within handoff_timeout_s=%.1f; decoding with the "
                "params anyway (the decoder recomputes what is missing)",
                req_id,
                self.s.handoff_timeout_s,
            )
        elif not done.ok:
            self.metrics.errors.labels(ErrorKind.HANDOFF_FAILED.value).inc()
            self.metrics.fallbacks.inc()
            self._warn.warning(
                "%s: handoff failed (%s); decode-only, the decoder recomputes",
                req_id,
                done.error,
            )
            return False
        return True

    def _prefill_failed(self, p: Engine, req_id: str, why: str) -> None:
        self.metrics.errors.labels(ErrorKind.PREFILL_FAILED.value).inc()
        p.last_error = why
        self._warn.warning("%s: prefill on %s failed: %s", req_id, p.url, why)

    # ---- step 2: decode -----------------------------------------------------------
    async def _decode(self, req: _Request, params: dict[str, Any] | None) -> Response:
        """Send the decoder the request, failing over to another decoder (decode-only)
        while decoders are unreachable. Owns ``req.decoder``'s in-flight slot (acquired
        by :meth:`serve`) and those of failover targets."""
        req.rec.state = RequestState.DECODING
        decoder = req.decoder
        tried: set[Engine] = set()
        while True:
            if tried:  # a failover target; the first decoder was acquired by serve()
                self.decode.acquire(decoder, req.keys)
            tried.add(decoder)
            try:
                return await self._decode_on(req, decoder, params)
            except ConnectFailed as exc:
                decoder = self._failover(req, decoder, exc, tried, params is not None)
                params = None

    async def _decode_on(
        self, req: _Request, decoder: Engine, params: dict[str, Any] | None
    ) -> Response:
        """One decode attempt; releases ``decoder``'s in-flight slot, or hands it to the
        relay of a streamed answer. ConnectFailed propagates (the caller fails over)."""
        body = dict(req.payload)
        body.pop("kv_transfer_params", None)
        if params is not None:
            body["kv_transfer_params"] = params
        data = msgspec.json.encode(body)
        req.rec.decoder = decoder.url
        url = decoder.url + req.endpoint.value
        handed = False
        try:
            if req.stream:
                answer = await self.client.open(
                    url, data, req.headers, self.s.decode_timeout_s, self.s.stream_idle_timeout_s
                )
            else:
                answer = await self.client.request(
                    "POST", url, data, req.headers, self.s.decode_timeout_s
                )
            self.metrics.ttft_seconds.observe(time.monotonic() - req.rec.started)
            if isinstance(answer, Stream):
                handed = True
                return RelayResponse(answer, self._closer(decoder, req.rec))
            if answer.status >= 400:
                self.metrics.errors.labels(ErrorKind.UPSTREAM.value).inc()
            return reply_response(answer)
        except Deadline:
            raise ProxyError(
                504,
                f"decoder {decoder.url} did not answer within the deadline",
                ErrorKind.DEADLINE,
            ) from None
        except Broken as exc:
            raise ProxyError(
                503, f"decoder {decoder.url} failed: {exc}", ErrorKind.UPSTREAM_CONNECT
            ) from None
        finally:
            if not handed:
                self.decode.release(decoder)

    def _failover(
        self,
        req: _Request,
        decoder: Engine,
        exc: ConnectFailed,
        tried: set[Engine],
        had_params: bool,
    ) -> Engine:
        """Eject the unreachable ``decoder`` and pick another (decode-only: the KV went
        to the one that is gone); ProxyError(503) when none is left."""
        self.decode.eject(decoder, f"connect failed: {exc}")
        self.metrics.errors.labels(ErrorKind.UPSTREAM_CONNECT.value).inc()
        choice = self.decode.choose(req.keys, frozenset(tried))
        if choice is None:
            raise ProxyError(
                503,
                f"no healthy decoder engine (last: {decoder.url} unreachable)",
                ErrorKind.NO_ENGINE,
            )
        self._warn.warning(
            "%s: decoder %s unreachable; decode-only on %s",
            req.rec.req_id,
            decoder.url,
            choice.engine.url,
        )
        if had_params:
            self.metrics.fallbacks.inc()
        return choice.engine

    def _closer(self, decoder: Engine, rec: RequestRecord) -> Callable[[RequestState, str], None]:
        def close(state: RequestState, error: str) -> None:
            self.decode.release(decoder)
            if state is RequestState.CANCELLED:
                self.metrics.errors.labels(ErrorKind.CLIENT_DISCONNECT.value).inc()
            self.table.close(rec, state, error)
            self.metrics.table_size.set(len(self.table))

        return close
