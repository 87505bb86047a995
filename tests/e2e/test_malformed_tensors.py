"""Well-formed protobuf, malformed inference request: INVALID_ARGUMENT saying what to fix, from the
worker directly and through the router, on ModelInfer and in-band on ModelStreamInfer (the stream
goes on). Good requests sent alongside, in the same batch window or on the same stream, get their
right answers.

The model-independent checks (`services.common.infer_checks`) run in the worker today; the router
will run the same function before forwarding, with the same messages.
"""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.e2e.conftest import MODEL
from tests.e2e.traffic import LLM, Stream, embedding_of, good_traffic, llm_request, text_request, worker_for


def contents_and_raw(request_id=""):
    request = text_request([b"hello"], request_id=request_id)
    request.inputs[0].contents.bytes_contents.append(b"hello")
    return request


def overflowing_shape(request_id=""):
    request = text_request([b"hello"], request_id=request_id)
    request.inputs[0].shape[:] = [2**32, 2**32]
    return request


def shape_beyond_any_message(request_id=""):
    request = text_request([b"hello"], request_id=request_id)
    request.inputs[0].shape[:] = [2**20, 2**20]  # an int64 counts it; 4 TiB of length prefixes
    return request


def negative_dimension(request_id=""):
    request = text_request([b"hello"], request_id=request_id)
    request.inputs[0].shape[:] = [-1, 1]
    return request


def lying_length_prefix(request_id=""):
    request = text_request([], request_id=request_id)
    request.inputs[0].shape[:] = [1, 1]
    request.raw_input_contents[0] = struct.pack("<I", 1000) + b"short"
    return request


def duplicate_input(request_id=""):
    request = text_request([b"one"], request_id=request_id)
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(struct.pack("<I", 3) + b"two")
    return request


def unknown_input(request_id=""):
    request = text_request([b"hello"], request_id=request_id)
    request.inputs[0].name = "texts"
    return request


def unknown_datatype(request_id=""):
    request = text_request([b"hello"], request_id=request_id)
    request.inputs[0].datatype = "STRING"
    return request


def output_requested_twice(request_id=""):
    request = text_request([b"hello"], request_id=request_id)
    request.outputs.add(name="embedding")
    request.outputs.add(name="embedding")
    return request


def raw_buffer_count_mismatch(request_id=""):
    request = text_request([b"hello"], request_id=request_id)
    request.raw_input_contents.append(b"")
    return request


MALFORMED = {
    "contents and raw together": (contents_and_raw, "'text' has both contents and raw_input_contents"),
    "shape product overflows int64": (overflowing_shape, "multiply to more than an int64 holds"),
    "shape beyond any message": (shape_beyond_any_message, "more than the request"),
    "negative dimension": (negative_dimension, "has a negative dimension"),
    "lying BYTES length prefix": (lying_length_prefix, "element 0 claims 1000 bytes but only 5 remain"),
    "duplicate input": (duplicate_input, "input 'text' appears more than once"),
    "unknown input": (unknown_input, "unexpected inference input 'texts'"),
    "unknown datatype": (unknown_datatype, "unknown datatype 'STRING'"),
    "output requested twice": (output_requested_twice, "output 'embedding' is requested more than once"),
    "raw buffers do not match inputs": (raw_buffer_count_mismatch, "1 inputs but 2 raw_input_contents"),
}


@pytest.fixture(scope="module")
def targets(stack) -> dict[str, str]:
    return {"worker": worker_for(stack, MODEL), "router": stack.router, "llm_worker": worker_for(stack, LLM)}


@pytest.mark.parametrize("target", ["worker", "router"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_invalid_argument_and_batch_mates_are_answered(stack, targets, target, case):
    build, fragment = MALFORMED[case]
    address = targets[target]
    with good_traffic(address), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(build(), timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
            assert fragment in error.value.details()
    assert stack.process.poll() is None


@pytest.mark.parametrize("target", ["worker", "router"])
def test_malformed_requests_on_a_stream_are_answered_in_band_and_the_stream_goes_on(targets, target):
    address = targets[target]
    with grpc.insecure_channel(address) as channel:
        references = {
            f"good-{i}": embedding_of(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                text_request([f"good on the stream {i}".encode()]), timeout=30))
            for i in range(len(MALFORMED) + 1)
        }
        stream = Stream(channel)
        try:
            # good-0, bad, good-1, bad, ... good-N: every bad request between two good ones.
            stream.send(text_request([b"good on the stream 0"], request_id="good-0"))
            for index, (case, (build, _)) in enumerate(MALFORMED.items(), start=1):
                stream.send(build(request_id=case))
                stream.send(text_request([f"good on the stream {index}".encode()], request_id=f"good-{index}"))
            responses = {}
            for _ in range(2 * len(MALFORMED) + 1):
                response = stream.next()
                responses[response.infer_response.id] = response
        finally:
            stream.close()
    for case, (_, fragment) in MALFORMED.items():
        assert fragment in responses[case].error_message, (case, responses[case].error_message)
    for request_id, reference in references.items():
        assert responses[request_id].error_message == "", responses[request_id].error_message
        np.testing.assert_allclose(embedding_of(responses[request_id].infer_response), reference, atol=1e-4)


@pytest.mark.parametrize("target", ["llm_worker", "router"])
def test_malformed_request_on_an_llm_stream_leaves_its_neighbours_running(targets, target):
    bad = llm_request(b"Say hello.", "bad")
    bad.inputs[0].contents.bytes_contents.append(b"Say hello.")
    with grpc.insecure_channel(targets[target]) as channel:
        stream = Stream(channel, timeout_s=120)
        try:
            for message in (llm_request(b"Say hello.", "before"), bad, llm_request(b"Say goodbye.", "after")):
                stream.send(message)
            responses = {}
            for _ in range(3):
                response = stream.next()
                responses[response.infer_response.id] = response
        finally:
            stream.close()
    assert "both contents and raw_input_contents" in responses["bad"].error_message
    for request_id in ("before", "after"):
        assert responses[request_id].error_message == ""
        assert responses[request_id].infer_response.raw_output_contents[0]  # text_output came back
