"""Configs are built once: flags over environment over file over defaults, checked by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import RouterConfig, WorkerConfig, build_config


def test_defaults_apply_when_nothing_is_given():
    config = build_config(RouterConfig)
    assert config.port == 8001
    assert config.telemetry.metrics_port == 0


def test_flags_beat_environment_beat_file(tmp_path: Path):
    file = tmp_path / "tensoryard.toml"
    file.write_text('[router]\nport = 9100\nregistry_address = "file:1"\nhost = "0.0.0.0"\n')
    env = {"TENSORYARD_PORT": "9200", "TENSORYARD_REGISTRY_ADDRESS": "env:1"}
    config = build_config(RouterConfig, {"port": 9300, "host": None}, env, file)
    assert config.port == 9300  # flag
    assert config.registry_address == "env:1"  # environment over file
    assert config.host == "0.0.0.0"  # file (the flag was not given)


def test_nested_telemetry_takes_flat_names():
    config = build_config(RouterConfig, {"metrics_port": -1}, {"TENSORYARD_LOG_FORMAT": "json"})
    assert config.telemetry.metrics_port == -1
    assert config.telemetry.log_format == "json"


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="port"):
        build_config(RouterConfig, {"port": 70000})
    with pytest.raises(ValueError, match="port: cannot read 'abc'"):
        build_config(RouterConfig, {}, {"TENSORYARD_PORT": "abc"})
    with pytest.raises(ValueError, match="model_name is required"):
        build_config(WorkerConfig)


def test_worker_message_limit_comes_from_its_flag_and_is_checked():
    assert build_config(WorkerConfig, {"model_name": "m"}).max_message_bytes == 64 * 1024 * 1024
    assert build_config(WorkerConfig, {"model_name": "m", "max_message_bytes": 4096}).max_message_bytes == 4096
    with pytest.raises(ValueError, match="max_message_bytes must be >= 1024"):
        build_config(WorkerConfig, {"model_name": "m", "max_message_bytes": 10})
