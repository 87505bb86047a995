"""A real `tensoryard registry` started with TENSORYARD_ADMIN_TOKEN: its writes need the token, its
reads do not, and `tensoryard models register` sends the token it finds in the same environment."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import REPO_ROOT, cli, free_port, health_status, stop, wait_until

TOKEN = "e2e-admin-token"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("admin")
    address = f"127.0.0.1:{free_port()}"
    process = cli("registry", "--port", address.split(":")[1], "--data-dir", str(home / "data"),
                  "--metrics-port", "-1", log_path=home / "registry.log",
                  env={"TENSORYARD_ADMIN_TOKEN": TOKEN})
    try:
        wait_until(lambda: health_status(address) == health_pb2.HealthCheckResponse.SERVING, 60,
                   "the registry to serve")
        yield address
    finally:
        stop(process)


def create_model(address: str, name: str, metadata=()):
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        return stub.CreateModel(registry_pb2.CreateModelRequest(name=name, task="tensor"),
                                metadata=metadata, timeout=10)


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def test_create_model_without_credentials_is_unauthenticated(registry):
    assert status_of(lambda: create_model(registry, "anonymous")) is grpc.StatusCode.UNAUTHENTICATED


def test_create_model_with_a_wrong_token_is_permission_denied(registry):
    code = status_of(lambda: create_model(registry, "wrong", [("authorization", "Bearer nope")]))
    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_create_model_with_the_token_succeeds_and_reads_stay_open(registry):
    created = create_model(registry, "admitted", [("authorization", f"Bearer {TOKEN}")])
    assert created.name == "admitted"
    with grpc.insecure_channel(registry) as channel:
        listed = registry_pb2_grpc.ModelRegistryStub(channel).ListModels(registry_pb2.ListModelsRequest(), timeout=10)
    names = {model.name for model in listed.models}
    assert "admitted" in names and "anonymous" not in names and "wrong" not in names


def models_register(registry: str, folder, name: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "models", "register", name, str(folder), "--task", "tensor",
         "--registry", registry],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_models_register_sends_the_token_from_the_environment(registry, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00" * 64)
    base = {k: v for k, v in os.environ.items() if not k.startswith("TENSORYARD_ADMIN_TOKEN")}
    refused = models_register(registry, folder, "from-cli", base)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
    accepted = models_register(registry, folder, "from-cli", {**base, "TENSORYARD_ADMIN_TOKEN": TOKEN})
    assert accepted.returncode == 0, accepted.stderr
    assert "registered version 1" in accepted.stdout
