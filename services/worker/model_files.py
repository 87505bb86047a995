"""Fetch one model version's files from the registry into a local folder, verifying each sha256.

Files are cached by content (`cache_dir/blobs/<sha256>`); a version's folder
(`cache_dir/models/<name>/<version>/`) links each relative path to its blob. A download whose
bytes do not hash to the recorded sha256 is deleted and refused with IntegrityError: the worker
never loads, and so never registers, a model whose files were changed.

Every worker on a host shares one `cache_dir`, and `tensoryard up --workers-per-model 2` starts
them at the same moment, so the cache is safe across processes:
- one `flock` per blob (`cache_dir/locks/<sha256>.lock`) serialises its download; whoever takes
  the lock second re-verifies the blob and finds it there, so each blob is downloaded once;
- a blob appears only by `os.replace` of a fully written, verified temp file with a unique name,
  so no reader ever sees half a blob;
- a link is made as a uniquely named temp symlink and `os.replace`d onto its path, which swaps
  it atomically whether or not another process made the same link a moment before.
Lock files are never deleted: unlinking one while another process waits on it would let a third
lock a fresh inode and download alongside the holder.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services.common.errors import IntegrityError
from services.common.telemetry import get_logger

log = get_logger(__name__)

# How often a waiter retries a lock held by another process (its download takes far longer).
LOCK_RETRY_S = 0.05


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
    lock_dir = cache_dir / "locks"
    blob_dir.mkdir(parents=True, exist_ok=True)
    lock_dir.mkdir(parents=True, exist_ok=True)
    folder = cache_dir / "models" / manifest.model_name / str(manifest.version)
    for file in manifest.files:
        blob = (blob_dir / file.sha256).resolve()
        async with _exclusive(lock_dir / f"{file.sha256}.lock"):
            # Checked under the lock: another worker may have just finished this very blob.
            if not await asyncio.to_thread(_is_intact, blob, file):
                _remove_stale_partials(blob)
                await _download(stub, file, blob)
        _link(folder / file.path, blob)
    log.info("model_files_ready", model=manifest.model_name, version=manifest.version,
             num_files=len(manifest.files), folder=str(folder))
    return FetchedVersion(
        model_name=manifest.model_name,
        version=manifest.version,
        task=manifest.task,
        config=json.loads(manifest.config_json or "{}"),
        folder=folder,
    )


@asynccontextmanager
async def _exclusive(lock_path: Path) -> AsyncIterator[None]:
    """An exclusive flock on `lock_path`, waited for without blocking the event loop (health
    probes keep getting answers) and without a thread that a cancelled fetch would leave holding
    the lock: non-blocking tries with a short sleep between them."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(LOCK_RETRY_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock, also when the process dies


def _is_intact(blob: Path, file: registry_pb2.ModelFile) -> bool:
    """Re-hashed on every start: the cache is a local copy anyone could have changed."""
    try:
        if blob.stat().st_size != file.size_bytes:
            return False
    except FileNotFoundError:
        return False
    return _sha256_of(blob) == file.sha256


def _remove_stale_partials(blob: Path) -> None:
    """Temp files of this blob left by a process killed mid-download; safe to delete because
    only the holder of the blob's lock writes them."""
    for partial in blob.parent.glob(f".{blob.name}.*.partial"):
        partial.unlink(missing_ok=True)


async def _download(stub, file: registry_pb2.ModelFile, blob: Path) -> None:
    partial = blob.with_name(f".{blob.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    digest = hashlib.sha256()
    size_bytes = 0
    try:
        with open(partial, "wb") as out:
            async for chunk in stub.DownloadBlob(registry_pb2.DownloadBlobRequest(sha256=file.sha256)):
                digest.update(chunk.data)
                size_bytes += len(chunk.data)
                out.write(chunk.data)
        if digest.hexdigest() != file.sha256 or size_bytes != file.size_bytes:
            raise IntegrityError(
                f"file '{file.path}' failed verification: expected sha256 {file.sha256} "
                f"({file.size_bytes} bytes), received sha256 {digest.hexdigest()} ({size_bytes} bytes); "
                f"refusing to load it"
            )
        # No fsync: a blob torn by a crash fails the hash check at the next start and is fetched again.
        os.replace(partial, blob)
    finally:
        partial.unlink(missing_ok=True)


def _link(target: Path, blob: Path) -> None:
    """Point `target` at `blob` atomically; idempotent, and safe against another process doing
    the same at the same moment (the last replace wins, and both wrote the same link)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() and os.readlink(target) == str(blob):
        return
    temp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(blob, temp)
    try:
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
