"""The registry's metadata: models, immutable numbered versions, aliases, traffic policies,
deployments and the audit log, on SQLite or PostgreSQL (services/registry/database.py).

A version names its files by sha256; the bytes live in the `BlobStore`. Publishing is crash
safe by order: blobs are written (hashed, whole) first; the version row is inserted only inside
a transaction that has just checked every blob is present with its size, and that transaction
also writes the version's files, metadata, lineage and its audit entry. A kill -9 at any moment
leaves either no version or a complete one. Aliases and deployments point at versions through
foreign keys, so neither can name a version that is not there.

Every change writes its audit row in the same transaction as the change, with the actor the
caller names ("admin-token", "anonymous", "local", "controller").

Models, versions, blobs and verification are here; aliases, traffic policies and deployments in
`rollout_state.py`, the audit log in `audit_log.py`: `ModelStore` is all three.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.registry import version_rows
from services.registry.blobs import BlobStore
from services.registry.database import Connection, Database, SqliteDatabase
from services.registry.records import (
    AliasRecord,
    FileRecord,
    Lineage,
    ModelRecord,
    VersionMetadata,
    VersionRecord,
    canonical_config_json,
    check_link_stays_inside,
    check_version_number,
    parse_version_ref,
    validate_model_name,
    validate_task,
)
from services.registry.audit_log import AuditLog, checked_details
from services.registry.rollout_state import RolloutState
from services.registry.schema import SCHEMA_VERSION
from services.registry.traffic import TrafficPolicy

__all__ = ["SCHEMA_VERSION", "ModelStore", "ModelSummary", "VerifyReport"]

@dataclass(frozen=True, slots=True)
class ModelSummary:
    model: ModelRecord
    versions: tuple[int, ...]
    aliases: tuple[AliasRecord, ...]
    traffic_policy: TrafficPolicy | None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    num_versions: int
    num_blobs: int
    problems: tuple[str, ...]  # each a sentence naming model, version, file and blob


class ModelStore(RolloutState, AuditLog):
    def __init__(
        self,
        database: Database | Path,
        blobs: BlobStore,
        clock: Callable[[], float] = time.time,
    ):
        # A path is the embedded default: a SQLite file.
        self._db = database if hasattr(database, "run") else SqliteDatabase(Path(database))
        self.blobs = blobs
        self._clock = clock

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- models ---------------------------------------------------------------------------

    def create_model(self, name: str, task: str, description: str = "", actor: str = "local") -> ModelRecord:
        record = self._new_model_record(name, task, description)

        def work(conn: Connection) -> ModelRecord:
            if version_rows.model_row(conn, name) is not None:
                raise AlreadyExists(f"model {name!r} already exists")
            self._insert_model(conn, record, actor)
            return record

        return self._db.run(work, write=True)

    def get_model(self, name: str) -> ModelRecord:
        validate_model_name(name)
        return self._db.run(lambda conn: version_rows.require_model(conn, name), write=False)

    def list_models(self) -> list[ModelRecord]:
        return self._db.run(version_rows.all_models, write=False)

    def describe_model(self, name: str) -> ModelSummary:
        """The model with its version numbers, aliases and traffic policy, read at one instant."""
        validate_model_name(name)
        return self._db.run(lambda conn: self._summary(conn, version_rows.require_model(conn, name)), write=False)

    def describe_models(self) -> list[ModelSummary]:
        return self._db.run(
            lambda conn: [self._summary(conn, model) for model in version_rows.all_models(conn)], write=False
        )

    def _summary(self, conn: Connection, model: ModelRecord) -> ModelSummary:
        return ModelSummary(
            model,
            tuple(version_rows.version_numbers(conn, model.name)),
            tuple(version_rows.aliases(conn, model.name)),
            version_rows.traffic_policy(conn, model.name),
        )

    # -- versions -------------------------------------------------------------------------

    def add_version(
        self,
        model_name: str,
        files: Sequence[FileRecord],
        config: dict,
        metadata: VersionMetadata | None = None,
        lineage: Lineage | None = None,
        gate: dict | None = None,
        actor: str = "local",
    ) -> VersionRecord:
        """Publish version `latest + 1` of `model_name`; its blobs must already be stored."""
        validate_model_name(model_name)
        draft = self._draft(model_name, files, config, metadata, lineage, gate)

        def work(conn: Connection) -> VersionRecord:
            version_rows.require_model(conn, model_name)
            return self._publish(conn, draft, actor)

        return self._db.run(work, write=True)

    def get_version(self, model_name: str, version: int | None = None) -> VersionRecord:
        """Version `version` of `model_name`, or its latest version when `version` is None."""
        validate_model_name(model_name)
        if version is not None and (type(version) is not int or version < 1):
            raise InvalidArgument(f"version must be a positive integer, got {version!r}")
        return self._db.run(lambda conn: self._read_version(conn, model_name, version or 0), write=False)

    def get_version_by_ref(self, model_name: str, ref: str) -> VersionRecord:
        """The version `ref` names: a number, an alias, or "" for the latest."""
        validate_model_name(model_name)
        reference = parse_version_ref(ref)
        return self._db.run(lambda conn: self._read_version(conn, model_name, reference), write=False)

    def _read_version(self, conn: Connection, model_name: str, reference: int | str) -> VersionRecord:
        number = self._resolve(conn, model_name, reference)
        record = version_rows.load_version(conn, model_name, number)
        if record is None:
            latest = version_rows.latest_version_number(conn, model_name)
            raise NotFound(f"model {model_name!r} has no version {number} (latest is {latest})")
        return record

    @staticmethod
    def _resolve(conn: Connection, model_name: str, reference: int | str) -> int:
        version_rows.require_model(conn, model_name)
        if isinstance(reference, str):
            number = version_rows.alias_version(conn, model_name, reference)
            if number is None:
                raise NotFound(f"model {model_name!r} has no alias {reference!r}")
            return number
        if reference == 0:
            latest = version_rows.latest_version_number(conn, model_name)
            if latest == 0:
                raise NotFound(f"model {model_name!r} has no versions")
            return latest
        return reference

    def list_versions(self, model_name: str) -> list[VersionRecord]:
        validate_model_name(model_name)

        def work(conn: Connection) -> list[VersionRecord]:
            version_rows.require_model(conn, model_name)
            numbers = version_rows.version_numbers(conn, model_name)
            return [version_rows.load_version(conn, model_name, number) for number in numbers]

        return self._db.run(work, write=False)

    def version_numbers(self, model_name: str) -> list[int]:
        """Ascending version numbers of `model_name`, without loading their file lists."""
        validate_model_name(model_name)

        def work(conn: Connection) -> list[int]:
            version_rows.require_model(conn, model_name)
            return version_rows.version_numbers(conn, model_name)

        return self._db.run(work, write=False)

    def import_folder(
        self,
        model_name: str,
        task: str,
        folder: Path,
        config: dict,
        description: str = "",
        metadata: VersionMetadata | None = None,
        lineage: Lineage | None = None,
        actor: str = "local",
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
        # Blobs first and outside any transaction: hashing gigabytes must not stall others.
        file_records = [
            FileRecord(relative_path, *self.blobs.put_file(folder / relative_path))
            for relative_path in _visible_files(folder)
        ]
        if not file_records:
            raise InvalidArgument(f"cannot import model {model_name!r}: {folder} has no files")
        lineage = lineage or Lineage(source_kind="folder", source_uri=str(folder.resolve()))
        draft = self._draft(model_name, file_records, config, metadata, lineage, None)

        def work(conn: Connection) -> VersionRecord:
            existing = version_rows.model_row(conn, model_name)
            if existing is None:
                self._insert_model(conn, new_model, actor)
            elif existing.task != new_model.task:
                raise FailedPrecondition(
                    f"model {model_name!r} exists with task {existing.task.value!r}, "
                    f"not {new_model.task.value!r}"
                )
            conn.lock_model(model_name)
            latest = version_rows.latest_version_number(conn, model_name)
            if latest:
                current = version_rows.load_version(conn, model_name, latest)
                if _same_content(current, draft):
                    return current
            return self._publish(conn, draft, actor)

        return self._db.run(work, write=True)

    def delete_version(self, model_name: str, version: int, actor: str = "local") -> None:
        """Remove a version no alias, traffic policy or deployment uses; then the blobs that no
        other version uses."""
        validate_model_name(model_name)
        check_version_number(version)

        def work(conn: Connection) -> list[str]:
            conn.lock_model(model_name)
            record = self._read_version(conn, model_name, version)
            _refuse_if_in_use(conn, model_name, version)
            version_rows.delete_version_rows(conn, model_name, version)
            self._audit(conn, actor, "version.delete", model_name, version, {"files": len(record.files)})
            return sorted({file.sha256 for file in record.files})

        self._remove_unused_blobs(self._db.run(work, write=True))

    def _remove_unused_blobs(self, sha256s: Iterable[str]) -> None:
        def work(conn: Connection) -> None:
            # Exclusive against publishers, who hold it shared while they check their blobs.
            conn.lock_blobs(exclusive=True)
            for sha256 in sha256s:
                if not version_rows.blob_in_use(conn, sha256):
                    self.blobs.delete(sha256)

        self._db.run(work, write=True)

    # -- verification ---------------------------------------------------------------------

    def verify(self, rehash: bool = False) -> VerifyReport:
        """Every version's blobs present with their size (and, with `rehash`, their sha256)."""
        files = self._db.run(version_rows.all_version_files, write=False)
        problems: list[str] = []
        checked: dict[str, str | None] = {}  # sha256 -> problem (None: fine)
        versions = set()
        for model_name, version, file in files:
            versions.add((model_name, version))
            if file.sha256 not in checked:
                checked[file.sha256] = self._blob_problem(file, rehash)
            if checked[file.sha256] is not None:
                problems.append(f"model {model_name} version {version}: file {file.path}: {checked[file.sha256]}")
        return VerifyReport(len(versions), len(checked), tuple(problems))

    def _blob_problem(self, file: FileRecord, rehash: bool) -> str | None:
        try:
            size_bytes = self.blobs.size_bytes(file.sha256)
        except NotFound:
            return f"blob {file.sha256} missing"
        if size_bytes != file.size_bytes:
            return f"blob {file.sha256} holds {size_bytes} bytes, not {file.size_bytes}"
        if rehash and not self.blobs.verify(file.sha256):
            return f"blob {file.sha256} does not hash to its name (corrupted)"
        return None

    # -- internals ------------------------------------------------------------------------

    def _new_model_record(self, name: str, task: str, description: str) -> ModelRecord:
        validate_model_name(name)
        if not isinstance(description, str):
            raise InvalidArgument(f"description must be a string, got {type(description).__name__}")
        return ModelRecord(name, validate_task(task), description, self._clock())

    def _insert_model(self, conn: Connection, record: ModelRecord, actor: str) -> None:
        conn.execute(
            "INSERT INTO models (name, task, description, created_at_s) VALUES (?, ?, ?, ?)",
            (record.name, record.task.value, record.description, record.created_at_s),
        )
        self._audit(conn, actor, "model.create", record.name, 0, {"task": record.task.value})

    def _draft(self, model_name, files, config, metadata, lineage, gate) -> version_rows.VersionDraft:
        files = tuple(files)
        for file in files:
            if not isinstance(file, FileRecord):
                raise InvalidArgument(f"files must be FileRecords, got {type(file).__name__}")
        files = tuple(sorted(files, key=lambda file: file.path))
        for previous, file in zip(files, files[1:]):
            if previous.path == file.path:
                raise InvalidArgument(f"file path {file.path!r} is listed twice")
        if gate is not None:
            checked_details(gate, "gate")
        return version_rows.VersionDraft(
            model_name, files, canonical_config_json(config),
            metadata or VersionMetadata(), lineage or Lineage(), gate or None,
        )

    def _publish(self, conn: Connection, draft: version_rows.VersionDraft, actor: str) -> VersionRecord:
        conn.lock_model(draft.model_name)
        # Inside the transaction, under the blob lock: a blob removed after this check cannot
        # be, since removal waits for this transaction and then sees our rows.
        conn.lock_blobs(exclusive=False)
        for file in draft.files:
            self._check_blob(file)
        number = version_rows.latest_version_number(conn, draft.model_name) + 1
        lineage = draft.lineage
        if lineage.parent_version and version_rows.load_version(conn, draft.model_name, lineage.parent_version) is None:
            raise NotFound(f"lineage.parent_version {lineage.parent_version} of {draft.model_name!r} does not exist")
        record = version_rows.insert_version(
            conn, draft, number, self._clock(), created_by=lineage.created_by or actor
        )
        details = {"files": len(record.files), "total_bytes": record.total_bytes,
                   "config_digest": record.metadata.config_digest, "source_kind": record.lineage.source_kind}
        self._audit(conn, actor, "version.create", draft.model_name, number, details)
        return record

    def _check_blob(self, file: FileRecord) -> None:
        if not self.blobs.exists(file.sha256):
            raise FailedPrecondition(f"file {file.path!r}: blob {file.sha256} is not stored; upload it first")
        stored_bytes = self.blobs.size_bytes(file.sha256)
        if stored_bytes != file.size_bytes:
            raise InvalidArgument(
                f"file {file.path!r}: size_bytes is {file.size_bytes} but blob "
                f"{file.sha256} holds {stored_bytes} bytes"
            )


def _refuse_if_in_use(conn: Connection, model_name: str, version: int) -> None:
    aliases = [a.name for a in version_rows.aliases(conn, model_name) if a.version == version]
    if aliases:
        raise FailedPrecondition(f"version {version} of {model_name!r} is aliased as {aliases}: move or delete them first")
    policy = version_rows.traffic_policy(conn, model_name)
    if policy is not None and version in policy.versions:
        raise FailedPrecondition(
            f"version {version} of {model_name!r} is in its traffic policy (revision {policy.revision})"
        )
    for deployment in version_rows.deployments(conn, model_name):
        if deployment.version == version:
            raise FailedPrecondition(
                f"version {version} of {model_name!r} is deployed ({deployment.replicas} replicas): undeploy it first"
            )


def _same_content(current: VersionRecord, draft: version_rows.VersionDraft) -> bool:
    def key(records: Iterable[FileRecord]) -> list[tuple[str, str]]:
        return [(f.path, f.sha256) for f in records]

    same_files = key(current.files) == key(draft.files)
    return same_files and canonical_config_json(current.config) == draft.config_json


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
            check_link_stays_inside(folder, absolute)
            relative_paths.append(absolute.relative_to(folder).as_posix())
    return sorted(relative_paths)

