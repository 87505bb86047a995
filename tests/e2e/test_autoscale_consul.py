"""Two registries on Consul (the stand-in) elect one autoscaler; it publishes the scaling signals in
Consul's KV; when it is frozen (SIGSTOP) the other takes over once the frozen one's session has
expired, and the frozen one, thawed, follows.

Both registries share one SQLite database (as they would share PostgreSQL), run the autoscaler
with actuator `none` (decide and publish: the leader's decisions are its only actions here) and
find the worker in Consul, where it registered itself.
"""

from __future__ import annotations

import base64
import json
import signal
import time

import grpc
import pytest

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services.registry.client import register_folder
from tests.conftest import MODEL, cli, free_port, health_status, stop_all, wait_until
from tests.e2e.test_consul_discovery import consul_get, passing_ids
from tests.e2e.test_worker_lifecycle import minilm_folder
from tests.support.consul_fixtures import FAST_TIMERS

pytestmark = pytest.mark.slow

LEADER_KEY = "tensoryard/autoscaler/leader"
DECISION_KEY = f"tensoryard/deployments/{MODEL}/1/decision"
# Consul expires a session at up to twice its TTL: 2 s leaves a loaded machine room to renew in time.
TTL_S = 2.0
ENV = {"TENSORYARD_LEADER_TTL_S": str(TTL_S), "TENSORYARD_LEADER_LOCK_DELAY_S": "0.5"}


def kv_entry(base_url: str, key: str) -> dict | None:
    try:
        entry, = consul_get(base_url, f"/v1/kv/{key}")
    except Exception:  # noqa: BLE001 - 404: not written yet
        return None
    return entry


def kv_json(base_url: str, key: str) -> dict | None:
    entry = kv_entry(base_url, key)
    return None if entry is None or not entry.get("Value") else json.loads(base64.b64decode(entry["Value"]))


def leader_holder(base_url: str) -> str:
    entry = kv_entry(base_url, LEADER_KEY)
    return base64.b64decode(entry["Value"]).decode() if entry and entry.get("Session") else ""


@pytest.fixture
def two_registries(start_consul_standin, tmp_path):
    standin = start_consul_standin(*FAST_TIMERS)
    discovery = f"consul://127.0.0.1:{standin.port}"
    database = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    registries, processes = [], []
    try:
        for index in range(2):
            port = free_port()
            processes.append(cli(
                "registry", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--database-url", database,
                "--discovery", discovery, "--autoscale", "none", "--autoscale-interval-s", "0.5",
                "--metrics-port", "-1", log_path=tmp_path / f"registry-{index}.log", env=ENV))
            address = f"127.0.0.1:{port}"
            registries.append(address)
            # One after the other: the first creates the database's tables.
            wait_until(lambda: health_status(address) == 1, 60, f"registry {address} to serve")
        with grpc.insecure_channel(registries[0]) as channel:
            register_folder(channel, MODEL, "embedding", minilm_folder(), {"max_batch_size": 8})
            registry_pb2_grpc.ModelRegistryStub(channel).SetDeployment(registry_pb2.SetDeploymentRequest(
                deployment=registry_pb2.Deployment(model_name=MODEL, version=1, replicas=1, min_replicas=1,
                                                   max_replicas=2, autoscale=True), reason="test"))
        processes.append(cli("worker", "--model-name", MODEL, "--registry", registries[0], "--discovery", discovery,
                             "--port", str(free_port()), "--cache-dir", str(tmp_path / "cache"), "--num-threads", "1",
                             "--metrics-port", "-1", log_path=tmp_path / "worker.log"))
        wait_until(lambda: len(passing_ids(standin.url)) == 1, 180, "the worker passing in Consul", interval_s=0.2)
        yield standin, dict(zip(registries, processes[:2]))
    finally:
        stop_all(processes)


def test_one_registry_leads_publishes_signals_in_consul_and_the_other_takes_over_when_it_freezes(two_registries):
    standin, registries = two_registries
    wait_until(lambda: leader_holder(standin.url), 15, "a registry to take the leader lock")
    wait_until(lambda: (kv_json(standin.url, DECISION_KEY) or {}).get("current_replicas") == 1, 15,
               "the leader's decision for the deployment in Consul's KV")
    first = leader_holder(standin.url)
    leader_address = next(a for a in registries if first.endswith(a))
    follower_address = next(a for a in registries if a != leader_address)
    decision = kv_json(standin.url, DECISION_KEY)
    assert decision["actuator"] == "none" and decision["replicas"] == 1  # one idle replica: within bounds
    first_lock_index = kv_entry(standin.url, LEADER_KEY)["LockIndex"]

    frozen_at_s = time.monotonic()
    registries[leader_address].send_signal(signal.SIGSTOP)
    wait_until(lambda: leader_holder(standin.url).endswith(follower_address), 30,
               "the other registry to take the lock after the frozen one's session expired")
    took_over_s = time.monotonic() - frozen_at_s
    assert kv_entry(standin.url, LEADER_KEY)["LockIndex"] > first_lock_index  # a larger fencing token
    published_at = kv_json(standin.url, DECISION_KEY)["at_unix_s"]
    wait_until(lambda: kv_json(standin.url, DECISION_KEY)["at_unix_s"] > published_at, 10,
               "the new leader to publish decisions")
    print(f"\nleader frozen -> follower leads after {took_over_s:.1f} s (session TTL {TTL_S:g} s, lock-delay 0.5 s)")
    assert took_over_s >= TTL_S * 2 / 3  # not before the frozen leader's session could expire

    registries[leader_address].send_signal(signal.SIGCONT)
    time.sleep(3 * TTL_S)  # thawed, it finds its session gone and the lock held: it follows
    assert leader_holder(standin.url).endswith(follower_address)
