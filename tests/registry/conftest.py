"""Registry test fixtures: a session PostgreSQL server, a session moto S3 server, and a store
built on (SQLite + local disk) or (PostgreSQL + S3)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.registry.blobs import BlobStore, LocalBlobStore
from services.registry.database import open_database
from services.registry.s3_blobs import S3BlobStore
from services.registry.store import ModelStore
from tests.conftest import free_port
from tests.registry.postgres_server import find_pg_bin, start_postgres
from tests.registry.s3_server import S3_ENV, S3Server


@pytest.fixture(scope="session")
def postgres():
    if find_pg_bin() is None:
        pytest.skip("no PostgreSQL binaries (apt-get install postgresql; scripts/setup does it as root)")
    server = start_postgres(free_port())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3():
    # boto3 reads its credentials from the environment, in this process and in registry children.
    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()


@dataclass
class Backend:
    """Where a store's metadata and blobs live, as a registry's flags would name them."""

    name: str
    database_url: str
    blob_store: str  # "" : local disk under data_dir
    s3_endpoint_url: str
    data_dir: Path

    def open_blobs(self) -> BlobStore:
        if not self.blob_store:
            return LocalBlobStore(self.data_dir / "blobs")
        return S3BlobStore(self.blob_store, self.data_dir / "s3-spool", self.s3_endpoint_url)

    def open_store(self, clock=None) -> ModelStore:
        database = open_database(self.database_url, self.data_dir / "registry.sqlite3")
        return ModelStore(database, self.open_blobs(), **({"clock": clock} if clock else {}))

    def registry_flags(self) -> list[str]:
        flags = ["--data-dir", str(self.data_dir)]
        if self.database_url:
            flags += ["--database-url", self.database_url]
        if self.blob_store:
            flags += ["--blob-store", self.blob_store, "--s3-endpoint-url", self.s3_endpoint_url]
        return flags


@pytest.fixture(params=["sqlite+local", "postgresql+s3"])
def backend(request, tmp_path: Path) -> Backend:
    if request.param == "sqlite+local":
        return Backend(request.param, "", "", "", tmp_path / "registry")
    postgres = request.getfixturevalue("postgres")
    s3 = request.getfixturevalue("s3")
    return Backend(request.param, postgres.create_database(), f"s3://{s3.create_bucket()}/models",
                   s3.endpoint_url, tmp_path / "registry")


@pytest.fixture
def store(backend: Backend):
    backend.data_dir.mkdir(parents=True, exist_ok=True)
    with backend.open_store() as model_store:
        yield model_store
