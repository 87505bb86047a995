"""Rollouts on a real `tensoryard up` (embedding demo only): Triton's repository RPCs deploy a new
version, its gate passes, a 10% canary takes its share, a version whose gate fails never gets user
traffic, a canary made to fail is rolled back by the registry's guard with no failure on the stable
version, and unloading undeploys.

The tests run in order on one fleet (each builds on the last), started with an admin token (so
the router's load and unload must pass the caller's on) and with fault injection on for every
worker (the deployment controller's workers get up's environment, TENSORYARD_* included).
This process imports tritonclient but never protos.inference (the two clash: tests/conftest.py).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from protos.tensoryard.v1 import (
    discovery_pb2,
    discovery_pb2_grpc,
    embeddings_pb2,
    embeddings_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.status.scrape import fetch, up_router_metrics
from tests.conftest import MODEL, REPO_ROOT, start_up, stop, wait_until

pytestmark = pytest.mark.slow

TOKEN = "rollout-test-token"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
GOLDEN_TEXTS = ["a cat sleeps on the sofa", "tensoryard promotes versions behind a gate"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    up = start_up(tmp_path_factory.mktemp("rollout-home"), "--no-llm",
                  env={"TENSORYARD_ADMIN_TOKEN": TOKEN, "TENSORYARD_ENABLE_FAULT_INJECTION": "1"})
    yield up
    stop(up.process)


@pytest.fixture(scope="module")
def registry(fleet):
    with grpc.insecure_channel(fleet.registry) as channel:
        yield registry_pb2_grpc.ModelRegistryStub(channel)


@pytest.fixture(scope="module")
def embed(fleet):
    with grpc.insecure_channel(fleet.router) as channel:
        stub = embeddings_pb2_grpc.EmbeddingsStub(channel)

        def call(version: str = "", text: str = "hello") -> embeddings_pb2.EmbedResponse:
            return stub.Embed(embeddings_pb2.EmbedRequest(model_name=MODEL, model_version=version, texts=[text]),
                              timeout=30)

        yield call


def models_command(fleet, *args: str) -> subprocess.CompletedProcess:
    """`tensoryard models ...` as a CI pipeline runs it (the token from the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "models", *args, "--registry", fleet.registry, "--router", fleet.router],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TENSORYARD_ADMIN_TOKEN": TOKEN},
    )


def create_version(registry, embed, corrupt: bool) -> int:
    """A new version with version 1's files and a gate of golden embeddings from version 1's
    outputs (negated when `corrupt`: a gate this model cannot pass)."""
    goldens = []
    for text in GOLDEN_TEXTS:
        reply = embed("1", text)
        vector = np.frombuffer(reply.embeddings, dtype="<f4")
        goldens.append(registry_pb2.GoldenEmbedding(
            text=text, expected=(-vector if corrupt else vector).tolist(), min_cosine=0.999))
    v1 = registry.GetVersion(registry_pb2.GetVersionRequest(model_name=MODEL, version=1))
    created = registry.CreateVersion(registry_pb2.CreateVersionRequest(
        model_name=MODEL, files=v1.files, config_json=v1.config_json,
        metadata=registry_pb2.VersionMetadata(labels={"variant": "corrupt" if corrupt else "same"}),
        lineage=registry_pb2.Lineage(source_kind="push", source_uri="tests/e2e/test_rollout.py", parent_version=1),
        gate=registry_pb2.Gate(golden_embeddings=goldens, latency_budget_s=5.0),
    ), metadata=ADMIN)
    return created.version


def router_counts(fleet) -> dict[tuple[str, str], int]:
    """tensoryard_router_requests summed per (version, code) over every router of the fleet."""
    totals: dict[tuple[str, str], int] = collections.Counter()
    for url in up_router_metrics(fleet.home):
        scrape = fetch(url, 5)
        assert scrape.snapshot is not None, scrape.error
        for labels, value in scrape.snapshot.samples.get("tensoryard_router_requests", ()):
            if labels["model"] == MODEL:
                totals[(labels["version"], labels["code"])] += int(value)
    return totals


