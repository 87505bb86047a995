"""The router's `inference.GRPCInferenceService` and native routes.

Inference calls are forwarded as bytes: the handlers are registered with no (de)serializers. The
router parses each request (to refuse bytes that are not the method's message, and to read its
model, version and id, and for LLMs its prompt), checks it (services/common/infer_checks.py), admits
it (services/router/admission.py), picks a replica through the model's routing policy and sends the
same bytes on — with the prompt's token ids appended when it tokenized them — and the worker's
response bytes back. Retries and stream migration are `relay.py`'s. Server-level calls (live,
ready, metadata, repository index, statistics) are answered here.

Version first, replica second: each request's version is settled (`versions.py`: the one it
names, else the model's traffic policy's choice) before the pool picks among that version's
replicas; each response names the version that served it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import Callable

import grpc
from protos.inference import grpc_service_pb2 as pb
from protos.tensoryard.v1 import generation_pb2
from services.common import tracing
from services.common.errors import InvalidArgument, NotFound, Overloaded, TensoryardError, Unavailable, status_for
from services.common.grpc_server import REQUEST_ID_HEADER, bind_request
from services.common.request_decoding import parse_request
from services.common.infer_checks import check_infer_request
from services.common.telemetry import get_logger
from services.router import metrics, statistics
from services.router.admission import InFlightLimiter
from services.router.catalog import ModelCatalog
from services.router.cold_start import ColdStartHold
from services.router.policies import RouteRequest
from services.router.pool import Backend, BackendPool
from services.router.prompts import PromptTokenizers
from services.router.relay import NativeGenerate, Relay, RelayError, no_replica
from services.router.repository import ModelRepository
from services.router.versions import VersionRouting, generate_response_version
from services.router.triton_stream import (
    TritonGenerate,
    as_stream_response,
    stream_error,
    triton_text_input,
)

log = get_logger(__name__)

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "tensoryard"
SERVER_VERSION = "0.1.0"
SERVER_EXTENSIONS = ["model_configuration", "statistics", "model_repository", "binary_tensor_data"]
MODEL_INFER = f"/{SERVICE}/ModelInfer"
PROMPT_TOKEN_IDS_PARAMETER = "tensoryard_prompt_token_ids"

# Metadata a client sets for the server (not for the hop to the worker).
_HOP_BY_HOP = {"user-agent", "content-type", "te", "host", "content-length", "accept-encoding"}
# ... and, while the router traces, the caller's trace context: the worker gets the router's span.
_HOP_BY_HOP_TRACED = _HOP_BY_HOP | {tracing.TRACEPARENT, tracing.TRACESTATE}
_NATIVE_GENERATE = NativeGenerate()
_TRITON_GENERATE = TritonGenerate()


def _forwardable(metadata, request_id: str) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata for the worker, plus the request id the logs on both sides share and,
    while the router traces, its span's trace context."""
    trace = tracing.outgoing_metadata()
    dropped = _HOP_BY_HOP_TRACED if trace else _HOP_BY_HOP
    forwarded = tuple(
        (key, value)
        for key, value in (metadata or ())
        if not key.startswith((":", "grpc-")) and key not in dropped and key != REQUEST_ID_HEADER
    )
    return (*forwarded, (REQUEST_ID_HEADER, request_id), *trace)


