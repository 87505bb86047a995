"""One way to build a tensoryard gRPC server: grpc.aio, health, reflection, error mapping.

Every service (router, registry, worker) gets `grpc.health.v1.Health` and server reflection, so
`grpcurl` and load balancers work against any of them with no proto files at hand. Domain errors
raised by handlers are turned into gRPC status codes here and nowhere else (`ErrorInterceptor`),
and so are request bytes that do not parse as the method's request message (INVALID_ARGUMENT,
services/common/request_decoding.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import access_log, errors, tracing
from services.common.admin_auth import AdminTokenInterceptor
from services.common.tls import PLAINTEXT, AdminTlsConfig, ChannelSecurity, ServingTls
from services.common.request_decoding import cancelled_for_bad_message, checked_request, tolerant_deserializer
from services.common.telemetry import GRPC_LATENCY, GRPC_REQUESTS, get_logger

log = get_logger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes, logs unexpected ones, counts and times every call, and
    gives it its telemetry: a request record (access_log.py), whose access line it writes at the
    end, and a server span or at least the caller's trace id (tracing.py).

    Request bytes that do not parse as the method's message are INVALID_ARGUMENT here too: left to
    grpc, a failing deserializer answers UNKNOWN ("Unexpected DecodeError"). Handlers registered
    with no deserializer (the router's forwarded calls take raw bytes) parse nothing here.

    `role` (router, worker, registry) names the server in its calls' log lines (`service.name`);
    `instance_id` is the access line's `worker` unless the handler names another (the router does).
    """

    def __init__(self, role: str = "", instance_id: str = "") -> None:
        # Wrapped handlers by (method, handler): wrapping anew per call cost the router a fifth of
        # its CPU per forwarded request.
        self._wrapped: dict[tuple[str, int], object] = {}
        self._identity = _Identity(role, instance_id)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        key = (handler_call_details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None or wrapped[0] is not handler:
            wrapped = self._wrapped[key] = (handler, self._wrap(handler, handler_call_details.method))
        return wrapped[1]

    def _wrap(self, handler, full_method: str):
        service, _, method = full_method.lstrip("/").partition("/")
        if service.startswith("grpc."):  # health and reflection: not worth a metric series each
            return handler
        labels = (service, method)
        identity = self._identity
        deserializer = tolerant_deserializer(handler.request_deserializer, f"{service}.{method}")
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, labels, request_streaming=False, identity=identity),
                deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, labels, request_streaming=False, identity=identity),
                deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, labels, request_streaming=True, identity=identity),
                deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, labels, request_streaming=True, identity=identity),
            deserializer,
            handler.response_serializer,
        )


@dataclass(frozen=True, slots=True)
class _Identity:
    role: str
    instance_id: str


_NO_IDENTITY = _Identity("", "")
# Bound per request; left over from another call's context, they must not show.
_REQUEST_KEYS = ("request_id", "model", "version", "trace_id", "span_id")


def _open_call(labels, context, identity: _Identity) -> access_log.RequestRecord:
    """A call's telemetry: its record, its log context (role, request id a router sent, trace ids)
    and its span. One pass over the metadata."""
    structlog.contextvars.unbind_contextvars(*_REQUEST_KEYS)
    record = access_log.open_request(labels[1], identity.instance_id, identity.role)
    if identity.role:
        structlog.contextvars.bind_contextvars(service=identity.role)
    traceparent = tracestate = None
    for key, value in context.invocation_metadata() or ():
        if key == tracing.TRACEPARENT:
            traceparent = value
        elif key == REQUEST_ID_HEADER:
            record.request_id = value
            structlog.contextvars.bind_contextvars(request_id=value)
        elif key == tracing.TRACESTATE:
            tracestate = value
    tracing.start_server_span(record, labels, traceparent, tracestate)
    return record


def _wrap_unary(behavior, labels, request_streaming: bool, identity: _Identity = _NO_IDENTITY):
    async def call(request, context):
        started = time.perf_counter()
        record = _open_call(labels, context, identity)
        code = grpc.StatusCode.OK
        requests = None
        try:
            requests = checked_request(request, request_streaming)
            return await behavior(requests, context)
        except asyncio.CancelledError:
            if not cancelled_for_bad_message(requests):
                raise
            code, message = _status_of(requests.failure)
            await context.abort(code, message)
        except Exception as error:  # noqa: BLE001 - every failure becomes a status here
            code, message = _status_of(error)
            _set_retry_pushback(context, error)
            await context.abort(code, message)
        finally:
            _observe(labels, code, context, started, record)

    return call


def _wrap_stream(behavior, labels, request_streaming: bool, identity: _Identity = _NO_IDENTITY):
    async def call(request, context):
        started = time.perf_counter()
        record = _open_call(labels, context, identity)
        code = grpc.StatusCode.OK
        requests = None
        try:
            requests = checked_request(request, request_streaming)
            stream = requests if request_streaming else None
            async with contextlib.aclosing(behavior(requests, context)) as responses:
                async for response in responses:
                    if stream is not None:
                        stream.in_handler = False
                    yield response
                    if stream is not None:
                        stream.check()
                        stream.in_handler = True
        except asyncio.CancelledError:
            if not cancelled_for_bad_message(requests):
                raise
            code, message = _status_of(requests.failure)
            await context.abort(code, message)
        except Exception as error:  # noqa: BLE001
            code, message = _status_of(error)
            _set_retry_pushback(context, error)
            await context.abort(code, message)
        finally:
            _observe(labels, code, context, started, record)

    return call


