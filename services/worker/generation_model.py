"""A Llama-family LLM served by the continuous-batching engine, as a decoupled Triton-style model.

Requests become jobs in `generation_jobs.py` (Triton's LLM conventions, the router's extensions).
Every Triton response carries the `triton_final_response` parameter, and
`triton_enable_empty_final_response` moves the final flag into an extra empty response, as Triton
does for decoupled models.

The engine runs on its own thread (`EngineLoop`); this module runs jobs on it and turns engine
outputs into responses. A request that goes away (client
cancel, deadline, stream closed) aborts its engine sequence, which frees its KV blocks at the
engine's next step. Each request passes admission control (`admission.py`) before it reaches the
engine, one by one on streams too.

On a router's one-request stream (metadata `x-tensoryard-router-stream: 1`), every streamed
  response carries `tensoryard_token_ids`, the tokens behind its text, so the router can resume the
  stream elsewhere if this replica goes away (it strips the parameter before the client sees it).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from protos.inference import grpc_service_pb2 as pb
from services.common.chat_template import ChatTemplate
from services.common.errors import DeadlineExceeded, Overloaded, TensoryardError, Unavailable, status_for
from services.worker.admission import AdmissionConfig, AdmissionController, WorkItem
from services.worker.engine.engine import RequestOutput
from services.worker.engine.loop import EngineLoop, EngineReport
from services.worker.generation_jobs import GenerationJob, GenerationJobs
from services.worker.llm_metrics import LLMMetrics
from services.worker.load_reports import LoadPublisher
from services.worker.request_telemetry import GenerationTelemetry
from services.worker.statistics import BACKEND, CANCELED, OTHER, REJECTED, ModelStats, StatisticsRecorder
from services.worker.tensor_codec import encode_bytes_tensor

PLATFORM = "tensoryard_llm"
TOKEN_IDS_PARAMETER = "tensoryard_token_ids"


class AsyncStream:
    """Engine outputs arrive on the dispatcher thread; this hands them to an asyncio consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_finished=None):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        # Called on the dispatcher thread with the final RequestOutput (the one with timings), even
        # when nobody reads the stream any more (a request aborted because its caller went away).
        self._on_finished = on_finished

    def put(self, item) -> None:
        if self._on_finished is not None and getattr(item, "timings", None) is not None:
            self._on_finished(item)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def put_now(self, item) -> None:
        """From the consumer's own event loop."""
        self._queue.put_nowait(item)

    async def get(self):
        return await self._queue.get()


@dataclass(frozen=True, slots=True)
class _StreamFailed:
    """Ends a ModelStreamInfer stream with this error's status."""

    error: Exception


@dataclass(frozen=True, slots=True)
class _CutOff:
    """Put in a generation's stream by cut_off(): end it now with UNAVAILABLE."""

    reason: str


