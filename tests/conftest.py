"""Real processes on loopback: `tensoryard up`, or a registry and workers started one by one.

The session's one `tensoryard up` (the `stack` fixture) lives here so that tests/e2e and
tests/conformance share it.

Test processes talk to them only through real clients (tritonclient, grpc health/reflection,
grpcurl, the registry's own API). They never import `protos.inference`: tritonclient defines the
same `inference` proto package, and both in one process would clash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Without a GPU the Triton kernels run under triton's interpreter, on CPU tensors. triton reads
# the switch when a kernel is decorated, at import, so it is set before any test imports kernels/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The Consul stand-in's fixtures (consul_standin, consul_url, start_consul_standin) for every test.
pytest_plugins = ["tests.support.consul_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "all-MiniLM-L6-v2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, log_path: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO_ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def health_status(address: str, service: str = "", timeout_s: float = 1.0):
    """The health status, or None when nothing answers yet."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return None
    return reply.status


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def stop(process: subprocess.Popen, timeout_s: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    return process.wait(timeout_s)


def stop_all(processes: list[subprocess.Popen], timeout_s: float = 30) -> None:
    """Stop processes, the last started first; a frozen one (SIGSTOP) is thawed first, and one that
    does not stop within timeout_s is killed."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
        try:
            stop(process, timeout_s=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass(frozen=True)
class Stack:
    router: str
    registry: str
    home: Path
    process: subprocess.Popen
    output_path: Path

    def worker_addresses(self) -> list[str]:
        from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc

        with grpc.insecure_channel(self.registry) as channel:
            reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
                discovery_pb2.ListRequest(service="worker"), timeout=5
            )
        return [i.address for i in reply.instances]


def start_registry(home: Path) -> tuple[str, subprocess.Popen]:
    """A `tensoryard registry` of its own on a free port (no metrics), once it serves."""
    address = f"127.0.0.1:{free_port()}"
    process = cli("registry", "--port", address.split(":")[1], "--data-dir", str(home / "data"),
                  "--metrics-port", "-1", log_path=home / "registry.log")
    wait_until(lambda: health_status(address) == health_pb2.HealthCheckResponse.SERVING, 60, "the registry to serve")
    return address, process


def start_up(home: Path, *flags: str, env: dict | None = None, timeout_s: float = 240) -> Stack:
    """`tensoryard up` with these flags on free ports, once it has printed its ready line."""
    ports = [free_port() for _ in range(4)]
    output_path = home / "up.out"
    process = cli(
        "up", "--home", str(home), *flags,
        "--router-port", str(ports[0]), "--registry-port", str(ports[1]),
        "--router-metrics-port", str(ports[2]), "--registry-metrics-port", str(ports[3]),
        log_path=output_path, env=env,
    )
    wait_until(
        lambda: process.poll() is not None or "tensoryard is ready" in output_path.read_text(),
        timeout_s=timeout_s,
        what="tensoryard up to print its ready line",
        interval_s=0.2,
    )
    assert process.poll() is None, f"tensoryard up exited: {output_path.read_text()}"
    return Stack(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", home, process, output_path)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    """`tensoryard up` exactly as the README runs it, on free ports."""
    up = start_up(tmp_path_factory.mktemp("tensoryard-home"))
    yield up
    stop(up.process)