def served_versions(embed, num_requests: int) -> collections.Counter:
    return collections.Counter(embed().model_version for _ in range(num_requests))


def workers_of(fleet, version: int) -> list[discovery_pb2.Instance]:
    with grpc.insecure_channel(fleet.registry) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=MODEL), timeout=5)
    return [i for i in reply.instances if i.model_version == str(version)]


def index(fleet) -> dict[str, dict]:
    with triton.InferenceServerClient(fleet.router) as client:
        return {m["version"]: m for m in client.get_model_repository_index(as_json=True)["models"]
                if m["name"] == MODEL}


def test_repository_load_deploys_the_latest_version_with_the_callers_token(fleet, registry, embed):
    assert create_version(registry, embed, corrupt=False) == 2
    listed = index(fleet)
    assert listed["1"]["state"] == "READY"
    assert listed["2"]["state"] == "UNAVAILABLE" and "not deployed" in listed["2"]["reason"]
    with triton.InferenceServerClient(fleet.router) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model(MODEL)
        assert "UNAUTHENTICATED" in refused.value.status()
        client.load_model(MODEL, headers={"authorization": f"Bearer {TOKEN}"}, client_timeout=240)
    assert index(fleet)["2"]["state"] == "READY"


def test_gate_passes_for_a_version_that_answers_like_version_1(fleet):
    done = models_command(fleet, "gate", MODEL, "2", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["passed"] and [c["name"] for c in result["checks"]] == ["embedding 1", "embedding 2", "latency"]


def test_a_10_percent_canary_serves_its_share(fleet, embed):
    done = models_command(fleet, "promote", MODEL, "2", "--canary", "10")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: "2" in served_versions(embed, 50), 10, "the router to apply the split")
    counts = served_versions(embed, 1000)
    assert set(counts) == {"1", "2"}
    assert 0.065 <= counts["2"] / 1000 <= 0.135, counts  # 10% +- 3.5 points: over 3 standard deviations


def test_a_version_failing_its_gate_never_gets_user_traffic(fleet, registry, embed):
    assert create_version(registry, embed, corrupt=True) == 3
    done = models_command(fleet, "promote", MODEL, "3", "--canary", "10")
    assert done.returncode == 1
    assert "failed its gate" in done.stderr and "embedding 1: cosine -1.0" in done.stderr
    deployments = registry.ListDeployments(registry_pb2.ListDeploymentsRequest(model_name=MODEL)).deployments
    assert {d.version: d.replicas for d in deployments}.get(3, 0) == 0
    policy = registry.GetTrafficPolicy(registry_pb2.GetTrafficPolicyRequest(model_name=MODEL))
    assert {s.version: s.percent for s in policy.splits} == {1: 90.0, 2: 10.0}
    assert "3" not in served_versions(embed, 300)
    # Version 3's only requests were its gate's, which named it explicitly.
    counts = router_counts(fleet)
    assert sum(n for (version, _), n in counts.items() if version == "3") == len(GOLDEN_TEXTS)
    wait_until(lambda: not workers_of(fleet, 3), 60, "version 3's worker to be stopped")
    entries = registry.ListAudit(registry_pb2.ListAuditRequest(model_name=MODEL)).entries
    assert any(e.action == "gate.fail" and e.version == 3 for e in entries)


