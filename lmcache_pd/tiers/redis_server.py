"""A throwaway local ``redis-server`` for tests, benchmarks and demos of the remote tier.

:class:`RedisServer` runs the real server binary on a free loopback port (or a port it
is given) with its own directory and no persistence (``--save ""``, ``--appendonly
no``), waits until it answers ``PING``, and can be killed, restarted on the same port,
paused (``SIGSTOP``, a stalled server) and resumed. :func:`redis_server_binary` finds the
binary or says how to install it. Nothing here talks to anything but 127.0.0.1 (or a
unix socket in the server's directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis

INSTALL_HINT = (
    "redis-server is not installed: `apt-get install -y redis-server` (Debian/Ubuntu; "
    "`make setup` and .ci/run do it when run as root)"
)


def redis_server_binary() -> str | None:
    """Path of ``redis-server`` (``$LMCACHE_PD_REDIS_SERVER`` wins), or None."""
    explicit = os.environ.get("LMCACHE_PD_REDIS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)),
        None,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` (and a unix socket), owned by
    this object. ``maxmemory`` (bytes, 0: none) comes with ``allkeys-lru``. ``prefix``
    runs it elsewhere (``ip netns exec NS``) listening on ``bind``; readiness is probed
    over the unix socket, which any namespace reaches."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        maxmemory: int = 0,
        binary: str | None = None,
        start_timeout_s: float = 10.0,
        extra_args: Sequence[str] = (),
        prefix: Sequence[str] = (),
        bind: Sequence[str] = ("127.0.0.1",),
        password: str | None = None,
    ) -> None:
        found = binary or redis_server_binary()
        if found is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.binary = found
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="lmcache-pd-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.unix_socket = self.dir / "redis.sock"
        self.maxmemory = maxmemory
        self.start_timeout_s = start_timeout_s
        self.extra_args = list(extra_args)
        self.prefix = list(prefix)  # e.g. `ip netns exec NS`: run it in a network namespace
        self.bind = list(bind)
        self.password = password  # needed off loopback (protected mode)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain redis-py client of this server over its unix socket (tests, baselines)."""
        return redis.Redis(
            unix_socket_path=str(self.unix_socket),
            password=self.password,
            **kwargs,  # type: ignore[arg-type]
        )

    def start(self) -> None:
        """Start (or restart) the server on its port; returns once it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return
        args = [
            *self.prefix,
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            *self.bind,
            "--unixsocket",
            str(self.unix_socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        if self.maxmemory:
            args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "allkeys-lru"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + self.start_timeout_s
        probe = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    err = (
                        self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    )
                    log = self.dir / "redis.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with {self.proc.returncode}: "
                        f"{err.strip()} {tail.strip()}"
                    )
                with contextlib.suppress(redis.exceptions.RedisError):
                    if probe.ping():
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
                time.sleep(0.02)
        finally:
            probe.close()

    def kill(self) -> None:
        """SIGKILL the server (a crash: everything in memory is lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections (a stall)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
