"""Workers on one host share one file cache: several fetching the same version at the same moment
all succeed, none sees a half-written file, and each blob crosses the wire once."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import traceback
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.registry.client import register_folder
from tests.faults.conftest import cli, free_port, health_status, stop, wait_until

NUM_FETCHERS = 4


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry process, its address and its metrics URL (it counts DownloadBlob calls)."""
    home = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{free_port()}"
    metrics_port = free_port()
    process = cli("registry", "--port", address.split(":")[1], "--data-dir", str(home / "data"),
                  "--metrics-port", str(metrics_port), log_path=home / "registry.log")
    wait_until(lambda: health_status(address) == health_pb2.HealthCheckResponse.SERVING, 60,
               "the registry to serve")
    yield address, f"http://127.0.0.1:{metrics_port}/metrics"
    assert stop(process) == 0


def model_folder(root: Path) -> Path:
    """Files as a model has them: one large weights file, small ones, a nested path; random bytes,
    so no other test's blobs are shared with this one."""
    folder = root / "model"
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(24 << 20))
    (folder / "config.json").write_bytes(os.urandom(1 << 10))
    (folder / "tokenizer.json").write_bytes(os.urandom(300 << 10))
    (folder / "nested" / "deeper" / "vocab.txt").write_bytes(os.urandom(4 << 10))
    return folder


def num_blob_downloads(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("tensoryard_grpc_requests_total{") and 'grpc_method="DownloadBlob"' in line
    )


def _fetch_at_the_barrier(registry_address: str, model_name: str, cache_dir: str, barrier, results) -> None:
    """Runs in a fresh process (spawn): connect, wait for the others, then fetch all at once."""
    from services.worker.model_files import fetch_version

    async def fetch() -> str:
        async with grpc.aio.insecure_channel(registry_address) as channel:
            await channel.channel_ready()
            barrier.wait(timeout=60)
            fetched = await fetch_version(channel, model_name, 0, Path(cache_dir))
            return str(fetched.folder)

    try:
        results.put(("ok", asyncio.run(fetch())))
    except BaseException:  # noqa: BLE001 - the test reports whatever went wrong in the child
        results.put(("failed", traceback.format_exc()))


def test_processes_fetching_one_version_at_once_all_succeed(registry, tmp_path):
    registry_address, metrics_url = registry
    folder = model_folder(tmp_path)
    with grpc.insecure_channel(registry_address) as channel:
        version, _ = register_folder(channel, "raced-model", "embedding", folder, {})
    cache_dir = tmp_path / "shared-cache"
    downloads_before = num_blob_downloads(metrics_url)

    context = multiprocessing.get_context("spawn")  # the parent has gRPC threads: never fork it
    barrier = context.Barrier(NUM_FETCHERS)
    results = context.Queue()
    processes = [
        context.Process(target=_fetch_at_the_barrier,
                        args=(registry_address, "raced-model", str(cache_dir), barrier, results))
        for _ in range(NUM_FETCHERS)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)

    failures = [detail for status, detail in outcomes if status != "ok"]
    assert not failures, "\n\n".join(failures)
    assert {detail for _, detail in outcomes} == {str(cache_dir / "models" / "raced-model" / str(version.version))}
    fetched = Path(outcomes[0][1])
    for file in version.files:
        assert (fetched / file.path).read_bytes() == (folder / file.path).read_bytes(), file.path
    # Nothing half-written is left behind (temporary blobs or links).
    assert not [p for p in cache_dir.rglob("*") if ".partial" in p.name or ".link" in p.name]
    # The others waited for the first download of each blob instead of fetching it again.
    assert num_blob_downloads(metrics_url) - downloads_before == len(version.files)


def fetch_here(registry_address: str, model_name: str, cache_dir: Path) -> Path:
    from services.worker.model_files import fetch_version

    async def fetch() -> Path:
        async with grpc.aio.insecure_channel(registry_address) as channel:
            return (await fetch_version(channel, model_name, 0, cache_dir)).folder

    return asyncio.run(fetch())


def test_a_cached_blob_changed_on_disk_is_fetched_again(registry, tmp_path):
    registry_address, _ = registry
    folder = model_folder(tmp_path)
    with grpc.insecure_channel(registry_address) as channel:
        register_folder(channel, "changed-in-cache", "embedding", folder, {})
    cache_dir = tmp_path / "cache"
    fetched = fetch_here(registry_address, "changed-in-cache", cache_dir)
    (fetched / "config.json").resolve().write_bytes(b"not what was registered")
    fetched = fetch_here(registry_address, "changed-in-cache", cache_dir)
    assert (fetched / "config.json").read_bytes() == (folder / "config.json").read_bytes()


def test_leftovers_of_a_killed_download_do_not_stop_the_next_fetch(registry, tmp_path):
    registry_address, _ = registry
    folder = model_folder(tmp_path)
    with grpc.insecure_channel(registry_address) as channel:
        version, _ = register_folder(channel, "killed-mid-download", "embedding", folder, {})
    cache_dir = tmp_path / "cache"
    weights = next(f for f in version.files if f.path == "model.safetensors")
    (cache_dir / "blobs").mkdir(parents=True)
    stale = cache_dir / "blobs" / f".{weights.sha256}.12345.deadbeef.partial"
    stale.write_bytes(b"the first megabyte, then the process was killed")
    fetched = fetch_here(registry_address, "killed-mid-download", cache_dir)
    assert (fetched / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert not stale.exists()