class _RequestIds:
    """Ids for requests that came without one: a per-process prefix and a counter (cheaper than a
    uuid4 per request, which reads the OS's random source)."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:8]
        self._next = itertools.count()

    def new(self) -> str:
        return f"{self._prefix}{next(self._next):08x}"


_REQUEST_IDS = _RequestIds()


class RoutingServicer:
    def __init__(self, pool: BackendPool, catalog: ModelCatalog, relay: Relay, limiter: InFlightLimiter,
                 prompts: PromptTokenizers, tenant_key: str = "x-tenant-id", session_key: str = "x-session-id",
                 served_models: tuple[str, ...] = (), forwarded: metrics.ForwardedRequests | None = None,
                 rng: random.Random | None = None, hold: ColdStartHold | None = None):
        self._pool = pool
        self._hold = hold  # scale from zero: requests wait for a first replica (cold_start.py)
        self._versions = VersionRouting(catalog, pool, rng, hold)
        # Counts what this router forwarded (requests by replica and code, its own latency, Triton's).
        self._forwarded = forwarded if forwarded is not None else metrics.ForwardedRequests(enabled=False)
        self._catalog = catalog
        # The registry stub the catalog reads with also carries the repository RPCs' deployment writes.
        self._repository = ModelRepository(catalog.registry, catalog, pool)
        self._relay = relay
        self._limiter = limiter
        self._prompts = prompts
        self._tenant_key = tenant_key
        self._session_key = session_key
        self.served_models = served_models

    # -- routing ---------------------------------------------------------------------------------

    def _route(self, model_name: str, model_version: str, request_id: str, context) -> tuple[RouteRequest, tuple]:
        """Bind the request to the logs; its route and the metadata the worker gets."""
        if not model_name:
            raise InvalidArgument("the request names no model (model_name is empty)")
        request_id = request_id or _REQUEST_IDS.new()
        bind_request(request_id, model_name, model_version)
        metadata = context.invocation_metadata() or ()
        tenant = session_key = ""
        for key, value in metadata:  # one pass: the call builds the tuple anew each time
            if key == self._tenant_key:
                tenant = value if isinstance(value, str) else value.decode()
            elif key == self._session_key:
                session_key = value if isinstance(value, str) else value.decode()
        route = RouteRequest(model_name, model_version, tenant=tenant, session_key=session_key)
        return route, _forwardable(metadata, request_id)

    async def _first(self, route: RouteRequest, prompt_token_ids) -> Backend:
        candidates = self._pool.routable(route.model_name, route.model_version)
        self._refuse_if_saturated(route, candidates)
        backend = self._pool.pick(route, prompt_token_ids, candidates=candidates)
        if backend is not None:
            return backend
        if self._hold is not None and self._hold.holds(route):
            await self._hold.wait(route)
            backend = self._pool.pick(route, prompt_token_ids)
            if backend is not None:
                return backend
        await self._catalog.check(route.model_name, route.model_version)
        metrics.REJECTED.labels(route.model_name, "no_replica").inc()
        raise no_replica(route)

    def _refuse_if_saturated(self, route: RouteRequest, replicas: list[Backend]) -> None:
        """Refuse here, without a hop, what every replica's own report says it would refuse: all
        are past their queue-wait bound and the tenant holds at least its share of what is in
        flight. (A tenant below its share goes on: a replica weighs it against its fair share,
        which may leave it room.)"""
        if not replicas or not all(r.load.saturated for r in replicas):
            return
        if not self._limiter.holds_share(route.model_name, route.tenant):
            return
        metrics.REJECTED.labels(route.model_name, "saturated").inc()
        raise Overloaded(
            f"every replica of '{route.model_name}' is at capacity (each estimates a wait past what it queues); "
            f"retry later", retry_after_s=min(r.load.retry_after_s for r in replicas),
        )

    def _is_llm(self, model_name: str) -> bool:
        return self._catalog.task(model_name) == "generation"

    def _tokenizer_for(self, route: RouteRequest):
        """The prompt tokenizer, when the model's policy routes by prompt blocks and it is loaded."""
        if not self._pool.policy_for(route.model_name).needs_prompt_blocks:
            return None
        backends = self._pool.routable(route.model_name, route.model_version)
        if not backends:
            return None
        return self._prompts.get(route.model_name, min(b.model_version for b in backends))

    # -- forwarded calls -------------------------------------------------------------------------

    def forward_unary(self, method: str, message_class) -> Callable:
        counted = method.endswith(("/ModelInfer", "/Embed"))  # inferences: metadata and config calls are not

        async def handle(request_bytes: bytes, context: grpc.aio.ServicerContext) -> bytes:
            request = parse_request(message_class, request_bytes)
            prompt_token_ids = None
            if message_class is pb.ModelInferRequest:
                check_infer_request(request, len(request_bytes))
            route, metadata = self._route(*_identity(request), context)
            request_bytes = await self._versions.settle(route, request_bytes, metadata, request)
            is_llm = message_class is pb.ModelInferRequest and self._is_llm(route.model_name)
            if is_llm:
                request_bytes, prompt_token_ids = self._with_triton_prompt_ids(route, request, request_bytes)
            forwarded = (self._forwarded.track(route.model_name, route.model_version, 1 if is_llm else _num_items(request))
                         if counted else metrics.UNCOUNTED)
            try:
                with forwarded:
                    self._limiter.acquire(route.model_name, route.tenant)
                    try:
                        backend = await self._first(route, prompt_token_ids)
                        return await self._relay.unary(method, route, request_bytes, context, metadata, backend,
                                                       prompt_token_ids, forwarded)
                    finally:
                        self._limiter.release(route.model_name, route.tenant)
            except RelayError as failure:
                await failure.abort(context)

        return handle

    def generate(self) -> Callable:
        async def handle(request_bytes: bytes, context: grpc.aio.ServicerContext):
            request = parse_request(generation_pb2.GenerateRequest, request_bytes)
            route, metadata = self._route(request.model_name, request.model_version, request.id, context)
            request_bytes = await self._versions.settle(route, request_bytes, metadata)
            served_by = generate_response_version(route.model_version)
            prompt_token_ids = list(request.prompt_token_ids) or None
            tokenizer = None if prompt_token_ids else self._tokenizer_for(route)
            if tokenizer is not None:
                if request.WhichOneof("input") == "messages":
                    messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
                    prompt_token_ids = tokenizer.token_ids(messages=messages)
                else:
                    prompt_token_ids = tokenizer.token_ids(prompt=request.prompt)
                # Forwarded, so the worker does not tokenize again (a message followed by another
                # is their merge: the original bytes stay as they are).
                request_bytes += generation_pb2.GenerateRequest(prompt_token_ids=prompt_token_ids).SerializeToString()
            try:
                with (self._forwarded.track(route.model_name, route.model_version) as forwarded,
                      self._limiter.hold(route.model_name, route.tenant)):
                    backend = await self._first(route, prompt_token_ids)
                    async for response in self._relay.stream(
                        _NATIVE_GENERATE, route, request_bytes, context, metadata, backend, prompt_token_ids,
                        forwarded,
                    ):
                        yield response + served_by
            except RelayError as failure:
                await failure.abort(context)

        return handle

    def forward_stream(self) -> Callable:
        """ModelStreamInfer: each request on the caller's stream is admitted and routed on its own.

        A generation request runs on a one-request stream to its worker (so it can continue on
        another replica if that one goes away); any other model's request is a ModelInfer call.
        Responses are merged back as they come. A request that cannot be routed or fails gets an
        in-stream error (its id and the message) and the stream goes on, as Triton does; bytes that
        are not a ModelInferRequest at all end the stream with INVALID_ARGUMENT, as on a worker.
        """

        async def handle(request_iterator, context: grpc.aio.ServicerContext):
            responses: asyncio.Queue = asyncio.Queue()
            tasks: set[asyncio.Task] = set()

            async def serve(request, request_bytes: bytes) -> None:
                request_id = request.id
                try:
                    check_infer_request(request, len(request_bytes))
                    route, metadata = self._route(request.model_name, request.model_version, request.id, context)
                    request_bytes = await self._versions.settle(route, request_bytes, metadata, request)
                    num_items = 1 if self._is_llm(route.model_name) else _num_items(request)
                    with (self._forwarded.track(route.model_name, route.model_version, num_items) as forwarded,
                          self._limiter.hold(route.model_name, route.tenant)):
                        await self._serve_stream_request(route, request, request_bytes, context, metadata, responses,
                                                         forwarded)
                except (TensoryardError, RelayError) as error:
                    message = error.details if isinstance(error, RelayError) else status_for(error)[1]
                    await responses.put(stream_error(request_id, message))

            async def read() -> None:
                async for request_bytes in request_iterator:
                    try:
                        request = parse_request(pb.ModelInferRequest, request_bytes)
                    except InvalidArgument as error:
                        await responses.put(error)
                        return
                    task = asyncio.create_task(serve(request, request_bytes))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks))
                await responses.put(None)

            reader = asyncio.create_task(read())
            try:
                while (response := await responses.get()) is not None:
                    if isinstance(response, InvalidArgument):
                        raise response
                    yield response
                await reader
            finally:
                reader.cancel()
                for task in list(tasks):
                    task.cancel()

        return handle

    async def _serve_stream_request(self, route, request, request_bytes: bytes, context, metadata, responses,
                                    forwarded=None) -> None:
        if self._is_llm(route.model_name):
            request_bytes, prompt_token_ids = self._with_triton_prompt_ids(route, request, request_bytes)
            backend = await self._first(route, prompt_token_ids)
            # The worker names its version on each response with text; the empty final response
            # names none, as Triton's does (tests/conformance), so nothing is added here.
            async for response in self._relay.stream(
                _TRITON_GENERATE, route, request_bytes, context, metadata, backend, prompt_token_ids, forwarded
            ):
                await responses.put(response)
            return
        backend = await self._first(route, None)
        reply = await self._relay.unary(MODEL_INFER, route, request_bytes, context, metadata, backend,
                                        forwarded=forwarded)
        await responses.put(as_stream_response(reply))

    def _with_triton_prompt_ids(self, route: RouteRequest, request, request_bytes: bytes):
        """For an LLM request in Triton's form: the prompt's token ids (when the policy routes by
        prompt blocks), forwarded as a parameter. Returns (request bytes, token ids or None)."""
        tokenizer = self._tokenizer_for(route)
        if tokenizer is None or PROMPT_TOKEN_IDS_PARAMETER in request.parameters:
            return request_bytes, None
        prompt = triton_text_input(request)
        if prompt is None:
            return request_bytes, None  # the worker names what is wrong with the request
        token_ids = tokenizer.token_ids(prompt=prompt)
        extra = pb.ModelInferRequest(parameters={
            PROMPT_TOKEN_IDS_PARAMETER: pb.InferParameter(string_param=" ".join(map(str, token_ids))),
        })
        return request_bytes + extra.SerializeToString(), token_ids

    # -- answered here ---------------------------------------------------------------------------

    def ready(self) -> bool:
        """Discovery is followed, and every model this router serves has a routable replica."""
        return self._pool.synced.is_set() and not self.models_without_replica()

    def models_without_replica(self) -> list[str]:
        """Served models with no routable replica, but for those that scale to zero: their
        requests wait for a first replica here, which is serving them."""
        return [name for name in self.served_models if not self._pool.routable(name) and not self._holds_for(name, "")]

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request, context):
        try:
            version = await self._versions.resolve(request.name, request.version)
        except (NotFound, InvalidArgument, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=bool(self._pool.routable(request.name, version))
                                     or self._holds_for(request.name, version))

    def _holds_for(self, model_name: str, version: str) -> bool:
        return self._hold is not None and self._hold.can_hold(model_name, version)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=SERVER_EXTENSIONS
        )

    async def RepositoryIndex(self, request, context):
        return await self._repository.index(request, context)

    async def RepositoryModelLoad(self, request, context):
        return await self._repository.load(request, context)

    async def RepositoryModelUnload(self, request, context):
        return await self._repository.unload(request, context)

    async def ModelStatistics(self, request, context):
        if request.name:
            try:
                await self._catalog.check(request.name, request.version)
            except NotFound as error:
                # Triton answers INVALID_ARGUMENT here (and NOT_FOUND elsewhere); clients expect it.
                raise InvalidArgument(f"requested model '{request.name}' is not available: {error.message}") from None
        version = await self._versions.resolve(request.name, request.version)
        backends = self._pool.backends(request.name, version)
        replies = await asyncio.gather(
            *(statistics.fetch(b, request, context.time_remaining()) for b in backends)
        )
        merged = statistics.merge([s for reply in replies if reply for s in reply.model_stats])
        if request.name and not merged:
            merged = [pb.ModelStatistics(name=request.name, version=request.version)]
        return pb.ModelStatisticsResponse(model_stats=merged)


def _num_items(request) -> int:
    """Inferences in one request, as Triton counts them: a ModelInferRequest's batch (its first
    input's first dimension), an EmbedRequest's texts."""
    inputs = getattr(request, "inputs", None)
    if inputs is None:
        return len(request.texts) or 1
    return int(inputs[0].shape[0]) if inputs and inputs[0].shape else 1


def _identity(request) -> tuple[str, str, str]:
    """(model, version, request id): field names differ by message (ModelMetadataRequest and
    ModelConfigRequest say name and version, and carry no id), field numbers do not."""
    if hasattr(request, "model_name"):
        return request.model_name, request.model_version, request.id
    return request.name, request.version, ""


__all__ = ["RoutingServicer", "NotFound"]
