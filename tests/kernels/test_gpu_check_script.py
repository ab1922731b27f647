"""``make gpu-check`` on a host without a GPU: it fails at once and says why (it never
skips its way to a pass), and its pytest plugin turns skipped GPU tests into failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_fails_fast_and_loudly_without_a_gpu(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "NVIDIA_SMI": str(tmp_path / "no-nvidia-smi"),
        "GPU_CHECK_OUT": str(tmp_path),
    }
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "GPU CHECK FAILED: preflight: no NVIDIA GPU on this host" in res.stderr
    assert "GPU CHECK FAILED" in (tmp_path / "gpu_check.log").read_text()


def test_skipped_gpu_tests_fail_under_the_plugin(tmp_path: Path) -> None:
    test = tmp_path / "test_fake_gpu.py"
    test.write_text(
        "import pytest\n\n"
        "@pytest.mark.gpu\n"
        "def test_needs_gpu():\n"
        "    pytest.skip('torch sees no CUDA device')\n\n"
        "def test_cpu():\n"
        "    pass\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "tests.gpu_required",
        "-p",
        "no:cacheprovider",
    ]
    ini = ["-c", os.devnull, "--rootdir", str(tmp_path)]
    res = subprocess.run(
        [*cmd, *ini, "-m", "gpu", str(test)], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "GPU test skipped on a GPU host" in out and "torch sees no CUDA device" in out
    res = subprocess.run(
        [*cmd, *ini, "-m", "not gpu", str(test)], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert res.returncode != 0 and "no test marked `gpu` was selected" in res.stdout + res.stderr
