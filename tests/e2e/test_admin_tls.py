"""A real `tensoryard registry` with an admin TLS port: certificates made by openssl, as an operator
would. An admin's client certificate may write there without a token; another verified certificate
may read but not write; a caller with no certificate cannot connect; the plaintext port still
refuses writes without the token."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services.common.tls import client_channel_credentials
from tests.conftest import cli, free_port, health_status, stop, wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> None:
    """A CA; a server certificate for 127.0.0.1; client certificates for an admin and a reader."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=tensoryard-test-ca", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, subject in (("server", "127.0.0.1"), ("admin", "tensoryard-admin"), ("reader", "reader")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={subject}", cwd=folder)
        extensions = ["-extfile", "server.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *extensions, cwd=folder)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("admin-tls")
    make_certificates(home)
    port, tls_port = free_port(), free_port()
    process = cli("registry", "--port", str(port), "--data-dir", str(home / "data"), "--metrics-port", "-1",
                  "--admin-tls-port", str(tls_port), "--tls-cert", str(home / "server.pem"),
                  "--tls-key", str(home / "server.key"), "--tls-client-ca", str(home / "ca.pem"),
                  log_path=home / "registry.log", env={"TENSORYARD_ADMIN_TOKEN": "plaintext-token"})
    address = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: health_status(address) == health_pb2.HealthCheckResponse.SERVING, 60,
                   "the registry to serve")
        yield address, f"127.0.0.1:{tls_port}", home
    finally:
        stop(process)


def tls_stub(address: str, home: Path, client: str | None):
    if client is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=(home / "ca.pem").read_bytes())
    else:
        credentials = client_channel_credentials(home / "ca.pem", home / f"{client}.pem", home / f"{client}.key")
    channel = grpc.secure_channel(address, credentials)
    return channel, registry_pb2_grpc.ModelRegistryStub(channel)


def create(stub, name: str):
    return stub.CreateModel(registry_pb2.CreateModelRequest(name=name, task="tensor"), timeout=10)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def test_an_admin_certificate_writes_without_a_token(registry):
    _, tls_address, home = registry
    channel, stub = tls_stub(tls_address, home, "admin")
    with channel:
        assert create(stub, "by-certificate").name == "by-certificate"


def test_another_certificate_reads_but_may_not_write(registry):
    _, tls_address, home = registry
    channel, stub = tls_stub(tls_address, home, "reader")
    with channel:
        assert code_of(lambda: create(stub, "by-reader")) is grpc.StatusCode.PERMISSION_DENIED
        names = {m.name for m in stub.ListModels(registry_pb2.ListModelsRequest(), timeout=10).models}
        assert "by-reader" not in names


def test_a_caller_without_a_certificate_cannot_use_the_tls_port(registry):
    _, tls_address, home = registry
    channel, stub = tls_stub(tls_address, home, None)
    with channel:
        assert code_of(lambda: stub.ListModels(registry_pb2.ListModelsRequest(), timeout=5)) is grpc.StatusCode.UNAVAILABLE


def test_the_plaintext_port_still_needs_the_token(registry):
    address, _, _ = registry
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        assert code_of(lambda: create(stub, "anonymous")) is grpc.StatusCode.UNAUTHENTICATED
