"""Blobs on S3 (or any S3-compatible store): `--blob-store s3://bucket/prefix`.

Keys are `prefix/sha256/ab/cdef...`, as on local disk. A write spools to a local temp file while
it hashes (the key is the content's sha256, known only at the end), then uploads under the
final key. An S3 PUT is atomic, and so is a multipart upload, which appears only when completed:
a key that exists holds the whole blob, even if the registry dies mid-upload. Credentials come
from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, a role).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.registry.blobs import DEFAULT_CHUNK_BYTES, validate_sha256


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; the prefix has no leading or trailing '/'."""
    if not url.startswith("s3://"):
        raise InvalidArgument(f"blob store {url!r}: expected s3://bucket/prefix")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise InvalidArgument(f"blob store {url!r} names no bucket")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise InvalidArgument(f"blob store {url!r}: the prefix must not have '.', '..' or empty parts")
    return bucket, prefix


class S3BlobStore:
    def __init__(self, url: str, spool_dir: Path, endpoint_url: str = "", client=None):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        self._client_errors = (BotoCoreError, ClientError)
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = url
        self._spool_dir = Path(spool_dir)
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        self._s3 = client or boto3.client("s3", endpoint_url=endpoint_url or None)
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except self._client_errors as error:
            raise Unavailable(f"blob store {url}: cannot reach bucket {self.bucket!r}: {error}") from None

    def describe(self) -> str:
        return self.url

    def key_for(self, sha256_hex: str) -> str:
        sha256_hex = validate_sha256(sha256_hex)
        key = f"sha256/{sha256_hex[:2]}/{sha256_hex[2:]}"
        return f"{self.prefix}/{key}" if self.prefix else key

    def _head(self, sha256_hex: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self._s3.head_object(Bucket=self.bucket, Key=self.key_for(sha256_hex))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise Unavailable(f"blob store {self.url}: {error}") from None

    def exists(self, sha256_hex: str) -> bool:
        return self._head(sha256_hex) is not None

    def size_bytes(self, sha256_hex: str) -> int:
        head = self._head(sha256_hex)
        if head is None:
            raise NotFound(f"blob {sha256_hex} not found")
        return int(head["ContentLength"])

    def iter_chunks(self, sha256_hex: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        if chunk_bytes <= 0:
            raise InvalidArgument(f"chunk_bytes must be positive, got {chunk_bytes}")
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=self.key_for(sha256_hex))["Body"]
        except self._s3.exceptions.NoSuchKey:
            raise NotFound(f"blob {sha256_hex} not found") from None
        return _body_chunks(body, chunk_bytes)

    def verify(self, sha256_hex: str) -> bool:
        digest = hashlib.sha256()
        for chunk in self.iter_chunks(sha256_hex):
            digest.update(chunk)
        return digest.hexdigest() == sha256_hex

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        fd, tmp_name = tempfile.mkstemp(dir=self._spool_dir, prefix="put-")
        tmp_path = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size_bytes = 0
            with os.fdopen(fd, "wb") as tmp:
                for chunk in chunks:
                    tmp.write(chunk)
                    digest.update(chunk)
                    size_bytes += len(chunk)
            sha256_hex = digest.hexdigest()
            self._upload(tmp_path, sha256_hex, size_bytes)
            return sha256_hex, size_bytes
        finally:
            tmp_path.unlink(missing_ok=True)

    def put_file(self, path: Path) -> tuple[str, int]:
        with open(path, "rb") as source:
            digest = hashlib.file_digest(source, "sha256")
        sha256_hex, size_bytes = digest.hexdigest(), Path(path).stat().st_size
        self._upload(Path(path), sha256_hex, size_bytes)
        return sha256_hex, size_bytes

    def _upload(self, path: Path, sha256_hex: str, size_bytes: int) -> None:
        head = self._head(sha256_hex)
        if head is not None and int(head["ContentLength"]) == size_bytes:
            return
        try:
            self._s3.upload_file(str(path), self.bucket, self.key_for(sha256_hex))
        except self._client_errors as error:
            raise Unavailable(f"blob store {self.url}: upload of {sha256_hex} failed: {error}") from None

    def delete(self, sha256_hex: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self.key_for(sha256_hex))


def _body_chunks(body, chunk_bytes: int) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(chunk_bytes)
    finally:
        body.close()
