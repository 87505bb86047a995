"""Autoscaling end to end: `tensoryard up --autoscale` with the `local` actuator (embedding demo only).

The registry's autoscaler reads the workers' GetStats every second, decides, and writes the
deployment's replicas; up's deployment controller starts or stops (SIGTERM: a drain) worker
processes to match. Closed-loop clients call Embed through the router, and every outcome is
counted. The tests run in order on one fleet:

1. a load ramp scales 1 -> 2 (registry and discovery both show 2; the new worker serves);
2. the load falling to one client scales back to 1 after the down window: the autoscaler's worker
   drains under that live trickle, and up's own worker carries on;
3. a load switched on and off faster than the down window scales up once and never down;

and across all of it, no client request fails.

Thresholds are set low through TENSORYARD_SCALE_* so that a few clients saturate one replica on
a 2-core box: the embedding worker is a dynamic batcher, whose requests in flight (queued for a
batch included) and batcher queue are its signals (services/autoscale/signals.py).
"""

from __future__ import annotations

import collections
import json
import threading
import time

import grpc
import pytest

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
from tests.conftest import MODEL, start_up, stop, wait_until

pytestmark = pytest.mark.slow

DOWN_WINDOW_S = 8.0
UP_WINDOW_S = 1.0
ENV = {
    # Saturated at 2 requests in flight per replica, idle at 0.5 or fewer: a few closed-loop
    # clients keep one replica's worker over the mark (the time a request spends in the client and
    # the router is not in flight at the worker).
    "TENSORYARD_SCALE_UP_IN_FLIGHT_PER_REPLICA": "2",
    "TENSORYARD_SCALE_DOWN_IN_FLIGHT_PER_REPLICA": "0.5",
    "TENSORYARD_SCALE_UP_WAITING_PER_REPLICA": "2",
    "TENSORYARD_SCALE_DOWN_WAITING_PER_REPLICA": "0.5",
    "TENSORYARD_SCALE_UP_WINDOW_S": str(UP_WINDOW_S),
    "TENSORYARD_SCALE_DOWN_WINDOW_S": str(DOWN_WINDOW_S),
}
NUM_CLIENTS = 6
# Long enough that encoding, not the trip through the router, is most of a request's time.
TEXTS = ["autoscaling adds a replica when the ones running are saturated and takes it away later " * 4] * 4


class ClosedLoopLoad:
    """NUM_CLIENTS threads, each sending its next Embed as soon as the last one answered; the first
    `clients` of them are sending at any moment. Every outcome is counted (OK, or the gRPC status
    code's name)."""

    def __init__(self, router: str):
        self._channel = grpc.insecure_channel(router)
        self._stub = embeddings_pb2_grpc.EmbeddingsStub(self._channel)
        self.clients = 0
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(NUM_CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _client(self, index: int) -> None:
        request = embeddings_pb2.EmbedRequest(model_name=MODEL, texts=TEXTS)
        while not self._closed.is_set():
            if index >= self.clients:
                time.sleep(0.05)
                continue
            try:
                self._stub.Embed(request, timeout=30)
                outcome = "OK"
            except grpc.RpcError as error:
                outcome = error.code().name
                with self._lock:
                    self.errors.append(f"{outcome}: {error.details()}")
            with self._lock:
                self.outcomes[outcome] += 1

    def failures(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self.outcomes.items() if k != "OK"}

    def num_ok(self) -> int:
        with self._lock:
            return self.outcomes["OK"]

    def close(self) -> None:
        self.clients = 0
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=35)
        self._channel.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    up = start_up(tmp_path_factory.mktemp("autoscale-home"), "--no-llm", "--autoscale",
                  "--min-replicas", "1", "--max-replicas", "2", "--autoscale-interval-s", "1", env=ENV)
    yield up
    stop(up.process)


@pytest.fixture(scope="module")
def registry(fleet):
    with grpc.insecure_channel(fleet.registry) as channel:
        yield registry_pb2_grpc.ModelRegistryStub(channel)


@pytest.fixture(scope="module")
def load(fleet):
    clients = ClosedLoopLoad(fleet.router)
    yield clients
    clients.close()


@pytest.fixture(scope="module")
def demo_worker(fleet) -> discovery_pb2.Instance:
    """The one worker up started itself, before any load."""
    worker, = discovered(fleet)
    return worker


def deployed_replicas(registry) -> int:
    deployment, = registry.ListDeployments(registry_pb2.ListDeploymentsRequest(model_name=MODEL)).deployments
    assert deployment.autoscale and (deployment.min_replicas, deployment.max_replicas) == (1, 2)
    return deployment.replicas


def discovered(fleet) -> list[discovery_pb2.Instance]:
    with grpc.insecure_channel(fleet.registry) as channel:
        return list(discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=MODEL), timeout=5).instances)


def requests_served(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stats = worker_pb2_grpc.WorkerControlStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=5)
    return stats.num_requests_ok


