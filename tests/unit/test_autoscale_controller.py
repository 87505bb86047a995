"""The autoscaling controller over a real store (local actuator) and real WorkerControl servers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from protos.tensoryard.v1 import worker_pb2, worker_pb2_grpc
from services.autoscale.controller import AutoscaleController, decision_key
from services.autoscale.local import LocalActuator
from services.autoscale.signals import SignalReader, WorkerEndpoint
from services.common.config import AutoscaleConfig
from services.registry.blobs import LocalBlobStore
from services.registry.records import FileRecord
from services.registry.store import ModelStore


class StatsWorker(worker_pb2_grpc.WorkerControlServicer):
    """A WorkerControl that answers GetStats with whatever the test sets."""

    def __init__(self, worker_id: str):
        self.stats = worker_pb2.WorkerStats(worker_id=worker_id, model_name="m", model_version="1", state="SERVING")

    async def GetStats(self, request, context):
        return self.stats


async def start_worker(worker_id: str) -> tuple[grpc.aio.Server, StatsWorker, str]:
    server = grpc.aio.server()
    servicer = StatsWorker(worker_id)
    worker_pb2_grpc.add_WorkerControlServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


@pytest.fixture
def store(tmp_path: Path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    with ModelStore(tmp_path / "registry.db", blobs) as model_store:
        model_store.create_model("m", "embedding")
        model_store.add_version("m", [FileRecord("w.bin", *blobs.put_stream([b"w"]))], {})
        yield model_store


def run(coroutine):
    return asyncio.run(coroutine)


def test_load_on_the_workers_scales_the_deployment_and_the_decision_is_published(store):
    async def scenario():
        server, worker, address = await start_worker("w1")
        offline = "127.0.0.1:1"  # listed but not answering: left out of the reading
        workers = [WorkerEndpoint("w1", address, "m", "1"), WorkerEndpoint("gone", offline, "m", "1")]
        published: dict[str, bytes] = {}
        controller = AutoscaleController(
            AutoscaleConfig(autoscale_actuator="local", scale_down_window_s=0.0, ttft_slo_s=0.0),
            store.list_deployments, SignalReader(lambda m, v: workers if (m, v) == ("m", 1) else [], timeout_s=0.5),
            LocalActuator(store), publish=published.__setitem__)
        store.set_deployment("m", 1, 1, min_replicas=1, max_replicas=3, autoscale=True)
        try:
            worker.stats.num_in_flight = 20  # 8 per replica saturates; midway is 5: 4 wanted, max 3
            (applied,) = await controller.step()
            assert (applied.current, applied.decision.replicas) == (1, 3)
            assert store.list_deployments("m")[0].replicas == 3
            decision = json.loads(published[decision_key("m", 1)])
            assert decision["replicas"] == 3 and decision["current_replicas"] == 1
            assert "in_flight" in decision["reason"]

            worker.stats.num_in_flight = 0  # idle: back to the minimum
            worker.stats.num_requests_ok = 10
            assert [a.decision.replicas for a in await controller.step()] == [2]  # step down: 1 a time
            assert [a.decision.replicas for a in await controller.step()] == [1]
            assert await controller.step() == []

            store.set_deployment("m", 1, 1)  # an operator fixes the count: the autoscaler leaves it
            worker.stats.num_in_flight = 50
            assert await controller.step() == []
            assert store.list_deployments("m")[0].replicas == 1
        finally:
            await server.stop(0)

    run(scenario())
    scaled = [e for e in store.list_audit("m") if e.action == "deployment.scale"]
    assert [(e.actor, e.details["replicas"]) for e in scaled] == [("autoscaler", 3), ("autoscaler", 2), ("autoscaler", 1)]


def test_an_actuator_failure_is_retried_at_the_next_interval(store):
    class Failing:
        name = "failing"
        calls = 0

        async def set_replicas(self, request):
            Failing.calls += 1
            if Failing.calls == 1:
                raise RuntimeError("nomad said no")
            store.scale_deployment(request.model_name, request.version, request.replicas, request.reason)

    async def scenario():
        server, worker, address = await start_worker("w1")
        worker.stats.num_waiting = 12
        controller = AutoscaleController(
            AutoscaleConfig(autoscale_actuator="none", ttft_slo_s=0.0), store.list_deployments,
            SignalReader(lambda m, v: [WorkerEndpoint("w1", address, "m", "1")]), Failing())
        store.set_deployment("m", 1, 1, min_replicas=1, max_replicas=4, autoscale=True)
        try:
            assert await controller.step() == []
            assert [a.decision.replicas for a in await controller.step()] == [4]
        finally:
            await server.stop(0)

    run(scenario())
    assert store.list_deployments("m")[0].replicas == 4
