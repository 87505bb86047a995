"""deploy/prometheus/prometheus-consul.yml: the fleet's scrape config, targets from Consul. It keeps
prometheus.yml's job names (the rules and dashboards use them), scrapes the services deploy/nomad/
registers, passes promtool, and its relabelling turns a Consul service into the right target —
shown by a real Prometheus fed the labels Consul service discovery documents."""

from __future__ import annotations

import subprocess

import hcl2
import pytest
import yaml
from hcl2 import SerializationOptions

from tests.conftest import REPO_ROOT, wait_until
from tests.deploy.expressions import PROMETHEUS_DIR, RULES_DIR
from tests.deploy.prometheus_server import Prometheus, active_targets

CONSUL_CONFIG = PROMETHEUS_DIR / "prometheus-consul.yml"
# Debian's prometheus package is built without some service discoveries, Consul's among them.
NO_CONSUL_SD = "field consul_sd_configs not found"


def load(path):
    return yaml.safe_load(path.read_text())


def jobs(config: dict) -> dict[str, dict]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)


def with_local_paths(config: dict, tmp_path) -> dict:
    """The config with its rules and the Consul token file where this test has them."""
    token = tmp_path / "consul-token"
    token.write_text("test-token\n")
    config["rule_files"] = [str(RULES_DIR / "*.yml")]
    for job in config["scrape_configs"]:
        for sd in job.get("consul_sd_configs", ()):
            sd["authorization"]["credentials_file"] = str(token)
    return config


def as_static(config: dict, targets: dict[str, list[dict]]) -> dict:
    """Consul SD replaced by static targets carrying the labels Consul SD would set."""
    for job in config["scrape_configs"]:
        job.pop("consul_sd_configs")
        job["static_configs"] = targets.get(job["job_name"], [{"targets": ["127.0.0.1:1"]}])
    return config


def test_it_keeps_the_job_names_of_the_file_sd_config():
    assert list(jobs(load(CONSUL_CONFIG))) == list(jobs(load(PROMETHEUS_DIR / "prometheus.yml")))
    assert load(CONSUL_CONFIG)["rule_files"] == load(PROMETHEUS_DIR / "prometheus.yml")["rule_files"]


def test_it_follows_the_consul_services_the_nomad_jobs_register():
    options = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    registered = set()
    for path in (REPO_ROOT / "deploy" / "nomad").glob("*.nomad.hcl"):
        with open(path) as file:
            document = hcl2.load(file, serialization_options=options)
        for job_body in document["job"][0].values():
            for entry in job_body["group"]:
                for group in entry.values():
                    registered |= {service["name"] for service in group["service"]}
    followed = {service for job in jobs(load(CONSUL_CONFIG)).values()
                for sd in job["consul_sd_configs"] for service in sd["services"]}
    assert followed == registered == {"tensoryard-registry", "tensoryard-router", "tensoryard-worker"}


def test_promtool_accepts_it(promtool, tmp_path):
    path = tmp_path / "prometheus-consul.yml"
    path.write_text(yaml.safe_dump(with_local_paths(load(CONSUL_CONFIG), tmp_path)))
    checked = run(promtool, "check", "config", str(path))
    if NO_CONSUL_SD in checked.stdout + checked.stderr:
        pytest.skip(f"{promtool} was built without Consul service discovery (Debian's package is); "
                    "test_promtool_accepts_the_rest_of_it checks everything else with it")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_accepts_the_rest_of_it(promtool, tmp_path):
    """Relabelling, rules, globals: the same file with static targets in place of Consul SD."""
    path = tmp_path / "prometheus-static.yml"
    path.write_text(yaml.safe_dump(as_static(with_local_paths(load(CONSUL_CONFIG), tmp_path), {})))
    checked = run(promtool, "check", "config", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def consul_labels(address: str, metrics_port: str, **meta: str) -> dict[str, str]:
    labels = {"__meta_consul_service_address": address, "__meta_consul_node": "node-1",
              "__meta_consul_health": "passing"}
    if metrics_port:
        labels["__meta_consul_service_metadata_metrics_port"] = metrics_port
    labels |= {f"__meta_consul_service_metadata_{k}": v for k, v in meta.items()}
    return labels


@pytest.mark.slow
def test_a_consul_service_becomes_its_metrics_target(prometheus_binary, tmp_path):
    worker = consul_labels("10.1.2.3", "31001", model_name="SmolLM2-135M-Instruct", model_version="1")
    no_metrics = consul_labels("10.1.2.4", "")
    router = consul_labels("10.1.2.5", "31002")
    # The grpc port is what Consul SD puts in __address__; the relabelling must replace it.
    config = as_static(with_local_paths(load(CONSUL_CONFIG), tmp_path), {
        "tensoryard-worker": [{"targets": ["10.1.2.3:20001"], "labels": worker},
                              {"targets": ["10.1.2.4:20002"], "labels": no_metrics}],
        "tensoryard-router": [{"targets": ["10.1.2.5:8001"], "labels": router}],
    })
    config["rule_files"] = []
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    with Prometheus(prometheus_binary, config, tmp_path / "prometheus") as prometheus:
        def targets():
            found = {t["labels"]["job"]: t for t in active_targets(prometheus.url)}
            return found if {"tensoryard-worker", "tensoryard-router"} <= found.keys() else None

        found = wait_until(targets, 20, "the static targets to be active")
        all_targets = active_targets(prometheus.url)
    workers = [t for t in all_targets if t["labels"]["job"] == "tensoryard-worker"]
    assert [t["labels"]["instance"] for t in workers] == ["10.1.2.3:31001"]  # the one without metrics dropped
    assert workers[0]["labels"]["model"] == "SmolLM2-135M-Instruct"
    assert workers[0]["labels"]["node"] == "node-1"
    assert found["tensoryard-router"]["labels"]["instance"] == "10.1.2.5:31002"