def last_audit_sequence(registry) -> int:
    entries = registry.ListAudit(registry_pb2.ListAuditRequest(model_name=MODEL)).entries
    return max((e.sequence for e in entries), default=0)


def scale_actions(registry, after_sequence: int) -> list[tuple[float, int, int]]:
    """The autoscaler's changes since that audit entry: (time, previous replicas, replicas)."""
    entries = registry.ListAudit(registry_pb2.ListAuditRequest(model_name=MODEL, after_sequence=after_sequence)).entries
    actions = []
    for entry in entries:
        if entry.action == "deployment.scale":
            assert entry.actor == "autoscaler"
            details = json.loads(entry.details_json)
            actions.append((entry.at_s, details["previous_replicas"], details["replicas"]))
    return actions


def published_decision(fleet) -> dict:
    with grpc.insecure_channel(fleet.registry) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).KVGet(
            discovery_pb2.KVGetRequest(key=f"tensoryard/deployments/{MODEL}/1/decision"), timeout=5)
    entry, = reply.entries
    return json.loads(entry.value)


def test_a_load_ramp_scales_one_replica_to_two(fleet, registry, load, demo_worker):
    assert deployed_replicas(registry) == 1
    load.clients = NUM_CLIENTS
    wait_until(lambda: deployed_replicas(registry) == 2, 30, "the autoscaler to ask for a second replica")
    decision = published_decision(fleet)  # the scaling signal, as an external autoscaler reads it
    assert (decision["actuator"], decision["replicas"], decision["max_replicas"]) == ("local", 2, 2), decision
    wait_until(lambda: len(discovered(fleet)) == 2, 90, "the second worker to start and register")
    new, = [i for i in discovered(fleet) if i.address != demo_worker.address]
    # The router sends it its share: it answers requests of the load.
    wait_until(lambda: requests_served(new.address) >= 10, 30, "the new worker to serve requests")
    assert deployed_replicas(registry) == 2
    assert load.failures() == {}, load.errors[:5]


def test_the_load_falling_to_a_trickle_scales_back_to_one_through_a_drain(fleet, registry, load, demo_worker):
    before = last_audit_sequence(registry)
    assert len(discovered(fleet)) == 2
    load.clients = 1  # a trickle goes on: the scaled-in worker drains under live traffic
    off_s = time.time()
    wait_until(lambda: deployed_replicas(registry) == 1, DOWN_WINDOW_S + 20, "the autoscaler to scale back to 1")
    (at_s, previous, replicas), = scale_actions(registry, before)
    assert (previous, replicas) == (2, 1)
    # Not before the load had been low for the down window: the stabilisation holds the count.
    assert at_s - off_s >= DOWN_WINDOW_S - 1.5, at_s - off_s
    # The newest worker (the autoscaler's) goes; up's own demo worker stays.
    wait_until(lambda: [i.address for i in discovered(fleet)] == [demo_worker.address], 30,
               "the scaled-in worker to deregister")
    # Stopped with SIGTERM: it drained and exited on its own.
    log_path = fleet.home / "logs" / f"worker-{MODEL}-v1-0.log"
    wait_until(lambda: '"worker_drained"' in log_path.read_text() and '"worker_stopped"' in log_path.read_text(),
               30, "the scaled-in worker to drain and stop")
    served = requests_served(demo_worker.address)
    wait_until(lambda: requests_served(demo_worker.address) > served + 5, 10, "the trickle to go on, on the one left")
    assert load.failures() == {}, load.errors[:5]


def sample_replicas(registry, seconds: float, history: list[int]) -> None:
    """Record the deployment's replicas every half second for this long."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        history.append(deployed_replicas(registry))
        time.sleep(0.5)


def test_an_oscillating_load_scales_up_once_and_never_down_within_the_window(fleet, registry, load):
    load.clients = 0
    before = last_audit_sequence(registry)
    on_s, off_s = 3.0, 3.0  # a period well inside the down window
    history: list[int] = []
    started = time.monotonic()
    scaled_up_at = None
    # On and off until one down window has passed since the scale-up (or 40 s without one).
    while time.monotonic() - started < 40:
        load.clients = NUM_CLIENTS
        sample_replicas(registry, on_s, history)
        load.clients = 0
        if scaled_up_at is None and 2 in history:
            scaled_up_at = time.monotonic()
        if scaled_up_at is not None and time.monotonic() - scaled_up_at >= DOWN_WINDOW_S + 2:
            break
        sample_replicas(registry, off_s, history)
    actions = scale_actions(registry, before)
    ups = [a for a in actions if a[2] > a[1]]
    downs = [a for a in actions if a[2] < a[1]]
    assert len(ups) == 1, (actions, history)  # the load is real: it asks for the second replica, once
    assert downs == [], (actions, history)  # each off period is shorter than the down window
    assert history == sorted(history), history  # the count never fell while the load came and went
    assert load.failures() == {}, load.errors[:5]


def test_no_request_failed_during_the_whole_test(load):
    load.clients = 0
    assert load.num_ok() > 0
    assert load.failures() == {}, (dict(load.outcomes), load.errors[:5])
