"""Bad requests get a clear error and disturb nothing: not the process, not their batch-mates.

Requests are built with tritonclient's own protobuf classes (Triton's wire format) and sent with a
plain gRPC stub, so malformed payloads a friendly client would refuse to build can be sent too.
"""

from __future__ import annotations

import struct
import threading

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.e2e.conftest import MODEL


def text_request(texts: list[bytes], model=MODEL, version="", **overrides) -> pb.ModelInferRequest:
    raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts), 1])
    request.raw_input_contents.append(raw)
    for key, value in overrides.items():
        setattr(request, key, value)
    return request


def ids_request(ids: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    request.raw_input_contents.append(ids.astype("<i8").tobytes())
    return request


def wrong_datatype():
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="text", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(np.zeros(1, "<f4").tobytes())
    return request


def wrong_shape():
    request = text_request([b"a", b"b", b"c", b"d"])
    request.inputs[0].shape[:] = [2, 2]
    return request


def byte_length_mismatch():
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4])
    request.raw_input_contents.append(b"\x00" * 24)  # 3 int64s for a shape that needs 4
    return request


def lying_length_prefix():
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(struct.pack("<I", 1000) + b"short")
    return request


def empty_batch():
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="text", datatype="BYTES", shape=[0, 1])
    request.raw_input_contents.append(b"")
    return request


def too_large_batch():
    return text_request([b"x"] * 65)


def no_inputs():
    return pb.ModelInferRequest(model_name=MODEL)


def unknown_input():
    request = text_request([b"x"])
    request.inputs[0].name = "texts"
    return request


def unknown_output():
    request = text_request([b"x"])
    request.outputs.add(name="pooled")
    return request


def invalid_utf8():
    return text_request([b"\xff\xfe not utf-8"])


def token_id_out_of_range():
    return ids_request(np.array([[101, 999_999, 102]]))


def raw_count_mismatch():
    request = text_request([b"x"])
    request.raw_input_contents.append(b"extra")
    return request


BAD_REQUESTS = {
    "wrong datatype": (wrong_datatype, grpc.StatusCode.INVALID_ARGUMENT, "datatype FP32"),
    "wrong shape": (wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "shape [2, 2]"),
    "byte length mismatch": (byte_length_mismatch, grpc.StatusCode.INVALID_ARGUMENT, "24 bytes"),
    "malformed length prefix": (lying_length_prefix, grpc.StatusCode.INVALID_ARGUMENT, "length prefix"),
    "empty batch": (empty_batch, grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    "batch over max_batch_size": (too_large_batch, grpc.StatusCode.INVALID_ARGUMENT, "at most 64"),
    "no inputs": (no_inputs, grpc.StatusCode.INVALID_ARGUMENT, "needs input"),
    "unknown input": (unknown_input, grpc.StatusCode.INVALID_ARGUMENT, "'texts'"),
    "unknown output": (unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "'pooled'"),
    "invalid utf-8": (invalid_utf8, grpc.StatusCode.INVALID_ARGUMENT, "UTF-8"),
    "token id out of range": (token_id_out_of_range, grpc.StatusCode.INVALID_ARGUMENT, "input_ids"),
    "raw buffers do not match inputs": (raw_count_mismatch, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
    "unknown model": (lambda: text_request([b"x"], model="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
    "unknown version": (lambda: text_request([b"x"], version="99"), grpc.StatusCode.NOT_FOUND, "version '99'"),
    "no model named": (lambda: text_request([b"x"], model=""), grpc.StatusCode.INVALID_ARGUMENT, "names no model"),
}


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.router) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_error(stub, case):
    build, code, fragment = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(build(), timeout=30)
    assert error.value.code() == code, error.value.details()
    assert fragment in error.value.details()


def test_good_requests_in_the_same_batch_window_still_succeed(stub, stack):
    """Good and bad requests race into the batcher together; every good one gets its answer."""
    good_results, failures = [], []
    stop = threading.Event()

    def send_good(worker_index: int):
        with grpc.insecure_channel(stack.router) as channel:
            good_stub = pb_grpc.GRPCInferenceServiceStub(channel)
            n = 0
            while not stop.is_set() or n < 5:
                try:
                    reply = good_stub.ModelInfer(text_request([f"good {worker_index} {n}".encode()]), timeout=30)
                    good_results.append(np.frombuffer(reply.raw_output_contents[0], "<f4"))
                except grpc.RpcError as error:
                    failures.append(error)
                n += 1

    senders = [threading.Thread(target=send_good, args=(i,)) for i in range(4)]
    for t in senders:
        t.start()
    for _ in range(3):
        for build, code, _ in BAD_REQUESTS.values():
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(build(), timeout=30)
            assert error.value.code() == code
    stop.set()
    for t in senders:
        t.join(60)
    assert not failures, failures[:3]
    assert len(good_results) >= 20
    assert all(r.shape == (384,) and abs(np.linalg.norm(r) - 1) < 1e-4 for r in good_results)
    # Nothing died: the same stack still serves, with the same worker.
    assert stack.process.poll() is None
    reply = stub.ModelInfer(text_request([b"still here"]), timeout=30)
    assert len(reply.raw_output_contents[0]) == 384 * 4


def test_typed_contents_are_accepted_like_raw_ones(stub):
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
    tensor.contents.bytes_contents.extend([b"typed contents", b"work too"])
    reply = stub.ModelInfer(request, timeout=30)
    assert list(reply.outputs[0].shape) == [2, 384]
