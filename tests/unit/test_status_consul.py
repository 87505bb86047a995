"""`tensoryard status --discovery consul://...` on the Consul stand-in: the workers and routers Consul
lists as passing are the ones reported; one that fails its check is not; Consul away is a
discovery error and exit code 1, not a crash."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from protos.tensoryard.v1 import discovery_pb2
from services.common.discovery_consul import ConsulDiscovery
from tests.conftest import REPO_ROOT


def status(consul_port: int) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "status", "--discovery", f"consul://127.0.0.1:{consul_port}",
         "--once", "--json", "--interval", "0.2", "--timeout", "0.5"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout)


def test_status_lists_what_consul_passes(consul_standin):
    healthy = {"w-ok": True, "w-stalled": False}

    async def register() -> tuple:
        discovery = ConsulDiscovery(consul_standin.url)
        registrations = [await discovery.register(discovery_pb2.Instance(
            instance_id=instance_id, service="worker", address=f"127.0.0.1:{50051 + i}", model_name="m",
            model_version="3", metadata={"metrics_port": "1"}), ttl_ms=30_000, healthy=lambda i=instance_id: healthy[i])
            for i, instance_id in enumerate(healthy)]
        router = await discovery.register(discovery_pb2.Instance(
            instance_id="r1", service="router", address="127.0.0.1:8001", metadata={"metrics_port": "2"}),
            ttl_ms=30_000)
        return discovery, registrations + [router]

    async def main():
        discovery, registrations = await register()
        code, report = await asyncio.to_thread(status, consul_standin.port)
        for registration in registrations:
            await registration.stop()
        await discovery.close()
        return code, report

    code, report = asyncio.run(main())
    assert code == 0 and report["discovery_error"] is None
    (model,) = report["models"]
    assert (model["model"], model["version"], model["num_replicas"]) == ("m", "3", 1)
    assert [r["worker_id"] for r in model["replicas"]] == ["w-ok"]
    assert [r["metrics_url"] for r in report["routers"]] == ["http://127.0.0.1:2/metrics"]


def test_consul_away_is_a_discovery_error_and_exit_code_1(consul_standin):
    port = consul_standin.port
    consul_standin.stop()
    code, report = status(port)
    assert code == 1 and "consul http://127.0.0.1:" in report["discovery_error"]
