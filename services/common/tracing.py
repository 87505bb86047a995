"""Traces: an OpenTelemetry server span per gRPC call, W3C trace context carried in gRPC metadata.

- **Off by default.** With no OTLP endpoint (`--otlp-endpoint`, `TENSORYARD_OTLP_ENDPOINT`, or
  OpenTelemetry's own `OTEL_EXPORTER_OTLP_ENDPOINT`) no tracer provider exists and no span is
  built: a call costs a scan of its metadata for `traceparent`. A caller's trace id still reaches
  every log line of the request (`trace.id`), and the router forwards the caller's `traceparent`
  untouched, so router and worker lines share it.
- **On:** every call gets a SERVER span named `<service>/<method>` that continues the caller's
  trace (W3C `traceparent` / `tracestate`, OpenTelemetry's propagator) or starts one; its trace
  and span ids are bound into the request's log context. The router sends the worker its own
  span's `traceparent` (`outgoing_metadata`), so the worker's span is its child. The worker adds
  the engine's phases (queue, prefill, decode) as child spans after the fact, from the timings on
  the final output (`add_child_span`, monotonic clock converted to wall-clock ns), and the
  batcher's queue and compute for embedding requests. New traces are sampled at
  `trace_sample_ratio`; a caller's sampled flag is followed. Spans leave in batches (OTLP/gRPC,
  `opentelemetry-exporter-otlp-proto-grpc`).

A span exporter can be passed in instead of an endpoint (tests use the in-memory one).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from services.common.access_log import RequestRecord, current_request
from services.common.config import TelemetryConfig

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_HEX = frozenset("0123456789abcdef")


class _Tracing:
    """The process's tracer; None while traces are off."""

    tracer: Any = None
    provider: Any = None
    propagator: Any = None


_tracing = _Tracing()


def configure_tracing(service: str, config: TelemetryConfig, exporter=None) -> None:
    """Turn span export on (an OTLP endpoint in `config`, or `exporter`) or off (neither)."""
    if _tracing.provider is not None:
        _tracing.provider.shutdown()
    _tracing.tracer = _tracing.provider = _tracing.propagator = None
    if exporter is None and not config.otlp_endpoint:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"tensoryard-{service}"}),
        sampler=ParentBased(TraceIdRatioBased(config.trace_sample_ratio)),
    )
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _tracing.provider = provider
    _tracing.tracer = provider.get_tracer("tensoryard")
    _tracing.propagator = TraceContextTextMapPropagator()


def enabled() -> bool:
    return _tracing.tracer is not None


def start_server_span(record: RequestRecord, labels: tuple[str, str], traceparent: str | None,
                      tracestate: str | None) -> None:
    """At the start of a call to (service, method): its span (when on) and the trace ids in its log
    context and its record."""
    tracer = _tracing.tracer
    if tracer is None:
        trace_id = _trace_id_of(traceparent) if traceparent else None
        if trace_id is not None:
            record.trace_id = trace_id
            structlog.contextvars.bind_contextvars(trace_id=trace_id)
        return
    from opentelemetry.trace import SpanKind

    carrier = {TRACEPARENT: traceparent} if traceparent else {}
    if traceparent and tracestate:
        carrier[TRACESTATE] = tracestate
    parent = _tracing.propagator.extract(carrier) if carrier else None
    service, method = labels
    span = tracer.start_span(
        f"{service}/{method}", context=parent, kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
    )
    record.span = span
    context = span.get_span_context()
    record.trace_id, record.span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
    structlog.contextvars.bind_contextvars(trace_id=record.trace_id, span_id=record.span_id)


def end_server_span(record: RequestRecord, code, details: str | None) -> None:
    span = record.span
    if span is None:
        return
    if span.is_recording():
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("rpc.grpc.status_code", code.value[0])
        for name in ("request_id", "model", "version", "worker"):
            value = getattr(record, name)
            if value:
                span.set_attribute(f"tensoryard.{name}", value)
        if code.name != "OK":
            span.set_status(Status(StatusCode.ERROR, details or code.name))
    span.end()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The current call's trace context for a call it makes: () while traces are off (the
    caller's own traceparent, forwarded with the rest of its metadata, carries the trace on)."""
    record = current_request()
    if record is None or record.span is None:
        return ()
    context = record.span.get_span_context()
    header = f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    state = context.trace_state.to_header() if context.trace_state else ""
    return ((TRACEPARENT, header), (TRACESTATE, state)) if state else ((TRACEPARENT, header),)


def wall_clock_offset_ns() -> int:
    """What to add to a time.monotonic() reading (in ns) for the wall clock spans are stamped in."""
    return time.time_ns() - time.monotonic_ns()


def add_child_span(record: RequestRecord | None, name: str, start_monotonic_s: float, end_monotonic_s: float,
                   attributes: dict | None = None, offset_ns: int | None = None) -> None:
    """A finished child of the call's span, from times on the monotonic clock (time.monotonic).
    Spans that share boundaries should share one `offset_ns` (wall_clock_offset_ns)."""
    if record is None or record.span is None or not record.span.is_recording():
        return
    from opentelemetry.trace import set_span_in_context

    if offset_ns is None:
        offset_ns = wall_clock_offset_ns()
    span = _tracing.tracer.start_span(
        name, context=set_span_in_context(record.span), attributes=attributes,
        start_time=offset_ns + int(start_monotonic_s * 1e9),
    )
    span.end(end_time=offset_ns + int(end_monotonic_s * 1e9))


def _trace_id_of(traceparent: str | bytes) -> str | None:
    """The trace id of a W3C traceparent ("00-<32 hex>-<16 hex>-<2 hex>"), if it is one."""
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    parts = traceparent.split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or parts[0] == "ff":
        return None
    trace_id = parts[1]
    if not _HEX.issuperset(trace_id) or not _HEX.issuperset(parts[2]) or trace_id == "0" * 32:
        return None
    return trace_id
