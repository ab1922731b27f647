"""NIXL transport over UCX (DRAM now, VRAM where a GPU exists).

Agents are created with ``enable_prog_thread=False``: NIXL's default progress thread
spins a full core per agent even when idle (measured: 198 % CPU for two idle agents on a
2-core box). Instead, the initiator progresses its transfers in :meth:`NixlTransport.wait`
with exponential backoff, and the target progresses in :meth:`notifications`, which the
receiver calls only while a lease is outstanding. Idle, nothing runs.

Threads: every call into the agent holds the transport's lock (:class:`_LockedAgent`),
so one transport may be used from several threads at once, as a prefiller's push and
fetch threads do with their shared sender.

Descriptor lists are prepared once (``prep_xfer_dlist``) and reused for every transfer
(``make_prepped_xfer``): no per-chunk allocation on the hot path beyond the index arrays.

Listening interfaces: UCX's TCP transport listens on every network interface it uses
(by default all of them), whatever ``pd_bind_host`` says. Given ``bind_host``, the agent
is created with ``UCX_NET_DEVICES`` naming only the interface that carries that address
(:func:`ucx_net_devices`: ``lo`` for a loopback address), so a loopback deployment
listens on no outside address. Shared-memory transports (``cma``, ``sm``) are not
network devices and stay available. A ``UCX_NET_DEVICES`` set by the user wins (NIXL's
UCX plugin honours it too); a wildcard or unknown address leaves UCX's default, with a
warning. NIXL's own ``device_list`` backend parameter is no help here: it appends an
RDMA port (``lo:1``), which names no TCP device.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from lmcache_pd.transports.base import (
    Backoff,
    Desc,
    DescListHandle,
    MemKind,
    RegistrationHandle,
    TransferHandle,
    TransferTimeout,
    Transport,
    TransportError,
    XferState,
)

log = logging.getLogger(__name__)

try:  # the meta package `nixl` and the CUDA-12 build `nixl-cu12` ship the same API
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:  # pragma: no cover - depends on what is installed
    from nixl_cu12._api import nixl_agent, nixl_agent_config

# NIXL logs every agent creation at INFO on its own handler; keep it to warnings unless
# the user asks (LMCACHE_PD_NIXL_LOG=info).
logging.getLogger("nixl").setLevel(os.environ.get("LMCACHE_PD_NIXL_LOG", "WARNING").upper())

_WILDCARDS = ("", "0.0.0.0", "::", "*")
# UCX finishes tearing down an endpoint (the close remove_remote_agent starts, the purge
# of what was queued towards a peer that died) only while its worker progresses; a worker
# destroyed with such an endpoint still pending trips a UCX assertion ("arbiter group not
# empty") that aborts the process. close() progresses this long first if it ever had peers.
CLOSE_PROGRESS_S = 0.02
_ENV_LOCK = threading.Lock()  # UCX reads UCX_NET_DEVICES while the agent is created
_FAST_TLS = ("sm", "shm", "cma", "posix", "sysv", "xpmem", "knem", "rc", "dc", "ud", "ib", "cuda")


def check_ucx_env() -> str | None:
    """Return a warning if ``UCX_TLS`` rules out the paths this host needs."""
    tls = os.environ.get("UCX_TLS")
    if not tls:
        return None
    names = {t.strip().lstrip("^") for t in tls.split(",")}
    if tls.startswith("^"):
        return None
    if not names & {"tcp", "all"}:
        return (
            f"UCX_TLS={tls!r} has no 'tcp': UCX wireup needs it on hosts without RDMA; "
            "transfers will fail. Add tcp (e.g. UCX_TLS=tcp,cma,sm,self)."
        )
    if not any(any(n.startswith(f) for f in _FAST_TLS) for n in names):
        return (
            f"UCX_TLS={tls!r} allows only TCP: KV moves over the network stack, not shared "
            "memory/RDMA/NVLink. Expect a fraction of memcpy bandwidth."
        )
    return None


def _interface_of(address: str) -> str | None:
    """Name of the local interface carrying ``address`` (None: no such interface)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6) and a.address.split("%")[0] == address:
                return name
    return None


def ucx_net_devices(bind_host: str | None) -> str | None:
    """The ``UCX_NET_DEVICES`` value that keeps UCX's listeners on ``bind_host``'s
    interface: the interface carrying that address (``lo`` for loopback), or None (UCX's
    default: every interface) for no host, a wildcard, or an address no local interface
    carries (then with a warning)."""
    if bind_host is None or bind_host.strip() in _WILDCARDS:
        return None
    host = bind_host.strip().strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:  # a host name: the address it resolves to here
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            log.warning(
                "NIXL/UCX: pd_bind_host %r does not resolve; UCX listens on every interface",
                bind_host,
            )
            return None
    device = _interface_of(str(ip))
    if device is None and ip.is_loopback:
        device = _interface_of("127.0.0.1") or "lo"
    if device is None:
        log.warning(
            "NIXL/UCX: no local interface carries pd_bind_host %s; UCX listens on every "
            "interface (set UCX_NET_DEVICES to restrict it)",
            ip,
        )
    return device


