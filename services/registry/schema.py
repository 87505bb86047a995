"""The registry's tables, as numbered migrations for SQLite and for PostgreSQL.

Entry i upgrades the schema from version i to i + 1; append, never edit. Both lists have the
same length and the same tables, columns and rules; only the spelling differs (REAL vs DOUBLE
PRECISION, AUTOINCREMENT vs identity, trigger syntax).

Rules the database itself enforces, so that no code path (and no operator's SQL) can break them:
- versions and their files, metadata and lineage are never updated (a deployed version must mean
  the same bytes forever); they may only be deleted, by `delete_version`;
- an alias or a deployment points at an existing version (foreign keys);
- the audit log is append-only: UPDATE, DELETE (and on PostgreSQL TRUNCATE) are refused.
"""

from __future__ import annotations

IMMUTABLE = "model versions are immutable"
APPEND_ONLY = "the audit log is append-only"

_SQLITE_V1 = (
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
    # Which versions use a blob: what removing one asks first.
    "CREATE INDEX version_files_by_sha256 ON version_files (sha256)",
    f"""CREATE TRIGGER versions_are_immutable BEFORE UPDATE ON versions
        BEGIN SELECT RAISE(ABORT, '{IMMUTABLE}'); END""",
    f"""CREATE TRIGGER version_files_are_immutable BEFORE UPDATE ON version_files
        BEGIN SELECT RAISE(ABORT, '{IMMUTABLE}'); END""",
)


def _rollout_tables(real: str, audit_key: str) -> tuple[str, ...]:
    return (
        """CREATE TABLE version_details (
            model_name    TEXT NOT NULL,
            version       INTEGER NOT NULL,
            metadata_json TEXT NOT NULL,
            lineage_json  TEXT NOT NULL,
            gate_json     TEXT,
            PRIMARY KEY (model_name, version),
            FOREIGN KEY (model_name, version) REFERENCES versions (model_name, version)
        )""",
        f"""CREATE TABLE aliases (
            model_name   TEXT NOT NULL,
            name         TEXT NOT NULL,
            version      INTEGER NOT NULL,
            updated_at_s {real} NOT NULL,
            PRIMARY KEY (model_name, name),
            FOREIGN KEY (model_name, version) REFERENCES versions (model_name, version)
        )""",
        f"""CREATE TABLE traffic_policies (
            model_name   TEXT PRIMARY KEY REFERENCES models (name),
            policy_json  TEXT NOT NULL,
            revision     INTEGER NOT NULL CHECK (revision >= 1),
            updated_at_s {real} NOT NULL
        )""",
        # Only wanted replicas are rows: replicas 0 (undeploy) removes the row.
        f"""CREATE TABLE deployments (
            model_name   TEXT NOT NULL,
            version      INTEGER NOT NULL,
            replicas     INTEGER NOT NULL CHECK (replicas >= 1),
            updated_at_s {real} NOT NULL,
            PRIMARY KEY (model_name, version),
            FOREIGN KEY (model_name, version) REFERENCES versions (model_name, version)
        )""",
        f"""CREATE TABLE audit (
            sequence     {audit_key},
            at_s         {real} NOT NULL,
            actor        TEXT NOT NULL,
            action       TEXT NOT NULL,
            model_name   TEXT NOT NULL,
            version      INTEGER NOT NULL,
            details_json TEXT NOT NULL
        )""",
        "CREATE INDEX audit_by_model ON audit (model_name, sequence)",
    )


_SQLITE_V2 = (
    *_rollout_tables("REAL", "INTEGER PRIMARY KEY AUTOINCREMENT"),
    f"""CREATE TRIGGER version_details_are_immutable BEFORE UPDATE ON version_details
        BEGIN SELECT RAISE(ABORT, '{IMMUTABLE}'); END""",
    f"""CREATE TRIGGER audit_refuses_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END""",
    f"""CREATE TRIGGER audit_refuses_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END""",
)

# Autoscaled deployments (issue 12): bounds and the autoscale flag; an autoscaled deployment keeps
# its row at 0 replicas (scaled to zero), so replicas may now be 0. SQLite cannot change a CHECK in
# place: the table is rebuilt.
_SQLITE_V3 = (
    """CREATE TABLE deployments_v3 (
        model_name   TEXT NOT NULL,
        version      INTEGER NOT NULL,
        replicas     INTEGER NOT NULL CHECK (replicas >= 0),
        updated_at_s REAL NOT NULL,
        min_replicas INTEGER NOT NULL DEFAULT 0 CHECK (min_replicas >= 0),
        max_replicas INTEGER NOT NULL DEFAULT 0 CHECK (max_replicas >= min_replicas),
        autoscale    INTEGER NOT NULL DEFAULT 0 CHECK (autoscale IN (0, 1)),
        CHECK (replicas >= 1 OR autoscale = 1),
        PRIMARY KEY (model_name, version),
        FOREIGN KEY (model_name, version) REFERENCES versions (model_name, version)
    )""",
    "INSERT INTO deployments_v3 (model_name, version, replicas, updated_at_s) "
    "SELECT model_name, version, replicas, updated_at_s FROM deployments",
    "DROP TABLE deployments",
    "ALTER TABLE deployments_v3 RENAME TO deployments",
)

