"""How long a vLLM worker busy-polls its step queue after a step (``pd_worker_spin_s``).

A TP>1 vLLM worker reads each step from a shared-memory queue. After every read it keeps
polling that queue for ``busy_loop_s`` (vLLM's value: 1 s), yielding the core between
polls, before it blocks on a socket. Our handoff threads run in that process: the push
and fetch threads of a prefiller, the receiver's loop thread of a decoder. While the
worker spins they barely run (whether for the core or for the GIL we could not tell: a
plain sched_yield spinner beside such a thread does not reproduce it). Measured with the
TP engine tests on this 2-core box: a Push waited 1.0 s before the receiver's loop saw
it, and a WRITE took 1.0 s to complete where it takes 2 ms, on most requests. The same
stall, unbounded, is the likely cause of CI runs where a request's data never arrived
before the 15 s lease expired.

With the spin limited to ``pd_worker_spin_s`` (default 10 ms) the same tests ran in
125 s instead of 160 s and their slowest push or fetch took 108 ms instead of 1.0-2.0 s.
A step that comes within that window is still picked up at once; a later one wakes the
worker through vLLM's socket. With no spin at all (0), TP=2 decoding slowed to about
0.5 tokens/s here, so 0 is allowed but not the default. ``-1`` leaves vLLM's value.

This reaches into ``vllm.distributed.device_communicators.shm_broadcast``: it sets
``busy_loop_s`` on every reader ``SpinCondition`` that already exists and on those made
later. If vLLM changes that class, it logs a warning and changes nothing.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging

log = logging.getLogger("lmcache_pd.vllm")


def limit_worker_spin(seconds: float) -> int:
    """Make vLLM's step-queue readers in this process busy-poll for at most ``seconds``
    after a step (``seconds < 0``: leave them). Returns how many existing readers changed."""
    if seconds < 0:
        return 0
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return 0
    cls = getattr(shm_broadcast, "SpinCondition", None)
    params = inspect.signature(cls.__init__).parameters if cls is not None else {}
    if "busy_loop_s" not in params:
        log.warning(
            "pd_worker_spin_s=%s not applied: this vLLM has no SpinCondition(busy_loop_s); "
            "the worker's post-step busy poll may stall handoffs",
            seconds,
        )
        return 0
    if getattr(cls.__init__, "_lmcache_pd_spin", None) != seconds:
        # wraps vLLM's own __init__, not an earlier wrapper of ours (one layer, the latest
        # value); functools.wraps keeps its signature visible to the check above
        init = getattr(cls.__init__, "__wrapped__", cls.__init__)

        @functools.wraps(init)
        def patched(self: object, *args: object, **kwargs: object) -> None:
            init(self, *args, **kwargs)
            if getattr(self, "is_reader", False):
                self.busy_loop_s = seconds  # type: ignore[attr-defined]

        patched._lmcache_pd_spin = seconds  # type: ignore[attr-defined]
        cls.__init__ = patched
    changed = 0
    for obj in gc.get_objects():
        # type(), not isinstance(): that reads __class__, which warns on some of torch's objects
        if issubclass(type(obj), cls) and getattr(obj, "is_reader", False):
            obj.busy_loop_s = seconds
            changed += 1
    if changed:
        log.info("vLLM worker step queue: busy poll after a step limited to %.3f s", seconds)
    return changed
