"""deploy/nomad: the job files parse as HCL2 (python-hcl2) and say what the code does — the
default ports, SIGTERM and a kill timeout past the drain grace, Consul services with gRPC checks,
and worker groups named the way the `nomad` actuator's default templates name them."""

from __future__ import annotations

import re

import hcl2
import pytest
from hcl2 import SerializationOptions

from services.autoscale.nomad import NomadActuator
from services.common.config import NomadConfig, RegistryConfig, RouterConfig, WorkerConfig, build_config
from tests.conftest import REPO_ROOT

NOMAD_DIR = REPO_ROOT / "deploy" / "nomad"
PLAIN = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
MAX_STOP_MARGIN_S = 15  # as for the systemd units: the drain grace plus up to this much


def default(cls, name: str):
    return cls.__dataclass_fields__[name].default


def job(file_name: str) -> tuple[str, dict]:
    with open(NOMAD_DIR / file_name) as file:
        document = hcl2.load(file, serialization_options=PLAIN)
    ((job_id, body),) = document["job"][0].items()
    return job_id, body


def groups(body: dict) -> dict[str, dict]:
    return {name: group for entry in body["group"] for name, group in entry.items()}


def tasks(group: dict) -> dict[str, dict]:
    return {name: task for entry in group["task"] for name, task in entry.items()}


def ports(group: dict) -> dict[str, dict]:
    return {name: port for entry in group["network"][0]["port"] for name, port in entry.items()}


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, f"not a Nomad duration: {duration!r}"
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def test_the_three_job_files_parse():
    assert sorted(p.name for p in NOMAD_DIR.glob("*.nomad.hcl")) == [
        "registry.nomad.hcl", "router.nomad.hcl", "workers.nomad.hcl"]
    assert [job(name)[0] for name in ("registry.nomad.hcl", "router.nomad.hcl", "workers.nomad.hcl")] == [
        "tensoryard-registry", "tensoryard-router", "tensoryard-workers"]


@pytest.mark.parametrize("file_name, port", [("registry.nomad.hcl", default(RegistryConfig, "port")),
                                             ("router.nomad.hcl", default(RouterConfig, "port"))])
def test_registry_and_router_listen_on_the_codes_default_ports(file_name, port):
    (group,) = groups(job(file_name)[1]).values()
    assert ports(group)["grpc"] == {"static": port}


def every_task(file_name: str):
    for group_name, group in groups(job(file_name)[1]).items():
        for task_name, task in tasks(group).items():
            yield group_name, group, task_name, task


@pytest.mark.parametrize("file_name, drain_timeout_s", [
    ("workers.nomad.hcl", default(WorkerConfig, "drain_timeout_s")),
    ("router.nomad.hcl", default(RouterConfig, "drain_timeout_s")),
])
def test_tasks_stop_with_sigterm_and_a_kill_timeout_past_the_drain_grace(file_name, drain_timeout_s):
    for group_name, _, task_name, task in every_task(file_name):
        where = f"{file_name} {group_name}/{task_name}"
        assert task["kill_signal"] == "SIGTERM", where
        assert drain_timeout_s < seconds(task["kill_timeout"]) <= drain_timeout_s + MAX_STOP_MARGIN_S, where


def test_the_registry_stops_with_sigterm_too():
    for _, _, _, task in every_task("registry.nomad.hcl"):
        assert task["kill_signal"] == "SIGTERM"


@pytest.mark.parametrize("file_name, service_name", [("registry.nomad.hcl", "tensoryard-registry"),
                                                     ("router.nomad.hcl", "tensoryard-router"),
                                                     ("workers.nomad.hcl", "tensoryard-worker")])
def test_every_group_registers_in_consul_with_a_grpc_check_and_its_metrics_port(file_name, service_name):
    for group_name, group in groups(job(file_name)[1]).items():
        (service,) = group["service"]
        assert (service["name"], service["provider"], service["port"]) == (service_name, "consul", "grpc"), group_name
        (check,) = service["check"]
        assert (check["type"], check["port"]) == ("grpc", "grpc"), group_name
        assert service["meta"][0]["metrics_port"] == "${NOMAD_PORT_metrics}", group_name
        assert "metrics" in ports(group), group_name


