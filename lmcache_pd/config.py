"""Configuration: one msgspec Struct, loaded from yaml and ``LMCACHE_*`` environment.

Key names follow LMCache where LMCache has the key (``chunk_size``, ``pd_peer_host``,
``pd_buffer_size`` ...), so an LMCache PD yaml loads unchanged. Keys LMCache knows but we
do not implement load with one warning naming them. Any other key is an error naming
the closest valid key. Environment variables ``LMCACHE_<KEY>`` (upper-cased key)
override the file, exactly as LMCache names them; their values are parsed as yaml
scalars (``8``, ``true``, ``[7300, 7301]``).

Resolution order: defaults < yaml file < environment < explicit overrides.
"""

from __future__ import annotations

import difflib
import enum
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from lmcache_pd.chunks import HashAlgorithm

log = logging.getLogger(__name__)

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
DEFAULT_SECRET_FILE = "~/.config/lmcache-pd/secret"


class PDRole(str, enum.Enum):
    SENDER = "sender"
    RECEIVER = "receiver"


class BufferDevice(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class RemoteSerde(str, enum.Enum):
    """How chunks are serialized into the remote tier (LMCache's ``remote_serde``): only
    ``naive`` (the chunk's bytes as they are, behind our checksummed header)."""

    NAIVE = "naive"


class LoadFailurePolicy(str, enum.Enum):
    RECOMPUTE = "recompute"
    FAIL = "fail"


class ConfigError(ValueError):
    """Invalid configuration. ``errors`` lists every problem found, one line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid lmcache-pd config:\n  " + "\n  ".join(errors))


# LMCache keys we accept and ignore (with one warning naming them).
LMCACHE_IGNORED_KEYS = frozenset(
    {
        "retrieve_locations",
        "store_location",
        "save_decode_cache",
        "use_layerwise",
        "enable_blending",
        "blend_recompute_ratios",
        "blend_thresholds",
        "blend_check_layers",
        "blend_min_tokens",
        "blend_special_str",
        "enable_p2p",
        "lookup_url",
        "distributed_url",
        "enable_controller",
        "lmcache_instance_id",
        "controller_url",
        "lmcache_worker_port",
        "error_handling",
        "enable_async_loading",
        "gds_path",
        "cufile_buffer_size",
        "local_disk_path",
        "extra_config",
        "external_lookup_client",
        "priority_limit",
        "cache_policy",
        "enable_nixl",
        "nixl_role",
        "nixl_receiver_host",
        "nixl_receiver_port",
        "nixl_buffer_size",
        "nixl_buffer_device",
        "nixl_enable_gc",
        "weka_path",
        "pd_proxy_port_list",
        "min_retrieve_tokens",
        "py_enable_gc",
        "cache_blend_layerwise",
        "internal_api_server_enabled",
        "internal_api_server_port_start",
        "plugin_locations",
        "numa_mode",
        "audit_actual_remove",
        "enable_scheduler_bypass_lookup",
        "lookup_timeout_ms",
        "hit_miss_ratio",
        "save_only_first_rank",
    }
)

Port = int | list[int]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole lmcache-pd configuration. Sizes in GB are decimal GB as in LMCache."""

    # --- LMCache keys ---
    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    local_disk: str | None = None
    max_local_disk_size: float = 0.0
    save_unfull_chunk: bool = False
    enable_pd: bool = False
    pd_role: PDRole | None = None
    pd_buffer_size: int = 256 * 1024 * 1024
    pd_buffer_device: BufferDevice = BufferDevice.CPU
    pd_peer_host: str = "127.0.0.1"
    pd_peer_init_port: Port = 7300
    pd_peer_alloc_port: Port = 7400
    pd_proxy_host: str = "127.0.0.1"
    pd_proxy_port: int = 7500
    transfer_channel: str = "nixl"
    nixl_backends: list[str] = msgspec.field(default_factory=lambda: ["UCX"])
    # --- lmcache-pd's own keys ---
    pd_bind_host: str = "127.0.0.1"
    pd_connect_timeout_s: float = 10.0
    pd_transfer_timeout_s: float = 30.0
    pd_lease_ttl_s: float = 15.0
    pd_busy_max_retries: int = 20
    pd_busy_retry_after_s: float = 0.05
    pd_max_frame_bytes: int = 4 * 1024 * 1024
    pd_verify_checksums: bool = True
    pd_auth_secret: str | None = None
    pd_auth_secret_file: str = DEFAULT_SECRET_FILE
    hash_algorithm: HashAlgorithm = HashAlgorithm.XXH3_128
    load_failure_policy: LoadFailurePolicy = LoadFailurePolicy.RECOMPUTE
    disk_write_queue_size: int = 64
    # remote tier (lmcache_pd.tiers.remote): LMCache's remote_url / remote_serde, and ours.
    # A remote_url that is malformed or unreachable does not fail the config: the engine
    # starts without the tier and says why once (build_tiers).
    remote_url: str | None = None
    remote_serde: RemoteSerde = RemoteSerde.NAIVE
    remote_timeout_s: float = 0.5
    remote_write_queue_size: int = 64
    # the prefiller's pull endpoint (standard PD contract), per TP rank; 0 = a free port
    pd_pull_port: Port = 0

    def port_for_rank(self, name: str, rank: int = 0) -> int:
        """A port key (int or per-TP-rank list) resolved for TP rank ``rank``."""
        value = getattr(self, name)
        if isinstance(value, int):
            return value + rank if rank and value else value  # 0 (a free port) stays 0
        if rank >= len(value):
            raise ConfigError([f"{name}: no port for TP rank {rank} in {value}"])
        return value[rank]

    def advertised_host(self) -> str:
        """The address peers use to reach this engine's control endpoints: ``pd_bind_host``,
        or ``pd_peer_host`` when binding to every interface (``0.0.0.0`` / ``::``)."""
        if self.pd_bind_host in ("0.0.0.0", "::", "*", ""):
            return self.pd_peer_host
        return self.pd_bind_host

    def local_disk_path(self) -> Path | None:
        """``local_disk`` as a directory path (``file:///x`` or a plain path)."""
        if not self.local_disk:
            return None
        text = self.local_disk
        if text.startswith("file://"):
            text = text[len("file://") :]
        return Path(text).expanduser()

    def auth_secret(self) -> bytes:
        """The shared control-plane secret.

        ``pd_auth_secret`` (or ``LMCACHE_PD_AUTH_SECRET``) wins; otherwise the file at
        ``pd_auth_secret_file``, which is created with 32 random bytes (mode 0600) when
        it does not exist, so processes of one user on one host agree by default.
        """
        if self.pd_auth_secret:
            return self.pd_auth_secret.encode()
        path = Path(self.pd_auth_secret_file).expanduser()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
            log.warning("created a new control-plane secret at %s (copy it to peer hosts)", path)
        secret = path.read_text().strip().encode()
        if len(secret) < 16:
            raise ConfigError([f"pd_auth_secret_file {path}: secret shorter than 16 bytes"])
        return secret


_TYPES: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Config)}


