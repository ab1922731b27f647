"""KV layout descriptors: what one token's KV cache looks like, in bytes.

A :class:`KVLayout` names the model-side facts that decide how KV is stored and moved:
layers, KV heads, head size, dtype, block (page) size, and whether K and V are split
(standard attention) or fused into one latent (MLA). From it follow bytes per token,
bytes per chunk and the **chunk format** every part of lmcache-pd agrees on:

    chunk tensor shape = [num_layers, kv_factor, tokens, num_kv_heads, head_size]

contiguous, C order, where ``kv_factor`` is 2 (K then V) or 1 (MLA). A chunk of ``t``
tokens therefore occupies the first ``t * bytes_per_token`` bytes of a chunk slot.

This module imports neither torch nor numpy (the router uses it through ``chunks``).
"""

from __future__ import annotations

import enum
import hashlib

import msgspec

# Element width in bytes of every dtype we move. Copies are by element width only.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
}


class AttentionKind(str, enum.Enum):
    """How a layer stores its KV: K and V separately, or one MLA latent."""

    KV_SPLIT = "kv_split"
    MLA = "mla"


class KVLayout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Typed description of a KV cache layout.

    ``model`` is a free-form model identity (name or path) folded into the fingerprint, so
    two engines serving different weights never share chunk keys.

    ``num_kv_heads`` are the heads this layout's chunks hold (one TP rank's share);
    ``total_kv_heads`` the model's (0: the same, TP=1) and ``head_start`` the first one
    held (see :mod:`lmcache_pd.tp`). Chunk keys use the total, so they do not depend on TP.
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str = "bfloat16"
    block_size: int = 16
    attention: AttentionKind = AttentionKind.KV_SPLIT
    model: str = ""
    total_kv_heads: int = 0
    head_start: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(
                f"layout dtype {self.dtype!r} is not supported; expected one of "
                f"{sorted(DTYPE_SIZES)}"
            )
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"layout {name} must be > 0, got {value}")
        total = self.model_kv_heads
        if self.head_start < 0 or self.head_start + self.num_kv_heads > total:
            raise ValueError(
                f"layout heads [{self.head_start}, {self.head_start + self.num_kv_heads}) "
                f"lie outside the model's {total} KV heads"
            )

    @property
    def model_kv_heads(self) -> int:
        """The model's KV heads, over all TP ranks."""
        return self.total_kv_heads or self.num_kv_heads

    @property
    def is_full(self) -> bool:
        """Whether this layout holds every KV head (TP=1, or replicated MLA)."""
        return self.num_kv_heads == self.model_kv_heads

    @property
    def is_mla(self) -> bool:
        return self.attention is AttentionKind.MLA

    @property
    def kv_factor(self) -> int:
        """2 for split K/V, 1 for MLA."""
        return 1 if self.is_mla else 2

    @property
    def dtype_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV one token occupies across all layers."""
        return (
            self.num_layers * self.kv_factor * self.num_kv_heads * self.head_size * self.dtype_size
        )

    def bytes_per_chunk(self, chunk_size: int) -> int:
        return self.bytes_per_token * chunk_size

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a chunk of ``tokens`` tokens in the chunk format (see module doc)."""
        return (self.num_layers, self.kv_factor, tokens, self.num_kv_heads, self.head_size)

    def compat_fields(self) -> dict[str, str]:
        """Fields that must match between a sender and a receiver, as strings."""
        return {
            "model": self.model,
            "num_layers": str(self.num_layers),
            "num_kv_heads": str(self.model_kv_heads),
            "head_size": str(self.head_size),
            "dtype": self.dtype,
            "attention": self.attention.value,
        }

    def fingerprint(self) -> bytes:
        """16-byte digest of the compat fields: stable across processes and hosts, and
        the same at every TP size (the model's total KV heads, not a rank's share).

        Block size is deliberately not part of it: chunks are block-size independent.
        """
        text = ";".join(f"{k}={v}" for k, v in sorted(self.compat_fields().items()))
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def store_fingerprint(self) -> bytes:
        """The fingerprint a tier namespaces its chunks by: also names the heads held
        when they are a TP rank's share, so ranks (and engines at other TP sizes)
        sharing a disk path or a Redis never read each other's bytes under one key."""
        if self.is_full:
            return self.fingerprint()
        tag = f";heads={self.head_start}+{self.num_kv_heads}".encode()
        return hashlib.blake2b(self.fingerprint() + tag, digest_size=16).digest()

    def with_heads(self, start: int, count: int) -> KVLayout:
        """The same layout holding heads ``[start, start + count)`` of the model."""
        return msgspec.structs.replace(
            self, num_kv_heads=count, head_start=start, total_kv_heads=self.model_kv_heads
        )


PRESETS: dict[str, KVLayout] = {
    # 2 layers, 2 KV heads, head size 32, fp32: 1 KiB per token. Tests and the CPU demo.
    "tiny": KVLayout(
        num_layers=2, num_kv_heads=2, head_size=32, dtype="float32", model="tiny-random"
    ),
    # Llama-3.1-8B: 32 layers, 8 KV heads, head size 128, bf16: 128 KiB per token.
    "llama-8b": KVLayout(
        num_layers=32,
        num_kv_heads=8,
        head_size=128,
        dtype="bfloat16",
        model="meta-llama/Llama-3.1-8B",
    ),
    # DeepSeek-V3-style MLA: 61 layers, one 576-wide latent per token and layer, bf16.
    "deepseek-mla": KVLayout(
        num_layers=61,
        num_kv_heads=1,
        head_size=576,
        dtype="bfloat16",
        attention=AttentionKind.MLA,
        model="deepseek-ai/DeepSeek-V3",
    ),
}


def preset(name: str) -> KVLayout:
    """Return a named layout preset, or raise ``ValueError`` naming the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown layout preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None
