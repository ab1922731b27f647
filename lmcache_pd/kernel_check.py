"""``lmcache-pd check kernels``: the kernels' self-test over the core's layout presets.

The kernels never import the core (docs/architecture.md); this entry point is the core
side that hands them :data:`lmcache_pd.layout.PRESETS` (each a ``KVShapeLike``).
"""

from __future__ import annotations

from lmcache_pd.kernels import check
from lmcache_pd.layout import PRESETS


def main(argv: list[str]) -> int:
    """Compile the CUDA kernels with NVRTC (and round-trip on a GPU); the exit code."""
    return check.main(argv, PRESETS)
