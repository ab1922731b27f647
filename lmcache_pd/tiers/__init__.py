"""CPU and disk tiers that keep KV chunks for reuse across requests.

``build_tiers(cfg, layout)`` gives the :class:`TieredStore` (CPU over disk) the receiver
and the vLLM connector use; :class:`CPUStore` and :class:`DiskStore` are the tiers.
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

__all__ = [
    "Buffer",
    "CPUStore",
    "DiskStore",
    "LookupResult",
    "Store",
    "TierMetrics",
    "TieredStore",
    "build_tiers",
    "log_lookup",
    "log_store",
    "tier_metrics",
]
