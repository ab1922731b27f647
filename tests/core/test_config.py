"""Config: LMCache yaml compatibility, env overrides, clear errors, `config check`."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmcache_pd.config import (
    BufferDevice,
    ConfigError,
    LoadFailurePolicy,
    PDRole,
    RemoteSerde,
    from_dict,
    load_config,
)

# A decoder config as LMCache's disaggregated-prefill example writes it.
LMCACHE_PD_DECODER_YAML = textwrap.dedent(
    """
    local_cpu: False
    max_local_cpu_size: 0
    max_local_disk_size: 0
    remote_serde: NULL
    enable_pd: True
    pd_role: "receiver"
    pd_peer_host: "localhost"
    pd_peer_init_port: [7300, 7301]
    pd_peer_alloc_port: [7400, 7401]
    pd_buffer_size: 2147483648
    pd_buffer_device: "cuda"
    transfer_channel: "nixl"
    nixl_backends: ["UCX"]
    save_decode_cache: False
    """
)


def test_lmcache_pd_yaml_loads_unchanged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "decoder.yaml"
    path.write_text(LMCACHE_PD_DECODER_YAML)
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path, env={})
    assert cfg.pd_role is PDRole.RECEIVER
    assert cfg.pd_buffer_device is BufferDevice.CUDA
    assert cfg.pd_buffer_size == 2 * 1024**3
    assert cfg.port_for_rank("pd_peer_init_port", 0) == 7300
    assert cfg.port_for_rank("pd_peer_init_port", 1) == 7301
    warnings = [r.getMessage() for r in caplog.records if "ignoring LMCache keys" in r.getMessage()]
    assert len(warnings) == 1
    assert "save_decode_cache" in warnings[0]
    # LMCache's `remote_serde: NULL` means "not set": our default, said once
    assert cfg.remote_serde is RemoteSerde.NAIVE
    assert any("remote_serde: null" in r.getMessage() for r in caplog.records)


def test_unknown_key_names_the_closest_valid_key() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"chunk_sise": 256, "pd_peer_hots": "x"})
    text = str(info.value)
    assert "chunk_sise" in text and "'chunk_size'" in text
    assert "pd_peer_hots" in text and "'pd_peer_host'" in text


def test_wrong_type_names_key_and_expected_type() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"chunk_size": "big", "load_failure_policy": "retry"})
    text = str(info.value)
    assert "chunk_size: expected int" in text
    assert "load_failure_policy: expected one of 'recompute', 'fail'" in text


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"chunk_size": 0}, "chunk_size: must be > 0"),
        ({"pd_peer_init_port": [7300, 70000]}, "port 70000 out of range"),
        ({"pd_proxy_port": 0}, "port 0 out of range"),
        ({"max_local_cpu_size": -1}, "max_local_cpu_size: must be >= 0"),
        ({"enable_pd": True}, "pd_role: required"),
        ({"transfer_channel": "mooncake"}, "only 'nixl'"),
        ({"local_disk": "file:///tmp/x"}, "max_local_disk_size: must be > 0"),
        ({"pd_worker_spin_s": -0.5}, "pd_worker_spin_s: must be >= 0"),
    ],
)
def test_range_checks(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        from_dict(data)


def test_env_override_wins_over_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 256\npd_peer_host: 10.1.1.1\n")
    env = {
        "LMCACHE_CONFIG_FILE": str(path),
        "LMCACHE_CHUNK_SIZE": "8",
        "LMCACHE_PD_PEER_HOST": "127.0.0.2",
        "LMCACHE_PD_PEER_INIT_PORT": "[7300, 7301]",
        "LMCACHE_LOAD_FAILURE_POLICY": "fail",
        "LMCACHE_LOG_LEVEL": "DEBUG",  # not a config key: ignored
    }
    cfg = load_config(env=env)
    assert cfg.chunk_size == 8
    assert cfg.pd_peer_host == "127.0.0.2"
    assert cfg.pd_peer_init_port == [7300, 7301]
    assert cfg.load_failure_policy is LoadFailurePolicy.FAIL
    # explicit overrides win over env
    assert load_config(env=env, overrides={"chunk_size": 16}).chunk_size == 16


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad, env={})


def test_secret_file_is_created_private(tmp_path: Path) -> None:
    cfg = from_dict({"pd_auth_secret_file": str(tmp_path / "s" / "secret")})
    secret = cfg.auth_secret()
    assert len(secret) >= 32
    assert (tmp_path / "s" / "secret").stat().st_mode & 0o777 == 0o600
    assert cfg.auth_secret() == secret  # stable once created


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache_pd.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_config_check_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(LMCACHE_PD_DECODER_YAML)
    res = _cli("config", "check", str(good))
    assert res.returncode == 0, res.stderr
    assert "pd_role: receiver" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_sise: 8\npd_proxy_port: 99999\n")
    res = _cli("config", "check", str(bad))
    assert res.returncode == 2
    assert "did you mean 'chunk_size'" in res.stdout
