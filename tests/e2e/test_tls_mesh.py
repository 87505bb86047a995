"""A registry, an embedding worker and a router, all serving mTLS and calling each other with their
own certificates (made by openssl, as an operator would). A Triton client with a certificate from
the mesh's CA is served end to end (router -> worker -> back); a client with no certificate, one
with a certificate from another CA, and a plaintext client are refused at the connection
(UNAVAILABLE, before any method runs). A verified certificate that is not an admin's may read
but not write the registry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.common.tls import ChannelSecurity
from services.registry.client import register_folder
from tests.conftest import MODEL, REPO_ROOT, cli, free_port, start_up, stop, wait_until
from tests.e2e.test_worker_lifecycle import minilm_folder

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates")

MESH_EXTENSIONS = ("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   "basicConstraints=critical,CA:FALSE\n")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN={name}", cwd=folder)


def issue(folder: Path, name: str, subject: str, ca: str) -> None:
    """`name`.pem/.key signed by `ca`, for 127.0.0.1, good for serving and for calling."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={subject}", cwd=folder)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "mesh.ext", cwd=folder)


def make_certificates(folder: Path) -> None:
    (folder / "mesh.ext").write_text(MESH_EXTENSIONS)
    make_ca(folder, "ca")
    for name, subject in (("registry", "tensoryard-registry"), ("worker", "tensoryard-worker"),
                          ("router", "tensoryard-router"), ("admin", "tensoryard-admin"), ("user", "user")):
        issue(folder, name, subject, "ca")
    make_ca(folder, "other-ca")
    issue(folder, "stranger", "user", "other-ca")  # same subject as `user`, another CA


def mtls_flags(home: Path, role: str) -> tuple[str, ...]:
    return ("--tls-mode", "mtls", "--tls-cert", str(home / f"{role}.pem"), "--tls-key", str(home / f"{role}.key"),
            "--tls-client-ca", str(home / "ca.pem"), "--tls-ca", str(home / "ca.pem"))


def security(home: Path, client: str | None, ca: str = "ca") -> ChannelSecurity:
    if client is None:
        return ChannelSecurity(True, home / f"{ca}.pem")
    return ChannelSecurity(True, home / f"{ca}.pem", home / f"{client}.pem", home / f"{client}.key")


def serving(address: str, home: Path) -> bool:
    with security(home, "user").channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    home = tmp_path_factory.mktemp("tls-mesh")
    make_certificates(home)
    registry, worker, router = (f"127.0.0.1:{free_port()}" for _ in range(3))
    port = lambda address: address.rsplit(":", 1)[1]  # noqa: E731
    processes = [cli("registry", "--port", port(registry), "--data-dir", str(home / "data"), "--metrics-port", "-1",
                     *mtls_flags(home, "registry"), log_path=home / "registry.log")]
    try:
        wait_until(lambda: serving(registry, home), 60, "the registry to serve mTLS")
        with security(home, "admin").channel(registry) as channel:
            register_folder(channel, MODEL, "embedding", minilm_folder(), {"max_batch_size": 8})
        processes.append(cli("worker", "--model-name", MODEL, "--registry", registry, "--port", port(worker),
                             "--cache-dir", str(home / "cache"), "--num-threads", "1", "--metrics-port", "-1",
                             *mtls_flags(home, "worker"), log_path=home / "worker.log"))
        processes.append(cli("router", "--port", port(router), "--registry", registry, "--models", MODEL,
                             "--metrics-port", "-1", *mtls_flags(home, "router"), log_path=home / "router.log"))
        wait_until(lambda: serving(router, home), 180, "the router to serve the model over mTLS", interval_s=0.2)
        yield {"registry": registry, "worker": worker, "router": router, "home": home}
    finally:
        for process in reversed(processes):
            try:
                stop(process)
            except subprocess.TimeoutExpired:
                process.kill()


def text_input(texts: list[str]) -> triton.InferInput:
    data = np.array([[t.encode()] for t in texts], dtype=object)
    tensor = triton.InferInput("text", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def triton_client(address: str, home: Path, client: str | None, ca: str = "ca", ssl: bool = True):
    if not ssl:
        return triton.InferenceServerClient(address)
    return triton.InferenceServerClient(
        address, ssl=True, root_certificates=str(home / f"{ca}.pem"),
        private_key=str(home / f"{client}.key") if client else None,
        certificate_chain=str(home / f"{client}.pem") if client else None)


def refusal(client) -> InferenceServerException:
    with client, pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [text_input(["refused"])], client_timeout=10)
    return raised.value


def test_a_client_with_a_mesh_certificate_is_served_through_the_router(mesh):
    with triton_client(mesh["router"], mesh["home"], "user") as client:
        result = client.infer(MODEL, [text_input(["mTLS all the way", "and back"])],
                              outputs=[triton.InferRequestedOutput("embedding")], client_timeout=30)
    embeddings = result.as_numpy("embedding")
    assert embeddings.shape == (2, 384)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)


