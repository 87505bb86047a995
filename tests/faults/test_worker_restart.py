"""`tensoryard up --workers-per-model 2`: a worker killed with SIGKILL is reported and restarted,
while `up` keeps running and embedding requests through the router keep succeeding."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc
from tests.faults.conftest import MODEL, cli, free_port, stop, wait_until


def listed_workers(registry_address: str) -> set[str]:
    with grpc.insecure_channel(registry_address) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=MODEL), timeout=5
        )
    return {i.address for i in reply.instances}


def worker_pids(up_pid: int) -> set[int]:
    """The `up` process's children that run `services.cli worker`."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent_pid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent_pid == up_pid and b"worker" in argv:
            pids.add(int(stat.parent.name))
    return pids


class Traffic:
    """One client sending embedding requests through the router, back to back, on a thread."""

    def __init__(self, router_address: str):
        self.router_address = router_address
        self.num_ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        data = np.array([[b"a worker is about to be killed"]], dtype=object)
        text = triton.InferInput("text", list(data.shape), "BYTES")
        text.set_data_from_numpy(data)
        with triton.InferenceServerClient(self.router_address) as client:
            while not self._stop.is_set():
                try:
                    result = client.infer(MODEL, [text], client_timeout=10)
                    assert result.as_numpy("embedding").shape == (1, 384)
                    self.num_ok += 1
                except Exception as error:  # noqa: BLE001 - every failure is reported by the test
                    self.failures.append(repr(error))


@pytest.mark.slow
def test_a_killed_worker_is_restarted_while_requests_keep_succeeding(tmp_path):
    ports = [str(free_port()) for _ in range(4)]
    router, registry = f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
    output = tmp_path / "up.out"
    up = cli("up", "--no-llm", "--workers-per-model", "2", "--worker-threads", "1",
             "--home", str(tmp_path / "home"), "--router-port", ports[0], "--registry-port", ports[1],
             "--router-metrics-port", ports[2], "--registry-metrics-port", ports[3], log_path=output)
    try:
        wait_until(lambda: up.poll() is not None or "tensoryard is ready" in output.read_text(), 240,
                   "tensoryard up to be ready", interval_s=0.2)
        assert up.poll() is None, output.read_text()
        wait_until(lambda: len(listed_workers(registry)) == 2, 60, "both workers in discovery")
        before = listed_workers(registry)
        pids_before = worker_pids(up.pid)
        assert len(pids_before) == 2
        with Traffic(router) as traffic:
            wait_until(lambda: traffic.num_ok >= 20, 30, "requests to flow")
            victim = min(pids_before)
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: "restarting in" in output.read_text(), 10, "`up` to report the restart")
            # The replacement registers at a new port; the victim's entry goes when its lease expires.
            wait_until(lambda: (now := listed_workers(registry)) and len(now) == 2 and len(now & before) == 1,
                       90, "the restarted worker to be listed again", interval_s=0.2)
            num_ok_at_comeback = traffic.num_ok
            wait_until(lambda: traffic.num_ok >= num_ok_at_comeback + 20, 30, "requests after the comeback")
        assert traffic.failures == [], traffic.failures[:5]
        assert up.poll() is None, output.read_text()
        report = next(line for line in output.read_text().splitlines() if "restarting in" in line)
        assert "signal SIGKILL" in report and "worker-" in report and ".log" in report
        pids_after = worker_pids(up.pid)
        assert victim not in pids_after and len(pids_after) == 2
    finally:
        exit_code = stop(up, timeout_s=60)
    assert exit_code == 0, output.read_text()
    assert "tensoryard: stopped" in output.read_text()
