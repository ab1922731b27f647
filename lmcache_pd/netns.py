"""Two "hosts" on one box: network namespaces joined by a veth pair (tests, benchmarks).

::

    with NetnsPair() as pair:                 # root + `ip` needed; see unavailable_reason()
        rx = pair.b.popen([...receiver...])   # runs under `ip netns exec <ns b>`
        pair.a.call(httpx.get, f"http://{pair.b.addr}:{port}/")  # a thread inside ns a

Topology: namespace ``a`` holds ``pd0`` = ``10.231.0.1/24``, namespace ``b`` holds ``pd0``
= ``10.231.0.2/24`` (both ends carry the same device name, so ``UCX_NET_DEVICES=pd0``
fits a process in either), loopback is up in each. No address, route or device is added
to the root namespace: the addresses exist only inside the two namespaces, so nothing
outside them can be reached or disturbed, and two pairs never clash.

Reaching them from the root namespace: a caller (the test, a proxy's client) runs code
*inside* a namespace instead of routing into it. :meth:`Host.popen` starts a process
there (``ip netns exec``); :meth:`Host.call` runs a function in a short-lived thread that
first joins the namespace with ``setns(2)`` (a network namespace is per thread), so the
sockets that function opens live in that namespace. The proxy of a 1P1D run sits in
namespace ``a`` next to the prefiller (as on a real prefill host) and reaches the decoder
over the veth; the client's requests are made with ``call``.

Cleanup always happens: ``__exit__``, ``close()`` and an ``atexit`` hook delete both
namespaces (which destroys the veth); names carry our pid, and pairs left by a process
that died without cleanup (``lmcpd-<dead pid>-*``) are removed by the next ``create``.
Processes still running inside a namespace are the caller's to stop (``popen`` returns
them) before ``close``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
DEVICE = "pd0"
PREFIX = "lmcpd-"
DEFAULT_SUBNET = "10.231.0"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-(\d+)-[ab]$")
_T = TypeVar("_T")
_counter = 0
_counter_lock = threading.Lock()
_live: set[NetnsPair] = set()


class NetnsError(RuntimeError):
    """Creating, entering or deleting a namespace failed; names the command and its output."""


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root, e.g. in CI"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _libc_setns() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.setns
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@dataclass(frozen=True)
class Host:
    """One namespace of a pair: its name, its address on ``pd0`` and how to run in it."""

    ns: str
    addr: str
    device: str = DEVICE

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this namespace."""
        return ["ip", "netns", "exec", self.ns]

    def tcp_env(self) -> dict[str, str]:
        """UCX settings that force the KV bytes over TCP on this host's veth."""
        return {"UCX_TLS": "tcp", "UCX_NET_DEVICES": self.device}

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this namespace (extra ``env`` on top of ours)."""
        full_env = {**os.environ, **(env or {})}
        return subprocess.Popen([*self.prefix(), *argv], env=full_env, **kwargs)

    def run(
        self, argv: Sequence[str], *, timeout_s: float = 120.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this namespace to completion; output captured as text."""
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [*self.prefix(), *argv],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout_s,
        )

    def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` in a thread joined to this namespace; its result or error.

        Only sockets opened inside ``fn`` live in the namespace (a pooled client made
        outside it keeps its own namespace). Start processes that use UCX with
        :meth:`popen` instead: ``ip netns exec`` also remounts ``/sys``, where UCX looks
        up the namespace's network devices."""
        out: dict[str, Any] = {}

        def body() -> None:
            try:
                try:
                    fd = os.open(f"/var/run/netns/{self.ns}", os.O_RDONLY)
                except OSError as exc:
                    raise NetnsError(f"namespace {self.ns} cannot be entered: {exc}") from None
                try:
                    if _libc_setns()(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise NetnsError(f"setns({self.ns}) failed: {os.strerror(err)}")
                finally:
                    os.close(fd)
                out["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller's thread
                out["error"] = exc

        t = threading.Thread(target=body, name=f"netns-{self.ns}", daemon=True)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]


class NetnsPair:
    """Namespaces ``a`` and ``b`` joined by a veth pair; a context manager."""

    def __init__(self, subnet: str = DEFAULT_SUBNET) -> None:
        if not re.fullmatch(r"10\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError(f"subnet must be the first three octets of a 10.x /24, got {subnet!r}")
        global _counter
        with _counter_lock:
            _counter += 1
            n = _counter
        base = f"{PREFIX}{os.getpid()}-{n}"
        self.a = Host(f"{base}-a", f"{subnet}.1")
        self.b = Host(f"{base}-b", f"{subnet}.2")
        self.created = False

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def create(self) -> NetnsPair:
        """Make both namespaces, the veth and the addresses; undo everything on failure."""
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        sweep_stale()
        _live.add(self)
        self.created = True
        try:
            for host in self.hosts:
                _ip("netns", "add", host.ns)
                _ip("-n", host.ns, "link", "set", "lo", "up")
            # created directly inside the namespaces: never a device in the root one
            _ip(
                "link", "add", DEVICE, "netns", self.a.ns, "type", "veth",
                "peer", "name", DEVICE, "netns", self.b.ns,
            )  # fmt: skip
            for host in self.hosts:
                _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", DEVICE)
                _ip("-n", host.ns, "link", "set", DEVICE, "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete both namespaces (and with them the veth). Safe to call twice."""
        if not self.created:
            return
        for host in self.hosts:
            _ip("netns", "del", host.ns, check=False)
        self.created = False
        _live.discard(self)

    def __enter__(self) -> NetnsPair:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


def our_namespaces() -> list[str]:
    """Namespaces named by this module (``lmcpd-<pid>-<n>-a|b``), any process."""
    res = _ip("netns", "list", check=False)
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    return [n for n in names if _NAME_RE.match(n)]


def sweep_stale() -> list[str]:
    """Delete our namespaces whose creating process is gone; the names deleted."""
    gone = []
    for name in our_namespaces():
        m = _NAME_RE.match(name)
        assert m is not None
        pid = int(m.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _close_all() -> None:
    for pair in list(_live):
        with contextlib.suppress(Exception):
            pair.close()
