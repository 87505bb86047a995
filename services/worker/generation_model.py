"""A Llama-family LLM served by the continuous-batching engine, as a decoupled Triton-style model.

Triton's LLM conventions (what its vLLM and TensorRT-LLM backends accept):
  inputs   text_input  BYTES [1]     the prompt
           max_tokens  INT32 [1]     optional (also accepted as a request parameter)
           stream      BOOL  [1]     optional: one response per engine step instead of one at the end
  output   text_output BYTES [1]     the new text (a delta when streaming)
  sampling parameters travel in the request's `parameters` map; every response carries the
  `triton_final_response` parameter, and `triton_enable_empty_final_response` moves the final flag
  into an extra empty response, as Triton does for decoupled models.

The engine runs on its own thread (`EngineLoop`); this module only turns requests into token ids
and sampling parameters, and engine outputs into responses. A request that goes away (client
cancel, deadline, stream closed) aborts its engine sequence, which frees its KV blocks at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from pathlib import Path

from protos.inference import grpc_service_pb2 as pb
from services.common.errors import DeadlineExceeded, InvalidArgument, TensoryardError, status_for
from services.worker.batch_stats import BatcherStats, DurationStat
from services.worker.chat_template import ChatTemplate
from services.worker.engine.engine import RequestOutput
from services.worker.engine.loop import EngineLoop
from services.worker.engine.sampler import SamplingParams
from services.worker.tensor_codec import TensorSpec, check_requested_outputs, decode_inputs, encode_bytes_tensor

PLATFORM = "tensoryard_llm"
DEFAULT_MAX_TOKENS = 256

# Request parameters that are not sampling parameters.
_TRANSPORT_PARAMETERS = {"stream", "priority", "timeout", "triton_enable_empty_final_response"}
# (sampling parameters may also arrive together as one JSON string, "sampling_parameters", the way
# Triton's vLLM backend takes them)
_SAMPLING_NAMES = {f.name for f in fields(SamplingParams)}
# generation_config.json keys that set sampling defaults.
_GENERATION_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")


class AsyncStream:
    """Engine outputs arrive on the dispatcher thread; this hands them to an asyncio consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self):
        return await self._queue.get()


@dataclass(frozen=True, slots=True)
class GenerationJob:
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    stream: bool = True
    empty_final_response: bool = False


@dataclass(slots=True)
class GenerationCounters:
    """Per-model request statistics, in the shape of Triton's ModelStatistics."""

    num_ok: int = 0
    ok_ns: int = 0
    num_failed: int = 0
    failed_ns: int = 0
    queue_ns: int = 0  # submit -> first output, over successful requests
    num_output_tokens: int = 0
    last_inference_ms: int = 0


