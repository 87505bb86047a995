"""Logging (structlog) and the per-process Prometheus endpoint.

Log lines are JSON when stderr is not a terminal (systemd, Nomad, CI) and readable console lines
when it is. Request handlers bind `request_id` and `model` into structlog's context variables;
each gRPC call runs in its own asyncio task, so the binding follows that request and nothing else.
"""

from __future__ import annotations

import logging
import socket
import sys

import prometheus_client
import structlog

from services.common.config import TelemetryConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(service: str, config: TelemetryConfig, stream=None) -> None:
    """Set up structlog for this process; every line carries `service`."""
    stream = stream or sys.stderr
    use_json = config.log_format == "json" or (config.log_format == "auto" and not stream.isatty())
    renderer = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(config.log_level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None):
    return structlog.get_logger(name)


def start_metrics_server(config: TelemetryConfig, host: str = "127.0.0.1") -> int | None:
    """Serve /metrics for this process; returns the port, or None when disabled."""
    if config.metrics_port < 0:
        return None
    port = config.metrics_port or free_port(host)
    prometheus_client.start_http_server(port, addr=host)
    return port


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
