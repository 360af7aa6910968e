"""The SQLite metadata engine (:class:`cryptfs.meta.MetaEngine`) through SQLAlchemy Core.

The one module that holds SQL and talks to the database driver (tests/test_05_layers.py).

One database file per vault holds inodes, directory entries, chunk maps, object records with
reference counts, extended attributes and the ledger. One connection, used by one thread at a
time (callers hold the filesystem lock): WAL journal, ``synchronous=NORMAL`` (a commit survives
a crash of the process; ``sync()`` makes it survive power loss), one transaction per operation.
While mounted, a background thread with its own connection checkpoints the WAL, so commits do
not wait for a checkpoint's fsyncs.

Incremental shipping (:meth:`MetaStore.changes`): the frames committed to the WAL since the
last shipment are read from the ``-wal`` file (:mod:`cryptfs.meta.wal`). A *pin*, a connection
holding a read transaction at the end of the last shipment, keeps every checkpoint from copying
later frames into the database file, so SQLite never restarts the log over frames not yet
shipped (Litestream's technique); the log restarts only when every frame in it was shipped, and
a new generation (new salts) is then read from its first frame.

Longer than ~400 lines on purpose: it is the one module that holds SQL
(tests/test_05_layers.py), so every statement of the SQLite engine is here, next to the schema.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    create_engine,
    delete,
    event,
    select,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateIndex, CreateTable

from cryptfs.errors import ConfigError, MetaError, MetaFull
from cryptfs.format.codec import ChunkRef
from cryptfs.meta.engine import ROOT_INO, Inode, LedgerRow, Transactions
from cryptfs.meta.locks import Held
from cryptfs.meta.namespace import NamespaceOps, touched
from cryptfs.meta.wal import (
    FRAME_HEADER,
    WAL_HEADER,
    WAL_INDEX_HEADER,
    WalError,
    WalIndex,
    WalPosition,
    WalRead,
    encode_segment,
    read_wal,
    read_wal_index,
)

# The version of the tables below, stamped in the database header (``PRAGMA user_version``) and
# so in every metadata snapshot. Version 1 had no stamp (user_version 0); version 3 added the
# partial indexes of staged and unreferenced objects (a checkpoint finds them without reading
# every object); version 4 the pack and offset of chunk objects stored in a pack (docs/FORMAT.md
# 4.3); version 5 the journal of fsync'd bytes not yet in a chunk (5.3). A database of an older
# version is migrated on open by the steps in MIGRATIONS; a newer one is refused.
SCHEMA_VERSION = 5

md = MetaData()
inodes = Table(
    "inodes",
    md,
    Column("ino", Integer, primary_key=True),
    Column("mode", Integer, nullable=False),
    Column("uid", Integer, nullable=False),
    Column("gid", Integer, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("nlink", Integer, nullable=False),
    Column("atime_ns", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("ctime_ns", BigInteger, nullable=False),
    Column("rdev", Integer, nullable=False, default=0),
    Column("target", LargeBinary),
)
dentries = Table(
    "dentries",
    md,
    Column("parent", Integer, nullable=False),
    Column("name", LargeBinary, nullable=False),
    Column("ino", Integer, nullable=False),
    PrimaryKeyConstraint("parent", "name"),
    Index("ix_dentries_ino", "ino"),
)
blocks = Table(
    "blocks",
    md,
    Column("ino", Integer, nullable=False),
    Column("idx", BigInteger, nullable=False),
    Column("obj", Text, nullable=False),
    PrimaryKeyConstraint("ino", "idx"),
)
objects = Table(
    "objects",
    md,
    Column("name", Text, primary_key=True),
    Column("size", Integer, nullable=False),
    Column("sha256", LargeBinary, nullable=False),
    Column("refcount", Integer, nullable=False),
    # 'staged': sealed on local disk, upload pending; 'stored': in the store.
    Column("state", Text, nullable=False),
    # a chunk object stored in a pack: the pack's name and the object's offset in it (NULL
    # for an object of its own)
    Column("pack", Text),
    Column("off", BigInteger),
)
# what a checkpoint looks for: the partial indexes hold just those rows (queries name the same
# literal terms, so that SQLite can use them)
_INDEX_STAGED = "CREATE INDEX IF NOT EXISTS ix_objects_staged ON objects (name) " \
    "WHERE state = 'staged'"
_INDEX_UNREFERENCED = "CREATE INDEX IF NOT EXISTS ix_objects_unreferenced ON objects (name) " \
    "WHERE refcount <= 0"
_INDEX_PACKS = "CREATE INDEX IF NOT EXISTS ix_objects_pack ON objects (pack) " \
    "WHERE pack IS NOT NULL"
xattrs = Table(
    "xattrs",
    md,
    Column("ino", Integer, nullable=False),
    Column("name", LargeBinary, nullable=False),
    Column("value", LargeBinary, nullable=False),
    PrimaryKeyConstraint("ino", "name"),
)
ledger = Table(
    "ledger",
    md,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("time_ns", BigInteger, nullable=False),
    Column("op", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", LargeBinary, nullable=False),
    Column("prev", LargeBinary, nullable=False),
    Column("hash", LargeBinary, nullable=False),
)
copies = Table(
    "copies",
    md,
    Column("name", Text, nullable=False),
    Column("store", Text, nullable=False),
    # 'ok': the store holds a good copy; 'pending': it should, and does not yet (or it lost it);
    # 'delete': the object was deleted but this store was down and still keeps a copy
    Column("state", Text, nullable=False),
    PrimaryKeyConstraint("name", "store"),
)
state = Table(
    "state",
    md,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)
# the journal (docs/FORMAT.md 5.3): the bytes of chunk ``idx`` of file ``ino`` from byte ``off``
# on are the sealed bytes ``data`` (an fsync's, not yet sealed into a chunk), the rows of a chunk
# applied in ``seq`` order; they go when the chunk map of that chunk changes, or the file does
journal = Table(
    "journal",
    md,
    Column("ino", Integer, nullable=False),
    Column("idx", BigInteger, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("off", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    PrimaryKeyConstraint("ino", "idx", "seq"),
)


INODE_FIELDS = [f.name for f in fields(Inode)]

_SQL_GET_INODE = (
    "SELECT ino, mode, uid, gid, size, nlink, atime_ns, mtime_ns, ctime_ns, rdev, target "
    "FROM inodes WHERE ino = ?"
)
_SQL_UPDATE_INODE = (
    "UPDATE inodes SET mode = ?, uid = ?, gid = ?, size = ?, nlink = ?, atime_ns = ?, "
    "mtime_ns = ?, ctime_ns = ?, rdev = ?, target = ? WHERE ino = ?"
)
_SQL_LOOKUP = "SELECT ino FROM dentries WHERE parent = ? AND name = ?"
_INODE_COLS = "ino, mode, uid, gid, size, nlink, atime_ns, mtime_ns, ctime_ns, rdev, target"
# the compound primitives of the namespace operations, one statement each
_SQL_TOUCH_INODE = (
    f"UPDATE inodes SET nlink = nlink + ?, ctime_ns = ? WHERE ino = ? RETURNING {_INODE_COLS}"
)
_SQL_TOUCH_INODE_MTIME = (
    "UPDATE inodes SET nlink = nlink + ?, ctime_ns = ?, mtime_ns = ? WHERE ino = ? "
    f"RETURNING {_INODE_COLS}"
)
_SQL_SET_ATTRS = (  # ?1 perms, ?2 uid, ?3 gid, ?4 atime, ?5 mtime, ?6 now, ?7 ino
    "UPDATE inodes SET mode = CASE WHEN ?1 IS NULL THEN mode ELSE (mode & 61440) | ?1 "
    "END, uid = coalesce(?2, uid), gid = coalesce(?3, gid), "
    "atime_ns = coalesce(?4, atime_ns), mtime_ns = coalesce(?5, mtime_ns), "
    f"ctime_ns = ?6 WHERE ino = ?7 RETURNING {_INODE_COLS}"
)
# the bytes the chunks of inode X take (see MetaStore.allocated)
_SQL_ALLOCATED = (
    "SELECT coalesce(sum((min(o.size, :cs) + :unit - 1) / :unit * :unit), 0) FROM blocks b "
    "JOIN objects o ON o.name = b.obj WHERE b.ino = {}"
)
_SQL_LOOKUP_STAT = (
    "SELECT i.ino, i.mode, i.uid, i.gid, i.size, i.nlink, i.atime_ns, i.mtime_ns, i.ctime_ns, "
    "i.rdev, i.target, CASE WHEN i.mode & 61440 = 32768 THEN ("
    + _SQL_ALLOCATED.format("i.ino") + ") ELSE 0 END "
    "FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.parent = :parent AND d.name = :name"
)
_SQL_STAT_DIR = (
    "SELECT d.name, i.ino, i.mode, i.uid, i.gid, i.size, i.nlink, i.atime_ns, i.mtime_ns, "
    "i.ctime_ns, i.rdev, i.target, CASE WHEN i.mode & 61440 = 32768 THEN ("
    + _SQL_ALLOCATED.format("i.ino") + ") ELSE 0 END "
    "FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.parent = :parent"
)
_SQL_ADD_DENTRY_IF_ABSENT = (
    "INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
)
_SQL_POP_DENTRY = "DELETE FROM dentries WHERE parent = ? AND name = ? RETURNING ino"
_SQL_GET_BLOCKS = (
    "SELECT b.idx, b.obj, o.size, o.sha256, o.pack, o.off FROM blocks b "
    "JOIN objects o ON o.name = b.obj "
    "WHERE b.ino = ? AND b.idx >= ? AND b.idx < ?"
)
_SQL_PARENT = "SELECT parent FROM dentries WHERE ino = ? LIMIT 1"
_SQL_NEXT_FIRST_CHUNKS = (
    "SELECT d.name, b.obj, o.size, o.sha256, o.pack, o.off FROM dentries d "
    "JOIN blocks b ON b.ino = d.ino AND b.idx = 0 JOIN objects o ON o.name = b.obj "
    "WHERE d.parent = ? AND d.name > ? ORDER BY d.name LIMIT ?"
)
_SQL_LEDGER_SELECT = "SELECT seq, time_ns, op, name, size, sha256, prev, hash FROM ledger "
_SQL_LEDGER_INSERT = (
    "INSERT INTO ledger (seq, time_ns, op, name, size, sha256, prev, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_INCREF = "UPDATE objects SET refcount = refcount + 1 WHERE name = ?"
_SQL_DECREF = "UPDATE objects SET refcount = refcount - 1 WHERE name = ?"


log = logging.getLogger("cryptfs.meta.sqlite")

# The background checkpointer (see MetaStore.start_checkpointer) checkpoints the WAL once
# commits pause for CHECKPOINT_IDLE seconds, or after CHECKPOINT_COMMITS commits in a burst; a
# commit that finds the WAL WAL_BACKSTOP_PAGES long (4 KiB pages) checkpoints it itself.
CHECKPOINT_IDLE = 1.0
# Shipping: more than MAX_SEGMENT_WAL bytes of log since the last shipment are shipped as an
# image instead (reading and checking frames in Python costs more than an image then); a log
# over WAL_RESTART_BYTES after a shipment is checkpointed and truncated (pins keep it growing).
MAX_SEGMENT_WAL = 16 << 20
WAL_RESTART_BYTES = 64 << 20
CHECKPOINT_COMMITS = 4000
WAL_BACKSTOP_PAGES = 32768


def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
    cur.close()


# copies of an object that is gone are forgotten with it, whoever deletes it
_TRIGGER_OBJECTS_COPIES = (
    "CREATE TRIGGER IF NOT EXISTS objects_copies AFTER DELETE ON objects "
    "BEGIN DELETE FROM copies WHERE name = OLD.name; END"
)


def _migrate_1_to_2(raw: sqlite3.Connection) -> None:
    """Version 1 databases carry no stamp, and those written before replication lack the
    ``copies`` table and its trigger (older ones also ``ix_dentries_ino``): create what is
    missing. The tables that exist mean the same in both versions."""
    raw.execute(
        "CREATE TABLE IF NOT EXISTS copies (name TEXT NOT NULL, store TEXT NOT NULL, "
        "state TEXT NOT NULL, PRIMARY KEY (name, store))"
    )
    raw.execute("CREATE INDEX IF NOT EXISTS ix_dentries_ino ON dentries (ino)")
    raw.execute(_TRIGGER_OBJECTS_COPIES)


def _migrate_2_to_3(raw: sqlite3.Connection) -> None:
    """Version 3 adds the partial indexes of staged and unreferenced objects."""
    raw.execute(_INDEX_STAGED)
    raw.execute(_INDEX_UNREFERENCED)


def _migrate_3_to_4(raw: sqlite3.Connection) -> None:
    """Version 4 adds the pack and offset of chunk objects stored in packs."""
    raw.execute("ALTER TABLE objects ADD COLUMN pack TEXT")
    raw.execute("ALTER TABLE objects ADD COLUMN off BIGINT")
    raw.execute(_INDEX_PACKS)


def _migrate_4_to_5(raw: sqlite3.Connection) -> None:
    """Version 5 adds the journal of fsync'd bytes not yet in a chunk."""
    raw.execute(str(CreateTable(journal).compile(dialect=sqlite_dialect.dialect())))


