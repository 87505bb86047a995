"""The ErrorInterceptor at the edge: bytes that are not the method's message are INVALID_ARGUMENT
naming the expected type, on unary and streaming methods alike; a message over the size limit is
RESOURCE_EXHAUSTED; good calls beside them, and earlier requests on the same stream, are untouched.

A GrpcHost with a few small handlers runs on its own event loop in a thread; the tests call it
with plain grpc stubs. Messages are tritonclient's compiled Triton protos.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import prometheus_client
import pytest
from tritonclient.grpc import service_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.grpc_server import GrpcHost, _wrap_stream
from services.common.request_decoding import parse_request, tolerant_deserializer
from services.common.infer_checks import check_infer_request

MAX_MESSAGE_BYTES = 64 * 1024
INFER = "inference.GRPCInferenceService"
GARBAGE = b"\xff" * 16  # no protobuf message parses from this
BAD_UTF8_NAME = b"\x0a\x02\xff\xfe"  # model_name (field 1) holding bytes that are not UTF-8


def reply(request) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(model_name=request.model_name, id=request.id)


class Handlers:
    """What the test server runs: unary, unary-stream, stream-unary, two stream-streams, raw."""

    def __init__(self):
        self.concurrent_stream_cleaned_up = threading.Event()

    async def infer(self, request, context):
        check_infer_request(request)
        await asyncio.sleep(0.005)  # long enough for calls to overlap
        return reply(request)

    async def stream_infer(self, requests, context):
        """The embedding worker's way: one request at a time, errors in-band."""
        async for request in requests:
            try:
                check_infer_request(request)
                yield pb.ModelStreamInferResponse(infer_response=reply(request))
            except InvalidArgument as error:
                yield pb.ModelStreamInferResponse(error_message=error.message, infer_response=reply(request))

    async def concurrent_stream(self, requests, context):
        """The LLM worker's way: a reader task of its own serves each request as it comes."""
        responses: asyncio.Queue = asyncio.Queue()

        async def read():
            async for request in requests:
                await responses.put(pb.ModelStreamInferResponse(infer_response=reply(request)))
            await responses.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                yield response
        finally:
            reader.cancel()
            self.concurrent_stream_cleaned_up.set()

    async def count(self, requests, context):
        num_requests = 0
        async for _ in requests:
            num_requests += 1
        return pb.ModelInferResponse(id=str(num_requests))

    async def repeat(self, request, context):
        for _ in range(3):
            yield reply(request)

    async def echo_raw(self, request_bytes: bytes, context) -> bytes:
        return request_bytes


def generic_handlers(h: Handlers) -> list[tuple[grpc.GenericRpcHandler, str]]:
    typed = {"request_deserializer": pb.ModelInferRequest.FromString}
    infer_out = {"response_serializer": pb.ModelInferResponse.SerializeToString}
    stream_out = {"response_serializer": pb.ModelStreamInferResponse.SerializeToString}
    return [
        (grpc.method_handlers_generic_handler(INFER, {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(h.infer, **typed, **infer_out),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(h.stream_infer, **typed, **stream_out),
        }), INFER),
        (grpc.method_handlers_generic_handler("test.Edge", {
            "ConcurrentStream": grpc.stream_stream_rpc_method_handler(h.concurrent_stream, **typed, **stream_out),
            "Count": grpc.stream_unary_rpc_method_handler(h.count, **typed, **infer_out),
            "Repeat": grpc.unary_stream_rpc_method_handler(h.repeat, **typed, **infer_out),
            "EchoRaw": grpc.unary_unary_rpc_method_handler(h.echo_raw),
        }), "test.Edge"),
    ]


