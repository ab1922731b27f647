"""Bad command lines of ``bench e2e --shape`` and ``bench soak`` are refused with a clear
message (exit 2) before any engine starts; good ones parse to the documented defaults."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_e2e_shapes_parse_and_map() -> None:
    e2e = _load("e2e")
    a = e2e.parse(["--quick"])
    assert a.shape == [e2e.Shape.P1D1]  # today's run unchanged
    a = e2e.parse(["--shape", "2P2D, tp2-tp1,2p2d"])
    assert a.shape == [e2e.Shape.P2D2, e2e.Shape.TP2_TP1]  # case-insensitive, once each
    spec = e2e.SHAPES[e2e.Shape.TP1_TP2]
    assert (spec.prefillers, spec.decoders, spec.prefill_tp, spec.decode_tp) == (1, 1, 1, 2)
    assert set(e2e.SHAPES) == set(e2e.Shape)


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("e2e", ["--shape", "3p3d"], "unknown shape '3p3d'"),
        ("e2e", ["--shape", ","], "--shape names no shape"),
        ("soak", ["--requests", "5"], "--requests must be at least 10"),
        ("soak", ["--rate", "0"], "--rate must be > 0"),
        ("soak", ["--kill-at", "0.6", "--restart-at", "0.5"], "--kill-at <= --restart-at"),
    ],
)
def test_bad_arguments_are_refused(script: str, argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]


def test_soak_defaults() -> None:
    soak = _load("soak")
    a = soak.parse([])
    assert a.requests == 1000 and a.rate == 2.0
    assert soak.parse(["--quick"]).requests == 100
    assert a.max_seconds == 3 * 1000 / 2.0 + 120  # every run is bounded in time
