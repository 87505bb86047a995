"""Channels follow ChannelSecurity against a real in-process GrpcHost serving TLS: a certificate
that names a service (not the IP dialled) is accepted when the channel is told that name, and
refused otherwise; a server-only TLS port takes callers without a certificate."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_server import GrpcHost, aio_channel
from services.common.tls import ChannelSecurity, ServingTls

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A CA and a server certificate for DNS:tensoryard.internal only (no IP)."""
    folder = tmp_path_factory.mktemp("named")
    run = lambda *args: subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server")
    (folder / "server.ext").write_text("subjectAltName=DNS:tensoryard.internal\nextendedKeyUsage=serverAuth,clientAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "server.ext")
    return folder


async def health_code(serving: ServingTls, security: ChannelSecurity) -> grpc.StatusCode:
    host = GrpcHost(serving_tls=serving)
    port = await host.start("127.0.0.1", 0)
    await host.set_serving(True)
    try:
        async with aio_channel(f"127.0.0.1:{port}", security=security) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                return error.code()
    finally:
        await host.stop(0)


def test_a_server_name_stands_in_for_the_address_dialled(certificates):
    serving = ServingTls(certificates / "server.pem", certificates / "server.key")
    named = ChannelSecurity(True, certificates / "ca.pem", server_name="tensoryard.internal")
    assert asyncio.run(health_code(serving, named)) is grpc.StatusCode.OK


def test_without_the_name_the_certificate_does_not_match_the_ip(certificates):
    serving = ServingTls(certificates / "server.pem", certificates / "server.key")
    unnamed = ChannelSecurity(True, certificates / "ca.pem")
    assert asyncio.run(health_code(serving, unnamed)) is grpc.StatusCode.UNAVAILABLE


def test_a_tls_port_without_a_client_ca_takes_callers_without_a_certificate(certificates):
    serving = ServingTls(certificates / "server.pem", certificates / "server.key")
    assert not serving.mutual
    caller = ChannelSecurity(True, certificates / "ca.pem", server_name="tensoryard.internal")
    assert not caller.mutual
    assert asyncio.run(health_code(serving, caller)) is grpc.StatusCode.OK


def test_an_mtls_port_refuses_a_caller_without_a_certificate(certificates):
    serving = ServingTls(certificates / "server.pem", certificates / "server.key", certificates / "ca.pem")
    anonymous = ChannelSecurity(True, certificates / "ca.pem", server_name="tensoryard.internal")
    with_cert = ChannelSecurity(True, certificates / "ca.pem", certificates / "server.pem", certificates / "server.key",
                                server_name="tensoryard.internal")
    assert asyncio.run(health_code(serving, anonymous)) is grpc.StatusCode.UNAVAILABLE
    assert asyncio.run(health_code(serving, with_cert)) is grpc.StatusCode.OK
