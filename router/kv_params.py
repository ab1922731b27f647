"""The ``kv_transfer_params`` the proxy puts on requests: the one place their fields live.

The vLLM connector (``lmcache_pd.integration.vllm``) reads these from
``request.kv_transfer_params``. The proxy builds them; nobody else should spell the
field names by hand.

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

import msgspec


class KVTransferParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Prefill-step ``kv_transfer_params`` (proxy -> prefiller connector).

    Fields:
        do_remote_decode: always ``True`` on the prefill step: the KV computed here is
            pushed to a remote decoder instead of being decoded locally.
        req_id: proxy-minted id of this request (``pd-<hex>-<n>``), unique per proxy
            process. The prefiller's ``Offer`` to the decoder and its ``HandoffDone`` to
            the proxy carry it, so all three agree on one id whatever ids vLLM assigns.
        decoder_host: host of the chosen decoder's control endpoint (its ZMQ ROUTER).
        decoder_init_port: port of that endpoint (``pd_peer_init_port`` of the decoder,
            TP rank 0; the connector adds the rank as LMCache does for int ports).
        proxy_notify: ``tcp://host:port`` where the proxy's PULL socket waits for the
            prefiller's ``HandoffDone``; ``None`` when the proxy runs HTTP-only and does
            not listen (the prefiller then just skips the notification).
    """

    do_remote_decode: bool = True
    req_id: str
    decoder_host: str
    decoder_init_port: int
    proxy_notify: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


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
