"""Chunk keys are deterministic across processes; layouts compute sizes right."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmcache_pd.chunks import ChunkHasher, HashAlgorithm, chunk_spans, longest_prefix
from lmcache_pd.layout import AttentionKind, KVLayout, preset

SCRIPT = (
    "from lmcache_pd.chunks import ChunkHasher\n"
    "from lmcache_pd.layout import preset\n"
    "h = ChunkHasher(preset('llama-8b').fingerprint(), 16)\n"
    "print(','.join(k.hex() for k in h.keys(list(range(1000, 1100)), include_partial=True)))\n"
)


def test_keys_equal_across_processes_with_different_hash_seeds() -> None:
    outs = set()
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        outs.add(res.stdout.strip())
    assert len(outs) == 1
    keys = outs.pop().split(",")
    assert len(keys) == 7  # 6 full chunks of 16 + a partial of 4
    assert len(set(keys)) == 7


def test_prefix_chain_property() -> None:
    h = ChunkHasher(preset("tiny").fingerprint(), 4)
    a = h.keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = h.keys([1, 2, 3, 4, 5, 6, 7, 0])
    c = h.keys([0, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    assert c[0] != a[0] and c[1] != a[1]  # a change early changes every later key
    assert longest_prefix(a, set(b)) == 1


def test_keys_depend_on_layout_chunk_size_and_algorithm() -> None:
    tokens = list(range(64))
    base = ChunkHasher(preset("tiny").fingerprint(), 16).keys(tokens)
    assert ChunkHasher(preset("llama-8b").fingerprint(), 16).keys(tokens) != base
    assert ChunkHasher(preset("tiny").fingerprint(), 32).keys(tokens)[0] != base[0]
    blake = ChunkHasher(preset("tiny").fingerprint(), 16, HashAlgorithm.BLAKE2B_128)
    assert blake.keys(tokens) != base


def test_chunk_spans_and_bad_tokens() -> None:
    assert chunk_spans(10, 4) == [(0, 4), (4, 8)]
    assert chunk_spans(10, 4, include_partial=True)[-1] == (8, 10)
    assert chunk_spans(8, 4, include_partial=True) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError):
        chunk_spans(4, 0)
    with pytest.raises(ValueError, match="token ids"):
        ChunkHasher(b"x", 2).keys([1, -5])


def test_layout_sizes_and_validation() -> None:
    llama = preset("llama-8b")
    assert llama.bytes_per_token == 128 * 1024
    assert llama.bytes_per_chunk(256) == 32 * 1024 * 1024
    assert llama.chunk_shape(256) == (32, 2, 256, 8, 128)
    mla = preset("deepseek-mla")
    assert mla.attention is AttentionKind.MLA and mla.kv_factor == 1
    assert mla.bytes_per_token == 61 * 576 * 2
    with pytest.raises(ValueError, match="dtype"):
        KVLayout(num_layers=1, num_kv_heads=1, head_size=8, dtype="int4")
    with pytest.raises(ValueError, match="num_layers"):
        KVLayout(num_layers=0, num_kv_heads=1, head_size=8)
    with pytest.raises(ValueError, match="unknown layout preset"):
        preset("gpt-5")
    assert llama.fingerprint() != preset("tiny").fingerprint()
