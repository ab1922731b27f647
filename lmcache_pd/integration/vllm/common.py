"""Shared pieces of the vLLM connector: roles, config, layout, step metadata, slots.

Both halves of :class:`~lmcache_pd.integration.vllm.connector.LMCachePDConnector` (the
scheduler side in the engine-core process, the worker side in each worker process) use
these. The metadata dataclasses travel from the scheduler to the workers inside vLLM's
``SchedulerOutput`` once per step.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from lmcache_pd.config import Config, ConfigError, PDRole, load_config
from lmcache_pd.kernels.geometry import TORCH_DTYPES
from lmcache_pd.layout import AttentionKind, KVLayout
from lmcache_pd.protocol import DecodeParams, KVTransferParams

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig

log = logging.getLogger("lmcache_pd.vllm")

CONFIG_FILE_KEY = "config_file"


class KVRole(str, enum.Enum):
    """vLLM's ``kv_role`` as this connector understands it."""

    PRODUCER = "kv_producer"
    CONSUMER = "kv_consumer"
    BOTH = "kv_both"

    @classmethod
    def from_vllm(cls, kv_role: str | None) -> KVRole:
        try:
            return cls(kv_role or "kv_both")
        except ValueError:
            raise ConfigError(
                [f"kv_role: expected one of {[r.value for r in cls]}, got {kv_role!r}"]
            ) from None


def setup_logging() -> None:
    """Give the ``lmcache_pd`` logger an INFO handler in engine processes (once)."""
    root = logging.getLogger("lmcache_pd")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(
            f"[lmcache-pd pid={os.getpid()}] %(levelname)s %(asctime)s %(message)s",
            "%m-%d %H:%M:%S",
        )
    )
    root.addHandler(handler)
    root.setLevel(os.environ.get("LMCACHE_LOG_LEVEL", "INFO").upper())
    root.propagate = False


def load_connector_config(kv_transfer_config: KVTransferConfig, role: KVRole) -> Config:
    """Our :class:`Config` from ``kv_connector_extra_config`` (``config_file`` and/or
    inline keys) over ``LMCACHE_*`` env over the yaml file (``LMCACHE_CONFIG_FILE``).

    Raises :class:`ConfigError` naming every bad key, so the engine refuses to start.
    """
    extra: dict[str, Any] = dict(kv_transfer_config.kv_connector_extra_config or {})
    path = extra.pop(CONFIG_FILE_KEY, None)
    overrides = dict(extra)
    if role is not KVRole.BOTH:
        overrides.setdefault("enable_pd", True)
        want = PDRole.SENDER if role is KVRole.PRODUCER else PDRole.RECEIVER
        overrides.setdefault("pd_role", want.value)
    cfg = load_config(path, overrides)
    if role is not KVRole.BOTH and cfg.pd_role is not None:
        want = PDRole.SENDER if role is KVRole.PRODUCER else PDRole.RECEIVER
        if cfg.pd_role is not want:
            raise ConfigError(
                [
                    f"pd_role: {cfg.pd_role.value!r} contradicts kv_role {role.value!r} "
                    f"(expected {want.value!r})"
                ]
            )
    return cfg


_DTYPE_NAMES = {t: name for name, t in TORCH_DTYPES.items()}  # the kernels' one table
_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def layout_from_vllm_config(vllm_config: VllmConfig) -> KVLayout:
    """The KV layout the engine will allocate, from its config (scheduler side)."""
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    cc = vllm_config.cache_config
    cache_dtype = str(cc.cache_dtype)
    if cache_dtype == "auto":
        dtype = _DTYPE_NAMES.get(mc.dtype, str(mc.dtype).removeprefix("torch."))
    else:
        dtype = _CACHE_DTYPES.get(cache_dtype, cache_dtype)
    mla = bool(getattr(mc, "use_mla", False))
    return KVLayout(
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=1 if mla else mc.get_num_kv_heads(pc),
        head_size=mc.get_head_size(),
        dtype=dtype,
        block_size=int(cc.block_size),
        attention=AttentionKind.MLA if mla else AttentionKind.KV_SPLIT,
        model=str(mc.model),
        total_kv_heads=1 if mla else mc.get_total_num_kv_heads(),
    )


_LAYER_RE = re.compile(r"\.(\d+)\.")