def _describe(tp: Any) -> str:
    info = msgspec.inspect.type_info(tp)
    if isinstance(info, msgspec.inspect.UnionType):
        return " or ".join(_describe_info(t) for t in info.types)
    return _describe_info(info)


def _describe_info(info: msgspec.inspect.Type) -> str:
    if isinstance(info, msgspec.inspect.EnumType):
        return "one of " + ", ".join(repr(m.value) for m in info.cls)
    if isinstance(info, msgspec.inspect.ListType):
        return f"list of {_describe_info(info.item_type)}"
    names = {
        msgspec.inspect.IntType: "int",
        msgspec.inspect.FloatType: "number",
        msgspec.inspect.BoolType: "bool",
        msgspec.inspect.StrType: "string",
        msgspec.inspect.NoneType: "null",
    }
    return names.get(type(info), type(info).__name__)


def _check_ranges(cfg: Config) -> list[str]:
    errors: list[str] = []

    def positive(name: str) -> None:
        if getattr(cfg, name) <= 0:
            errors.append(f"{name}: must be > 0, got {getattr(cfg, name)}")

    for name in (
        "chunk_size",
        "pd_buffer_size",
        "pd_connect_timeout_s",
        "pd_transfer_timeout_s",
        "pd_lease_ttl_s",
        "pd_max_frame_bytes",
        "disk_write_queue_size",
        "remote_timeout_s",
        "remote_write_queue_size",
    ):
        positive(name)
    for name in ("max_local_cpu_size", "max_local_disk_size", "pd_busy_retry_after_s"):
        if getattr(cfg, name) < 0:
            errors.append(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.pd_busy_max_retries < 0:
        errors.append(f"pd_busy_max_retries: must be >= 0, got {cfg.pd_busy_max_retries}")
    if cfg.chunk_size > 1 << 20:
        errors.append(f"chunk_size: must be <= 1048576, got {cfg.chunk_size}")
    for name in ("pd_peer_init_port", "pd_peer_alloc_port", "pd_proxy_port", "pd_pull_port"):
        value = getattr(cfg, name)
        ports = value if isinstance(value, list) else [value]
        if not ports:
            errors.append(f"{name}: port list is empty")
        low = 0 if name == "pd_pull_port" else 1  # 0: a free port, advertised in params
        for port in ports:
            if not low <= port <= 65535:
                errors.append(f"{name}: port {port} out of range {low}..65535")
    if cfg.transfer_channel != "nixl":
        errors.append(f"transfer_channel: only 'nixl' is supported, got {cfg.transfer_channel!r}")
    if cfg.enable_pd and cfg.pd_role is None:
        errors.append("pd_role: required when enable_pd is true (sender or receiver)")
    if cfg.local_disk and cfg.max_local_disk_size <= 0:
        errors.append("max_local_disk_size: must be > 0 when local_disk is set")
    return errors


def _closest(key: str) -> str:
    candidates = list(_TYPES) + sorted(LMCACHE_IGNORED_KEYS)
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def from_dict(data: Mapping[str, Any], source: str = "config") -> Config:
    """Validate a mapping of config keys into a :class:`Config`.

    Collects every unknown key, wrong type and out-of-range value into one
    :class:`ConfigError`. LMCache-only keys are dropped with one warning.
    """
    errors: list[str] = []
    ignored = sorted(k for k in data if k in LMCACHE_IGNORED_KEYS)
    if ignored:
        log.warning("%s: ignoring LMCache keys lmcache-pd does not implement: %s", source, ignored)
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if key in LMCACHE_IGNORED_KEYS:
            continue
        if key not in _TYPES:
            errors.append(f"{key}: unknown config key{_closest(str(key))}")
            continue
        try:
            clean[key] = msgspec.convert(value, _TYPES[key], strict=False)
        except msgspec.ValidationError:
            errors.append(f"{key}: expected {_describe(_TYPES[key])}, got {value!r}")
    if errors:
        raise ConfigError(errors)
    cfg = Config(**clean)
    errors = _check_ranges(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in _TYPES and key not in LMCACHE_IGNORED_KEYS:
            continue  # other LMCACHE_* variables (log level, ...) are not config keys
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
        if isinstance(out[key], (int, float)) and _TYPES.get(key) in (str, str | None):
            out[key] = raw  # a host like "10" stays a string
    return out


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([f"cannot read config file {p}: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: not valid yaml: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: top level must be a mapping of keys, got {type(data).__name__}"])
    return data


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Resolve the config: defaults < yaml (``path`` or ``$LMCACHE_CONFIG_FILE``) < env <
    ``overrides``."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "defaults"
    path = path or env.get(CONFIG_FILE_ENV)
    if path:
        data.update(load_yaml(path))
        source = str(path)
    data.update(_env_overrides(env))
    if overrides:
        data.update(overrides)
    return from_dict(data, source)


def to_yaml(cfg: Config) -> str:
    """The resolved config as yaml (secrets redacted)."""
    data = msgspec.to_builtins(cfg)
    if data.get("pd_auth_secret"):
        data["pd_auth_secret"] = "***"
    return yaml.safe_dump(data, sort_keys=False)
