"""vLLM integration: the ``LMCachePDConnector`` (the only package that imports vLLM).

Load it with ``"kv_connector": "LMCachePDConnector", "kv_connector_module_path":
"lmcache_pd.integration.vllm"``. The class is imported lazily, so the helpers here
(``tiny_model``, ``launch``) work without importing vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LMCachePDConnector"]


def __getattr__(name: str) -> Any:
    if name == "LMCachePDConnector":
        from lmcache_pd.integration.vllm.connector import LMCachePDConnector

        return LMCachePDConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
