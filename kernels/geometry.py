"""Paged KV formats, their geometry and the validation of tensors against a KV shape.

Owns :class:`KVShape` (the few layout facts the kernels need; the core's ``KVLayout``
satisfies :class:`KVShapeLike` and is normalised with :meth:`KVShape.of`, so the
kernels never import the core), ``TORCH_DTYPES`` (dtype names -> torch dtypes, the one
torch-side dtype table), :class:`PagedFormat` (every per-layer paged layout we read and
write),
:class:`Geometry` (where each (kv, block, offset, head) row of a layer lives, in
elements, read from the tensor's strides), :func:`detect_format`, and the checks that
turn a wrong shape, dtype, stride or device into a ``ValueError`` naming the expected
shape. Also :func:`view_chunk`, which views a chunk tensor or a flat uint8 slot buffer
in the chunk format ``[num_layers, kv_factor, tokens, num_kv_heads, head_size]``.

Paged formats, per layer tensor (``B`` = num_blocks, ``N`` = block_size, ``H`` =
num_kv_heads, ``D`` = head_size); strides are read from the tensor, so permuted views
(vLLM's HND layouts) work as long as ``head_size`` is the contiguous innermost axis:

* ``FLASH_ATTN``  ``[2, B, N, H, D]``  (vLLM flash-attn, classic)
* ``FLASHINFER``  ``[B, 2, N, H, D]``
* ``MLA``         ``[B, N, D]`` or ``[B, 1, N, D]``: one latent per token, no K/V split
* ``CPU_VLLM``    ``[B, H, N, 2*D]``: vLLM's CPU backend with its ``vec``/``vec16``
  attention ISAs (x86 without AMX: what CI and the CPU demo run). Each (block, head)
  page of ``N*2*D`` elements holds K of its ``N`` tokens **transposed**, ``[D, N]``,
  then V as ``[N, D]`` (checked against vLLM's own ``cpu_attn_reshape_and_cache``).
  The ``amx``/``neon``/other ISAs pack blocks differently and are not this format.
* ``VLLM_4D``     ``[B, H, N, 2*D]``: vLLM's unified 4-D view used by its GPU backends
  (flash-attn splits the last axis: K = ``[..., :D]``, V = ``[..., D:]``)
"""

from __future__ import annotations

import dataclasses
import enum
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import torch

KVCaches = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]

# Dtype names (as in KVLayout.dtype) -> torch dtypes. The core's byte-size table
# (lmcache_pd.layout.DTYPE_SIZES) has the same names; tests/test_architecture.py checks
# that the two agree, and the vLLM integration derives its reverse table from this one.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8,
}


class KVShapeLike(Protocol):
    """What the kernels read from a layout (``lmcache_pd.layout.KVLayout`` has it)."""

    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def is_mla(self) -> bool: ...
    @property
    def model(self) -> str: ...


