"""The router's `inference.GRPCInferenceService` and native routes.

Inference calls are forwarded as bytes: the handlers are registered with no (de)serializers, the
router parses only `RoutingHeader` (model name, version, id) out of the request bytes and sends
the same bytes to the chosen worker; the worker's response bytes come back untouched. Server-level
calls (live, ready, metadata, repository index, statistics) are answered here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import grpc

from protos.inference import grpc_service_pb2 as pb
from protos.tensoryard.v1 import routing_pb2
from services.common.errors import InvalidArgument, NotFound, TensoryardError, Unavailable
from services.common.grpc_server import REQUEST_ID_HEADER, bind_request
from services.common.telemetry import get_logger
from services.router import statistics
from services.router.catalog import ModelCatalog
from services.router.pool import Backend, BackendPool

log = get_logger(__name__)

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "tensoryard"
SERVER_VERSION = "0.1.0"
SERVER_EXTENSIONS = ["model_configuration", "statistics", "model_repository", "binary_tensor_data"]

# Metadata a client sets for the server (not for the hop to the worker).
_HOP_BY_HOP = {"user-agent", "content-type", "te", "host", "content-length", "accept-encoding"}


def _forwardable(metadata, request_id: str) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata for the worker, plus the request id the logs on both sides share."""
    forwarded = tuple(
        (key, value)
        for key, value in (metadata or ())
        if not key.startswith((":", "grpc-")) and key not in _HOP_BY_HOP and key != REQUEST_ID_HEADER
    )
    return (*forwarded, (REQUEST_ID_HEADER, request_id))


def _request_id(header: routing_pb2.RoutingHeader) -> str:
    """The client's id, or one made here so the router's and the worker's log lines match."""
    return header.id or uuid.uuid4().hex[:16]


