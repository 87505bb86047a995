"""Pushing a model folder to a running registry over gRPC (the CLI's `models push|import`, `up`).

A push survives interruption: each file is uploaded under an upload_id derived from its sha256, so
running the same push again asks GetUpload what the registry already holds, skips blobs it has
stored and continues a partly uploaded file from the bytes it received. The version is created
(and verified by the registry) only once every blob is there.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services.registry.metadata_probe import ProbedMetadata, probe_folder
from services.registry.records import check_link_stays_inside

UPLOAD_CHUNK_BYTES = 1 << 20
UPLOAD_ATTEMPTS = 3
RETRY_PAUSE_S = 1.0


@dataclass(frozen=True, slots=True)
class LocalFile:
    path: str  # relative, "/"-separated
    absolute: Path
    sha256: str
    size_bytes: int

    @property
    def upload_id(self) -> str:
        # Deterministic, so a rerun finds the bytes an interrupted run sent (the proto allows 8-64
        # letters, digits and '-'; a sha256 in hex is 64).
        return self.sha256


def scan_folder(folder: Path) -> list[LocalFile]:
    """Every non-hidden file under `folder` (symlinks followed, as in an HF cache snapshot), hashed."""
    files = []
    for absolute in sorted(Path(folder).rglob("*")):
        relative = absolute.relative_to(folder)
        if not absolute.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        check_link_stays_inside(folder, absolute)
        files.append(LocalFile(relative.as_posix(), absolute, file_sha256(absolute), absolute.stat().st_size))
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(UPLOAD_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class UploadProgress(Protocol):
    """What a push reports while it runs (the CLI draws a bar or prints lines)."""

    def file_started(self, file: LocalFile, offset_bytes: int) -> None: ...
    def advanced(self, num_bytes: int) -> None: ...
    def file_skipped(self, file: LocalFile) -> None: ...
    def file_done(self, file: LocalFile) -> None: ...


class NoProgress:
    def file_started(self, file: LocalFile, offset_bytes: int) -> None:
        pass

    def advanced(self, num_bytes: int) -> None:
        pass

    def file_skipped(self, file: LocalFile) -> None:
        pass

    def file_done(self, file: LocalFile) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Source:
    """Where a version comes from (its Lineage): "push", "folder", "hf_folder", "hf_cache", ..."""

    kind: str
    uri: str
    details: dict[str, str] = field(default_factory=dict)
    parent_version: int = 0
    created_by: str = ""


@dataclass(frozen=True, slots=True)
class PushOptions:
    chunk_bytes: int = UPLOAD_CHUNK_BYTES
    # Sending more slowly than this waits between chunks (0: as fast as the link goes).
    max_bytes_per_s: float = 0.0

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, not {self.chunk_bytes}")
        if self.max_bytes_per_s < 0:
            raise ValueError(f"max_bytes_per_s must be >= 0, not {self.max_bytes_per_s}")


@dataclass(frozen=True, slots=True)
class FileUpload:
    """What the push did with one file."""

    path: str
    sha256: str
    size_bytes: int
    # "stored": the registry had the blob already; "resumed": continued from resumed_at_bytes;
    # "uploaded": sent from the start.
    outcome: str
    resumed_at_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PushResult:
    version: registry_pb2.ModelVersion
    created: bool  # False: the latest version already held exactly these files and config
    uploads: tuple[FileUpload, ...] = ()


def push_folder(
    channel: grpc.Channel, name: str, task: str, folder: Path, config: dict, source: Source,
    description: str = "", labels: dict[str, str] | None = None, metadata: ProbedMetadata | None = None,
    progress: UploadProgress | None = None, options: PushOptions = PushOptions(),
    files: list[LocalFile] | None = None, gate: registry_pb2.Gate | None = None,
) -> PushResult:
    """Upload `folder` as the next version of `name` (creating the model if needed).

    `metadata` and `files` (the folder scanned) are worked out here unless given. When the latest
    version already holds exactly these files, config, labels and gate, nothing is uploaded and that
    version comes back with created=False.
    """
    stub = registry_pb2_grpc.ModelRegistryStub(channel)
    progress = progress or NoProgress()
    files = scan_folder(folder) if files is None else files
    if not files:
        raise ValueError(f"{folder} holds no files to push")
    labels = dict(labels or {})
    metadata = metadata or probe_folder(folder)
    try:
        stub.GetModel(registry_pb2.GetModelRequest(name=name))
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        stub.CreateModel(registry_pb2.CreateModelRequest(name=name, task=task, description=description))
    else:
        latest = _latest_version(stub, name)
        if latest is not None and _same(latest, files, config, labels, gate or registry_pb2.Gate()):
            return PushResult(latest, False)
    uploads = tuple(_upload(stub, file, progress, options) for file in files)
    version = stub.CreateVersion(
        registry_pb2.CreateVersionRequest(
            model_name=name,
            files=[registry_pb2.ModelFile(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes) for f in files],
            config_json=json.dumps(config, sort_keys=True),
            metadata=registry_pb2.VersionMetadata(
                architecture=metadata.architecture, dtype=metadata.dtype,
                parameter_count=metadata.parameter_count, tokenizer=metadata.tokenizer, labels=labels,
            ),
            lineage=registry_pb2.Lineage(
                source_kind=source.kind, source_uri=source.uri, parent_version=source.parent_version,
                created_by=source.created_by, details=source.details,
            ),
            gate=gate,
        )
    )
    return PushResult(version, True, uploads)


def register_folder(
    channel: grpc.Channel, name: str, task: str, folder: Path, config: dict, description: str = ""
) -> tuple[registry_pb2.ModelVersion, bool]:
    """`push_folder` with the folder's path as its lineage; returns (version, created)."""
    source = Source("folder", str(Path(folder).resolve()))
    result = push_folder(channel, name, task, folder, config, source, description)
    return result.version, result.created