# gRPC's retry pushback: a client whose retry policy covers the status waits this many milliseconds
# before its next attempt (gRFC A6).
RETRY_PUSHBACK_HEADER = "grpc-retry-pushback-ms"


def _set_retry_pushback(context, error: Exception) -> None:
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s:
        context.set_trailing_metadata(((RETRY_PUSHBACK_HEADER, str(max(int(retry_after_s * 1000), 1))),))


def _status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, grpc.aio.AbortError):  # the handler already chose a status
        raise error
    code, message = errors.status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("request_failed", error=message, exc_info=error)
    return code, message


# Metric children by labels: `.labels(...)` takes a lock and builds a key per call.
_REQUEST_COUNTERS: dict = {}
_LATENCY_HISTOGRAMS: dict = {}


def _observe(labels, code, context, started: float, record: access_log.RequestRecord | None = None) -> None:
    if code is grpc.StatusCode.OK:
        # A handler that called context.abort itself, or a cancelled call, shows up here.
        code = context.code() or grpc.StatusCode.OK
        if isinstance(code, int):
            code = grpc.StatusCode.UNKNOWN
    duration_s = time.perf_counter() - started
    counter = _REQUEST_COUNTERS.get((labels, code))
    if counter is None:
        counter = _REQUEST_COUNTERS[(labels, code)] = GRPC_REQUESTS.labels(*labels, code.name)
    counter.inc()
    histogram = _LATENCY_HISTOGRAMS.get(labels)
    if histogram is None:
        histogram = _LATENCY_HISTOGRAMS[labels] = GRPC_LATENCY.labels(*labels)
    histogram.observe(duration_s)
    if record is None:
        return
    details = None if code is grpc.StatusCode.OK else context.details()
    access_log.write_access_line(record, code.name, int(duration_s * 1e9), details)
    tracing.end_server_span(record, code, details)


class GrpcHost:
    """A grpc.aio server with health, reflection, the error interceptor and, given an admin token,
    the admin check. `serving_tls` puts TLS (or mTLS) on the serving port (tls.py); `admin_tls`
    adds the admin mTLS port.

    Register services with `add_servicer` / `add_generic_handler`, then `start()`. Health starts
    NOT_SERVING for every service; the owner flips it with `set_serving()` once ready.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, extra_options=(), role: str = "",
                 instance_id: str = "", admin_token: str = "", admin_tls: AdminTlsConfig | None = None,
                 serving_tls: ServingTls | None = None):
        # The admin check sits inside the error interceptor, so refused calls are counted and
        # logged too; with neither a token nor admin certificate subjects (an admin TLS port, an
        # mTLS serving port) there is no check at all (admin_auth.py).
        interceptors = [ErrorInterceptor(role, instance_id)]
        self._admin_tls = admin_tls
        self._serving_tls = serving_tls
        self.admin_tls_port: int | None = None
        subjects = admin_tls.admin_subjects if admin_tls is not None else frozenset()
        if serving_tls is not None and serving_tls.mutual:
            subjects = subjects | serving_tls.admin_subjects
        if admin_token or subjects:
            interceptors.append(AdminTokenInterceptor(admin_token, admin_subjects=subjects))
        self.server = grpc.aio.server(
            interceptors=interceptors,
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
        if self._serving_tls is None:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            self.port = self.server.add_secure_port(f"{host}:{port}", self._serving_tls.server_credentials())
        if self.port == 0:
            raise errors.Unavailable(f"cannot listen on {host}:{port} (in use?)")
        if self._admin_tls is not None:
            tls_port = self._admin_tls.port
            self.admin_tls_port = self.server.add_secure_port(f"{host}:{tls_port}",
                                                              self._admin_tls.server_credentials())
            if self.admin_tls_port == 0:
                raise errors.Unavailable(f"cannot listen on {host}:{tls_port} for admin TLS (in use?)")
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


def metadata_value(context: grpc.aio.ServicerContext | None, key: str) -> str:
    """The value of one metadata key of the call ("" when absent)."""
    if context is None:
        return ""
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode()
    return ""


def bind_request(request_id: str, model: str = "", version: str = "", **extra: Any) -> None:
    """Bind the request's identity to every log line this task writes, and to its access line."""
    structlog.contextvars.bind_contextvars(request_id=request_id, model=model, version=version, **extra)
    record = access_log.current_request()
    if record is not None:
        record.request_id, record.model, record.version = request_id, model, version


def aio_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, options: Iterable = (),
                security: ChannelSecurity = PLAINTEXT) -> grpc.aio.Channel:
    """A channel to another tensoryard process: plaintext, or TLS as `security` says (tls.py)."""
    return security.aio_channel(address, [*message_size_options(max_message_bytes), *options])
