"""Generation requests as jobs for the engine: prompt token ids and checked sampling parameters.

Triton's LLM conventions (what its vLLM and TensorRT-LLM backends accept):
  inputs   text_input  BYTES [1]     the prompt
           max_tokens  INT32 [1]     optional (also accepted as a request parameter)
           stream      BOOL  [1]     optional: one response per engine step instead of one at the end
  output   text_output BYTES [1]     the new text (a delta when streaming)
  sampling parameters travel in the request's `parameters` map (numbers may be strings, since
  tritonclient sends no floats; or all at once as the JSON string `sampling_parameters`, the way
  Triton's vLLM backend takes them); unknown names are INVALID_ARGUMENT.

Router extensions (Triton parameters a router adds; plain Triton clients never need them):
  tensoryard_prompt_token_ids   the prompt already tokenized by the router ("1 2 3"), used instead
                                of tokenizing text_input again
  tensoryard_resume_token_ids   output tokens another replica already streamed: continue after them
The native API carries the same in GenerateRequest fields 8 and 9.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from protos.inference import grpc_service_pb2 as pb
from services.common.chat_template import ChatTemplate
from services.common.errors import InvalidArgument
from services.common.prompting import prompt_token_ids
from services.worker.engine.sampler import SamplingParams
from services.worker.tensor_codec import TensorSpec, check_requested_outputs, decode_inputs

DEFAULT_MAX_TOKENS = 256
PROMPT_TOKEN_IDS_PARAMETER = "tensoryard_prompt_token_ids"
RESUME_TOKEN_IDS_PARAMETER = "tensoryard_resume_token_ids"
# Request parameters that are not sampling parameters.
_TRANSPORT_PARAMETERS = {
    "stream", "priority", "timeout", "triton_enable_empty_final_response",
    PROMPT_TOKEN_IDS_PARAMETER, RESUME_TOKEN_IDS_PARAMETER,
}
_SAMPLING_NAMES = {f.name for f in fields(SamplingParams)}
# generation_config.json keys that set sampling defaults.
_GENERATION_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")

INPUTS = {
    "text_input": TensorSpec("text_input", "BYTES", (1,)),
    "max_tokens": TensorSpec("max_tokens", "INT32", (1,), optional=True),
    "stream": TensorSpec("stream", "BOOL", (1,), optional=True),
}
OUTPUTS = {"text_output": TensorSpec("text_output", "BYTES", (1,))}


@dataclass(frozen=True, slots=True)
class GenerationJob:
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    stream: bool = True
    empty_final_response: bool = False
    tenant: str = ""
    resume_token_ids: tuple[int, ...] = ()  # streamed by another replica already
    report_token_ids: bool = False  # streamed responses name their tokens (for a router)


class GenerationJobs:
    """Builds checked jobs for one served model (its tokenizer, template, defaults and context)."""

    inputs = INPUTS
    outputs = OUTPUTS

    def __init__(self, name: str, tokenizer, chat_template: ChatTemplate | None, sampling_defaults: dict,
                 max_model_len: int):
        self.name = name
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.sampling_defaults = sampling_defaults
        self.max_model_len = max_model_len

    def sampling_params(self, overrides: dict, num_prompt_tokens: int = 0) -> SamplingParams:
        """Overrides on top of the model's defaults. An explicit max_tokens past the context left after
        the prompt is refused (as vLLM does); the default one is cut to fit."""
        unknown = set(overrides) - _SAMPLING_NAMES
        if unknown:
            raise InvalidArgument(
                f"unknown sampling parameter(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(_SAMPLING_NAMES))}"
            )
        values = {**self.sampling_defaults, **overrides}
        context_left = self.max_model_len - num_prompt_tokens
        max_tokens = values.get("max_tokens")
        if num_prompt_tokens and isinstance(max_tokens, int) and max_tokens > context_left:
            if "max_tokens" in overrides:
                raise InvalidArgument(
                    f"model '{self.name}' has a context of {self.max_model_len} tokens and the prompt takes "
                    f"{num_prompt_tokens}: max_tokens may be at most {context_left}, not {max_tokens}"
                )
            values["max_tokens"] = context_left
        try:
            return SamplingParams(**values)
        except (TypeError, ValueError) as error:
            raise InvalidArgument(str(error)) from None

    def from_prompt(self, prompt: str, overrides: dict, priority: int = 0, stream: bool = True,
                        empty_final_response: bool = False, **routing) -> GenerationJob:
        token_ids = routing.pop("prompt_token_ids", None) or prompt_token_ids(
            self.tokenizer, self.chat_template, self.name, prompt=prompt
        )
        return self._job(token_ids, overrides, priority, stream, empty_final_response, **routing)

    def from_messages(self, messages: list[dict[str, str]], overrides: dict, priority: int = 0,
                          **routing) -> GenerationJob:
        token_ids = routing.pop("prompt_token_ids", None) or prompt_token_ids(
            self.tokenizer, self.chat_template, self.name, messages=messages
        )
        return self._job(token_ids, overrides, priority, True, False, **routing)

    def _job(self, token_ids, overrides, priority, stream, empty_final_response, tenant: str = "",
             resume_token_ids=(), report_token_ids: bool = False) -> GenerationJob:
        if not token_ids:
            raise InvalidArgument("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise InvalidArgument(
                f"the prompt has {len(token_ids)} tokens; model '{self.name}' takes at most "
                f"{self.max_model_len - 1} prompt tokens ({self.max_model_len} with the output)"
            )
        vocab_size = self.tokenizer.get_vocab_size()
        for name, ids in (("prompt_token_ids", token_ids), ("resume_token_ids", resume_token_ids)):
            if any(not 0 <= t < vocab_size for t in ids):
                raise InvalidArgument(f"{name} must be token ids in [0, {vocab_size})")
        params = self.sampling_params(overrides, len(token_ids))
        if len(resume_token_ids) >= params.max_tokens:
            raise InvalidArgument(f"{len(resume_token_ids)} tokens to resume from, but max_tokens is {params.max_tokens}")
        return GenerationJob(list(token_ids), params, priority, stream, empty_final_response, tenant,
                             tuple(resume_token_ids), report_token_ids)

    def from_infer_request(self, request, streaming_call: bool, tenant: str = "",
                               report_token_ids: bool = False) -> GenerationJob:
        check_requested_outputs(request, self.outputs, self.name)
        arrays, _ = decode_inputs(request, self.inputs, self.name, max_batch_size=0)
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
        return self.from_prompt(
            prompt,
            overrides,
            priority=_int_parameter(parameters, "priority"),
            stream=stream,
            empty_final_response=bool(parameters.get("triton_enable_empty_final_response", False)),
            tenant=tenant,
            prompt_token_ids=_token_ids_parameter(parameters, PROMPT_TOKEN_IDS_PARAMETER),
            resume_token_ids=_token_ids_parameter(parameters, RESUME_TOKEN_IDS_PARAMETER),
            report_token_ids=report_token_ids and stream,
        )


def _int_parameter(parameters: dict, name: str) -> int:
    value = parameters.get(name, 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"parameter {name}: {value!r} is not an integer") from None


def _token_ids_parameter(parameters: dict, name: str) -> list[int]:
    """Token ids a router sends as a string parameter: "1 2 3"."""
    value = parameters.get(name)
    if value is None:
        return []
    try:
        return [int(t) for t in str(value).split()]
    except ValueError:
        raise InvalidArgument(f"parameter {name} must be token ids separated by spaces") from None


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
