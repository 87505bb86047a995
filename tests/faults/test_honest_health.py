"""Health means forward progress: a stopped or hung worker is routed around within its window and
comes back when it moves again; an engine that fails leaves discovery and its process is restarted.
Health `Watch` sends the status at once and on each change."""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.tensoryard.v1 import worker_pb2
from tests.faults.conftest import LLM, PROGRESS_TIMEOUT_S, signal_pid, wait_until
from tests.faults.generation_client import Client, request

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The router stops routing to a replica whose reports stop for 1 s (RouterConfig.stale_after_s).
ROUTER_WINDOW_S = 1.0


def short_requests(count: int, tag: str) -> list:
    return [request(LLM, f"{tag} {i}: one, two,", 4) for i in range(count)]


def run_requests(router: str, messages, concurrency: int = 4):
    async def run():
        async with Client(router) as client:
            return await client.many(messages, concurrency=concurrency, timeout_s=30)

    return asyncio.run(run())


class HealthWatch:
    """grpc.health.v1 Watch on a thread: every status it sends, with when it came."""

    def __init__(self, address: str, service: str = ""):
        self.statuses: queue.Queue = queue.Queue()
        self._channel = grpc.insecure_channel(address)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=120
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.statuses.put((reply.status, time.monotonic()))
        except grpc.RpcError as error:
            self.statuses.put((error.code(), time.monotonic()))

    def next(self, timeout_s: float = 10):
        return self.statuses.get(timeout=timeout_s)

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


def test_a_stopped_worker_is_routed_around_and_comes_back_after_sigcont(fleet):
    stopped, other = fleet.wait_for_workers(2)
    signal_pid(stopped.pid, signal.SIGSTOP)
    try:
        time.sleep(ROUTER_WINDOW_S + 0.5)
        before = other.stats().num_requests_ok
        outcomes = run_requests(fleet.router, short_requests(20, "while stopped"))
        assert [o.code for o in outcomes] == ["OK"] * 20
        assert other.stats().num_requests_ok - before == 20  # every one went to the other worker
    finally:
        signal_pid(stopped.pid, signal.SIGCONT)
    workers = fleet.wait_for_workers(2)
    assert stopped.pid in {w.pid for w in workers}
    back = next(w for w in workers if w.pid == stopped.pid)
    wait_until(lambda: _takes_requests(fleet, back), 30, "the resumed worker to take requests again")


def _takes_requests(fleet, worker) -> bool:
    before = worker.stats().num_requests_ok
    run_requests(fleet.router, short_requests(8, "after SIGCONT"))
    return worker.stats().num_requests_ok > before


def test_a_hung_engine_turns_not_serving_within_its_window_and_serving_when_it_moves_again(fleet):
    hung, other = fleet.wait_for_workers(2)
    watch = HealthWatch(hung.address)
    try:
        assert watch.next()[0] == SERVING  # the current status, at once
        hung.inject(worker_pb2.InjectFaultRequest.HANG_ENGINE, duration_s=4.0)
        injected_at = time.monotonic()
        status, at = watch.next()
        assert status == NOT_SERVING
        assert at - injected_at <= PROGRESS_TIMEOUT_S + 0.5
        assert hung.stats().state == "STALLED"
        before = other.stats().num_requests_ok
        outcomes = run_requests(fleet.router, short_requests(12, "while hung"))
        assert [o.code for o in outcomes] == ["OK"] * 12
        assert other.stats().num_requests_ok - before == 12
        status, at = watch.next(timeout_s=10)
        assert status == SERVING  # the hang ended: progress again
        assert hung.stats().state == "SERVING"
    finally:
        watch.close()


def test_an_engine_failure_takes_the_worker_out_and_up_restarts_it(fleet):
    failing, other = fleet.wait_for_workers(2)

    async def streams_through_the_failure():
        async with Client(fleet.router) as client:
            calls = asyncio.gather(*(client.many([request(LLM, f"crash story {i}:", 48)]) for i in range(8)))
            await asyncio.sleep(1.5)
            failing.inject(worker_pb2.InjectFaultRequest.CRASH_ENGINE)
            return [outcome for batch in await calls for outcome in batch]

    outcomes = asyncio.run(streams_through_the_failure())
    assert [(o.code, len(o.token_ids)) for o in outcomes] == [("OK", 48)] * 8  # moved to the other worker
    wait_until(lambda: failing.instance_id not in {w.instance_id for w in fleet.workers()}, 10,
               "the failed worker to leave discovery")
    wait_until(lambda: "exited with code 5; restarting" in fleet.output_path.read_text(), 20,
               "up to report the failed worker's exit")
    workers = fleet.wait_for_workers(2)
    assert failing.pid not in {w.pid for w in workers}


@pytest.mark.parametrize("target", ["router", "registry", "worker"])
def test_health_answers_unknown_services_as_the_protocol_says(fleet, target):
    address = {"router": fleet.router, "registry": fleet.registry, "worker": fleet.workers()[0].address}[target]
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as error:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()
