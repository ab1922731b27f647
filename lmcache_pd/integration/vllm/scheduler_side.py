"""Scheduler half of the connector (runs in vLLM's engine-core process).

It decides, per request, how many prompt tokens come from held chunks (tiers or a
transfer from a prefiller) and which fully computed chunks the workers must save (into
the tiers with ``kv_both``), push to a decoder named up front (``kv_producer`` behind our
proxy: push-ahead) or hold for whichever decoder fetches them (``kv_producer`` under the
standard vLLM PD contract: ``request_finished`` returns the
:class:`~lmcache_pd.protocol.DecodeParams` that let a decoder fetch them). Chunk lookups go to
the worker over :mod:`~lmcache_pd.integration.vllm.lookup`. Loads are always scheduled
asynchronously: the worker writes them into the request's blocks between steps and
reports them in ``finished_recving``; a chunk that cannot be loaded is reported as an
invalid block, and vLLM recomputes it or fails the request (``load_failure_policy``).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmcache_pd.chunks import ChunkHasher
from lmcache_pd.config import Config, LoadFailurePolicy
from lmcache_pd.integration.vllm.common import (
    KVRole,
    LoadSpec,
    PDConnectorMetadata,
    SaveSpec,
    SendTarget,
    layout_from_vllm_config,
    lookup_endpoint,
)
from lmcache_pd.integration.vllm.lookup import LookupClient
from lmcache_pd.protocol import DecodeParams, KVTransferParams
from lmcache_pd.tiers import log_lookup
from lmcache_pd.tp import check_tp

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
    target: SendTarget | None = None  # push-ahead: the decoder named by our proxy
    hold: str | None = None  # standard contract: hold id the workers keep chunks under
    pull: DecodeParams | None = None  # decoder: fetch from this prefiller first
    error: str | None = None  # decoder: unusable params under load_failure_policy=fail
    source_tp: int = 0  # decoder: the prefiller's TP size (0: ours)
    logged: bool = False
    save_done: bool = False
    load_attempts: int = 0


def prefill_params(request_id: str, params: dict[str, Any] | None) -> KVTransferParams | None:
    """A prefill request's ``kv_transfer_params`` (push-ahead or standard), if any."""
    try:
        return KVTransferParams.from_request(params)
    except ValueError as exc:
        log.warning(
            "request %s: ignoring %s (params %r); its KV stays here", request_id, exc, params
        )
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
        self.tp_size = tp
        self.engine_id = str(ktc.engine_id)
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
                params = prefill_params(request.request_id, request.kv_transfer_params)
                if params is not None and params.push_ahead:
                    st.target = params
                elif params is not None:
                    st.hold = secrets.token_hex(16)  # unguessable, one-shot
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
        st.pull = st.error = None
        params, bad = None, ""
        if self.role is KVRole.CONSUMER and st.load_attempts == 0:
            params, bad = self._decode_params(request)
        st.source_tp = params.lmcache_pd_tp_size if params is not None else 0
        held = self.lookup_client.lookup(st.keys, st.source_tp)
        target, wait_s = held, 0.0
        if bad:
            target, wait_s = self._unusable(st, held, bad)
        elif params is not None:
            target, wait_s = self._remote_plan(st, params, held)
        if self.role is KVRole.BOTH and self.cfg.enable_p2p and target > 0:
            # chunks a peer holds are pushed here first, off the forward path (p2p.py)
            wait_s = self.cfg.pd_connect_timeout_s + self.cfg.pd_transfer_timeout_s
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

    def _decode_params(self, request: Request) -> tuple[DecodeParams | None, str]:
        """The request's :class:`DecodeParams` (None: a plain request), or why they are
        unusable (malformed, or a prefiller TP size that cannot split the KV heads)."""
        try:
            params = DecodeParams.from_request(request.kv_transfer_params)
            if params is not None:
                check_tp(self.layout.model_kv_heads, params.lmcache_pd_tp_size, "prefiller TP")
        except ValueError as exc:  # TPMappingError included
            return None, str(exc)
        return params, ""

    def _remote_plan(self, st: _ReqState, params: DecodeParams, held: int) -> tuple[int, float]:
        """Decoder, first try: how many chunks to load and how long they may take to
        land, from the request's ``kv_transfer_params`` (:class:`DecodeParams`)."""
        st.transfer_id = params.req_id
        announced = min(params.lmcache_pd_chunks, len(st.keys))
        if params.pulls:
            # fetched even when everything is held here: the push then moves nothing and
            # frees the prefiller's hold at once instead of at its TTL
            st.pull = params
            return max(announced, held), self.cfg.pd_transfer_timeout_s
        # push-ahead: with a proxy that waited for HandoffDone (proxy_notify set) the
        # transfer is over, unless the prefiller runs TP > 1 (only its rank 0 tells the
        # proxy; the others' pieces may still be landing); chunks not yet here are waited
        # for in the worker, bounded by pd_transfer_timeout_s
        others = params.lmcache_pd_tp_size > 1
        if announced > held and params.lmcache_pd_sent and (others or not params.proxy_notify):
            return announced, self.cfg.pd_transfer_timeout_s
        return held, 0.0

    def _unusable(self, st: _ReqState, held: int, why: str) -> tuple[int, float]:
        """Params that cannot be used: recompute (load what is held), or with
        ``load_failure_policy: fail`` plan a load that fails the request naming ``why``."""
        if self.cfg.load_failure_policy is LoadFailurePolicy.FAIL:
            log.error("request %s: %s; failing it (load_failure_policy=fail)", st.req_id, why)
            st.error = why
            return len(st.keys), 0.0
        log.error("request %s: %s; recomputing its prompt", st.req_id, why)
        return held, 0.0

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
                pull=st.pull,
                error=st.error,
                source_tp=st.source_tp,
            )
        )
        log.info(
            "request %s: prompt %d tokens, loading %d tokens [%d, %d) from %s, computing %d",
            st.req_id,
            len(st.tokens),
            num_external_tokens,
            start,
            end,
            "fetch" if st.pull else "held" if st.load_wait_s == 0 else "transfer",
            len(st.tokens) - end,
        )
        st.load_end = 0
        st.load_attempts += 1

    def build_connector_meta(self, so: SchedulerOutput) -> PDConnectorMetadata:
        meta = PDConnectorMetadata(
            loads=self._pending_loads, idle=so.total_num_scheduled_tokens == 0
        )
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
            if st.target is None and st.hold is None:
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
                        hold=st.hold,
                        last=last,
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
        if self.role is not KVRole.PRODUCER or st is None:
            return False, None
        # The chunks were gathered out of the blocks in the last prefill step, so the
        # blocks can be freed now; the push (or the hold) runs from our send buffer.
        if st.target is not None:
            return False, DecodeParams(
                req_id=st.target.req_id,
                lmcache_pd_chunks=len(st.keys),
                lmcache_pd_tokens=len(st.tokens),
                lmcache_pd_sent=bool(st.keys),
                lmcache_pd_tp_size=self.tp_size,
            ).to_dict()
        if st.hold is not None:
            return False, self._hold_params(st).to_dict()
        return False, None

    def _hold_params(self, st: _ReqState) -> DecodeParams:
        """What a decoder needs to fetch ``st``'s held chunks (standard contract)."""
        nothing = DecodeParams(lmcache_pd_tokens=len(st.tokens))  # decoder computes all
        if not st.keys:
            return nothing
        addresses = self.lookup_client.pull_addresses()
        if not addresses:
            log.error(
                "request %s: the workers did not report their pull endpoints; the decoder "
                "recomputes this prompt",
                st.req_id,
            )
            return nothing
        host, port = addresses[0]  # every rank of an engine runs on one host
        return DecodeParams(
            remote_engine_id=self.engine_id,
            remote_host=host,
            remote_port=port,
            lmcache_pd_hold=st.hold,
            lmcache_pd_pull_ports=[p for _, p in addresses],
            lmcache_pd_chunks=len(st.keys),
            lmcache_pd_tokens=len(st.tokens),
            lmcache_pd_tp_size=len(addresses),
        )

    def shutdown(self) -> None:
        self.lookup_client.close()
