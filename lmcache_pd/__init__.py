"""lmcache-pd: disaggregated-prefill KV transport (core, engine-independent logic)."""

__version__ = "0.1.0"
