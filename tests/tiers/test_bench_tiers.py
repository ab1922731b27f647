"""Smoke test of ``benchmarks/tiers.py`` (1 chunk, 1 round): it runs against the real
tiers, checks the bytes it reads back, and writes its table, JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tiers.py"


def test_benchmark_writes_json_and_png(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "t.json", tmp_path / "t.png"
    argv = ["--chunks", "1", "--reps", "1", "--dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--json", str(out_json), "--png", str(out_png)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out_json.read_text())
    for side, keys in (
        ("cpu", ("memcpy_put_gbps", "put_gbps", "memcpy_get_gbps", "get_into_gbps")),
        ("disk", ("file_write_gbps", "write_gbps", "file_read_gbps", "read_gbps")),
    ):
        assert all(doc[side][k] > 0 for k in keys), doc[side]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
