"""Limits on a generation request's own size stop at the edge with INVALID_ARGUMENT, as vLLM answers
them, while a good request alongside is served: max_tokens past the context left after the prompt,
and stop strings past the documented count and length. A refusal for load carries gRPC's retry
pushback."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from protos.tensoryard.v1 import generation_pb2_grpc as gen_grpc
from services.worker.engine.sampler import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from tests.e2e.test_generation import LLM, chat, collect

CONTEXT = 2048  # the demo model's max_model_len (services/launcher.py)


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.router) as channel:
        yield gen_grpc.TextGenerationStub(channel)


class GoodTraffic:
    """A good generation running while the bad ones are refused: it must complete as usual."""

    def __init__(self, stub):
        self.text = None
        self._thread = threading.Thread(target=lambda: setattr(self, "text", collect(
            stub, chat(temperature=0, max_tokens=24))[0]))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._thread.join(60)
        assert self.text and "Paris" in self.text


@pytest.mark.parametrize(
    "sampling, message",
    [
        ({"max_tokens": 10**9}, "max_tokens may be at most"),
        ({"max_tokens": CONTEXT}, "max_tokens may be at most"),
        ({"stop": [f"stop-{i}" for i in range(MAX_STOP_STRINGS + 1)]}, f"at most {MAX_STOP_STRINGS}"),
        ({"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, "characters"),
        ({"stop": [f"s{i}" for i in range(10_000)]}, f"at most {MAX_STOP_STRINGS}"),
    ],
    ids=["max-tokens-1e9", "max-tokens-whole-context", "too-many-stops", "stop-too-long", "ten-thousand-stops"],
)
def test_an_oversized_generation_request_is_invalid_argument_and_disturbs_nothing(stub, sampling, message):
    with GoodTraffic(stub):
        with pytest.raises(grpc.RpcError) as error:
            collect(stub, chat(temperature=0, **sampling), timeout_s=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_max_tokens_within_the_context_left_is_served(stub):
    text, responses = collect(stub, chat(temperature=0, max_tokens=CONTEXT - 64, stop=["."]))
    assert responses[-1].finish_reason == "stop"


def test_max_tokens_past_the_context_is_refused_on_the_triton_api_too(stack):
    client = triton.InferenceServerClient(stack.router)
    prompt = triton.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"Say hello."], dtype=object))
    with pytest.raises(triton.InferenceServerException) as error:
        client.infer(LLM, [prompt], parameters={"max_tokens": str(10**9)})
    assert "StatusCode.INVALID_ARGUMENT" in str(error.value.status())
    assert "max_tokens may be at most" in error.value.message()
