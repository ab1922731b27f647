"""The user-facing commands end to end: `lmcache-pd demo` and `lmcache-pd check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lmcache_pd.selfcheck import parse_put_paths

UCX_TABLE = """
[1] [vm:1:0]   +--------+-------------+-----------------------------------+
[1] [vm:1:0]   | a self cfg#0                                             |
[1] [vm:1:0]   | remote memory write by ucp_put* from host memory to host |
[1] [vm:1:0]   +--------+-------------+-----------------------------------+
[1] [vm:1:0]   | Range  | Description |              Config               |
[1] [vm:1:0]   +--------+-------------+-----------------------------------+
[1] [vm:1:0]   | 0..8k  | short       | tcp/lo                            |
[1] [vm:1:0]   | 8k..inf| zero-copy   | cma/memory                        |
[1] [vm:1:0]   +--------+-------------+-----------------------------------+
[1] [vm:1:0]   | active message by ucp_am_send* from host memory |
[1] [vm:1:0]   |   1..16515 | zero-copy          | tcp/lo        |
"""


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache_pd.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_parse_put_paths_reads_only_the_remote_write_table() -> None:
    assert parse_put_paths(UCX_TABLE) == ["tcp/lo", "cma/memory"]
    assert parse_put_paths("no tables here") == []


def test_demo_moves_verifies_and_dedupes(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    res = _cli(
        "demo", "--requests", "4", "--tokens", "96", "--layout", "tiny",
        "--chunk-size", "16", "--buffer-mb", "4", "--json", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Stored 96 out of total 96 tokens" in res.stdout
    summary = json.loads(out.read_text())
    assert summary["verified"] is True
    assert summary["requests"] == 4
    assert summary["dedupe_hit_tokens"] == 2 * 48  # requests 1 and 3 share half of 96
    assert summary["bytes_moved"] == (4 * 6 - 2 * 3) * 16 * 1024
    assert summary["chunks_verified_at_receiver"] > 0


def test_check_reports_path_bandwidth_and_idle_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    res = _cli("check", "--json", str(out), "--size-mb", "8", "--reps", "2", "--idle-seconds", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads(out.read_text())
    assert result["bytes_intact"] is True
    assert result["nixl_gbps"] > 0 and result["memcpy_gbps"] > 0
    assert result["ucx_put_path"], "UCX printed no remote-write table"
    assert result["idle_cpu_pct"] < 5.0, result  # no thread of ours spins