class RoutingServicer:
    def __init__(self, pool: BackendPool, catalog: ModelCatalog):
        self._pool = pool
        self._catalog = catalog

    # -- routing ---------------------------------------------------------------------------------

    async def _choose(self, header: routing_pb2.RoutingHeader, exclude: Backend | None = None) -> Backend:
        if not header.model_name:
            raise InvalidArgument("the request names no model (model_name is empty)")
        backend = self._pool.pick(header.model_name, header.model_version, exclude)
        if backend is not None:
            return backend
        await self._catalog.check(header.model_name, header.model_version)
        version = f" version {header.model_version}" if header.model_version else ""
        raise Unavailable(
            f"no ready replica of model '{header.model_name}'{version}; retry shortly"
        )

    def forward_unary(self, method: str) -> Callable:
        async def handle(request_bytes: bytes, context: grpc.aio.ServicerContext) -> bytes:
            backend, metadata = await self._route(request_bytes, context)
            try:
                return await self._call(backend, method, request_bytes, context, metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.UNAVAILABLE:
                    # The worker could not be reached (or is draining): it has not run the request,
                    # so one other replica may take it.
                    other = self._pool.pick(backend.model_name, backend.model_version, exclude=backend)
                    if other is not None:
                        try:
                            return await self._call(other, method, request_bytes, context, metadata)
                        except grpc.aio.AioRpcError as retry_error:
                            error = retry_error
                await context.abort(error.code(), error.details())

        return handle

    async def _call(self, backend: Backend, method: str, request_bytes: bytes, context, metadata) -> bytes:
        backend.num_outstanding += 1
        try:
            return await backend.unary(method)(
                request_bytes, timeout=context.time_remaining(), metadata=metadata
            )
        finally:
            backend.num_outstanding -= 1

    async def _route(self, request_bytes: bytes, context) -> tuple[Backend, tuple]:
        """Parse the routing header, bind it to the logs, pick a worker: (backend, metadata)."""
        header = routing_pb2.RoutingHeader.FromString(request_bytes)
        request_id = _request_id(header)
        bind_request(request_id, header.model_name, header.model_version)
        backend = await self._choose(header)
        return backend, _forwardable(context.invocation_metadata(), request_id)

    def forward_unary_stream(self, method: str) -> Callable:
        async def handle(request_bytes: bytes, context: grpc.aio.ServicerContext):
            backend, metadata = await self._route(request_bytes, context)
            call = backend.unary_stream(method)(request_bytes, timeout=context.time_remaining(), metadata=metadata)
            async for response in _relay(backend, call, context):
                yield response

        return handle

    def forward_stream(self, method: str) -> Callable:
        """ModelStreamInfer: each request on the caller's stream is routed on its own.

        Requests for one worker share one stream to it (opened at its first request); responses
        from all of them are merged back as they come. A request that cannot be routed (unknown
        model, no replica) gets an in-stream error and the stream goes on, as Triton does.
        """

        async def handle(request_iterator, context: grpc.aio.ServicerContext):
            responses: asyncio.Queue = asyncio.Queue()
            stream_id = uuid.uuid4().hex[:16]
            metadata = _forwardable(context.invocation_metadata(), stream_id)
            outgoing: dict[str, asyncio.Queue] = {}
            pumps: list[asyncio.Task] = []

            async def pump(backend: Backend, requests: asyncio.Queue) -> None:
                async def drain():
                    while (request := await requests.get()) is not None:
                        yield request

                call = backend.stream_stream(method)(drain(), timeout=context.time_remaining(), metadata=metadata)
                backend.num_outstanding += 1
                try:
                    async for response in call:
                        await responses.put(response)
                except grpc.aio.AioRpcError as error:  # the worker's stream failed: so does the caller's
                    await responses.put(error)
                finally:
                    backend.num_outstanding -= 1
                    call.cancel()

            async def read() -> None:
                async for request_bytes in request_iterator:
                    header = routing_pb2.RoutingHeader.FromString(request_bytes)
                    bind_request(header.id or stream_id, header.model_name, header.model_version)
                    try:
                        backend = await self._choose(header)
                    except TensoryardError as error:
                        await responses.put(_stream_error(header, error.message))
                        continue
                    key = backend.instance.instance_id
                    if key not in outgoing:
                        outgoing[key] = asyncio.Queue()
                        pumps.append(asyncio.create_task(pump(backend, outgoing[key])))
                    await outgoing[key].put(request_bytes)
                for requests in outgoing.values():
                    await requests.put(None)  # half-close: the caller sends nothing more
                await asyncio.gather(*pumps)
                await responses.put(None)

            reader = asyncio.create_task(read())
            try:
                while (response := await responses.get()) is not None:
                    if isinstance(response, grpc.aio.AioRpcError):
                        await context.abort(response.code(), response.details())
                    yield response
                await reader
            finally:
                reader.cancel()
                for task in pumps:
                    task.cancel()

        return handle

    # -- answered here ---------------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._pool.synced.is_set())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=bool(self._pool.backends(request.name, request.version)))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=SERVER_EXTENSIONS
        )

    async def RepositoryIndex(self, request, context):
        await self._catalog.refresh(force=True)
        models = []
        for name, versions in sorted(self._catalog.models().items()):
            for version in versions:
                ready = bool(self._pool.backends(name, str(version)))
                if request.ready and not ready:
                    continue
                models.append(
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=name,
                        version=str(version),
                        state="READY" if ready else "UNAVAILABLE",
                        reason="" if ready else "no worker serves this version",
                    )
                )
        return pb.RepositoryIndexResponse(models=models)

    async def ModelStatistics(self, request, context):
        if request.name:
            try:
                await self._catalog.check(request.name, request.version)
            except NotFound as error:
                # Triton answers INVALID_ARGUMENT here (and NOT_FOUND elsewhere); clients expect it.
                raise InvalidArgument(f"requested model '{request.name}' is not available: {error.message}") from None
        backends = self._pool.backends(request.name, request.version)
        replies = await asyncio.gather(
            *(statistics.fetch(b, request, context.time_remaining()) for b in backends)
        )
        merged = statistics.merge([s for reply in replies if reply for s in reply.model_stats])
        if request.name and not merged:
            merged = [pb.ModelStatistics(name=request.name, version=request.version)]
        return pb.ModelStatisticsResponse(model_stats=merged)


