"""What a worker adds to a call's record and trace: a generation's engine timings become queue and
compute time, token counts and the engine.queue / prefill / decode child spans, at their times; an
embedding's batch becomes attributes of the call's span; prompts and outputs only with log_prompts."""

from __future__ import annotations

import time

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import access_log, tracing
from services.common.config import TelemetryConfig
from services.worker.engine.engine import RequestOutput, RequestTimings, Usage
from services.worker.request_telemetry import GenerationTelemetry, observe_batch
from tests.engine.checkpoints import byte_tokenizer


@pytest.fixture
def exporter():
    exporter = InMemorySpanExporter()
    tracing.configure_tracing("worker", TelemetryConfig(), exporter)
    yield exporter
    tracing.configure_tracing("worker", TelemetryConfig())
    access_log.configure_access_log(TelemetryConfig())


def open_traced_call() -> access_log.RequestRecord:
    record = access_log.open_request("Generate", worker="w-1")
    tracing.start_server_span(record, ("tensoryard.v1.TextGeneration", "Generate"), None, None)
    return record


def outputs(arrival_s: float) -> list[RequestOutput]:
    usage = Usage(num_prompt_tokens=5, num_completion_tokens=2, num_cached_tokens=1)
    timings = RequestTimings(arrival_s=arrival_s, first_scheduled_s=arrival_s + 0.002, first_token_s=arrival_s + 0.010,
                             finished_s=arrival_s + 0.030, num_preemptions=0)
    return [RequestOutput("e", [104], "h", None, usage),
            RequestOutput("e", [105], "i", "length", usage, timings=timings)]


def test_a_generations_timings_fill_the_record_and_become_the_engine_phases(exporter):
    record = open_traced_call()
    arrival_s = time.monotonic()
    telemetry = GenerationTelemetry()
    for output in outputs(arrival_s):
        telemetry.on_output(output, [104, 101], byte_tokenizer())
    assert record.queue_ns == pytest.approx(2_000_000, abs=1_000)
    assert record.compute_ns == pytest.approx(28_000_000, abs=1_000)
    assert (record.num_prompt_tokens, record.num_output_tokens) == (5, 2)
    assert record.prompt is None and record.output is None  # log_prompts is off
    tracing.end_server_span(record, grpc.StatusCode.OK, None)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    server = spans["tensoryard.v1.TextGeneration/Generate"]
    queue, prefill, decode = spans["engine.queue"], spans["engine.prefill"], spans["engine.decode"]
    for phase in (queue, prefill, decode):
        assert phase.parent.span_id == server.context.span_id
    assert queue.end_time == prefill.start_time and prefill.end_time == decode.start_time
    assert prefill.end_time - prefill.start_time == pytest.approx(8_000_000, abs=1_000)
    assert decode.end_time - decode.start_time == pytest.approx(20_000_000, abs=1_000)
    # On the wall clock: the arrival was (about) now.
    assert abs(queue.start_time - time.time_ns()) < 1_000_000_000
    assert decode.attributes["tensoryard.finish_reason"] == "length"
    assert prefill.attributes["tensoryard.num_cached_tokens"] == 1


def test_prompts_and_outputs_are_kept_only_when_they_may_be_logged(exporter):
    access_log.configure_access_log(TelemetryConfig(log_prompts=True))
    record = open_traced_call()
    telemetry = GenerationTelemetry()
    for output in outputs(time.monotonic()):
        telemetry.on_output(output, [104, 101], byte_tokenizer())
    assert (record.prompt, record.output) == ("he", "hi")


def test_an_embedding_batch_is_described_on_the_calls_span(exporter):
    record = open_traced_call()
    queued_s = time.monotonic()
    observe_batch(queued_s, queued_s + 0.001, queued_s + 0.005, 3, ["a", "b", "c"])
    assert record.queue_ns == pytest.approx(1_000_000, abs=1_000)
    assert record.compute_ns == pytest.approx(4_000_000, abs=1_000)
    assert record.prompt is None
    assert exporter.get_finished_spans() == ()  # no child spans: attributes of the call's own
    attributes = record.span.attributes
    assert attributes["tensoryard.batcher.queue_ms"] == pytest.approx(1.0, abs=1e-3)
    assert attributes["tensoryard.batcher.compute_ms"] == pytest.approx(4.0, abs=1e-3)
    assert attributes["tensoryard.batcher.num_items"] == 3


def test_without_a_call_there_is_nothing_to_fill():
    access_log._CURRENT.set(None)
    telemetry = GenerationTelemetry()
    for output in outputs(time.monotonic()):
        telemetry.on_output(output, [104], None)  # no record: no effect, no error
    observe_batch(0.0, 0.1, 0.2, 1)
