"""One way to build a tensoryard gRPC server: grpc.aio, health, reflection, error mapping.

Every service (router, registry, worker) gets `grpc.health.v1.Health` and server reflection, so
`grpcurl` and load balancers work against any of them with no proto files at hand. Domain errors
raised by handlers are turned into gRPC status codes here and nowhere else (`ErrorInterceptor`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import errors
from services.common.telemetry import GRPC_LATENCY, GRPC_REQUESTS, get_logger

log = get_logger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes, logs unexpected ones, counts and times every call."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if service.startswith("grpc."):  # health and reflection: not worth a metric series each
            return handler
        labels = (service, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, labels),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, labels),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, labels),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, labels),
            handler.request_deserializer,
            handler.response_serializer,
        )


def _wrap_unary(behavior, labels):
    async def call(request, context):
        structlog.contextvars.unbind_contextvars("request_id", "model", "version")
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await behavior(request, context)
        except Exception as error:  # noqa: BLE001 - every failure becomes a status here
            code, message = _status_of(error)
            await context.abort(code, message)
        finally:
            _observe(labels, code, context, started)

    return call


def _wrap_stream(behavior, labels):
    async def call(request, context):
        structlog.contextvars.unbind_contextvars("request_id", "model", "version")
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as error:  # noqa: BLE001
            code, message = _status_of(error)
            await context.abort(code, message)
        finally:
            _observe(labels, code, context, started)

    return call


def _status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, grpc.aio.AbortError):  # the handler already chose a status
        raise error
    code, message = errors.status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("request_failed", error=message, exc_info=error)
    return code, message


def _observe(labels, code, context, started: float) -> None:
    if code is grpc.StatusCode.OK:
        # A handler that called context.abort itself, or a cancelled call, shows up here.
        code = context.code() or grpc.StatusCode.OK
        if isinstance(code, int):
            code = grpc.StatusCode.UNKNOWN
    duration_s = time.perf_counter() - started
    GRPC_REQUESTS.labels(*labels, code.name).inc()
    GRPC_LATENCY.labels(*labels).observe(duration_s)
    # One line per request; request_id / model / version come from the handler's bound context.
    # Successes log at debug (a busy server answers thousands a second), failures at info.
    if code is grpc.StatusCode.OK:
        log.debug("request_done", method=labels[1], code=code.name, duration_ms=round(duration_s * 1000, 3))
    else:
        log.info("request_done", method=labels[1], code=code.name, duration_ms=round(duration_s * 1000, 3),
                 details=context.details())


class GrpcHost:
    """A grpc.aio server with health, reflection and the error interceptor.

    Register services with `add_servicer` / `add_generic_handler`, then `start()`. Health starts
    NOT_SERVING for every service; the owner flips it with `set_serving()` once ready.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, extra_options=()):
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor()],
            options=[*message_size_options(max_message_bytes), *extra_options],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self.port: int | None = None

    def add_servicer(self, add_to_server, servicer, service_full_name: str) -> None:
        """`add_to_server` is the generated `add_XServicer_to_server` function."""
        add_to_server(servicer, self.server)
        self._service_names.append(service_full_name)

    def add_generic_handler(self, handler: grpc.GenericRpcHandler, service_full_name: str) -> None:
        self.server.add_generic_rpc_handlers((handler,))
        self._service_names.append(service_full_name)

    async def start(self, host: str, port: int) -> int:
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise errors.Unavailable(f"cannot listen on {host}:{port} (in use?)")
        await self.set_serving(False)
        await self.server.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM set `stop`; the owner then shuts down once, gracefully."""
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


REQUEST_ID_HEADER = "x-request-id"


def request_id_from(request_id: str, context: grpc.aio.ServicerContext | None) -> str:
    """The request's own id, else the one the router (or an upstream proxy) put in metadata."""
    if request_id or context is None:
        return request_id
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER:
            return value if isinstance(value, str) else value.decode()
    return ""


def bind_request(request_id: str, model: str = "", version: str = "", **extra: Any) -> None:
    """Bind the request's identity to every log line this task writes."""
    structlog.contextvars.bind_contextvars(request_id=request_id, model=model, version=version, **extra)


def aio_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, options: Iterable = ()):
    return grpc.aio.insecure_channel(
        address, options=[*message_size_options(max_message_bytes), *options]
    )
