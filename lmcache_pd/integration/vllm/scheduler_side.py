"""Scheduler half of the connector (runs in vLLM's engine-core process).

It decides, per request, how many prompt tokens come from held chunks (tiers or a
transfer from a prefiller) and which fully computed chunks the workers must save (into
the tiers with ``kv_both``) or push to a decoder (``kv_producer``). Chunk lookups go to
the worker over :mod:`~lmcache_pd.integration.vllm.lookup`. Loads are always scheduled
asynchronously: the worker writes them into the request's blocks between steps and
reports them in ``finished_recving``; a chunk that cannot be loaded is reported as an
invalid block, and vLLM recomputes it or fails the request (``load_failure_policy``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.config import Config
from lmcache_pd.integration.vllm.common import (
    PARAM_CHUNKS,
    PARAM_SENT,
    PARAM_TOKENS,
    KVRole,
    LoadSpec,
    PDConnectorMetadata,
    SaveSpec,
    SendTarget,
    layout_from_vllm_config,
    lookup_endpoint,
)
from lmcache_pd.integration.vllm.lookup import LookupClient
from lmcache_pd.tiers import log_lookup

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("lmcache_pd.vllm")

# A request whose load failed comes back with nothing computed; after this many load
# attempts it is recomputed without asking the tiers again (no retry loops).
MAX_LOAD_ATTEMPTS = 2


@dataclass
class _ReqState:
    req_id: str
    tokens: list[int]
    keys: list[bytes]
    block_ids: list[int] = field(default_factory=list)
    held: int = 0
    saved: int = 0
    load_end: int = 0
    load_wait_s: float = 0.0
    transfer_id: str | None = None
    target: SendTarget | None = None
    logged: bool = False
    save_done: bool = False
    load_attempts: int = 0


def send_target(params: dict[str, Any] | None) -> SendTarget | None:
    """The decoder named in a prefill request's ``kv_transfer_params``, if any."""
    try:
        return SendTarget.from_request(params)
    except ValueError as exc:
        log.warning("ignoring %s (params %r)", exc, params)
        return None


