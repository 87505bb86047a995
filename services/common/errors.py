"""Domain errors, one class per failure a caller can act on.

Domain code raises these; `services.common.grpc_server` maps them to gRPC status codes in one
place (`status_for`). Anything else that escapes a handler becomes INTERNAL and is logged.
"""

from __future__ import annotations

import grpc


class TensoryardError(Exception):
    """Base class: `code` is the gRPC status the error maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(TensoryardError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TensoryardError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TensoryardError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TensoryardError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(TensoryardError):
    """No room for the request now: retry later (RESOURCE_EXHAUSTED).

    retry_after_s, when known, is sent as gRPC's retry pushback (`grpc-retry-pushback-ms` trailing
    metadata): a client with a retry policy waits that long before it tries again.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(TensoryardError):
    """No ready replica, or the process is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(TensoryardError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(TensoryardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class IntegrityError(TensoryardError):
    """Stored or downloaded bytes do not match their recorded sha256."""

    code = grpc.StatusCode.DATA_LOSS


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The (status code, message) a client sees for `error`."""
    if isinstance(error, TensoryardError):
        return error.code, error.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
