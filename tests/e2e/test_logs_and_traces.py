"""One request's log lines and spans share one trace id across router and worker; the CLI exports
spans over OTLP/gRPC when given an endpoint.

tests/e2e/trace_scenario.py runs registry, worker and router in one process (their real server
code, on loopback; spans in OpenTelemetry's in-memory exporter) and sends requests through the
router: a native Generate and a Triton ModelStreamInfer LLM request with a caller's traceparent,
and a Generate without one. It runs in a process of its own because it loads `protos.inference`
(tritonclient, loaded by other tests, defines the same proto package).
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest

from tests.conftest import REPO_ROOT, cli, free_port, health_status, stop, wait_until
from tests.unit.test_ecs_logs import HEX_16, HEX_32, assert_ecs_base

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    out_path = tmp_path_factory.mktemp("trace-scenario") / "seen.json"
    result = subprocess.run([sys.executable, "-m", "tests.e2e.trace_scenario", str(out_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out_path.read_text())


def spans_of(seen: dict, trace_id: str) -> dict[str, list[dict]]:
    spans: dict[str, list[dict]] = {}
    for span in seen["spans"]:
        if span["trace_id"] == trace_id:
            spans.setdefault(span["name"], []).append(span)
    return spans


def lines_of(seen: dict, request_id: str) -> list[dict]:
    return [line for line in seen["logs"] if line.get("tensoryard", {}).get("request_id") == request_id]


def server_spans(spans: dict, name: str) -> tuple[dict, dict]:
    """(the router's span, the worker's span) of one forwarded call: the worker's is the child."""
    first, second = spans[name]
    return (first, second) if second["parent_span_id"] == first["span_id"] else (second, first)


@pytest.mark.parametrize("request_name, method, service", [
    ("generate", "Generate", "tensoryard.v1.TextGeneration"),
    ("stream_infer", "ModelStreamInfer", "inference.GRPCInferenceService"),
])
def test_a_callers_trace_runs_through_router_worker_and_engine(seen, request_name, method, service):
    caller = seen["caller"]
    spans = spans_of(seen, caller["trace_id"])
    router, worker = server_spans(spans, f"{service}/{method}")
    # The router continues the caller's trace; the worker's span is the router's child (the
    # traceparent the router sent in metadata), and the engine's phases are the worker's.
    assert router["kind"] == worker["kind"] == "SERVER"
    assert router["parent_span_id"] == caller["span_id"]
    assert worker["parent_span_id"] == router["span_id"]
    assert router["attributes"]["tensoryard.worker"] == worker["attributes"]["tensoryard.worker"] == seen["worker_id"]
    phases = [span for name in ("engine.queue", "engine.prefill", "engine.decode") for span in spans[name]
              if span["parent_span_id"] == worker["span_id"]]
    assert [span["name"] for span in phases] == ["engine.queue", "engine.prefill", "engine.decode"]
    # Built after the fact from the engine's monotonic timings, they fall in order within the
    # worker's span (1 ms of slack for the clock conversion).
    slack_ns = 1_000_000
    assert worker["start_ns"] - slack_ns <= phases[0]["start_ns"]
    for earlier, later in zip(phases, phases[1:]):
        assert earlier["start_ns"] <= earlier["end_ns"] <= later["start_ns"] + slack_ns
    assert phases[-1]["end_ns"] <= worker["end_ns"] + slack_ns
    assert router["start_ns"] <= worker["start_ns"] and worker["end_ns"] <= router["end_ns"]


@pytest.mark.parametrize("request_name", ["generate", "stream_infer"])
def test_every_log_line_of_the_request_names_its_trace_on_router_and_worker(seen, request_name):
    trace_id = seen["caller"]["trace_id"]
    lines = lines_of(seen, seen["requests"][request_name])
    access = {line["service"]["name"]: line for line in lines if line["message"] == "access"}
    assert set(access) == {"router", "worker"}
    spans = {span["span_id"] for span in seen["spans"] if span["trace_id"] == trace_id and span["kind"] == "SERVER"}
    for line in lines:
        assert_ecs_base(line)
        assert line["trace"]["id"] == trace_id, line
        assert line["span"]["id"] in spans, line  # the span of the server that wrote it
    assert access["router"]["span"]["id"] != access["worker"]["span"]["id"]
    for line in access.values():
        assert line["tensoryard"]["worker"] == seen["worker_id"]
        assert line["event"]["outcome"] == "success" and isinstance(line["event"]["duration"], int)
    worker = access["worker"]["tensoryard"]
    assert isinstance(worker["queue_ns"], int) and isinstance(worker["compute_ns"], int)
    assert worker["num_prompt_tokens"] > 0 and worker["num_output_tokens"] in (4, 6)
    assert "prompt" not in worker and "output" not in worker  # not unless log_prompts


def test_a_request_without_a_traceparent_gets_one_trace_from_the_router(seen):
    lines = lines_of(seen, seen["requests"]["untraced"])
    trace_ids = {line["trace"]["id"] for line in lines}
    assert len(trace_ids) == 1
    (trace_id,) = trace_ids
    assert HEX_32.match(trace_id) and trace_id != seen["caller"]["trace_id"]
    router, worker = server_spans(spans_of(seen, trace_id), "tensoryard.v1.TextGeneration/Generate")
    assert router["parent_span_id"] is None and worker["parent_span_id"] == router["span_id"]
    assert all(HEX_16.match(line["span"]["id"]) for line in lines)


class Collector:
    """An OTLP/gRPC trace collector on loopback that keeps what it is sent."""

    def __init__(self):
        from concurrent import futures

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.requests = []
        collector = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                collector.requests.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def spans(self) -> list[tuple[str, object]]:
        """(service.name of the resource, span) for every span received."""
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                names = [a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"]
                for scope_spans in resource_spans.scope_spans:
                    out.extend((names[0] if names else "", span) for span in scope_spans.spans)
        return out


def test_the_cli_exports_spans_over_otlp_grpc_to_the_endpoint_it_is_given(tmp_path):
    """A real `tensoryard registry` with OpenTelemetry's OTEL_EXPORTER_OTLP_ENDPOINT: the span of a
    call with a caller's traceparent reaches the collector when the process stops."""
    from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc

    collector = Collector()
    port = free_port()
    address = f"127.0.0.1:{port}"
    process = cli("registry", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--metrics-port", "-1",
                  log_path=tmp_path / "registry.log",
                  env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}"})
    try:
        wait_until(lambda: health_status(address) == 1, 60, "the registry to serve")
        with grpc.insecure_channel(address) as channel:
            registry_pb2_grpc.ModelRegistryStub(channel).ListModels(
                registry_pb2.ListModelsRequest(), timeout=10,
                metadata=(("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),))
    finally:
        assert stop(process) == 0
        collector.server.stop(0)
    spans = [(service, span) for service, span in collector.spans() if span.name.endswith("/ListModels")]
    assert len(spans) == 1, collector.spans()
    service, span = spans[0]
    assert service == "tensoryard-registry"
    assert span.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent_span_id.hex() == "b7ad6b7169203331"
    (access,) = [json.loads(line) for line in (tmp_path / "registry.log").read_text().splitlines()
                 if '"access"' in line and "ListModels" in line]
    assert access["trace"]["id"] == "0af7651916cd43dd8448eb211c80319c"
    assert access["span"]["id"] == span.span_id.hex()
