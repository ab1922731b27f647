"""Paged-KV kernels (installed as lmcache_pd.kernels): tensors, no sockets."""
