"""Bytes that are not the method's message, and messages over the size limit, stop at the edge:
INVALID_ARGUMENT naming the expected message, or RESOURCE_EXHAUSTED; good requests sent alongside,
and the earlier requests of the same stream, get their right answers; every process keeps serving.

Each case runs against a worker directly and through the router. The router forwards inference
calls as bytes and parses only their routing header today: bytes whose header does not parse
(`GARBAGE`) need the router to parse the full request; bytes whose header parses but whose body
does not (`CORRUPT_BODY`) are refused by the worker and the router relays its status.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from protos.tensoryard.v1 import embeddings_pb2
from tests.e2e.conftest import MODEL, cli, free_port, stop, wait_until
from tests.e2e.traffic import (
    EMBED,
    LLM,
    Stream,
    embedding_of,
    good_traffic,
    llm_request,
    raw_unary,
    text_request,
    worker_for,
)

GARBAGE = b"\xff" * 16  # no protobuf message parses from this, not even a routing header


def with_header(model: str, body: bytes) -> bytes:
    """`body` after a well-formed model_name (field 1): what the router's header parse accepts."""
    name = model.encode()
    return b"\x0a" + bytes([len(name)]) + name + body


# Field 5 (inputs) claiming 16 bytes of an InferInputTensor, holding 3: parses as a routing
# header (unknown fields are skipped whole), not as a ModelInferRequest.
CORRUPT_BODY = with_header(MODEL, b"\x2a\x05\x0a\x10abc")
# Field 4 (texts) of an EmbedRequest holding bytes that are not UTF-8.
CORRUPT_EMBED = with_header(MODEL, b"\x22\x02\xff\xfe")
OVER_64_MIB = 64 * 1024 * 1024 + 1024


@pytest.fixture(scope="module")
def targets(stack) -> dict[str, str]:
    return {"worker": worker_for(stack, MODEL), "router": stack.router, "llm_worker": worker_for(stack, LLM)}


def call_status(call, *args, timeout_s: float = 30) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, timeout=timeout_s)
    return error.value


