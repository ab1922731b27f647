"""Routing policies: which engine of a pool serves a request.

Owns the :class:`Engine` record (URL, role, health, in-flight count) and the three
policies:

* ``round_robin`` — next healthy engine in turn.
* ``least_loaded`` — fewest in-flight requests; ties broken in turn.
* ``cache_aware`` — a bounded LRU map from prefix-chain chunk keys
  (``lmcache_pd.chunks.ChunkHasher`` over the prompt's token ids) to the set of engines
  that received them. The least-loaded engine holding the request's longest known
  prefix wins, unless its load trips the guard:
  ``inflight + 1 > load_guard_factor * (least inflight of all + 1)``, in which case the
  least-loaded engine takes it (and from then on holds the prefix too).
  No known prefix -> least loaded, ties in turn, so unrelated prompts spread.
  Engines that publish KV events (``decoder_events``, :mod:`lmcache_pd.router.kv_events`)
  are not guessed: what they hold comes from their events into the exact
  :class:`~lmcache_pd.router.kv_events.HeldMap`, consulted together with the guesses.
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmcache_pd.router.kv_events import HeldMap
from lmcache_pd.router.settings import PolicyKind


class Role(str, enum.Enum):
    PREFILLER = "prefiller"
    DECODER = "decoder"


class EngineState(str, enum.Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"


class RouteReason(str, enum.Enum):
    TURN = "turn"
    LEAST_LOADED = "least_loaded"
    AFFINITY = "affinity"
    LOAD_GUARD = "load_guard"


@dataclass(eq=False)
class Engine:
    """One upstream vLLM api_server, as the proxy sees it."""

    url: str
    role: Role
    index: int
    kv_host: str = ""
    kv_port: int = 0
    state: EngineState = EngineState.HEALTHY
    inflight: int = 0
    failures: int = 0
    last_error: str = ""
    served: int = field(default=0)

    @property
    def healthy(self) -> bool:
        return self.state is EngineState.HEALTHY


@dataclass(frozen=True)
class Choice:
    engine: Engine
    reason: RouteReason
    matched_chunks: int = 0


class PrefixMap:
    """Bounded LRU map: chunk key -> bitmask of the engines (by index) that received it."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._map: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def longest(
        self, keys: Sequence[bytes], allowed: int, held: HeldMap | None = None
    ) -> tuple[int, int]:
        """(holders bitmask within ``allowed``, matched chunks) of the longest known
        prefix, guessed or (``held``) announced; (0, 0) if none.

        Keys are a prefix chain, so an engine holding key ``i`` got the whole prefix up
        to ``i``; scan from the longest down.
        """
        for i in range(len(keys) - 1, -1, -1):
            mask = self._map.get(keys[i], 0)
            if held is not None:
                mask |= held.get(keys[i])
            mask &= allowed
            if mask:
                return mask, i + 1
        return 0, 0

    def record(self, keys: Sequence[bytes], index: int) -> None:
        m = self._map
        bit = 1 << index
        for key in keys:
            m[key] = m.get(key, 0) | bit
            m.move_to_end(key)
        while len(m) > self.max_entries:
            m.popitem(last=False)


class Policy:
    """Base: round robin over the healthy engines not excluded."""

    kind = PolicyKind.ROUND_ROBIN

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(
        self,
        engines: Sequence[Engine],
        keys: Sequence[bytes] = (),
        exclude: frozenset = frozenset(),
    ) -> Choice | None:
        cands = [e for e in engines if e.healthy and e not in exclude]
        if not cands:
            return None
        return self._pick(cands, keys)

    def _pick(self, cands: list[Engine], keys: Sequence[bytes]) -> Choice:
        return Choice(cands[next(self._turn) % len(cands)], RouteReason.TURN)

    def _least(self, cands: list[Engine]) -> Engine:
        low = min(e.inflight for e in cands)
        tied = [e for e in cands if e.inflight == low]
        return tied[next(self._turn) % len(tied)]

    def record(self, engine: Engine, keys: Sequence[bytes]) -> None:
        """Called once the request is sent to ``engine`` (cache_aware remembers keys)."""


class RoundRobin(Policy):
    kind = PolicyKind.ROUND_ROBIN


class LeastLoaded(Policy):
    kind = PolicyKind.LEAST_LOADED

    def _pick(self, cands: list[Engine], keys: Sequence[bytes]) -> Choice:
        return Choice(self._least(cands), RouteReason.LEAST_LOADED)


class CacheAware(Policy):
    kind = PolicyKind.CACHE_AWARE

    def __init__(self, max_entries: int, load_guard_factor: float) -> None:
        super().__init__()
        self.prefixes = PrefixMap(max_entries)
        self.held = HeldMap(max_entries)
        self.load_guard_factor = load_guard_factor

    def _pick(self, cands: list[Engine], keys: Sequence[bytes]) -> Choice:
        least = self._least(cands)
        if not keys:
            return Choice(least, RouteReason.LEAST_LOADED)
        allowed = 0
        for e in cands:
            allowed |= 1 << e.index
        mask, matched = self.prefixes.longest(keys, allowed, self.held)
        if not mask:
            return Choice(least, RouteReason.LEAST_LOADED)
        best = self._least([e for e in cands if mask >> e.index & 1])
        if best.inflight + 1 > self.load_guard_factor * (least.inflight + 1):
            return Choice(least, RouteReason.LOAD_GUARD, matched)
        return Choice(best, RouteReason.AFFINITY, matched)

    def record(self, engine: Engine, keys: Sequence[bytes]) -> None:
        if keys and not self.held.subscribed >> engine.index & 1:  # events say it exactly
            self.prefixes.record(keys, engine.index)


def make_policy(kind: PolicyKind, max_entries: int, load_guard_factor: float) -> Policy:
    if kind is PolicyKind.CACHE_AWARE:
        return CacheAware(max_entries, load_guard_factor)
    if kind is PolicyKind.LEAST_LOADED:
        return LeastLoaded()
    return RoundRobin()
