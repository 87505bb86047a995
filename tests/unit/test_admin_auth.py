"""The admin token check: admin methods need the token, everything else passes untouched."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from services.common.admin_auth import (
    ADMIN_METHODS,
    AdminTokenInterceptor,
    admin_metadata,
    check_admin,
    client_admin_token,
    read_admin_token,
)
from services.common.config import RegistryConfig, WorkerConfig, build_config

TOKEN = "s3cret-token"
CREATE_MODEL = "/tensoryard.v1.ModelRegistry/CreateModel"
LIST_MODELS = "/tensoryard.v1.ModelRegistry/ListModels"


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self):
        self.code = self.details = None

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted


def intercept(method: str, metadata=(), handler=None):
    handler = handler or grpc.unary_unary_rpc_method_handler(lambda request, context: "served")
    details = SimpleNamespace(method=method, invocation_metadata=tuple(metadata))

    async def continuation(_details):
        return handler

    return handler, asyncio.run(AdminTokenInterceptor(TOKEN).intercept_service(continuation, details))


def refusal_of(returned, request=None) -> FakeContext:
    context = FakeContext()
    behavior = returned.unary_unary or returned.stream_unary
    with pytest.raises(Aborted):
        asyncio.run(behavior(request, context))
    return context


def test_registry_writes_and_worker_control_are_admin_methods():
    assert {
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
    } == ADMIN_METHODS


@pytest.mark.parametrize("method", [
    "/tensoryard.v1.ModelRegistry/GetModel", "/tensoryard.v1.ModelRegistry/ListModels",
    "/tensoryard.v1.ModelRegistry/GetVersion", "/tensoryard.v1.ModelRegistry/ListVersions",
    "/tensoryard.v1.ModelRegistry/DownloadBlob", "/tensoryard.v1.WorkerControl/StreamLoad",
    "/tensoryard.v1.WorkerControl/GetStats", "/tensoryard.v1.Discovery/Register",
    "/tensoryard.v1.Discovery/Heartbeat", "/tensoryard.v1.Discovery/Deregister",
    "/inference.GRPCInferenceService/ModelInfer",
])
def test_reads_inference_and_discovery_stay_open(method):
    handler, returned = intercept(method)
    assert returned is handler


def test_bearer_token_passes():
    handler, returned = intercept(CREATE_MODEL, [("authorization", f"Bearer {TOKEN}")])
    assert returned is handler


def test_bearer_scheme_is_case_insensitive():
    assert check_admin([("authorization", f"bearer {TOKEN}")], TOKEN) is None


def test_admin_token_header_passes():
    handler, returned = intercept(CREATE_MODEL, [("x-tensoryard-admin-token", TOKEN)])
    assert returned is handler


def test_missing_token_is_unauthenticated():
    handler, returned = intercept(CREATE_MODEL, [("x-request-id", "r1")])
    assert returned is not handler
    assert refusal_of(returned).code is grpc.StatusCode.UNAUTHENTICATED


def test_authorization_of_another_scheme_is_unauthenticated():
    assert check_admin([("authorization", f"Basic {TOKEN}")], TOKEN)[0] is grpc.StatusCode.UNAUTHENTICATED


def test_wrong_token_is_permission_denied():
    _, returned = intercept(CREATE_MODEL, [("authorization", "Bearer not-it")])
    assert refusal_of(returned).code is grpc.StatusCode.PERMISSION_DENIED


def test_token_prefix_is_permission_denied():
    assert check_admin([("x-tensoryard-admin-token", TOKEN[:-1])], TOKEN)[0] is grpc.StatusCode.PERMISSION_DENIED


def test_refused_client_stream_keeps_its_kind():
    upload = grpc.stream_unary_rpc_method_handler(lambda requests, context: "stored")
    _, returned = intercept("/tensoryard.v1.ModelRegistry/UploadBlob", handler=upload)
    assert returned.request_streaming and not returned.response_streaming
    assert refusal_of(returned, request=iter(())).code is grpc.StatusCode.UNAUTHENTICATED


def test_an_admin_check_with_neither_token_nor_certificate_subjects_is_refused():
    with pytest.raises(ValueError, match="token or admin certificate"):
        AdminTokenInterceptor("")


def test_token_file_first_line_wins(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    assert read_admin_token("", path) == TOKEN


def test_empty_token_file_is_an_error(tmp_path):
    path = tmp_path / "token"
    path.write_text("\n")
    with pytest.raises(ValueError, match="admin_token_file"):
        read_admin_token("", path)


def test_env_fills_the_admin_token_of_registry_and_worker():
    env = {"TENSORYARD_ADMIN_TOKEN": TOKEN}
    assert build_config(RegistryConfig, {}, env).admin.admin_token == TOKEN
    assert build_config(WorkerConfig, {"model_name": "m"}, env).admin.admin_token == TOKEN


def test_token_and_token_file_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="admin_token_file"):
        build_config(RegistryConfig, {"admin_token_file": tmp_path / "t"}, {"TENSORYARD_ADMIN_TOKEN": TOKEN})


def test_client_reads_the_same_env_as_the_servers(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    assert client_admin_token({"TENSORYARD_ADMIN_TOKEN": TOKEN}) == TOKEN
    assert client_admin_token({"TENSORYARD_ADMIN_TOKEN_FILE": str(path)}) == TOKEN
    assert client_admin_token({}, path) == TOKEN
    assert client_admin_token({}) == ""
    assert admin_metadata("") == ()
