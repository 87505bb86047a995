"""The admin token: methods that change what is served need it, reads and inference do not.

A caller shows the token as `authorization: Bearer <token>` metadata (or `x-tensoryard-admin-token:
<token>`). Missing: UNAUTHENTICATED; wrong: PERMISSION_DENIED. A server with no token configured
installs no interceptor at all (today's behaviour), and one with a token costs a method that is not
an admin method one frozenset lookup per call.

Discovery registration (Register, Heartbeat, Deregister, KVPut, KVDelete) stays open: workers
call it themselves and do not hold the admin token yet (issue 11: mTLS is the next step).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

AUTHORIZATION_HEADER = "authorization"
ADMIN_TOKEN_HEADER = "x-tensoryard-admin-token"
ENV_ADMIN_TOKEN = "TENSORYARD_ADMIN_TOKEN"
ENV_ADMIN_TOKEN_FILE = "TENSORYARD_ADMIN_TOKEN_FILE"
_BEARER = "bearer "

ADMIN_METHODS = frozenset({
    "/tensoryard.v1.ModelRegistry/CreateModel",
    "/tensoryard.v1.ModelRegistry/UploadBlob",
    "/tensoryard.v1.ModelRegistry/CreateVersion",
    "/tensoryard.v1.WorkerControl/Drain",
    "/tensoryard.v1.WorkerControl/InjectFault",
})


def read_admin_token(admin_token: str = "", admin_token_file: Path | None = None) -> str:
    """The configured token: the file's first line when a file is named, else `admin_token`."""
    if admin_token_file is not None:
        try:
            token = admin_token_file.read_text().strip()
        except OSError as error:
            raise ValueError(f"admin_token_file: cannot read {admin_token_file}: {error.strerror}") from None
        if not token:
            raise ValueError(f"admin_token_file: {admin_token_file} is empty")
        return token
    return admin_token


def client_admin_token(env: Mapping[str, str], admin_token_file: Path | None = None) -> str:
    """The token a client sends: `--admin-token-file`, else the same environment the servers read."""
    file = admin_token_file or (Path(env[ENV_ADMIN_TOKEN_FILE]) if env.get(ENV_ADMIN_TOKEN_FILE) else None)
    return read_admin_token(env.get(ENV_ADMIN_TOKEN, ""), file)


def admin_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION_HEADER, f"Bearer {token}"),) if token else ()


def check_admin(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> tuple[grpc.StatusCode, str] | None:
    """None when `metadata` carries `token`; else the status to refuse the call with."""
    presented = None
    for key, value in metadata or ():
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if key == AUTHORIZATION_HEADER and value[:len(_BEARER)].lower() == _BEARER:
            presented = value[len(_BEARER):].strip()
        elif key == ADMIN_TOKEN_HEADER:
            presented = value.strip()
        else:
            continue
        if hmac.compare_digest(presented.encode(), token.encode()):
            return None
    if presented is None:
        return grpc.StatusCode.UNAUTHENTICATED, "this method needs the admin token (authorization: Bearer <token>)"
    return grpc.StatusCode.PERMISSION_DENIED, "the admin token is not valid"


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses admin methods (`ADMIN_METHODS`) to callers without the admin token.

    Installed inside `ErrorInterceptor`, so refused calls are counted and logged like any other.
    """

    def __init__(self, token: str, admin_methods: frozenset[str] = ADMIN_METHODS) -> None:
        if not token:
            raise ValueError("admin token must not be empty")
        self._token = token
        self._admin_methods = admin_methods

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method not in self._admin_methods:
            return await continuation(handler_call_details)
        refusal = check_admin(handler_call_details.invocation_metadata, self._token)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        return _refusing(handler, *refusal)


def _refusing(handler, code: grpc.StatusCode, details: str):
    """A handler of the same kind as `handler` that answers `code` without running it."""

    async def refuse(request, context):
        await context.abort(code, details)

    async def refuse_stream(request, context):
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator

    args = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, *args)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, *args)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, *args)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, *args)


class _AdminClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds the admin token to every call a client makes (the CLI's `models` commands, `up`)."""

    def __init__(self, token: str) -> None:
        self._metadata = admin_metadata(token)

    def _details(self, details):
        return details._replace(metadata=(*(details.metadata or ()), *self._metadata))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def admin_channel(channel: grpc.Channel, token: str) -> grpc.Channel:
    """`channel`, sending `token` on its unary and client-streaming calls; unchanged with no token."""
    if not token:
        return channel
    return grpc.intercept_channel(channel, _AdminClientInterceptor(token))
