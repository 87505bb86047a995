"""The access log: one line per gRPC call (event `access`), and the per-request record behind it.

The `ErrorInterceptor` (grpc_server.py) opens a `RequestRecord` for every call and puts it in a
context variable; it knows the method, the status and the total time. Handlers fill in what only
they know, by setting fields on `current_request()`: `bind_request` the request's id, model and
version; the router's relay the replica that served it (`worker`); the worker's queue and compute
time and the token counts. The record is a plain object shared by reference, so tasks a handler
starts (a stream's per-request tasks) fill the same record. At the end of the call the interceptor
writes the line, in ECS (services/common/log_format.py):

    message "access", event.dataset "tensoryard.access", event.duration (ns), event.outcome,
    tensoryard.{grpc_method, grpc_code, request_id, model, version, worker, queue_ns, compute_ns,
    num_prompt_tokens, num_output_tokens}, and trace.id / span.id from the request's context.

Failures always get a line; successes a share `access_log_sample_rate` of them (1: all). Prompts
and outputs appear only with `log_prompts` (they may hold personal data). A ModelStreamInfer call
carrying several requests is one line, naming the last request it saw.
"""

from __future__ import annotations

import random
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import structlog

from services.common import log_format
from services.common.config import TelemetryConfig

LOGGER_NAME = "tensoryard.access"


@dataclass(slots=True)
class RequestRecord:
    grpc_method: str
    request_id: str = ""
    model: str = ""
    version: str = ""
    # At the router: the replica that served the request (the last one tried); at a worker: itself.
    worker: str = ""
    queue_ns: int | None = None
    compute_ns: int | None = None
    num_prompt_tokens: int | None = None
    num_output_tokens: int | None = None
    # Only kept when log_prompts is on.
    prompt: Any = None
    output: Any = None
    # The call's server span (tracing.py), when traces are exported; else None.
    span: Any = None
    # The trace the call belongs to (a caller's, or its span's), as bound into its log context.
    trace_id: str | None = None
    span_id: str | None = None
    # The server's role when it names one (GrpcHost(role=...)); else the process's service name.
    service: str = ""


_CURRENT: ContextVar[RequestRecord | None] = ContextVar("tensoryard_request", default=None)


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    sample_rate: float = 1.0
    log_prompts: bool = False


_settings = AccessLogSettings()


def configure_access_log(config: TelemetryConfig) -> None:
    global _settings
    _settings = AccessLogSettings(config.access_log_sample_rate, config.log_prompts)


def log_prompts() -> bool:
    """Whether handlers should keep prompts and outputs on the record (cost nothing when not)."""
    return _settings.log_prompts


def open_request(grpc_method: str, worker: str = "", service: str = "") -> RequestRecord:
    record = RequestRecord(grpc_method, worker=worker, service=service)
    _CURRENT.set(record)
    return record


def current_request() -> RequestRecord | None:
    return _CURRENT.get()


def write_access_line(record: RequestRecord, code_name: str, duration_ns: int, details: str | None) -> None:
    ok = code_name == "OK"
    rate = _settings.sample_rate
    if ok and rate < 1.0 and (rate <= 0.0 or random.random() >= rate):
        return
    event = {"dataset": "tensoryard.access", "outcome": "success" if ok else "failure", "duration": duration_ns}
    fields: dict[str, Any] = {"grpc_method": record.grpc_method, "grpc_code": code_name}
    if record.request_id:
        fields["request_id"] = record.request_id
    if record.model:
        fields["model"] = record.model
        fields["version"] = record.version
    if record.worker:
        fields["worker"] = record.worker
    for name in ("queue_ns", "compute_ns", "num_prompt_tokens", "num_output_tokens"):
        value = getattr(record, name)
        if value is not None:
            fields[name] = value
    if _settings.log_prompts:
        if record.prompt is not None:
            fields["prompt"] = record.prompt
        if record.output is not None:
            fields["output"] = record.output
    if details:
        fields["details"] = details
    writer = log_format.direct_writer()
    if writer is not None:  # JSON lines: straight to the stream (the same line, cheaper)
        writer.write("access", LOGGER_NAME, record.service, event, record.trace_id, record.span_id, fields)
        return
    # Console lines (or a level above info): through structlog, with a logger made now, so that it
    # follows the configuration in force (a module-level one caches the first it saw).
    structlog.get_logger(logger_name=LOGGER_NAME).info(
        "access", dataset=event["dataset"], outcome=event["outcome"], duration_ns=duration_ns, **fields
    )
