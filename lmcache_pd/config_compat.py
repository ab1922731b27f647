"""LMCache config compatibility: which LMCache key names exist, and what each one means here.

Owns the data that lets any LMCache yaml (of any LMCache version) load:

* :data:`LMCACHE_KEYS` -- every top-level key LMCache's config has or had, gathered
  version by version from LMCache's own sources (named at each set below);
* :data:`ALIASES` -- LMCache's renamed / legacy PD key names, each mapped to the
  lmcache-pd key that carries the same meaning (they take effect, with one
  deprecation warning naming the new key);
* :func:`normalize` -- one layer of raw keys (a yaml file, the environment, explicit
  overrides) split into lmcache-pd keys, aliases resolved, LMCache keys we do not
  implement, and keys LMCache never had.

Keys of LMCache that lmcache-pd implements under the same name are simply lmcache-pd
keys; the ignored set is computed (LMCache keys minus our keys minus aliases), so a
key somebody adds to :class:`lmcache_pd.config.Config` stops being ignored by itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

# --- LMCache's config keys, by the source they were read from ------------------------

# LMCache v0 (lmcache/config.py, LMCacheEngineConfig.from_file, v0.1.x, 2024) and the
# v0/v1 docs page "Configuring LMCache v1" (docs/source/getting_started, early 2025).
_LMCACHE_V0 = frozenset(
    {
        "chunk_size",
        "local_device",
        "max_local_cache_size",
        "remote_url",
        "remote_serde",
        "pipelined_backend",
        "save_decode_cache",
        "enable_blending",
        "blend_recompute_ratio",
        "blend_min_tokens",
        "blend_separator",
        "blend_add_special_in_precomp",
        "enable_p2p",
        "lookup_url",
        "distributed_url",
        "use_experimental",
    }
)

# LMCache lmcache/experimental/config.py (LMCacheEngineConfig.from_file, early 2025:
# the first NIXL PD, ``nixl_peer_port`` = base port + worker rank).
_LMCACHE_EXPERIMENTAL = frozenset(
    {
        "local_cpu",
        "max_local_cpu_size",
        "local_disk",
        "max_local_disk_size",
        "blend_special_str",
        "error_handling",
        "enable_controller",
        "lmcache_instance_id",
        "controller_url",
        "controller_pull_url",
        "controller_reply_url",
        "lmcache_worker_url",
        "lmcache_worker_ports",
        "enable_nixl",
        "nixl_role",
        "nixl_peer_host",
        "nixl_peer_port",
        "nixl_buffer_size",
        "nixl_buffer_device",
        "nixl_enable_gc",
        "p2p_host",
        "p2p_init_ports",
    }
)

# LMCache lmcache/v1/config.py _CONFIG_DEFINITIONS of the v0.3.x series (1P1D NIXL with
# nixl_receiver_host/port, the experimental xPyD keys enable_xpyd / nixl_peer_* /
# nixl_proxy_*), plus its _CONFIG_ALIASES / _DEPRECATED_CONFIGS.
_LMCACHE_V1_03 = frozenset(
    {
        "use_layerwise",
        "pre_caching_hash_algorithm",
        "lmcache_worker_port",
        "lmcache_worker_heartbeat_delay_time",
        "lmcache_worker_heartbeat_time",
        "nixl_receiver_host",
        "nixl_receiver_port",
        "nixl_backends",
        "enable_xpyd",
        "nixl_peer_init_port",
        "nixl_peer_alloc_port",
        "nixl_proxy_host",
        "nixl_proxy_port",
        "weka_path",
        "gds_path",
        "cufile_buffer_size",
        "audit_actual_remote_url",
        "internal_api_server_host",
        "extra_config",
        "save_unfull_chunk",
        "blocking_timeout_secs",
        "external_lookup_client",
        "py_enable_gc",
        "cache_policy",
        "numa_mode",
        "internal_api_server_enabled",
        "internal_api_server_port_start",
        "internal_api_server_include_index_list",
        "internal_api_server_socket_path_prefix",
        "plugin_locations",
        "external_backends",
    }
)

# LMCache lmcache/v1/config.py _CONFIG_DEFINITIONS on LMCache/LMCache main (commit
# 000620e37eb7, 2026: PD keys pd_*, asymmetric retrieve/store locations, ...).
_LMCACHE_V1_MAIN = frozenset(
    {
        "local_cpu_use_hugepages",
        "reserve_local_cpu_size",
        "local_disk_path_sharding",
        "blend_recompute_ratios",
        "blend_thresholds",
        "blend_check_layers",
        "retrieve_locations",
        "store_location",
        "p2p_lookup_ports",
        "mp_host",
        "mp_port",
        "lmcache_worker_ids",
        "enable_pd",
        "pd_role",
        "pd_buffer_size",
        "pd_buffer_device",
        "pd_peer_host",
        "pd_peer_init_port",
        "pd_peer_alloc_port",
        "pd_peer_query_port",
        "pd_proxy_host",
        "pd_proxy_port",
        "pd_allocation_timeout_sec",
        "pd_shutdown_timeout_sec",
        "pd_condition_poll_interval_sec",
        "pd_max_prefill_len",
        "pd_backend_mode",
        "pd_skip_proxy_notification",
        "pd_bidirectional",
        "transfer_channel",
        "gds_path_sharding",
        "gds_buffer_size",
        "maru_path",
        "maru_pool_size",
        "use_gds",
        "gds_backend",
        "cost_aware_half_life_seconds",
        "cost_aware_ewma_alpha",
        "enable_async_loading",
        "priority_limit",
        "runtime_plugin_locations",
        "storage_plugins",
        "remote_storage_plugins",
        "lookup_timeout_ms",
        "min_retrieve_tokens",
        "hit_miss_ratio",
        "lookup_server_worker_ids",
        "enable_scheduler_bypass_lookup",
        "script_allowed_imports",
        "enable_lazy_memory_allocator",
        "lazy_memory_initial_ratio",
        "lazy_memory_expand_trigger_ratio",
        "lazy_memory_step_ratio",
        "lazy_memory_safe_size",
        "enable_chunk_statistics",
        "chunk_statistics_auto_start_statistics",
        "chunk_statistics_auto_exit_timeout_hours",
        "chunk_statistics_auto_exit_target_unique_chunks",
        "chunk_statistics_strategy",
        "enable_kv_events",
        "use_gpu_connector_v3",
        "pin_timeout_sec",
        "pin_check_interval_sec",
        "remote_config_url",
        "app_id",
        "enable_hidden_state_cache",
        "max_hidden_state_cpu_size",
        "hidden_state_layers",
        "hidden_states_retrieve_mode",
    }
)

# LMCache docs/source/api_reference/configurations.rst names that differ from the code
# (the P2P table documents peer_init_ports / peer_lookup_ports).
_LMCACHE_DOCS = frozenset({"peer_init_ports", "peer_lookup_ports"})

# LMCache's published examples/disagg_prefill/{1p1d,xpyd}/configs/*-pd-with-remote-config.yaml
# (LMCache PR #2509, 2026: the PD-only names of retrieve_locations / store_location).
_LMCACHE_EXAMPLES = frozenset({"pd_retrieve_locations", "pd_store_location"})

LMCACHE_KEYS: frozenset[str] = (
    _LMCACHE_V0
    | _LMCACHE_EXPERIMENTAL
    | _LMCACHE_V1_03
    | _LMCACHE_V1_MAIN
    | _LMCACHE_DOCS
    | _LMCACHE_EXAMPLES
)

# LMCache's EC config (v1 main): ``ec_<key>`` top-level keys or an ``ec:`` mapping.
LMCACHE_EC_KEY = "ec"
LMCACHE_EC_PREFIX = "ec_"


# --- renamed keys -----------------------------------------------------------------------


class AliasKind(str, enum.Enum):
    RENAMED = "renamed"  # same meaning, same values, new name
    IMPLIES = "implies"  # ``true`` implies the new key ``true``; ``false`` says nothing


@dataclass(frozen=True)
class Alias:
    """An LMCache key name that means one of our keys."""

    name: str
    target: str
    kind: AliasKind = AliasKind.RENAMED
    note: str = ""


# Semantics, from the LMCache sources above: nixl_role took "sender" / "receiver" exactly
# like pd_role; nixl_peer_port (experimental) was renamed nixl_receiver_port (v0.3) and
# both name the receiver's listening base port, as pd_peer_init_port does (an int is the
# base port + TP rank, a list one port per rank); nixl_receiver_host / nixl_peer_host
# name the receiver's host like pd_peer_host; enable_nixl (1P1D) and enable_xpyd (xPyD,
# LMCache aliases it to enable_pd) each switched PD on.
ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias("enable_nixl", "enable_pd", AliasKind.IMPLIES, "LMCache 1P1D NIXL mode"),
        Alias("enable_xpyd", "enable_pd", AliasKind.IMPLIES, "LMCache xPyD mode"),
        Alias("nixl_role", "pd_role"),
        Alias("nixl_peer_host", "pd_peer_host"),
        Alias("nixl_receiver_host", "pd_peer_host"),
        Alias("nixl_peer_port", "pd_peer_init_port"),
        Alias("nixl_receiver_port", "pd_peer_init_port"),
        Alias("nixl_peer_init_port", "pd_peer_init_port"),
        Alias("nixl_peer_alloc_port", "pd_peer_alloc_port"),
        Alias("nixl_proxy_host", "pd_proxy_host"),
        Alias("nixl_proxy_port", "pd_proxy_port"),
        Alias("nixl_buffer_size", "pd_buffer_size"),
        Alias("nixl_buffer_device", "pd_buffer_device"),
    )
}

# In LMCache's 1P1D NIXL configs a *sender* used these to name the receiver it pushed to.
# Our sender is told the decoder per request (the proxy's kv_transfer_params), and our
# pd_peer_host is this engine's own advertised host, so on a sender they are ignored.
SENDER_PEER_ALIASES = frozenset(
    {"nixl_peer_host", "nixl_peer_port", "nixl_receiver_host", "nixl_receiver_port"}
)

# With LMCache's NIXL *storage* backend (extra_config.enable_nixl_storage) these size the
# storage staging buffer, not a PD buffer: then they are LMCache keys we ignore.
_NIXL_STORAGE_KEYS = frozenset({"nixl_buffer_size", "nixl_buffer_device"})


def ignored_keys(ours: Collection[str]) -> frozenset[str]:
    """LMCache keys that are neither lmcache-pd keys nor aliases of them."""
    return frozenset(LMCACHE_KEYS - set(ours) - set(ALIASES))


def is_lmcache_key(key: str) -> bool:
    """Whether LMCache has or had ``key`` (directly, or as an ``ec_`` EC override)."""
    if key in LMCACHE_KEYS or key == LMCACHE_EC_KEY:
        return True
    return key.startswith(LMCACHE_EC_PREFIX) and key[len(LMCACHE_EC_PREFIX) :] in LMCACHE_KEYS


def nixl_storage_enabled(data: Mapping[str, Any]) -> bool:
    """``extra_config.enable_nixl_storage`` is set (LMCache's NIXL storage backend)."""
    extra = data.get("extra_config")
    return isinstance(extra, Mapping) and bool(extra.get("enable_nixl_storage"))


# --- one layer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Given:
    """One value for one of our keys, and the name it was given under (for messages)."""

    label: str  # e.g. "nixl_role" or "LMCACHE_NIXL_ROLE"
    value: Any
    alias: Alias | None = None


@dataclass
class Layer:
    """One layer of raw keys split by kind. ``given`` maps our key to every name that
    set it in this layer (the key itself and/or aliases), in input order."""

    given: dict[str, list[Given]] = field(default_factory=dict)
    renamed: list[str] = field(default_factory=list)  # "nixl_role -> pd_role"
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def items(self) -> Iterator[tuple[str, list[Given]]]:
        return iter(self.given.items())


def normalize(
    data: Mapping[str, Any],
    ours: Collection[str],
    *,
    label: Callable[[str], str] = str,
    nixl_storage: bool = False,
) -> Layer:
    """Split one layer of raw keys. ``label(key)`` names a key in messages (the env layer
    names ``LMCACHE_<KEY>``). Aliases are recorded under their target key. An IMPLIES
    alias that reads as ``false`` records nothing; one that is not a bool at all is
    recorded as given, so the caller's type check names it."""
    layer = Layer()
    for raw_key, value in data.items():
        key = str(raw_key)
        name = label(key)
        alias = ALIASES.get(key)
        if key in ours:
            layer.given.setdefault(key, []).append(Given(name, value))
        elif alias is not None and nixl_storage and key in _NIXL_STORAGE_KEYS:
            layer.ignored.append(f"{name} (sizes LMCache's NIXL storage backend)")
        elif alias is not None:
            layer.renamed.append(f"{name} -> {alias.target}")
            if alias.kind is AliasKind.IMPLIES:
                try:
                    value = msgspec.convert(value, bool, strict=False)
                except msgspec.ValidationError:
                    pass  # left as given: the caller reports "expected bool"
                if value is False:
                    continue
            layer.given.setdefault(alias.target, []).append(Given(name, value, alias))
        elif is_lmcache_key(key):
            layer.ignored.append(name)
        else:
            layer.unknown.append(key)
    return layer


def split_csv(value: Any) -> Any:
    """LMCache reads list keys given as one comma-separated string (``7301,7302``,
    ``UCX,GDS``): split such a string into a list; anything else is returned as is."""
    if isinstance(value, str) and "," in value:
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# --- LMCache values ---------------------------------------------------------------------

# LMCache's remote serializers (v0 docs: torch, safetensor, fast, cachegen; v1 docs:
# naive, cachegen). Our remote tier stores our own checksummed chunk bytes ("naive"), so
# any of LMCache's names is read as "naive", with a warning; null meant "not set".
_LMCACHE_REMOTE_SERDES = frozenset({"cachegen", "torch", "safetensor", "fast"})


class Unset:
    """Marker: the value means "not set" (the key keeps its default)."""


UNSET = Unset()


def map_value(key: str, value: Any) -> tuple[Any, str | None]:
    """An LMCache value of our key ``key`` as the value we read, and a note when it was
    changed (for the one warning)."""
    if key == "remote_serde":
        if value is None:
            return UNSET, "null -> default 'naive'"
        if isinstance(value, str) and value in _LMCACHE_REMOTE_SERDES:
            return "naive", f"{value!r} -> 'naive' (lmcache-pd's only serde)"
    return value, None
