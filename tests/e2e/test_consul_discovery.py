"""Consul discovery on the Consul stand-in (tests/support/, a real HTTP server in its own process that
follows Consul's documented API; the Consul binary cannot be installed here).

First the client on its own: registration as an agent service with a TTL check fed by `healthy()`,
deregistration, registering again when the agent lost its state, ACL tokens, blocking watches.
Then a fleet: a registry (for the model files), a router and two embedding workers, all with
`--discovery consul://...`; a worker frozen with SIGSTOP goes critical after its TTL and the router
stops sending to it; SIGCONT brings it back; the stand-in is down for 30 s and the router serves
from the last good set throughout, then reconciles as the workers register again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos.tensoryard.v1 import discovery_pb2, embeddings_pb2, embeddings_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.consul_http import ConsulError
from services.common.discovery_consul import ConsulDiscovery
from services.registry.client import register_folder
from tests.conftest import MODEL, cli, free_port, health_status, start_registry, stop_all, wait_until
from tests.e2e.test_worker_lifecycle import minilm_folder

SERVICE_NAME = "tensoryard-worker"


def consul_get(base_url: str, path: str, token: str = ""):
    request = urllib.request.Request(base_url + path, headers={"X-Consul-Token": token} if token else {})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read() or b"null")


def passing_ids(base_url: str, name: str = SERVICE_NAME) -> list[str]:
    return sorted(e["Service"]["ID"] for e in consul_get(base_url, f"/v1/health/service/{name}?passing"))


def check_status(base_url: str, instance_id: str) -> str | None:
    check = consul_get(base_url, "/v1/agent/checks").get(f"service:{instance_id}")
    return check["Status"] if check else None


def worker_instance(instance_id: str = "w1", port: int = 50051) -> discovery_pb2.Instance:
    return discovery_pb2.Instance(instance_id=instance_id, service="worker", address=f"127.0.0.1:{port}",
                                  model_name=MODEL, model_version="2",
                                  metadata={"metrics_port": "9100", "odd.key": "kept"})


async def eventually(predicate, timeout_s: float, what: str) -> float:
    """Seconds until predicate() (run in a thread: it does blocking HTTP) holds."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await asyncio.to_thread(predicate):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# -- the client on the stand-in --------------------------------------------------------------------


def test_a_registered_instance_is_an_agent_service_with_a_ttl_check(consul_url):
    async def main():
        discovery = ConsulDiscovery(consul_url)
        registration = await discovery.register(worker_instance(), ttl_ms=2000, healthy=lambda: True)
        service = await asyncio.to_thread(consul_get, consul_url, "/v1/agent/service/w1")
        check = (await asyncio.to_thread(consul_get, consul_url, "/v1/agent/checks"))["service:w1"]
        listed = await discovery.list("worker", MODEL)
        await registration.stop()
        await discovery.close()
        return service, check, listed

    service, check, listed = asyncio.run(main())
    assert (service["ID"], service["Service"], service["Address"], service["Port"]) == (
        "w1", SERVICE_NAME, "127.0.0.1", 50051)
    assert service["Meta"]["model_name"] == MODEL and service["Meta"]["metrics_port"] == "9100"
    assert check["Status"] == "passing" and check["Type"].lower() == "ttl"
    assert listed == [worker_instance()]  # odd metadata keys come back as they went in


def test_the_check_starts_critical_until_the_instance_is_healthy(consul_url):
    healthy = False

    async def main():
        discovery = ConsulDiscovery(consul_url)
        registration = await discovery.register(worker_instance(), ttl_ms=10_000, healthy=lambda: healthy)
        at_start = await asyncio.to_thread(check_status, consul_url, "w1")
        nonlocal healthy
        healthy = True
        took_s = await eventually(lambda: passing_ids(consul_url) == ["w1"], 3, "the check to pass")
        await registration.stop()
        await discovery.close()
        return at_start, took_s

    at_start, took_s = asyncio.run(main())
    assert at_start == "critical"
    assert took_s < 1.0  # on the change, not at the next third of the TTL


def test_an_instance_that_stops_serving_fails_its_check_at_once(consul_url):
    healthy = True

    async def main():
        discovery = ConsulDiscovery(consul_url)
        registration = await discovery.register(worker_instance(), ttl_ms=10_000, healthy=lambda: healthy)
        await eventually(lambda: passing_ids(consul_url) == ["w1"], 3, "the check to pass")
        nonlocal healthy
        healthy = False  # a worker whose engine stalled: gRPC health NOT_SERVING
        took_s = await eventually(lambda: passing_ids(consul_url) == [], 3, "the check to fail")
        await registration.stop()
        await discovery.close()
        return took_s

    assert asyncio.run(main()) < 1.0  # long before its 10 s TTL