def _stream_error(header: routing_pb2.RoutingHeader, message: str) -> bytes:
    """An in-stream error for one request, as a worker (or Triton) sends it."""
    response = pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=header.id)
    )
    return response.SerializeToString()


async def _relay(backend: Backend, call, context):
    """The worker's responses, as they come; its status becomes the caller's."""
    backend.num_outstanding += 1
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as error:
        await context.abort(error.code(), error.details())
    finally:
        # A caller that hung up cancels this handler; cancelling the worker's call is what makes
        # the worker abort the sequence and free its KV blocks.
        backend.num_outstanding -= 1
        call.cancel()


def _unimplemented(reason: str) -> Callable:
    async def handle(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, reason)

    return handle


_SHM_REASON = "shared-memory tensors are not supported: send tensor data in raw_input_contents"
_UNSUPPORTED = {
    "RepositoryModelLoad": "models are loaded by starting workers (tensoryard worker --model-name ...)",
    "RepositoryModelUnload": "models are unloaded by draining their workers",
    "SystemSharedMemoryStatus": _SHM_REASON,
    "SystemSharedMemoryRegister": _SHM_REASON,
    "SystemSharedMemoryUnregister": _SHM_REASON,
    "CudaSharedMemoryStatus": _SHM_REASON,
    "CudaSharedMemoryRegister": _SHM_REASON,
    "CudaSharedMemoryUnregister": _SHM_REASON,
    "TraceSetting": "tracing settings are not supported",
    "LogSettings": "log settings are set per process at start-up",
}


def inference_handler(servicer: RoutingServicer) -> grpc.GenericRpcHandler:
    """One generic handler for the whole service: raw for forwarded calls, typed for the rest."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for name in ("ModelInfer", "ModelMetadata", "ModelConfig"):
        handlers[name] = grpc.unary_unary_rpc_method_handler(servicer.forward_unary(f"/{SERVICE}/{name}"))
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.forward_stream(f"/{SERVICE}/ModelStreamInfer")
    )
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "RepositoryIndex", "ModelStatistics"):
        method = service.methods_by_name[name]
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=_message_class(method.input_type).FromString,
            response_serializer=_message_class(method.output_type).SerializeToString,
        )
    for name, reason in _UNSUPPORTED.items():
        method = service.methods_by_name[name]
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _unimplemented(reason),
            request_deserializer=_message_class(method.input_type).FromString,
            response_serializer=_message_class(method.output_type).SerializeToString,
        )
    missing = set(service.methods_by_name) - set(handlers)
    if missing:
        raise RuntimeError(f"router handles no {sorted(missing)}")
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def native_handlers(servicer: RoutingServicer) -> list[tuple[grpc.GenericRpcHandler, str]]:
    """Forwarded native APIs, bytes in and bytes out like ModelInfer."""
    embed = grpc.unary_unary_rpc_method_handler(servicer.forward_unary("/tensoryard.v1.Embeddings/Embed"))
    generate = grpc.unary_stream_rpc_method_handler(
        servicer.forward_unary_stream("/tensoryard.v1.TextGeneration/Generate")
    )
    return [
        (grpc.method_handlers_generic_handler("tensoryard.v1.Embeddings", {"Embed": embed}), "tensoryard.v1.Embeddings"),
        (
            grpc.method_handlers_generic_handler("tensoryard.v1.TextGeneration", {"Generate": generate}),
            "tensoryard.v1.TextGeneration",
        ),
    ]


def _message_class(descriptor):
    return getattr(pb, descriptor.name)


__all__ = ["RoutingServicer", "inference_handler", "native_handlers", "NotFound"]