# MIGRATIONS[n] turns a version n database into version n + 1 (a later version adds its step
# here and bumps SCHEMA_VERSION); the steps run in order, all in one transaction with the stamp.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_1_to_2,
                                                               2: _migrate_2_to_3,
                                                               3: _migrate_3_to_4,
                                                               4: _migrate_4_to_5}


def _create_schema(raw: sqlite3.Connection) -> None:
    """The current schema in an empty database (the DDL SQLAlchemy generates for the tables)."""
    dialect = sqlite_dialect.dialect()
    for t in md.sorted_tables:
        raw.execute(str(CreateTable(t).compile(dialect=dialect)))
        for ix in t.indexes:
            raw.execute(str(CreateIndex(ix).compile(dialect=dialect)))
    raw.execute(_TRIGGER_OBJECTS_COPIES)
    raw.execute(_INDEX_STAGED)
    raw.execute(_INDEX_UNREFERENCED)
    raw.execute(_INDEX_PACKS)


def image_schema_version(image: bytes) -> int:
    """The schema stamp of a serialised database (a metadata snapshot's plaintext): the
    header's user version, a signed big-endian 32-bit integer at bytes 60-63 (0 if unstamped:
    version 1, or an empty database)."""
    return int.from_bytes(image[60:64], "big", signed=True)


def check_schema_version(stamped: int, what: str) -> None:
    """Raise ConfigError (one line naming ``what``) unless this code can open a database
    whose header carries the stamp ``stamped``."""
    if stamped > SCHEMA_VERSION:
        raise ConfigError(
            f"{what} is schema version {stamped}, newer than this cryptfs supports "
            f"({SCHEMA_VERSION})"
        )
    if stamped < 0:
        raise ConfigError(f"{what} is corrupt (schema version {stamped})")


def _stamp(raw: sqlite3.Connection, path: Path) -> int:
    stamped = int(raw.execute("PRAGMA user_version").fetchone()[0])
    check_schema_version(stamped, f"metadata database {path}")
    return stamped


