"""Smoke test of ``benchmarks/kernels.py`` (tiny sizes): table, JSON and PNG come out."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def test_benchmark_writes_json_and_png(tmp_path: Path) -> None:
    module = runpy.run_path(str(BENCH), run_name="bench_kernels")
    out_json, out_png = tmp_path / "k.json", tmp_path / "k.png"
    argv = ["--tokens", "16", "48", "--layers", "2", "--reps", "2", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert module["main"]([*argv, "--json", str(out_json), "--png", str(out_png)]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads must not leak into later tests
    doc = json.loads(out_json.read_text())
    assert doc["device"] == "cpu" and doc["threads"] == 1
    rows = doc["results"]
    assert {(r["layout"], r["fmt"]) for r in rows} == {
        ("llama-8b", "cpu_vllm"),
        ("llama-8b", "flash_attn"),
        ("deepseek-mla", "mla"),
    }
    assert all(r["layers"] == 2 and r["tokens"] in (16, 48) for r in rows)
    for r in rows:
        assert r["gather_gbps"] > 0 and r["scatter_gbps"] > 0 and r["copy_gbps"] > 0
        assert abs(r["gather_over_copy"] - r["gather_gbps"] / r["copy_gbps"]) < 0.01
        # the ratio base is the best of torch's copy, memcpy and the streamed native copy
        copies = (r["copy_torch_gbps"], r["copy_memcpy_gbps"], r["copy_stream_gbps"])
        assert r["copy_gbps"] == max(copies) and min(copies) > 0
    assert {"gather_over_copy_min", "scatter_over_copy_min", "meets_target"} <= set(doc["summary"])
    for r in rows:  # the fused-checksum variants are timed in the same run
        assert r["gather_sum_gbps"] > 0 and r["scatter_sum_gbps"] > 0 and r["copy_sum_gbps"] > 0
    assert {"gather_sum_over_gather_min", "meets_checksum_target"} <= set(doc["summary"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
