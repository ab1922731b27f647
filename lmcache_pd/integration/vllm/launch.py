"""Start and stop vLLM OpenAI api_server processes (tests, examples, benchmarks).

Imports no vLLM: the server runs in a child process started with
``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails in the CPU
build). Each server runs in its own process group, logs to a file, and is stopped with
SIGTERM then SIGKILL on that group only. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

DEFAULT_START_TIMEOUT_S = 300.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_pair(host: str = "127.0.0.1", avoid: tuple[int, ...] = ()) -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free a moment ago (a KV-event publisher
    binds its replay socket on the next port), neither in ``avoid``."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a:
            a.bind((host, 0))
            port = int(a.getsockname()[1])
            if port + 1 > 65535 or {port, port + 1} & set(avoid):
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                try:
                    b.bind((host, port + 1))
                except OSError:
                    continue
            return port
    raise OSError(f"no two adjacent free ports on {host}")


class ServerError(RuntimeError):
    """A server failed to start or answered with an error."""


class VLLMServer:
    """One ``api_server`` process bound to 127.0.0.1."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        log_path: str | os.PathLike[str],
        *,
        port: int | None = None,
        kv_transfer_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        max_model_len: int = 512,
        kv_cache_space_gb: int = 1,
        name: str = "engine",
        dtype: str = "float32",
    ) -> None:
        self.model = str(model)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.kv_transfer_config = dict(kv_transfer_config) if kv_transfer_config else None
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.max_model_len = max_model_len
        self.kv_cache_space_gb = kv_cache_space_gb
        self.name = name
        self.dtype = dtype
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            self.dtype,
            "--enforce-eager",
            "--served-model-name",
            "tiny",
        ]
        if self.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        return cmd + self.extra_args

    def start(self) -> VLLMServer:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_space_gb))
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"$ {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> VLLMServer:
        """Block until ``/health`` answers 200; raise with the log tail on failure."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerError(
                        f"{self.name} exited with {self.proc.returncode} while starting; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(1.0)
        raise ServerError(
            f"{self.name} not healthy after {timeout_s:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def wait_exit(self, timeout_s: float) -> int | None:
        """Wait for the process to exit by itself; its return code or None."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group, then SIGKILL after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            # children (engine core, workers) share the group; make sure none remain
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL the whole process group now (simulates a crash)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> VLLMServer:
        try:
            return self.start().wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- requests ---

    def completion(
        self,
        prompt: str | list[int],
        max_tokens: int = 16,
        *,
        timeout_s: float = 120.0,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST /v1/completions with greedy sampling; the decoded JSON body."""
        body: dict[str, Any] = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        body.update(extra)
        resp = httpx.post(f"{self.url}/v1/completions", json=body, timeout=timeout_s)
        if resp.status_code != 200:
            raise ServerError(f"{self.name}: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def tokenize(self, prompt: str) -> list[int]:
        resp = httpx.post(
            f"{self.url}/tokenize", json={"model": "tiny", "prompt": prompt}, timeout=30
        )
        resp.raise_for_status()
        return list(resp.json()["tokens"])

    def metrics(self) -> str:
        resp = httpx.get(f"{self.url}/metrics", timeout=10)
        resp.raise_for_status()
        return resp.text


def metric_value(text: str, name: str) -> float | None:
    """Sum of the samples of a Prometheus metric ``name`` in an exposition text."""
    total = None
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest[:1] not in ("{", " "):
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
        total = (total or 0.0) + value
    return total