def _prepare_schema(raw: sqlite3.Connection, path: Path) -> int | None:
    """Create the schema in an empty database, or check the stamp of an existing one and
    migrate it to SCHEMA_VERSION in one transaction. Returns the version migrated from (None
    if nothing was migrated); raises ConfigError for a version newer than this code."""
    if _stamp(raw, path) == SCHEMA_VERSION:
        return None
    raw.execute("BEGIN IMMEDIATE")  # nobody else stamps or migrates meanwhile
    try:
        stamped = _stamp(raw, path)
        tables = raw.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        found: int | None = None
        if not stamped and not tables:  # a new database
            _create_schema(raw)
        else:
            found = stamped or 1
            for v in range(found, SCHEMA_VERSION):
                MIGRATIONS[v](raw)
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    if found is not None and found != SCHEMA_VERSION:
        log.info("metadata database %s migrated from schema version %d to %d",
                 path, found, SCHEMA_VERSION)
    return found if found != SCHEMA_VERSION else None


def _meta_error(path: Path, e: BaseException) -> MetaError:
    """The one-line, errno-carrying error for a failed database operation."""
    orig = getattr(e, "orig", e)
    code = getattr(orig, "sqlite_errorcode", None)
    cls = MetaFull if code == sqlite3.SQLITE_FULL else MetaError
    return cls(f"metadata database {path}: {orig}")


@dataclass
class _Shipment:
    """A shipment: where in the WAL it ends, and the pin that keeps later frames there."""

    position: WalPosition
    pin: sqlite3.Connection


@dataclass
class _Taken:
    """A :class:`cryptfs.meta.engine.Frozen` state of a SQLite engine, read whole when it was
    fixed (:meth:`MetaStore.freeze`): one machine's database has no second writer whose
    commits a later read could see, and its image is a copy of the file."""

    data: bytes
    ledger_seq: int
    _staged: list[ChunkRef]
    _unreferenced: list[ChunkRef]

    def image(self, leave_out: Callable[[ChunkRef], bool] | None = None) -> bytes:
        if leave_out is not None:
            raise ValueError("an unshared engine's image leaves nothing out")
        return self.data

    def staged(self) -> list[ChunkRef]:
        return list(self._staged)

    def unreferenced_objects(self) -> list[ChunkRef]:
        return list(self._unreferenced)

    def objects_named(self, *prefixes: str) -> list[ChunkRef]:
        """Read from the image, opened in memory (its header says WAL mode, which a database
        in memory cannot be in: its two version bytes say a rollback journal instead)."""
        data = bytearray(self.data)
        data[18:20] = b"\1\1"
        db = sqlite3.connect(":memory:")
        try:
            db.deserialize(bytes(data))
            rows = db.execute("SELECT name, size, sha256, pack, off FROM objects").fetchall()
        finally:
            db.close()
        return [ChunkRef(n, z, bytes(h), p, f or 0) for n, z, h, p, f in rows
                if n.startswith(prefixes)]

    def close(self) -> None:
        """Nothing held."""


