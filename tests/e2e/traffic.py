"""Good traffic to run beside bad requests, and the raw clients that send the bad ones.

`good_traffic` keeps a few threads sending good embedding requests while a test's bad ones go in;
each answer is compared with the embedding of the same text taken beforehand, so a batch-mate of
a bad request that got a wrong (or a neighbour's) answer fails the test, not just one that failed.
Requests are tritonclient's compiled Triton protos; `raw_*` clients send bytes as given.
"""

from __future__ import annotations

import contextlib
import queue
import struct
import threading

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.e2e.conftest import MODEL

LLM = "SmolLM2-135M-Instruct"
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
EMBED = "/tensoryard.v1.Embeddings/Embed"
GOOD_TEXTS = [b"good traffic goes on", b"a batch-mate of a bad request", b"still the right answer"]


def text_request(texts: list[bytes], model: str = MODEL, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts), 1])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(t)) + t for t in texts))
    return request


def llm_request(prompt: bytes, request_id: str, max_tokens: int = 4) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=LLM, id=request_id)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(prompt)) + prompt)
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    request.raw_input_contents.append(struct.pack("<i", max_tokens))
    request.parameters["temperature"].string_param = "0"
    return request


def embedding_of(reply: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(reply.raw_output_contents[0], "<f4")


def worker_for(stack, model: str) -> str:
    """The address of the stack's worker serving `model`."""
    for address in stack.worker_addresses():
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=5).ready:
                return address
    raise AssertionError(f"no worker of the stack serves {model}")


def raw_unary(channel, method: str = INFER, response=pb.ModelInferResponse):
    return channel.unary_unary(method, request_serializer=None, response_deserializer=response.FromString)


def raw_stream(channel):
    return channel.stream_stream(
        STREAM_INFER, request_serializer=None, response_deserializer=pb.ModelStreamInferResponse.FromString
    )


class Stream:
    """One ModelStreamInfer call fed by hand: `send` bytes, `next` response."""

    def __init__(self, channel, timeout_s: float = 60):
        self._requests: queue.Queue = queue.Queue()
        self._responses = raw_stream(channel)(iter(self._requests.get, None), timeout=timeout_s)

    def send(self, message: pb.ModelInferRequest | bytes) -> None:
        self._requests.put(message if isinstance(message, bytes) else message.SerializeToString())

    def next(self) -> pb.ModelStreamInferResponse:
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()


@contextlib.contextmanager
def good_traffic(address: str, num_senders: int = 3, min_requests_each: int = 6):
    """Good requests to `address` while the block runs; afterwards, each must have had its answer."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        references = {t: embedding_of(stub.ModelInfer(text_request([t]), timeout=60)) for t in GOOD_TEXTS}
    answers: list[tuple[bytes, np.ndarray]] = []
    failures: list[grpc.RpcError] = []
    stop = threading.Event()

    def send(text: bytes) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            num_sent = 0
            while not stop.is_set() or num_sent < min_requests_each:
                try:
                    answers.append((text, embedding_of(stub.ModelInfer(text_request([text]), timeout=60))))
                except grpc.RpcError as error:
                    failures.append(error)
                num_sent += 1

    senders = [threading.Thread(target=send, args=(GOOD_TEXTS[i % len(GOOD_TEXTS)],)) for i in range(num_senders)]
    for sender in senders:
        sender.start()
    try:
        yield
    finally:
        stop.set()
        for sender in senders:
            sender.join(120)
    assert not failures, [(f.code(), f.details()) for f in failures[:3]]
    assert len(answers) >= num_senders * min_requests_each
    for text, embedding in answers:
        np.testing.assert_allclose(embedding, references[text], atol=1e-4, err_msg=text.decode())