class GenerationModel:
    platform = PLATFORM
    decoupled = True
    max_batch_size = 0
    reports_load = True  # the engine's reports wake the load stream
    weight_bytes = 0  # set by loading.py: the loaded weights
    kv_cache_bytes = 0  # set by loading.py: the KV cache pool
    weight_dtype = ""  # set by loading.py: "float32", "bfloat16", "int8", "int4" (models/weight_dtypes.py)
    kv_cache_dtype = ""  # set by loading.py

    def __init__(
        self,
        name: str,
        version: str,
        loop: EngineLoop,
        tokenizer,
        chat_template: ChatTemplate | None,
        sampling_defaults: dict,
        max_model_len: int,
        device: str = "cpu",
        admission: AdmissionConfig | None = None,
        publisher: LoadPublisher | None = None,
        block_size: int = 0,
    ):
        self.name = name
        self.version = version
        self.loop = loop
        self.max_model_len = max_model_len
        self.device = device
        self.jobs = GenerationJobs(name, tokenizer, chat_template, sampling_defaults, max_model_len)
        self.inputs, self.outputs = self.jobs.inputs, self.jobs.outputs
        self.recorder = StatisticsRecorder()  # ModelStatistics and nv_inference_* read it
        # The tensoryard:* families; set by the worker after warm-up (warm-up is not traffic), and
        # left None when Prometheus observation is off.
        self.metrics: LLMMetrics | None = None
        self.admission = AdmissionController(admission or AdmissionConfig())
        self.publisher = publisher or LoadPublisher()
        self.publisher.block_size = block_size
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._active: set[AsyncStream] = set()  # in-flight generations, for cut_off()
        loop.on_report(self._on_report)

    def start_serving(self, event_loop: asyncio.AbstractEventLoop) -> None:
        """From now on engine reports update admission control on this event loop."""
        self._event_loop = event_loop
        self.publisher.attach(event_loop)

    def _on_report(self, report: EngineReport) -> None:
        """On the engine's dispatcher thread, after each step and each idle heartbeat."""
        self.publisher.publish(report.kv_events.stored, report.kv_events.removed)
        metrics = self.metrics
        if metrics is not None and report.step is not None:
            metrics.observe_step(report.step)
        if self._event_loop is not None:
            try:
                self._event_loop.call_soon_threadsafe(self.admission.update, report.stats, report.num_requests_received)
            except RuntimeError:  # the event loop has closed: the process is stopping
                pass

    # -- running ---------------------------------------------------------------------------------

    async def generate(self, job: GenerationJob, timeout_s: float | None) -> AsyncIterator[RequestOutput]:
        """Engine outputs for one job; leaving early (cancel, error) aborts the engine sequence."""
        engine_request_id = uuid.uuid4().hex
        started_ns = time.monotonic_ns()
        deadline_s = time.monotonic() + timeout_s if timeout_s else None
        work = WorkItem(job.tenant, len(job.prompt_token_ids) + len(job.resume_token_ids),
                        job.params.max_tokens - len(job.resume_token_ids), job.params.ignore_eos)
        try:
            self.admission.admit(work, timeout_s, resumed=bool(job.resume_token_ids))
        except TensoryardError:
            self.recorder.record_failure(time.monotonic_ns() - started_ns, REJECTED)
            raise
        metrics = self.metrics
        on_finished = None if metrics is None else functools.partial(metrics.observe_finished, job.params.max_tokens)
        stream = AsyncStream(asyncio.get_running_loop(), on_finished)
        self.loop.submit(engine_request_id, job.prompt_token_ids, job.params, job.priority, deadline_s, stream=stream,
                         tenant=job.tenant, output_token_ids=job.resume_token_ids)
        self.admission.admitted(work, self.loop.num_submitted)
        self._active.add(stream)
        finished = False
        failure_reason = CANCELED  # unless said otherwise below: the caller went away
        telemetry = GenerationTelemetry()  # the call's access line and spans
        try:
            while True:
                item = await stream.get()
                if isinstance(item, _CutOff):  # the engine still runs it: the finally aborts it
                    failure_reason = OTHER
                    raise Unavailable(item.reason)
                if isinstance(item, TensoryardError):  # from the engine, which has dropped it
                    finished = True
                    failure_reason = REJECTED if isinstance(item, Overloaded) else BACKEND
                    raise item
                telemetry.on_output(item, job.prompt_token_ids, self.jobs.tokenizer)
                if item.finished:
                    finished = True
                    if item.finish_reason == "deadline":
                        failure_reason = OTHER
                        raise DeadlineExceeded("the request's deadline passed during generation")
                yield item
                if finished:
                    self._record_success(started_ns, item)
                    return
        except BaseException:
            self.recorder.record_failure(time.monotonic_ns() - started_ns, failure_reason)
            raise
        finally:
            self._active.discard(stream)
            if not finished:
                self.loop.abort(engine_request_id)

    def cut_off(self, reason: str) -> int:
        """Ends every generation in flight with UNAVAILABLE (a router resumes each elsewhere) and
        aborts their engine sequences; returns how many. The drain's last step."""
        streams, self._active = self._active, set()
        for stream in streams:
            stream.put_now(_CutOff(reason))
        return len(streams)

    async def complete(self, job: GenerationJob, timeout_s: float | None) -> tuple[str, RequestOutput]:
        parts, last = [], None
        async for output in self.generate(job, timeout_s):
            parts.append(output.text_delta)
            last = output
        return "".join(parts), last

    async def infer(self, request, timeout_s: float | None, tenant: str = "") -> pb.ModelInferResponse:
        job = self.jobs.from_infer_request(request, streaming_call=False, tenant=tenant)
        text, last = await self.complete(job, timeout_s)
        return self._response(request.id, text, final=True, last=last)

    async def stream_infer(self, request_iterator, timeout_s: float | None, admit=None, tenant: str = "",
                           router_stream: bool = False):
        """Serves every request of a stream concurrently; responses interleave as tokens come.

        Each request is admitted on its own (`admit(request)` raises to refuse it), so a worker that
        starts draining stops taking requests on a stream it is still serving. A refusal or a bad
        request is answered in-band and the stream goes on, as Triton does. When this replica goes
        away under a generation (drain cut-off, engine failure) the whole stream ends UNAVAILABLE.

        router_stream: the stream carries one request from a router, which resumes it elsewhere if
        it must: every failure ends the stream with its status (the router answers its caller
        in-band), and each response names the tokens behind its text.
        """
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        def in_band(request, error: Exception) -> pb.ModelStreamInferResponse:
            _, message = status_for(error)
            return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(id=request.id))

        async def serve(request) -> None:
            try:
                try:
                    if admit is not None:
                        admit(request)
                except TensoryardError as refused:
                    if router_stream:
                        raise
                    await responses.put(in_band(request, refused))
                    return
                async for response in self._stream_responses(request, timeout_s, tenant, router_stream):
                    await responses.put(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as error:  # noqa: BLE001 - every failure is answered, one way or the other
                if router_stream or isinstance(error, Unavailable):
                    await responses.put(_StreamFailed(error))
                else:
                    await responses.put(in_band(request, error))

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(serve(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
            await responses.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                if isinstance(response, _StreamFailed):
                    raise response.error
                yield response
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_responses(self, request, timeout_s: float | None, tenant: str, report_token_ids: bool):
        job = self.jobs.from_infer_request(request, streaming_call=True, tenant=tenant,
                                           report_token_ids=report_token_ids)
        if not job.stream:
            text, last = await self.complete(job, timeout_s)
            yield self._response(request.id, text, final=not job.empty_final_response, last=last)
        else:
            unsent: list[int] = []  # tokens whose text the detokenizer still holds back
            async for output in self.generate(job, timeout_s):
                final = output.finished and not job.empty_final_response
                unsent.extend(output.new_token_ids)
                if output.text_delta or output.finished and final:
                    response = self._response(request.id, output.text_delta, final=final,
                                              last=output if output.finished else None)
                    if job.report_token_ids:
                        response.parameters[TOKEN_IDS_PARAMETER].string_param = " ".join(map(str, unsent))
                    unsent = []
                    yield response
        if job.empty_final_response:
            # As Triton sends it: name, id and the flag, no version.
            yield pb.ModelInferResponse(
                model_name=self.name, id=request.id,
                parameters={"triton_final_response": pb.InferParameter(bool_param=True)},
            )

    def _response(self, request_id: str, text: str, final: bool, last: RequestOutput | None) -> pb.ModelInferResponse:
        parameters = {"triton_final_response": pb.InferParameter(bool_param=final)}
        if last is not None:
            parameters["finish_reason"] = pb.InferParameter(string_param=last.finish_reason or "")
            parameters["prompt_tokens"] = pb.InferParameter(int64_param=last.usage.num_prompt_tokens)
            parameters["completion_tokens"] = pb.InferParameter(int64_param=last.usage.num_completion_tokens)
        return pb.ModelInferResponse(
            model_name=self.name,
            model_version=self.version,
            id=request_id,
            parameters=parameters,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=[1])],
            raw_output_contents=[encode_bytes_tensor([text.encode("utf-8")])],
        )

    # -- bookkeeping -----------------------------------------------------------------------------

    def _record_success(self, started_ns: int, final: RequestOutput) -> None:
        """Queue: from the call to the engine's first step with it (the same monotonic clock);
        compute: the rest."""
        duration_ns = time.monotonic_ns() - started_ns
        scheduled_s = final.timings.first_scheduled_s if final.timings is not None else None
        queue_ns = duration_ns if scheduled_s is None else min(max(int(scheduled_s * 1e9) - started_ns, 0), duration_ns)
        self.recorder.record_request(duration_ns, queue_ns)

    def statistics(self) -> ModelStats:
        return self.recorder.snapshot()

    @property
    def queue_depth(self) -> int:
        stats = self.loop.stats()
        return stats.num_waiting if stats else 0

    def load_fields(self) -> dict:
        stats = self.loop.stats()
        if stats is None:
            return {}
        estimate = self.admission.estimate(WorkItem("", 0, 1, True))
        return {
            "num_kv_blocks_total": stats.num_total_blocks,
            "num_kv_blocks_used": stats.num_used_blocks,
            "num_kv_blocks_free": stats.num_free_blocks,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "num_queued_prompt_tokens": stats.num_queued_prompt_tokens,
            "num_context_tokens": stats.num_context_tokens,
            "num_prefix_query_tokens": stats.num_prefix_query_tokens,
            "num_prefix_hit_tokens": stats.num_prefix_hit_tokens,
            "num_generated_tokens": stats.num_generated_tokens,
            "max_num_seqs": stats.max_num_seqs,
            "estimated_queue_wait_s": estimate.queue_wait_s if estimate else 0.0,
            "queue_wait_bound_s": self.admission.queue_wait_bound_s(stats) if stats.step_cost else 0.0,
            **({"step_base_s": stats.step_cost.base_s, "step_per_seq_s": stats.step_cost.per_seq_s,
                "step_per_prefill_token_s": stats.step_cost.per_prefill_token_s} if stats.step_cost else {}),
            "num_rejected": self.admission.num_rejected,
            "last_step_unix_ms": int((time.time() - (time.monotonic() - self.loop.last_progress_s)) * 1000),
        }

    def close(self) -> None:
        self.loop.shutdown()
