"""The registry's metadata database: SQLite (embedded default) or PostgreSQL, behind one adapter.

`ModelStore` writes its SQL once, with `?` placeholders, and runs every transaction through
`Database.run(work, write)`. What differs between the two lives here:

- SQLite: one connection behind a lock (metadata calls take microseconds; thread pools would
  otherwise leave a connection on every worker thread), WAL so other processes read while we
  write, and writes in BEGIN IMMEDIATE, which takes the database's one write lock before the
  first read: a version number computed inside it cannot be claimed by another process.
- PostgreSQL (psycopg 3): also one connection behind a lock per process, READ COMMITTED;
  writers serialize per model with `SELECT ... FOR UPDATE` on the model's row (`lock_model`),
  the primary keys are the backstop, and serialization failures, deadlocks and unique
  violations (a concurrent insert won the race) rerun the whole transaction, whose checks then
  see the winner's row.

Both run the same numbered migrations (services/registry/schema.py), each under a lock so two
processes opening a fresh database do not both apply them.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.registry import schema

T = TypeVar("T")

MAX_ATTEMPTS = 8
RETRY_BACKOFF_S = 0.01
# pg_advisory_xact_lock keys: any two constants of our own.
_MIGRATION_LOCK_KEY = 0x7E5A_0001
_BLOB_LOCK_KEY = 0x7E5A_0002


class Connection(Protocol):
    """What a transaction's work sees: `?` placeholders on both backends."""

    dialect: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def lock_model(self, name: str) -> None:
        """Hold the model's row until the transaction ends (serializes its writers)."""

    def lock_blobs(self, exclusive: bool) -> None:
        """Publishers share this lock; removing an unused blob takes it alone."""

    def lock_audit(self) -> None:
        """Audit sequence numbers commit in order (a reader paging by sequence misses none)."""


class Database(Protocol):
    url: str
    dialect: str

    def run(self, work: Callable[[Connection], T], write: bool) -> T: ...

    def close(self) -> None: ...


def open_database(url: str, default_sqlite_path: Path) -> Database:
    """`url`: "" (the SQLite file at `default_sqlite_path`), `sqlite:///abs/path` or
    `postgresql://user@host:port/db`."""
    if not url:
        return SqliteDatabase(default_sqlite_path)
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise InvalidArgument(f"database URL {url!r} names no file")
        return SqliteDatabase(Path("/" + path.lstrip("/")))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    raise InvalidArgument(
        f"database URL {_redacted(url)!r}: expected sqlite:///abs/path or postgresql://user@host:port/db"
    )


def _redacted(url: str) -> str:
    # A password in the URL must not reach a log line or an error message.
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


class _SqliteConnection:
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._conn.execute(sql, tuple(params)).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    # BEGIN IMMEDIATE already holds the database's single write lock.
    def lock_model(self, name: str) -> None:
        pass

    def lock_blobs(self, exclusive: bool) -> None:
        pass

    def lock_audit(self) -> None:
        pass


class SqliteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self.url = f"sqlite:///{self.path.resolve()}"
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. The sqlite3 module's implicit
        # transactions are deferred, and a deferred transaction that reads and then writes fails
        # at once with SQLITE_BUSY (no waiting) if another process committed in between.
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self.run(lambda conn: _migrate(conn, schema.SQLITE_MIGRATIONS), write=True)
        except BaseException:
            self._conn.close()
            raise

    def run(self, work: Callable[[Connection], T], write: bool) -> T:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(_SqliteConnection(self._conn))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _PostgresConnection:
    dialect = "postgresql"

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        # None, not (): with parameters psycopg would read a '%' in the SQL as a placeholder.
        cursor = self._conn.execute(_pg_placeholders(sql), tuple(params) or None)
        return cursor.fetchall() if cursor.description is not None else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(_pg_placeholders(sql), rows)

    def lock_model(self, name: str) -> None:
        self.execute("SELECT name FROM models WHERE name = ? FOR UPDATE", (name,))

    def lock_blobs(self, exclusive: bool) -> None:
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        self.execute(f"SELECT {function}(?)", (_BLOB_LOCK_KEY,))

    def lock_audit(self) -> None:
        # Identity values are handed out at INSERT, not at COMMIT: without this, entry 7 could
        # commit after a reader has already paged past it to 8.
        self.execute("LOCK TABLE audit IN SHARE ROW EXCLUSIVE MODE")


def _pg_placeholders(sql: str) -> str:
    # Our SQL has no literal '?' or '%' (nothing in it is user text: values are parameters).
    return sql.replace("?", "%s")


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str, connect_timeout_s: float = 10.0):
        import psycopg

        self._psycopg = psycopg
        self.url = _redacted(url)
        self._dsn = url
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.RLock()
        self._conn = None
        self.run(lambda conn: _migrate(conn, schema.POSTGRES_MIGRATIONS, locked=True), write=True)

    def _connection(self):
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                # autocommit: `conn.transaction()` then issues BEGIN and COMMIT itself, so a
                # read leaves no transaction open between calls.
                self._conn = self._psycopg.connect(
                    self._dsn, autocommit=True, connect_timeout=max(1, int(self._connect_timeout_s))
                )
            except self._psycopg.OperationalError as error:
                raise Unavailable(f"cannot reach PostgreSQL at {self.url}: {error}".strip()) from None
        return self._conn

    def run(self, work: Callable[[Connection], T], write: bool) -> T:
        errors = self._psycopg.errors
        retryable = (errors.SerializationFailure, errors.DeadlockDetected, errors.UniqueViolation)
        with self._lock:
            for attempt in range(MAX_ATTEMPTS):
                conn = self._connection()
                try:
                    with conn.transaction():
                        return work(_PostgresConnection(conn))
                except retryable:
                    if attempt == MAX_ATTEMPTS - 1:
                        raise
                    time.sleep(RETRY_BACKOFF_S * (attempt + 1))
                except self._psycopg.OperationalError as error:
                    # The server went away mid-transaction: nothing was committed; say so.
                    raise Unavailable(f"PostgreSQL at {self.url}: {error}".strip()) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def _migrate(conn: Connection, migrations: tuple[tuple[str, ...], ...], locked: bool = False) -> None:
    if locked:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_KEY,))
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    rows = conn.execute("SELECT version FROM schema_version")
    current = rows[0][0] if rows else 0
    if current > len(migrations):
        raise FailedPrecondition(
            f"registry database schema is version {current}; this tensoryard "
            f"understands up to {len(migrations)}: upgrade tensoryard"
        )
    # One statement at a time: sqlite3's executescript() would COMMIT our transaction first.
    for statements in migrations[current:]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("DELETE FROM schema_version")
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (len(migrations),))
