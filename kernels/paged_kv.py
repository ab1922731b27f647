"""Public kernel API: gather/scatter between paged KV caches and chunk buffers.

Owns :func:`gather` and :func:`scatter` and the choice of backend: the NVRTC-compiled
CUDA kernels (:mod:`lmcache_pd.kernels.cuda_kernels`) for CUDA tensors when cuda-python
is installed, else the vectorised torch path (:mod:`lmcache_pd.kernels.torch_path`).
Formats and validation live in :mod:`lmcache_pd.kernels.geometry`.

Chunk format (defined by ``lmcache_pd.layout``, mirrored by :class:`KVShape`): a contiguous tensor
``[num_layers, kv_factor, tokens, num_kv_heads, head_size]`` (K then V, or one MLA
latent). ``out``/``chunk`` may be such a tensor, or a flat contiguous ``uint8`` buffer
whose first ``tokens * layout.bytes_per_token`` bytes are viewed in that shape.

Slots: ``slot = block_id * block_size + offset``, in any order, with gaps and repeats.
**Negative slots are padding**: ``gather`` writes zeros for them and ``scatter`` skips
them. A slot ``>= num_blocks * block_size`` raises ``ValueError`` on the torch path; the
CUDA kernels treat it like padding (memory safety without a host sync). With repeated
slots, ``scatter`` leaves one of the written values (which one is unspecified).

Copies go by element width (fp8/fp16/bf16/fp32 as same-width integers): round trips
are bit-exact, NaN payloads included.

From a vLLM connector: pass the ``{layer_name: tensor}`` dict that
``register_kv_caches`` received (layer order) and a ``KVLayout`` (any
:class:`~lmcache_pd.kernels.geometry.KVShapeLike`) whose ``block_size``
is the tensors' block axis (vLLM's kernel block size, which can differ from the
scheduler's); ``detect_format`` then picks ``CPU_VLLM`` on vLLM's CPU backend and
``VLLM_4D``/``FLASH_ATTN``/``FLASHINFER``/``MLA`` on GPU backends. The slot ids are
the ones vLLM's attention metadata uses for the same block size.
"""

from __future__ import annotations

import torch

from . import checksum, torch_path
from .geometry import (
    Geometry,
    KVCaches,
    KVShapeLike,
    PagedFormat,
    as_layers,
    validate_caches,
    view_chunk,
)

_BACKENDS = ("auto", "torch", "cuda")