@contextmanager
def _ucx_env(net_devices: str | None) -> Iterator[str | None]:
    """``UCX_NET_DEVICES=net_devices`` while the agent is created, unless the user set
    it; yields the value UCX sees."""
    with _ENV_LOCK:
        mine = os.environ.get("UCX_NET_DEVICES")
        if mine is not None or net_devices is None:
            yield mine
            return
        os.environ["UCX_NET_DEVICES"] = net_devices
        try:
            yield net_devices
        finally:
            os.environ.pop("UCX_NET_DEVICES", None)


class _LockedAgent:
    """A NIXL agent entered by one thread at a time. Our agents are unsynchronized
    (``NIXL_THREAD_SYNC_NONE``, UCX's worker in single-thread mode) yet shared by
    threads: a prefiller's push and fetch threads use one sender. Two threads progressing
    the worker at once lost WRITE completions after a few dozen concurrent handoffs
    (every later WRITE hung until its deadline). NIXL's own ``NIXL_THREAD_SYNC_STRICT``
    fixes that too but puts UCX in multi-thread mode, and with it one engine of a CI run
    hung while creating its agent; this lock leaves UCX as it was."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self._lock = threading.Lock()  # NIXL's methods never call back into ours

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._agent, name)
        if not callable(attr):
            return attr
        lock = self._lock

        def locked(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return attr(*args, **kwargs)

        setattr(self, name, locked)  # made once: later calls skip __getattr__
        return locked


class _ClosedAgent:
    """What a closed :class:`NixlTransport` holds instead of its agent: any use raises."""

    def __getattr__(self, name: str) -> Any:
        raise TransportError(f"NIXL transport closed (agent.{name} after close())")


class NixlTransport(Transport):
    """One NIXL agent with the configured backends (UCX by default). ``bind_host``
    (``pd_bind_host``): UCX's network transports use only the interface carrying it."""

    def __init__(
        self,
        name: str | None = None,
        backends: Sequence[str] = ("UCX",),
        bind_host: str | None = None,
    ) -> None:
        warning = check_ucx_env()
        if warning:
            log.warning("NIXL/UCX: %s", warning)
        self.name = name or f"lmcache-pd-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        conf = nixl_agent_config(enable_prog_thread=False, backends=list(backends))
        with _ucx_env(ucx_net_devices(bind_host)) as devices:
            self.agent: Any = _LockedAgent(nixl_agent(self.name, conf))
        self.net_devices = devices  # what UCX was told (None: every interface)
        self._hint = ""
        if devices is not None and bind_host is not None:
            self._hint = (
                f" (UCX uses only {devices!r}, the interface of pd_bind_host={bind_host}: a "
                "peer on another host needs pd_bind_host set to this host's address on the "
                "KV network)"
            )
        missing = [b for b in backends if b not in self.agent.backends]
        if missing:
            raise TransportError(
                f"NIXL backends {missing} unavailable (plugins: {self.agent.get_plugin_list()}); "
                "install nixl-cu12 with its bundled UCX plugin"
            )
        self._regs: list[RegistrationHandle] = []
        self._prepped: list[DescListHandle] = []
        self._peers: set[str] = set()
        self._unreleased: list[TransferHandle] = []  # release failed (in flight): retried
        self._closed = False
        self._had_peers = False  # close() progresses the worker first (CLOSE_PROGRESS_S)

    # --- memory -----------------------------------------------------------------
    def register(
        self, addr: int, nbytes: int, kind: MemKind = MemKind.DRAM, device: int = 0
    ) -> RegistrationHandle:
        descs = np.array([[addr, nbytes, device]], dtype=np.uint64)
        handle = RegistrationHandle(self.agent.register_memory(descs, kind.value))
        self._regs.append(handle)
        return handle

    def deregister(self, handle: RegistrationHandle) -> None:
        if handle in self._regs:
            self._regs.remove(handle)
            self.agent.deregister_memory(handle)

    # --- peers ------------------------------------------------------------------
    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def add_peer(self, metadata: bytes) -> str:
        peer = self.agent.add_remote_agent(metadata)
        peer = peer.decode() if isinstance(peer, bytes) else peer
        self._peers.add(peer)
        self._had_peers = True
        return peer

    def remove_peer(self, peer: str) -> None:
        if peer in self._peers:
            self._peers.discard(peer)
            try:
                self.agent.remove_remote_agent(peer)
            except Exception as exc:  # the peer may be gone already
                log.debug("remove_remote_agent(%s): %s", peer, exc)

    def connect(self, peer: str) -> None:
        self.agent.make_connection(peer)

    # --- descriptor lists -------------------------------------------------------
    @staticmethod
    def _descs(descs: Sequence[Desc]) -> np.ndarray:
        return np.asarray(descs, dtype=np.uint64).reshape(-1, 3)

    def prep_local(self, descs: Sequence[Desc], kind: MemKind = MemKind.DRAM) -> DescListHandle:
        h = DescListHandle(
            self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._descs(descs), kind.value)
        )
        self._prepped.append(h)
        return h

    def prep_remote(
        self, peer: str, descs: Sequence[Desc], kind: MemKind = MemKind.DRAM
    ) -> DescListHandle:
        h = DescListHandle(self.agent.prep_xfer_dlist(peer, self._descs(descs), kind.value))
        self._prepped.append(h)
        return h

    def release_prepped(self, handle: DescListHandle) -> None:
        if handle in self._prepped:
            self._prepped.remove(handle)
            self.agent.release_dlist_handle(handle)

    # --- transfers --------------------------------------------------------------
    def write(
        self,
        local: DescListHandle,
        local_idx: Sequence[int],
        remote: DescListHandle,
        remote_idx: Sequence[int],
        notif: bytes = b"",
    ) -> TransferHandle:
        try:
            handle = TransferHandle(
                self.agent.make_prepped_xfer(
                    "WRITE",
                    local,
                    np.asarray(local_idx, dtype=np.int32),
                    remote,
                    np.asarray(remote_idx, dtype=np.int32),
                    notif,
                )
            )
        except Exception as exc:
            raise TransportError(f"NIXL WRITE could not be prepared: {exc}{self._hint}") from exc
        try:
            state = self.agent.transfer(handle)
        except Exception as exc:  # e.g. the peer disconnected since the handle was made
            # released here, not left to the traceback's frames: a handle finalized later
            # by the cyclic GC, on whatever thread, after close() aborted the process
            self.release(handle)
            raise TransportError(f"NIXL WRITE could not be posted: {exc}{self._hint}") from None
        if state == "ERR":
            self.release(handle)
            raise TransportError(
                f"NIXL WRITE failed at post (peer gone or memory unregistered?){self._hint}"
            )
        return handle

    def poll(self, handle: TransferHandle) -> XferState:
        return XferState(self.agent.check_xfer_state(handle))

    def wait(self, handle: TransferHandle, timeout_s: float) -> None:
        """Polls (progresses) on :class:`Backoff`'s WRITE schedule until done."""
        deadline = time.monotonic() + timeout_s
        gaps = Backoff()
        while True:
            state = self.poll(handle)
            if state is XferState.DONE:
                return
            if state is XferState.ERR:
                raise TransportError(
                    f"NIXL WRITE failed (peer died or connection lost){self._hint}"
                )
            if time.monotonic() >= deadline:
                raise TransferTimeout(f"NIXL WRITE not complete after {timeout_s:.1f}s")
            time.sleep(gaps.next())

    def release(self, handle: TransferHandle) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as exc:  # e.g. still in flight towards a dead peer: NIXL aborts it
            log.debug("release_xfer_handle: %s (retried at close)", exc)
            self._unreleased.append(handle)

    def notify(self, peer: str, message: bytes) -> None:
        try:
            self.agent.send_notif(peer, message)
        except Exception as exc:
            raise TransportError(f"NIXL notification to {peer} failed: {exc}{self._hint}") from exc

    def notifications(self) -> list[tuple[str, bytes]]:
        notifs = self.agent.get_new_notifs()
        out: list[tuple[str, bytes]] = []
        for peer, msgs in notifs.items():
            name = peer.decode() if isinstance(peer, bytes) else peer
            out.extend((name, m) for m in msgs)
        return out

    def close(self) -> None:
        """Releases everything the agent holds, then drops the agent itself, here and
        now, rather than leaving it to the cyclic GC: NIXL finalizing an agent or a
        transfer handle whose peer died, on whatever thread the GC happens to run, has
        aborted the process. Idempotent."""
        if self._closed:
            return
        self._closed = True
        unreleased, self._unreleased = self._unreleased, []
        for handle in unreleased:  # aborted by the first try; releasable by now
            try:
                self.agent.release_xfer_handle(handle)
            except Exception as exc:
                log.warning("NIXL transfer handle not releasable at close: %s", exc)
        for h in list(self._prepped):
            self.release_prepped(h)
        for peer in list(self._peers):
            self.remove_peer(peer)
        for reg in list(self._regs):
            self.deregister(reg)
        if self._had_peers:
            self._progress_for(CLOSE_PROGRESS_S)
        self.agent = _ClosedAgent()  # drops the last reference: NIXL destroys it here

    def _progress_for(self, seconds: float) -> None:
        """Progresses the UCX worker (through NIXL's notification poll) for ``seconds``."""
        deadline = time.monotonic() + seconds
        calls = 0
        while calls < 3 or time.monotonic() < deadline:  # at least 3, however busy the host
            self.agent.get_new_notifs()
            calls += 1
            time.sleep(0.001)