def test_stop_deregisters(consul_url):
    async def main():
        discovery = ConsulDiscovery(consul_url)
        registration = await discovery.register(worker_instance(), ttl_ms=2000)
        await registration.stop()
        await discovery.close()

    asyncio.run(main())
    assert consul_get(consul_url, "/v1/agent/services") == {}
    assert check_status(consul_url, "w1") is None


def test_an_instance_registers_again_after_the_agent_lost_its_state(consul_standin):
    async def main():
        discovery = ConsulDiscovery(consul_standin.url)
        registration = await discovery.register(worker_instance(), ttl_ms=1500)
        await asyncio.to_thread(consul_standin.restart, 1.0)  # fresh state, same port
        took_s = await eventually(lambda: passing_ids(consul_standin.url) == ["w1"], 5, "registering again")
        await registration.stop()
        await discovery.close()
        return took_s

    assert asyncio.run(main()) < 2.0  # at its next TTL update (every 0.5 s here)


def test_the_acl_token_is_sent_and_a_missing_one_is_a_clear_error(start_consul_standin):
    standin = start_consul_standin("--acl-token", "s3cret")

    async def main():
        with pytest.raises(ConsulError, match="403.*Permission denied"):
            await ConsulDiscovery(standin.url).register(worker_instance(), ttl_ms=2000)
        discovery = ConsulDiscovery(standin.url, token="s3cret")
        registration = await discovery.register(worker_instance(), ttl_ms=2000)
        listed = await discovery.list("worker")
        await registration.stop()
        await discovery.close()
        return listed

    assert [i.instance_id for i in asyncio.run(main())] == ["w1"]


def test_watch_follows_registrations_as_they_happen(consul_url):
    async def main():
        discovery = ConsulDiscovery(consul_url)
        seen: list[tuple[float, list[str]]] = []

        async def follow():
            async for instances in discovery.watch("worker", MODEL):
                seen.append((time.monotonic(), sorted(i.instance_id for i in instances)))

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        registered_at = time.monotonic()
        registration = await discovery.register(worker_instance(), ttl_ms=2000)
        await asyncio.sleep(0.5)
        await registration.stop()
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await discovery.close()
        return seen, registered_at

    seen, registered_at = asyncio.run(main())
    assert [ids for _, ids in seen] == [[], ["w1"], []]
    assert seen[1][0] - registered_at < 0.4  # the blocking query woke on the change


# -- a fleet on Consul -----------------------------------------------------------------------------

TTL_MS = 2000
# One blocking round trip: the query wakes on the change, plus the router's rate limit.
ROUND_TRIP_S = 0.5


def embed(router: str, timeout_s: float = 3.0) -> None:
    with grpc.insecure_channel(router) as channel:
        reply = embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(
            embeddings_pb2.EmbedRequest(model_name=MODEL, texts=["discovery on consul"]), timeout=timeout_s)
    assert reply.embeddings


def requests_ok(worker: str) -> int:
    with grpc.insecure_channel(worker) as channel:
        return worker_pb2_grpc.WorkerControlStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=5).num_requests_ok


def send_for(router: str, duration_s: float, concurrency: int = 2) -> tuple[int, list[str]]:
    """Requests back to back for duration_s; (how many, the failures)."""
    deadline = time.monotonic() + duration_s

    def loop() -> tuple[int, list[str]]:
        count, failures = 0, []
        while time.monotonic() < deadline:
            try:
                embed(router, timeout_s=2.0)
            except grpc.RpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")
            count += 1
            time.sleep(0.02)
        return count, failures

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: loop(), range(concurrency)))
    return sum(c for c, _ in results), [f for _, fs in results for f in fs]


