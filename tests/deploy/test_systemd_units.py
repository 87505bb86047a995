"""deploy/systemd: every unit passes `systemd-analyze verify` and stops its service the way the code
drains (SIGTERM, then at least the drain grace before SIGKILL)."""

from __future__ import annotations

import configparser
import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from services.common.config import ENV_PREFIX, RegistryConfig, RouterConfig, WorkerConfig, build_config
from tests.conftest import REPO_ROOT

SYSTEMD_DIR = REPO_ROOT / "deploy" / "systemd"
INSTALLED_BIN = "/opt/tensoryard/venv/bin/tensoryard"  # the install path the units and README name
UNITS = sorted(SYSTEMD_DIR.glob("*.service"))
# What systemd does between SIGTERM and SIGKILL beyond the drain: the cut-off of what is left,
# unloading the model, closing. The units give 10 s; more than 15 would only delay a stuck stop.
MAX_STOP_MARGIN_S = 15


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read(SYSTEMD_DIR / name)
    return parser


def test_there_are_units_for_registry_router_and_a_worker_template():
    assert [u.name for u in UNITS] == ["tensoryard-registry.service", "tensoryard-router.service",
                                       "tensoryard-worker@.service"]


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None and Path("/usr/bin/systemd-analyze").exists():
        found = "/usr/bin/systemd-analyze"
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: the systemd package)")
    return found


def test_every_unit_passes_systemd_analyze_verify(systemd_analyze, tmp_path):
    """Verified as installed: ExecStart's binary must exist, so the copies point at a stand-in
    executable in place of the documented install path. Warnings (unknown keys, bad values) fail."""
    binary = tmp_path / "bin" / "tensoryard"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    for source in UNITS:
        text = source.read_text()
        assert INSTALLED_BIN in text, f"{source.name} should start {INSTALLED_BIN}"
        (tmp_path / source.name).write_text(text.replace(INSTALLED_BIN, str(binary)))
    names = [f"./{u.name}" for u in UNITS if not u.name.endswith("@.service")]
    names.append("./tensoryard-worker@all-MiniLM-L6-v2.service")  # an instance of the template
    verified = subprocess.run([systemd_analyze, "verify", "--man=no", *names], check=False, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert (verified.stdout + verified.stderr).strip() == ""


def test_a_bad_unit_fails_verify(systemd_analyze, tmp_path):
    """The check above can fail: a unit with an unknown key is reported."""
    (tmp_path / "bad.service").write_text("[Service]\nExecStart=/bin/true\nKillSignall=SIGTERM\n")
    verified = subprocess.run([systemd_analyze, "verify", "--man=no", "./bad.service"], check=False, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert "Unknown key" in verified.stdout + verified.stderr


@pytest.mark.parametrize("name, drain_timeout_s", [
    ("tensoryard-worker@.service", WorkerConfig.__dataclass_fields__["drain_timeout_s"].default),
    ("tensoryard-router.service", RouterConfig.__dataclass_fields__["drain_timeout_s"].default),
])
def test_stopping_sends_sigterm_and_waits_past_the_drain_grace(name, drain_timeout_s):
    service = unit(name)["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert drain_timeout_s < float(service["TimeoutStopSec"]) <= drain_timeout_s + MAX_STOP_MARGIN_S


@pytest.mark.parametrize("name", [u.name for u in UNITS])
def test_every_unit_restarts_on_failure_and_is_hardened(name):
    service = unit(name)["Service"]
    assert service["Restart"] == "on-failure"
    assert service["User"] == "tensoryard"
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "RestrictSUIDSGID"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""


def test_writable_paths_are_the_data_and_cache_directories():
    assert unit("tensoryard-registry.service")["Service"]["ReadWritePaths"] == "/var/lib/tensoryard/registry"
    assert unit("tensoryard-registry.service")["Service"]["StateDirectory"] == "tensoryard/registry"
    worker = unit("tensoryard-worker@.service")["Service"]
    assert worker["ReadWritePaths"] == "/var/cache/tensoryard"


def config_variables(cls) -> set[str]:
    """TENSORYARD_<FIELD> for every field of a config, nested ones (telemetry, admin) flat."""
    names = set()
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            names |= config_variables(f.default_factory)
        else:
            names.add(ENV_PREFIX + f.name.upper())
    return names


@pytest.mark.parametrize("name, config", [("tensoryard-registry.service", RegistryConfig),
                                          ("tensoryard-worker@.service", WorkerConfig),
                                          ("tensoryard-router.service", RouterConfig)])
def test_the_variables_a_unit_sets_are_fields_of_its_config(name, config):
    text = (SYSTEMD_DIR / name).read_text()
    assert "EnvironmentFile=-/etc/tensoryard/tensoryard.env" in text
    set_here = [line.removeprefix("Environment=").split("=", 1)[0] for line in text.splitlines()
                if line.startswith("Environment=TENSORYARD_")]
    assert set(set_here) <= config_variables(config)


def unit_environment(name: str) -> dict[str, str]:
    text = (SYSTEMD_DIR / name).read_text()
    return dict(line.removeprefix("Environment=").split("=", 1) for line in text.splitlines()
                if line.startswith("Environment=TENSORYARD_"))


@pytest.mark.parametrize("name, config, mode", [("tensoryard-registry.service", RegistryConfig, "mtls"),
                                                ("tensoryard-worker@.service", WorkerConfig, "mtls"),
                                                ("tensoryard-router.service", RouterConfig, "tls")])
def test_the_tls_settings_a_unit_sets_build_a_valid_config(name, config, mode, tmp_path):
    """With the files in place (stand-ins), the unit's TLS variables pass the config's checks: the
    mode, and every file it needs, from /etc/tensoryard/tls/ or, for the key, the credentials directory."""
    env = {key: value for key, value in unit_environment(name).items() if key.startswith("TENSORYARD_TLS_")}
    assert env["TENSORYARD_TLS_MODE"] == mode
    assert env["TENSORYARD_TLS_KEY_FILE"] == "%d/tls-key"
    credentials = [line for line in (SYSTEMD_DIR / name).read_text().splitlines() if line.startswith("LoadCredential=tls-key:")]
    assert len(credentials) == 1 and credentials[0].startswith("LoadCredential=tls-key:/etc/tensoryard/tls/")
    for key, value in env.items():
        if key.endswith("_FILE") and key != "TENSORYARD_TLS_KEY_FILE":
            assert value.startswith("/etc/tensoryard/tls/"), key
    local = {}
    for key, value in env.items():
        if key.endswith("_FILE"):
            path = tmp_path / value.replace("%d/", "credentials/").lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("PEM\n")
            value = str(path)
        local[key] = value
    built = build_config(config, {"model_name": "m"} if config is WorkerConfig else {}, local)
    assert built.tls.tls_mode == mode
    assert built.tls.channel_security().mutual  # its calls to the others present its certificate
