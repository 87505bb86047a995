"""Scale to zero and back, end to end: `tensoryard up --autoscale --min-replicas 0` (embedding demo).

1. With no traffic for the idle window the autoscaler scales the deployment to zero: its worker
   drains and leaves discovery, and the router and the model stay ready (it holds what comes).
2. Requests that arrive at zero are held by the router (services/router/cold_start.py), which
   publishes the count in the discovery KV; the autoscaler, polling for held requests between
   its intervals, scales to one; the worker starts, registers, and every held request succeeds.
   The audit log names why it scaled.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import grpc
import pytest
import tritonclient.grpc

from protos.tensoryard.v1 import (
    discovery_pb2,
    discovery_pb2_grpc,
    embeddings_pb2,
    embeddings_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import MODEL, start_up, stop, wait_until

pytestmark = pytest.mark.slow

IDLE_S = 3.0
ENV = {
    "TENSORYARD_SCALE_TO_ZERO_IDLE_S": str(IDLE_S),
    "TENSORYARD_SCALE_DOWN_WINDOW_S": "2",
    # The interval is long on purpose: held requests must not wait for it.
    "TENSORYARD_AUTOSCALE_INTERVAL_S": "20",
}
NUM_HELD = 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    up = start_up(tmp_path_factory.mktemp("scale-to-zero-home"), "--no-llm", "--autoscale",
                  "--min-replicas", "0", "--max-replicas", "1", env=ENV)
    yield up
    stop(up.process)


@pytest.fixture(scope="module")
def registry(fleet):
    with grpc.insecure_channel(fleet.registry) as channel:
        yield registry_pb2_grpc.ModelRegistryStub(channel)


def replicas(registry) -> int:
    deployment, = registry.ListDeployments(registry_pb2.ListDeploymentsRequest(model_name=MODEL)).deployments
    return deployment.replicas


def discovered_workers(fleet) -> list:
    with grpc.insecure_channel(fleet.registry) as channel:
        return list(discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=MODEL), timeout=5).instances)


def scale_actions(registry) -> list[dict]:
    entries = registry.ListAudit(registry_pb2.ListAuditRequest(model_name=MODEL)).entries
    return [json.loads(e.details_json) for e in entries if e.action == "deployment.scale"]


def test_an_idle_deployment_scales_to_zero_through_a_drain(fleet, registry):
    # The first reading counts as traffic, then the idle window, then the 2 s down window, then a
    # 20 s interval at most.
    wait_until(lambda: replicas(registry) == 0 and not discovered_workers(fleet), timeout_s=90,
               what="the idle deployment to scale to zero and its worker to leave discovery")
    assert scale_actions(registry)[-1]["replicas"] == 0
    assert "scale to zero" in scale_actions(registry)[-1]["reason"]
    # Ready as a caller needs it: what it sends now is held, not refused.
    client = tritonclient.grpc.InferenceServerClient(fleet.router)
    assert client.is_server_ready() and client.is_model_ready(MODEL)
    client.close()


def test_requests_at_zero_are_held_until_a_replica_is_ready_and_all_succeed(fleet, registry):
    assert replicas(registry) == 0

    def embed(index: int) -> tuple[str, float]:
        started_s = time.monotonic()
        with grpc.insecure_channel(fleet.router) as channel:
            stub = embeddings_pb2_grpc.EmbeddingsStub(channel)
            try:
                reply = stub.Embed(embeddings_pb2.EmbedRequest(model_name=MODEL, texts=[f"held request {index}"]),
                                   timeout=120)
            except grpc.RpcError as error:
                return f"{error.code().name}: {error.details()}", time.monotonic() - started_s
        return ("OK" if len(reply.embeddings) == 4 * reply.dim > 0 else "no embedding"), time.monotonic() - started_s

    with concurrent.futures.ThreadPoolExecutor(NUM_HELD) as pool:
        outcomes = list(pool.map(embed, range(NUM_HELD)))
    print(f"\nheld requests: {[(o, round(s, 2)) for o, s in outcomes]}")
    assert [o for o, _ in outcomes] == ["OK"] * NUM_HELD
    # Held: they waited for a worker to start and load its model, not answered at once ...
    assert min(s for _, s in outcomes) > 0.5
    # ... and not for the autoscaler's 20 s interval on top of that.
    last = scale_actions(registry)[-1]
    assert (last["previous_replicas"], last["replicas"]) == (0, 1)
    assert "wait for a first replica" in last["reason"]
    assert len(discovered_workers(fleet)) == 1