def _slots_1d(slot_mapping: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1:
        raise ValueError("slot_mapping must be a 1-D integer tensor of slot ids")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    return slot_mapping.to(device=device, dtype=torch.int64)


def _prepare(
    kv_caches: KVCaches,
    slot_mapping: torch.Tensor,
    buf: torch.Tensor,
    layout: KVShapeLike,
    fmt: PagedFormat | None,
) -> tuple[list[torch.Tensor], Geometry, torch.Tensor, torch.Tensor]:
    layers = as_layers(kv_caches, layout)
    _, geom = validate_caches(layers, layout, fmt)
    dev = layers[0].device
    slots = _slots_1d(slot_mapping, dev)
    chunk = view_chunk(buf, layout, slots.numel())
    if chunk.device != dev:
        raise ValueError(f"chunk buffer is on {chunk.device}, KV caches on {dev}")
    return layers, geom, slots, chunk


def _use_cuda(dev: torch.device, backend: str, geom: Geometry) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if dev.type != "cuda" or backend == "torch" or geom.k_transposed:
        if backend == "cuda":
            why = "CPU_VLLM (transposed K) has no CUDA kernel" if geom.k_transposed else ""
            raise ValueError(why or f"backend='cuda' needs CUDA tensors, got {dev}")
        return False
    from . import cuda_kernels

    if backend == "cuda":
        if not cuda_kernels.available():
            raise RuntimeError(f"CUDA kernels unavailable: {cuda_kernels.unavailable_reason()}")
        return True  # load errors surface from launch
    return cuda_kernels.ready(dev.index if dev.index is not None else 0)


def gather(
    kv_caches: KVCaches,
    slot_mapping: torch.Tensor,
    out: torch.Tensor,
    layout: KVShapeLike,
    fmt: PagedFormat | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Copy the KV of ``slot_mapping``'s slots (all layers, K and V) into ``out``.

    ``kv_caches``: the per-layer tensors (list, or vLLM's ``{layer_name: tensor}`` dict
    in layer order). ``out``: a chunk tensor or a flat uint8 buffer (see
    :func:`view_chunk`); the chunk view written is returned. ``fmt`` defaults to
    :func:`detect_format` of layer 0. ``backend``: ``"auto"`` (CUDA kernels for CUDA
    tensors when available, else torch), ``"torch"`` or ``"cuda"``. Negative slots give
    zeros. Raises ``ValueError`` on any shape/dtype/device mismatch.
    """
    layers, geom, slots, chunk = _prepare(kv_caches, slot_mapping, out, layout, fmt)
    if slots.numel() == 0:
        return chunk
    if _use_cuda(slots.device, backend, geom):
        from . import cuda_kernels

        cuda_kernels.launch("gather", layers, geom, slots, chunk)
    else:
        torch_path.gather(layers, geom, slots, chunk)
    return chunk


def scatter(
    chunk: torch.Tensor,
    kv_caches: KVCaches,
    slot_mapping: torch.Tensor,
    layout: KVShapeLike,
    fmt: PagedFormat | None = None,
    *,
    backend: str = "auto",
) -> None:
    """Copy a chunk (tensor or flat uint8 buffer) into the paged KV at ``slot_mapping``.

    The inverse of :func:`gather`, same arguments; negative slots are skipped.
    """
    layers, geom, slots, view = _prepare(kv_caches, slot_mapping, chunk, layout, fmt)
    if slots.numel() == 0:
        return
    if _use_cuda(slots.device, backend, geom):
        from . import cuda_kernels

        cuda_kernels.launch("scatter", layers, geom, slots, view)
    else:
        torch_path.scatter(view, layers, geom, slots)


def gather_checksum(
    kv_caches: KVCaches,
    slot_mapping: torch.Tensor,
    out: torch.Tensor,
    layout: KVShapeLike,
    fmt: PagedFormat | None = None,
    *,
    backend: str = "auto",
) -> int:
    """:func:`gather`, returning the chunk's checksum (:mod:`.checksum`, never 0) taken
    in the same pass: CUDA kernels add it up in their launch (this waits for the
    stream), the CPU path hashes each L2-sized piece right after writing it. The digest
    covers the ``tokens * bytes_per_token`` bytes written, padding zeros included, and
    equals :func:`checksum.digest` of them on any device."""
    layers, geom, slots, chunk = _prepare(kv_caches, slot_mapping, out, layout, fmt)
    nbytes = chunk.numel() * chunk.element_size()
    if slots.numel() == 0:
        return checksum.finish(0, 0)
    if _use_cuda(slots.device, backend, geom):
        from . import cuda_kernels

        total: int | None = cuda_kernels.launch_hashed("gather", layers, geom, slots, chunk)
    else:
        total = torch_path.gather(layers, geom, slots, chunk, hashed=True)
    assert total is not None
    return checksum.finish(total, nbytes)


def scatter_checksum(
    chunk: torch.Tensor,
    kv_caches: KVCaches,
    slot_mapping: torch.Tensor,
    layout: KVShapeLike,
    fmt: PagedFormat | None = None,
    *,
    backend: str = "auto",
) -> int:
    """:func:`scatter`, returning the checksum of the chunk bytes it read (all of them,
    padding tokens too), taken in the same pass. Compare it with the sender's digest:
    on a mismatch the KV just written is corrupt and must be reported as not loaded."""
    layers, geom, slots, view = _prepare(kv_caches, slot_mapping, chunk, layout, fmt)
    nbytes = view.numel() * view.element_size()
    if slots.numel() == 0:
        return checksum.finish(0, 0)
    if _use_cuda(slots.device, backend, geom):
        from . import cuda_kernels

        total: int | None = cuda_kernels.launch_hashed("scatter", layers, geom, slots, view)
    else:
        total = torch_path.scatter(view, layers, geom, slots, hashed=True)
    assert total is not None
    return checksum.finish(total, nbytes)
