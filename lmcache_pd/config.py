"""Configuration: one msgspec Struct, loaded from yaml and ``LMCACHE_*`` environment.

Key names follow LMCache where LMCache has the key (``chunk_size``, ``pd_peer_host``,
``pd_buffer_size`` ...), so an LMCache yaml of any LMCache version loads
(:mod:`lmcache_pd.config_compat` holds LMCache's key lists): LMCache's older names of our
keys (``nixl_role``, ``nixl_buffer_size``, ``enable_xpyd`` ...) take effect as our key with
one deprecation warning; keys LMCache has or had that we do not implement load with one
warning naming them; a key LMCache never had is an error naming the closest valid key.
An old name given together with its new name must agree (else an error naming both).
Environment variables ``LMCACHE_<KEY>`` (upper-cased key, old names too) override the
file, exactly as LMCache names them; their values are parsed as yaml scalars (``8``,
``true``, ``[7300, 7301]``); list keys also take LMCache's ``7300,7301`` form.

Resolution order: defaults < yaml file < environment < explicit overrides.
"""

from __future__ import annotations

import difflib
import enum
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from lmcache_pd import config_compat
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
    # bytes per notified NIXL WRITE group (the receiver verifies a group while later ones
    # fly); 0 = one WRITE per request, better where UCX runs over TCP only
    pd_write_group_bytes: int = 16 * 1024 * 1024
    pd_verify_checksums: bool = True
    # the receiver answers each handoff (Committed) with a signed NIXL notification to
    # the sender's agent, not a ZMQ reply: one fewer ZMQ hop per request. Needs the
    # receiver to reach the sender's NIXL agent too (as any NIXL deployment does);
    # false: every answer over the ZMQ control connection
    pd_reply_by_notif: bool = True
    # how long a TP>1 vLLM worker busy-polls its step queue after each step before it
    # blocks (vLLM's own value: 1 s). That poll starves the handoff threads beside it
    # (pushes and receives stalled ~1 s, some to the lease expiry), so engines with our
    # connector set it to this (lmcache_pd.integration.vllm.worker_spin); -1 leaves
    # vLLM's value
    pd_worker_spin_s: float = 0.01
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
    # vLLM-format KV events of our tiers (lmcache_pd.events): ZMQ PUB on this port of
    # pd_bind_host and a replay/snapshot ROUTER on the next one (TP rank 0); 0 = off
    pd_kv_events_port: int = 0
    pd_kv_events_queue: int = 10_000
    # peer-to-peer fetch between kv_both engines (lmcache_pd.p2p): LMCache's enable_p2p,
    # p2p_host (bound and advertised; a wildcard advertises pd_peer_host) and
    # p2p_init_ports (the p2p endpoint per TP rank; 0 = a free port), and ours: how long
    # a holder entry lives in the remote tier's index
    enable_p2p: bool = False
    p2p_host: str = "127.0.0.1"
    p2p_init_ports: Port = 0
    p2p_holder_ttl_s: float = 600.0

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

    def p2p_advertised_host(self) -> str:
        """The address peers fetch from: ``p2p_host``, or ``pd_peer_host`` when it is a
        wildcard."""
        if self.p2p_host in ("0.0.0.0", "::", "*", ""):
            return self.pd_peer_host
        return self.p2p_host

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

# LMCache keys (any version) that are neither our keys nor old names of them: accepted
# and ignored with one warning naming them (see lmcache_pd.config_compat).
LMCACHE_IGNORED_KEYS = config_compat.ignored_keys(_TYPES)


def accepts_key(key: str) -> bool:
    """Whether ``key`` loads: one of ours, an old LMCache name of ours, or an LMCache key
    we ignore (for callers that split a yaml between us and their own keys)."""
    return key in _TYPES or key in config_compat.ALIASES or config_compat.is_lmcache_key(key)


def _is_listy(tp: Any) -> bool:
    info = msgspec.inspect.type_info(tp)
    options = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return any(isinstance(t, msgspec.inspect.ListType) for t in options)