def test_tasks_listen_on_their_nomad_ports_and_metrics_port():
    for file_name in ("registry.nomad.hcl", "router.nomad.hcl", "workers.nomad.hcl"):
        for where, _, _, task in every_task(file_name):
            args = task["config"][0]["args"]
            pairs = dict(zip(args[1::2], args[2::2])) if len(args) % 2 == 1 else {}
            assert pairs.get("--host") == "${NOMAD_IP_grpc}", where
            assert pairs.get("--port") == "${NOMAD_PORT_grpc}", where
            assert pairs.get("--metrics-port") == "${NOMAD_PORT_metrics}", where


def test_each_worker_group_is_the_one_the_actuator_scales_and_has_a_scaling_block():
    job_id, body = job("workers.nomad.hcl")
    actuator = NomadActuator(NomadConfig())
    assert groups(body)
    for group_name, group in groups(body).items():
        (task,) = tasks(group).values()
        args = task["config"][0]["args"]
        model, version = args[args.index("--model-name") + 1], int(args[args.index("--model-version") + 1])
        target = actuator.target(model, version)
        assert (target.job_id, target.group) == (job_id, group_name)
        (scaling,) = group["scaling"]
        assert scaling["enabled"] is True
        assert 0 <= scaling["min"] <= group["count"] <= scaling["max"]
        meta = group["service"][0]["meta"][0]
        assert (meta["model_name"], meta["model_version"]) == (model, str(version))


NOMAD_PLACEHOLDER = re.compile(r"\$\{([^}]+)\}")


def with_stand_ins(args: list[str], secrets_dir) -> list[str]:
    """The task's args as the client would run them: the secrets directory a real folder, Nomad's
    IP and ports numbers, job variables their defaults."""
    values = {"NOMAD_SECRETS_DIR": str(secrets_dir), "NOMAD_IP_grpc": "127.0.0.1", "NOMAD_PORT_grpc": "7070",
              "NOMAD_PORT_metrics": "7071", "var.tls_server_name": "tensoryard.internal",
              "var.data_dir": str(secrets_dir / "data"), "var.cache_dir": str(secrets_dir / "cache")}
    return [NOMAD_PLACEHOLDER.sub(lambda m: values[m[1]], arg) for arg in args]


@pytest.mark.parametrize("file_name, config, mode", [("registry.nomad.hcl", RegistryConfig, "mtls"),
                                                     ("router.nomad.hcl", RouterConfig, "tls"),
                                                     ("workers.nomad.hcl", WorkerConfig, "mtls")])
def test_every_task_passes_tls_flags_the_cli_accepts_and_a_valid_config(file_name, config, mode, tmp_path):
    """The args go through tensoryard's own parser and config checks, with stand-in files where the
    templates put the certificate, key, CA and admin token."""
    from services.cli import _flags, _parser

    (tmp_path / "tls").mkdir()
    for name in ("tls/cert.pem", "tls/key.pem", "tls/ca.pem", "admin-token"):
        (tmp_path / name).write_text("stand-in\n")
    for where, _, _, task in every_task(file_name):
        args = task["config"][0]["args"]
        templated = {t["destination"] for t in task["template"]}
        assert {"secrets/tls/cert.pem", "secrets/tls/key.pem", "secrets/tls/ca.pem"} <= templated, where
        parsed = _parser().parse_args(with_stand_ins(args, tmp_path))
        built = build_config(config, _flags(parsed))
        assert built.tls.tls_mode == mode, where
        assert built.tls.tls_server_name == "tensoryard.internal", where
        assert built.tls.channel_security().mutual, where  # it presents its certificate to the others


@pytest.mark.parametrize("file_name", ["registry.nomad.hcl", "router.nomad.hcl", "workers.nomad.hcl"])
def test_the_grpc_checks_speak_tls_to_the_tls_ports(file_name):
    for group_name, group in groups(job(file_name)[1]).items():
        (check,) = group["service"][0]["check"]
        assert check["grpc_use_tls"] is True, group_name
