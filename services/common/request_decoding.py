"""Request bytes that do not parse as the method's request message: INVALID_ARGUMENT, never
INTERNAL, on unary and streaming calls alike (services/common/grpc_server.py installs these).

Typed handlers get a `tolerant_deserializer`: bytes that do not parse become an `Undecodable`,
which `checked_request` refuses before the handler runs (unary) or which `RequestStream` turns
into the call's status when the handler reads it (streams). Handlers that take raw bytes (the
router's) call `parse_request` themselves.
"""

from __future__ import annotations

import asyncio

from google.protobuf import descriptor_pool

from services.common import errors


class Undecodable:
    """Stands in for a request message whose bytes did not parse; the wrapped handler refuses it."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def tolerant_deserializer(deserializer, method_name: str):
    """`deserializer`, except that bytes which do not parse yield an `Undecodable`."""
    if deserializer is None:  # raw bytes in: the handler parses what it needs itself
        return None
    type_name = _request_type_name(deserializer, method_name)

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - whatever the parser says, the bytes are bad
            return Undecodable(_not_a_valid(type_name, error))

    return deserialize


def parse_request(message_class, data: bytes):
    """`message_class.FromString(data)` for handlers that take raw bytes (the router's), failing
    with the InvalidArgument a typed handler's caller gets for the same bytes."""
    try:
        return message_class.FromString(data)
    except Exception as error:  # noqa: BLE001
        raise errors.InvalidArgument(_not_a_valid(message_class.DESCRIPTOR.full_name, error)) from None


def _not_a_valid(type_name: str, error: Exception) -> str:
    # protobuf's text repeats the type: "Error parsing message with type 'X': reason".
    reason = str(error).rpartition("': ")[2] or type(error).__name__
    return f"the request is not a valid {type_name}: {reason}"


def _request_type_name(deserializer, method_name: str) -> str:
    """The request message's full name: from `Message.FromString`, else the method's descriptor."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    if descriptor is not None:
        return descriptor.full_name
    try:
        return descriptor_pool.Default().FindMethodByName(method_name).input_type.full_name
    except KeyError:
        return f"{method_name} request"


def checked_request(request, request_streaming: bool):
    """The request as the handler gets it: a message that did not parse goes no further."""
    if request_streaming:
        return RequestStream(request)
    if isinstance(request, Undecodable):
        raise errors.InvalidArgument(request.message)
    return request


class RequestStream:
    """A handler's request iterator that ends the call at a message which did not parse.

    Read from the handler's own task, it raises InvalidArgument, which the handler lets through to
    the wrapper like any other error. A handler may read its requests from a task of its own (the
    LLM's ModelStreamInfer does, to serve them concurrently), and that task's error may never reach
    the wrapper; there the wrapper is told (`failure`) and the handler's task is stopped: cancelled
    if it is running the handler, else (grpc is sending one of its responses) when grpc asks for
    the next response. Either way the status goes out from the handler's task, never while one of
    its writes is still under way.
    """

    def __init__(self, requests):
        self._requests = requests.__aiter__()
        self._handler_task = asyncio.current_task()
        self.failure: errors.InvalidArgument | None = None
        self.in_handler = True  # False while grpc sends a response the handler yielded

    def __aiter__(self):
        return self

    async def __anext__(self):
        request = await self._requests.__anext__()
        if not isinstance(request, Undecodable):
            return request
        error = errors.InvalidArgument(request.message)
        if asyncio.current_task() is self._handler_task:
            raise error
        self.failure = error
        if self.in_handler:
            self._handler_task.cancel()
        raise asyncio.CancelledError  # this reader ends with the call

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure


def cancelled_for_bad_message(requests) -> bool:
    """Whether a CancelledError came from `RequestStream` (the call goes on to answer it)."""
    if not isinstance(requests, RequestStream) or requests.failure is None:
        return False
    asyncio.current_task().uncancel()
    return True
