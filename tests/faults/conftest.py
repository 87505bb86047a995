"""Fault tests: real processes that are killed, stopped, raced or made to fail.

Helpers come from tests/conftest.py. The LLM fleets here are started once per session:
- `fleet`: `tensoryard up --no-embedding --workers-per-model 2` (SmolLM2, two workers), with fault
  injection on, a short drain grace period and a short engine-progress window, for the kill, stop,
  drain, hang and crash tests; `up` supervises (restarts) its workers.
- `small_fleet`: two more workers of the same weights registered as another model with 4 seats and a
  small KV cache, started by hand against the fleet's registry, for overload, fairness and KV-aware
  routing tests: a small batch keeps steps short, a small cache makes prefix placement matter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import MODEL, REPO_ROOT, cli, free_port, health_status, start_up, stop, wait_until  # noqa: F401

LLM = "SmolLM2-135M-Instruct"
SMALL_LLM = "smollm2-four-seats"
DRAIN_TIMEOUT_S = 4.0
PROGRESS_TIMEOUT_S = 1.5
# 4 seats (a short full-batch step: the engine is always mid-step under overload, and a newcomer
# waits for that step too); a pool of 120 blocks of 16 tokens (1,920 tokens): room for about half of
# 16 prefixes of ~180 tokens on each replica, beside the sequences running.
SMALL_LLM_CONFIG = {"max_num_seqs": 4, "max_model_len": 1024, "kv_cache_bytes": 120 * 16 * 46_080}


@dataclass
class Worker:
    instance_id: str
    address: str
    pid: int

    def stats(self) -> worker_pb2.WorkerStats:
        with grpc.insecure_channel(self.address) as channel:
            return worker_pb2_grpc.WorkerControlStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=5)

    def inject(self, fault, duration_s: float = 0.0) -> None:
        with grpc.insecure_channel(self.address) as channel:
            worker_pb2_grpc.WorkerControlStub(channel).InjectFault(
                worker_pb2.InjectFaultRequest(fault=fault, duration_s=duration_s), timeout=5
            )


@dataclass
class Fleet:
    router: str
    registry: str
    home: Path
    output_path: Path
    model: str = LLM
    processes: list = field(default_factory=list)
    up_pid: int = 0

    def router_pid(self) -> int:
        """The router `up` runs."""
        return next(pid for pid in child_pids(self.up_pid) if b"router" in _argv(pid))

    def workers(self, model: str | None = None) -> list[Worker]:
        with grpc.insecure_channel(self.registry) as channel:
            reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
                discovery_pb2.ListRequest(service="worker", model_name=model or self.model), timeout=5
            )
        return sorted((Worker(i.instance_id, i.address, int(i.metadata["pid"])) for i in reply.instances),
                      key=lambda w: w.instance_id)

    def wait_for_workers(self, count: int = 2, model: str | None = None, timeout_s: float = 180) -> list[Worker]:
        """Until `count` workers are listed and each answers SERVING."""
        def ready():
            workers = self.workers(model)
            serving = [w for w in workers if health_status(w.address, timeout_s=1) == 1]
            return workers if len(serving) == count == len(workers) else None

        return wait_until(ready, timeout_s, f"{count} serving workers of {model or self.model}", interval_s=0.2)


def _up_env() -> dict[str, str]:
    return {
        "TENSORYARD_ENABLE_FAULT_INJECTION": "1",
        "TENSORYARD_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        "TENSORYARD_PROGRESS_TIMEOUT_S": str(PROGRESS_TIMEOUT_S),
    }


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> Fleet:
    up = start_up(tmp_path_factory.mktemp("fleet"), "--no-embedding", "--workers-per-model", "2",
                  env=_up_env(), timeout_s=300)
    fleet = Fleet(up.router, up.registry, up.home, up.output_path, up_pid=up.process.pid)
    fleet.wait_for_workers(2)
    yield fleet
    stop(up.process, timeout_s=60)


@pytest.fixture(scope="session")
def small_fleet(fleet: Fleet) -> Fleet:
    """Two 4-seat workers of SMALL_LLM beside the fleet (same registry and router)."""
    from services.registry.client import register_folder

    with grpc.insecure_channel(fleet.registry) as channel:
        register_folder(channel, SMALL_LLM, "generation", fleet.home / "imports" / LLM, SMALL_LLM_CONFIG)
    processes = [
        cli("worker", "--model-name", SMALL_LLM, "--registry", fleet.registry, "--num-threads", "1",
            "--cache-dir", str(fleet.home / "worker-cache"), "--metrics-port", "-1",
            log_path=fleet.home / f"small-worker-{index}.log", env=_up_env())
        for index in range(2)
    ]
    small = Fleet(fleet.router, fleet.registry, fleet.home, fleet.output_path, SMALL_LLM, processes, fleet.up_pid)
    small.wait_for_workers(2)
    yield small
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def start_router(fleet: Fleet, *args: str, log_name: str = "router-extra.log") -> tuple[subprocess.Popen, str]:
    """Another router on the fleet's registry (routers are stateless), with its own flags."""
    port = free_port()
    process = cli("router", "--port", str(port), "--registry", fleet.registry, "--metrics-port", "-1", *args,
                  log_path=fleet.home / log_name)
    address = f"127.0.0.1:{port}"
    wait_until(lambda: health_status(address) == 1, 60, "the extra router to serve")
    return process, address


def wait_pid_gone(pid: int, timeout_s: float) -> float:
    """Seconds until process `pid` is gone (or a zombie)."""
    started = time.monotonic()

    def gone():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state == "Z"

    wait_until(gone, timeout_s, f"process {pid} to exit", interval_s=0.02)
    return time.monotonic() - started


def signal_pid(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)


def child_pids(parent_pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent_pid:
                children.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return children


def _argv(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
