"""Ray Serve LLM's PD app driving lmcache-pd (marker ``ray``; skipped without ray).

One local Ray cluster (2 CPUs, 127.0.0.1 only) runs ``examples/ray_serve_pd/app.py``:
Ray's OpenAI ingress -> a decode replica (``kv_consumer``) that sends the prefill
replica (``kv_producer``) the standard contract request and decodes with the returned
``kv_transfer_params``. A plain vLLM engine, started the way the other vLLM tests start
theirs, is the reference: completions (4 at a time), chats and a stream through Ray's
ingress must give its tokens, and the decoder's log must show each prompt's full chunks
fetched from the prefiller (it computes at most the last partial chunk). The spec's bad
inputs are refused naming the field, without Ray.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
import types
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lmcache_pd.integration.vllm.launch import VLLMServer, free_port
from tests.integration.helpers import load_lines

ROOT = Path(__file__).resolve().parents[2]
APP_PATH = ROOT / "examples" / "ray_serve_pd" / "app.py"
RAY_MODULES = ("ray", "pyarrow", "jsonref")  # ray.serve.llm imports the last two
MISSING = [m for m in RAY_MODULES if importlib.util.find_spec(m) is None]
needs_ray = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed (pip install -e '.[ray]')"
)
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

CHUNK = 64
MAX_TOKENS = 12
LENGTHS = [64, 70, 100, 129, 150, 200, 257, 300, 383, 450]
START_TIMEOUT_S = 600.0


def load_app() -> types.ModuleType:
    """The example's module, loaded from its file (examples/ is not a package)."""
    name = "lmcache_pd_example_ray_serve_pd"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, APP_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def post(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def post_stream_text(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> str:
    """The concatenated ``choices[0].text`` of an SSE completion stream."""
    req = urllib.request.Request(
        url,
        data=json.dumps(dict(body, stream=True)).encode(),
        headers={"Content-Type": "application/json"},
    )
    parts: list[str] = []
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data:") :])
            parts.extend(c.get("text") or "" for c in event.get("choices", []))
    return "".join(parts)


def completion_body(prompt: list[int] | str) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
    }


def token_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@dataclass
class RayPD:
    app: types.ModuleType
    cluster: Any  # app.LocalRay
    url: str  # Ray's OpenAI ingress, .../v1
    plain: VLLMServer
    started_s: float

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in self.cluster.session_logs() if p.is_file()
        )

    def loads_for(self, response_ids: list[str], timeout_s: float = 15.0) -> dict[str, Any]:
        """The decoder's load line of each response (its vLLM request id extends the
        response id), waiting for the log files to catch up."""
        deadline = time.monotonic() + timeout_s
        while True:
            found: dict[str, Any] = {}
            for load in load_lines(self.logs()):
                for rid in response_ids:
                    if load["req"].startswith(rid):
                        found[rid] = load
            if len(found) == len(response_ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_pd(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayPD]:
    if MISSING:
        pytest.skip(f"{', '.join(MISSING)} not installed (pip install -e '.[ray]')")
    app = load_app()
    work = tmp_path_factory.mktemp("ray-serve")
    # Ray's socket paths must stay short (AF_UNIX limit): a temp dir directly under /tmp
    ray_tmp = tempfile.mkdtemp(prefix="lmcpd-ray-")
    t0 = time.monotonic()
    plain = VLLMServer(tiny_model, work / "plain.log", name="plain").start()
    prefill_cores, decode_cores = app.split_cores(os.cpu_count() or 1)
    spec = app.PDAppSpec(
        model=tiny_model,
        chunk_size=CHUNK,
        pd_buffer_size=8 << 20,
        decode_cpu_tier_gb=0.05,
        prefill_cores=prefill_cores,
        decode_cores=decode_cores,
    )
    cluster = app.LocalRay(num_cpus=2, http_port=free_port(), temp_dir=ray_tmp)
    try:
        cluster.start()
        url = cluster.deploy(spec)
        plain.wait_ready(START_TIMEOUT_S)
        yield RayPD(app, cluster, url, plain, time.monotonic() - t0)
    finally:
        cluster.stop()
        plain.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@needs_ray
def test_completions_through_ray_identical_to_one_engine_and_kv_fetched(ray_pd: RayPD) -> None:
    prompts = token_prompts(LENGTHS, seed=41)
    want = [ray_pd.plain.completion(p, MAX_TOKENS)["choices"][0]["text"] for p in prompts]
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(lambda p: post(f"{ray_pd.url}/completions", completion_body(p)), prompts)
        )
    elapsed = time.monotonic() - t0
    for prompt, expected, response in zip(prompts, want, got, strict=True):
        assert response["choices"][0]["text"] == expected, f"prompt of {len(prompt)} tokens"
    ids = [r["id"] for r in got]
    loads = ray_pd.loads_for(ids)
    assert len(loads) == len(ids), f"no decoder load line for {set(ids) - set(loads)}"
    for prompt, rid in zip(prompts, ids, strict=True):
        load = loads[rid]
        assert load["prompt"] == len(prompt), load
        assert load["source"] == "fetch", load
        assert load["computing"] <= max(len(prompt) % CHUNK, 1), load
    logs = ray_pd.logs()
    assert logs.count("fetched ") >= len(prompts)
    print(
        f"\nray PD: started in {ray_pd.started_s:.0f} s; {len(prompts)} completions "
        f"(4 at a time) in {elapsed:.1f} s"
    )


