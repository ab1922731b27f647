"""A loopback TCP proxy that delays client-to-server bytes by a fixed time.

Round trips become visible in wall time: ``n`` sequential round trips through it take at
least ``n * delay_s``, a pipelined batch about ``delay_s``. Real sockets, no mocks.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from types import TracebackType


class DelayProxy:
    """Listens on 127.0.0.1 (``port``) and forwards to ``127.0.0.1:target_port``."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closing = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delayed: bool) -> None:
        if delayed:  # each piece leaves delay_s after it arrived (a link's latency)
            pending: queue.Queue[tuple[float, bytes]] = queue.Queue()
            sender = threading.Thread(target=self._send_later, args=(pending, dst), daemon=True)
            sender.start()
        try:
            while True:
                data = src.recv(1 << 20)
                if delayed:
                    pending.put((time.monotonic() + self.delay_s, data))
                if not data:
                    break
                if not delayed:
                    dst.sendall(data)
        except OSError:
            if delayed:
                pending.put((0.0, b""))
        finally:
            if not delayed:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

    @staticmethod
    def _send_later(pending: queue.Queue[tuple[float, bytes]], dst: socket.socket) -> None:
        try:
            while True:
                due, data = pending.get()
                if not data:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