@pytest.fixture
def consul_fleet(consul_standin, tmp_path):
    registry, registry_process = start_registry(tmp_path)
    with grpc.insecure_channel(registry) as channel:
        register_folder(channel, MODEL, "embedding", minilm_folder(), {"max_batch_size": 8})
    discovery = f"consul://127.0.0.1:{consul_standin.port}"
    env = {"TENSORYARD_LEASE_TTL_MS": str(TTL_MS)}
    workers = {}
    processes = [registry_process]
    for index in range(2):
        port = free_port()
        processes.append(cli("worker", "--model-name", MODEL, "--registry", registry, "--discovery", discovery,
                             "--port", str(port), "--cache-dir", str(tmp_path / "cache"), "--num-threads", "1",
                             "--metrics-port", "-1", log_path=tmp_path / f"worker-{index}.log", env=env))
        workers[f"127.0.0.1:{port}"] = processes[-1]
    router_port = free_port()
    processes.append(cli("router", "--port", str(router_port), "--registry", registry, "--discovery", discovery,
                         "--models", MODEL, "--metrics-port", "-1", log_path=tmp_path / "router.log"))
    router = f"127.0.0.1:{router_port}"
    try:
        wait_until(lambda: len(passing_ids(consul_standin.url)) == 2, 180, "both workers passing in Consul",
                   interval_s=0.2)
        wait_until(lambda: health_status(router) == 1, 30, "the router to serve")
        yield consul_standin, router, workers, tmp_path / "router.log"
    finally:
        stop_all(processes)


def removed_from_router(router_log, instance_id: str) -> bool:
    for line in router_log.read_text().splitlines():
        if '"backend_removed"' in line and json.loads(line).get("tensoryard", {}).get("worker") == instance_id:
            return True
    return False


def worker_ids_by_address(base_url: str) -> dict[str, str]:
    entries = consul_get(base_url, f"/v1/health/service/{SERVICE_NAME}")
    return {f"{e['Service']['Address']}:{e['Service']['Port']}": e["Service"]["ID"] for e in entries}


@pytest.mark.slow
def test_a_fleet_on_consul_routes_around_a_frozen_worker_and_rides_out_an_outage(consul_fleet):
    standin, router, workers, router_log = consul_fleet
    frozen = min(workers)
    frozen_id = worker_ids_by_address(standin.url)[frozen]
    # The router registered too; its check passes once it is ready (it polls its readiness every 0.25 s).
    wait_until(lambda: consul_get(standin.url, "/v1/health/service/tensoryard-router?passing"), 5,
               "the router's check to pass")

    # Both serve.
    before = {address: requests_ok(address) for address in workers}
    count, failures = send_for(router, 2.0)
    assert failures == []
    assert all(requests_ok(address) > before[address] for address in workers), "each worker served"

    # SIGSTOP one: critical once its TTL runs out, and out of the router's set a round trip later.
    os.kill(workers[frozen].pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    wait_until(lambda: frozen_id not in passing_ids(standin.url), TTL_MS / 1000 + 2, "the frozen worker's check to fail")
    critical_after_s = time.monotonic() - stopped_at
    assert critical_after_s >= TTL_MS / 1000 * 0.5  # its TTL ran out; nothing failed it on purpose
    # The router dropped it because Consul said so (its load stream going quiet only benches it).
    wait_until(lambda: removed_from_router(router_log, frozen_id), TTL_MS / 1000 + ROUND_TRIP_S + 1.0,
               "the router to drop the frozen worker from its set")
    time.sleep(max(0.0, TTL_MS / 1000 + ROUND_TRIP_S - (time.monotonic() - stopped_at)))
    count, failures = send_for(router, 2.0)
    assert count > 10 and failures == []  # none sent to the frozen worker: none failed or hung

    # SIGCONT: it passes again and the router sends to it again.
    os.kill(workers[frozen].pid, signal.SIGCONT)
    wait_until(lambda: frozen_id in passing_ids(standin.url), 5, "the thawed worker to pass again")
    served_before = requests_ok(frozen)
    wait_until(lambda: send_for(router, 0.3)[1] == [] and requests_ok(frozen) > served_before, 10,
               "the router to send to the thawed worker again")

    # Consul down for 30 s: the router keeps serving from the last good set.
    standin.stop()
    count, failures = send_for(router, 30.0)
    assert count > 100 and failures == [], failures[:3]
    # Back (fresh state, same port): the workers register again and the router follows.
    standin.start()
    wait_until(lambda: len(passing_ids(standin.url)) == 2, 10, "both workers registered again")
    wait_until(lambda: consul_get(standin.url, "/v1/health/service/tensoryard-router?passing"), 10,
               "the router registered again")
    before = {address: requests_ok(address) for address in workers}
    count, failures = send_for(router, 2.0)
    assert failures == []
    assert all(requests_ok(address) > before[address] for address in workers), "each worker served after"
