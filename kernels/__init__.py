"""Paged-KV kernels (installed as lmcache_pd.kernels): tensors, no sockets.

``gather``/``scatter`` move KV between an engine's paged cache and contiguous chunk
buffers; see :mod:`lmcache_pd.kernels.paged_kv` for the contract.
"""

from .geometry import (
    PagedFormat,
    detect_format,
    expected_layer_shape,
    torch_dtype,
    view_chunk,
)
from .paged_kv import gather, scatter

__all__ = [
    "PagedFormat",
    "detect_format",
    "expected_layer_shape",
    "gather",
    "scatter",
    "torch_dtype",
    "view_chunk",
]
