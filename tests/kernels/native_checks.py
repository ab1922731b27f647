"""Shared checks of the native CPU gather/scatter against the torch fallback: the
library fixture, running a call with the native helpers on or off, and one case's
bit-exact gather/scatter (plain and hashed) against the naive reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from lmcache_pd.kernels import (
    PagedFormat,
    checksum,
    gather,
    gather_checksum,
    native,
    scatter,
    scatter_checksum,
)
from lmcache_pd.layout import KVLayout

from .helpers import bits, ref_gather, ref_scatter

IMPLS = ("native", "fallback")
T = TypeVar("T")


def native_library() -> native.NativeLib:
    """The native helpers: skip without a C compiler, fail when one is there but the
    library did not build."""
    try:
        native.compiler()
    except RuntimeError as exc:
        pytest.skip(f"no C compiler: {exc}")
    lib = native.library()
    if lib is None:  # a compiler but no library: a real failure
        pytest.fail(f"native helpers did not build: {native.unavailable_reason()}")
    return lib


def run_impl(impl: str, fn: Callable[[], T]) -> T:
    """``fn()`` on the native helpers or with them switched off."""
    if impl == "native":
        return fn()
    old = native.reset_for_tests(None, "disabled by the test")
    try:
        return fn()
    finally:
        native.reset_for_tests(*old)


def check_gather_scatter(
    fmt: PagedFormat,
    layout: KVLayout,
    caches: list[torch.Tensor],
    slots: torch.Tensor,
    gen: torch.Generator,
) -> None:
    """Gather and scatter ``slots`` of ``caches`` on both paths, plain and hashed:
    gather gives the reference bytes (zeros for padding) and their digest; scatter
    changes only the target slots (padding skipped, every other slot and block
    untouched) and its digest covers every chunk byte read."""
    tokens = slots.numel()
    nbytes = tokens * layout.bytes_per_token
    want = bits(ref_gather(fmt, caches, slots.tolist(), layout)).reshape(-1).view(torch.uint8)
    want_digest = checksum.reference_digest(want.numpy())
    for impl in IMPLS:
        out = torch.full((nbytes,), 0x5A, dtype=torch.uint8)
        run_impl(impl, lambda: gather(caches, slots, out, layout, fmt))  # noqa: B023
        assert torch.equal(out, want), impl
        out.fill_(0x5A)
        got = run_impl(impl, lambda: gather_checksum(caches, slots, out, layout, fmt))  # noqa: B023
        assert torch.equal(out, want), impl
        assert got == want_digest == checksum.digest(out), impl

    chunk = torch.randint(0, 256, (nbytes,), generator=gen).to(torch.uint8)
    chunk_digest = checksum.reference_digest(chunk.numpy())
    expected = [c.clone() for c in caches]
    view = chunk.view(caches[0].dtype).view(layout.chunk_shape(tokens))
    ref_scatter(fmt, view, expected, slots.tolist(), layout)
    for impl in IMPLS:
        for hashed in (False, True):
            fresh = [c.clone() for c in caches]
            if hashed:
                got = run_impl(
                    impl,
                    lambda: scatter_checksum(chunk, fresh, slots, layout, fmt),  # noqa: B023
                )
                assert got == chunk_digest, impl
            else:
                run_impl(impl, lambda: scatter(chunk, fresh, slots, layout, fmt))  # noqa: B023
            for a, b in zip(fresh, expected, strict=True):
                assert torch.equal(bits(a), bits(b)), (impl, hashed)
