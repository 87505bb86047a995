"""Rows to records and back: the SQL of `ModelStore`, one function per query.

Every function takes the transaction's `Connection` (services/registry/database.py) and runs
inside whatever transaction the store opened; none commits or locks on its own.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from services.common.errors import FailedPrecondition, NotFound
from services.registry.database import Connection
from services.registry.records import (
    AliasRecord,
    AuditEntry,
    DeploymentRecord,
    FileRecord,
    Lineage,
    ModelRecord,
    Task,
    VersionMetadata,
    VersionRecord,
    config_digest,
)
from services.registry.traffic import TrafficPolicy


@dataclass(frozen=True, slots=True)
class VersionDraft:
    """A version as a publisher asked for it, checked, before it has a number."""

    model_name: str
    files: tuple[FileRecord, ...]  # sorted by path
    config_json: str  # canonical
    metadata: VersionMetadata
    lineage: Lineage
    gate: dict | None


# -- models -------------------------------------------------------------------------------

_MODEL_COLUMNS = "name, task, description, created_at_s"


def model_row(conn: Connection, name: str) -> ModelRecord | None:
    rows = conn.execute(f"SELECT {_MODEL_COLUMNS} FROM models WHERE name = ?", (name,))
    return _model(rows[0]) if rows else None


def require_model(conn: Connection, name: str) -> ModelRecord:
    record = model_row(conn, name)
    if record is None:
        raise NotFound(f"model {name!r} not found")
    return record


def all_models(conn: Connection) -> list[ModelRecord]:
    return [_model(row) for row in conn.execute(f"SELECT {_MODEL_COLUMNS} FROM models ORDER BY name")]


def _model(row: tuple) -> ModelRecord:
    name, task, description, created_at_s = row
    return ModelRecord(name, Task(task), description, created_at_s)


# -- versions -----------------------------------------------------------------------------


def version_numbers(conn: Connection, model_name: str) -> list[int]:
    rows = conn.execute("SELECT version FROM versions WHERE model_name = ? ORDER BY version", (model_name,))
    return [row[0] for row in rows]


def latest_version_number(conn: Connection, model_name: str) -> int:
    rows = conn.execute("SELECT COALESCE(MAX(version), 0) FROM versions WHERE model_name = ?", (model_name,))
    return rows[0][0]


def insert_version(
    conn: Connection, draft: VersionDraft, number: int, created_at_s: float, created_by: str
) -> VersionRecord:
    metadata = dataclasses.replace(draft.metadata, config_digest=config_digest(draft.config_json))
    lineage = dataclasses.replace(draft.lineage, created_at_s=created_at_s, created_by=created_by)
    conn.execute(
        "INSERT INTO versions (model_name, version, config_json, created_at_s) VALUES (?, ?, ?, ?)",
        (draft.model_name, number, draft.config_json, created_at_s),
    )
    conn.executemany(
        "INSERT INTO version_files (model_name, version, path, sha256, size_bytes) VALUES (?, ?, ?, ?, ?)",
        [(draft.model_name, number, f.path, f.sha256, f.size_bytes) for f in draft.files],
    )
    conn.execute(
        "INSERT INTO version_details (model_name, version, metadata_json, lineage_json, gate_json) "
        "VALUES (?, ?, ?, ?, ?)",
        (draft.model_name, number, _to_json(dataclasses.asdict(metadata)), _to_json(dataclasses.asdict(lineage)),
         None if draft.gate is None else _to_json(draft.gate)),
    )
    return VersionRecord(
        draft.model_name, number, json.loads(draft.config_json), draft.files, created_at_s,
        metadata, lineage, draft.gate, (),
    )


def load_version(conn: Connection, model_name: str, version: int) -> VersionRecord | None:
    rows = conn.execute(
        "SELECT v.config_json, v.created_at_s, d.metadata_json, d.lineage_json, d.gate_json "
        "FROM versions v LEFT JOIN version_details d "
        "ON d.model_name = v.model_name AND d.version = v.version "
        "WHERE v.model_name = ? AND v.version = ?",
        (model_name, version),
    )
    if not rows:
        return None
    config_json, created_at_s, metadata_json, lineage_json, gate_json = rows[0]
    files = tuple(
        FileRecord(path, sha256, size_bytes)
        for path, sha256, size_bytes in conn.execute(
            "SELECT path, sha256, size_bytes FROM version_files WHERE model_name = ? AND version = ? ORDER BY path",
            (model_name, version),
        )
    )
    # Versions published before schema 2 have no details row.
    metadata = VersionMetadata(**json.loads(metadata_json)) if metadata_json else VersionMetadata(
        config_digest=config_digest(config_json)
    )
    lineage = Lineage(**json.loads(lineage_json)) if lineage_json else Lineage(created_at_s=created_at_s)
    alias_names = tuple(
        row[0] for row in conn.execute(
            "SELECT name FROM aliases WHERE model_name = ? AND version = ? ORDER BY name", (model_name, version)
        )
    )
    gate = json.loads(gate_json) if gate_json else None
    return VersionRecord(
        model_name, version, json.loads(config_json), files, created_at_s, metadata, lineage, gate, alias_names
    )


def delete_version_rows(conn: Connection, model_name: str, version: int) -> None:
    key = (model_name, version)
    for table in ("version_files", "version_details", "versions"):
        conn.execute(f"DELETE FROM {table} WHERE model_name = ? AND version = ?", key)


def blob_in_use(conn: Connection, sha256: str) -> bool:
    return bool(conn.execute("SELECT 1 FROM version_files WHERE sha256 = ? LIMIT 1", (sha256,)))


def all_version_files(conn: Connection) -> list[tuple[str, int, FileRecord]]:
    rows = conn.execute(
        "SELECT v.model_name, v.version, f.path, f.sha256, f.size_bytes FROM versions v "
        "LEFT JOIN version_files f ON f.model_name = v.model_name AND f.version = v.version "
        "ORDER BY v.model_name, v.version, f.path"
    )
    return [(m, v, FileRecord(path, sha256, size)) for m, v, path, sha256, size in rows if path is not None]


# -- aliases ------------------------------------------------------------------------------


def aliases(conn: Connection, model_name: str) -> list[AliasRecord]:
    rows = conn.execute(
        "SELECT model_name, name, version, updated_at_s FROM aliases WHERE model_name = ? ORDER BY name",
        (model_name,),
    )
    return [AliasRecord(*row) for row in rows]


def alias_version(conn: Connection, model_name: str, name: str) -> int | None:
    rows = conn.execute("SELECT version FROM aliases WHERE model_name = ? AND name = ?", (model_name, name))
    return rows[0][0] if rows else None


def upsert_alias(conn: Connection, alias: AliasRecord) -> None:
    conn.execute(
        "INSERT INTO aliases (model_name, name, version, updated_at_s) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (model_name, name) DO UPDATE SET version = excluded.version, "
        "updated_at_s = excluded.updated_at_s",
        (alias.model_name, alias.name, alias.version, alias.updated_at_s),
    )


# -- traffic policies ---------------------------------------------------------------------


def traffic_policy(conn: Connection, model_name: str) -> TrafficPolicy | None:
    rows = conn.execute(
        "SELECT policy_json, revision, updated_at_s FROM traffic_policies WHERE model_name = ?", (model_name,)
    )
    if not rows:
        return None
    policy_json, revision, updated_at_s = rows[0]
    return TrafficPolicy.from_json_dict(model_name, json.loads(policy_json), revision, updated_at_s)


def upsert_traffic_policy(conn: Connection, policy: TrafficPolicy) -> None:
    conn.execute(
        "INSERT INTO traffic_policies (model_name, policy_json, revision, updated_at_s) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (model_name) DO UPDATE SET policy_json = excluded.policy_json, "
        "revision = excluded.revision, updated_at_s = excluded.updated_at_s",
        (policy.model_name, _to_json(policy.to_json_dict()), policy.revision, policy.updated_at_s),
    )


# -- deployments --------------------------------------------------------------------------


_DEPLOYMENT_COLUMNS = "model_name, version, replicas, updated_at_s, min_replicas, max_replicas, autoscale"


def _deployment(row) -> DeploymentRecord:
    *head, autoscale = row
    return DeploymentRecord(*head, autoscale=bool(autoscale))


def deployments(conn: Connection, model_name: str = "") -> list[DeploymentRecord]:
    sql = f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments"
    params: tuple = ()
    if model_name:
        sql, params = sql + " WHERE model_name = ?", (model_name,)
    return [_deployment(row) for row in conn.execute(sql + " ORDER BY model_name, version", params)]


def deployment(conn: Connection, model_name: str, version: int) -> DeploymentRecord | None:
    rows = conn.execute(f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE model_name = ? AND version = ?",
                        (model_name, version))
    return next((_deployment(row) for row in rows), None)


def put_deployment(conn: Connection, deployment: DeploymentRecord) -> None:
    """A fixed deployment at 0 replicas is no deployment (the row goes); an autoscaled one keeps
    its row at 0 (scaled to zero, to come back when requests arrive)."""
    key = (deployment.model_name, deployment.version)
    if deployment.replicas == 0 and not deployment.autoscale:
        conn.execute("DELETE FROM deployments WHERE model_name = ? AND version = ?", key)
        return
    conn.execute(
        f"INSERT INTO deployments ({_DEPLOYMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (model_name, version) DO UPDATE SET replicas = excluded.replicas, "
        "updated_at_s = excluded.updated_at_s, min_replicas = excluded.min_replicas, "
        "max_replicas = excluded.max_replicas, autoscale = excluded.autoscale",
        (*key, deployment.replicas, deployment.updated_at_s, deployment.min_replicas, deployment.max_replicas,
         int(deployment.autoscale)),
    )


# -- audit --------------------------------------------------------------------------------


def audit_entries(conn: Connection, model_name: str, after_sequence: int, limit: int) -> list[AuditEntry]:
    sql = "SELECT sequence, at_s, actor, action, model_name, version, details_json FROM audit WHERE sequence > ?"
    params: list = [after_sequence]
    if model_name:
        sql += " AND model_name = ?"
        params.append(model_name)
    sql += " ORDER BY sequence"
    if limit:
        sql += " LIMIT ?"
        params.append(limit)
    return [
        AuditEntry(sequence, at_s, actor, action, name, version, json.loads(details_json))
        for sequence, at_s, actor, action, name, version, details_json in conn.execute(sql, params)
    ]


def _to_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def check_fence(conn: Connection, name: str, token: int) -> None:
    """Record `token` as `name`'s fencing token unless a higher one was recorded: then refuse, in
    one statement, so two transactions cannot both pass with tokens out of order."""
    rows = conn.execute(
        "INSERT INTO fencing (name, token) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET token = excluded.token "
        "WHERE fencing.token <= excluded.token RETURNING token", (name, token))
    if not rows:
        raise FailedPrecondition(f"fencing token {token} is below the one {name} last acted with: "
                                 "this controller no longer holds the leader lock")
