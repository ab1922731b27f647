"""Sender side of a handoff whose receiver dies, closed right after, ``N`` times in one
process, for the "closing after a peer died never aborts" test.

Run as a script (a process of its own: what it guards against is a UCX abort, which a
pytest worker would not survive): each round starts a receiver process, hands it one
chunk, kills it, fails a second handoff, then closes the sender and its NIXL agent. UCX
aborts (SIGABRT, "arbiter group not empty") when an agent is destroyed before its worker
progressed the endpoint towards the dead peer; prints ``CLOSED <i>`` after each round.
"""

from __future__ import annotations

import gc
import sys

import numpy as np

from lmcache_pd.sender import HandoffError
from tests.conftest import receiver_process
from tests.core.helpers import CHUNK, fill, hasher, make_config, sender


def main() -> None:
    rounds = int(sys.argv[1])
    args = ["--layout", "tiny", "--chunk-size", str(CHUNK), "--buffer-bytes", str(1 << 20)]
    for i in range(rounds):
        cfg = make_config(pd_connect_timeout_s=1.5)  # as the fault test that aborted
        with receiver_process(*args) as rx, sender(cfg) as tx:
            rng = np.random.default_rng(i)
            chunks, _ = fill(tx, hasher().keys(list(range(CHUNK))), rng)
            assert tx.send(rx.endpoint, "ok", chunks).sent == 1
            rx.proc.kill()
            rx.proc.wait(10)
            more, _ = fill(tx, hasher().keys(list(range(1, CHUNK + 1))), rng)
            try:
                tx.send(rx.endpoint, "dead", more)
                raise SystemExit("a handoff to a killed receiver succeeded")
            except HandoffError:
                pass
            tx.free([c.slot for c in chunks + more])
        gc.collect()  # whatever the closed sender left now goes, on this thread
        print(f"CLOSED {i}", flush=True)


if __name__ == "__main__":
    main()
