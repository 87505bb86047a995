"""Content-addressed blobs: every artifact byte the registry serves lives in a `BlobStore`.

Two stores: `LocalBlobStore` (this module, a folder on local disk) and `S3BlobStore`
(services/registry/s3_blobs.py, keys `prefix/sha256/ab/cdef...`). Both hash while they write and
make a blob visible only whole, so a name that exists always holds its content.

Local layout: `root/sha256/ab/cdef...`, the first two hex digits of the sha256 as a folder and the
other 62 as the file name, so no folder grows past a few thousand entries. A blob's name is its
content, which makes writes idempotent and lets a reader verify what it got.

Writes go to `root/tmp/` (the same filesystem, so the final `os.replace` is atomic), are
fsynced, made read-only and then renamed into place: a reader sees a whole blob or none, even
if the writer dies mid-stream. A crash can leave a stray file in `root/tmp/`, never a partial
blob.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from services.common.errors import InvalidArgument, NotFound

DEFAULT_CHUNK_BYTES = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def validate_sha256(sha256_hex: object) -> str:
    """`sha256_hex` if it is 64 lowercase hex digits; InvalidArgument otherwise.

    Blob paths are built from this string, so anything else (`../`, slashes, uppercase that
    would alias another file on a case-insensitive disk) must never reach the filesystem.
    """
    if not isinstance(sha256_hex, str) or _SHA256_HEX.fullmatch(sha256_hex) is None:
        raise InvalidArgument(f"sha256 must be 64 lowercase hex digits, got {sha256_hex!r}")
    return sha256_hex


class BlobStore(Protocol):
    def describe(self) -> str:
        """Where the blobs live, for log lines."""

    def exists(self, sha256_hex: str) -> bool: ...

    def size_bytes(self, sha256_hex: str) -> int:
        """NotFound when the blob is missing."""

    def iter_chunks(self, sha256_hex: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """NotFound at the call (not on the first next()) when the blob is missing."""

    def verify(self, sha256_hex: str) -> bool:
        """Whether the stored bytes still hash to their name."""

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store the concatenated chunks; (sha256_hex, size_bytes). Idempotent."""

    def put_file(self, path: Path) -> tuple[str, int]: ...

    def delete(self, sha256_hex: str) -> None:
        """Remove the blob if present (the store calls this only once no version uses it)."""


class LocalBlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._blobs_dir = self.root / "sha256"
        self._tmp_dir = self.root / "tmp"
        self._blobs_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return str(self.root)

    def path_for(self, sha256_hex: str) -> Path:
        sha256_hex = validate_sha256(sha256_hex)
        return self._blobs_dir / sha256_hex[:2] / sha256_hex[2:]

    def exists(self, sha256_hex: str) -> bool:
        return self.path_for(sha256_hex).is_file()

    def size_bytes(self, sha256_hex: str) -> int:
        try:
            return self.path_for(sha256_hex).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {sha256_hex} not found") from None

    def open(self, sha256_hex: str) -> BinaryIO:
        try:
            return open(self.path_for(sha256_hex), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {sha256_hex} not found") from None

    def iter_chunks(
        self, sha256_hex: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The blob's bytes in chunks of at most `chunk_bytes`.

        The file is opened here, not on the first `next()`, so a missing blob raises NotFound
        at the call site (before a streaming reply has started).
        """
        if chunk_bytes <= 0:
            raise InvalidArgument(f"chunk_bytes must be positive, got {chunk_bytes}")
        blob = self.open(sha256_hex)
        return read_chunks(blob, chunk_bytes)

    def verify(self, sha256_hex: str) -> bool:
        """Whether the stored bytes still hash to their name (catches disk corruption)."""
        with self.open(sha256_hex) as blob:
            return hashlib.file_digest(blob, "sha256").hexdigest() == sha256_hex

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store the concatenated `chunks`; returns (sha256_hex, size_bytes).

        Putting content that is already stored leaves the existing blob as it is.
        """
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp_dir, prefix="put-")
        tmp_path = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size_bytes = 0
            with os.fdopen(fd, "wb") as tmp:
                for chunk in chunks:
                    tmp.write(chunk)
                    digest.update(chunk)
                    size_bytes += len(chunk)
                tmp.flush()
                os.fsync(tmp.fileno())
            sha256_hex = digest.hexdigest()
            final_path = self.path_for(sha256_hex)
            if final_path.is_file():
                tmp_path.unlink()
                return sha256_hex, size_bytes
            final_path.parent.mkdir(exist_ok=True)
            # Read-only: a blob's bytes are its name, nothing may rewrite them in place.
            tmp_path.chmod(0o444)
            os.replace(tmp_path, final_path)
            fsync_dir(final_path.parent)
            return sha256_hex, size_bytes
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise

    def put_file(self, path: Path) -> tuple[str, int]:
        with open(path, "rb") as source:
            return self.put_stream(read_chunks(source, DEFAULT_CHUNK_BYTES))

    def delete(self, sha256_hex: str) -> None:
        path = self.path_for(sha256_hex)
        path.unlink(missing_ok=True)
        if path.parent.is_dir():
            fsync_dir(path.parent)


def read_chunks(file: BinaryIO, chunk_bytes: int) -> Iterator[bytes]:
    with file:
        while chunk := file.read(chunk_bytes):
            yield chunk


def fsync_dir(directory: Path) -> None:
    # The rename is durable only once the folder entry itself reaches the disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