class MetaStore(Transactions, NamespaceOps):
    """Typed access to the vault database. Not thread-safe: callers serialise. The namespace
    operations come from :class:`NamespaceOps`, transaction blocks from :class:`Transactions`.

    Opening checks the schema stamp: an empty database gets the current schema, an older one is
    migrated (``migrated_from`` says from which version, else it is None), and a newer or
    invalid one raises ConfigError."""

    shared = False  # one machine: the layer above may cache without bounds

    # one machine: the lease excludes others, so nothing is held elsewhere
    def hold(self, ino: int) -> None:
        """Nothing to record: the files open are the filesystem's own."""

    def open_inode(self, ino: int) -> Inode | None:
        """The inode (nothing to hold: see :meth:`hold`)."""
        return self.get_inode(ino)

    def unhold(self, ino: int) -> None:
        """Nothing recorded."""

    def held(self, ino: int) -> bool:
        return False

    def live_sessions(self) -> int:
        return 0

    def session_horizons(self, own: bool = False) -> list[float]:
        return []

    def lock_ledger(self) -> None:
        """Nothing to wait for: one writer."""

    def set_lock(self, ino: int, owner: int, kind: str, ltype: int, start: int, end: int,
                 pid: int) -> Held | None:
        """Never called: one machine's locks are the kernel's (the mount registers no lock
        operations for an engine that is not ``shared``)."""
        raise OSError(errno.ENOSYS, "the SQLite engine keeps no locks (the kernel does)")

    def test_lock(self, ino: int, owner: int, kind: str, ltype: int, start: int,
                  end: int) -> Held | None:
        """Never called (see :meth:`set_lock`)."""
        raise OSError(errno.ENOSYS, "the SQLite engine keeps no locks (the kernel does)")

    def __init__(
        self,
        path: Path | str,
        on_commit: Callable[[], None] | None = None,
        on_rollback: Callable[[], None] | None = None,
    ) -> None:
        """``on_commit`` runs after every commit, ``on_rollback`` after every rollback (for
        the filesystem's deferred writes: see :class:`cryptfs.fs.CommitHooks`)."""
        self.path = Path(path)
        self.engine = create_engine(
            f"sqlite:///{self.path}",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
        event.listen(self.engine, "connect", _on_connect)
        try:
            self.conn = self.engine.connect()
            raw: sqlite3.Connection = self.conn.connection.driver_connection  # type: ignore
            self.migrated_from = _prepare_schema(raw, self.path)
            quick = self.conn.exec_driver_sql("PRAGMA quick_check").scalar()
        except ConfigError:
            self.conn.close()
            self.engine.dispose()
            raise
        except (SADatabaseError, sqlite3.DatabaseError) as e:
            raise ConfigError(
                f"metadata database {self.path} is corrupt or unreadable "
                f"({getattr(getattr(e, 'orig', e), 'args', [''])[0]})",
                hint="move it away to rebuild it from the store",
            ) from None
        if quick != "ok":
            raise ConfigError(
                f"metadata database {self.path} is corrupt ({quick})",
                hint="move it away to rebuild it from the store",
            )
        self.conn.commit()
        # hot paths use precompiled SQL on the driver connection, inside the same transactions
        self.raw: sqlite3.Connection = self.conn.connection.driver_connection  # type: ignore
        self._depth = 0  # nesting of transaction() blocks
        self._undo: list[Callable[[], None]] = []  # see undo_on_rollback
        # called after every commit and after every rollback (the filesystem's deferred writes)
        self.on_commit = on_commit
        self.on_rollback = on_rollback
        self._checkpointer: threading.Thread | None = None
        self._checkpointer_stop = threading.Event()
        self.commits = 0  # commits so far, and when the last one ended (monotonic)
        self.last_commit = 0.0
        # incremental shipping: the shipment in the store and the one begun (see changes())
        self._shipped: _Shipment | None = None
        self._begun: _Shipment | None = None
        self._spare: sqlite3.Connection | None = None  # a pin's connection, for the next pin
        # count_inodes's answer and the connection's total_changes it was counted at
        self._inode_count: tuple[int, int] | None = None
        # the journal may hold rows: chunk map changes drop the rows of their chunks
        self._journal = self.raw.execute("SELECT 1 FROM journal LIMIT 1").fetchone() is not None

    def start_checkpointer(self) -> None:
        """Checkpoint the WAL into the database file from a thread with its own connection,
        when commits pause (or after a long burst). With ``synchronous=NORMAL`` a checkpoint's
        two fsyncs are the only ones SQLite does, and an fsync stalls the filesystem's other
        metadata writes (its journal commits): SQLite's automatic checkpoint would run them
        inside every ~100th commit of a burst of small files."""
        if self._checkpointer is not None:
            return

        def run() -> None:
            con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            done = 0
            try:
                while not self._checkpointer_stop.wait(CHECKPOINT_IDLE / 4):
                    pending = self.commits - done
                    idle = time.monotonic() - self.last_commit >= CHECKPOINT_IDLE
                    if not pending or (not idle and pending < CHECKPOINT_COMMITS):
                        continue
                    done += pending
                    try:
                        con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as e:  # the writer's own checkpoint is the backstop
                        log.warning("background checkpoint of %s failed: %s", self.path, e)
            finally:
                con.close()

        self._checkpointer = threading.Thread(target=run, name="wal-checkpoint", daemon=True)
        self._checkpointer.start()

    def _rollback_db(self) -> None:
        """Roll back both layers (SQLAlchemy's transaction and the driver's)."""
        self.conn.rollback()
        self.raw.rollback()
        self._inode_count = None

    def _db_error(self, e: BaseException) -> MetaError | None:
        if isinstance(e, (sqlite3.Error, SADatabaseError)):
            return _meta_error(self.path, e)
        return None

    def commit(self) -> None:
        """Commit statements run outside a :meth:`transaction` block, on both layers
        (SQLAlchemy's transaction and the driver's, which raw hot-path statements open). A
        commit the database refuses (a full disk shows here in WAL mode) rolls back whole and
        raises MetaError (MetaFull for a full disk)."""
        try:
            if self.conn.in_transaction():
                self.conn.commit()
            self.raw.commit()
        except (sqlite3.Error, SADatabaseError) as e:
            self._rolled_back()
            raise _meta_error(self.path, e) from e
        self._undo.clear()
        self.commits += 1
        self.last_commit = time.monotonic()
        if self.on_commit is not None:
            self.on_commit()

    def close(self) -> None:
        self._unpin()
        if self._spare is not None:
            with contextlib.suppress(sqlite3.Error):
                self._spare.close()
            self._spare = None
        if self._checkpointer is not None:
            self._checkpointer_stop.set()
            self._checkpointer.join()
            self._checkpointer = None
        with contextlib.suppress(Exception):
            self.commit()
            self.conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()
        self.engine.dispose()

    def sync(self) -> None:
        """Commit, then make every committed transaction durable against power loss: in WAL
        mode the log holds every commit not yet checkpointed (a checkpoint syncs the database
        file before the log may restart), so syncing the log suffices: its data, and its size
        when it grew (fdatasync, as SQLite syncs it; not its times, one inode write less)."""
        self.commit()
        try:
            fd = os.open(self._wal_path, os.O_RDONLY)
        except FileNotFoundError:  # no log: every commit is in the database file
            return
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    # -- incremental shipping (see the module docstring) ---------------------------------------
    @property
    def _wal_path(self) -> str:
        return str(self.path) + "-wal"

    def _pin(self) -> sqlite3.Connection:
        """A connection holding a read transaction at the newest commit (the connection of a
        pin released before, if there is one: opening one costs more than a round's SQL)."""
        con, self._spare = self._spare, None
        if con is None:
            try:
                con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                      timeout=10)
            except sqlite3.Error as e:
                raise _meta_error(self.path, e) from e
        try:
            con.execute("BEGIN")
            con.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except sqlite3.Error as e:
            con.close()
            raise _meta_error(self.path, e) from e
        return con

    def _unpin(self, which: str = "both") -> None:
        for attr in (("_shipped", "_begun") if which == "both" else (which,)):
            ship = getattr(self, attr)
            if ship is not None:
                self._release(ship.pin)
            setattr(self, attr, None)

    def _release(self, pin: sqlite3.Connection) -> None:
        """End a pin's read transaction; its connection is kept for the next pin."""
        try:
            pin.execute("ROLLBACK")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                pin.close()
            return
        if self._spare is None:
            self._spare = pin
        else:
            pin.close()

    def _read_wal(self, after: WalPosition | None, keep_pages: bool) -> WalRead | None:
        """The committed frames after ``after`` (None if the log is empty)."""
        try:
            fd = os.open(self._wal_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return read_wal(lambda n, off: os.pread(fd, n, off), after, keep_pages,
                            self._wal_index())
        finally:
            os.close(fd)

    def _wal_index(self) -> WalIndex | None:
        """The live wal-index header (None if there is none to read): the caller holds the
        filesystem lock, so no commit is under way on this database."""
        try:
            fd = os.open(str(self.path) + "-shm", os.O_RDONLY)
        except OSError:
            return None
        try:
            return read_wal_index(os.pread(fd, 2 * WAL_INDEX_HEADER, 0))
        except OSError:
            return None
        finally:
            os.close(fd)

    def snapshot(self) -> contextlib.AbstractContextManager[None]:
        """A :meth:`transaction` block: one machine writes this database, through this
        connection, and its writes wait for the caller's lock, so the block's reads see one
        state."""
        return self.transaction()

    def image(self, leave_out: Callable[[ChunkRef], bool] | None = None) -> bytes:
        """Commit; the committed database as one SQLite image (a full metadata snapshot), and
        begin a shipment ending at it (see :meth:`changes`). The WAL is checkpointed into the
        database file and truncated first, so the next shipment starts at its first frame.
        One machine: no upload of another to leave out (``leave_out`` must be None)."""
        if leave_out is not None:
            raise ValueError("an unshared engine's image leaves nothing out")
        self.commit()
        self._unpin()  # the shipments before are superseded by this image
        busy = self.raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        img = self.raw.serialize()
        pin = self._pin()
        position = WalPosition(None, 0, (0, 0))
        if busy:  # not truncated (a reader in the way): find the end of the log
            try:
                found = self._read_wal(None, keep_pages=False)
            except (WalError, OSError) as e:
                pin.close()
                raise MetaError(f"metadata database {self.path}: its WAL: {e}") from None
            if found is not None:
                position = found.position
        self._begun = _Shipment(position, pin)
        return img

    def freeze(self) -> _Taken:
        """See :meth:`MetaEngine.freeze`: everything is read here, under the caller's lock
        (the :meth:`image`, then the staged and unreferenced objects and the ledger head),
        as a checkpoint read it before there was a Frozen state."""
        data = self.image()
        last = self.ledger_last()
        return _Taken(data, last[0] if last else 0, self.objects_in_state("staged"),
                      self.unreferenced_objects())

    def changes(self) -> bytes | None:
        """Commit; the pages committed since the last shipment as a segment (see
        :mod:`cryptfs.meta.wal`), and begin a shipment ending here. None if nothing was
        shipped yet (or the log cannot be read, logged): the caller ships an image."""
        self.commit()
        self._unpin("_begun")
        if self._shipped is None:
            return None
        try:
            wal_bytes = os.stat(self._wal_path).st_size
        except FileNotFoundError:
            wal_bytes = 0
        at = self._shipped.position.frames * (FRAME_HEADER + self._page_size()) + WAL_HEADER
        if wal_bytes - at > MAX_SEGMENT_WAL:  # a burst of writes: an image is cheaper
            return None
        pin = self._pin()  # first: no checkpoint passes what is read below
        try:
            found = self._read_wal(self._shipped.position, keep_pages=True)
        except (WalError, OSError) as e:
            pin.close()
            log.warning("metadata database %s: cannot read its WAL (%s); shipping an image",
                        self.path, e)
            return None
        db_pages = int(self.raw.execute("PRAGMA page_count").fetchone()[0])
        if found is None or found.db_pages is None:  # nothing committed since
            position, pages, page_size = self._shipped.position, {}, self._page_size()
        elif found.db_pages != db_pages:  # never expected: do not ship what may be wrong
            pin.close()
            log.warning("metadata database %s: its WAL ends at %d pages, the database has %d; "
                        "shipping an image", self.path, found.db_pages, db_pages)
            return None
        else:
            position, pages, page_size = found.position, found.pages, found.page_size
        if wal_bytes > WAL_RESTART_BYTES:
            # The pins keep the log from restarting: let it restart now, with every frame in
            # this segment. The shipment before is given up (if this one does not reach the
            # store, the next checkpoint ships an image).
            pin.close()
            self._unpin()
            busy = self.raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            pin = self._pin()
            if not busy:
                position = WalPosition(None, 0, (0, 0))
        self._begun = _Shipment(position, pin)
        return encode_segment(page_size, db_pages, pages)

    def _page_size(self) -> int:
        return int(self.raw.execute("PRAGMA page_size").fetchone()[0])

    def shipped(self) -> None:
        """The shipment begun last is in the store: later ones continue from its end."""
        if self._begun is None:
            return
        self._unpin("_shipped")
        self._shipped, self._begun = self._begun, None

    def change_count(self) -> int:
        """Rows written through this connection so far (grows with every write)."""
        return int(self.raw.total_changes)

    # -- key/value state ----------------------------------------------------------------------
    def get_state(self, key: str) -> str | None:
        row = self.raw.execute('SELECT value FROM state WHERE "key" = ?', (key,)).fetchone()
        return None if row is None else row[0]

    def set_state(self, key: str, value: str) -> None:
        with self.transaction():  # (one statement: an fsync's commit marks its log place)
            self.raw.execute('INSERT OR REPLACE INTO state ("key", value) VALUES (?, ?)',
                             (key, value))

    # -- inodes -------------------------------------------------------------------------------
    def get_inode(self, ino: int) -> Inode | None:
        row = self.raw.execute(_SQL_GET_INODE, (ino,)).fetchone()
        return Inode(*row) if row else None

    def touch_inode(self, ino: int, now_ns: int, nlink: int = 0, mtime: bool = False,
                    known: Inode | None = None) -> Inode | None:
        """One statement (UPDATE ... RETURNING); see :meth:`MetaEngine.touch_inode`. With
        ``known`` (this engine is not shared: the caller's row is the database's) a plain
        UPDATE of that row touched, whole: no row returned, a third of the cost in SQLite
        (each create touches its directory); None still if no row was there."""
        if known is not None:
            node = touched(Inode(ino, known.mode, known.uid, known.gid, known.size,
                                 known.nlink, known.atime_ns, known.mtime_ns, known.ctime_ns,
                                 known.rdev, known.target), now_ns, nlink, mtime)
            if self.raw.execute(_SQL_UPDATE_INODE, self._inode_params(node)).rowcount != 1:
                return None
            return node
        if mtime:
            rows = self.raw.execute(_SQL_TOUCH_INODE_MTIME, (nlink, now_ns, now_ns, ino))
        else:
            rows = self.raw.execute(_SQL_TOUCH_INODE, (nlink, now_ns, ino))
        row = rows.fetchall()  # (all: the statement ends here)
        return Inode(*row[0]) if row else None

    def set_attrs(self, ino: int, now_ns: int, perms: int | None = None,
                  uid: int | None = None, gid: int | None = None, atime_ns: int | None = None,
                  mtime_ns: int | None = None) -> Inode | None:
        """One statement (UPDATE ... RETURNING); see :meth:`MetaEngine.set_attrs`."""
        row = self.raw.execute(_SQL_SET_ATTRS, (perms, uid, gid, atime_ns, mtime_ns, now_ns,
                                                ino)).fetchall()
        return Inode(*row[0]) if row else None

    def insert_inode(self, node: Inode) -> int:
        cur = self.raw.execute(
            "INSERT INTO inodes (ino, mode, uid, gid, size, nlink, atime_ns, mtime_ns, ctime_ns, "
            "rdev, target) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                node.ino or None,
                node.mode,
                node.uid,
                node.gid,
                node.size,
                node.nlink,
                node.atime_ns,
                node.mtime_ns,
                node.ctime_ns,
                node.rdev,
                node.target,
            ),
        )
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def update_inode(self, node: Inode) -> None:
        self.raw.execute(_SQL_UPDATE_INODE, self._inode_params(node))

    @staticmethod
    def _inode_params(node: Inode) -> tuple[object, ...]:
        """The parameters of _SQL_UPDATE_INODE for ``node``."""
        return (node.mode, node.uid, node.gid, node.size, node.nlink, node.atime_ns,
                node.mtime_ns, node.ctime_ns, node.rdev, node.target, node.ino)

    def delete_inode(self, ino: int) -> list[str]:
        """Remove an inode with its xattrs, chunk map and any names left pointing at it (the
        hidden name of a file unlinked while open); return the objects it referenced."""
        objs = self.remove_blocks_from(ino, 0)
        self.raw.execute("DELETE FROM dentries WHERE ino = ?", (ino,))
        self.raw.execute("DELETE FROM xattrs WHERE ino = ?", (ino,))
        self.raw.execute("DELETE FROM inodes WHERE ino = ?", (ino,))
        return objs

    def orphan_inodes(self) -> list[int]:
        return list(self.conn.execute(select(inodes.c.ino).where(inodes.c.nlink <= 0)).scalars())

    def count_inodes(self) -> int:
        """Counted again only after rows changed (the connection's ``total_changes``; a
        rollback forgets the count): a ``statfs`` per second of a monitoring agent or a shell
        prompt costs no table scan on a vault of a million files."""
        changes = self.change_count()
        if self._inode_count is None or self._inode_count[0] != changes:
            n = self.raw.execute("SELECT count(*) FROM inodes").fetchone()[0]
            self._inode_count = (changes, int(n))
        return self._inode_count[1]

    # -- directory entries --------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self.raw.execute(_SQL_LOOKUP, (parent, name)).fetchone()
        return row[0] if row else None

    def lookup_stat(self, parent: int, name: bytes, chunk_size: int,
                    unit: int) -> tuple[Inode, int] | None:
        """One query; see :meth:`MetaEngine.lookup_stat`."""
        row = self.raw.execute(_SQL_LOOKUP_STAT, {"parent": parent, "name": name,
                                                  "cs": chunk_size, "unit": unit}).fetchone()
        return (Inode(*row[:11]), int(row[11])) if row else None

    def stat_dir(self, parent: int, chunk_size: int,
                 unit: int) -> list[tuple[bytes, Inode, int]]:
        """One query; see :meth:`MetaEngine.stat_dir`."""
        rows = self.raw.execute(_SQL_STAT_DIR, {"parent": parent, "cs": chunk_size,
                                                "unit": unit}).fetchall()
        return [(bytes(r[0]), Inode(*r[1:12]), int(r[12])) for r in rows]

    def add_dentry(self, parent: int, name: bytes, ino: int) -> None:
        self.raw.execute(
            "INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino)
        )

    def add_dentry_if_absent(self, parent: int, name: bytes, ino: int) -> bool:
        return self.raw.execute(_SQL_ADD_DENTRY_IF_ABSENT, (parent, name, ino)).rowcount == 1

    def remove_dentry(self, parent: int, name: bytes) -> None:
        self.raw.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))

    def pop_dentry(self, parent: int, name: bytes) -> int | None:
        row = self.raw.execute(_SQL_POP_DENTRY, (parent, name)).fetchall()
        return row[0][0] if row else None

    def list_dir(
        self, parent: int, after: bytes | None = None, limit: int | None = None
    ) -> list[tuple[bytes, int, int]]:
        """``(name, ino, mode)`` sorted by name, starting after ``after``."""
        q = (
            select(dentries.c.name, dentries.c.ino, inodes.c.mode)
            .join(inodes, inodes.c.ino == dentries.c.ino)
            .where(dentries.c.parent == parent)
        )
        if after is not None:
            q = q.where(dentries.c.name > after)
        q = q.order_by(dentries.c.name)
        if limit:
            q = q.limit(limit)
        return [(bytes(n), i, m) for n, i, m in self.conn.execute(q)]

    def has_children(self, parent: int, ignore_prefix: bytes | None = None) -> bool:
        q = select(dentries.c.name).where(dentries.c.parent == parent)
        for (name,) in self.conn.execute(q):
            if ignore_prefix is None or not bytes(name).startswith(ignore_prefix):
                return True
        return False

    def hidden_dentries(self, prefix: bytes) -> list[tuple[int, bytes, int]]:
        """``(parent, name, ino)`` of entries whose name starts with ``prefix``."""
        rows = self.raw.execute(
            "SELECT parent, name, ino FROM dentries WHERE substr(name, 1, ?) = ?",
            (len(prefix), prefix),
        )
        return [(p, bytes(n), i) for p, n, i in rows]

    def names_of(self, ino: int) -> list[tuple[int, bytes]]:
        """``(parent, name)`` of every entry that names ``ino``."""
        rows = self.raw.execute("SELECT parent, name FROM dentries WHERE ino = ?", (ino,))
        return [(p, bytes(n)) for p, n in rows]

    # -- chunk maps and objects ---------------------------------------------------------------
    def get_blocks(self, ino: int, lo: int, hi: int) -> dict[int, ChunkRef]:
        """Chunk refs of ``ino`` for indexes ``lo <= idx < hi`` (holes are absent)."""
        rows = self.raw.execute(_SQL_GET_BLOCKS, (ino, lo, hi))
        return {i: ChunkRef(o, z, bytes(h), p, f or 0) for i, o, z, h, p, f in rows}

    def set_block(self, ino: int, idx: int, ref: ChunkRef | None, staged: bool) -> str | None:
        """Point chunk ``idx`` of ``ino`` at ``ref`` (None: a hole). Adjusts reference counts;
        returns the name of the object that was referenced before, if any."""
        row = self.raw.execute(
            "SELECT obj FROM blocks WHERE ino = ? AND idx = ?", (ino, idx)
        ).fetchone()
        old = row[0] if row else None
        if self._journal:
            self.raw.execute("DELETE FROM journal WHERE ino = ? AND idx = ?", (ino, idx))
        if old is not None and ref is not None and old == ref.name:
            return None
        if old is not None:
            self.raw.execute(_SQL_DECREF, (old,))
            self.raw.execute("DELETE FROM blocks WHERE ino = ? AND idx = ?", (ino, idx))
        if ref is not None:
            self.reference(ref, staged)
            self.raw.execute(
                "INSERT INTO blocks (ino, idx, obj) VALUES (?, ?, ?)", (ino, idx, ref.name)
            )
        return old

    def reference(self, ref: ChunkRef, staged: bool) -> None:
        if self.raw.execute(_SQL_INCREF, (ref.name,)).rowcount == 0:
            self.raw.execute(
                "INSERT INTO objects (name, size, sha256, refcount, state, pack, off) "
                "VALUES (?, ?, ?, 1, ?, ?, ?)",
                (ref.name, ref.size, ref.sha256, "staged" if staged else "stored", ref.pack,
                 ref.offset if ref.pack else None),
            )

    def remove_blocks_from(self, ino: int, first_idx: int) -> list[str]:
        """Drop chunks ``first_idx..`` of ``ino``; return the object names released."""
        if self._journal:
            self.raw.execute("DELETE FROM journal WHERE ino = ? AND idx >= ?", (ino, first_idx))
        names = [n for (n,) in self.raw.execute(
            "SELECT obj FROM blocks WHERE ino = ? AND idx >= ?", (ino, first_idx))]
        for n in names:
            self.raw.execute(_SQL_DECREF, (n,))
        if names:
            self.raw.execute("DELETE FROM blocks WHERE ino = ? AND idx >= ?", (ino, first_idx))
        return names

    def remove_blocks_range(self, ino: int, lo: int, hi: int) -> list[str]:
        """Drop chunks ``lo <= idx < hi`` of ``ino`` (they become holes); return the object
        names released."""
        if self._journal:
            self.raw.execute("DELETE FROM journal WHERE ino = ? AND idx >= ? AND idx < ?",
                             (ino, lo, hi))
        rows = self.raw.execute(
            "SELECT obj FROM blocks WHERE ino = ? AND idx >= ? AND idx < ?", (ino, lo, hi)
        ).fetchall()
        for (n,) in rows:
            self.raw.execute(_SQL_DECREF, (n,))
        if rows:
            self.raw.execute(
                "DELETE FROM blocks WHERE ino = ? AND idx >= ? AND idx < ?", (ino, lo, hi)
            )
        return [n for (n,) in rows]

    def journal_chunk(self, ino: int, idx: int, seq: int, off: int, sealed: bytes) -> None:
        self._journal = True
        self.raw.execute("INSERT OR REPLACE INTO journal (ino, idx, seq, off, data) "
                         "VALUES (?, ?, ?, ?, ?)", (ino, idx, seq, off, sealed))

    def journaled(self) -> list[tuple[int, int, int, int, bytes]]:
        return [(i, x, q, o, bytes(d)) for i, x, q, o, d in self.raw.execute(
            "SELECT ino, idx, seq, off, data FROM journal ORDER BY ino, idx, seq")]

    def next_hole(self, ino: int, idx: int) -> int:
        """The first chunk index ``>= idx`` of ``ino`` that is a hole (no chunk stored)."""
        row = self.raw.execute(
            "SELECT min(t.i) FROM (SELECT ? AS i UNION ALL SELECT idx + 1 FROM blocks "
            "WHERE ino = ? AND idx >= ?) t WHERE NOT EXISTS "
            "(SELECT 1 FROM blocks c WHERE c.ino = ? AND c.idx = t.i)",
            (idx, ino, idx, ino),
        ).fetchone()
        return int(row[0])

    def next_block(self, ino: int, idx: int) -> int | None:
        """The first chunk index ``>= idx`` of ``ino`` that is stored (not a hole), or None."""
        row = self.raw.execute(
            "SELECT min(idx) FROM blocks WHERE ino = ? AND idx >= ?", (ino, idx)
        ).fetchone()
        return row[0] if row else None

    def allocated(self, ino: int, chunk_size: int, unit: int) -> int:
        """Bytes the stored chunks of ``ino`` take: each chunk's stored size, at most
        ``chunk_size``, rounded up to a multiple of ``unit``."""
        row = self.raw.execute(_SQL_ALLOCATED.format(":ino"),
                               {"cs": chunk_size, "unit": unit, "ino": ino}).fetchone()
        return int(row[0] or 0)

    def stored_bytes(self) -> int:
        """Bytes of all chunk objects the vault records."""
        row = self.raw.execute("SELECT sum(size) FROM objects").fetchone()
        return int(row[0] or 0)

    def get_object(self, name: str) -> tuple[ChunkRef, int, str] | None:
        row = self.raw.execute(
            "SELECT size, sha256, refcount, state, pack, off FROM objects WHERE name = ?", (name,)
        ).fetchone()
        if not row:
            return None
        return ChunkRef(name, row[0], bytes(row[1]), row[4], row[5] or 0), row[2], row[3]

    def mark_stored(self, name: str) -> None:
        self.raw.execute("UPDATE objects SET state = 'stored' WHERE name = ?", (name,))

    def objects_in_state(self, st: str) -> list[ChunkRef]:
        """Objects in state ``st`` ('staged' by its partial index)."""
        if st == "staged":  # the literal term lets SQLite use ix_objects_staged
            rows = self.raw.execute(
                "SELECT name, size, sha256, pack, off FROM objects WHERE state = 'staged'")
        else:
            rows = self.raw.execute(
                "SELECT name, size, sha256, pack, off FROM objects WHERE state = ?", (st,))
        return [ChunkRef(n, s, bytes(h), p, f or 0) for n, s, h, p, f in rows.fetchall()]

    def unreferenced_objects(self) -> list[ChunkRef]:
        """Stored objects no chunk map references (by ix_objects_unreferenced)."""
        rows = self.raw.execute("SELECT name, size, sha256, pack, off FROM objects "
                                "WHERE refcount <= 0 AND state = 'stored'")
        return [ChunkRef(n, s, bytes(h), p, f or 0) for n, s, h, p, f in rows.fetchall()]

    def drop_object_if_unreferenced(self, name: str) -> bool:
        return self.raw.execute("DELETE FROM objects WHERE name = ? AND refcount <= 0",
                                (name,)).rowcount > 0

    def claim_object(self, name: str, new: bool = False) -> bool:
        """See :meth:`MetaEngine.claim_object` (one machine: a row is live while it exists,
        and its own collection never deletes what it wrote and has not committed)."""
        return new or self.get_object(name) is not None

    def claim_objects(self, names: Mapping[str, bool]) -> set[str]:
        """See :meth:`MetaEngine.claim_objects` (:meth:`claim_object` of each)."""
        return {n for n, new in names.items() if not self.claim_object(n, new)}

    def bury_object(self, name: str, size: int) -> bool:
        """See :meth:`MetaEngine.bury_object` (one machine: no tombstones)."""
        return self.get_object(name) is None

    def drop_tombstones(self) -> int:
        return 0

    def collect_objects(self, refs: list[ChunkRef],
                        delete: Callable[[list[ChunkRef]], set[str]]) -> list[ChunkRef]:
        """See :meth:`MetaEngine.collect_objects` (one machine, one writer: the rows go in one
        transaction, then the objects; one that could not be deleted is recorded again)."""
        with self.transaction():
            dropped = [r for r in refs if self.drop_object_if_unreferenced(r.name)]
        done = delete(dropped) if dropped else set()
        kept = [r for r in dropped if r.name not in done]
        if kept:
            with self.transaction():
                for ref in kept:
                    self.unreference_object(ref)
        return [r for r in dropped if r.name in done]

    # -- packs --------------------------------------------------------------------------------
    def record_pack(self, ref: ChunkRef) -> None:
        """See :meth:`MetaEngine.record_pack`."""
        self.raw.execute(
            "INSERT OR IGNORE INTO objects (name, size, sha256, refcount, state) "
            "VALUES (?, ?, ?, 1, 'stored')", (ref.name, ref.size, ref.sha256))
        self.raw.execute("UPDATE objects SET state = 'stored' WHERE pack = ? "
                         "AND state = 'staged'", (ref.name,))

    def pack_members(self, pack: str) -> list[ChunkRef]:
        """See :meth:`MetaEngine.pack_members`."""
        rows = self.raw.execute("SELECT name, size, sha256, off FROM objects WHERE pack = ? "
                                "ORDER BY off", (pack,))
        return [ChunkRef(n, z, bytes(h), pack, f) for n, z, h, f in rows.fetchall()]

    def empty_packs(self, packs: Collection[str]) -> list[ChunkRef]:
        """See :meth:`MetaEngine.empty_packs`."""
        out = []
        for pack in sorted(set(packs)):
            row = self.raw.execute(
                "SELECT size, sha256 FROM objects p WHERE name = ? AND NOT EXISTS "
                "(SELECT 1 FROM objects m WHERE m.pack = p.name)", (pack,)).fetchone()
            if row is not None:
                out.append(ChunkRef(pack, row[0], bytes(row[1])))
        return out

    def move_to_pack(self, ref: ChunkRef) -> None:
        """See :meth:`MetaEngine.move_to_pack`."""
        self.raw.execute("UPDATE objects SET pack = ?, off = ?, state = 'staged' WHERE name = ?",
                         (ref.pack, ref.offset, ref.name))

    def packs_in_use(self) -> set[str]:
        """See :meth:`MetaEngine.packs_in_use`."""
        return {p for (p,) in self.raw.execute(
            "SELECT DISTINCT pack FROM objects WHERE pack IS NOT NULL")}

    def objects_named(self, *prefixes: str) -> list[ChunkRef]:
        """The recorded objects whose name starts with one of ``prefixes`` (non-empty), by
        the name index, one range each: as cheap in a big vault as in a small one."""
        out: dict[str, ChunkRef] = {}
        for prefix in prefixes:
            end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            rows = self.raw.execute(
                "SELECT name, size, sha256 FROM objects WHERE name >= ? AND name < ?",
                (prefix, end))
            out.update((n, ChunkRef(n, z, bytes(h))) for n, z, h in rows.fetchall())
        return list(out.values())

    def all_objects(self) -> list[tuple[ChunkRef, int, str]]:
        q = select(objects)
        return [
            (ChunkRef(r.name, r.size, bytes(r.sha256), r.pack, r.off or 0), r.refcount, r.state)
            for r in self.conn.execute(q)
        ]

    # -- copies on the stores of a replicated vault ----------------------------------------------
    def record_copy(self, name: str, store: str, st: str) -> bool:
        """Record that ``store`` holds ``name`` ('ok'), should and does not ('pending'), or
        keeps a copy that must be deleted ('delete'); True if that changed anything."""
        row = self.raw.execute(
            "SELECT state FROM copies WHERE name = ? AND store = ?", (name, store)
        ).fetchone()
        if row is not None and row[0] == st:
            return False
        if row is None:
            self.raw.execute("INSERT INTO copies (name, store, state) VALUES (?, ?, ?)",
                             (name, store, st))
        else:
            self.raw.execute("UPDATE copies SET state = ? WHERE name = ? AND store = ?",
                             (st, name, store))
        return True

    def copies_of(self, name: str) -> dict[str, str]:
        """``{store id: 'ok' | 'pending'}`` for one object."""
        rows = self.raw.execute("SELECT store, state FROM copies WHERE name = ?", (name,))
        return dict(rows.fetchall())

    def all_copies(self) -> dict[str, dict[str, str]]:
        """``{object: {store id: state}}`` for every object with a recorded copy."""
        out: dict[str, dict[str, str]] = {}
        for n, st, state_ in self.raw.execute("SELECT name, store, state FROM copies"):
            out.setdefault(n, {})[st] = state_
        return out

    def pending_copies(self, limit: int = 1000) -> list[tuple[ChunkRef, str]]:
        """Copies to make: (the object, the store that should hold it), for known objects."""
        rows = self.raw.execute(
            "SELECT o.name, o.size, o.sha256, c.store FROM copies c JOIN objects o "
            "ON o.name = c.name WHERE c.state = 'pending' LIMIT ?",
            (limit,),
        )
        return [(ChunkRef(n, z, bytes(h)), st) for n, z, h, st in rows.fetchall()]

    def pending_deletes(self) -> list[tuple[str, str]]:
        """(object, store) copies left on a store that was down when the object was deleted."""
        rows = self.raw.execute("SELECT name, store FROM copies WHERE state = 'delete'")
        return [(n, st) for n, st in rows.fetchall()]

    def forget_copy(self, name: str, store: str) -> None:
        self.raw.execute("DELETE FROM copies WHERE name = ? AND store = ?", (name, store))

    def pending_copy_counts(self) -> dict[str, int]:
        rows = self.raw.execute(
            "SELECT store, count(*) FROM copies WHERE state != 'ok' GROUP BY store"
        )
        return dict(rows.fetchall())

    def forget_store_copies(self, store: str) -> None:
        self.raw.execute("DELETE FROM copies WHERE store = ?", (store,))

    def forget_stray_copies(self) -> None:
        """Drop copy records of objects the metadata does not know (never committed)."""
        self.raw.execute("DELETE FROM copies WHERE state != 'delete' "
                         "AND name NOT IN (SELECT name FROM objects)")

    def object_users(self, name: str) -> list[int]:
        """Inodes whose chunk map references the object."""
        return list(
            self.conn.execute(select(blocks.c.ino).where(blocks.c.obj == name).distinct()).scalars()
        )

    def paths_of(self, ino: int, limit: int = 3) -> list[str]:
        """Up to ``limit`` paths of an inode (for error messages)."""
        out = []
        for parent, name in self.conn.execute(
            select(dentries.c.parent, dentries.c.name).where(dentries.c.ino == ino).limit(limit)
        ):
            parts = [bytes(name)]
            seen = {ino}
            while parent != ROOT_INO and parent not in seen:
                seen.add(parent)
                row = self.conn.execute(
                    select(dentries.c.parent, dentries.c.name)
                    .where(dentries.c.ino == parent)
                    .limit(1)
                ).first()
                if row is None:
                    parts.append(b"?")
                    break
                parent, pname = row
                parts.append(bytes(pname))
            out.append(
                "/" + "/".join(p.decode("utf-8", "surrogateescape") for p in reversed(parts))
            )
        return out

    def parent_of(self, ino: int) -> int | None:
        """One directory holding an entry for ``ino`` (a directory has exactly one)."""
        row = self.raw.execute(_SQL_PARENT, (ino,)).fetchone()
        return int(row[0]) if row else None

    def first_chunks_after(self, parent: int, name: bytes, count: int
                           ) -> list[tuple[bytes, ChunkRef]]:
        """``(name, first chunk)`` of the next ``count`` entries of ``parent`` after ``name``
        that have a stored first chunk, in name order (sibling prefetch)."""
        rows = self.raw.execute(_SQL_NEXT_FIRST_CHUNKS, (parent, name, count)).fetchall()
        return [(bytes(n), ChunkRef(o, z, bytes(h), p, f or 0)) for n, o, z, h, p, f in rows]

    def forget_object(self, name: str) -> None:
        """Drop an object's record (it was deleted from the store, or is superseded)."""
        self.raw.execute("DELETE FROM objects WHERE name = ?", (name,))

    def forget_deleted_object(self, name: str) -> None:
        """Drop the record of an object a restored ledger says was deleted: any object but a
        chunk that is still referenced (a chunk map that names it wins)."""
        self.raw.execute(
            "DELETE FROM objects WHERE name = ? AND (refcount <= 0 OR name NOT LIKE 'data/%')",
            (name,),
        )

    def unreference_object(self, ref: ChunkRef) -> None:
        """Record ``ref`` as stored and unreferenced (a deletion that failed: the next
        checkpoint's collection tries again)."""
        self.reference(ref, staged=False)
        self.raw.execute("UPDATE objects SET refcount = 0 WHERE name = ?", (ref.name,))

    # -- whole tables, for fsck -------------------------------------------------------------------
    def inode_modes(self) -> dict[int, tuple[int, int]]:
        """``{ino: (mode, nlink)}`` of every inode."""
        return {r[0]: (r[1], r[2]) for r in self.raw.execute("SELECT ino, mode, nlink FROM inodes")}

    def all_dentries(self) -> list[tuple[int, bytes, int]]:
        return [(p, bytes(n), i) for p, n, i in self.raw.execute(
            "SELECT parent, name, ino FROM dentries")]

    def all_blocks(self) -> list[tuple[int, int, str]]:
        return list(self.raw.execute("SELECT ino, idx, obj FROM blocks"))

    def object_states(self) -> dict[str, tuple[int, str, int]]:
        """``{name: (refcount, state, size)}`` of every recorded object."""
        return {r[0]: (r[1], r[2], r[3]) for r in self.raw.execute(
            "SELECT name, refcount, state, size FROM objects")}

    def set_nlink(self, ino: int, nlink: int) -> None:
        self.raw.execute("UPDATE inodes SET nlink = ? WHERE ino = ?", (nlink, ino))

    def set_refcount(self, name: str, refcount: int) -> None:
        self.raw.execute("UPDATE objects SET refcount = ? WHERE name = ?", (refcount, name))

    def drop_block(self, ino: int, idx: int) -> None:
        """Remove one chunk map entry without touching reference counts (fsck repairs them)."""
        self.raw.execute("DELETE FROM blocks WHERE ino = ? AND idx = ?", (ino, idx))
        self.raw.execute("DELETE FROM journal WHERE ino = ? AND idx = ?", (ino, idx))

    def drop_inode_rows(self, ino: int) -> None:
        """Remove an inode with its chunk map and xattrs, leaving reference counts to fsck."""
        for table in ("inodes", "blocks", "xattrs", "journal"):
            self.raw.execute(f"DELETE FROM {table} WHERE ino = ?", (ino,))

    # -- the ledger's rows (the hash chain itself is cryptfs.meta.ledger's) ---------------------
    def ledger_last(self) -> LedgerRow | None:
        return self._ledger_one("ORDER BY seq DESC LIMIT 1", ())

    def ledger_get(self, seq: int) -> LedgerRow | None:
        return self._ledger_one("WHERE seq = ?", (seq,))

    def ledger_last_named(self, op: str, prefix: str) -> LedgerRow | None:
        """The newest row with operation ``op`` whose object name starts with ``prefix``."""
        return self._ledger_one("WHERE op = ? AND substr(name, 1, ?) = ? ORDER BY seq DESC "
                                "LIMIT 1", (op, len(prefix), prefix))

    def ledger_page(self, after: int, limit: int) -> list[LedgerRow]:
        """Rows with seq > ``after`` in order, at most ``limit``."""
        return self._ledger_rows("WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))

    def ledger_newest(self, n: int) -> list[LedgerRow]:
        return self._ledger_rows("ORDER BY seq DESC LIMIT ?", (n,))

    def ledger_count(self) -> int:
        return int(self.raw.execute("SELECT count(*) FROM ledger").fetchone()[0])

    def ledger_insert(self, rows: list[LedgerRow]) -> None:
        """Append rows (seq, time_ns, op, name, size, sha256, prev, hash) in the current
        transaction."""
        if len(rows) == 1:  # (each small file's put appends one)
            self.raw.execute(_SQL_LEDGER_INSERT, rows[0])
        else:
            self.raw.executemany(_SQL_LEDGER_INSERT, rows)

    def ledger_truncate_after(self, seq: int) -> None:
        self.raw.execute("DELETE FROM ledger WHERE seq > ?", (seq,))

    def _ledger_one(self, where: str, args: tuple[object, ...]) -> LedgerRow | None:
        rows = self._ledger_rows(where, args)
        return rows[0] if rows else None

    def _ledger_rows(self, where: str, args: tuple[object, ...]) -> list[LedgerRow]:
        return [(s, t, o, n, z, bytes(h), bytes(p), bytes(x)) for s, t, o, n, z, h, p, x in
                self.raw.execute(_SQL_LEDGER_SELECT + where, args)]

    # -- xattrs -------------------------------------------------------------------------------
    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        row = self.raw.execute(
            "SELECT value FROM xattrs WHERE ino = ? AND name = ?", (ino, name)
        ).fetchone()
        return bytes(row[0]) if row else None

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        if not self.raw.execute("UPDATE xattrs SET value = ? WHERE ino = ? AND name = ?",
                                (value, ino, name)).rowcount:
            self.raw.execute("INSERT INTO xattrs (ino, name, value) VALUES (?, ?, ?)",
                             (ino, name, value))

    def inodes_with_xattrs(self) -> set[int]:
        return {r[0] for r in self.raw.execute("SELECT DISTINCT ino FROM xattrs")}

    def list_xattrs(self, ino: int) -> list[bytes]:
        return [
            bytes(n)
            for n in self.conn.execute(
                select(xattrs.c.name).where(xattrs.c.ino == ino).order_by(xattrs.c.name)
            ).scalars()
        ]

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        return (
            self.conn.execute(
                delete(xattrs).where(xattrs.c.ino == ino, xattrs.c.name == name)
            ).rowcount
            > 0
        )
