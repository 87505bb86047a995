"""What `tensoryard up` writes and runs for Prometheus (services/prometheus.py), without starting up.

(services.launcher itself is not imported here: it loads protos.inference, which clashes with
tritonclient's copy of the same protos in a test process.)"""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from services.prometheus import CannotStart, ScrapeTarget, ScrapeTargets, plan_launch, prepare_config
from tests.deploy.expressions import RULES_DIR


def read(directory, name):
    return json.loads((directory / name).read_text())


def test_every_job_has_a_targets_file_from_the_start(tmp_path):
    ScrapeTargets(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json", "router.json", "worker.json"]
    assert read(tmp_path, "worker.json") == []


def test_a_target_goes_into_its_jobs_file_with_its_labels(tmp_path):
    targets = ScrapeTargets(tmp_path)
    targets.add(ScrapeTarget("worker-b-0", "worker", "127.0.0.1:40002", {"model": "b"}))
    targets.add(ScrapeTarget("worker-a-0", "worker", "127.0.0.1:40001", {"model": "a"}))
    targets.add(ScrapeTarget("router", "router", "127.0.0.1:8002"))
    assert read(tmp_path, "worker.json") == [
        {"targets": ["127.0.0.1:40001"], "labels": {"model": "a"}},
        {"targets": ["127.0.0.1:40002"], "labels": {"model": "b"}},
    ]
    assert read(tmp_path, "router.json") == [{"targets": ["127.0.0.1:8002"], "labels": {}}]
    assert not list(tmp_path.glob("*.tmp"))


def test_an_undeployed_worker_leaves_its_jobs_file(tmp_path):
    targets = ScrapeTargets(tmp_path)
    targets.add(ScrapeTarget("worker-a-v1-0", "worker", "127.0.0.1:40001", {"model": "a"}))
    targets.add(ScrapeTarget("worker-a-v2-0", "worker", "127.0.0.1:40002", {"model": "a"}))
    targets.remove("worker-a-v2-0")
    targets.remove("never-added")
    assert read(tmp_path, "worker.json") == [{"targets": ["127.0.0.1:40001"], "labels": {"model": "a"}}]


def test_clearing_leaves_empty_files_so_a_stopped_up_is_not_down(tmp_path):
    targets = ScrapeTargets(tmp_path)
    targets.add(ScrapeTarget("registry", "registry", "127.0.0.1:7071"))
    targets.clear()
    assert read(tmp_path, "registry.json") == []


def test_the_config_copy_finds_its_rules_and_targets_beside_it(tmp_path):
    config_path = prepare_config(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    assert config["rule_files"] == ["rules/*.yml"]
    assert sorted(p.name for p in (tmp_path / "rules").glob("*.yml")) == sorted(p.name for p in RULES_DIR.glob("*.yml"))
    files = [f for job in config["scrape_configs"] for sd in job["file_sd_configs"] for f in sd["files"]]
    assert files == ["targets/registry.json", "targets/router.json", "targets/worker.json"]


def test_without_a_binary_there_is_nothing_to_start_and_up_says_why(tmp_path):
    with pytest.raises(CannotStart, match="no `prometheus` binary on PATH"):
        plan_launch(None, prepare_config(tmp_path), tmp_path, "127.0.0.1", 9090)


def test_prometheus_runs_the_copied_config_with_its_data_under_home(tmp_path):
    config = prepare_config(tmp_path)
    launch = plan_launch("/usr/bin/prometheus", config, tmp_path, "127.0.0.1", 0)
    assert launch.argv[:3] == ("/usr/bin/prometheus", f"--config.file={config}",
                               f"--storage.tsdb.path={tmp_path / 'data'}")
    assert launch.url.startswith("http://127.0.0.1:") and not launch.url.endswith(":0")


def test_a_port_in_use_is_replaced_by_a_free_one(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        launch = plan_launch("/usr/bin/prometheus", prepare_config(tmp_path), tmp_path, "127.0.0.1", port)
    assert launch.note == f"port {port} is in use; using {launch.url.rsplit(':', 1)[1]}"
    assert not launch.url.endswith(f":{port}")
