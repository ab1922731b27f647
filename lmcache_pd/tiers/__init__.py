"""CPU, disk and remote (Redis/Valkey) tiers that keep KV chunks for reuse across
requests and hosts.

``build_tiers(cfg, layout)`` gives the :class:`TieredStore` (CPU over disk over remote)
the receiver and the vLLM connector use; :class:`CPUStore`, :class:`DiskStore` and
:class:`RemoteStore` are the tiers.
"""

from lmcache_pd.tiers.base import Buffer, Store
from lmcache_pd.tiers.cpu import CPUStore
from lmcache_pd.tiers.disk import DiskStore
from lmcache_pd.tiers.manager import (
    LookupResult,
    TieredStore,
    build_tiers,
    log_lookup,
    log_store,
)
from lmcache_pd.tiers.metrics import TierMetrics, tier_metrics
from lmcache_pd.tiers.remote import RemoteStore
from lmcache_pd.tiers.remote_url import RemoteURLError, parse_remote_url

__all__ = [
    "Buffer",
    "CPUStore",
    "DiskStore",
    "LookupResult",
    "RemoteStore",
    "RemoteURLError",
    "Store",
    "TierMetrics",
    "TieredStore",
    "build_tiers",
    "log_lookup",
    "log_store",
    "parse_remote_url",
    "tier_metrics",
]