def test_the_worker_registered_and_is_reached_over_mtls(mesh):
    with security(mesh["home"], "user").channel(mesh["registry"]) as channel:
        listed = discovery_pb2_grpc.DiscoveryStub(channel).List(discovery_pb2.ListRequest(service="worker"), timeout=5)
    assert [i.address for i in listed.instances] == [mesh["worker"]]
    assert serving(mesh["worker"], mesh["home"])


@pytest.mark.parametrize("client, ca", [(None, "ca"), ("stranger", "ca"), ("stranger", "other-ca")],
                         ids=["no-certificate", "certificate-from-another-ca", "another-ca-altogether"])
def test_a_client_without_a_mesh_certificate_cannot_connect(mesh, client, ca):
    error = refusal(triton_client(mesh["router"], mesh["home"], client, ca))
    assert error.status() == "StatusCode.UNAVAILABLE", error
    assert "failed to connect" in str(error)  # the connection, not a method, said no


def test_a_plaintext_client_cannot_connect(mesh):
    error = refusal(triton_client(mesh["router"], mesh["home"], None, ssl=False))
    assert error.status() == "StatusCode.UNAVAILABLE", error
    assert "failed to connect" in str(error)
    for name in ("registry", "worker"):
        with grpc.insecure_channel(mesh[name]) as channel, pytest.raises(grpc.RpcError) as raised:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE, name


def test_the_refusal_is_the_handshake_not_a_method(mesh):
    """No certificate: the TLS handshake fails, so even Health (which anyone may call) is refused."""
    with security(mesh["home"], None).channel(mesh["registry"]) as channel, pytest.raises(grpc.RpcError) as raised:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "failed to connect" in raised.value.details()


def test_a_mesh_certificate_that_is_not_an_admins_may_read_but_not_write(mesh):
    with security(mesh["home"], "worker").channel(mesh["registry"]) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        assert MODEL in {m.name for m in stub.ListModels(registry_pb2.ListModelsRequest(), timeout=5).models}
        with pytest.raises(grpc.RpcError) as raised:
            stub.CreateModel(registry_pb2.CreateModelRequest(name="by-a-worker", task="tensor"), timeout=5)
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED


# -- `tensoryard up --tls-dir`: the local mesh with certificates it makes ------------------------------


@pytest.fixture(scope="module")
def up_with_tls(tmp_path_factory):
    home = tmp_path_factory.mktemp("up-tls")
    # --autoscale: the registry's autoscaler reads the worker's stats over mTLS too.
    stack = start_up(home, "--no-llm", "--tls-dir", str(home / "tls"), "--autoscale", "--min-replicas", "1",
                     "--max-replicas", "2", "--autoscale-interval-s", "1")
    yield stack, home / "tls"
    stop(stack.process)


def test_up_with_a_tls_dir_serves_only_mtls_clients(up_with_tls):
    stack, tls = up_with_tls
    assert "mTLS on every port" in stack.output_path.read_text()
    with triton_client(stack.router, tls, "admin") as client:
        result = client.infer(MODEL, [text_input(["up, with certificates"])],
                              outputs=[triton.InferRequestedOutput("embedding")], client_timeout=30)
    assert result.as_numpy("embedding").shape == (1, 384)
    assert refusal(triton_client(stack.router, tls, None, ssl=False)).status() == "StatusCode.UNAVAILABLE"


def test_the_models_command_reaches_up_with_the_admin_certificate(up_with_tls):
    stack, tls = up_with_tls
    flags = ("--registry", stack.registry, "--json")
    certificate = ("--tls-ca", str(tls / "ca.pem"), "--tls-cert", str(tls / "admin.pem"), "--tls-key", str(tls / "admin.key"))
    listed = models_list(*flags, *certificate)
    assert listed.returncode == 0, listed.stderr
    assert MODEL in listed.stdout
    plain = models_list(*flags)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr


def test_the_registry_autoscaler_reads_the_workers_over_mtls(up_with_tls):
    stack, tls = up_with_tls

    def decision() -> dict | None:
        with ChannelSecurity(True, tls / "ca.pem", tls / "admin.pem", tls / "admin.key").channel(stack.registry) as channel:
            reply = discovery_pb2_grpc.DiscoveryStub(channel).KVGet(
                discovery_pb2.KVGetRequest(key=f"tensoryard/deployments/{MODEL}/1/decision"), timeout=5)
        return json.loads(reply.entries[0].value) if reply.entries else None

    # Unable to reach the worker, it would publish "no replica ready to read load from".
    wait_until(lambda: (decision() or {}).get("reason", "no replica").startswith("no replica") is False, 60,
               "a decision made from the worker's own figures", interval_s=0.5)
    assert decision()["replicas"] == 1


def models_list(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "models", "list", *flags], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
