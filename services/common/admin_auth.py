"""The admin token: methods that change what is served need it, reads and inference do not.

A caller shows the token as `authorization: Bearer <token>` metadata (or `x-tensoryard-admin-token:
<token>`). Missing: UNAUTHENTICATED; wrong: PERMISSION_DENIED. A server with no token configured
installs no interceptor at all (today's behaviour), and one with a token costs a method that is not
an admin method one frozenset lookup per call.

Instead of the token, an admin may show a client certificate on the admin TLS port
(services/common/tls.py): there, a certificate whose subject common name is an admin's opens the
admin methods, any other verified certificate only the rest.

Discovery registration (Register, Heartbeat, Deregister, KVPut, KVDelete) stays open: workers
call it themselves and hold neither the token nor a certificate.
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
    "/tensoryard.v1.ModelRegistry/DeleteVersion",
    "/tensoryard.v1.ModelRegistry/SetAlias",
    "/tensoryard.v1.ModelRegistry/DeleteAlias",
    "/tensoryard.v1.ModelRegistry/SetTrafficPolicy",
    "/tensoryard.v1.ModelRegistry/SetDeployment",
    "/tensoryard.v1.ModelRegistry/AppendAudit",
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


def caller_actor(context, token: str) -> str:
    """Who the audit log says made a call: "admin-token" when it carried the valid admin token,
    "cert:<common name>" for a verified client certificate, else "anonymous"."""
    if token and check_admin(context.invocation_metadata(), token) is None:
        return "admin-token"
    from services.common.tls import peer_common_names

    names = peer_common_names(context.auth_context())
    return f"cert:{sorted(names)[0]}" if names else "anonymous"


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses admin methods (`ADMIN_METHODS`) to callers without the admin token, or, on the
    admin TLS port (services/common/tls.py), without an admin's client certificate.

    Installed inside `ErrorInterceptor`, so refused calls are counted and logged like any other.
    The certificate is known only once the call runs (the interceptor sees metadata, not the
    transport), so a call without the token is checked then.
    """

    def __init__(self, token: str = "", admin_methods: frozenset[str] = ADMIN_METHODS,
                 admin_subjects: frozenset[str] = frozenset()) -> None:
        if not token and not admin_subjects:
            raise ValueError("the admin check needs a token or admin certificate subjects")
        self._token = token
        self._admin_methods = admin_methods
        self._admin_subjects = admin_subjects

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method not in self._admin_methods:
            return await continuation(handler_call_details)
        if self._token:
            refusal = check_admin(handler_call_details.invocation_metadata, self._token)
        else:
            refusal = (grpc.StatusCode.UNAUTHENTICATED,
                       "this method needs an admin client certificate (the admin TLS port)")
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        if self._admin_subjects:
            return _unless_admin_certificate(handler, self._admin_subjects, *refusal)
        return _refusing(handler, *refusal)


def _unless_admin_certificate(handler, admin_subjects: frozenset[str], code: grpc.StatusCode, details: str):
    """`handler`, run only for a caller whose verified client certificate names an admin."""
    from services.common.tls import peer_common_names

    def allowed(context) -> bool:
        return bool(peer_common_names(context.auth_context()) & admin_subjects)

    def refusal_for(context) -> tuple[grpc.StatusCode, str]:
        names = peer_common_names(context.auth_context())
        if names:  # a verified certificate, but not an admin's
            return grpc.StatusCode.PERMISSION_DENIED, f"client certificate {sorted(names)} is not an admin's"
        return code, details

    args = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary or handler.stream_unary:
        behaviour = handler.unary_unary or handler.stream_unary

        async def checked(request, context):
            if not allowed(context):
                await context.abort(*refusal_for(context))
            return await behaviour(request, context)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(checked, *args)
    behaviour = handler.unary_stream or handler.stream_stream

    async def checked_stream(request, context):
        if not allowed(context):
            await context.abort(*refusal_for(context))
        async for response in behaviour(request, context):
            yield response

    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return make(checked_stream, *args)


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