_LIST_KEYS = frozenset(k for k, tp in _TYPES.items() if _is_listy(tp))


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
        "p2p_holder_ttl_s",
    ):
        positive(name)
    for name in (
        "max_local_cpu_size",
        "max_local_disk_size",
        "pd_busy_retry_after_s",
        "pd_write_group_bytes",
    ):
        if getattr(cfg, name) < 0:
            errors.append(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.pd_busy_max_retries < 0:
        errors.append(f"pd_busy_max_retries: must be >= 0, got {cfg.pd_busy_max_retries}")
    if cfg.pd_worker_spin_s < 0 and cfg.pd_worker_spin_s != -1:
        errors.append(
            f"pd_worker_spin_s: must be >= 0 (or -1: vLLM's own), got {cfg.pd_worker_spin_s}"
        )
    if cfg.chunk_size > 1 << 20:
        errors.append(f"chunk_size: must be <= 1048576, got {cfg.chunk_size}")
    for name in (
        "pd_peer_init_port",
        "pd_peer_alloc_port",
        "pd_proxy_port",
        "pd_pull_port",
        "p2p_init_ports",
    ):
        value = getattr(cfg, name)
        ports = value if isinstance(value, list) else [value]
        if not ports:
            errors.append(f"{name}: port list is empty")
        # 0: a free port. pd_pull_port: advertised in kv_transfer_params; pd_peer_init_port:
        # named in Fetch (standard contract; several decoder replicas per host, as under
        # Ray Serve). Push-ahead through our proxy needs a fixed decoder port.
        # p2p_init_ports: advertised in the remote tier's holder index.
        low = 0 if name in ("pd_pull_port", "pd_peer_init_port", "p2p_init_ports") else 1
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
    candidates = [*_TYPES, *config_compat.ALIASES, *sorted(config_compat.LMCACHE_KEYS)]
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


Label = Callable[[str], str]


class _Layer(msgspec.Struct, frozen=True):
    """One source of raw keys: a yaml file, the environment or explicit overrides."""

    source: str
    data: Mapping[str, Any]
    label: Label = str


class _Notes(msgspec.Struct):
    """What the layers said besides values: for one warning each, and the errors."""

    renamed: list[str] = msgspec.field(default_factory=list)
    ignored: list[str] = msgspec.field(default_factory=list)
    mapped: list[str] = msgspec.field(default_factory=list)
    errors: list[str] = msgspec.field(default_factory=list)


def _typed(key: str, given: config_compat.Given, notes: _Notes) -> Any:
    """One given value converted to ``key``'s type, or ``UNSET`` (error noted)."""
    name = given.label if given.alias is None else f"{given.label} (old name of {key})"
    value, note = config_compat.map_value(key, given.value)
    if note:
        notes.mapped.append(f"{given.label}: {note}")
    if value is config_compat.UNSET:
        return value
    if key in _LIST_KEYS:
        value = config_compat.split_csv(value)
    try:
        return msgspec.convert(value, _TYPES[key], strict=False)
    except msgspec.ValidationError:
        notes.errors.append(f"{name}: expected {_describe(_TYPES[key])}, got {given.value!r}")
        return config_compat.UNSET


def _show(value: Any) -> str:
    return repr(value.value if isinstance(value, enum.Enum) else value)


def _drop_sender_peer_aliases(
    clean: dict[str, Any], origin: dict[str, config_compat.Given], notes: _Notes
) -> None:
    """On a sender, LMCache's 1P1D names of the receiver's address are not ours."""
    for key, given in list(origin.items()):
        alias = given.alias
        if alias is None or alias.name not in config_compat.SENDER_PEER_ALIASES:
            continue
        del clean[key]
        notes.renamed.remove(f"{given.label} -> {key}")
        notes.ignored.append(f"{given.label} (a sender's receiver address: the proxy names it)")


def _resolve(layers: list[_Layer]) -> Config:
    """Merge layers (later wins) into a validated :class:`Config`. Within one layer an
    old LMCache name and the key it means must agree. Warns once for old names, once
    for ignored LMCache keys, once for LMCache values read differently."""
    notes = _Notes()
    nixl_storage = any(config_compat.nixl_storage_enabled(layer.data) for layer in layers)
    clean: dict[str, Any] = {}
    origin: dict[str, config_compat.Given] = {}
    for layer in layers:
        split = config_compat.normalize(
            layer.data, _TYPES, label=layer.label, nixl_storage=nixl_storage
        )
        notes.renamed += split.renamed
        notes.ignored += split.ignored
        notes.errors += [f"{k}: unknown config key{_closest(k)}" for k in split.unknown]
        for key, givens in split.items():
            typed = [(g, _typed(key, g, notes)) for g in givens]
            typed = [(g, v) for g, v in typed if v is not config_compat.UNSET]
            if not typed:
                continue
            first_given, first = typed[0]
            clash = [(g, v) for g, v in typed[1:] if v != first]
            if clash:
                names = [f"{first_given.label}={_show(first)}"]
                names += [f"{g.label}={_show(v)}" for g, v in clash]
                notes.errors.append(
                    f"{key}: conflicting values {', '.join(names)} "
                    "(an old LMCache name and the key it means must agree; give one)"
                )
                continue
            clean[key] = first
            origin[key] = first_given
    if clean.get("pd_role") is PDRole.SENDER:
        _drop_sender_peer_aliases(clean, origin, notes)
    source = next((la.source for la in layers if la.source != "environment"), "config")
    if notes.renamed:
        log.warning(
            "%s: deprecated LMCache key names read as their lmcache-pd names (rename them): %s",
            source,
            ", ".join(notes.renamed),
        )
    if notes.ignored:
        log.warning(
            "%s: ignoring LMCache keys lmcache-pd does not implement: %s",
            source,
            sorted(notes.ignored),
        )
    if notes.mapped:
        log.warning("%s: LMCache values read as lmcache-pd values: %s", source, notes.mapped)
    if notes.errors:
        raise ConfigError(notes.errors)
    cfg = Config(**clean)
    errors = _check_ranges(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def from_dict(data: Mapping[str, Any], source: str = "config") -> Config:
    """Validate a mapping of config keys into a :class:`Config`.

    Collects every unknown key, wrong type, old/new name conflict and out-of-range value
    into one :class:`ConfigError`. Old LMCache names take effect as their new key (one
    warning); LMCache keys we do not implement are dropped (one warning).
    """
    return _resolve([_Layer(source, data)])


def _env_label(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _env_target_type(key: str) -> Any:
    alias = config_compat.ALIASES.get(key)
    return _TYPES.get(alias.target if alias else key)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in _TYPES and key not in config_compat.ALIASES:
            if not config_compat.is_lmcache_key(key):
                continue  # other LMCACHE_* variables (log level, ...) are not config keys
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
        if isinstance(out[key], (int, float)) and _env_target_type(key) in (str, str | None):
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
    layers: list[_Layer] = []
    path = path or env.get(CONFIG_FILE_ENV)
    if path:
        layers.append(_Layer(str(path), load_yaml(path)))
    layers.append(_Layer("environment", _env_overrides(env), _env_label))
    if overrides:
        layers.append(_Layer("overrides", dict(overrides)))
    return _resolve(layers)


def to_yaml(cfg: Config) -> str:
    """The resolved config as yaml (secrets redacted)."""
    data = msgspec.to_builtins(cfg)
    if data.get("pd_auth_secret"):
        data["pd_auth_secret"] = "***"
    return yaml.safe_dump(data, sort_keys=False)
