"""Registry, worker and router in one process, on loopback, with their real server code: spans kept
by OpenTelemetry's in-memory exporter, JSON log lines captured. Requests go through the router
over gRPC, so the trace context really travels in metadata, router to worker.

    python -m tests.e2e.trace_scenario OUT.json

Run by tests/e2e/test_logs_and_traces.py in a process of its own: this one loads
`protos.inference`, which the test process must not (tritonclient defines the same proto package).
Writes {"worker_id", "requests": {name: request id}, "spans": [...], "logs": [...]} to OUT.json.

The model is a tiny random-weight Llama with a byte tokenizer (tests/engine/checkpoints.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.tensoryard.v1 import generation_pb2, generation_pb2_grpc
from services.common.config import RegistryConfig, RouterConfig, TelemetryConfig, WorkerConfig
from services.common.telemetry import configure_telemetry, free_port
from services.registry.client import register_folder
from services.registry.server import serve as serve_registry
from services.router.server import serve as serve_router
from services.worker.server import Worker
from services.worker.tensor_codec import encode_bytes_tensor
from tests.engine.checkpoints import byte_tokenizer, save_checkpoint

MODEL = "tiny-llm"
# A caller's trace context, as a W3C traceparent.
CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
NO_TELEMETRY = TelemetryConfig(metrics_port=-1)


def tiny_llm(folder: Path) -> Path:
    save_checkpoint(folder, "llama", seed=3, eos_token_id=None)  # no EOS: every request runs max_tokens
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


async def wait_serving(address: str, timeout_s: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{address} did not turn SERVING within {timeout_s} s")
            await asyncio.sleep(0.1)


async def send_requests(router: str) -> dict[str, str]:
    """A native Generate with the caller's traceparent, one without, and a Triton LLM request on
    ModelStreamInfer with it; returns their request ids by name."""
    sampling = generation_pb2.SamplingParameters(max_tokens=6, temperature=0.0)
    async with grpc.aio.insecure_channel(router) as channel:
        generate = generation_pb2_grpc.TextGenerationStub(channel).Generate
        for request_id, metadata in (("traced-generate", (("traceparent", TRACEPARENT),)), ("untraced-generate", ())):
            request = generation_pb2.GenerateRequest(model_name=MODEL, id=request_id, prompt="hello tracing",
                                                     sampling=sampling)
            responses = [r async for r in generate(request, metadata=metadata, timeout=60)]
            assert responses[-1].finish_reason == "length", responses[-1]
        request = pb.ModelInferRequest(model_name=MODEL, id="traced-stream-infer",
                                       parameters={"max_tokens": pb.InferParameter(int64_param=4),
                                                   "temperature": pb.InferParameter(string_param="0")})
        request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(encode_bytes_tensor([b"hello triton"]))
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter((request,)), metadata=(("traceparent", TRACEPARENT),), timeout=60)
        responses = [r async for r in call]
        assert not responses[-1].error_message, responses[-1].error_message
    return {"generate": "traced-generate", "untraced": "untraced-generate", "stream_infer": "traced-stream-infer"}


def span_record(span) -> dict:
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


async def scenario(work: Path) -> dict:
    log_path = work / "lines.jsonl"
    exporter = InMemorySpanExporter()
    with open(log_path, "w") as stream:
        configure_telemetry("tensoryard", TelemetryConfig(log_format="json"), stream, span_exporter=exporter)
        registry_port, router_port = free_port(), free_port()
        registry_address = f"127.0.0.1:{registry_port}"
        registry_stop, router_stop = asyncio.Event(), asyncio.Event()
        registry = asyncio.create_task(serve_registry(
            RegistryConfig(port=registry_port, data_dir=work / "registry", telemetry=NO_TELEMETRY), registry_stop))
        await wait_serving(registry_address)
        with grpc.insecure_channel(registry_address) as channel:
            await asyncio.to_thread(register_folder, channel, MODEL, "generation", tiny_llm(work / "model"),
                                    {"max_model_len": 128, "kv_cache_bytes": 4 << 20})
        worker = Worker(WorkerConfig(model_name=MODEL, registry_address=registry_address, cache_dir=work / "cache",
                                     num_threads=1, warmup_batches=1, telemetry=NO_TELEMETRY))
        worker_run = asyncio.create_task(worker.run())
        router = asyncio.create_task(serve_router(
            RouterConfig(port=router_port, registry_address=registry_address, models=MODEL, telemetry=NO_TELEMETRY),
            router_stop))
        try:
            await wait_serving(f"127.0.0.1:{router_port}")
            requests = await send_requests(f"127.0.0.1:{router_port}")
        finally:
            worker.stopped.set()
            await worker_run
            router_stop.set()
            await router
            registry_stop.set()
            await registry
    logs = [json.loads(line) for line in log_path.read_text().splitlines()]
    return {
        "worker_id": worker.state.worker_id,
        "requests": requests,
        "caller": {"trace_id": CALLER_TRACE_ID, "span_id": CALLER_SPAN_ID},
        "spans": [span_record(span) for span in exporter.get_finished_spans()],
        "logs": logs,
    }


def main() -> int:
    out_path = Path(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="trace-scenario-") as work:
        result = asyncio.run(scenario(Path(work)))
    out_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