@pytest.fixture(scope="module")
def server():
    handlers = Handlers()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[GrpcHost, int]:
        host = GrpcHost(max_message_bytes=MAX_MESSAGE_BYTES)
        for handler, name in generic_handlers(handlers):
            host.add_generic_handler(handler, name)
        return host, await host.start("127.0.0.1", 0)

    host, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, handlers
    asyncio.run_coroutine_threadsafe(host.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def raw_method(channel, path: str, kind: str = "unary_unary", response=pb.ModelInferResponse):
    """A client for `path` that sends bytes as given (no serializer)."""
    return getattr(channel, kind)(path, request_serializer=None, response_deserializer=response.FromString)


def good_request(request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\x00" * 4)
    return request


def count_of(method: str, code: str) -> float:
    service, _, name = method.lstrip("/").rpartition("/")
    labels = {"grpc_service": service, "grpc_method": name, "grpc_code": code}
    return prometheus_client.REGISTRY.get_sample_value("tensoryard_grpc_requests_total", labels) or 0.0


def expect_invalid_argument(call, *args, fragment: str, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        result = call(*args, timeout=10, **kwargs)
        if not isinstance(result, pb.ModelInferResponse):  # a response stream: read it to its end
            list(result)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert fragment in error.value.details()
    return error.value


def stream_requests(items: queue.Queue):
    while (item := items.get()) is not None:
        yield item


@pytest.mark.parametrize(
    "body, reason",
    [(GARBAGE, "Wire format was corrupt"), (BAD_UTF8_NAME, "String field had bad UTF-8")],
)
def test_unary_bytes_that_are_not_the_message_are_invalid_argument(server, body, reason):
    channel, _ = server
    method = f"/{INFER}/ModelInfer"
    before = count_of(method, "INVALID_ARGUMENT")
    error = expect_invalid_argument(raw_method(channel, method), body, fragment=reason)
    assert error.details().startswith("the request is not a valid inference.ModelInferRequest: ")
    # Counted like any refused call (just after the status goes out).
    deadline = time.monotonic() + 5
    while count_of(method, "INVALID_ARGUMENT") < before + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count_of(method, "INVALID_ARGUMENT") == before + 1


def test_unary_stream_method_refuses_bytes_that_are_not_the_message(server):
    channel, _ = server
    call = raw_method(channel, "/test.Edge/Repeat", "unary_stream")
    expect_invalid_argument(call, GARBAGE, fragment="not a valid inference.ModelInferRequest")
    assert len(list(call(good_request("r").SerializeToString(), timeout=10))) == 3


def test_stream_unary_method_refuses_a_bad_message_mid_stream(server):
    channel, _ = server
    call = raw_method(channel, "/test.Edge/Count", "stream_unary")
    good = good_request("c").SerializeToString()
    expect_invalid_argument(call, iter([good, good, GARBAGE, good]), fragment="not a valid inference.ModelInferRequest")
    assert call(iter([good, good]), timeout=10).id == "2"


def test_bad_message_mid_stream_ends_the_stream_after_the_earlier_answers(server):
    channel, _ = server
    items: queue.Queue = queue.Queue()
    responses = raw_method(channel, f"/{INFER}/ModelStreamInfer", "stream_stream", pb.ModelStreamInferResponse)(
        stream_requests(items), timeout=10
    )
    items.put(good_request("first").SerializeToString())
    assert next(responses).infer_response.id == "first"
    items.put(GARBAGE)
    with pytest.raises(grpc.RpcError) as error:
        next(responses)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("the request is not a valid inference.ModelInferRequest: ")
    items.put(None)


def test_malformed_request_on_a_stream_is_answered_in_band_and_the_stream_goes_on(server):
    channel, _ = server
    bad = good_request("bad")
    bad.inputs[0].contents.fp32_contents.append(0.0)  # contents and raw_input_contents together
    items = [good_request("a"), bad, good_request("b")]
    responses = list(raw_method(channel, f"/{INFER}/ModelStreamInfer", "stream_stream", pb.ModelStreamInferResponse)(
        iter([r.SerializeToString() for r in items]), timeout=10
    ))
    assert [(r.infer_response.id, bool(r.error_message)) for r in responses] == [("a", False), ("bad", True), ("b", False)]
    assert "both contents and raw_input_contents" in responses[1].error_message


def test_bad_message_ends_a_stream_whose_handler_reads_in_a_task_of_its_own(server):
    """The handler never sees the error (its reader task does); the call still ends at once, with
    INVALID_ARGUMENT, and the handler's cleanup runs."""
    channel, handlers = server
    handlers.concurrent_stream_cleaned_up.clear()
    items: queue.Queue = queue.Queue()
    responses = raw_method(channel, "/test.Edge/ConcurrentStream", "stream_stream", pb.ModelStreamInferResponse)(
        stream_requests(items), timeout=10
    )
    items.put(good_request("first").SerializeToString())
    assert next(responses).infer_response.id == "first"
    items.put(GARBAGE)
    with pytest.raises(grpc.RpcError) as error:
        next(responses)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert "not a valid inference.ModelInferRequest" in error.value.details()
    assert handlers.concurrent_stream_cleaned_up.wait(5)
    items.put(None)


def test_handlers_without_a_deserializer_get_the_bytes_untouched(server):
    channel, _ = server
    echo = channel.unary_unary("/test.Edge/EchoRaw")
    assert echo(GARBAGE, timeout=10) == GARBAGE


def test_message_over_the_size_limit_is_resource_exhausted(server):
    channel, _ = server
    request = good_request("big")
    request.raw_input_contents[0] = b"\x00" * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(grpc.RpcError) as error:
        raw_method(channel, f"/{INFER}/ModelInfer")(request.SerializeToString(), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.value.details()


def test_good_calls_alongside_bad_bytes_all_succeed(server):
    channel, _ = server
    infer = raw_method(channel, f"/{INFER}/ModelInfer")
    oversized = good_request("big")
    oversized.raw_input_contents[0] = b"\x00" * (MAX_MESSAGE_BYTES + 1)
    bad_bodies = [GARBAGE, BAD_UTF8_NAME, oversized.SerializeToString()] * 10

    def send_good(index: int) -> str:
        return infer(good_request(f"good-{index}").SerializeToString(), timeout=10).id

    def send_bad(body: bytes) -> grpc.StatusCode:
        try:
            infer(body, timeout=10)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(8) as pool:
        good = pool.map(send_good, range(60))
        bad = pool.map(send_bad, bad_bodies)
        assert list(good) == [f"good-{i}" for i in range(60)]
        assert set(bad) == {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_bad_message_right_behind_a_good_one_still_ends_the_stream(server):
    """The bad message may arrive while grpc is still sending the handler's first response: the
    status must go out all the same (40 streams, each sending both at once)."""
    channel, _ = server
    call = raw_method(channel, "/test.Edge/ConcurrentStream", "stream_stream", pb.ModelStreamInferResponse)

    def run_one(index: int) -> grpc.StatusCode:
        responses = call(iter([good_request(f"g{index}").SerializeToString(), GARBAGE]), timeout=5)
        try:
            list(responses)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(run_one, range(40)))
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}


class FakeContext:
    """What the wrappers use of a grpc.aio ServicerContext; `aborts` records each status sent."""

    def __init__(self):
        self.aborts: list[tuple[grpc.StatusCode, str]] = []

    async def abort(self, code, details):
        self.aborts.append((code, details))
        raise grpc.aio.AbortError(details)

    def invocation_metadata(self):
        return ()

    def code(self):
        return self.aborts[-1][0] if self.aborts else None

    def details(self):
        return self.aborts[-1][1] if self.aborts else ""


def test_status_never_goes_out_while_grpc_is_still_sending_a_response():
    """A status sent from the reader task would race grpc's send of the handler's response (the
    first one carries the initial metadata too): a bad message seen while grpc sends a response
    is answered from the handler's task, when grpc asks it for more."""
    deserialize = tolerant_deserializer(pb.ModelInferRequest.FromString, f"{INFER}.ModelStreamInfer")

    async def scenario():
        incoming: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (body := await incoming.get()) is not None:
                yield deserialize(body)

        context = FakeContext()
        call = _wrap_stream(Handlers().concurrent_stream, ("test.Edge", "ConcurrentStream"), request_streaming=True)
        responses = call(requests(), context)
        await incoming.put(good_request("first").SerializeToString())
        first = await responses.__anext__()  # grpc now sends it...
        await incoming.put(GARBAGE)  # ...while the handler's reader task reads the bad message
        await asyncio.sleep(0.05)
        assert context.aborts == []
        with pytest.raises(grpc.aio.AbortError):
            await responses.__anext__()  # grpc is done sending and asks for more
        return first, context.aborts

    first, aborts = asyncio.run(scenario())
    assert first.infer_response.id == "first"
    assert [code for code, _ in aborts] == [grpc.StatusCode.INVALID_ARGUMENT]
    assert aborts[0][1].startswith("the request is not a valid inference.ModelInferRequest: ")


def test_raw_handlers_can_parse_with_the_same_words():
    """What the router uses once it parses the whole request: the same message as typed handlers."""
    with pytest.raises(InvalidArgument, match="^the request is not a valid inference.ModelInferRequest: Wire format was corrupt$"):
        parse_request(pb.ModelInferRequest, GARBAGE)
    assert parse_request(pb.ModelInferRequest, good_request("p").SerializeToString()).id == "p"
