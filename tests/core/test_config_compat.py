"""LMCache config compatibility: LMCache's published PD configs of each version load with
the meaning they had; old key names take effect (file and env) with one deprecation
warning naming the new key; LMCache keys we do not implement load with one warning;
conflicting old/new names, wrong types and keys LMCache never had are clear errors."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from lmcache_pd import config_compat
from lmcache_pd.config import (
    LMCACHE_IGNORED_KEYS,
    BufferDevice,
    Config,
    ConfigError,
    PDRole,
    RemoteSerde,
    accepts_key,
    from_dict,
    load_config,
)

RENAMED = "deprecated LMCache key names"
IGNORED = "ignoring LMCache keys"


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip()


# LMCache's published disaggregated-prefill example configs, verbatim (comments included),
# from LMCache/LMCache examples/disagg_prefill/, one per key-name era.
LMCACHE_EXAMPLES: dict[str, str] = {
    # configs/lmcache-prefiller-config.yaml: the first NIXL PD (lmcache/experimental)
    "experimental_prefiller": _yaml(
        """
        local_cpu: False
        max_local_cpu_size: 0
        max_local_disk_size: 0
        remote_serde: NULL

        enable_nixl: True
        nixl_role: "sender"
        nixl_peer_host: "localhost"
        nixl_peer_port: 55555
        nixl_buffer_size: 1073741824 # 1GB
        nixl_buffer_device: "cuda"
        nixl_enable_gc: True
        """
    ),
    # 1p1d/configs/lmcache-decoder-config.yaml (v0.3.x: nixl_receiver_host/port)
    "v03_1p1d_decoder": _yaml(
        """
        local_cpu: False
        max_local_cpu_size: 0
        max_local_disk_size: 0
        remote_serde: NULL

        enable_nixl: True
        nixl_role: "receiver"
        nixl_receiver_host: "localhost"
        nixl_receiver_port: 55555
        nixl_buffer_size: 1073741824 # 1GB
        nixl_buffer_device: "cuda"
        nixl_enable_gc: True
        nixl_backends: [UCX]
        """
    ),
    # xpyd_experimental/configs/lmcache-prefiller-config.yaml (old xPyD names)
    "xpyd_old_prefiller": _yaml(
        """
        local_cpu: True
        max_local_cpu_size: 5
        # max_local_cpu_size: 0
        max_local_disk_size: 0

        enable_nixl: True
        enable_xpyd: True
        nixl_role: "sender"
        nixl_proxy_host: "localhost"
        nixl_proxy_port: 7500
        nixl_buffer_size: 1056964608 # 1073741824 # 1GB
        nixl_buffer_device: "cuda"
        nixl_backends: [UCX]
        """
    ),
    # xpyd_experimental/configs/lmcache-decoder-1-config.yaml (old xPyD names)
    "xpyd_old_decoder": _yaml(
        """
        local_cpu: False
        max_local_cpu_size: 0

        enable_nixl: True
        enable_xpyd: True
        nixl_role: "receiver"
        nixl_peer_host: "localhost"
        nixl_peer_init_port: 7300
        nixl_peer_alloc_port: 7400
        nixl_buffer_size: 2113929216 # 2147483648 # 2GB
        nixl_buffer_device: "cuda"
        nixl_backends: [UCX]
        """
    ),
    # 1p1d_experimental/configs/lmcache-decoder-config.yaml (ports as "a,b" strings)
    "xpyd_old_decoder_tp2": _yaml(
        """
        local_cpu: False
        max_local_cpu_size: 0

        enable_nixl: True
        enable_xpyd: True
        nixl_role: "receiver"
        nixl_peer_host: "localhost"
        nixl_peer_init_port: 7301,7302
        nixl_peer_alloc_port: 7401,7402
        nixl_buffer_size: 2147483648 # 2GB
        nixl_buffer_device: "cuda"
        """
    ),
    # 1p1d/configs/lmcache-prefiller-config.yaml (current names)
    "pd_prefiller": _yaml(
        """
        local_cpu: False
        save_unfull_chunk: true  # Don't discard partial chunks (< 256 tokens)

        enable_pd: True
        transfer_channel: "nixl"
        pd_role: "sender"
        pd_proxy_host: "localhost"
        pd_proxy_port: 7500
        pd_buffer_size: 1073741824 # 1GB
        pd_buffer_device: "cuda"
        nixl_backends: [UCX]
        """
    ),
    # hetero_tp/configs/lmcache-decoder-config.yaml (current names, per-rank ports)
    "pd_decoder_tp2": _yaml(
        """
        local_cpu: False
        max_local_cpu_size: 0

        enable_pd: True
        save_unfull_chunk: True
        transfer_channel: "nixl"
        pd_role: "receiver"
        pd_peer_host: "localhost"
        pd_peer_init_port: [7300, 7301]
        pd_peer_alloc_port: [7400, 7401]
        pd_buffer_size: 2147483648 # 2GB
        pd_buffer_device: "cuda"
        nixl_backends: [UCX]
        """
    ),
    # 1p1d/configs/lmcache-decoder-pd-with-remote-config.yaml (newest: pd_*_location(s))
    "pd_decoder_with_remote": _yaml(
        """
        local_cpu: True
        max_local_cpu_size: 5

        remote_url: "lm://localhost:6800"
        remote_serde: "cachegen"

        enable_pd: True
        transfer_channel: "nixl"
        pd_role: "receiver"
        pd_retrieve_locations: ["PDBackend"]
        pd_store_location: "RemoteBackend"
        pd_peer_host: "localhost"
        pd_peer_init_port: 7300
        pd_peer_alloc_port: 7400
        pd_buffer_size: 2147483648 # 2GB
        pd_buffer_device: "cuda"
        nixl_backends: [UCX]

        save_decode_cache: true
        save_unfull_chunk: true
        """
    ),
    # xpyd/configs/lmcache-prefiller-pd-with-remote-config.yaml
    "pd_prefiller_with_remote": _yaml(
        """
        local_cpu: True
        max_local_cpu_size: 5

        remote_url: "lm://localhost:6800"
        remote_serde: "cachegen"

        enable_pd: True
        transfer_channel: "nixl"
        pd_role: "sender"
        pd_retrieve_locations: ["LocalCPUBackend", "RemoteBackend"]
        pd_proxy_host: "localhost"
        pd_proxy_port: 7500
        pd_buffer_size: 1073741824 # 1GB
        pd_buffer_device: "cuda"
        nixl_backends: [UCX]

        save_unfull_chunk: true
        """
    ),
}

S, R = PDRole.SENDER, PDRole.RECEIVER
CUDA = BufferDevice.CUDA
# example -> (resolved values, old names it uses, LMCache keys we ignore in it)
EXPECTED: dict[str, tuple[dict[str, Any], set[str], set[str]]] = {
    "experimental_prefiller": (  # a sender's nixl_peer_*: the receiver it pushed to
        dict(enable_pd=True, pd_role=S, pd_peer_host="127.0.0.1", pd_peer_init_port=7300,
             pd_buffer_size=1 << 30, pd_buffer_device=CUDA, local_cpu=False),
        {"enable_nixl", "nixl_role", "nixl_buffer_size", "nixl_buffer_device"},
        {"nixl_enable_gc", "nixl_peer_host", "nixl_peer_port"},
    ),
    "v03_1p1d_decoder": (
        dict(enable_pd=True, pd_role=R, pd_peer_host="localhost", pd_peer_init_port=55555,
             pd_buffer_size=1 << 30, pd_buffer_device=CUDA, nixl_backends=["UCX"]),
        {"enable_nixl", "nixl_role", "nixl_receiver_host", "nixl_receiver_port",
         "nixl_buffer_size", "nixl_buffer_device"},
        {"nixl_enable_gc"},
    ),
    "xpyd_old_prefiller": (
        dict(enable_pd=True, pd_role=S, pd_proxy_host="localhost", pd_proxy_port=7500,
             pd_buffer_size=1056964608, pd_buffer_device=CUDA, max_local_cpu_size=5.0),
        {"enable_nixl", "enable_xpyd", "nixl_role", "nixl_proxy_host", "nixl_proxy_port",
         "nixl_buffer_size", "nixl_buffer_device"},
        set(),
    ),
    "xpyd_old_decoder": (
        dict(enable_pd=True, pd_role=R, pd_peer_host="localhost", pd_peer_init_port=7300,
             pd_peer_alloc_port=7400, pd_buffer_size=2113929216, pd_buffer_device=CUDA),
        {"enable_nixl", "enable_xpyd", "nixl_role", "nixl_peer_host", "nixl_peer_init_port",
         "nixl_peer_alloc_port", "nixl_buffer_size", "nixl_buffer_device"},
        set(),
    ),
    "xpyd_old_decoder_tp2": (
        dict(enable_pd=True, pd_role=R, pd_peer_init_port=[7301, 7302],
             pd_peer_alloc_port=[7401, 7402], pd_buffer_size=1 << 31),
        {"enable_nixl", "enable_xpyd", "nixl_role", "nixl_peer_host", "nixl_peer_init_port",
         "nixl_peer_alloc_port", "nixl_buffer_size", "nixl_buffer_device"},
        set(),
    ),
    "pd_prefiller": (
        dict(enable_pd=True, pd_role=S, pd_proxy_host="localhost", pd_proxy_port=7500,
             pd_buffer_size=1 << 30, pd_buffer_device=CUDA, save_unfull_chunk=True),
        set(),
        set(),
    ),
    "pd_decoder_tp2": (
        dict(enable_pd=True, pd_role=R, pd_peer_init_port=[7300, 7301],
             pd_peer_alloc_port=[7400, 7401], pd_buffer_size=1 << 31, save_unfull_chunk=True),
        set(),
        set(),
    ),
    "pd_decoder_with_remote": (
        dict(enable_pd=True, pd_role=R, pd_peer_init_port=7300, remote_url="lm://localhost:6800",
             remote_serde=RemoteSerde.NAIVE, max_local_cpu_size=5.0),
        set(),
        {"pd_retrieve_locations", "pd_store_location", "save_decode_cache"},
    ),
    "pd_prefiller_with_remote": (
        dict(enable_pd=True, pd_role=S, pd_proxy_port=7500, remote_url="lm://localhost:6800"),
        set(),
        {"pd_retrieve_locations"},
    ),
}  # fmt: skip


def _messages(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


@pytest.mark.parametrize("name", sorted(LMCACHE_EXAMPLES))
def test_lmcache_published_example_loads_with_its_meaning(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(LMCACHE_EXAMPLES[name])
    values, old_names, ignored = EXPECTED[name]
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.config"):
        cfg = load_config(path, env={})
    for key, want in values.items():
        assert getattr(cfg, key) == want, key
    renamed = _messages(caplog, RENAMED)
    if old_names:
        assert len(renamed) == 1, renamed  # one warning for all old names
        for old in old_names:
            assert f"{old} -> {config_compat.ALIASES[old].target}" in renamed[0]
    else:
        assert renamed == []
    dropped = _messages(caplog, IGNORED)
    if ignored:
        assert len(dropped) == 1, dropped
        assert all(key in dropped[0] for key in ignored), dropped[0]
    else:
        assert dropped == []


# every old name: (old key, LMCache value, our key, resolved value)
OLD_NAMES: list[tuple[str, Any, str, Any]] = [
    ("enable_nixl", True, "enable_pd", True),
    ("enable_xpyd", True, "enable_pd", True),
    ("nixl_role", "receiver", "pd_role", PDRole.RECEIVER),
    ("nixl_role", "sender", "pd_role", PDRole.SENDER),
    ("nixl_peer_host", "10.0.0.7", "pd_peer_host", "10.0.0.7"),
    ("nixl_receiver_host", "10.0.0.8", "pd_peer_host", "10.0.0.8"),
    ("nixl_peer_port", 55555, "pd_peer_init_port", 55555),
    ("nixl_receiver_port", 55556, "pd_peer_init_port", 55556),
    ("nixl_peer_init_port", [7301, 7302], "pd_peer_init_port", [7301, 7302]),
    ("nixl_peer_alloc_port", "7401,7402", "pd_peer_alloc_port", [7401, 7402]),
    ("nixl_proxy_host", "10.0.0.9", "pd_proxy_host", "10.0.0.9"),
    ("nixl_proxy_port", 7600, "pd_proxy_port", 7600),
    ("nixl_buffer_size", 1 << 30, "pd_buffer_size", 1 << 30),
    ("nixl_buffer_device", "cuda", "pd_buffer_device", BufferDevice.CUDA),
]


def test_old_name_table_covers_every_alias() -> None:
    assert {old for old, *_ in OLD_NAMES} == set(config_compat.ALIASES)


@pytest.mark.parametrize(("old", "value", "new", "want"), OLD_NAMES)
def test_each_old_name_takes_effect_in_file_and_env(
    old: str, value: Any, new: str, want: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    role = {"pd_role": "receiver"} if new == "enable_pd" else {}  # PD on needs a role
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.config"):
        cfg = from_dict({**role, old: value})
    assert getattr(cfg, new) == want
    renamed = _messages(caplog, RENAMED)
    assert len(renamed) == 1 and f"{old} -> {new}" in renamed[0]
    # the same through LMCACHE_<OLD> (env values are yaml scalars; lists as LMCache writes)
    raw = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.config"):
        env = {f"LMCACHE_{k.upper()}": v for k, v in role.items()}
        cfg = load_config(env={**env, f"LMCACHE_{old.upper()}": raw})
    assert getattr(cfg, new) == want
    renamed = _messages(caplog, RENAMED)
    assert len(renamed) == 1 and f"LMCACHE_{old.upper()} -> {new}" in renamed[0]


@pytest.mark.parametrize("key", sorted(LMCACHE_IGNORED_KEYS))
def test_each_ignored_lmcache_key_loads_with_one_warning(
    key: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.config"):
        cfg = from_dict({key: None, "chunk_size": 128})
    assert cfg.chunk_size == 128
    dropped = _messages(caplog, IGNORED)
    assert len(dropped) == 1 and repr(key) in dropped[0]


def test_lmcache_keys_we_implement_load_without_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ours = {f.name: f for f in msgspec.structs.fields(Config)}
    shared = sorted(config_compat.LMCACHE_KEYS & set(ours))
    # every PD/tier key of LMCache's current config that we have the meaning of
    assert {"enable_pd", "pd_role", "pd_buffer_size", "pd_peer_init_port", "nixl_backends",
            "local_disk", "save_unfull_chunk", "remote_url"} <= set(shared)  # fmt: skip
    defaults = msgspec.to_builtins(Config())
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.config"):
        cfg = from_dict({key: defaults[key] for key in shared})
    assert cfg == Config()
    assert caplog.records == []


def test_ignored_set_is_lmcache_keys_minus_ours_minus_aliases() -> None:
    ours = {f.name for f in msgspec.structs.fields(Config)}
    assert LMCACHE_IGNORED_KEYS == config_compat.LMCACHE_KEYS - ours - set(config_compat.ALIASES)
    assert not LMCACHE_IGNORED_KEYS & ours
    assert all(accepts_key(k) for k in [*ours, *config_compat.ALIASES, *LMCACHE_IGNORED_KEYS])
    assert not accepts_key("chunk_sise")


def test_old_and_new_name_must_agree() -> None:
    # same value: fine, one warning
    cfg = from_dict({"nixl_role": "receiver", "pd_role": "receiver", "enable_pd": True})
    assert cfg.pd_role is PDRole.RECEIVER
    with pytest.raises(ConfigError) as info:
        from_dict({"nixl_role": "sender", "pd_role": "receiver", "nixl_buffer_size": 1 << 20,
                   "pd_buffer_size": 1 << 21})  # fmt: skip
    text = str(info.value)
    assert "pd_role: conflicting values nixl_role='sender', pd_role='receiver'" in text
    assert "pd_buffer_size: conflicting values nixl_buffer_size=1048576" in text
    # two old names of one key
    with pytest.raises(ConfigError, match="nixl_receiver_port=1, nixl_peer_port=2"):
        from_dict({"nixl_receiver_port": 1, "nixl_peer_port": 2})
    # enable_nixl: true says enable_pd: true
    with pytest.raises(ConfigError, match="enable_pd=False, enable_nixl=True"):
        from_dict({"enable_pd": False, "enable_nixl": True})
    # an int base port and a per-rank list are different settings
    with pytest.raises(ConfigError, match="pd_peer_init_port: conflicting"):
        from_dict({"pd_peer_init_port": 7300, "nixl_peer_init_port": [7300]})


def test_sender_receiver_address_names_are_not_its_own_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = {"nixl_receiver_host": "10.0.0.8", "nixl_receiver_port": 55555}
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.config"):
        cfg = from_dict({**old, "nixl_role": "sender", "pd_bind_host": "0.0.0.0"})
    # LMCache's sender pushed to that receiver; ours advertises its own host
    assert cfg.advertised_host() == "127.0.0.1" and cfg.pd_peer_init_port == 7300
    dropped = _messages(caplog, IGNORED)
    assert len(dropped) == 1 and "nixl_receiver_host (a sender's receiver address" in dropped[0]
    assert "nixl_receiver_host ->" not in _messages(caplog, RENAMED)[0]
    # a receiver's are its own address; the role may come from a later layer (vLLM kv_role)
    cfg = load_config(
        env={"LMCACHE_NIXL_RECEIVER_HOST": "10.0.0.8"}, overrides={"pd_role": "receiver"}
    )
    assert cfg.pd_peer_host == "10.0.0.8"
    cfg = load_config(
        env={"LMCACHE_NIXL_RECEIVER_HOST": "10.0.0.8"}, overrides={"pd_role": "sender"}
    )
    assert cfg.pd_peer_host == "127.0.0.1"


def test_enable_flags_false_say_nothing() -> None:
    # LMCache: enable_xpyd refined enable_nixl; either one false does not switch PD off
    cfg = from_dict({"enable_nixl": True, "enable_xpyd": False, "nixl_role": "receiver"})
    assert cfg.enable_pd is True
    assert from_dict({"enable_nixl": False}).enable_pd is False
    assert from_dict({"enable_pd": True, "enable_xpyd": False, "pd_role": "sender"}).enable_pd


def test_conflict_in_env_names_both_variables() -> None:
    env = {"LMCACHE_NIXL_ROLE": "sender", "LMCACHE_PD_ROLE": "receiver"}
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert "LMCACHE_NIXL_ROLE='sender'" in str(info.value)
    assert "LMCACHE_PD_ROLE='receiver'" in str(info.value)


def test_layers_override_old_names_without_conflict(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("enable_nixl: true\nnixl_role: sender\nnixl_buffer_size: 1048576\n")
    env = {"LMCACHE_PD_ROLE": "receiver", "LMCACHE_NIXL_BUFFER_SIZE": "2097152"}
    cfg = load_config(path, env=env)
    assert cfg.pd_role is PDRole.RECEIVER  # env's new name beats the file's old one
    assert cfg.pd_buffer_size == 2 << 20  # env's old name beats the file's
    cfg = load_config(path, env=env, overrides={"pd_role": "sender"})
    assert cfg.pd_role is PDRole.SENDER


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"nixl_role": 3}, "nixl_role (old name of pd_role): expected one of 'sender', 'receiver'"),
        ({"nixl_role": "prefiller"}, "nixl_role (old name of pd_role): expected one of"),
        (
            {"nixl_buffer_size": "big"},
            "nixl_buffer_size (old name of pd_buffer_size): expected int",
        ),
        ({"nixl_buffer_device": "tpu"}, "nixl_buffer_device (old name of pd_buffer_device)"),
        ({"enable_xpyd": "maybe"}, "enable_xpyd (old name of enable_pd): expected bool"),
        ({"nixl_peer_init_port": "a,b"}, "nixl_peer_init_port (old name of pd_peer_init_port)"),
        ({"nixl_receiver_port": 70000}, "pd_peer_init_port: port 70000 out of range"),
        ({"remote_serde": "zstd"}, "remote_serde: expected one of 'naive'"),
        ({"nixl_rol": "sender"}, "nixl_rol: unknown config key; did you mean 'nixl_role'?"),
        ({"ec_chunk_sise": 8}, "ec_chunk_sise: unknown config key"),
    ],
)
def test_bad_lmcache_input_is_a_clear_error(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert needle in str(info.value)


def test_nixl_storage_mode_buffer_keys_are_not_pd(caplog: pytest.LogCaptureFixture) -> None:
    # LMCache docs (NIXL storage backend): nixl_buffer_* size the storage staging buffer
    data = yaml.safe_load(
        _yaml(
            """
            chunk_size: 256
            nixl_buffer_size: 1073741824 # 1GB
            nixl_buffer_device: cpu
            extra_config:
              enable_nixl_storage: true
              nixl_backend: POSIX
              nixl_pool_size: 64
              nixl_path: /mnt/nixl/cache/
            """
        )
    )
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.config"):
        cfg = from_dict(data)
    assert cfg.pd_buffer_size == Config().pd_buffer_size
    dropped = _messages(caplog, IGNORED)
    assert len(dropped) == 1 and "nixl_buffer_size (sizes LMCache's NIXL storage" in dropped[0]
    assert "'extra_config'" in dropped[0]
    assert _messages(caplog, RENAMED) == []


def test_lmcache_remote_serde_values(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.config"):
        assert from_dict({"remote_serde": "cachegen"}).remote_serde is RemoteSerde.NAIVE
    assert any("'cachegen' -> 'naive'" in m for m in _messages(caplog, "LMCache values"))
    assert from_dict({"remote_serde": None}).remote_serde is RemoteSerde.NAIVE


def test_lmcache_ec_overrides_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmcache_pd.config"):
        cfg = from_dict({"ec_chunk_size": 8, "ec": {"chunk_size": 8}})
    assert cfg.chunk_size == 256
    dropped = _messages(caplog, IGNORED)
    assert "'ec'" in dropped[0] and "'ec_chunk_size'" in dropped[0]


def test_config_check_cli_prints_warnings_for_lmcache_files(tmp_path: Path) -> None:
    path = tmp_path / "decoder.yaml"
    path.write_text(LMCACHE_EXAMPLES["v03_1p1d_decoder"])
    res = subprocess.run(
        [sys.executable, "-m", "lmcache_pd.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "pd_role: receiver" in res.stdout
    assert "pd_peer_init_port: 55555" in res.stdout
    both = res.stdout + res.stderr
    assert "nixl_role -> pd_role" in both and "nixl_receiver_port -> pd_peer_init_port" in both
    assert "ignoring LMCache keys" in both and "nixl_enable_gc" in both


def test_proxy_config_file_takes_lmcache_names_too(tmp_path: Path) -> None:
    from lmcache_pd.router.settings import load_file

    path = tmp_path / "proxy.yaml"
    path.write_text("chunk_size: 128\nnixl_buffer_size: 1048576\nnixl_enable_gc: true\n")
    _, cfg = load_file(path)
    assert cfg.chunk_size == 128 and cfg.pd_buffer_size == 1 << 20
    path.write_text("nixl_rol: sender\n")
    with pytest.raises(ConfigError, match="nixl_rol: unknown config key"):
        load_file(path)