# The highest fencing token each controller has acted with (services/autoscale/leader.py): a write
# carrying a lower one is from a deposed leader and is refused.
_FENCING = """CREATE TABLE fencing (
        name  TEXT PRIMARY KEY,
        token BIGINT NOT NULL CHECK (token >= 0)
    )"""
_SQLITE_V4 = (_FENCING,)

SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (_SQLITE_V1, _SQLITE_V2, _SQLITE_V3, _SQLITE_V4)

_PG_V1 = (
    """CREATE TABLE models (
        name         TEXT PRIMARY KEY,
        task         TEXT NOT NULL CHECK (task IN ('embedding', 'generation', 'tensor')),
        description  TEXT NOT NULL,
        created_at_s DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE versions (
        model_name   TEXT NOT NULL REFERENCES models (name),
        version      INTEGER NOT NULL CHECK (version >= 1),
        config_json  TEXT NOT NULL,
        created_at_s DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (model_name, version)
    )""",
    """CREATE TABLE version_files (
        model_name TEXT NOT NULL,
        version    INTEGER NOT NULL,
        path       TEXT NOT NULL,
        sha256     TEXT NOT NULL,
        size_bytes BIGINT NOT NULL CHECK (size_bytes >= 0),
        PRIMARY KEY (model_name, version, path),
        FOREIGN KEY (model_name, version) REFERENCES versions (model_name, version)
    )""",
    "CREATE INDEX version_files_by_sha256 ON version_files (sha256)",
    # The message comes from the trigger's argument, so one function serves every rule.
    """CREATE FUNCTION tensoryard_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION USING MESSAGE = TG_ARGV[0], ERRCODE = 'integrity_constraint_violation'; END
    $$""",
    f"""CREATE TRIGGER versions_are_immutable BEFORE UPDATE ON versions
        FOR EACH ROW EXECUTE FUNCTION tensoryard_refuse('{IMMUTABLE}')""",
    f"""CREATE TRIGGER version_files_are_immutable BEFORE UPDATE ON version_files
        FOR EACH ROW EXECUTE FUNCTION tensoryard_refuse('{IMMUTABLE}')""",
)

_PG_V2 = (
    *_rollout_tables("DOUBLE PRECISION", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
    f"""CREATE TRIGGER version_details_are_immutable BEFORE UPDATE ON version_details
        FOR EACH ROW EXECUTE FUNCTION tensoryard_refuse('{IMMUTABLE}')""",
    f"""CREATE TRIGGER audit_is_append_only BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION tensoryard_refuse('{APPEND_ONLY}')""",
    f"""CREATE TRIGGER audit_refuses_truncate BEFORE TRUNCATE ON audit
        FOR EACH STATEMENT EXECUTE FUNCTION tensoryard_refuse('{APPEND_ONLY}')""",
)

_PG_V3 = (
    "ALTER TABLE deployments DROP CONSTRAINT deployments_replicas_check",
    "ALTER TABLE deployments ADD COLUMN min_replicas INTEGER NOT NULL DEFAULT 0 CHECK (min_replicas >= 0)",
    "ALTER TABLE deployments ADD COLUMN max_replicas INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE deployments ADD COLUMN autoscale INTEGER NOT NULL DEFAULT 0 CHECK (autoscale IN (0, 1))",
    "ALTER TABLE deployments ADD CONSTRAINT deployments_replicas_check CHECK (replicas >= 0)",
    "ALTER TABLE deployments ADD CONSTRAINT deployments_bounds_check CHECK (max_replicas >= min_replicas)",
    "ALTER TABLE deployments ADD CONSTRAINT deployments_zero_check CHECK (replicas >= 1 OR autoscale = 1)",
)

_PG_V4 = (_FENCING,)

POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (_PG_V1, _PG_V2, _PG_V3, _PG_V4)

SCHEMA_VERSION = len(SQLITE_MIGRATIONS)
if len(POSTGRES_MIGRATIONS) != SCHEMA_VERSION:
    raise RuntimeError("SQLite and PostgreSQL migrations must be the same in number")
