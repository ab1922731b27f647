"""Paged-KV kernels (installed as lmcache_pd.kernels): tensors, no sockets.

``gather``/``scatter`` move KV between an engine's paged cache and contiguous chunk
buffers; see :mod:`lmcache_pd.kernels.paged_kv` for the contract.
"""

from . import checksum, native
from .geometry import (
    PagedFormat,
    detect_format,
    expected_layer_shape,
    torch_dtype,
    view_chunk,
)
from .paged_kv import gather, gather_checksum, scatter, scatter_checksum

__all__ = [
    "PagedFormat",
    "checksum",
    "detect_format",
    "expected_layer_shape",
    "gather",
    "gather_checksum",
    "native",
    "scatter",
    "scatter_checksum",
    "torch_dtype",
    "view_chunk",
]
