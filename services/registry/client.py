"""Registering a model folder with a running registry over gRPC (used by the CLI and `up`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc

UPLOAD_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class LocalFile:
    path: str  # relative, "/"-separated
    absolute: Path
    sha256: str
    size_bytes: int


def scan_folder(folder: Path) -> list[LocalFile]:
    """Every non-hidden file under `folder`, hashed."""
    files = []
    for absolute in sorted(folder.rglob("*")):
        relative = absolute.relative_to(folder)
        if not absolute.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        digest = hashlib.sha256()
        with open(absolute, "rb") as f:
            while chunk := f.read(UPLOAD_CHUNK_BYTES):
                digest.update(chunk)
        files.append(LocalFile(relative.as_posix(), absolute, digest.hexdigest(), absolute.stat().st_size))
    return files


def _chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(UPLOAD_CHUNK_BYTES):
            yield registry_pb2.BlobChunk(data=chunk)


def register_folder(
    channel: grpc.Channel, name: str, task: str, folder: Path, config: dict, description: str = ""
) -> tuple[registry_pb2.ModelVersion, bool]:
    """Upload `folder` as the next version of `name` (creating the model if needed).

    Returns (version, created). When the latest version already holds exactly these files and
    config, nothing is uploaded and that version comes back with created=False.
    """
    stub = registry_pb2_grpc.ModelRegistryStub(channel)
    files = scan_folder(folder)
    if not files:
        raise ValueError(f"{folder} holds no files to register")
    config_json = json.dumps(config, sort_keys=True)
    try:
        stub.GetModel(registry_pb2.GetModelRequest(name=name))
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        stub.CreateModel(registry_pb2.CreateModelRequest(name=name, task=task, description=description))
    else:
        latest = _latest_version(stub, name)
        if latest is not None and _same(latest, files, config):
            return latest, False
    for file in files:
        ref = stub.UploadBlob(_chunks(file.absolute))
        if ref.sha256 != file.sha256:
            raise RuntimeError(f"{file.path} changed while uploading (sha256 {ref.sha256} != {file.sha256})")
    version = stub.CreateVersion(
        registry_pb2.CreateVersionRequest(
            model_name=name,
            files=[registry_pb2.ModelFile(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes) for f in files],
            config_json=config_json,
        )
    )
    return version, True


def _latest_version(stub, name: str) -> registry_pb2.ModelVersion | None:
    try:
        return stub.GetVersion(registry_pb2.GetVersionRequest(model_name=name, version=0))
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _same(version: registry_pb2.ModelVersion, files: list[LocalFile], config: dict) -> bool:
    stored = {(f.path, f.sha256) for f in version.files}
    return stored == {(f.path, f.sha256) for f in files} and json.loads(version.config_json or "{}") == config
