"""The ``kv_transfer_params`` the proxy puts on requests: the one place their fields live.

The struct itself lives in ``lmcache_pd.protocol`` (core), where both the proxy that
writes it and the vLLM connector that reads it (``request.kv_transfer_params``) import it;
nobody spells the field names by hand.

Flow of one disaggregated request:

1. Proxy -> prefiller: the client's body with ``max_tokens: 1``, ``stream: false`` and
   ``kv_transfer_params = msgspec.to_builtins(KVTransferParams(...))``.
2. Prefiller -> proxy: its JSON response carries ``kv_transfer_params`` (whatever the
   connector's ``request_finished`` returned; opaque to the proxy).
3. Proxy -> decoder: the client's original body with ``kv_transfer_params`` =
   :func:`decode_params` (the returned params, plus ``do_remote_prefill: true``).
"""

from __future__ import annotations

from typing import Any

from lmcache_pd.protocol import KVTransferParams

__all__ = ["KVTransferParams", "decode_params"]


def decode_params(sent: KVTransferParams, returned: object) -> dict[str, Any]:
    """Decode-step ``kv_transfer_params`` (proxy -> decoder connector).

    Starts from what the proxy sent the prefiller, overlays what the prefiller
    returned (a dict, or anything else which is ignored), then forces
    ``do_remote_prefill: true`` / ``do_remote_decode: false`` and keeps ``req_id``
    so the decoder connector can match the pushed chunks to this request.
    """
    params: dict[str, Any] = sent.to_dict()
    if isinstance(returned, dict):
        params.update(returned)
    params["do_remote_prefill"] = True
    params["do_remote_decode"] = False
    params.setdefault("req_id", sent.req_id)
    return params