def ordered_layers(kv_caches: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``kv_caches`` sorted by the layer index in each name (``model.layers.3.attn``)."""

    def index(item: tuple[str, torch.Tensor]) -> int:
        m = _LAYER_RE.search(item[0] + ".")
        return int(m.group(1)) if m else 0

    return sorted(kv_caches.items(), key=index)


def layout_from_tensors(expected: KVLayout, kv_caches: Mapping[str, torch.Tensor]) -> KVLayout:
    """Check the real KV tensors against ``expected`` and return the layout to move.

    The kernel block size (what the tensors are paged by) may differ from vLLM's
    scheduler block size; it is read from the tensors. Any other difference is an
    error naming the field.
    """
    layers = ordered_layers(kv_caches)
    if not layers:
        raise ValueError("register_kv_caches got no KV cache tensors")
    first = layers[0][1]
    dtype = _DTYPE_NAMES.get(first.dtype, str(first.dtype))
    shape = tuple(first.shape)
    if expected.is_mla:
        block_size = shape[-2]
    elif len(shape) == 4:  # [B, H, N, 2D]: vLLM's CPU backend / unified 4-D view
        block_size = shape[2]
    elif len(shape) == 5 and shape[0] == 2:  # [2, B, N, H, D]
        block_size = shape[2]
    elif len(shape) == 5 and shape[1] == 2:  # [B, 2, N, H, D]
        block_size = shape[2]
    else:
        raise ValueError(f"unsupported KV cache tensor shape {list(shape)}")
    errors = []
    if len(layers) != expected.num_layers:
        errors.append(f"num_layers: config says {expected.num_layers}, tensors {len(layers)}")
    if dtype != expected.dtype and not (expected.dtype_size == 1 and dtype == "uint8"):
        errors.append(f"dtype: config says {expected.dtype}, tensors {dtype}")
    if errors:
        raise ValueError("KV cache tensors do not match the model config: " + "; ".join(errors))
    return KVLayout(
        num_layers=expected.num_layers,
        num_kv_heads=expected.num_kv_heads,
        head_size=expected.head_size,
        dtype=expected.dtype,
        block_size=block_size,
        attention=expected.attention,
        model=expected.model,
        total_kv_heads=expected.model_kv_heads,
        head_start=expected.head_start,
    )


def agent_name(role: KVRole, rank: int) -> str:
    """A NIXL agent name unique per host, process, role and TP rank.

    A peer keys its remote-agent table by this name: two decoders (or prefillers) that
    registered under the same name would overwrite each other there, and one prefiller
    pushing to both would write into the wrong one's buffer.
    """
    side = "prefiller" if role is KVRole.PRODUCER else "decoder"
    return f"lmcache-pd-{side}-{socket.gethostname()}-{os.getpid()}-{rank}"


def lookup_endpoint(engine_id: str, rank: int) -> str:
    """IPC address of the worker's lookup socket (private per-user directory)."""
    base = Path(tempfile.gettempdir()) / f"lmcache-pd-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", engine_id)[:48]
    return f"ipc://{base}/{safe}-lookup-{rank}.ipc"


# --- per-step metadata (scheduler -> workers) ---


# Where a prefiller pushes a request's chunks: the proxy's kv_transfer_params.
SendTarget = KVTransferParams


@dataclass
class LoadSpec:
    """Write tokens ``[start, end)`` of a request from held chunks into its blocks.

    ``keys[i]`` is chunk ``first_chunk + i``. ``wait_s`` > 0: some chunks may still be
    landing (a transfer in flight); wait that long for them, then load what is there.
    ``pull``: the standard contract's params; fetch the chunks from that prefiller first.
    ``error``: the request's params were unusable (policy ``fail``): load nothing and
    report every block invalid, naming this cause. ``source_tp``: the prefiller's TP
    size (0: ours); at another size each chunk arrives as head pieces (:mod:`lmcache_pd.tp`).
    """

    req_id: str
    keys: list[bytes]
    first_chunk: int
    start: int
    end: int
    block_ids: list[int]
    wait_s: float = 0.0
    transfer_id: str | None = None
    pull: DecodeParams | None = None
    error: str | None = None
    source_tp: int = 0


@dataclass
class SaveSpec:
    """Gather chunks ``first_chunk ..`` of a request out of its blocks.

    kv_both: into the tiers. Producer: into send slots; ``last`` marks the request's
    final save, after which its chunks are pushed to ``target`` (push-ahead) or held
    under ``hold`` until a decoder fetches them (standard contract).
    """

    req_id: str
    keys: list[bytes]
    first_chunk: int
    block_ids: list[int]
    total_tokens: int
    target: SendTarget | None = None
    hold: str | None = None
    last: bool = False


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # the step computes nothing (vLLM steps anyway while a request waits for its KV):
    # the workers may wait a little for a load to finish instead of returning at once
    idle: bool = False


def slot_mapping(
    block_ids: Sequence[int], block_size: int, start: int, end: int, lo: int, hi: int
) -> torch.Tensor:
    """Slots of tokens ``[lo, hi)`` (one chunk); tokens outside ``[start, end)`` -> -1.

    ``slot = block_ids[t // block_size] * block_size + t % block_size`` with vLLM's
    scheduler block size; a kernel block size that divides it gives the same linear slot.
    """
    t = torch.arange(lo, hi, dtype=torch.int64)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
    idx = torch.clamp(t // block_size, max=max(len(block_ids) - 1, 0))
    slots = blocks[idx] * block_size + t % block_size
    outside = (t < start) | (t >= end) | (t // block_size >= len(block_ids))
    slots[outside] = -1
    return slots