def test_a_failing_canary_is_rolled_back_with_no_stable_failures(fleet, registry, embed):
    stable_failures_before = sum(n for (v, code), n in router_counts(fleet).items() if v == "1" and code != "OK")
    canary, = workers_of(fleet, 2)
    with grpc.insecure_channel(canary.address) as channel:
        worker_pb2_grpc.WorkerControlStub(channel).InjectFault(worker_pb2.InjectFaultRequest(
            fault=worker_pb2.InjectFaultRequest.FAIL_REQUESTS, fraction=1.0, duration_s=120), metadata=ADMIN)
    injected_s = time.monotonic()
    outcomes: collections.Counter = collections.Counter()
    stopped = threading.Event()

    def users() -> None:  # requests that name no version, as users send them
        while not stopped.is_set():
            try:
                outcomes[embed().model_version] += 1
            except grpc.RpcError as error:
                outcomes[error.code().name] += 1

    threads = [threading.Thread(target=users) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        def rolled_back():
            policy = registry.GetTrafficPolicy(registry_pb2.GetTrafficPolicyRequest(model_name=MODEL))
            return [(s.version, s.percent) for s in policy.splits] == [(1, 100.0)]

        wait_until(rolled_back, 30, "the rollback guard to roll the canary back (30 s window)", interval_s=0.2)
        rollback_s = time.monotonic() - injected_s
        time.sleep(1.5)  # the routers follow within a second; then only version 1 answers
        outcomes.clear()
        time.sleep(2)
    finally:
        stopped.set()
        for thread in threads:
            thread.join()
    assert set(outcomes) == {"1"}, outcomes
    entry = registry.ListAudit(registry_pb2.ListAuditRequest(model_name=MODEL)).entries[-1]
    details = json.loads(entry.details_json)
    assert (entry.action, entry.actor, entry.version) == ("rollback", "rollback-guard", 1)
    assert details["canary_version"] == 2 and "canary error rate" in details["reason"], details
    stable_failures = sum(n for (v, code), n in router_counts(fleet).items() if v == "1" and code != "OK")
    assert stable_failures == stable_failures_before == 0
    print(f"rolled back {rollback_s:.1f} s after the fault: {details['reason']}")


def test_repository_unload_undeploys_every_version(fleet, registry):
    with triton.InferenceServerClient(fleet.router) as client:
        client.unload_model(MODEL, headers={"authorization": f"Bearer {TOKEN}"})
    assert not registry.ListDeployments(registry_pb2.ListDeploymentsRequest(model_name=MODEL)).deployments
    wait_until(lambda: not workers_of(fleet, 1) and not workers_of(fleet, 2), 60, "every worker to stop")
    assert {m["state"] for m in index(fleet).values()} == {"UNAVAILABLE"}


def test_a_version_that_cannot_load_fails_its_promote_at_once_saying_why(fleet, registry):
    """Its weights are not a safetensors file: the worker the controller starts exits while loading,
    the controller reports it, and promote stops waiting (its replica wait is minutes) and says so."""
    v1 = registry.GetVersion(registry_pb2.GetVersionRequest(model_name=MODEL, version=1))
    garbage = b"not weights " * 1000
    blob = registry.UploadBlob(iter([registry_pb2.BlobChunk(data=garbage)]), metadata=ADMIN)
    files = [registry_pb2.ModelFile(path=f.path, sha256=blob.sha256, size_bytes=blob.size_bytes)
             if f.path.endswith(".safetensors") else f for f in v1.files]
    broken = registry.CreateVersion(registry_pb2.CreateVersionRequest(
        model_name=MODEL, files=files, config_json=v1.config_json), metadata=ADMIN).version
    started_s = time.monotonic()
    done = models_command(fleet, "promote", MODEL, str(broken), "--canary", "10", "--replica-wait-s", "240")
    elapsed_s = time.monotonic() - started_s
    assert done.returncode == 1, done.stdout
    assert "did not load" in done.stderr and "exited" in done.stderr, done.stderr
    assert elapsed_s < 120, f"promote waited {elapsed_s:.0f} s for a worker that had exited"
    deployments = registry.ListDeployments(registry_pb2.ListDeploymentsRequest(model_name=MODEL)).deployments
    assert {d.version: d.replicas for d in deployments}.get(broken, 0) == 0
    entries = registry.ListAudit(registry_pb2.ListAuditRequest(model_name=MODEL)).entries
    assert any(e.action == "deployment.failed" and e.version == broken for e in entries)