@needs_ray
def test_chat_and_stream_through_ray_identical_to_one_engine(ray_pd: RayPD) -> None:
    words = "the cache token prefill decode chunk layer tensor engine request block".split()
    rng = random.Random(42)
    for n in (60, 180):
        body = {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "answer briefly"},
                {"role": "user", "content": " ".join(rng.choice(words) for _ in range(n))},
            ],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        want = post(f"{ray_pd.plain.url}/v1/chat/completions", body)
        got = post(f"{ray_pd.url}/chat/completions", body)
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    prompt = token_prompts([333], seed=43)[0]
    want_text = ray_pd.plain.completion(prompt, MAX_TOKENS)["choices"][0]["text"]
    assert post_stream_text(f"{ray_pd.url}/completions", completion_body(prompt)) == want_text


# --- the spec's bad input: refused naming the field (no Ray needed) --------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prefill_replicas", 0),
        ("decode_replicas", -1),
        ("chunk_size", "64"),
        ("pd_buffer_size", True),
        ("engine_cpus", 0),
        ("decode_cpu_tier_gb", -0.5),
        ("model_id", ""),
        ("prefill_config_file", Path("/nonexistent/lmcache.yaml")),
    ],
)
def test_spec_refuses_bad_fields_naming_them(tiny_model: Path, field: str, value: Any) -> None:
    app = load_app()
    with pytest.raises(ValueError, match=field):
        app.PDAppSpec(model=tiny_model, **{field: value})


def test_spec_refuses_a_missing_model_dir(tmp_path: Path) -> None:
    app = load_app()
    with pytest.raises(ValueError, match=r"model: .* is not a model directory"):
        app.PDAppSpec(model=tmp_path / "nope")


def test_kv_transfer_config_names_our_connector_and_free_ports(tiny_model: Path) -> None:
    app = load_app()
    spec = app.PDAppSpec(model=tiny_model, chunk_size=CHUNK)
    prefill = app.kv_transfer_config(spec, app.Stage.PREFILL)
    decode = app.kv_transfer_config(spec, app.Stage.DECODE)
    for cfg in (prefill, decode):
        assert cfg["kv_connector"] == "LMCachePDConnector"
        assert cfg["kv_connector_module_path"] == "lmcache_pd.integration.vllm"
        assert cfg["kv_connector_extra_config"]["chunk_size"] == CHUNK
    assert prefill["kv_role"] == "kv_producer"
    assert decode["kv_role"] == "kv_consumer"
    assert prefill["kv_connector_extra_config"]["pd_pull_port"] == 0
    assert decode["kv_connector_extra_config"]["pd_peer_init_port"] == 0


def test_split_cores() -> None:
    app = load_app()
    assert app.split_cores(1) == (None, None)
    assert app.split_cores(2) == ("0", "1")
    assert app.split_cores(16) == ("0-7", "8-15")
