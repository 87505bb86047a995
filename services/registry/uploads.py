"""Resumable uploads: the bytes of an interrupted upload, kept so the client can continue.

An upload that names an `upload_id` appends to `<spool>/<upload_id>`, fsync'd after every
chunk, so what `held_bytes` reports after a crash (kill -9 of the registry, a dropped client) is
on disk. A client resumes by sending the bytes from that offset; any other offset is refused,
saying what is held. When the stream ends the whole file is hashed and moved into the blob store,
and the spool file goes: the blob store, not the spool, is what versions name.

One stream per upload at a time (an flock on the spool file): two writers appending to one file
would interleave their bytes.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterable
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument
from services.registry.blobs import BlobStore, fsync_dir

_UPLOAD_ID = re.compile(r"[A-Za-z0-9-]{8,64}")


def validate_upload_id(upload_id: object) -> str:
    if not isinstance(upload_id, str) or _UPLOAD_ID.fullmatch(upload_id) is None:
        raise InvalidArgument(f"invalid upload_id {upload_id!r}: use 8-64 letters, digits or '-'")
    return upload_id


class UploadSpool:
    def __init__(self, root: Path, blobs: BlobStore):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._blobs = blobs

    def _path(self, upload_id: str) -> Path:
        return self.root / validate_upload_id(upload_id)

    def held_bytes(self, upload_id: str) -> int:
        try:
            return self._path(upload_id).stat().st_size
        except FileNotFoundError:
            return 0

    def put(self, upload_id: str, offset: int, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Append `chunks` at `offset` (which must equal what is held) and, once they end, store
        the whole upload as a blob: (sha256_hex, size_bytes).

        If `chunks` raises (the client went away), the bytes received so far stay for a resume.
        """
        path = self._path(upload_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FailedPrecondition(f"upload {upload_id} is being written by another stream") from None
            held = os.fstat(fd).st_size
            if offset != held:
                raise FailedPrecondition(
                    f"upload {upload_id} holds {held} bytes: resume at offset {held}, not {offset}"
                )
            if held == 0:
                fsync_dir(self.root)
            for chunk in chunks:
                _write_all(fd, chunk)
                os.fsync(fd)
            stored = self._blobs.put_file(path)
            path.unlink()
            return stored
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