class SchedulerSide:
    """State and decisions of the scheduler-side connector."""

    def __init__(self, vllm_config: VllmConfig, role: KVRole, cfg: Config) -> None:
        self.role = role
        self.cfg = cfg
        self.layout = layout_from_vllm_config(vllm_config)
        self.hasher = ChunkHasher(self.layout.fingerprint(), cfg.chunk_size, cfg.hash_algorithm)
        self.chunk_size = cfg.chunk_size
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        # Our load_failure_policy drives vLLM's (read by the scheduler right after it
        # builds this connector).
        ktc.kv_load_failure_policy = cfg.load_failure_policy.value
        tp = vllm_config.parallel_config.tensor_parallel_size
        endpoints = [lookup_endpoint(str(ktc.engine_id), r) for r in range(tp)]
        self.lookup_client = LookupClient(endpoints, timeout_s=min(cfg.pd_connect_timeout_s, 5))
        self._reqs: dict[str, _ReqState] = {}
        self._pending_loads: list[LoadSpec] = []
        log.info(
            "lmcache-pd scheduler side: role=%s chunk_size=%d layout=%s policy=%s",
            role.value,
            cfg.chunk_size,
            self.layout,
            cfg.load_failure_policy.value,
        )

    # --- helpers ---

    def _state(self, request: Request) -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            st = _ReqState(request.request_id, tokens, self.hasher.keys(tokens))
            if self.role is KVRole.PRODUCER:
                st.target = send_target(request.kv_transfer_params)
            self._reqs[request.request_id] = st
        return st

    def _keys_for(self, st: _ReqState, start: int, end: int) -> tuple[int, list[bytes]]:
        first = start // self.chunk_size
        last = (end + self.chunk_size - 1) // self.chunk_size
        return first, st.keys[first:last]

    # --- vLLM hooks ---

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        st = self._state(request)
        if self.role is KVRole.PRODUCER or not st.keys:
            return 0, False
        if st.load_attempts >= MAX_LOAD_ATTEMPTS:
            return 0, False  # earlier loads of this request failed: recompute it
        n = len(st.tokens)
        held = self.lookup_client.lookup(st.keys)
        target = held
        wait_s = 0.0
        params = request.kv_transfer_params or {}
        if self.role is KVRole.CONSUMER and params.get("do_remote_prefill"):
            announced = min(int(params.get(PARAM_CHUNKS, 0) or 0), len(st.keys))
            # With a proxy that waited for HandoffDone (proxy_notify set) the transfer
            # is over: load what is held. Without one, chunks may still be landing:
            # wait for them in the worker, bounded by pd_transfer_timeout_s.
            first_try = st.load_attempts == 0
            if (
                first_try
                and announced > held
                and params.get(PARAM_SENT)
                and not params.get("proxy_notify")
            ):
                target = announced
                wait_s = self.cfg.pd_transfer_timeout_s
            st.transfer_id = str(params.get("req_id")) if params.get("req_id") else None
        st.held = held
        hit_tokens = min(target * self.chunk_size, n)
        if not st.logged:
            st.logged = True
            log_lookup(n, hit_tokens, num_computed_tokens, logger=log)
        # vLLM must compute at least the last prompt token to sample the next one
        load_end = min(hit_tokens, n - 1)
        need = load_end - num_computed_tokens
        if need <= 0:
            return 0, False
        st.load_end = load_end
        st.load_wait_s = wait_s
        return need, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        st = self._state(request)
        st.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens <= 0 or st.load_end <= 0:
            return
        end = st.load_end
        start = end - num_external_tokens
        first, keys = self._keys_for(st, start, end)
        self._pending_loads.append(
            LoadSpec(
                req_id=st.req_id,
                keys=keys,
                first_chunk=first,
                start=start,
                end=end,
                block_ids=list(st.block_ids),
                wait_s=st.load_wait_s,
                transfer_id=st.transfer_id,
            )
        )
        log.info(
            "request %s: prompt %d tokens, loading %d tokens [%d, %d) from %s, computing %d",
            st.req_id,
            len(st.tokens),
            num_external_tokens,
            start,
            end,
            "held" if st.load_wait_s == 0 else "transfer",
            len(st.tokens) - end,
        )
        st.load_end = 0
        st.load_attempts += 1

    def build_connector_meta(self, so: SchedulerOutput) -> PDConnectorMetadata:
        meta = PDConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if self.role is KVRole.CONSUMER:
            return meta
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            done = new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0)
            self._plan_save(meta, st, done)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            done = cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0)
            self._plan_save(meta, st, done)
        return meta

    def _plan_save(self, meta: PDConnectorMetadata, st: _ReqState, done: int) -> None:
        if st.save_done:
            return
        n = len(st.tokens)
        full = min(done, n) // self.chunk_size
        if self.role is KVRole.PRODUCER:
            if st.target is None:
                st.save_done = True
                return
            last = done >= n
            if full > st.saved or last:
                meta.saves.append(
                    SaveSpec(
                        req_id=st.req_id,
                        keys=st.keys[st.saved : full],
                        first_chunk=st.saved,
                        block_ids=list(st.block_ids),
                        total_tokens=n,
                        target=st.target,
                        last=last,
                        all_keys=list(st.keys[:full]) if last else [],
                    )
                )
            st.saved = max(st.saved, full)
            st.save_done = last
            return
        first = max(st.saved, st.held)
        if full > first:
            meta.saves.append(
                SaveSpec(
                    req_id=st.req_id,
                    keys=st.keys[first:full],
                    first_chunk=first,
                    block_ids=list(st.block_ids),
                    total_tokens=n,
                )
            )
        st.saved = max(st.saved, full)
        if done >= n:
            st.save_done = True

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        if self.role is not KVRole.PRODUCER or st is None or st.target is None:
            return False, None
        # The chunks were gathered out of the blocks in the last prefill step, so the
        # blocks can be freed now; the push continues from our own send buffer.
        return False, {
            "req_id": st.target.req_id,
            PARAM_CHUNKS: len(st.keys),
            PARAM_TOKENS: len(st.tokens),
            PARAM_SENT: bool(st.keys),
        }

    def shutdown(self) -> None:
        self.lookup_client.close()
