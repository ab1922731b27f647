"""pd_worker_spin_s: vLLM's step-queue readers stop busy-polling after that long.

No engine: the real ``SpinCondition`` of the installed vLLM, on real ZMQ sockets.
"""

from __future__ import annotations

import zmq

from lmcache_pd.integration.vllm.worker_spin import limit_worker_spin


def _spin_condition(ctx: zmq.Context, reader: bool, address: str) -> object:
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    return SpinCondition(is_reader=reader, context=ctx, notify_address=address)


def test_readers_made_before_and_after_spin_at_most_the_limit(tmp_path) -> None:
    ctx = zmq.Context()
    address = f"ipc://{tmp_path}/notify"
    try:
        writer = _spin_condition(ctx, False, address)
        before = _spin_condition(ctx, True, address)
        assert before.busy_loop_s == 1  # vLLM's own value
        assert limit_worker_spin(0.01) >= 1
        after = _spin_condition(ctx, True, address)
        assert before.busy_loop_s == after.busy_loop_s == 0.01
        assert writer.busy_loop_s == 0  # writers never spin
        assert limit_worker_spin(-1) == 0  # -1: left as they are
        assert before.busy_loop_s == 0.01
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

        patched = SpinCondition.__init__
        assert limit_worker_spin(0.02) >= 2  # a second call applies too (readers so far)
        assert SpinCondition.__init__.__wrapped__ is patched.__wrapped__  # replaced, not wrapped
        assert before.busy_loop_s == _spin_condition(ctx, True, address).busy_loop_s == 0.02
    finally:
        ctx.destroy(linger=0)
