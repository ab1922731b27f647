"""Fixtures of the tier tests."""

from __future__ import annotations

import pytest

from lmcache_pd.layout import preset


@pytest.fixture
def fingerprint() -> bytes:
    return preset("tiny").fingerprint()
