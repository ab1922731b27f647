"""``bench kv_share``: bad command lines are refused (exit 2) before anything starts; the
defaults are the documented ones; the summary's ratios are recompute over each path."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kv_share.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_kv_share", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_defaults_and_summary() -> None:
    bench = _load()
    a = bench.parse([])
    assert (a.lengths, a.reps, a.hidden, a.layers, a.chunk_size) == ([2048, 4096], 3, 1024, 8, 256)
    assert a.max_model_len >= 4096 + 16
    assert bench.parse(["--quick"]).reps == 1
    rows = [
        {"path": p, "prefix_tokens": 2048, "rep": r, "ttft_s": t}
        for p, ts in (
            ("recompute", (6.0, 8.0, 7.0)),
            ("redis", (0.5, 1.0, 0.7)),
            ("p2p", (1.4,) * 3),
        )
        for r, t in enumerate(ts)
    ]
    (s,) = bench.summarize(rows, [2048])
    assert s["recompute_ttft_s"] == 7.0 and s["redis_ttft_s"] == 0.7
    assert s["redis_speedup"] == pytest.approx(10.0) and s["p2p_speedup"] == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reps", "0"], "--reps must be >= 1"),
        (["--lengths", "2k"], "--lengths: comma-separated token counts"),
        (["--lengths", "100"], "every prefix needs >= --chunk-size (256) tokens"),
    ],
)
def test_bad_arguments_are_refused(argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
