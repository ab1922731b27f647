"""Proxy router (installed as lmcache_pd.router). Imports no torch, NIXL or vLLM."""
