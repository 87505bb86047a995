"""Traces through a real GrpcHost: a caller's traceparent is continued, a call without one starts a
trace, the trace and span ids reach the call's log lines and its access line, the trace context a
call would send on is its own span's, child spans built after the fact hang under it, failures end
the span with an error; with export off no span exists but the caller's trace id still reaches the
logs, and an unsampled caller is followed.

The server runs on its own event loop in a thread (as in test_error_interceptor.py); handlers take
raw bytes, so no proto is involved.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.common import tracing
from services.common.access_log import current_request
from services.common.config import TelemetryConfig
from services.common.errors import InvalidArgument
from services.common.grpc_server import GrpcHost, bind_request
from services.common.telemetry import configure_telemetry
from tests.conftest import wait_until
from tests.unit.test_ecs_logs import HEX_16, HEX_32, Capture, assert_ecs_base, reset_telemetry

SERVICE = "test.Traced"
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


async def handle(request_bytes: bytes, context) -> bytes:
    """Binds a request, logs, adds a child span of 10 ms it timed itself, and answers with the
    trace context it would send on (what the router forwards to a worker)."""
    began_s = time.monotonic()
    bind_request(request_bytes.decode(), "m", "1")
    structlog.get_logger(logger_name="test.handler").info("handled")
    await asyncio.sleep(0.01)
    tracing.add_child_span(current_request(), "engine.queue", began_s, time.monotonic(), {"phase": "queue"})
    return json.dumps(dict(tracing.outgoing_metadata())).encode()


async def fail(request_bytes: bytes, context) -> bytes:
    bind_request(request_bytes.decode(), "m", "1")
    raise InvalidArgument("not like that")


@pytest.fixture(scope="module")
def channel():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        host = GrpcHost(role="worker", instance_id="w-7")
        host.add_generic_handler(grpc.method_handlers_generic_handler(SERVICE, {
            "Handle": grpc.unary_unary_rpc_method_handler(handle),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        }), SERVICE)
        return host, await host.start("127.0.0.1", 0)

    host, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    asyncio.run_coroutine_threadsafe(host.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def telemetry():
    """JSON logs captured; spans in memory once `start(export=True)`."""
    capture = Capture()
    capture.exporter = InMemorySpanExporter()

    def start(export: bool) -> None:
        configure_telemetry("test", TelemetryConfig(log_format="json"), capture.stream,
                            span_exporter=capture.exporter if export else None)

    capture.start = start
    yield capture
    tracing.configure_tracing("test", TelemetryConfig())
    reset_telemetry()


def call(channel, method: str, request_id: str, traceparent: str | None = None):
    metadata = (("traceparent", traceparent),) if traceparent else ()
    return channel.unary_unary(f"/{SERVICE}/{method}")(request_id.encode(), metadata=metadata, timeout=10)


def lines_of(telemetry: Capture, request_id: str) -> list[dict]:
    return [line for line in telemetry.lines() if line.get("tensoryard", {}).get("request_id") == request_id]


def test_a_callers_traceparent_is_continued(channel, telemetry):
    telemetry.start(export=True)
    sent_on = json.loads(call(channel, "Handle", "r-1", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"))
    spans = {span.name: span for span in telemetry.exporter.get_finished_spans()}
    server, child = spans[f"{SERVICE}/Handle"], spans["engine.queue"]
    assert server.kind is SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == CALLER_TRACE_ID
    assert f"{server.parent.span_id:016x}" == CALLER_SPAN_ID and server.parent.is_remote
    assert server.attributes["rpc.system"] == "grpc" and server.attributes["rpc.method"] == "Handle"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["tensoryard.request_id"] == "r-1"
    assert server.attributes["tensoryard.worker"] == "w-7"
    # The child hangs under the server span, within its time.
    assert child.parent.span_id == server.context.span_id and child.context.trace_id == server.context.trace_id
    assert server.start_time - 2_000_000 <= child.start_time < child.end_time <= server.end_time + 2_000_000
    assert child.end_time - child.start_time >= 9_000_000
    # What a router sends on: the caller's trace, this call's span as the parent.
    server_span_id = f"{server.context.span_id:016x}"
    assert sent_on == {"traceparent": f"00-{CALLER_TRACE_ID}-{server_span_id}-01"}
    # Every line of the request names the trace and the server span.
    lines = lines_of(telemetry, "r-1")
    assert [line["message"] for line in lines] == ["handled", "access"]
    for line in lines:
        assert_ecs_base(line)
        assert line["trace"]["id"] == CALLER_TRACE_ID and line["span"]["id"] == server_span_id
        assert line["service"]["name"] == "worker"  # the host's role


def test_a_call_without_traceparent_starts_a_trace(channel, telemetry):
    telemetry.start(export=True)
    sent_on = json.loads(call(channel, "Handle", "r-2"))
    (server,) = [s for s in telemetry.exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert server.parent is None
    trace_id = f"{server.context.trace_id:032x}"
    assert HEX_32.match(trace_id) and trace_id != CALLER_TRACE_ID
    assert sent_on["traceparent"].split("-")[1] == trace_id
    for line in lines_of(telemetry, "r-2"):
        assert line["trace"]["id"] == trace_id and HEX_16.match(line["span"]["id"])


def test_a_failed_call_ends_its_span_with_an_error(channel, telemetry):
    telemetry.start(export=True)
    with pytest.raises(grpc.RpcError) as error:
        call(channel, "Fail", "r-3", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01")
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # The status goes out from inside context.abort; the span ends just after, on the server's loop.
    (server,) = wait_until(telemetry.exporter.get_finished_spans, 5, "the failed call's span")
    assert server.status.status_code is StatusCode.ERROR
    assert server.status.description == "not like that"
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    (access,) = [line for line in lines_of(telemetry, "r-3") if line["message"] == "access"]
    assert access["event"]["outcome"] == "failure"
    assert access["tensoryard"]["grpc_code"] == "INVALID_ARGUMENT"
    assert access["tensoryard"]["details"] == "not like that"
    assert access["trace"]["id"] == CALLER_TRACE_ID


def test_with_export_off_no_span_exists_but_the_callers_trace_id_reaches_the_logs(channel, telemetry):
    telemetry.start(export=False)
    sent_on = json.loads(call(channel, "Handle", "r-4", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"))
    assert telemetry.exporter.get_finished_spans() == ()
    assert sent_on == {}  # the router forwards the caller's own traceparent instead
    lines = lines_of(telemetry, "r-4")
    assert [line["message"] for line in lines] == ["handled", "access"]
    for line in lines:
        assert line["trace"]["id"] == CALLER_TRACE_ID and "span" not in line


@pytest.mark.parametrize("traceparent", ["garbage", f"00-{'0' * 32}-{CALLER_SPAN_ID}-01",
                                         f"00-{CALLER_TRACE_ID[:-1]}-{CALLER_SPAN_ID}-01",
                                         f"ff-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"])
def test_with_export_off_a_malformed_traceparent_names_no_trace(channel, telemetry, traceparent):
    telemetry.start(export=False)
    call(channel, "Handle", "r-5", traceparent)
    for line in lines_of(telemetry, "r-5"):
        assert "trace" not in line


def test_an_unsampled_caller_is_followed_and_still_traced_in_the_logs(channel, telemetry):
    telemetry.start(export=True)
    sent_on = json.loads(call(channel, "Handle", "r-6", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-00"))
    assert telemetry.exporter.get_finished_spans() == ()  # not sampled: not exported
    assert sent_on["traceparent"].startswith(f"00-{CALLER_TRACE_ID}-") and sent_on["traceparent"].endswith("-00")
    for line in lines_of(telemetry, "r-6"):
        assert line["trace"]["id"] == CALLER_TRACE_ID
