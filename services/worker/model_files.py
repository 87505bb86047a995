"""Fetch one model version's files from the registry into a local folder, verifying each sha256.

Files are cached by content (`cache_dir/blobs/<sha256>`); a version's folder
(`cache_dir/models/<name>/<version>/`) links each relative path to its blob. A download whose
bytes do not hash to the recorded sha256 is deleted and refused with IntegrityError: the worker
never loads, and so never registers, a model whose files were changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services.common.errors import IntegrityError
from services.common.telemetry import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class FetchedVersion:
    model_name: str
    version: int
    task: str
    config: dict
    folder: Path


async def fetch_version(channel, model_name: str, version: int, cache_dir: Path) -> FetchedVersion:
    stub = registry_pb2_grpc.ModelRegistryStub(channel)
    manifest = await stub.GetVersion(
        registry_pb2.GetVersionRequest(model_name=model_name, version=version)
    )
    blob_dir = cache_dir / "blobs"
    blob_dir.mkdir(parents=True, exist_ok=True)
    folder = cache_dir / "models" / manifest.model_name / str(manifest.version)
    for file in manifest.files:
        blob = blob_dir / file.sha256
        if not blob.exists() or _sha256_of(blob) != file.sha256:
            await _download(stub, file, blob)
        target = folder / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        os.symlink(blob.resolve(), target)
    log.info("model_files_ready", model=manifest.model_name, version=manifest.version,
             num_files=len(manifest.files), folder=str(folder))
    return FetchedVersion(
        model_name=manifest.model_name,
        version=manifest.version,
        task=manifest.task,
        config=json.loads(manifest.config_json or "{}"),
        folder=folder,
    )


async def _download(stub, file: registry_pb2.ModelFile, blob: Path) -> None:
    partial = blob.with_suffix(".partial")
    digest = hashlib.sha256()
    size_bytes = 0
    with open(partial, "wb") as out:
        async for chunk in stub.DownloadBlob(registry_pb2.DownloadBlobRequest(sha256=file.sha256)):
            digest.update(chunk.data)
            size_bytes += len(chunk.data)
            out.write(chunk.data)
    if digest.hexdigest() != file.sha256 or size_bytes != file.size_bytes:
        partial.unlink()
        raise IntegrityError(
            f"file '{file.path}' failed verification: expected sha256 {file.sha256} "
            f"({file.size_bytes} bytes), received sha256 {digest.hexdigest()} ({size_bytes} bytes); "
            f"refusing to load it"
        )
    os.replace(partial, blob)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
