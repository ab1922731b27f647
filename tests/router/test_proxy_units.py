"""Units of the router: policies, prefix map, settings, request table, kv params."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcache_pd.config import ConfigError
from lmcache_pd.router.kv_params import KVTransferParams, decode_params
from lmcache_pd.router.policy import (
    CacheAware,
    Engine,
    EngineState,
    LeastLoaded,
    PrefixMap,
    Role,
    RoundRobin,
    RouteReason,
)
from lmcache_pd.router.settings import PolicyKind, settings_from_args
from lmcache_pd.router.table import RequestState, RequestTable, TableFull


def _engines(n: int) -> list[Engine]:
    return [Engine(url=f"http://d{i}", role=Role.DECODER, index=i) for i in range(n)]


def test_round_robin_skips_ejected_and_excluded() -> None:
    es = _engines(3)
    es[1].state = EngineState.EJECTED
    rr = RoundRobin()
    picks = [rr.choose(es).engine.index for _ in range(4)]
    assert sorted(set(picks)) == [0, 2]
    assert rr.choose(es, exclude=frozenset({es[0], es[2]})) is None


def test_least_loaded_picks_fewest_inflight() -> None:
    es = _engines(3)
    es[0].inflight, es[1].inflight, es[2].inflight = 5, 1, 3
    assert LeastLoaded().choose(es).engine is es[1]


def test_cache_aware_affinity_guard_and_spread() -> None:
    es = _engines(3)
    ca = CacheAware(max_entries=100, load_guard_factor=2.0)
    keys = [b"k1", b"k2", b"k3"]
    first = ca.choose(es, keys)
    assert first.reason is RouteReason.LEAST_LOADED
    ca.record(first.engine, keys)
    again = ca.choose(es, [*keys[:2], b"other"])
    assert again.engine is first.engine and again.reason is RouteReason.AFFINITY
    assert again.matched_chunks == 2
    # load guard: holder busy vs an idle engine
    first.engine.inflight = 2  # 3 > 2 * 1
    guarded = ca.choose(es, keys)
    assert guarded.reason is RouteReason.LOAD_GUARD and guarded.engine is not first.engine
    first.engine.inflight = 1  # 2 > 2 * 1 is false: affinity holds
    assert ca.choose(es, keys).engine is first.engine
    # two holders: the less loaded holder wins
    ca.record(es[2] if first.engine is not es[2] else es[1], keys)
    first.engine.inflight = 1
    other = ca.choose(es, keys).engine
    assert other is not first.engine and ca.choose(es, keys).reason is RouteReason.AFFINITY
    # unrelated prompts spread over idle engines
    first.engine.inflight = 0
    spread = {ca.choose(es, [bytes([i])]).engine.index for i in range(6)}
    assert spread == {0, 1, 2}


@given(st.lists(st.binary(min_size=1, max_size=4), min_size=1, max_size=50), st.integers(1, 20))
def test_prefix_map_is_bounded(keys: list[bytes], bound: int) -> None:
    pm = PrefixMap(bound)
    for i in range(0, len(keys), 3):
        pm.record(keys[i : i + 3], i % 4)
        assert len(pm) <= bound


def test_prefix_map_longest_match_respects_allowed() -> None:
    pm = PrefixMap(10)
    pm.record([b"a", b"b"], 0)
    pm.record([b"a", b"b", b"c"], 1)
    assert pm.longest([b"a", b"b", b"c"], 0b11) == (0b10, 3)
    assert pm.longest([b"a", b"b", b"c"], 0b01) == (0b01, 2)
    assert pm.longest([b"z"], 0b11) == (0, 0)


def test_request_table_bounded() -> None:
    t = RequestTable(max_inflight=2, finished_history=3)
    recs = [t.open("/v1/completions"), t.open("/v1/completions")]
    with pytest.raises(TableFull):
        t.open("/v1/completions")
    assert len({r.req_id for r in recs}) == 2
    for _ in range(10):
        t.close(recs.pop() if recs else t.open("/x"), RequestState.DONE)
    assert len(t) == 0 and len(t.finished) == 3


def test_kv_params_fields_and_decode_params() -> None:
    sent = KVTransferParams(
        req_id="r1", decoder_host="h", decoder_init_port=7300, proxy_notify="tcp://127.0.0.1:5"
    )
    assert sent.to_dict() == {
        "do_remote_decode": True,
        "req_id": "r1",
        "decoder_host": "h",
        "decoder_init_port": 7300,
        "proxy_notify": "tcp://127.0.0.1:5",
    }
    out = decode_params(sent, {"remote_engine_id": "p", "do_remote_decode": True})
    assert out["do_remote_prefill"] is True and out["do_remote_decode"] is False
    assert out["req_id"] == "r1" and out["remote_engine_id"] == "p"
    assert decode_params(sent, None)["req_id"] == "r1"
    # the connector side can decode it back (unknown extra fields tolerated)
    back = msgspec.convert({**sent.to_dict(), "extra": 1}, KVTransferParams)
    assert back == sent


def test_settings_from_cli_and_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "chunk_size: 16\ndisagg_min_tokens: 64\nload_guard_factor: 3\npolicy: least_loaded\n"
    )
    s = settings_from_args(
        [
            "--prefiller",
            "http://a:1,http://b:2",
            "--decoder",
            "http://c:3/",
            "--decoder",
            "http://[::1]:4",
            "--decoder-kv",
            "c:7400",
            "--config",
            str(cfg),
            "--policy",
            "cache_aware",
        ]
    )
    assert s.prefillers == ["http://a:1", "http://b:2"]
    assert s.decoders == ["http://c:3", "http://[::1]:4"]
    assert s.policy is PolicyKind.CACHE_AWARE  # the flag beats the file
    assert (s.chunk_size, s.disagg_min_tokens, s.load_guard_factor) == (16, 64, 3.0)
    assert s.decoder_endpoint(0) == ("c", 7400)
    assert s.decoder_endpoint(1) == ("::1", 7301)


def test_settings_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text("disagg_min_token: 5\n")
    with pytest.raises(ConfigError, match="disagg_min_tokens"):
        settings_from_args(["--decoder", "http://d:1", "--config", str(cfg)])
    cfg.write_text("chunk_size: -1\n")
    with pytest.raises(ConfigError, match="chunk_size"):
        settings_from_args(["--decoder", "http://d:1", "--config", str(cfg)])
    with pytest.raises(ConfigError, match="decoders"):
        settings_from_args([])
