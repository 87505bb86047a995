"""SmolLM2, imported from its GGUF by `tensoryard up`, served through the router: Triton's LLM
conventions through tritonclient, the native streaming API, sampling controls and errors."""

from __future__ import annotations

import queue
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from protos.tensoryard.v1 import generation_pb2 as gen
from protos.tensoryard.v1 import generation_pb2_grpc as gen_grpc

LLM = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
CHAT_PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def generation(stack):
    with grpc.insecure_channel(stack.router) as channel:
        yield gen_grpc.TextGenerationStub(channel)


def chat(question: str = QUESTION, **sampling) -> gen.GenerateRequest:
    return gen.GenerateRequest(
        model_name=LLM,
        messages=gen.ChatMessages(messages=[gen.ChatMessage(role="user", content=question)]),
        sampling=gen.SamplingParameters(**sampling),
    )


def collect(stub, request, timeout_s=120) -> tuple[str, list[gen.GenerateResponse]]:
    responses = list(stub.Generate(request, timeout=timeout_s))
    return "".join(r.text for r in responses), responses


def triton_inputs(prompt: str, stream: bool) -> list[triton.InferInput]:
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    stream_flag = triton.InferInput("stream", [1], "BOOL")
    stream_flag.set_data_from_numpy(np.array([stream]))
    return [text, stream_flag]


def stream_with_tritonclient(address: str, prompt: str, parameters: dict) -> list:
    client = triton.InferenceServerClient(address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(LLM, triton_inputs(prompt, True), request_id="chat-1", parameters=parameters)
        responses = []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses
    finally:
        client.stop_stream()
        client.close()


def test_tritonclient_streaming_answers_paris(stack):
    responses = stream_with_tritonclient(stack.router, CHAT_PROMPT, {"temperature": "0", "max_tokens": 32})
    text = "".join(r.as_numpy("text_output")[0].decode() for r in responses)
    assert "Paris" in text
    assert len(responses) > 3  # streamed piece by piece, not all at once
    final = responses[-1].get_response()
    assert final.id == "chat-1"
    assert final.parameters["finish_reason"].string_param == "stop"
    assert not any(r.get_response().parameters["triton_final_response"].bool_param for r in responses[:-1])


def test_tritonclient_empty_final_response(stack):
    responses = stream_with_tritonclient(
        stack.router, CHAT_PROMPT,
        {"temperature": "0", "max_tokens": 8, "triton_enable_empty_final_response": True},
    )
    last = responses[-1].get_response()
    assert last.parameters["triton_final_response"].bool_param
    assert len(last.outputs) == 0
    assert "Paris" in "".join(r.as_numpy("text_output")[0].decode() for r in responses[:-1])


def test_tritonclient_infer_returns_the_whole_text(stack):
    with triton.InferenceServerClient(stack.router) as client:
        result = client.infer(LLM, triton_inputs(CHAT_PROMPT, False), parameters={"temperature": "0", "max_tokens": 32})
    assert "Paris" in result.as_numpy("text_output")[0].decode()
    assert result.get_response().parameters["triton_final_response"].bool_param


def test_llm_model_config_is_decoupled(stack):
    with triton.InferenceServerClient(stack.router) as client:
        config = client.get_model_config(LLM).config
        metadata = client.get_model_metadata(LLM)
    assert config.model_transaction_policy.decoupled
    assert {t.name for t in metadata.inputs} == {"text_input", "max_tokens", "stream"}
    assert [t.name for t in metadata.outputs] == ["text_output"]


def test_native_chat_answers_paris(generation):
    text, responses = collect(generation, chat(temperature=0, max_tokens=32))
    assert "Paris" in text
    last = responses[-1]
    assert last.finish_reason == "stop"
    assert last.usage.completion_tokens == sum(len(r.token_ids) for r in responses)
    assert last.usage.prompt_tokens > 10


def test_seeded_sampling_is_reproducible_across_batch_compositions(generation, stack):
    request = chat("Write one sentence about the sea.", temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
    alone, _ = collect(generation, request)
    # The same request again while other requests share the engine's batches.
    others_done = threading.Event()

    def noise():
        with grpc.insecure_channel(stack.router) as channel:
            stub = gen_grpc.TextGenerationStub(channel)
            for i in range(3):
                collect(stub, chat(f"Count to {i + 5}.", temperature=0.8, max_tokens=24))
        others_done.set()

    thread = threading.Thread(target=noise)
    thread.start()
    crowded, _ = collect(generation, request)
    thread.join(120)
    assert alone == crowded
    different_seed, _ = collect(generation, chat("Write one sentence about the sea.", temperature=1.0,
                                                 top_p=0.95, seed=99, max_tokens=24))
    assert different_seed != alone


def test_max_tokens_ends_with_length(generation):
    _, responses = collect(generation, chat(temperature=0, max_tokens=3, ignore_eos=True))
    assert responses[-1].finish_reason == "length"
    assert responses[-1].usage.completion_tokens == 3


def test_stop_string_ends_generation_before_it(generation):
    text, responses = collect(generation, chat(temperature=0, max_tokens=32, stop=["Paris"]))
    assert responses[-1].finish_reason == "stop"
    assert "Paris" not in text
    assert text.startswith("The capital of France is")


def test_multibyte_characters_are_never_split(generation):
    text, responses = collect(generation, chat("Translate to Japanese and add emoji: good morning, friends!",
                                               temperature=0.7, seed=7, max_tokens=48))
    assert all("\ufffd" not in r.text for r in responses)
    assert text.encode("utf-8").decode("utf-8") == text


@pytest.mark.parametrize(
    "sampling, fragment",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
        ({"presence_penalty": 5.0}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_sampling_parameters_are_invalid_argument(generation, sampling, fragment):
    with pytest.raises(grpc.RpcError) as error:
        collect(generation, chat(**sampling))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.value.details()


def test_prompt_longer_than_the_model_allows_is_invalid_argument(generation):
    request = gen.GenerateRequest(model_name=LLM, prompt="word " * 5000)
    with pytest.raises(grpc.RpcError) as error:
        collect(generation, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most" in error.value.details()


def test_unknown_triton_parameter_is_invalid_argument(stack):
    with triton.InferenceServerClient(stack.router) as client:
        with pytest.raises(InferenceServerException) as error:
            client.infer(LLM, triton_inputs(CHAT_PROMPT, False), parameters={"temprature": "0"})
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "temprature" in error.value.message()


def test_errors_do_not_disturb_other_sequences(generation, stack):
    """Good generations run while bad requests hit the same engine; all good ones finish right."""
    results, failures = [], []

    def good(i):
        try:
            text, responses = collect(generation, chat(temperature=0, max_tokens=32))
            results.append((text, responses[-1].finish_reason))
        except grpc.RpcError as error:
            failures.append(error)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for bad in (chat(temperature=-1.0), gen.GenerateRequest(model_name=LLM, prompt="x " * 5000), chat(top_k=-5)):
        with pytest.raises(grpc.RpcError):
            collect(generation, bad)
    for t in threads:
        t.join(120)
    assert not failures
    assert len(results) == 4 and all("Paris" in text and reason == "stop" for text, reason in results)
