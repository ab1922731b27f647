"""Engine pools and health: which engines are in rotation, and how busy they are.

An :class:`EnginePool` holds the engines of one role and its routing policy. Engines
leave rotation (``ejected``) after ``health_fail_threshold`` failed ``GET /health``
probes, or at once when a request cannot connect to them; the :class:`HealthChecker`
probes every engine each ``health_interval_s`` and re-admits an engine on its first
healthy answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from prometheus_client import Counter

from lmcache_pd.router.metrics import ProxyMetrics
from lmcache_pd.router.policy import Choice, Engine, EngineState, Policy, Role, RouteReason
from lmcache_pd.router.upstream import Upstream, UpstreamError

log = logging.getLogger("lmcache_pd.router")


class EnginePool:
    def __init__(
        self,
        role: Role,
        urls: Sequence[str],
        policy: Policy,
        metrics: ProxyMetrics,
        endpoints: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.role = role
        self.policy = policy
        self.metrics = metrics
        self.engines: list[Engine] = []
        for i, url in enumerate(urls):
            host, port = endpoints[i] if i < len(endpoints) else ("", 0)
            self.engines.append(
                Engine(url=url.rstrip("/"), role=role, index=i, kv_host=host, kv_port=port)
            )
        # label children resolved once: the hot path only calls .set()/.inc()
        self._inflight = {e.index: metrics.inflight.labels(role.value, e.url) for e in self.engines}
        self._routed: dict[RouteReason, Counter] = {}
        for e in self.engines:
            self._gauges(e)

    def _gauges(self, e: Engine) -> None:
        self.metrics.healthy.labels(self.role.value, e.url).set(1 if e.healthy else 0)
        self.metrics.inflight.labels(self.role.value, e.url).set(e.inflight)

    def healthy(self) -> list[Engine]:
        return [e for e in self.engines if e.healthy]

    def choose(self, keys: Sequence[bytes] = (), exclude: frozenset = frozenset()) -> Choice | None:
        choice = self.policy.choose(self.engines, keys, exclude)
        if choice is not None:
            counter = self._routed.get(choice.reason)
            if counter is None:
                counter = self._routed[choice.reason] = self.metrics.routed.labels(
                    self.role.value, choice.reason.value
                )
            counter.inc()
        return choice

    def acquire(self, e: Engine, keys: Sequence[bytes] = ()) -> None:
        e.inflight += 1
        e.served += 1
        self.policy.record(e, keys)
        self._inflight[e.index].set(e.inflight)

    def release(self, e: Engine) -> None:
        e.inflight -= 1
        self._inflight[e.index].set(e.inflight)

    def eject(self, e: Engine, reason: str) -> None:
        e.last_error = reason
        if e.state is not EngineState.EJECTED:
            e.state = EngineState.EJECTED
            log.warning(
                "%s %s ejected: %s (re-admitted when GET /health answers 200)",
                self.role.value,
                e.url,
                reason,
            )
            self._gauges(e)

    def probe_result(self, e: Engine, ok: bool, detail: str, threshold: int) -> None:
        if ok:
            e.failures = 0
            if e.state is EngineState.EJECTED:
                e.state = EngineState.HEALTHY
                log.warning("%s %s re-admitted: healthy again", self.role.value, e.url)
                self._gauges(e)
            return
        e.failures += 1
        if e.failures >= threshold:
            self.eject(e, f"{e.failures} failed health checks, last: {detail}")


class HealthChecker:
    """Probes ``GET /health`` of every engine of the pools, forever, until stopped."""

    def __init__(
        self,
        pools: Sequence[EnginePool],
        client: Upstream,
        interval_s: float,
        timeout_s: float,
        threshold: int,
    ) -> None:
        self.pools = pools
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.threshold = threshold
        self._task: asyncio.Task[None] | None = None

    async def probe(self, pool: EnginePool, e: Engine) -> None:
        try:
            reply = await self.client.request("GET", e.url + "/health", timeout_s=self.timeout_s)
            ok, detail = reply.status == 200, f"HTTP {reply.status}"
        except UpstreamError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        pool.probe_result(e, ok, detail, self.threshold)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.probe(p, e) for p in self.pools for e in p.engines))

    async def _run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # never let the checker die
                log.exception("health check round failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
