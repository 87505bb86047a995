"""The router's gRPC method table: which calls are forwarded as bytes, which it answers itself,
and which it refuses (with the reason)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from protos.inference import grpc_service_pb2 as pb
from protos.tensoryard.v1 import embeddings_pb2
from services.router.servicer import SERVICE, RoutingServicer


def _unimplemented(reason: str) -> Callable:
    async def handle(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, reason)

    return handle


_SHM_REASON = "shared-memory tensors are not supported: send tensor data in raw_input_contents"
_UNSUPPORTED = {
    "SystemSharedMemoryStatus": _SHM_REASON,
    "SystemSharedMemoryRegister": _SHM_REASON,
    "SystemSharedMemoryUnregister": _SHM_REASON,
    "CudaSharedMemoryStatus": _SHM_REASON,
    "CudaSharedMemoryRegister": _SHM_REASON,
    "CudaSharedMemoryUnregister": _SHM_REASON,
    "TraceSetting": "tracing settings are not supported",
    "LogSettings": "log settings are set per process at start-up",
}
_FORWARDED = {
    "ModelInfer": pb.ModelInferRequest,
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelConfig": pb.ModelConfigRequest,
}


def inference_handler(servicer: RoutingServicer) -> grpc.GenericRpcHandler:
    """One generic handler for the whole service: raw for forwarded calls, typed for the rest."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for name, message_class in _FORWARDED.items():
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            servicer.forward_unary(f"/{SERVICE}/{name}", message_class)
        )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(servicer.forward_stream())
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "RepositoryIndex", "ModelStatistics",
                 "RepositoryModelLoad", "RepositoryModelUnload"):
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
    embed = grpc.unary_unary_rpc_method_handler(
        servicer.forward_unary("/tensoryard.v1.Embeddings/Embed", embeddings_pb2.EmbedRequest)
    )
    generate = grpc.unary_stream_rpc_method_handler(servicer.generate())
    return [
        (grpc.method_handlers_generic_handler("tensoryard.v1.Embeddings", {"Embed": embed}), "tensoryard.v1.Embeddings"),
        (
            grpc.method_handlers_generic_handler("tensoryard.v1.TextGeneration", {"Generate": generate}),
            "tensoryard.v1.TextGeneration",
        ),
    ]


def _message_class(descriptor):
    return getattr(pb, descriptor.name)
