"""Helpers for the real-vLLM tests: connector configs, parallel start, log parsing."""

from __future__ import annotations

import re
from typing import Any

from lmcache_pd.integration.vllm.launch import VLLMServer


def connector_config(role: str, **extra: Any) -> dict[str, Any]:
    """A ``--kv-transfer-config`` for our connector with inline config keys."""
    return {
        "kv_connector": "LMCachePDConnector",
        "kv_connector_module_path": "lmcache_pd.integration.vllm",
        "kv_role": role,
        "kv_connector_extra_config": dict(extra),
    }


def start_servers(servers: list[VLLMServer], timeout_s: float = 300.0) -> None:
    """Start several servers at once (they load in parallel), then wait for each."""
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(timeout_s)
    except BaseException:
        for s in servers:
            s.stop()
        raise


_LOOKUP_RE = re.compile(r"Total tokens (\d+), hit tokens: (\d+), need to load: (\d+)")
_LOAD_RE = re.compile(
    r"request (\S+): prompt (\d+) tokens, loading (\d+) tokens \[(\d+), (\d+)\) from (\w+), "
    r"computing (\d+)"
)


def lookup_lines(log_text: str) -> list[tuple[int, int, int]]:
    """``(total, hit, need_to_load)`` of every lookup line in a server log."""
    return [tuple(map(int, m.groups())) for m in _LOOKUP_RE.finditer(log_text)]  # type: ignore[misc]


def load_lines(log_text: str) -> list[dict[str, Any]]:
    """The connector's per-request load decisions in a server log."""
    out = []
    for m in _LOAD_RE.finditer(log_text):
        req, prompt, loading, start, end, source, computing = m.groups()
        out.append(
            {
                "req": req,
                "prompt": int(prompt),
                "loading": int(loading),
                "start": int(start),
                "end": int(end),
                "source": source,
                "computing": int(computing),
            }
        )
    return out


def texts(server: VLLMServer, prompts: list[str], max_tokens: int, **extra: Any) -> list[str]:
    return [server.completion(p, max_tokens, **extra)["choices"][0]["text"] for p in prompts]