def _upload(stub, file: LocalFile, progress: UploadProgress, options: PushOptions) -> FileUpload:
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        held = _held(stub, file)
        if file.sha256 in held.stored_sha256:
            progress.file_skipped(file)
            return FileUpload(file.path, file.sha256, file.size_bytes, "stored")
        offset = held.received_bytes
        progress.file_started(file, offset)
        try:
            ref = _send(stub, _chunks(file, offset, progress, options))
            break
        except grpc.RpcError as error:
            # The registry may still hold the stream of an interrupted push (it lets go once it
            # notices the client is gone), or have taken more bytes since GetUpload: ask again.
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION or attempt == UPLOAD_ATTEMPTS:
                raise
            time.sleep(RETRY_PAUSE_S)
    if ref.sha256 != file.sha256 or ref.size_bytes != file.size_bytes:
        raise RuntimeError(
            f"{file.path}: the registry stored sha256 {ref.sha256} ({ref.size_bytes} bytes), not "
            f"{file.sha256} ({file.size_bytes} bytes): the file changed while uploading"
        )
    progress.file_done(file)
    outcome = "resumed" if offset else "uploaded"
    return FileUpload(file.path, file.sha256, file.size_bytes, outcome, offset)


def _send(stub, chunks: Iterator) -> registry_pb2.BlobRef:
    # As a future, so that Ctrl-C reaches us while it streams (a blocking call would hold the
    # signal back until the upload ends); cancelling tells the registry to keep the bytes so far.
    call = stub.UploadBlob.future(chunks)
    try:
        return call.result()
    except KeyboardInterrupt:
        call.cancel()
        raise


def _chunks(file: LocalFile, offset: int, progress: UploadProgress, options: PushOptions) -> Iterator:
    # The first message names the upload and where its data starts, even when it is empty (an
    # empty file, or one the registry holds all of but has not stored yet).
    started = time.monotonic()
    num_sent_bytes = 0
    with open(file.absolute, "rb") as f:
        f.seek(offset)
        data = f.read(options.chunk_bytes)
        message = registry_pb2.BlobChunk(data=data, upload_id=file.upload_id, offset=offset)
        while True:
            following = f.read(options.chunk_bytes)  # one ahead: the registry needs to know the last
            message.last = not following
            yield message
            num_sent_bytes += len(data)
            progress.advanced(len(data))
            if options.max_bytes_per_s:
                ahead_s = num_sent_bytes / options.max_bytes_per_s - (time.monotonic() - started)
                if ahead_s > 0:
                    time.sleep(ahead_s)
            if not following:
                return
            data = following
            message = registry_pb2.BlobChunk(data=data)


def _held(stub, file: LocalFile) -> registry_pb2.GetUploadResponse:
    try:
        return stub.GetUpload(registry_pb2.GetUploadRequest(upload_id=file.upload_id, sha256=[file.sha256]))
    except grpc.RpcError as error:
        # A registry from before resumable uploads: send every file whole.
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return registry_pb2.GetUploadResponse()
        raise


def _latest_version(stub, name: str) -> registry_pb2.ModelVersion | None:
    try:
        return stub.GetVersion(registry_pb2.GetVersionRequest(model_name=name, version=0))
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _same(version: registry_pb2.ModelVersion, files: list[LocalFile], config: dict, labels: dict,
          gate: registry_pb2.Gate) -> bool:
    stored = {(f.path, f.sha256) for f in version.files}
    return (stored == {(f.path, f.sha256) for f in files}
            and json.loads(version.config_json or "{}") == config
            and dict(version.metadata.labels) == labels
            and version.gate == gate)
