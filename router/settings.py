"""Proxy settings: the ``ProxySettings`` Struct, its yaml keys and the CLI flags.

Owns everything the proxy is configured with. A ``--config`` yaml may mix proxy keys
(the fields of :class:`ProxySettings`, e.g. ``disagg_min_tokens``) with lmcache-pd core
keys (``chunk_size``, ``hash_algorithm``, ``pd_proxy_host`` ...), which are validated by
``lmcache_pd.config`` (``LMCACHE_*`` env overrides apply to those). Precedence:
defaults < yaml < command-line flags.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import os
from pathlib import Path
from typing import Any

import msgspec

from lmcache_pd import config as core_config


class PolicyKind(str, enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    CACHE_AWARE = "cache_aware"


class ProxySettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything the proxy needs. Times in seconds."""

    prefillers: list[str] = msgspec.field(default_factory=list)
    decoders: list[str] = msgspec.field(default_factory=list)
    # control endpoint (host:port) of each decoder, aligned with ``decoders``;
    # missing entries default to the decoder URL's host with port 7300 + index.
    decoder_kv: list[str] = msgspec.field(default_factory=list)
    # KV-event PUB endpoint (host:port) of each decoder, aligned with ``decoders`` (its
    # replay/snapshot socket is the next port); "" or missing = none (cache_aware guesses)
    decoder_events: list[str] = msgspec.field(default_factory=list)
    events_resync_s: float = 10.0
    host: str = "127.0.0.1"
    port: int = 9000
    policy: PolicyKind = PolicyKind.ROUND_ROBIN
    # prompts with fewer tokens go straight to a decoder (no prefill hop); 0 = always
    disagg_min_tokens: int = 0
    # cache_aware: affinity loses when its in-flight+1 > factor * (least in-flight+1)
    load_guard_factor: float = 2.0
    prefix_map_entries: int = 200_000
    # handoff-complete listener (ZMQ PULL); None = HTTP-only flow, 0 = free port
    handoff_port: int | None = None
    handoff_host: str = "127.0.0.1"
    handoff_timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    prefill_timeout_s: float = 120.0
    tokenize_timeout_s: float = 5.0
    # decode: deadline for the response head (first byte); then max gap between chunks
    decode_timeout_s: float = 600.0
    stream_idle_timeout_s: float = 120.0
    prefill_retries: int = 1
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    health_fail_threshold: int = 2
    max_inflight: int = 4096
    finished_history: int = 1024
    max_body_bytes: int = 32 * 1024 * 1024
    max_connections: int = 512
    log_level: str = "warning"
    config_file: str | None = None  # the --config yaml (core keys: secret, chunking)
    # core keys the proxy uses (chunk hashing), filled from the core config
    chunk_size: int = 256
    hash_algorithm: str = "xxh3_128"

    def validate(self) -> None:
        errors: list[str] = []
        if not self.decoders:
            errors.append("decoders: at least one --decoder URL is required")
        for name in (
            "connect_timeout_s",
            "prefill_timeout_s",
            "decode_timeout_s",
            "health_interval_s",
            "health_timeout_s",
            "handoff_timeout_s",
            "tokenize_timeout_s",
            "stream_idle_timeout_s",
            "load_guard_factor",
            "events_resync_s",
        ):
            if getattr(self, name) <= 0:
                errors.append(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in (
            "max_inflight",
            "finished_history",
            "prefix_map_entries",
            "health_fail_threshold",
            "chunk_size",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                errors.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.disagg_min_tokens < 0 or self.prefill_retries < 0:
            errors.append("disagg_min_tokens and prefill_retries must be >= 0")
        for entry in self.decoder_kv:
            _split_host_port(entry, errors)
        for entry in self.decoder_events:
            if entry:
                _split_host_port(entry, errors, "decoder_events")
        if len(self.decoder_events) > len(self.decoders):
            errors.append(
                f"decoder_events: {len(self.decoder_events)} endpoints for "
                f"{len(self.decoders)} decoders"
            )
        if errors:
            raise core_config.ConfigError(errors)

    def events_endpoint(self, index: int) -> tuple[str, int] | None:
        """KV-event PUB (host, port) of decoder ``index``, or None."""
        if index < len(self.decoder_events) and self.decoder_events[index]:
            return _split_host_port(self.decoder_events[index], [], "decoder_events")
        return None

    def decoder_endpoint(self, index: int) -> tuple[str, int]:
        """Control (host, port) of decoder ``index``: from ``decoder_kv`` or the default."""
        if index < len(self.decoder_kv) and self.decoder_kv[index]:
            host, port = _split_host_port(self.decoder_kv[index], [])
            return host, port
        host = _url_host(self.decoders[index])
        return host, 7300 + index


_FIELDS: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(ProxySettings)}
_CORE_SHARED = ("chunk_size", "hash_algorithm", "config_file")


def _url_host(url: str) -> str:
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def _split_host_port(text: str, errors: list[str], key: str = "decoder_kv") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        errors.append(f"{key}: expected host:port, got {text!r}")
        return "", 0
    return host.strip("[]"), int(port)


def load_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], core_config.Config]:
    """Split a yaml file into proxy keys and a validated core :class:`Config`."""
    data = core_config.load_yaml(path)
    proxy: dict[str, Any] = {}
    core: dict[str, Any] = {}
    core_keys = {f.name for f in msgspec.structs.fields(core_config.Config)}
    errors: list[str] = []
    for key, value in data.items():
        if key in _FIELDS and key not in _CORE_SHARED:
            proxy[key] = value
        elif core_config.accepts_key(key):  # ours, an old LMCache name, or ignored
            core[key] = value
        else:
            near = difflib.get_close_matches(str(key), [*_FIELDS, *core_keys], n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            errors.append(f"{key}: unknown config key{hint}")
    if errors:
        raise core_config.ConfigError(errors)
    cfg = core_config.load_config(None, overrides=core)
    return proxy, cfg


def _csv(text: str) -> list[str]:
    return [part.strip().rstrip("/") for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmcache-pd proxy",
        description="OpenAI-compatible proxy: prefill on a prefiller, hand KV off, decode.",
    )
    p.add_argument(
        "--prefiller",
        action="append",
        default=[],
        metavar="URL[,URL...]",
        help="prefiller base URL(s), e.g. http://127.0.0.1:8100",
    )
    p.add_argument(
        "--decoder", action="append", default=[], metavar="URL[,URL...]", help="decoder base URL(s)"
    )
    p.add_argument(
        "--decoder-kv",
        action="append",
        default=[],
        metavar="HOST:PORT[,...]",
        help="decoder control endpoints aligned with --decoder "
        "(default: decoder host, port 7300+i)",
    )
    p.add_argument(
        "--decoder-events",
        action="append",
        default=[],
        metavar="HOST:PORT[,...]",
        help="KV-event PUB endpoints (pd_kv_events_port) aligned with --decoder; "
        "cache_aware then routes by what each decoder announces",
    )
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--policy", choices=[k.value for k in PolicyKind], default=None)
    p.add_argument("--config", default=None, help="yaml with proxy and core keys")
    p.add_argument(
        "--handoff-host",
        default=None,
        help="address the HandoffDone listener binds and advertises (default 127.0.0.1)",
    )
    p.add_argument(
        "--handoff-port",
        type=int,
        default=None,
        help="listen for HandoffDone on this port (0: any free port)",
    )
    p.add_argument("--disagg-min-tokens", type=int, default=None)
    p.add_argument("--log-level", default=None)
    return p


def settings_from_args(argv: list[str]) -> ProxySettings:
    """Parse CLI flags (and ``--config``) into validated :class:`ProxySettings`."""
    args = build_parser().parse_args(argv)
    data: dict[str, Any] = {}
    cfg = core_config.load_config(None) if args.config is None else None
    if args.config:
        data, cfg = load_file(Path(args.config))
        data["config_file"] = str(args.config)
    assert cfg is not None
    data["chunk_size"] = cfg.chunk_size
    data["hash_algorithm"] = cfg.hash_algorithm.value
    flags = {
        "prefillers": [u for text in args.prefiller for u in _csv(text)] or None,
        "decoders": [u for text in args.decoder for u in _csv(text)] or None,
        "decoder_kv": [u for text in args.decoder_kv for u in _csv(text)] or None,
        "decoder_events": [u for text in args.decoder_events for u in _csv(text)] or None,
        "host": args.host,
        "port": args.port,
        "policy": args.policy,
        "handoff_port": args.handoff_port,
        "handoff_host": args.handoff_host,
        "disagg_min_tokens": args.disagg_min_tokens,
        "log_level": args.log_level,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        settings = msgspec.convert(data, ProxySettings, strict=False)
    except msgspec.ValidationError as exc:
        raise core_config.ConfigError([str(exc)]) from None
    settings.validate()
    return settings
