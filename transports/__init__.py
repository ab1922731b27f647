"""Data-plane transports (installed as lmcache_pd.transports): bytes and addresses, no tokens."""