class GenerationModel:
    platform = PLATFORM
    decoupled = True
    max_batch_size = 0

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
    ):
        self.name = name
        self.version = version
        self.loop = loop
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.sampling_defaults = sampling_defaults
        self.max_model_len = max_model_len
        self.device = device
        self.inputs = {
            "text_input": TensorSpec("text_input", "BYTES", (1,)),
            "max_tokens": TensorSpec("max_tokens", "INT32", (1,), optional=True),
            "stream": TensorSpec("stream", "BOOL", (1,), optional=True),
        }
        self.outputs = {"text_output": TensorSpec("text_output", "BYTES", (1,))}
        self.counters = GenerationCounters()

    # -- requests -> jobs ------------------------------------------------------------------------

    def sampling_params(self, overrides: dict) -> SamplingParams:
        unknown = set(overrides) - _SAMPLING_NAMES
        if unknown:
            raise InvalidArgument(
                f"unknown sampling parameter(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(_SAMPLING_NAMES))}"
            )
        values = {**self.sampling_defaults, **overrides}
        try:
            return SamplingParams(**values)
        except (TypeError, ValueError) as error:
            raise InvalidArgument(str(error)) from None

    def job_from_prompt(self, prompt: str, overrides: dict, priority: int = 0, stream: bool = True,
                        empty_final_response: bool = False) -> GenerationJob:
        token_ids = self.tokenizer.encode(prompt, add_special_tokens=True).ids
        return self._job(token_ids, overrides, priority, stream, empty_final_response)

    def job_from_messages(self, messages: list[dict[str, str]], overrides: dict, priority: int = 0) -> GenerationJob:
        if self.chat_template is None:
            raise InvalidArgument(f"model '{self.name}' has no chat template: send a prompt instead")
        text = self.chat_template.render(messages)
        # The template writes the special tokens itself.
        token_ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._job(token_ids, overrides, priority, True, False)

    def _job(self, token_ids, overrides, priority, stream, empty_final_response) -> GenerationJob:
        if not token_ids:
            raise InvalidArgument("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise InvalidArgument(
                f"the prompt has {len(token_ids)} tokens; model '{self.name}' takes at most "
                f"{self.max_model_len - 1} prompt tokens ({self.max_model_len} with the output)"
            )
        return GenerationJob(token_ids, self.sampling_params(overrides), priority, stream, empty_final_response)

    def job_from_infer_request(self, request, streaming_call: bool) -> GenerationJob:
        check_requested_outputs(request, self.outputs, self.name)
        arrays, _ = decode_inputs(request, self.inputs, self.name, self.max_batch_size)
        prompt = arrays["text_input"].reshape(-1)[0]
        try:
            prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
        except UnicodeDecodeError as error:
            raise InvalidArgument(f"text_input is not valid UTF-8: {error}") from None
        parameters = {key: _parameter_value(value) for key, value in request.parameters.items()}
        stream = bool(arrays["stream"].reshape(-1)[0]) if "stream" in arrays else bool(parameters.get("stream", False))
        if stream and not streaming_call:
            raise InvalidArgument("stream=true needs ModelStreamInfer; ModelInfer returns the whole text")
        overrides = {}
        if isinstance(parameters.get("sampling_parameters"), str):  # Triton vLLM backend style
            overrides.update(_json("sampling_parameters", parameters["sampling_parameters"], dict))
        for key, value in parameters.items():
            if key not in _TRANSPORT_PARAMETERS and key != "sampling_parameters":
                overrides[key] = _coerce(key, value)
        if "max_tokens" in arrays:
            overrides["max_tokens"] = int(arrays["max_tokens"].reshape(-1)[0])
        return self.job_from_prompt(
            prompt,
            overrides,
            priority=int(parameters.get("priority", 0)),
            stream=stream,
            empty_final_response=bool(parameters.get("triton_enable_empty_final_response", False)),
        )

    # -- running ---------------------------------------------------------------------------------

    async def generate(self, job: GenerationJob, timeout_s: float | None) -> AsyncIterator[RequestOutput]:
        """Engine outputs for one job; leaving early (cancel, error) aborts the engine sequence."""
        engine_request_id = uuid.uuid4().hex
        started_ns = time.monotonic_ns()
        deadline_s = time.monotonic() + timeout_s if timeout_s else None
        stream = AsyncStream(asyncio.get_running_loop())
        self.loop.submit(engine_request_id, job.prompt_token_ids, job.params, job.priority, deadline_s, stream=stream)
        finished = False
        first_output_ns = None
        try:
            while True:
                item = await stream.get()
                if isinstance(item, TensoryardError):
                    finished = True
                    raise item
                first_output_ns = first_output_ns or time.monotonic_ns()
                if item.finished:
                    finished = True
                    if item.finish_reason == "deadline":
                        raise DeadlineExceeded("the request's deadline passed during generation")
                yield item
                if finished:
                    self._count_ok(started_ns, first_output_ns, item.usage.num_completion_tokens)
                    return
        except BaseException:
            self._count_failed(started_ns)
            raise
        finally:
            if not finished:
                self.loop.abort(engine_request_id)

    async def complete(self, job: GenerationJob, timeout_s: float | None) -> tuple[str, RequestOutput]:
        parts, last = [], None
        async for output in self.generate(job, timeout_s):
            parts.append(output.text_delta)
            last = output
        return "".join(parts), last

    async def infer(self, request, timeout_s: float | None) -> pb.ModelInferResponse:
        job = self.job_from_infer_request(request, streaming_call=False)
        text, last = await self.complete(job, timeout_s)
        return self._response(request.id, text, final=True, last=last)

    async def stream_infer(self, request_iterator, timeout_s: float | None):
        """Serves every request of a stream concurrently; responses interleave as tokens come."""
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def serve(request) -> None:
            try:
                async for response in self._stream_responses(request, timeout_s):
                    await responses.put(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as error:  # noqa: BLE001 - reported in-band; the stream stays open
                _, message = status_for(error)
                await responses.put(pb.ModelStreamInferResponse(
                    error_message=message, infer_response=pb.ModelInferResponse(id=request.id)))

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
                yield response
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_responses(self, request, timeout_s: float | None):
        job = self.job_from_infer_request(request, streaming_call=True)
        if not job.stream:
            text, last = await self.complete(job, timeout_s)
            yield self._response(request.id, text, final=not job.empty_final_response, last=last)
        else:
            async for output in self.generate(job, timeout_s):
                final = output.finished and not job.empty_final_response
                if output.text_delta or output.finished and final:
                    yield self._response(request.id, output.text_delta, final=final, last=output if output.finished else None)
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

    def _count_ok(self, started_ns: int, first_output_ns: int | None, num_tokens: int) -> None:
        now_ns = time.monotonic_ns()
        c = self.counters
        c.num_ok += 1
        c.ok_ns += now_ns - started_ns
        c.queue_ns += (first_output_ns or now_ns) - started_ns
        c.num_output_tokens += num_tokens
        c.last_inference_ms = int(time.time() * 1000)

    def _count_failed(self, started_ns: int) -> None:
        self.counters.num_failed += 1
        self.counters.failed_ns += time.monotonic_ns() - started_ns

    def statistics(self) -> BatcherStats:
        c = self.counters
        return BatcherStats(
            success=DurationStat(c.num_ok, c.ok_ns),
            fail=DurationStat(c.num_failed, c.failed_ns),
            queue=DurationStat(c.num_ok, c.queue_ns),
            compute_infer=DurationStat(c.num_ok, c.ok_ns - c.queue_ns),
            inference_count=c.num_ok,
            execution_count=c.num_ok,
            last_inference_ms=c.last_inference_ms,
            batch_stats=(),
        )

    @property
    def queue_depth(self) -> int:
        stats = self.loop.stats()
        return stats.num_waiting if stats else 0

    def load_fields(self) -> dict:
        stats = self.loop.stats()
        if stats is None:
            return {}
        return {
            "num_kv_blocks_total": stats.num_total_blocks,
            "num_kv_blocks_used": stats.num_used_blocks,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
        }

    def close(self) -> None:
        self.loop.shutdown()


def _parameter_value(parameter: pb.InferParameter):
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


_FLOAT_PARAMETERS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
_INT_PARAMETERS = {"max_tokens", "top_k", "seed", "logprobs"}


def _coerce(name: str, value):
    """Request parameters carry bool, int or string only (tritonclient sends no floats):
    numbers may come as strings, lists as JSON strings."""
    try:
        if name in _FLOAT_PARAMETERS:
            return float(value)
        if name in _INT_PARAMETERS and isinstance(value, str):
            return int(value)
        if name == "ignore_eos" and isinstance(value, str):
            return value.lower() in ("1", "true", "yes")
    except ValueError:
        raise InvalidArgument(f"parameter {name}: {value!r} is not a number") from None
    if name == "stop" and isinstance(value, str):
        return _json(name, value, list) if value.startswith("[") else [value]
    if name == "stop_token_ids" and isinstance(value, str):
        return _json(name, value, list)
    return value


def _json(name: str, value: str, kind: type):
    """A parameter given as a JSON string: a list (stop, stop_token_ids) or an object."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"parameter {name}: not valid JSON: {error}") from None
    if not isinstance(parsed, kind):
        raise InvalidArgument(f"parameter {name} must be a JSON {'list' if kind is list else 'object'}")
    return parsed


def sampling_defaults_from(folder: Path) -> dict:
    """Defaults from generation_config.json, in SamplingParams' names."""
    defaults: dict = {"max_tokens": DEFAULT_MAX_TOKENS}
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return defaults
    config = json.loads(path.read_text())
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    for key in _GENERATION_DEFAULTS:
        if key in config and config[key] is not None:
            defaults["max_tokens" if key == "max_new_tokens" else key] = config[key]
    return defaults
