"""Fixtures for the real-vLLM tests (CPU build): the tiny model and server helpers.

Every test here is marked ``vllm`` (run them alone with ``pytest -m vllm``) and skipped
when vLLM is not installed. Servers are started in their own process groups, bound to
127.0.0.1, and always stopped in fixture teardown.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcache_pd.integration.vllm.launch import VLLMServer
from lmcache_pd.integration.vllm.tiny_model import make_tiny_model

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="vLLM is not installed (pip install -e '.[vllm]')")
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.vllm)
            if not HAVE_VLLM:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-layer random Llama + BPE tokenizer, built once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    """``make(name, model, **kwargs) -> VLLMServer`` (not started); all stopped at the end."""
    made: list[VLLMServer] = []

    def make(name: str, model: Path, **kwargs: Any) -> VLLMServer:
        server = VLLMServer(model, tmp_path / f"{name}.log", name=name, **kwargs)
        made.append(server)
        return server

    yield make
    for s in made:
        s.stop()