def assert_invalid(error: grpc.RpcError, message_type: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details().startswith(f"the request is not a valid {message_type}: "), error.details()


def assert_still_serving(stack, address: str) -> None:
    assert stack.process.poll() is None, "tensoryard up (and so one of its children) exited"
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(text_request([b"still here"]), timeout=30)
    assert embedding_of(reply).shape == (384,)


# -- unary ModelInfer and native Embed -----------------------------------------------------------

@pytest.mark.parametrize("target", ["worker", "router"])
@pytest.mark.parametrize("body", [GARBAGE, CORRUPT_BODY], ids=["garbage", "corrupt-body"])
def test_model_infer_bytes_that_are_not_a_request_are_invalid_argument(stack, targets, target, body):
    address = targets[target]
    with good_traffic(address), grpc.insecure_channel(address) as channel:
        for _ in range(5):
            assert_invalid(call_status(raw_unary(channel), body), "inference.ModelInferRequest")
    assert_still_serving(stack, address)


@pytest.mark.parametrize("target", ["worker", "router"])
@pytest.mark.parametrize("body", [GARBAGE, CORRUPT_EMBED], ids=["garbage", "bad-utf8-text"])
def test_embed_bytes_that_are_not_a_request_are_invalid_argument(stack, targets, target, body):
    address = targets[target]
    good = embeddings_pb2.EmbedRequest(model_name=MODEL, texts=["native and good"]).SerializeToString()
    with good_traffic(address), grpc.insecure_channel(address) as channel:
        embed = raw_unary(channel, EMBED, embeddings_pb2.EmbedResponse)
        for _ in range(5):
            assert_invalid(call_status(embed, body), "tensoryard.v1.EmbedRequest")
            assert embed(good, timeout=30).dim == 384
    assert_still_serving(stack, address)


# -- a message on ModelStreamInfer ---------------------------------------------------------------

@pytest.mark.parametrize("target", ["worker", "router"])
@pytest.mark.parametrize("body", [GARBAGE, CORRUPT_BODY], ids=["garbage", "corrupt-body"])
def test_bad_message_ends_the_stream_after_its_earlier_answers(stack, targets, target, body):
    """Earlier requests on the stream are answered; the bad message ends this stream only: a
    second stream open beside it goes on."""
    address = targets[target]
    with good_traffic(address), grpc.insecure_channel(address) as channel:
        bystander, stream = Stream(channel), Stream(channel, timeout_s=20)
        try:
            bystander.send(text_request([b"before"], request_id="b1"))
            stream.send(text_request([b"first on the stream"], request_id="s1"))
            first = stream.next()
            assert (first.error_message, first.infer_response.id) == ("", "s1")
            stream.send(body)
            with pytest.raises(grpc.RpcError) as error:
                stream.next()
            assert_invalid(error.value, "inference.ModelInferRequest")
            bystander.send(text_request([b"after"], request_id="b2"))
            answers = [bystander.next(), bystander.next()]
            assert [(a.error_message, a.infer_response.id) for a in answers] == [("", "b1"), ("", "b2")]
        finally:
            stream.close()
            bystander.close()
    assert_still_serving(stack, address)


@pytest.mark.parametrize("target", ["llm_worker", "router"])
@pytest.mark.parametrize("body", [GARBAGE, with_header(LLM, b"\x2a\x05\x0a\x10abc")], ids=["garbage", "corrupt-body"])
def test_bad_message_ends_an_llm_stream_and_the_llm_keeps_serving(stack, targets, target, body):
    """The LLM serves a stream's requests concurrently, reading them from a task of its own."""
    address = targets[target]
    with grpc.insecure_channel(address) as channel:
        stream = Stream(channel, timeout_s=30)
        try:
            stream.send(llm_request(b"Say hello.", "first"))
            first = stream.next()
            assert (first.error_message, first.infer_response.id) == ("", "first")
            stream.send(body)
            with pytest.raises(grpc.RpcError) as error:
                stream.next()
            assert_invalid(error.value, "inference.ModelInferRequest")
        finally:
            stream.close()
        after = Stream(channel)
        try:
            after.send(llm_request(b"Say hello again.", "after"))
            reply = after.next()
            assert (reply.error_message, reply.infer_response.id) == ("", "after")
        finally:
            after.close()


# -- maximum message size ------------------------------------------------------------------------

def oversized_request(num_bytes: int) -> pb.ModelInferRequest:
    request = text_request([b"x"])
    request.raw_input_contents[0] = b"\x00" * num_bytes
    return request


@pytest.mark.parametrize("target", ["worker", "router"])
def test_request_over_the_64_mib_default_is_resource_exhausted(stack, targets, target):
    address = targets[target]
    body = oversized_request(OVER_64_MIB).SerializeToString()
    with good_traffic(address), grpc.insecure_channel(address) as channel:
        error = call_status(raw_unary(channel), body, timeout_s=60)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "larger than max" in error.details()
    assert_still_serving(stack, address)


@pytest.fixture(scope="module")
def small_limit_router(stack, tmp_path_factory):
    """A second router on the stack's registry, taking messages up to 64 KiB."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("small-router") / "router.log"
    process = cli(
        "router", "--port", str(port), "--registry", stack.registry, "--metrics-port", "-1",
        log_path=log_path, env={"TENSORYARD_MAX_MESSAGE_BYTES": str(64 * 1024)},
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or _model_ready(address), 60, "the small-limit router")
        assert process.poll() is None, log_path.read_text()
        yield address
    finally:
        stop(process)


@pytest.fixture(scope="module")
def small_limit_worker(tmp_path_factory):
    """A worker started with --max-message-bytes 65536 that never finishes loading: its registry
    answers no call. The limit is the gRPC server's and holds from the first moment it listens."""
    registry = SilentRegistry()
    port = free_port()
    home = tmp_path_factory.mktemp("small-worker")
    process = cli(
        "worker", "--model-name", MODEL, "--registry", registry.address, "--port", str(port),
        "--cache-dir", str(home / "cache"), "--metrics-port", "-1", "--max-message-bytes", "65536",
        log_path=home / "worker.log",
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or _answers(address), 60, "the small-limit worker to listen")
        assert process.poll() is None, (home / "worker.log").read_text()
        yield address
    finally:
        stop(process)
        registry.close()


def test_router_refuses_a_request_over_its_configured_limit(stack, small_limit_router):
    with good_traffic(small_limit_router), grpc.insecure_channel(small_limit_router) as channel:
        error = call_status(raw_unary(channel), oversized_request(65 * 1024).SerializeToString())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        # Under the limit, the same router serves.
        reply = raw_unary(channel)(text_request([b"under the limit"]).SerializeToString(), timeout=30)
    assert embedding_of(reply).shape == (384,)
    assert stack.process.poll() is None


def test_worker_flag_sets_its_limit(small_limit_worker):
    with grpc.insecure_channel(small_limit_worker) as channel:
        error = call_status(raw_unary(channel), oversized_request(65 * 1024).SerializeToString())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        # Under the limit, the request reaches the worker (which has no model yet).
        error = call_status(raw_unary(channel), oversized_request(60 * 1024).SerializeToString())
        assert error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()


def _model_ready(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=1).ready
        except grpc.RpcError:
            return False


def _answers(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False


class SilentRegistry:
    """A gRPC server whose ModelRegistry calls never return (until closed)."""

    def __init__(self):
        self._released = threading.Event()
        self._server = grpc.server(futures.ThreadPoolExecutor(4))

        def never(request, context):
            self._released.wait()
            context.abort(grpc.StatusCode.UNAVAILABLE, "closed")

        handler = grpc.method_handlers_generic_handler(
            "tensoryard.v1.ModelRegistry", {"GetVersion": grpc.unary_unary_rpc_method_handler(never)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        port = free_port()
        self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()
        self.address = f"127.0.0.1:{port}"

    def close(self) -> None:
        self._released.set()
        self._server.stop(0)

