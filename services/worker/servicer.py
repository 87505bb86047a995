"""The worker's gRPC servicers: Triton protocol, native embeddings and generation, worker control.

Each method checks that the request names this worker's model and hands the request to the served
model (`EmbeddingModel` or `GenerationModel`), which validates it, runs it and encodes the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.tensoryard.v1 import (
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, status_for
from services.common.grpc_server import bind_request, metadata_value, request_id_from
from services.worker.engine.loop import CrashEngine, HangEngine
from services.worker import model_views
from services.worker.embedding_model import EmbeddingModel
from services.worker.generation_model import GenerationModel
from services.worker.state import FailRequests, WorkerState

SERVER_NAME = "tensoryard-worker"
SERVER_VERSION = "0.1.0"
SERVER_EXTENSIONS = ["model_configuration", "statistics", "binary_tensor_data"]


# Set by a router on a ModelStreamInfer call that carries one request (GenerationModel.stream_infer).
ROUTER_STREAM_HEADER = "x-tensoryard-router-stream"


def tenant_of(state: WorkerState, context) -> str:
    return metadata_value(context, state.tenant_metadata_key)


def admit(state: WorkerState, request, context, kind: type | None = None):
    """Every inference call's first steps: log under the request's id, check it names this
    worker's model (of the API's kind), refuse it while loading or draining. Returns the model."""
    bind_request(request_id_from(request.id, context), request.model_name, request.model_version)
    model = check_model(state, request.model_name, request.model_version, kind)
    state.check_accepting()
    state.fail_if_injected()
    return model


def check_model(state: WorkerState, name: str, version: str, kind: type | None = None):
    model = state.model
    if model is None or name != model.name:
        raise NotFound(f"unknown model '{name}': this worker serves '{state.model_name}'")
    if version and version != model.version:
        raise NotFound(f"model '{name}' has no version '{version}' here (serving version {model.version})")
    if kind is not None and not isinstance(model, kind):
        raise InvalidArgument(f"model '{name}' is a {model.platform} model; this API does not serve it")
    return model


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: WorkerState):
        self._state = state

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._state.serving)

    async def ModelReady(self, request, context):
        model = self._state.model
        ready = (
            self._state.serving
            and model is not None
            and request.name == model.name
            and request.version in ("", model.version)
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=SERVER_EXTENSIONS
        )

    async def ModelMetadata(self, request, context):
        return model_views.model_metadata(check_model(self._state, request.name, request.version))

    async def ModelConfig(self, request, context):
        return model_views.model_config(check_model(self._state, request.name, request.version))

    async def ModelStatistics(self, request, context):
        if not request.name and self._state.model is None:
            return pb.ModelStatisticsResponse()
        model = check_model(self._state, request.name or self._state.model_name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[model_views.model_statistics(model, model.statistics())])

    async def ModelInfer(self, request, context):
        model = admit(self._state, request, context)
        with self._state.track_request():
            if isinstance(model, GenerationModel):
                return await model.infer(request, context.time_remaining(), tenant_of(self._state, context))
            return await model.infer(request, context.time_remaining())

    async def ModelStreamInfer(self, request_iterator, context):
        model = self._state.model
        if isinstance(model, GenerationModel):
            self._state.check_accepting()

            def admit_one(request) -> None:  # every request on the stream, as it comes
                admit(self._state, request, context, GenerationModel)

            with self._state.track_request():
                stream = model.stream_infer(
                    request_iterator, context.time_remaining(), admit_one, tenant_of(self._state, context),
                    router_stream=metadata_value(context, ROUTER_STREAM_HEADER) == "1",
                )
                async with contextlib.aclosing(stream) as responses:
                    async for response in responses:
                        yield response
            return
        # Other models answer each request with exactly one response; an error travels in the
        # response so the stream stays open for the caller's next request.
        async for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self.ModelInfer(request, context))
            except Exception as error:  # noqa: BLE001 - reported in-band, as Triton does
                _, message = status_for(error)
                yield pb.ModelStreamInferResponse(
                    error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
                )


class TextGenerationServicer(generation_pb2_grpc.TextGenerationServicer):
    def __init__(self, state: WorkerState):
        self._state = state

    async def Generate(self, request, context):
        model = admit(self._state, request, context, GenerationModel)
        overrides = _sampling_overrides(request.sampling)
        routing = {
            "tenant": tenant_of(self._state, context),
            "prompt_token_ids": list(request.prompt_token_ids),
            "resume_token_ids": list(request.resume_token_ids),
        }
        if request.WhichOneof("input") == "messages":
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            job = model.jobs.from_messages(messages, overrides, request.priority, **routing)
        elif request.WhichOneof("input") == "prompt" or request.prompt_token_ids:
            job = model.jobs.from_prompt(request.prompt, overrides, request.priority, **routing)
        else:
            raise InvalidArgument("the request has no input: set prompt, messages or prompt_token_ids")
        with self._state.track_request():
            async with contextlib.aclosing(model.generate(job, context.time_remaining())) as outputs:
                async for output in outputs:
                    yield _generate_response(request.id, model.version, output)


def _sampling_overrides(sampling: generation_pb2.SamplingParameters) -> dict:
    overrides = {
        field.name: value
        for field, value in sampling.ListFields()
        if field.name not in ("stop", "stop_token_ids")
    }
    if sampling.stop:
        overrides["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        overrides["stop_token_ids"] = list(sampling.stop_token_ids)
    return overrides


def _generate_response(request_id: str, model_version: str, output) -> generation_pb2.GenerateResponse:
    response = generation_pb2.GenerateResponse(
        id=request_id,
        model_version=model_version,
        token_ids=output.new_token_ids,
        text=output.text_delta,
        finish_reason=output.finish_reason or "",
    )
    if output.finished:
        response.usage.CopyFrom(
            generation_pb2.Usage(
                prompt_tokens=output.usage.num_prompt_tokens,
                completion_tokens=output.usage.num_completion_tokens,
                cached_prompt_tokens=output.usage.num_cached_tokens,
            )
        )
    for token_logprobs in output.logprobs or ():
        response.logprobs.add(token_id=token_logprobs.token_id, logprob=token_logprobs.logprob)
    return response


class EmbeddingsServicer(embeddings_pb2_grpc.EmbeddingsServicer):
    def __init__(self, state: WorkerState):
        self._state = state

    async def Embed(self, request, context):
        model = admit(self._state, request, context, EmbeddingModel)
        job = model.job_from_texts(list(request.texts))
        with self._state.track_request():
            embeddings = await model.embed(job)
        return embeddings_pb2.EmbedResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id,
            dim=int(embeddings.shape[1]),
            embeddings=np.ascontiguousarray(embeddings, dtype="<f4").tobytes(),
        )


class WorkerControlServicer(worker_pb2_grpc.WorkerControlServicer):
    def __init__(self, state: WorkerState, drain):
        self._state = state
        self._drain = drain

    async def GetStats(self, request, context):
        return self._state.stats_proto()

    async def StreamLoad(self, request, context):
        """A report when something changed (at most every interval_ms), and a heartbeat at least
        every heartbeat_ms; KV events only to callers that asked for them."""
        interval_s = max(request.interval_ms or 50, 10) / 1000
        heartbeat_s = max(request.heartbeat_ms or 250, 50) / 1000
        publisher = self._state.publisher
        subscriber = publisher.subscribe(request.kv_events)
        try:
            while True:
                subscriber.changed.clear()
                yield worker_pb2.LoadReport(
                    stats=self._state.stats_proto(), kv_events=publisher.take_events(subscriber)
                )
                await asyncio.sleep(interval_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(subscriber.changed.wait(), max(heartbeat_s - interval_s, 0.001))
        finally:
            publisher.unsubscribe(subscriber)

    async def InjectFault(self, request, context):
        if not self._state.fault_injection:
            raise FailedPrecondition("fault injection is off: start the worker with --enable-fault-injection")
        if request.fault == worker_pb2.InjectFaultRequest.FAIL_REQUESTS:
            if not 0 <= request.fraction <= 1 or request.duration_s <= 0:
                raise InvalidArgument("FAIL_REQUESTS needs a fraction in 0-1 and a duration_s > 0")
            self._state.failing = FailRequests(request.fraction, time.monotonic() + request.duration_s)
            return worker_pb2.InjectFaultResponse()
        model = self._state.model
        if not isinstance(model, GenerationModel):
            raise FailedPrecondition("faults can be injected into LLM engines only")
        if request.fault == worker_pb2.InjectFaultRequest.HANG_ENGINE:
            model.loop.inject(HangEngine(request.duration_s))
        elif request.fault == worker_pb2.InjectFaultRequest.CRASH_ENGINE:
            model.loop.inject(CrashEngine())
        else:
            raise InvalidArgument("name a fault: HANG_ENGINE, CRASH_ENGINE or FAIL_REQUESTS")
        return worker_pb2.InjectFaultResponse()

    async def Drain(self, request, context):
        if self._state.model is None:
            raise Unavailable("the worker has no model loaded yet")
        num_finished = await self._drain(request.timeout_s or None)
        return worker_pb2.DrainResponse(num_finished=num_finished)
