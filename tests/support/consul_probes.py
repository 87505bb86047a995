"""Interval checks of the Consul stand-in: gRPC health, TCP connect and HTTP GET, one thread each.

As in Consul (developer.hashicorp.com/consul/docs/services/usage/checks): a gRPC check calls
grpc.health.v1.Health/Check on `GRPC` ("host:port" or "host:port/service") and passes on SERVING; a
TCP check passes when a connection opens; an HTTP check passes on 2xx, warns on 429 and is critical
otherwise. Each runs every `Interval` with `Timeout` (10 s by default). GRPCUseTLS is refused at
registration (the stand-in has no client certificates to offer).
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.consul_state import Check


def probe_grpc(target: str, timeout_s: float) -> tuple[str, str]:
    address, _, service = target.partition("/")
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError as error:
        return "critical", f"gRPC check {target}: error: {error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return "passing", f"gRPC check {target}: success"
    return "critical", f"gRPC check {target}: failed: {status}"


def probe_tcp(target: str, timeout_s: float) -> tuple[str, str]:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return "passing", f"TCP connect {target}: Success"
    except (OSError, ValueError) as error:
        return "critical", f"dial tcp {target}: {error}"


def probe_http(target: str, timeout_s: float) -> tuple[str, str]:
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as reply:
            code = reply.status
    except urllib.error.HTTPError as error:
        code = error.code
    except (OSError, ValueError) as error:
        return "critical", f"Get {target!r}: {error}"
    status = "passing" if 200 <= code < 300 else "warning" if code == 429 else "critical"
    return status, f"HTTP GET {target}: {code}"


PROBES: dict[str, tuple[str, Callable[[str, float], tuple[str, str]]]] = {
    "grpc": ("GRPC", probe_grpc),
    "tcp": ("TCP", probe_tcp),
    "http": ("HTTP", probe_http),
}


class Prober:
    """Owns one thread per interval check; results go back through `report(check_id, status, output)`."""

    def __init__(self, report: Callable[[str, str, str], None]):
        self._report = report
        self._stops: dict[str, threading.Event] = {}

    def start(self, check: Check) -> None:
        field_name, probe = PROBES[check.kind]
        stop = threading.Event()
        self._stops[check.check_id] = stop
        target = str(check.definition[field_name])
        thread = threading.Thread(
            target=self._run, args=(check.check_id, probe, target, check.interval_s, check.timeout_s, stop),
            name=f"probe-{check.check_id}", daemon=True,
        )
        thread.start()

    def stop(self, check_id: str) -> None:
        stop = self._stops.pop(check_id, None)
        if stop is not None:
            stop.set()

    def _run(self, check_id, probe, target, interval_s, timeout_s, stop: threading.Event) -> None:
        # Consul staggers the first run within the interval; the stand-in probes at once, then every
        # interval, so a test does not wait a random fraction of it.
        while not stop.is_set():
            status, output = probe(target, timeout_s)
            if not stop.is_set():
                self._report(check_id, status, output)
            stop.wait(interval_s)