@dataclass(frozen=True)
class KVShape:
    """The shape facts of a KV cache the kernels need, and the chunk format
    ``[num_layers, kv_factor, tokens, num_kv_heads, head_size]`` that follows from them.
    ``model`` only labels messages."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: str
    is_mla: bool = False
    model: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(
                f"dtype {self.dtype!r} is not supported; expected one of {sorted(TORCH_DTYPES)}"
            )
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def of(cls, src: KVShapeLike) -> KVShape:
        """``src`` itself when it is a KVShape, else its shape facts copied (the copy
        is kept per distinct facts: every gather/scatter call asks for it)."""
        if isinstance(src, KVShape):
            return src
        facts = (
            src.num_layers,
            src.num_kv_heads,
            src.head_size,
            src.block_size,
            src.dtype,
            src.is_mla,
            src.model,
        )
        shape = _SHAPES.get(facts)
        if shape is None:
            shape = cls(*facts)  # validates; a layout that fails is never kept
            if len(_SHAPES) >= _CACHE_ENTRIES:
                _SHAPES.clear()
            _SHAPES[facts] = shape
        return shape

    @property
    def attention(self) -> str:
        """``"mla"`` or ``"kv_split"`` (the names KVLayout's AttentionKind uses)."""
        return "mla" if self.is_mla else "kv_split"

    @property
    def kv_factor(self) -> int:
        """2 for split K/V, 1 for MLA."""
        return 1 if self.is_mla else 2

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def dtype_size(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV one token occupies across all layers."""
        return (
            self.num_layers * self.kv_factor * self.num_kv_heads * self.head_size * self.dtype_size
        )

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a chunk of ``tokens`` tokens in the chunk format."""
        return (self.num_layers, self.kv_factor, tokens, self.num_kv_heads, self.head_size)


class PagedFormat(str, enum.Enum):
    """How one layer's paged KV tensor is laid out (see the module docstring)."""

    FLASH_ATTN = "flash_attn"
    FLASHINFER = "flashinfer"
    MLA = "mla"
    CPU_VLLM = "cpu_vllm"
    VLLM_4D = "vllm_4d"


def torch_dtype(layout: KVShapeLike) -> torch.dtype:
    """The torch dtype of a layout's KV elements."""
    return KVShape.of(layout).torch_dtype


def _accepted_dtypes(layout: KVShape) -> tuple[torch.dtype, ...]:
    # vLLM keeps fp8 caches in uint8 tensors on some backends: same bytes, accept them.
    if layout.dtype_size == 1:
        return (layout.torch_dtype, torch.uint8)
    return (layout.torch_dtype,)


def expected_layer_shape(fmt: PagedFormat, layout: KVShapeLike, num_blocks: int | str = "B") -> str:
    """Human-readable expected per-layer shape of ``fmt`` for ``layout``."""
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    shapes = {
        PagedFormat.FLASH_ATTN: f"[2, {num_blocks}, {n}, {h}, {d}]",
        PagedFormat.FLASHINFER: f"[{num_blocks}, 2, {n}, {h}, {d}]",
        PagedFormat.MLA: f"[{num_blocks}, {n}, {d}] or [{num_blocks}, 1, {n}, {d}]",
        PagedFormat.CPU_VLLM: f"[{num_blocks}, {h}, {n}, {2 * d}]",
        PagedFormat.VLLM_4D: f"[{num_blocks}, {h}, {n}, {2 * d}]",
    }
    return shapes[fmt]


@dataclass(frozen=True)
class Geometry:
    """Where a (kv, block, offset, head) row of one layer lives, in *elements*.

    Element ``(k, b, n, h, d)`` of the layer is at
    ``k*stride_k + b*stride_b + n*stride_n + h*stride_h + d`` from the layer's first
    element. ``row`` is the contiguous run copied at once: ``head_size`` elements, or
    ``num_kv_heads*head_size`` when the heads of a token are adjacent (``rows`` = 1).

    ``k_transposed`` (``CPU_VLLM`` only): K is stored ``[head_size, block_size]`` per
    (block, head), element ``(n, d)`` of K at ``b*stride_b + h*stride_h + d*block_size
    + n``; the strides above then describe V (which starts at ``stride_k``).
    """

    num_blocks: int
    block_size: int
    kv_factor: int
    rows: int
    row: int
    stride_k: int
    stride_b: int
    stride_n: int
    stride_h: int
    k_transposed: bool = False

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def _shape_error(fmt: PagedFormat, layout: KVShape, t: torch.Tensor, why: str) -> ValueError:
    return ValueError(
        f"{fmt.name} KV cache layer: expected shape {expected_layer_shape(fmt, layout)} "
        f"(num_blocks free) with dtype {torch_dtype(layout)} and a contiguous head_size "
        f"axis, got shape {list(t.shape)} stride {list(t.stride())} dtype {t.dtype}: {why}"
    )


def _raw_geometry(fmt: PagedFormat, layout: KVShape, t: torch.Tensor) -> Geometry:
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    shape, st = tuple(t.shape), t.stride()
    if fmt is PagedFormat.MLA:
        if not layout.is_mla or h != 1:
            raise ValueError(
                f"MLA paged format needs an MLA layout with num_kv_heads=1, got "
                f"attention={layout.attention} num_kv_heads={h}"
            )
        if len(shape) == 3 and shape[1:] == (n, d):
            return Geometry(shape[0], n, 1, 1, d, 0, st[0], st[1], 0)
        if len(shape) == 4 and shape[1:] == (1, n, d):
            return Geometry(shape[0], n, 1, 1, d, 0, st[0], st[2], 0)
        raise _shape_error(fmt, layout, t, "shape mismatch")
    if layout.is_mla:
        raise ValueError(
            f"{fmt.name} paged format stores K and V separately but the layout is MLA; "
            f"use PagedFormat.MLA (expected {expected_layer_shape(PagedFormat.MLA, layout)})"
        )
    if fmt is PagedFormat.FLASH_ATTN:
        if len(shape) != 5 or shape[0] != 2 or shape[2:] != (n, h, d):
            raise _shape_error(fmt, layout, t, "shape mismatch")
        return Geometry(shape[1], n, 2, h, d, st[0], st[1], st[2], st[3])
    if fmt is PagedFormat.FLASHINFER:
        if len(shape) != 5 or shape[1] != 2 or shape[2:] != (n, h, d):
            raise _shape_error(fmt, layout, t, "shape mismatch")
        return Geometry(shape[0], n, 2, h, d, st[1], st[0], st[2], st[3])
    if len(shape) != 4 or shape[1:] != (h, n, 2 * d):
        raise _shape_error(fmt, layout, t, "shape mismatch")
    if fmt is PagedFormat.CPU_VLLM:
        if st[3] != 1 or (n > 1 and st[2] != 2 * d):
            raise _shape_error(fmt, layout, t, "each (block, head) page must be contiguous")
        return Geometry(shape[0], n, 2, h, d, n * d, st[0], d, st[1], k_transposed=True)
    return Geometry(shape[0], n, 2, h, d, d, st[0], st[2], st[1])  # VLLM_4D


def layer_geometry(fmt: PagedFormat, shape: KVShapeLike, t: torch.Tensor) -> Geometry:
    """Validate one layer tensor against ``fmt``/``shape`` and return its geometry."""
    layout = KVShape.of(shape)
    if t.dtype not in _accepted_dtypes(layout):
        raise _shape_error(fmt, layout, t, f"dtype must be {torch_dtype(layout)}")
    g = _raw_geometry(fmt, layout, t)
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise _shape_error(fmt, layout, t, "the head_size axis must have stride 1")
    # Merge the heads of a token into one row when they are adjacent in memory.
    if g.rows > 1 and g.stride_h == g.row and not g.k_transposed:
        g = dataclasses.replace(g, rows=1, row=g.rows * g.row, stride_h=0)
    for name in ("stride_k", "stride_b", "stride_n", "stride_h"):
        if getattr(g, name) % g.row:
            raise _shape_error(fmt, layout, t, f"{name} is not a multiple of the row size")
    return g


def detect_format(kv_cache: torch.Tensor, shape: KVShapeLike) -> PagedFormat:
    """Guess the paged format of one layer tensor from its shape, device and ``layout``.

    ``[B, H, N, 2D]`` is ``CPU_VLLM`` on a CPU tensor and ``VLLM_4D`` elsewhere (vLLM's
    CPU backend and its GPU backends use the same shape with different meanings).
    Raises ``ValueError`` when nothing matches or the shape is ambiguous.
    """
    layout = KVShape.of(shape)
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    dims = tuple(kv_cache.shape)
    if layout.is_mla:
        candidates = [PagedFormat.MLA]
    else:
        candidates = []
        if len(dims) == 5 and dims[2:] == (n, h, d):
            if dims[0] == 2:
                candidates.append(PagedFormat.FLASH_ATTN)
            if dims[1] == 2:
                candidates.append(PagedFormat.FLASHINFER)
        elif len(dims) == 4 and dims[1:] == (h, n, 2 * d):
            cpu = kv_cache.device.type == "cpu"
            candidates.append(PagedFormat.CPU_VLLM if cpu else PagedFormat.VLLM_4D)
    if len(candidates) == 1:
        layer_geometry(candidates[0], layout, kv_cache)  # full validation
        return candidates[0]
    formats = list(PagedFormat) if not candidates else candidates
    expected = "; ".join(f"{f.name} {expected_layer_shape(f, layout)}" for f in formats)
    why = "ambiguous (pass fmt explicitly)" if candidates else "no paged format matches"
    raise ValueError(
        f"cannot detect the paged KV format of shape {list(dims)} for layout "
        f"(layers={layout.num_layers}, kv_heads={h}, head_size={d}, block_size={n}, "
        f"attention={layout.attention}): {why}; expected one of: {expected}"
    )


def as_layers(kv_caches: KVCaches, layout: KVShapeLike) -> list[torch.Tensor]:
    layers = list(kv_caches.values()) if isinstance(kv_caches, Mapping) else list(kv_caches)
    if len(layers) != layout.num_layers:
        raise ValueError(
            f"expected {layout.num_layers} per-layer KV tensors (layout.num_layers), "
            f"got {len(layers)}"
        )
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"kv_caches[{i}] is {type(t).__name__}, expected a torch.Tensor")
    return layers


@dataclass(frozen=True)
class _Checked:
    """A set of layer tensors that passed :func:`validate_caches`."""

    refs: tuple[weakref.ref[torch.Tensor], ...]
    first: tuple[torch.Size, tuple[int, ...], torch.dtype, torch.device]
    fmt: PagedFormat
    geom: Geometry


# Results kept per (shape, fmt, layer tensors): a connector passes the same cache tensors
# for every chunk, and checking them (each layer's shape, strides, dtype, device, then
# the geometry) cost ~1 us per layer, ~27-40 us a call: more than a small chunk's copy.
_CHECKED: dict[tuple[KVShape, PagedFormat | None, tuple[int, ...]], _Checked] = {}
_SHAPES: dict[tuple[object, ...], KVShape] = {}
_CACHE_ENTRIES = 64


def validate_caches(
    layers: list[torch.Tensor], layout: KVShapeLike, fmt: PagedFormat | None
) -> tuple[PagedFormat, Geometry]:
    """The format (``fmt``, or detected) and geometry of ``layers``, which must all
    match layer 0 (shape, strides, dtype, device); ``ValueError`` otherwise.

    A result is kept for the same tensor objects (held weakly, so a freed tensor's
    reused id never matches) with layer 0's shape, strides, dtype and device unchanged:
    a repeat call costs a few identity checks. Any other list is checked in full."""
    shape = KVShape.of(layout)
    first = layers[0]
    key = (shape, fmt, tuple(map(id, layers)))
    meta = (first.shape, first.stride(), first.dtype, first.device)
    hit = _CHECKED.get(key)
    if (
        hit is not None
        and hit.first == meta
        and all(ref() is t for ref, t in zip(hit.refs, layers, strict=True))
    ):
        return hit.fmt, hit.geom
    checked_fmt, geom = _validate_caches(layers, shape, fmt)
    if len(_CHECKED) >= _CACHE_ENTRIES:
        _CHECKED.clear()
    _CHECKED[key] = _Checked(tuple(weakref.ref(t) for t in layers), meta, checked_fmt, geom)
    return checked_fmt, geom


def _validate_caches(
    layers: list[torch.Tensor], layout: KVShape, fmt: PagedFormat | None
) -> tuple[PagedFormat, Geometry]:
    if fmt is None:
        fmt = detect_format(layers[0], layout)
    fmt = PagedFormat(fmt)
    first = layers[0]
    geom = layer_geometry(fmt, layout, first)
    key = (first.shape, first.stride(), first.dtype)
    for i, t in enumerate(layers[1:], start=1):
        if t.device != first.device:
            raise ValueError(f"kv_caches[{i}] is on {t.device}, layer 0 on {first.device}")
        if (t.shape, t.stride(), t.dtype) != key:
            raise ValueError(
                f"kv_caches[{i}] has shape {list(t.shape)} stride {list(t.stride())} "
                f"dtype {t.dtype}; all layers must match layer 0 "
                f"({list(layers[0].shape)} stride {list(layers[0].stride())} "
                f"{layers[0].dtype})"
            )
    return fmt, geom


def view_chunk(buf: torch.Tensor, shape_of: KVShapeLike, tokens: int) -> torch.Tensor:
    """View ``buf`` as a chunk of ``tokens`` tokens (shape ``layout.chunk_shape``).

    ``buf`` is either a contiguous tensor of exactly the chunk shape and the layout's
    dtype, or a flat contiguous ``uint8`` buffer of at least
    ``tokens * layout.bytes_per_token`` bytes (its first bytes are used).
    """
    layout = KVShape.of(shape_of)
    shape = layout.chunk_shape(tokens)
    dtype = layout.torch_dtype
    if buf.dim() == 1 and buf.dtype == torch.uint8 and tuple(buf.shape) != shape:
        need = tokens * layout.bytes_per_token
        if not buf.is_contiguous():
            raise ValueError("flat chunk buffer must be contiguous")
        if buf.numel() < need:
            raise ValueError(
                f"flat chunk buffer holds {buf.numel()} bytes, {tokens} tokens need "
                f"{need} bytes ({layout.bytes_per_token} per token)"
            )
        if (buf.storage_offset() * buf.element_size()) % layout.dtype_size:
            raise ValueError(
                f"flat chunk buffer starts at byte offset {buf.storage_offset()}, not a "
                f"multiple of the {layout.dtype} element size {layout.dtype_size}"
            )
        return (buf if buf.numel() == need else buf[:need]).view(dtype).view(shape)
    if tuple(buf.shape) != shape or buf.dtype not in _accepted_dtypes(layout):
        raise ValueError(
            f"chunk tensor: expected shape {list(shape)} "
            f"[num_layers, kv_factor, tokens, num_kv_heads, head_size] with dtype {dtype} "
            f"(or a flat uint8 buffer of >= {tokens * layout.bytes_per_token} bytes), "
            f"got shape {list(buf.shape)} dtype {buf.dtype}"
        )
    if not buf.is_contiguous():
        raise ValueError(f"chunk tensor of shape {list(shape)} must be contiguous")
    return buf
