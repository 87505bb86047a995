"""The registry's metadata: models and their immutable, numbered versions, on SQLite.

A version names its files by sha256; the bytes live in the `BlobStore`, which must hold every
blob before a version may point at it, so a committed version is always servable.

Threads share one connection behind a lock rather than one connection per thread: registry
metadata calls take microseconds, a lock makes each transaction serializable without SQLITE_BUSY
retries inside the process, and thread pools (grpc, asyncio.to_thread) would otherwise leave a
connection behind on every worker thread. WAL mode still matters: another process (the CLI
reading `models list`, a second registry during a restart) reads without blocking our writer.
Writes use BEGIN IMMEDIATE so that even across processes the next version number is computed
and inserted under one write lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.registry.blobs import BlobStore
from services.registry.records import (
    FileRecord,
    ModelRecord,
    Task,
    VersionRecord,
    canonical_config_json,
    validate_model_name,
    validate_task,
)

# Entry i upgrades the schema from version i to i + 1; append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE models (
            name         TEXT PRIMARY KEY,
            task         TEXT NOT NULL CHECK (task IN ('embedding', 'generation', 'tensor')),
            description  TEXT NOT NULL,
            created_at_s REAL NOT NULL
        )""",
        """CREATE TABLE versions (
            model_name   TEXT NOT NULL REFERENCES models (name),
            version      INTEGER NOT NULL CHECK (version >= 1),
            config_json  TEXT NOT NULL,
            created_at_s REAL NOT NULL,
            PRIMARY KEY (model_name, version)
        )""",
        """CREATE TABLE version_files (
            model_name TEXT NOT NULL,
            version    INTEGER NOT NULL,
            path       TEXT NOT NULL,
            sha256     TEXT NOT NULL,
            size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
            PRIMARY KEY (model_name, version, path),
            FOREIGN KEY (model_name, version) REFERENCES versions (model_name, version)
        )""",
        # Which versions use a blob: what a garbage collector asks before deleting one.
        "CREATE INDEX version_files_by_sha256 ON version_files (sha256)",
        # Versions are immutable: a deployed version must mean the same bytes forever.
        """CREATE TRIGGER versions_are_immutable BEFORE UPDATE ON versions
            BEGIN SELECT RAISE(ABORT, 'model versions are immutable'); END""",
        """CREATE TRIGGER version_files_are_immutable BEFORE UPDATE ON version_files
            BEGIN SELECT RAISE(ABORT, 'model versions are immutable'); END""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


class ModelStore:
    def __init__(
        self,
        db_path: Path,
        blobs: BlobStore,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 10.0,
    ):
        self.blobs = blobs
        self._clock = clock
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. The sqlite3 module's implicit
        # transactions are deferred, and a deferred transaction that reads and then writes fails
        # at once with SQLITE_BUSY (no waiting) if another process committed in between.
        self._conn = sqlite3.connect(
            db_path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- models ---------------------------------------------------------------------------

    def create_model(self, name: str, task: str, description: str = "") -> ModelRecord:
        record = self._new_model_record(name, task, description)
        with self._transaction(write=True) as conn:
            if self._model_row(conn, name) is not None:
                raise AlreadyExists(f"model {name!r} already exists")
            self._insert_model(conn, record)
        return record

    def get_model(self, name: str) -> ModelRecord:
        validate_model_name(name)
        with self._transaction(write=False) as conn:
            return self._require_model(conn, name)

    def list_models(self) -> list[ModelRecord]:
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT name, task, description, created_at_s FROM models ORDER BY name"
            ).fetchall()
        return [_model_from_row(row) for row in rows]

    # -- versions -------------------------------------------------------------------------

    def add_version(
        self, model_name: str, files: Sequence[FileRecord], config: dict
    ) -> VersionRecord:
        """Append version `latest + 1` of `model_name`; its blobs must already be stored."""
        validate_model_name(model_name)
        files, config_json = self._checked_version_inputs(files, config)
        with self._transaction(write=True) as conn:
            self._require_model(conn, model_name)
            return self._insert_version(conn, model_name, files, config_json)

    def get_version(self, model_name: str, version: int | None = None) -> VersionRecord:
        """Version `version` of `model_name`, or its latest version when `version` is None."""
        validate_model_name(model_name)
        if version is not None and (type(version) is not int or version < 1):
            raise InvalidArgument(f"version must be a positive integer, got {version!r}")
        with self._transaction(write=False) as conn:
            self._require_model(conn, model_name)
            latest = self._latest_version_number(conn, model_name)
            if latest == 0:
                raise NotFound(f"model {model_name!r} has no versions")
            record = self._load_version(conn, model_name, version or latest)
            if record is None:
                raise NotFound(
                    f"model {model_name!r} has no version {version} (latest is {latest})"
                )
            return record

    def list_versions(self, model_name: str) -> list[VersionRecord]:
        validate_model_name(model_name)
        with self._transaction(write=False) as conn:
            self._require_model(conn, model_name)
            numbers = self._version_numbers(conn, model_name)
            return [self._load_version(conn, model_name, number) for number in numbers]

    def version_numbers(self, model_name: str) -> list[int]:
        """Ascending version numbers of `model_name`, without loading their file lists."""
        validate_model_name(model_name)
        with self._transaction(write=False) as conn:
            self._require_model(conn, model_name)
            return self._version_numbers(conn, model_name)

    def import_folder(
        self,
        model_name: str,
        task: str,
        folder: Path,
        config: dict,
        description: str = "",
    ) -> VersionRecord:
        """Store every non-hidden file under `folder` and register them as a version.

        Creates the model if it is missing. When the latest version already has the same
        files (paths and sha256) and config, returns it instead of adding a copy, so
        re-running `tensoryard up` adds nothing.
        """
        new_model = self._new_model_record(model_name, task, description)
        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidArgument(f"cannot import model {model_name!r}: {folder} is not a folder")
        # Blobs first and outside the lock: hashing gigabytes must not stall other callers.
        file_records = [
            FileRecord(relative_path, *self.blobs.put_file(folder / relative_path))
            for relative_path in _visible_files(folder)
        ]
        if not file_records:
            raise InvalidArgument(f"cannot import model {model_name!r}: {folder} has no files")
        files, config_json = self._checked_version_inputs(file_records, config)
        with self._transaction(write=True) as conn:
            existing = self._model_row(conn, model_name)
            if existing is None:
                self._insert_model(conn, new_model)
            elif existing.task != new_model.task:
                raise FailedPrecondition(
                    f"model {model_name!r} exists with task {existing.task.value!r}, "
                    f"not {new_model.task.value!r}"
                )
            latest = self._latest_version_number(conn, model_name)
            if latest:
                current = self._load_version(conn, model_name, latest)
                if _same_content(current, files, config_json):
                    return current
            return self._insert_version(conn, model_name, files, config_json)

    # -- internals ------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._transaction(write=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            current = 0 if row is None else row[0]
            if current > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"registry database schema is version {current}; this tensoryard "
                    f"understands up to {SCHEMA_VERSION}: upgrade tensoryard"
                )
            # One statement at a time: executescript() would COMMIT our transaction first, and
            # two processes opening a fresh database must not both run the migrations.
            for statements in _MIGRATIONS[current:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def _new_model_record(self, name: str, task: str, description: str) -> ModelRecord:
        validate_model_name(name)
        if not isinstance(description, str):
            raise InvalidArgument(f"description must be a string, got {type(description).__name__}")
        return ModelRecord(name, validate_task(task), description, self._clock())

    def _checked_version_inputs(
        self, files: Iterable[FileRecord], config: dict
    ) -> tuple[tuple[FileRecord, ...], str]:
        config_json = canonical_config_json(config)
        files = tuple(files)
        for file in files:
            if not isinstance(file, FileRecord):
                raise InvalidArgument(f"files must be FileRecords, got {type(file).__name__}")
        files = tuple(sorted(files, key=lambda file: file.path))
        for previous, file in zip(files, files[1:]):
            if previous.path == file.path:
                raise InvalidArgument(f"file path {file.path!r} is listed twice")
        for file in files:
            if not self.blobs.exists(file.sha256):
                raise FailedPrecondition(
                    f"file {file.path!r}: blob {file.sha256} is not stored; upload it first"
                )
            stored_bytes = self.blobs.size_bytes(file.sha256)
            if stored_bytes != file.size_bytes:
                raise InvalidArgument(
                    f"file {file.path!r}: size_bytes is {file.size_bytes} but blob "
                    f"{file.sha256} holds {stored_bytes} bytes"
                )
        return files, config_json

    @staticmethod
    def _model_row(conn: sqlite3.Connection, name: str) -> ModelRecord | None:
        row = conn.execute(
            "SELECT name, task, description, created_at_s FROM models WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else _model_from_row(row)

    def _require_model(self, conn: sqlite3.Connection, name: str) -> ModelRecord:
        record = self._model_row(conn, name)
        if record is None:
            raise NotFound(f"model {name!r} not found")
        return record

    @staticmethod
    def _insert_model(conn: sqlite3.Connection, record: ModelRecord) -> None:
        conn.execute(
            "INSERT INTO models (name, task, description, created_at_s) VALUES (?, ?, ?, ?)",
            (record.name, record.task.value, record.description, record.created_at_s),
        )

    @staticmethod
    def _version_numbers(conn: sqlite3.Connection, model_name: str) -> list[int]:
        rows = conn.execute(
            "SELECT version FROM versions WHERE model_name = ? ORDER BY version", (model_name,)
        )
        return [row[0] for row in rows]

    @staticmethod
    def _latest_version_number(conn: sqlite3.Connection, model_name: str) -> int:
        row = conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM versions WHERE model_name = ?", (model_name,)
        ).fetchone()
        return row[0]

    def _insert_version(
        self,
        conn: sqlite3.Connection,
        model_name: str,
        files: tuple[FileRecord, ...],
        config_json: str,
    ) -> VersionRecord:
        # Runs inside a BEGIN IMMEDIATE transaction: nobody else can claim this number.
        version = self._latest_version_number(conn, model_name) + 1
        created_at_s = self._clock()
        conn.execute(
            "INSERT INTO versions (model_name, version, config_json, created_at_s) "
            "VALUES (?, ?, ?, ?)",
            (model_name, version, config_json, created_at_s),
        )
        conn.executemany(
            "INSERT INTO version_files (model_name, version, path, sha256, size_bytes) "
            "VALUES (?, ?, ?, ?, ?)",
            [(model_name, version, f.path, f.sha256, f.size_bytes) for f in files],
        )
        return VersionRecord(model_name, version, json.loads(config_json), files, created_at_s)

    @staticmethod
    def _load_version(
        conn: sqlite3.Connection, model_name: str, version: int
    ) -> VersionRecord | None:
        row = conn.execute(
            "SELECT config_json, created_at_s FROM versions WHERE model_name = ? AND version = ?",
            (model_name, version),
        ).fetchone()
        if row is None:
            return None
        config_json, created_at_s = row
        files = tuple(
            FileRecord(path, sha256, size_bytes)
            for path, sha256, size_bytes in conn.execute(
                "SELECT path, sha256, size_bytes FROM version_files "
                "WHERE model_name = ? AND version = ? ORDER BY path",
                (model_name, version),
            )
        )
        return VersionRecord(model_name, version, json.loads(config_json), files, created_at_s)


def _model_from_row(row: tuple) -> ModelRecord:
    name, task, description, created_at_s = row
    return ModelRecord(name, Task(task), description, created_at_s)


def _same_content(current: VersionRecord, files: tuple[FileRecord, ...], config_json: str) -> bool:
    def key(records: Iterable[FileRecord]) -> list[tuple[str, str]]:
        return [(f.path, f.sha256) for f in records]

    same_files = key(current.files) == key(files)
    return same_files and canonical_config_json(current.config) == config_json


def _visible_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files under `folder`, skipping hidden files and folders.

    Hidden entries are VCS and tool metadata (.git, .gitattributes, .cache), not the model.
    Symlinked files are followed (a Hugging Face snapshot is made of them); symlinked
    folders are not, so a link loop cannot hang the import.
    """
    relative_paths = []
    for dir_path, dir_names, file_names in os.walk(folder):
        dir_names[:] = [name for name in dir_names if not name.startswith(".")]
        for file_name in file_names:
            if file_name.startswith("."):
                continue
            absolute = Path(dir_path) / file_name
            if not absolute.is_file():
                raise InvalidArgument(f"{absolute} is not a regular file (broken link?)")
            relative_paths.append(absolute.relative_to(folder).as_posix())
    return sorted(relative_paths)

