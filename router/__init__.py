"""Proxy router (installed as lmcache_pd.router). Imports no torch, NIXL or vLLM.

Modules:
    proxy      the process: FastAPI app + raw ASGI fast path, ``main``, ``start_in_thread``,
               ``spawn`` (what tests and the vLLM end-to-end test use to run it)
    flow       one request: tokenize -> route -> prefill (max_tokens=1) -> handoff wait
               -> decode -> relay; OpenAI-shaped errors
    kv_params  ``KVTransferParams``: the fields the proxy puts in ``kv_transfer_params``
    policy     round_robin / least_loaded / cache_aware (bounded prefix map, load guard)
    pool       engine pools, ejection and re-admission by health checks
    upstream   pooled aiohttp client to the engines, errors mapped to our own
    relay      SSE relay with client-disconnect -> upstream-cancel
    handoff    ZMQ PULL listener for the prefiller's signed ``HandoffDone``
    table      bounded in-flight / finished request table
    metrics    Prometheus metrics of one proxy instance
    settings   ``ProxySettings``, yaml keys and CLI flags
    stub       a stub OpenAI engine (tests, benchmark baseline)
"""
