"""A real PostgreSQL server for the tests: one per session, on a Unix socket, thrown away after.

``initdb`` refuses to run as root, so the cluster is made and served by the ``postgres`` user
(``runuser -u postgres --``), in a temporary directory of its own; the server listens on no TCP
port (``listen_addresses=''``), only on a socket in that directory, and trusts local
connections. It is started on first use (fixture ``pg_server``) within PG_START_TIMEOUT seconds
or the test fails with the server's log, and stopped (fast shutdown, then SIGKILL) at the end of
the session, also when tests fail. ``fsync=off``: the tests kill clients, never the machine.
``scripts/benchmark.py`` starts its server with this class too (with ``fsync=on``).

The binaries are those of ``pg_config --bindir``, else the newest /usr/lib/postgresql/*/bin.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

PG_START_TIMEOUT = 30.0
PG_STOP_TIMEOUT = 20.0
USER = "postgres"


def pg_bindir() -> Path:
    """The directory of initdb, postgres and pg_dump."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        d = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                check=True).stdout.strip())
        if (d / "initdb").exists():
            return d
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if not found:
        raise RuntimeError("PostgreSQL is not installed (run scripts/setup --dev)")
    return found[-1].parent


class PgServer:
    """One running cluster; databases are made with :meth:`create_database`."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        """``settings``: server settings (``-c name=value``) over the defaults below (the
        benchmark turns ``fsync`` back on)."""
        self.settings = {"fsync": "off", "max_connections": "200", "shared_buffers": "32MB",
                         **(settings or {})}
        self.bindir = pg_bindir()
        pw = pwd.getpwnam(USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.base = Path(tempfile.mkdtemp(prefix="cryptfs-pg-"))
        os.chown(self.base, self.uid, self.gid)
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.sock.mkdir()
        os.chown(self.sock, self.uid, self.gid)
        self.log = self.base / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._tablespaces: dict[Path, str] = {}

    def _as_postgres(self, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["runuser", "-u", USER, "--", *args], check=True,
                              capture_output=True, timeout=120, **kw)  # type: ignore[call-overload]

    def start(self) -> None:
        """Make the cluster (the first time) and start the server; fail (with the end of its
        log) if it does not accept connections within PG_START_TIMEOUT."""
        if not self.data.exists():
            self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER,
                              "--auth=trust", "--no-sync", "--no-locale", "-E", "UTF8")
        logf = open(self.log, "wb")  # noqa: SIM115 (the server writes it until it stops)
        self.proc = subprocess.Popen(
            ["runuser", "-u", USER, "--", str(self.bindir / "postgres"), "-D", str(self.data),
             "-c", "listen_addresses=", "-c", f"unix_socket_directories={self.sock}",
             *(a for k, v in self.settings.items() for a in ("-c", f"{k}={v}"))],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + PG_START_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(
                    f"PostgreSQL did not start within {PG_START_TIMEOUT:.0f} s "
                    f"(exit {self.proc.returncode}); its log ends:\n{tail}")
            time.sleep(0.05)

    def _postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def halt(self) -> None:
        """Stop the server, keeping the cluster (:meth:`start` starts it again): fast shutdown
        (SIGINT to the postmaster), SIGKILL after PG_STOP_TIMEOUT."""
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + PG_STOP_TIMEOUT
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(PG_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        """Stop the server and remove everything, tablespace mounts included."""
        self.halt()
        for d in list(self._tablespaces):
            subprocess.run(["umount", "-l", str(d)], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    # -- databases -------------------------------------------------------------------------------
    def dsn(self, db: str) -> str:
        return f"host={self.sock} user={USER} dbname={db}"

    def url(self, db: str, schema: str | None = None) -> str:
        """The SQLAlchemy URL of database ``db`` (with ``schema`` first on the search path:
        tables made and found there)."""
        opts = f"&options=-csearch_path%3D{schema}" if schema else ""
        return f"postgresql+psycopg://{USER}@/{db}?host={self.sock}{opts}"

    def shared_database(self) -> str:
        """A database made once per session, for tests that each take a schema of it
        (a schema is made and dropped in milliseconds; a database costs checkpoints)."""
        if not self.exists("shared"):
            self.create_database("shared")
        return "shared"

    def drop_schema(self, db: str, schema: str) -> None:
        """Drop a schema with its tables; left for the session's end if a connection that
        was not closed still holds a lock on it."""
        with contextlib.suppress(psycopg.errors.LockNotAvailable):
            with psycopg.connect(self.dsn(db), autocommit=True) as c:
                c.execute("SET lock_timeout = '5s'")
                c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())

    def admin(self, sql: str, db: str = "postgres",
              schema: str | None = None) -> list[tuple[object, ...]]:
        """Run ``sql`` as the superuser, in autocommit (with ``schema`` first on the search
        path); the rows it returns."""
        opts = f" options=-csearch_path={schema}" if schema else ""
        with psycopg.connect(self.dsn(db) + opts, autocommit=True) as c:
            cur = c.execute(sql.encode())
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str, tablespace: str | None = None) -> None:
        ts = f" TABLESPACE {tablespace}" if tablespace else ""
        self.admin(f"CREATE DATABASE {name} STRATEGY FILE_COPY{ts}")

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def exists(self, name: str) -> bool:
        return bool(self.admin(f"SELECT 1 FROM pg_database WHERE datname = '{name}'"))

    def pg_dump(self, db: str, schema: str | None = None) -> bytes:
        """The database's (or one schema's) plain-text dump, by pg_dump run as the postgres
        user."""
        only = ["-n", schema] if schema else []
        return self._as_postgres(str(self.bindir / "pg_dump"), "-h", str(self.sock),
                                 "-U", USER, *only, db).stdout

    def restore(self, db: str, schema: str, dump: bytes) -> None:
        """Put a plain-text dump of one schema (:meth:`pg_dump`) back in place of what the
        schema holds now, by psql run as the postgres user (as an operator restoring a
        backup would)."""
        self.admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE", db)
        self._as_postgres(str(self.bindir / "psql"), "-h", str(self.sock), "-U", USER, "-d", db,
                          "-q", "-v", "ON_ERROR_STOP=1", input=dump)

    @contextlib.contextmanager
    def small_tablespace(self, size: str) -> Iterator[tuple[Path, str]]:
        """A tablespace on a real filesystem of ``size`` (tmpfs): ``(its directory, its
        name)``; dropped and unmounted at the end, with the databases made in it."""
        name = "ts" + hashlib.sha256(os.urandom(8)).hexdigest()[:12]
        d = self.base / name
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o",
                        f"size={size},mode=0700,uid={self.uid},gid={self.gid}", "tmpfs", str(d)],
                       check=True)
        self._tablespaces[d] = name
        try:
            self.admin(f"CREATE TABLESPACE {name} LOCATION '{d}'")
            yield d, name
        finally:
            for (db,) in self.admin("SELECT datname FROM pg_database d JOIN pg_tablespace t "
                                    f"ON t.oid = d.dattablespace WHERE t.spcname = '{name}'"):
                self.drop_database(str(db))
            with contextlib.suppress(psycopg.Error):
                self.admin(f"DROP TABLESPACE IF EXISTS {name}")
            subprocess.run(["umount", str(d)], check=True)
            del self._tablespaces[d]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (started on first use, stopped at the end)."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class PgPlace:
    """One test's tables: a schema of the session's shared database."""

    server: PgServer
    db: str
    schema: str

    @property
    def url(self) -> str:
        return self.server.url(self.db, self.schema)

    def sql(self, stmt: str) -> list[tuple[object, ...]]:
        """Run ``stmt`` as the database operator would (superuser), on these tables."""
        return self.server.admin(stmt, self.db, self.schema)


@pytest.fixture
def pg_place(pg_server: PgServer) -> Iterator[PgPlace]:
    """A new, empty schema for one test (dropped after it)."""
    place = PgPlace(pg_server, pg_server.shared_database(),
                    "t" + hashlib.sha256(os.urandom(8)).hexdigest()[:16])
    pg_server.admin(f"CREATE SCHEMA {place.schema}", place.db)
    try:
        yield place
    finally:
        pg_server.drop_schema(place.db, place.schema)
