"""A real PostgreSQL server for the registry tests: Debian's binaries, a temp cluster, loopback.

PostgreSQL refuses to run as root, so as root the server runs as a system user of its own
(`tensoryard-pg`, created if missing) that owns the temp directory. The test process itself
talks to it over TCP on 127.0.0.1 with trust authentication (nothing else can reach loopback of
this cluster's port within the test's life).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

PG_USER = "tensoryard-pg"
DB_SUPERUSER = "tensoryard"


def find_pg_bin() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _run_as(user: str | None, *argv: str) -> subprocess.CompletedProcess:
    command = ["runuser", "-u", user, "--", *argv] if user else list(argv)
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)


def _server_user() -> str | None:
    """None: run as ourselves (not root); else the system user the server runs as."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True, timeout=60)
    return PG_USER


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    user: str | None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{DB_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        _run_as(self.user, str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", DB_SUPERUSER,
                "-A", "trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        _run_as(self.user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l",
                str(self.root / "server.log"), "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        subprocess.run(
            (["runuser", "-u", self.user, "--"] if self.user else [])
            + [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
            capture_output=True, timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_postgres(port: int) -> PostgresServer:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("no PostgreSQL binaries (pg_ctl) under /usr/lib/postgresql/*/bin or on PATH")
    user = _server_user()
    # Not under pytest's tmp_path: its 0700 parents would keep the server's user out.
    root = Path(tempfile.mkdtemp(prefix="tensoryard-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bin_dir, root, port, user)
    try:
        server.start()
    except BaseException:
        log = root / "server.log"
        detail = log.read_text() if log.exists() else ""
        server.stop()
        raise RuntimeError(f"PostgreSQL did not start: {detail[-2000:]}") from None
    return server
