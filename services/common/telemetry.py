"""Logging (structlog), and the per-process Prometheus endpoint.

Log lines are JSON in Elastic Common Schema when stderr is not a terminal (systemd, Nomad, CI,
`tensoryard up`'s log files; see log_format.py) and readable console lines when it is; stdlib
logging comes out the same way. Request handlers bind `request_id`, `model` and `version` into
structlog's context variables, and the gRPC interceptor binds the trace ids (tracing.py); each gRPC
call runs in its own asyncio task, so the binding follows that request and nothing else.
`configure_telemetry` sets up logging, the access log (access_log.py) and tracing for a process.
"""

from __future__ import annotations

import logging
import socket
import sys

import prometheus_client
import structlog

from services.common import log_format
from services.common.config import TelemetryConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_telemetry(service: str, config: TelemetryConfig, stream=None, span_exporter=None) -> None:
    """Logging, the access log and tracing for this process (`service`: registry, router, worker)."""
    from services.common.access_log import configure_access_log
    from services.common.tracing import configure_tracing

    configure_logging(service, config, stream)
    configure_access_log(config)
    configure_tracing(service, config, span_exporter)


def configure_logging(service: str, config: TelemetryConfig, stream=None) -> None:
    """Set up structlog, and stdlib logging through it, for this process; every line carries
    `service` (ECS `service.name`)."""
    stream = stream or sys.stderr
    use_json = config.log_format == "json" or (config.log_format == "auto" and not stream.isatty())
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="@timestamp" if use_json else "timestamp")
    pre_chain = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, timestamper]
    if use_json:
        render = [log_format.ecs_renderer(service)]
    else:
        render = [structlog.processors.format_exc_info, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    level = _LEVELS.get(config.log_level, logging.INFO)
    structlog.configure(
        processors=[*pre_chain, *render],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    log_format.route_stdlib(stream, pre_chain, render, level)
    log_format.set_direct_writer(log_format.DirectWriter(stream, service) if use_json and level <= logging.INFO else None)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None):
    """A structlog logger whose lines name it (`log.logger`): `get_logger(__name__)`."""
    return structlog.get_logger(logger_name=name) if name else structlog.get_logger()


def start_metrics_server(config: TelemetryConfig, host: str = "127.0.0.1") -> int | None:
    """Serve /metrics for this process; returns the port, or None when disabled."""
    if config.metrics_port < 0:
        return None
    from services.common.metrics import serve_metrics  # the text format only: see its docstring

    return serve_metrics(config.metrics_port, host)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (racy by nature; fine for loopback set-ups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Request metrics shared by every gRPC server, kept by the interceptor in grpc_server.
GRPC_REQUESTS = prometheus_client.Counter(
    "tensoryard_grpc_requests_total",
    "gRPC calls handled, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_LATENCY = prometheus_client.Histogram(
    "tensoryard_grpc_request_duration_seconds",
    "Wall time from receiving a gRPC call to its last response.",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
