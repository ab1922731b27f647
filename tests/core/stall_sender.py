"""A sender that stops after Accept, for the "sender dies mid-transfer" test.

Run as a script: does Hello and Offer over the real control plane (real NIXL metadata),
prints ``ACCEPTED <n>`` and then hangs until killed. This is the one fault we inject by
hand: we cannot otherwise stop a real sender at exactly that step.
"""

from __future__ import annotations

import sys
import time

import zmq

from lmcache_pd.config import load_config
from lmcache_pd.control import Codec, DealerClient
from lmcache_pd.layout import preset
from lmcache_pd.metrics import Counters
from lmcache_pd.protocol import Accept, Compat, Hello, HelloAck, Offer
from lmcache_pd.transports.nixl import NixlTransport


def main() -> None:
    endpoint, chunk_size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = load_config(overrides={"chunk_size": chunk_size})
    layout = preset("tiny")
    transport = NixlTransport()
    client = DealerClient(zmq.Context(), Codec(cfg.auth_secret()), endpoint, Counters("stall"))
    hello = Hello(agent=transport.name, compat=Compat.of(layout, chunk_size, cfg.hash_algorithm))
    ack, _ = client.request(hello, [transport.metadata()], 10)
    assert isinstance(ack, HelloAck), ack
    keys = [bytes([i]) * 16 for i in range(n)]
    nbytes = [layout.bytes_per_chunk(chunk_size)] * n
    offer = Offer(req_id="stall", keys=keys, nbytes=nbytes, checksums=[0] * n)
    accept, _ = client.request(offer, (), 10)
    assert isinstance(accept, Accept), accept
    print(f"ACCEPTED {len(accept.slots)}", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
