"""The PostgreSQL metadata engine (:class:`cryptfs.meta.MetaEngine`), sealed against the database.

A second engine behind the interface of :mod:`cryptfs.meta.engine`, through SQLAlchemy Core and
psycopg 3 (``postgresql+psycopg://`` URLs), for vaults whose metadata several machines will
share (issue 14). The database operator sees no file name, attribute, size, symlink target,
xattr, chunk map or ledger entry:

- every row is ``(key columns, ver, v)``: ``v`` is the row's content sealed with AES-256-GCM
  under :attr:`DbKeys.row`, its associated data binding the schema version, the table, every
  key column and ``ver`` (the row's version, bumped by each update and checked by the update's
  row count). A row edited, moved to another key, swapped with another row's payload or given
  another version fails to open: :class:`cryptfs.errors.IntegrityError` (errno EIO), never
  wrong data. A row rolled back to an older sealed state, or deleted, is not detected here
  (that is the ledger's job, with the head each machine keeps);
- key columns are keyed hashes (:attr:`DbKeys.index`) of the row's identity, one hash domain
  per column, so a dump does not show which inode is which directory's parent: ``inodes.k`` is
  H("i", ino), ``dentries.parent`` H("p", parent), ``dentries.ino`` H("d", ino), and so on;
- a directory entry's name is AES-SIV (RFC 5297, :attr:`DbKeys.name`), deterministic with the
  parent's inode number as associated data, padded to a multiple of 16 bytes: a lookup is an
  indexed equality query, and a name moved to another directory does not open there.

What the database still learns: row counts per table, how many entries each (unnamed)
directory has, how many rows (pages of MAP_PAGE chunk indexes) each (unnamed) file's chunk map
has (about its size, to MAP_PAGE chunks), names' lengths to 16 bytes, how many inode numbers were
allocated (a sequence), the ledger's length, how many (file, lock owner) pairs of each machine
hold file locks (:class:`PgLocks`), and the access pattern.

Ordering, prefixes, ranges and sums are computed here, on opened rows: a directory listing
reads the whole directory, a chunk map window the pages it covers (a wide one the whole map),
``stored_bytes`` and the fsck views whole tables.

Transactions run at READ COMMITTED on one connection used by one thread at a time. Several
machines share the database: a namespace operation locks the inodes it reads (FOR UPDATE: it
waits for another machine's change of the same directory and reads its result) and a change of
an object's reference count locks the object row (two machines storing the same content share
it); every update and every inode deletion is also conditional on the row version read
(checked by row count), so a row another writer changed meanwhile is a conflict, never a lost
update; a name two writers insert is a unique violation for the second. A
namespace operation that loses such a conflict, a deadlock or a serialization failure is rolled
back and run again with backoff (:meth:`PgMetaStore.atomically`): two machines creating one
name, one gets EEXIST; rename and rmdir races leave no orphans. Another block that a conflict
ends is rolled back and raises MetaError (the block's code cannot be re-run from here); the
engine's own one-statement blocks (:meth:`set_state`, opening) retry with backoff.

The hot statements (a small file's create, flush and close, a stat) are compiled once and run
through libpq itself, prepared once per connection (:meth:`PgMetaStore._libpq`): through
SQLAlchemy's execute a statement cost ~4x the client CPU it costs there, through psycopg's
cursor ~2x. A create is one statement once the directory is known at its version, a close one
autocommitted statement, and a flush runs in the transaction of the file's deferred create,
after a savepoint (:meth:`PgMetaStore.atomically`). Statements whose result is not needed
(BEGIN, the savepoint, a hold, a new file's chunk map page and object row, the ledger's lock
and row) go with the next statement, and the COMMIT with the session's check, in libpq's
pipeline mode (one round trip for the group; the server runs them one after another, each
its own statement): a small file is one commit and eight round trips, with the chunk store's
lookup of its content and its close's.

Longer than ~400 lines on purpose: it is the one module that holds this engine's
SQL (tests/test_05_layers.py), next to its schema and sealing.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno as errno_mod
import logging
import os
import random
import re
import socket
import stat
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from select import POLLIN, POLLOUT, poll
from typing import Any, TypeVar

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.rows import namedtuple_row
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Sequence,
    Table,
    any_,
    bindparam,
    create_engine,
    delete,
    func,
    insert,
    literal_column,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from cryptfs.errors import ConfigError, IntegrityError, MetaError, MetaFull, os_error
from cryptfs.format import crypto
from cryptfs.format.codec import ChunkRef
from cryptfs.meta.dbkeys import DbKeys
from cryptfs.meta.engine import ROOT_INO, Changed, Inode, LedgerRow, Transactions
from cryptfs.meta.locks import F_WRLCK, FLOCK, POSIX, Held, apply, conflict
from cryptfs.meta.namespace import NamespaceOps, check_name, created, touched
from cryptfs.paths import machine_id

log = logging.getLogger("cryptfs.meta.postgres")

# The version of the tables below, stored in cryptfs_schema (and bound in its marker's associated
# data). Version 2: object rows may be "deleting" or "gone" (tombstones), and the locks table;
# a version 1 database is stamped 2 when this cryptfs opens it (nothing else changes), so that a
# cryptfs of version 1, which would read a tombstone as a stored object, refuses it. Version 3:
# a chunk map page written by it holds each chunk's stored size (see _entries); pages written
# before are read as they are and rewritten in the new form when next written. A database of
# version 1 or 2 is stamped 3 when opened, so that an older cryptfs refuses it. A newer
# database is refused.
SCHEMA_VERSION = 3
# what every row's associated data binds as its format (unchanged since schema version 1)
ROW_FORMAT = 1

md = MetaData()
schema = Table(
    "cryptfs_schema", md,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", Integer, nullable=False),
    Column("v", LargeBinary, nullable=False),  # a sealed marker: the keys match this database
)
ino_seq = Sequence("cryptfs_ino_seq", metadata=md, start=ROOT_INO + 1)


def _sealed_table(name: str, *keys: str, group: str | None = None) -> Table:
    cols = [Column(k, LargeBinary, nullable=False) for k in keys]
    extra: list[Any] = [PrimaryKeyConstraint(*keys)]
    if group:
        cols.append(Column(group, LargeBinary, nullable=False))
        extra.append(Index(f"ix_{name}_{group}", group))
    return Table(name, md, *cols, Column("ver", BigInteger, nullable=False),
                 Column("v", LargeBinary, nullable=False), *extra)


inodes = _sealed_table("inodes", "k")
dentries = _sealed_table("dentries", "parent", "name", group="ino")
blocks = _sealed_table("blocks", "k", group="ino")
objects = _sealed_table("objects", "k")
xattrs = _sealed_table("xattrs", "k", group="ino")
copies = _sealed_table("copies", "k", group="obj")
state = _sealed_table("state", "k")
# A mounted machine's session (issue 14): its key is H("S", id), ``expires`` the database's
# clock plus the lifetime (in clear: the database keeps the time), ``v`` who it is (host, pid,
# machine id, start) sealed. A machine whose row expired cannot commit (see PgMetaStore.commit).
sessions = Table(
    "sessions", md,
    Column("k", LargeBinary, primary_key=True),
    Column("expires", DateTime(timezone=True), nullable=False),
    Column("v", LargeBinary, nullable=False),
)
# A file a session has open: k = H("h", session, ino), ino = H("H", ino), sess = the session's
# key; ``v`` (session id, ino) sealed. An inode whose last name goes while any session holds it
# stays until the last holder lets go (or is found dead by a live machine).
holds = Table(
    "holds", md,
    Column("k", LargeBinary, primary_key=True),
    Column("ino", LargeBinary, nullable=False, index=True),
    Column("sess", LargeBinary, nullable=False, index=True),
    Column("v", LargeBinary, nullable=False),
)
# A file lock (issue 14, cryptfs.meta.locks): what one owner of one session holds of one kind on
# one inode. k = H("l", session, owner, kind, ino), ino = H("K", ino), sess = the session's key;
# ``v`` (kind, ino, owner, then type, start, end, pid of each range) sealed. A session's locks
# go with it (unmount, or reaped when expired); an expired session's locks block nobody.
locks = Table(
    "locks", md,
    Column("k", LargeBinary, primary_key=True),
    Column("ino", LargeBinary, nullable=False, index=True),
    Column("sess", LargeBinary, nullable=False, index=True),
    Column("v", LargeBinary, nullable=False),
)
ledger = Table(
    "ledger", md,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("v", LargeBinary, nullable=False),
)


def _cols(t: Table) -> list[Any]:
    """A single-key table's key, version, payload and (if any) group column, in that order."""
    return [t.c.k, t.c.ver, t.c.v] + [t.c[c] for c in t.c.keys() if c not in ("k", "ver", "v")]


# the hot statements, built once
_GET = {t.name: select(*_cols(t)).where(t.c.k == bindparam("key"))
        for t in (inodes, blocks, objects, xattrs, copies, state)}
_LOOKUP = select(dentries.c.ino, dentries.c.ver, dentries.c.v).where(
    dentries.c.parent == bindparam("parent"), dentries.c.name == bindparam("name"))
# (built once, their SQL is compiled once: building a statement per call costs more CPU here
# than the round trip; the bind parameters are named apart from the columns)
_INSERT = {t.name: insert(t) for t in (inodes, dentries, blocks, objects, xattrs, copies, state,
                                       holds)}
_INSERT_NEW = {t.name: pg_insert(t).on_conflict_do_nothing().returning(t.c.ver)
               for t in (dentries, objects)}
_INSERT_HOLD = pg_insert(holds).on_conflict_do_nothing()
_UPDATE = {t.name: update(t).where(t.c.k == bindparam("key"), t.c.ver == bindparam("old"))
           .values(ver=bindparam("new"), v=bindparam("val"))
           for t in (inodes, blocks, objects, xattrs, copies, state)}
_GET_LOCKED = {t.name: select(*_cols(t)).where(t.c.k == bindparam("key")).with_for_update()
               for t in (inodes, objects)}
_KEYS = bindparam("keys", type_=ARRAY(LargeBinary))  # (a list: one statement whatever its length)
_GET_MANY = {t.name: select(*_cols(t)).where(t.c.k == any_(_KEYS))
             for t in (inodes, blocks, objects)}
_VER = {t.name: select(t.c.ver).where(t.c.k == bindparam("key"))
        for t in (inodes, blocks, objects, xattrs, copies, state)}
_CLAIM = select(*_cols(objects)).where(objects.c.k == any_(_KEYS)).order_by(
    objects.c.k).with_for_update()
_NEXT_INOS = select(ino_seq.next_value()).select_from(
    func.generate_series(literal_column("1"), bindparam("n", type_=Integer)))
_DELETE_HOLD = delete(holds).where(holds.c.k == bindparam("hold"))
_DELETE_DENTRY = delete(dentries).where(dentries.c.parent == bindparam("parent"),
                                        dentries.c.name == bindparam("name"))
_HELD = select(holds.c.k).where(holds.c.ino == bindparam("ino")).limit(1)
_DIR = select(dentries.c.parent, dentries.c.name, dentries.c.ino, dentries.c.ver,
              dentries.c.v).where(dentries.c.parent == bindparam("parent"))
def _nodes_and(pages: Any) -> Any:
    """Inodes by key (``ikeys``) and the chunk map pages matching ``pages``, in one statement
    (t: 0 an inode, 1 a page; g: a page's inode column)."""
    return union_all(
        select(literal_column("0").label("t"), inodes.c.k, inodes.c.ver, inodes.c.v,
               inodes.c.k.label("g")).where(inodes.c.k == any_(bindparam(
                   "ikeys", type_=ARRAY(LargeBinary)))),
        select(literal_column("1"), blocks.c.k, blocks.c.ver, blocks.c.v, blocks.c.ino).where(
            pages))


# inodes and all pages of their chunk maps (stat); inodes and their first pages (prefetch)
_NODES_MAPS = _nodes_and(blocks.c.ino == any_(bindparam("bkeys", type_=ARRAY(LargeBinary))))
_NODES_FIRST_PAGES = _nodes_and(blocks.c.k == any_(bindparam("pkeys",
                                                             type_=ARRAY(LargeBinary))))
# a create in one statement: the inode, its name (unless the name exists) and the parent's
# update (conditional on the version this engine last saw); how many names and parents it wrote
_CREATE = text(
    "WITH i AS (INSERT INTO inodes (k, ver, v) VALUES (:ik, 1, :iv)), "
    "u AS (UPDATE inodes SET ver = :pnew, v = :pv WHERE k = :pk AND ver = :pold RETURNING 1), "
    "d AS (INSERT INTO dentries (parent, name, ino, ver, v) VALUES (:dp, :dn, :di, 1, :dv) "
    "ON CONFLICT DO NOTHING RETURNING 1) "
    "SELECT (SELECT count(*) FROM d) AS d, (SELECT count(*) FROM u) AS u")
_SAVEPOINT = text("SAVEPOINT cryptfs_op")
_ROLLBACK_TO = text("ROLLBACK TO SAVEPOINT cryptfs_op")
# A commit's fence (PgMetaStore._commit_fenced): the session's row, if live by the database's
# clock, locked FOR KEY SHARE (a reaper's DELETE waits for the commit, the heartbeat's UPDATE of
# the expiry does not), with _FENCE_NOTIFY the change notice queued; no live row is an error
# (1 / count(*) of none: division_by_zero, FENCE_FAILED), so that the COMMIT sent after it in
# the same round trip is skipped and nothing is committed
_FENCE_ROW = ("FROM sessions WHERE k = :sess AND expires > clock_timestamp() FOR KEY SHARE")
_FENCE = text(f"SELECT 1 / count(*) AS live FROM (SELECT k {_FENCE_ROW}) AS s")
_FENCE_NOTIFY = text("SELECT 1 / count(*) AS live FROM "
                     f"(SELECT k, pg_notify(:channel, :notice) {_FENCE_ROW}) AS s")
FENCE_FAILED = "22012"
_NOTIFY = select(func.pg_notify(bindparam("channel"), bindparam("notice")))
_INSERT_LEDGER = insert(ledger)
# An append after the head this engine last read or wrote (PgMetaStore.ledger_last), without
# reading it again: the row goes in only if that head is still there as it was, and a newer
# row already at its place is a unique violation; a head gone or changed makes the cast fail
# (numeric_value_out_of_range, LEDGER_MOVED): either way nothing after it in the round trip
# runs (the COMMIT with it), and the operation runs again after reading the head
_INSERT_LEDGER_AFTER = text(
    "WITH i AS (INSERT INTO ledger (seq, v) SELECT :seq, :v WHERE EXISTS "
    "(SELECT 1 FROM ledger WHERE seq = :prev AND v = :prev_v) RETURNING 1) "
    "SELECT (2147483648 - count(*))::int4 AS appended FROM i")
LEDGER_MOVED = "22003"
_LEDGER_LAST = select(ledger).order_by(ledger.c.seq.desc()).limit(1)
_READ_ONLY = text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
_XACT_LOCK = select(func.pg_advisory_xact_lock(bindparam("lock")))
_UNHOLD_GET = select(*_cols(inodes)).add_cte(
    delete(holds).where(holds.c.k == bindparam("hold")).cte("gone")
).where(inodes.c.k == bindparam("key")).with_for_update()

# The statements above run on the psycopg connection directly, their SQL compiled here once:
# through SQLAlchemy's execute a statement costs ~4x the client CPU of the driver's own
# (result processing, events, the compiled cache's lookup), and a small file's create and
# close are some twenty statements. ``_RAW`` maps each one (by identity) to its SQL.
_DIALECT = PGDialect_psycopg()
_PREPARED: dict[str, Any] = {}  # SQL -> its _Prepared
_RAW: dict[int, tuple[Any, str, dict[str, Any]]] = {}  # (statement, SQL, its literals' values)


def _raw(*stmts: Any) -> None:
    for stmt in stmts:
        for one in (stmt.values() if isinstance(stmt, dict) else (stmt,)):
            c = one.compile(dialect=_DIALECT)
            _RAW[id(one)] = (one, str(c), {k: v for k, v in c.params.items() if v is not None})


_raw(_GET, _LOOKUP, _INSERT, _INSERT_NEW, _INSERT_HOLD, _UPDATE, _GET_LOCKED, _GET_MANY, _VER,
     _CLAIM, _NEXT_INOS, _DELETE_HOLD, _DELETE_DENTRY, _HELD, _SAVEPOINT, _ROLLBACK_TO, _FENCE,
     _FENCE_NOTIFY, _NOTIFY, _INSERT_LEDGER, _INSERT_LEDGER_AFTER, _LEDGER_LAST, _XACT_LOCK,
     _UNHOLD_GET, _DIR, _NODES_MAPS, _NODES_FIRST_PAGES, _CREATE)


# libpq's binary form of the result columns the hot statements return, by type oid
_FROM_BINARY: dict[int, Callable[[bytes], Any]] = {
    17: bytes,  # bytea
    20: lambda b: int.from_bytes(b, "big", signed=True),  # int8
    23: lambda b: int.from_bytes(b, "big", signed=True),  # int4
    21: lambda b: int.from_bytes(b, "big", signed=True),  # int2
    25: lambda b: b.decode(),  # text
    16: lambda b: b == b"\x01",  # bool
    2278: lambda b: None,  # void (pg_notify)
}
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class _Prepared:
    """A hot statement as libpq runs it: its SQL with ``$n`` placeholders, the parameter
    names in their order, and its rows' type (a named tuple of its columns)."""

    __slots__ = ("names", "row", "sql")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(m: re.Match[str]) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"

        self.sql = _PLACEHOLDER.sub(number, sql).encode()
        self.names = names
        self.row: Any = None


def _param(v: Any) -> tuple[bytes | None, int]:
    """A parameter value in libpq's form: (value, format: 1 binary, 0 text)."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v), 1
    if v is None:
        return None, 0
    if isinstance(v, bool):
        return (b"t" if v else b"f"), 0
    if isinstance(v, int):
        return str(v).encode(), 0
    if isinstance(v, str):
        return v.encode(), 0
    if isinstance(v, list):  # a bytea[] (the only arrays bound here)
        return ("{" + ",".join(f'"\\\\x{bytes(b).hex()}"' for b in v) + "}").encode(), 0
    raise TypeError(f"no libpq form for {type(v).__name__}")


def _next_result(pgconn: Any) -> Any:
    """libpq's next result (PQgetResult) once it is there: its data sent, then waited for
    in poll(), which lets other threads run (psycopg's get_result keeps Python's lock while
    it waits: a thread waiting there for a row another thread of this process holds locked
    would wait for ever). A result already read (the answers to a pipeline mostly come in one
    read) is taken at once: no system call, no hand-off of Python's lock."""
    if not pgconn.is_busy():
        return pgconn.get_result()
    waiting = poll()
    waiting.register(pgconn.socket, POLLOUT)
    while pgconn.flush():  # (a non-blocking connection: 1 while data is left to send)
        waiting.poll()
    waiting.modify(pgconn.socket, POLLIN)
    pgconn.consume_input()
    while pgconn.is_busy():
        waiting.poll()
        pgconn.consume_input()
    return pgconn.get_result()


class _Result:
    """What a statement run on the driver returned (the part of SQLAlchemy's result the
    engine uses): its rows (named tuples) and row count."""

    __slots__ = ("rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def all(self) -> list[Any]:
        return self.rows

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalars(self) -> list[Any]:
        return [r[0] for r in self.rows]

# chunk indexes per row of a chunk map (the database sees a file's size to MAP_PAGE chunks)
MAP_PAGE = 64
# the first value after ino and page of a chunk map page of schema version 3 (see _entries)
SIZED = "s"
# how many rows of the version cache (see _vers) and names of the SIV cache are kept before
# they are emptied
VERSION_CACHE_ROWS = 65536
NAME_CACHE = 65536
# retries of the engine's own blocks after a deadlock or serialization failure
RETRIES = 8


def _backoff(attempt: int) -> None:
    time.sleep(min(1.0, 0.005 * 2 ** attempt) * (0.5 + random.random()))
# inode numbers taken from the sequence at a time (one statement per INO_BATCH creates; the
# database sees the count allocated to INO_BATCH)
INO_BATCH = 64
# how far the machines' clocks may disagree: a tombstone ("gone" object row) stays while a live
# session's deletion horizon is less than this after its deletion (cryptfs.admin.gc.CLOCK_SKEW)
TOMBSTONE_MARGIN = 60.0
# object rows not counted as stored: tombstones (see PgMetaStore.collect_objects)
GONE = "gone"
# inodes a change notice lists at most (more: the notice says "anything may have changed")
NOTICE_INODES = 400
# libpq connection options of every connection: a server that does not answer is an error
# after 10 s (connect) or about 25 s (TCP keepalives on an idle or waiting connection), never a
# hang; a Unix socket ignores the keepalives
CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                "keepalives_interval": 5, "keepalives_count": 3}
T = TypeVar("T")


def pg_engine(url: URL | str, **kw: Any) -> Engine:
    """A SQLAlchemy engine for ``url`` with the connection settings of CONNECT_ARGS (and
    ``kw``'s); ConfigError in one line (never the URL: it may hold a password) if the URL is
    not a usable ``postgresql+psycopg`` one."""
    try:
        return create_engine(url, **{"connect_args": CONNECT_ARGS, **kw})
    except (SQLAlchemyError, ValueError, ImportError):
        raise ConfigError("the metadata database URL is not usable (not a "
                          "postgresql+psycopg URL, or its driver is missing)") from None


CONFLICT_STATES = {"40001", "40P01", "23505", "22003"}  # serialization_failure,
# deadlock_detected, unique_violation (another writer inserted the same key first: a retry sees
# its row), LEDGER_MOVED
# after a conflict, appends read the ledger's head for this long (another machine is writing:
# an append after the head known here would mostly conflict)
HEAD_TRUST_PAUSE = 1.0


def _collectable(obj: tuple[Any, ...]) -> bool:
    """Whether an object row (see PgMetaStore._object) is unreferenced and collectable:
    stored, or being collected (a collection that did not finish)."""
    return bool(obj[3] <= 0 and obj[4] in ("stored", "deleting"))


def _entries(flat: list[Any]) -> dict[int, tuple[str, int | None]]:
    """``{idx: (object, stored size)}`` from the values of a chunk map page after ino and
    page: from schema version 3, SIZED then (idx, object, size) for each chunk; before, (idx,
    object) pairs, their sizes unknown (None: the object rows have them)."""
    if flat and flat[0] == SIZED:
        return {i: (o, n) for i, o, n in zip(flat[1::3], flat[2::3], flat[3::3], strict=True)}
    return {i: (o, None) for i, o in zip(flat[0::2], flat[1::2], strict=True)}


def _allocated(entries: list[tuple[str, int | None]], sizes: dict[str, int], chunk_size: int,
               unit: int) -> int:
    """Bytes a file's chunk map ``entries`` take (see MetaEngine.allocated), by ``sizes``
    (an object with no known size: nothing)."""
    return sum(-(-min(sizes[o], chunk_size) // unit) * unit for o, _n in entries if o in sizes)


# -- row encoding: a tuple of ints, bytes, str and None ------------------------------------------
def _pack(*vals: int | bytes | str | None) -> bytes:
    out = bytearray()
    for v in vals:
        if v is None:
            out += b"n"
        elif isinstance(v, int):
            out += b"i" + v.to_bytes(9, "big", signed=True)
        elif isinstance(v, str):
            b = v.encode("utf-8", "surrogateescape")
            out += b"s" + len(b).to_bytes(4, "big") + b
        else:
            out += b"b" + len(v).to_bytes(4, "big") + bytes(v)
    return bytes(out)


def _unpack(blob: bytes) -> tuple[Any, ...]:
    out: list[Any] = []
    i, n = 0, len(blob)
    while i < n:
        tag = blob[i:i + 1]
        i += 1
        if tag == b"n":
            out.append(None)
        elif tag == b"i":
            out.append(int.from_bytes(blob[i:i + 9], "big", signed=True))
            i += 9
        else:
            ln = int.from_bytes(blob[i:i + 4], "big")
            raw = blob[i + 4:i + 4 + ln]
            i += 4 + ln
            out.append(raw.decode("utf-8", "surrogateescape") if tag == b"s" else raw)
    return tuple(out)


def _ad(table: str, ver: int, *keys: bytes) -> bytes:
    """The associated data of a row: schema version, table, key columns, row version."""
    parts = [b"cryptfs-pg", ROW_FORMAT.to_bytes(2, "big"), table.encode(),
             ver.to_bytes(8, "big", signed=True)]
    for k in keys:
        parts.append(len(k).to_bytes(2, "big") + k)
    return b"\0".join(parts)


def _open_row(keys: DbKeys, where: str, table: str, ver: int, key: tuple[bytes, ...],
              blob: bytes) -> tuple[Any, ...]:
    """A row's content, opened (IntegrityError in one line if it fails authentication)."""
    try:
        return _unpack(crypto.open_sealed(keys.row, bytes(blob), _ad(table, ver, *key)))
    except IntegrityError:
        raise IntegrityError(f"metadata database {where}: a row of {table} failed "
                             "authentication (tampered with or corrupt)") from None


def _open_name(siv: AESSIV, where: str, parent: int, blob: bytes) -> bytes:
    """A directory entry's name, opened (its AES-SIV with the parent as associated data)."""
    try:
        padded = siv.decrypt(bytes(blob), [b"dentry\0" + parent.to_bytes(8, "big")])
    except (InvalidTag, ValueError):
        raise IntegrityError(f"metadata database {where}: a directory entry's name failed "
                             "authentication (tampered with or corrupt)") from None
    return padded.rstrip(b"\0")[:-1]


class _Conflict(MetaError):
    """A deadlock or serialization failure ended the transaction (another writer won)."""


class LocksUnavailable(MetaError):
    """A file lock could not be set or tested: the database cannot be reached, or this
    machine's session expired (ENOLCK, as NFS answers when its lock manager is gone)."""

    errno = errno_mod.ENOLCK


class SessionExpired(MetaError):
    """This machine's session in the database expired (it was frozen or cut off longer than
    the session lifetime): it may not commit any more (EROFS)."""

    errno = errno_mod.EROFS


def _hash(keys: DbKeys, domain: bytes, *parts: int | bytes | str) -> bytes:
    """The keyed hash of a row identity in one hash domain (one per key column)."""
    return crypto.keyed_hash(keys.index, domain + b"\0" + _pack(*parts))


def channel(keys: DbKeys) -> str:
    """The LISTEN/NOTIFY channel of a vault's database (a keyed hash: it names no vault)."""
    return "cryptfs_" + _hash(keys, b"n").hex()[:24]


def lock_channel(keys: DbKeys) -> str:
    """The channel on which a file lock released (or downgraded) is announced, with no
    payload: the waiting locks of every mount try again at once (:class:`PgWatcher`)."""
    return channel(keys) + "_l"


def checkpoint_lock(keys: DbKeys) -> int:
    """The advisory lock whose holder writes the vault's checkpoints (one per vault)."""
    return int.from_bytes(_hash(keys, b"L")[:8], "big", signed=True)


def seal_notice(keys: DbKeys, sender: bytes, inos: Iterable[int]) -> str:
    """A change notice: which inodes a commit of ``sender`` changed (none listed: any may
    have), sealed (the database sees its length only)."""
    return base64.b64encode(crypto.seal(keys.row, _pack(sender, *inos), b"cryptfs-notice")
                            ).decode()


def open_notice(keys: DbKeys, payload: str) -> tuple[bytes, set[int]]:
    """``(sender, inodes)`` of a notice; IntegrityError if it is not one of this vault."""
    try:
        vals = _unpack(crypto.open_sealed(keys.row, base64.b64decode(payload),
                                          b"cryptfs-notice"))
    except (ValueError, IndexError):
        raise IntegrityError("a change notice fails authentication") from None
    return vals[0], set(vals[1:])


class PgMetaStore(Transactions, NamespaceOps):
    """A vault's metadata in a PostgreSQL database, every row sealed (see the module doc).

    ``url`` is a SQLAlchemy URL (``postgresql+psycopg://user@host/db``; credentials from the
    URL or the standard ``PG*`` variables and ``.pgpass``); ``keys`` from
    :meth:`DbKeys.derive`. Opening creates the schema in an empty database, checks the stored
    schema version and that ``keys`` are this database's (ConfigError otherwise). Not
    thread-safe: callers serialise.

    Several machines (issue 14): a mount :meth:`attach`-es its session (a :class:`PgSession`
    keeps it alive); from then on every commit that writes first checks, in its transaction,
    that the session is live by the database's clock (fencing: a machine frozen past its
    session's expiry cannot commit; SessionExpired, EROFS), and sends a change notice (the
    inodes it changed, sealed) that the other mounts' :class:`PgWatcher` hear."""

    shared = True  # other machines write this database too: caches must be bounded

    def __init__(
        self,
        url: str,
        keys: DbKeys,
        on_commit: Callable[[], None] | None = None,
        on_rollback: Callable[[], None] | None = None,
    ) -> None:
        """``on_commit`` runs after every commit, ``on_rollback`` after every rollback (the
        filesystem's deferred writes: see :class:`cryptfs.fs.CommitHooks`)."""
        self.keys = keys
        self._siv = AESSIV(keys.name)
        # (psycopg prepares nothing itself: it deallocates every prepared statement of the
        # connection at a rollback once it has any, this engine's too; see _libpq)
        self.engine = pg_engine(url, pool_size=1, max_overflow=0,
                                isolation_level="READ COMMITTED",
                                connect_args={**CONNECT_ARGS, "prepare_threshold": None})
        self.where = self.engine.url.render_as_string(hide_password=True)
        # the connections of freeze()'s states: one kept between them (see _give_back)
        self._reader = pg_engine(url, poolclass=NullPool)
        self._reader_lock = threading.Lock()
        self._spare: Connection | None = None
        self._closed = False
        self._depth = 0  # nesting of transaction() blocks
        self._wrote = False  # the open transaction holds a write (not only reads)
        self._commits = 0  # see change_count
        self._undo: list[Callable[[], None]] = []
        self.on_commit = on_commit
        self.on_rollback = on_rollback
        self.sender = crypto.random_bytes(8)  # names this engine's change notices
        self.session_id: bytes | None = None  # set by attach(): commits are fenced by it
        self._session_k = b""
        self._on_expired: Callable[[str], None] | None = None
        self._locks: PgLocks | None = None  # the file locks, once attached to a session
        self._touched: set[int] = set()  # inodes the open transaction changed (notices)
        # objects the open transaction claimed while they had no row (claim_object with new):
        # nothing locked, so a reference finding one collected meanwhile re-runs the commit
        self._claimed_absent: set[str] = set()
        # objects get_object found without a row (a chunk about to be stored): a claim of one
        # of them as new takes it as claimed absent without asking again (what the query would
        # find: a row made since is a unique violation at its reference, and the operation
        # run again asks); each used once, bounded
        self._seen_absent: set[str] = set()
        self._locking = False  # inside a namespace operation that writes: lock inodes read
        self._reads_only = False  # inside readdir: reads only, nothing locked
        self._vers: dict[tuple[str, bytes], int] = {}  # row versions seen (for updates)
        # inodes as last read or written here, each valid while its version in _vers is the
        # one recorded with it (see touch_inode)
        self._ivals: dict[int, tuple[int, Inode]] = {}
        self._retryable = False  # inside an operation atomically() re-runs on a conflict
        self._commits_retried = False  # ... whose commit it also runs again on a conflict
        # the newest ledger row this engine read or wrote, sealed as stored (see ledger_last)
        self._tail: tuple[LedgerRow, bytes] | None = None
        self._trust_tail_at = 0.0  # (monotonic) not before: see HEAD_TRUST_PAUSE
        self._inos: list[int] = []  # inode numbers taken from the sequence, not used yet
        self._names: dict[tuple[int, bytes], bytes] = {}  # (parent, name) -> SIV
        self._siv_names: dict[tuple[int, bytes], bytes] = {}  # (parent, SIV) -> name
        self._prep_conn: Any = None  # the libpq connection of _prep_names (see _libpq)
        self._prep_names: dict[str, bytes] = {}  # SQL -> its prepared statement's name
        self._ledger_locked = False  # the open transaction holds the ledger's lock
        # statements (SQL, parameters) sent with the next one (see _x's ``later``)
        self._queued: list[tuple[str, Mapping[str, Any]]] = []
        # inodes the open transaction inserted (no other machine sees them before it
        # commits: what this one wrote of them is what they hold), with their chunk map pages
        self._fresh: dict[int, dict[int, dict[int, str]]] = {}
        try:
            self.conn: Connection = self.engine.connect()
        except DBAPIError as e:
            self.engine.dispose()
            raise ConfigError(f"metadata database {self.where} cannot be reached: "
                              f"{_first_line(e)}") from None
        try:
            self._retrying(self._prepare_schema)
        except BaseException:
            self.conn.close()
            self.engine.dispose()
            self._reader.dispose()
            raise

    # -- schema ----------------------------------------------------------------------------------
    def _prepare_schema(self) -> None:
        """Create the tables, or check the database's schema version and vault (its marker,
        sealed with the version as associated data), stamping a version 1 database 2."""
        def marker_ad(version: int) -> bytes:
            return _ad("cryptfs_schema", version, b"1")

        def marker(version: int) -> bytes:
            return crypto.seal(self.keys.row, b"cryptfs postgresql metadata", marker_ad(version))

        with self.transaction():
            # one opener creates the schema; others wait here, then find it
            self._x(select(func.pg_advisory_xact_lock(0x637279707466)))
            exists = self._x(text("SELECT to_regclass('cryptfs_schema') IS NOT NULL")).scalar()
            if not exists:
                md.create_all(self.conn)
                self._x(insert(schema).values(id=1, version=SCHEMA_VERSION,
                                              v=marker(SCHEMA_VERSION)))
                return
            row = self._x(select(schema.c.version, schema.c.v).where(schema.c.id == 1)).first()
            if row is None:
                raise ConfigError(f"metadata database {self.where} has no schema version "
                                  "(not a cryptfs database, or corrupt)")
            if not 1 <= row.version <= SCHEMA_VERSION:
                raise ConfigError(f"metadata database {self.where} is schema version "
                                  f"{row.version}; this cryptfs reads versions 1 to "
                                  f"{SCHEMA_VERSION}")
            try:
                crypto.open_sealed(self.keys.row, bytes(row.v), marker_ad(row.version))
            except IntegrityError:
                raise ConfigError(f"metadata database {self.where} belongs to another vault "
                                  "(or its marker was tampered with)") from None
            md.create_all(self.conn)  # (checks first) tables newer than the database: locks
            if row.version < SCHEMA_VERSION:
                self._x(update(schema).where(schema.c.id == 1).values(
                    version=SCHEMA_VERSION, v=marker(SCHEMA_VERSION)))
                log.info("metadata database %s: schema version %d stamped %d", self.where,
                         row.version, SCHEMA_VERSION)

    # -- statements, sealing, errors -------------------------------------------------------------
    def _x(self, stmt: Any, params: Any = None, fenced: bool = True, later: bool = False
           ) -> Any:
        """Execute one statement; a database error becomes a one-line MetaError (and, outside
        a block, rolls the open transaction back: inside one, the block does). A statement
        that writes makes the commit check the session (see :meth:`commit`) unless not
        ``fenced`` (a machine letting go of its own hold needs no live session). ``later``
        (a hot statement whose result is not needed and that cannot fail but for the server
        or the connection failing): sent with the next statement, in its transaction
        (libpq's pipeline mode: one round trip for both; see :meth:`_libpq`), its error
        raised there; returns None."""
        if fenced and not stmt.is_select:  # (a union of selects too: a stat's)
            self._wrote = True  # (text() counts: setval, SET TRANSACTION are writes enough)
        try:
            hot = _RAW.get(id(stmt))
            if hot is not None:
                if hot[2] and not isinstance(params, list):
                    params = {**hot[2], **(params or {})}
                if later and not isinstance(params, list):
                    self._queued.append((hot[1], params))
                    return None
                return self._run(hot[1], params)
            self._send_queued()
            return self.conn.execute(stmt, params) if params is not None else \
                self.conn.execute(stmt)
        except (DBAPIError, psycopg.Error) as e:
            err = self._meta_error(e)
            if not self._depth:
                self._rolled_back()
            raise err from e

    def _driver(self) -> psycopg.Connection[Any]:
        """The psycopg connection under :attr:`conn` (a new one after SQLAlchemy replaced a
        lost one)."""
        return self.conn.connection.driver_connection  # type: ignore[return-value]

    def _run(self, sql: str, params: Any) -> _Result:
        """Run compiled SQL on the driver's connection, in the transaction SQLAlchemy's
        statements share (begun here, as psycopg would, when none is open and the connection
        is not in autocommit), as a statement prepared once per connection, through libpq
        itself: psycopg's cursor costs ~2x libpq's own CPU per statement (its adaptation
        and prepared-statement bookkeeping in Python). A list of parameter sets runs it
        once per set (on a psycopg cursor). A connection the error broke is invalidated:
        SQLAlchemy makes a new one after the rollback."""
        raw = self._driver()
        try:
            if isinstance(params, list):
                self._send_queued()
                cur = raw.cursor(row_factory=namedtuple_row)
                cur.executemany(sql, params)
                return _Result([], cur.rowcount)
            return self._libpq(raw, sql, params or {})
        except psycopg.Error as e:
            self._driver_failed(raw, e)
            raise

    def _driver_failed(self, raw: psycopg.Connection[Any], e: psycopg.Error) -> None:
        """After error ``e`` of a statement run on the driver's connection ``raw``: a
        connection the error broke is invalidated (SQLAlchemy makes a new one after the
        rollback); prepared statements deallocated by someone are prepared again next time."""
        if raw.broken:
            with contextlib.suppress(Exception):
                self.conn.invalidate()
        elif e.sqlstate == "26000":
            self._prep_names = {}

    def _libpq(self, raw: psycopg.Connection[Any], sql: str, params: Mapping[str, Any]
               ) -> _Result:
        """Run ``sql`` as a prepared statement; the statements :meth:`_x` queued (``later``),
        and the BEGIN of a transaction this statement opens, go with it in one round trip
        (libpq's pipeline mode)."""
        pgconn = raw.pgconn
        name, prep, vals, fmts = self._bind(pgconn, sql, params)
        return self._rows(prep, self._round_trip(
            pgconn, [*self._take_queued(raw), (name, vals, fmts)]))

    @staticmethod
    def _rows(prep: _Prepared, res: Any) -> _Result:
        """The rows of ``res``, an answer to the prepared statement ``prep``."""
        if res.status != ExecStatus.TUPLES_OK:
            return _Result([], res.command_tuples or 0)
        nf, nt = res.nfields, res.ntuples
        if prep.row is None:
            prep.row = namedtuple("Row", [(res.fname(i) or b"c").decode()  # type: ignore[misc]
                                          for i in range(nf)], rename=True)
        conv = [_FROM_BINARY[res.ftype(i)] for i in range(nf)]
        row = prep.row
        rows = [row(*[None if (v := res.get_value(t, i)) is None else conv[i](v)
                      for i in range(nf)]) for t in range(nt)]
        return _Result(rows, nt)

    def _bind(self, pgconn: Any, sql: str, params: Mapping[str, Any] | None
              ) -> tuple[bytes, _Prepared, list[bytes | None], list[int]]:
        """The name of ``sql``'s prepared statement on ``pgconn`` (prepared there the first
        time), its :class:`_Prepared`, and ``params`` in libpq's form (values, formats)."""
        if self._prep_conn is not pgconn:  # a new connection: nothing prepared on it
            self._prep_conn, self._prep_names = pgconn, {}
        prep = _PREPARED.get(sql)
        if prep is None:
            prep = _PREPARED[sql] = _Prepared(sql)
        name = self._prep_names.get(sql)
        if name is None:
            name = f"cryptfs_{len(self._prep_names)}".encode()
            self._check(pgconn, pgconn.prepare(name, prep.sql))
            self._prep_names[sql] = name
        vals, fmts = [], []
        for n in prep.names:
            v, f = _param((params or {})[n])
            vals.append(v)
            fmts.append(f)
        return name, prep, vals, fmts

    def _round_trip(self, pgconn: Any, stmts: list[tuple[bytes, Any, Any]],
                    want: int = -1) -> Any:
        """Send prepared statements ``(name, values, formats)`` (formats None: ``name`` is
        a command, BEGIN or COMMIT) at once, several in libpq's pipeline mode, and read their
        results: the one of statement ``want`` (the last by default), or the first error
        (the statements after it are skipped; the transaction is aborted)."""
        if len(stmts) == 1 and stmts[0][2] is not None:
            name, vals, fmts = stmts[0]
            return self._check(pgconn, pgconn.exec_prepared(name, vals, fmts, 1))
        pgconn.enter_pipeline_mode()
        try:
            for name, vals, fmts in stmts:
                if fmts is None:  # a command: BEGIN, COMMIT
                    pgconn.send_query_params(name, None)
                else:
                    pgconn.send_query_prepared(name, vals, fmts, 1)
            pgconn.pipeline_sync()
            first_error = None
            results = []
            for _ in stmts:
                res = _next_result(pgconn)
                while _next_result(pgconn) is not None:  # (each statement's results end so)
                    pass
                if res is not None and res.status in (
                        ExecStatus.FATAL_ERROR, ExecStatus.NONFATAL_ERROR,
                        ExecStatus.BAD_RESPONSE) and first_error is None:
                    first_error = res
                results.append(res)
            sync = _next_result(pgconn)  # PIPELINE_SYNC
            if sync is None or sync.status != ExecStatus.PIPELINE_SYNC:
                raise psycopg.OperationalError("the metadata database's answer to a "
                                               "pipeline of statements ended early")
        finally:
            try:
                pgconn.exit_pipeline_mode()
            except psycopg.Error:  # (results left unread: the connection is not usable)
                pgconn.finish()
        if first_error is not None:
            self._check(pgconn, first_error)
        return results[want]

    def _in_error(self) -> bool:
        """Whether the driver's transaction is open and failed (a statement's error: only a
        rollback, to a savepoint or whole, goes on from there)."""
        return self._driver().info.transaction_status == TransactionStatus.INERROR

    def _reads_open(self) -> bool:
        """Whether the open transaction is the driver's, of reads alone (the hot statements'
        that read: nothing written, queued, or begun through SQLAlchemy)."""
        return not self._wrote and not self._queued and not self.conn.in_transaction() and \
            self._driver().info.transaction_status != TransactionStatus.IDLE

    def _unflushed(self, stmt: Any, params: Mapping[str, Any]) -> _Result:
        """Run the hot statement ``stmt`` (see :data:`_RAW`) outside any transaction (one
        of reads alone is ended first: :meth:`_reads_open`), in a transaction of its own
        whose commit does not wait for the server's WAL flush, in one round trip (ROLLBACK,
        BEGIN, ``SET LOCAL synchronous_commit TO off``, the statement, COMMIT).
        The change is visible to every machine once this returns, but a crash of the server
        within a fraction of a second (wal_writer_delay) may undo it: only for a change whose
        loss is harmless. Nothing is fenced; an error rolls back and is a MetaError."""
        raw = self._driver()
        _stmt, sql, lits = _RAW[id(stmt)]
        try:
            pgconn = raw.pgconn
            end = [(b"ROLLBACK", None, None)] if \
                pgconn.transaction_status != TransactionStatus.IDLE else []
            name, prep, vals, fmts = self._bind(pgconn, sql, {**lits, **params})
            return self._rows(prep, self._round_trip(pgconn, [
                *end, (b"BEGIN", None, None),
                (b"SET LOCAL synchronous_commit TO off", None, None),
                (name, vals, fmts), (b"COMMIT", None, None)], want=len(end) + 2))
        except psycopg.Error as e:
            self._driver_failed(raw, e)
            err = self._meta_error(e)
            self._rolled_back()
            raise err from e

    def _take_queued(self, raw: psycopg.Connection[Any]) -> list[tuple[bytes, Any, Any]]:
        """The statements :meth:`_x` queued, bound, preceded by a BEGIN if no transaction
        is open (empties the queue)."""
        pgconn = raw.pgconn
        stmts = []
        if pgconn.transaction_status == TransactionStatus.IDLE and not raw.autocommit:
            stmts.append((b"BEGIN", None, None))
        queued, self._queued = self._queued, []
        for sql, params in queued:
            name, _prep, vals, fmts = self._bind(pgconn, sql, params)
            stmts.append((name, vals, fmts))
        return stmts

    def _send_queued(self) -> None:
        """Send the statements :meth:`_x` queued (before a statement run another way, or
        the commit)."""
        if self._queued:
            raw = self._driver()
            try:
                self._round_trip(raw.pgconn, self._take_queued(raw))
            except psycopg.Error as e:
                self._driver_failed(raw, e)
                raise

    @staticmethod
    def _check(pgconn: Any, res: Any) -> Any:
        """``res``, or the psycopg error it is."""
        if res.status in (ExecStatus.FATAL_ERROR, ExecStatus.NONFATAL_ERROR,
                          ExecStatus.BAD_RESPONSE):
            raise psycopg.errors.error_from_result(res, encoding="utf-8")
        return res

    def _in_transaction(self) -> bool:
        """Whether a transaction is open (begun by SQLAlchemy's statements or the
        driver's)."""
        return bool(self._queued) or self.conn.in_transaction() or (
            self._driver().info.transaction_status != TransactionStatus.IDLE)

    def _meta_error(self, e: DBAPIError | psycopg.Error) -> MetaError:
        orig = e.orig if isinstance(e, DBAPIError) else e
        code = getattr(orig, "sqlstate", None)
        cls: type[MetaError] = MetaError
        if code == "53100":  # disk_full
            cls = MetaFull
        elif code in CONFLICT_STATES:
            self._tail = None  # (another machine may be appending: read the head a while)
            self._trust_tail_at = time.monotonic() + HEAD_TRUST_PAUSE
            why = "the ledger's head moved" if code == LEDGER_MOVED else _first_line(orig)
            return _Conflict(f"metadata database {self.where}: the transaction conflicted with "
                             f"another writer ({why}) and was rolled back")
        return cls(f"metadata database {self.where}: {_first_line(orig)}")

    def _h(self, domain: bytes, *parts: int | bytes | str) -> bytes:
        """The keyed hash of a row identity in one hash domain (one per key column)."""
        return _hash(self.keys, domain, *parts)

    def _seal(self, table: str, ver: int, keys: tuple[bytes, ...], *vals: Any) -> bytes:
        return crypto.seal(self.keys.row, _pack(*vals), _ad(table, ver, *keys))

    def _open(self, table: str, ver: int, keys: tuple[bytes, ...], blob: bytes) -> tuple[Any, ...]:
        return _open_row(self.keys, self.where, table, ver, keys, blob)

    def _name_siv(self, parent: int, name: bytes) -> bytes:
        got = self._names.get((parent, name))
        if got is None:
            # (RFC 5297 through OpenSSL: the tag, then the ciphertext; ~100x faster than
            # pycryptodome's SIV, which was a tenth of a small file's create)
            pad = 15 - len(name) % 16
            got = self._siv.encrypt(name + b"\x80" + b"\0" * pad,
                                    [b"dentry\0" + parent.to_bytes(8, "big")])
            self._cache_name(parent, name, got)
        return got

    def _name_open(self, parent: int, blob: bytes) -> bytes:
        blob = bytes(blob)
        name = self._siv_names.get((parent, blob))
        if name is None:
            name = _open_name(self._siv, self.where, parent, blob)
            self._cache_name(parent, name, blob)
        return name

    def _cache_name(self, parent: int, name: bytes, blob: bytes) -> None:
        """Remember a name's SIV both ways (deterministic: the cache is the computation)."""
        if len(self._names) >= NAME_CACHE:
            self._names.clear()
            self._siv_names.clear()
        self._names[(parent, name)] = blob
        self._siv_names[(parent, blob)] = name

    def _remember(self, table: str, k: bytes, ver: int) -> None:
        if len(self._vers) >= VERSION_CACHE_ROWS:
            self._vers.clear()
            self._ivals.clear()
        self._vers[(table, k)] = ver

    def _put(self, t: Table, k: bytes, *vals: Any) -> None:
        """Insert a single-key row (version 1)."""
        self._x(_INSERT[t.name], {"k": k, "ver": 1, "v": self._seal(t.name, 1, (k,), *vals)})
        self._remember(t.name, k, 1)

    def _replace(self, t: Table, k: bytes, *vals: Any, extra: tuple[bytes, ...] = (),
                 mine: bool = False) -> bool:
        """Re-seal an existing single-key row at its next version; False if there is none.
        The update is conditional on the version last seen (an optimistic check: another
        writer's update in between makes this a conflict, not a lost update). ``mine``: a row
        this transaction inserted, which no other writer can see: the update cannot miss, and
        goes with the next statement (no round trip of its own)."""
        ver = self._vers.get((t.name, k))
        if ver is None:
            ver = self._x(_VER[t.name], {"key": k}).scalar()
            if ver is None:
                return False
        keys = (k, *extra)
        res = self._x(_UPDATE[t.name], {"key": k, "old": ver, "new": ver + 1,
                                        "val": self._seal(t.name, ver + 1, keys, *vals)},
                      later=mine)
        if res is not None and res.rowcount != 1:
            self._vers.pop((t.name, k), None)
            if self._x(_VER[t.name], {"key": k}).scalar() is None:
                return False
            raise _Conflict(f"metadata database {self.where}: a row of {t.name} was changed "
                            "by another writer meanwhile (the operation was rolled back)")
        self._remember(t.name, k, ver + 1)
        return True

    def _get(self, t: Table, k: bytes) -> tuple[Any, ...] | None:
        for _k, vals in self._opened(t, self._x(_GET[t.name], {"key": k})):
            return vals
        return None

    def _all(self, t: Table, *where: Any) -> Iterator[tuple[bytes, tuple[Any, ...]]]:
        """(key, opened content) of the single-key rows matching ``where``."""
        return self._opened(t, self._x(select(*_cols(t)).where(*where)))

    def _opened(self, t: Table, result: Any) -> Iterator[tuple[bytes, tuple[Any, ...]]]:
        for r in result.all():
            extra = tuple(bytes(x) for x in r[3:])
            self._remember(t.name, bytes(r.k), r.ver)
            yield bytes(r.k), self._open(t.name, r.ver, (bytes(r.k), *extra), r.v)

    def _retrying(self, fn: Callable[[], None]) -> None:
        """Run a self-contained block, again (with backoff) after a deadlock or serialization
        failure, up to RETRIES times."""
        for attempt in range(RETRIES):
            try:
                fn()
                return
            except _Conflict:
                if attempt == RETRIES - 1:
                    raise
                _backoff(attempt)

    def atomically(self, fn: Callable[[], T], commit: bool = True) -> T:
        """Run a namespace operation in one transaction, the inodes it reads locked until
        it commits (FOR UPDATE: an operation waits for another machine's change of the same
        directory and reads its result, instead of conflicting), and, when another writer won a
        conflict (serialization failure, deadlock, a unique key inserted first, a row whose
        version moved), run it again with backoff: ``fn`` re-reads everything it checks.

        Re-running is safe only when what is undone is ``fn``'s writes alone, so first: a
        transaction left open by reads alone is ended (it holds no write, only a snapshot the
        operation must not use); in one holding writes (deferred creates and attribute
        changes, which promise no more than "committed with the next commit") the operation
        runs after a savepoint, and a conflict, or an error ``fn`` raises, rolls back to it
        (the writes before it stay, to commit with this one: a small file's deferred create
        commits with its flush, one commit instead of two). Only an operation inside a block
        runs once (a conflict rolls the whole block back and raises)."""
        if not self._depth and self._in_transaction() and not self._wrote:
            self._end_reads()  # reads only: nothing is lost
        if self._depth:
            with self.transaction(commit=commit):
                return self._op(fn, retryable=False)
        if self._in_transaction():
            return self._after_savepoint(fn, commit)
        for attempt in range(RETRIES):
            try:
                with self.transaction(commit=commit):
                    return self._op(fn, retryable=True, commits=commit)
            except _Conflict:
                if attempt == RETRIES - 1:
                    raise
                _backoff(attempt)
        raise AssertionError("unreachable")

    def _op(self, fn: Callable[[], T], retryable: bool, commits: bool = False) -> T:
        """``fn`` as an operation: ``retryable``, run again on a conflict; ``commits``, and
        so is the commit that follows it (a conflict raised there runs it again too)."""
        self._locking = not self._reads_only
        self._retryable = retryable
        self._commits_retried = retryable and commits
        try:
            return fn()
        finally:
            self._locking = self._retryable = self._commits_retried = False

    def _after_savepoint(self, fn: Callable[[], T], commit: bool) -> T:
        """:meth:`atomically` in a transaction holding writes: ``fn`` after a savepoint, run
        again after a rollback to it on a conflict; any other error rolls back to it and is
        raised (the writes before it stay). The rollback actions registered after it run
        when it is rolled back to."""
        for attempt in range(RETRIES):
            self._x(_SAVEPOINT, fenced=False, later=True)
            undo_mark = len(self._undo)
            self._depth = 1
            try:
                out = self._op(fn, retryable=True, commits=commit)
            except BaseException as e:
                self._depth = 0
                if not self._to_savepoint(undo_mark):
                    raise  # (the whole transaction was rolled back)
                if isinstance(e, _Conflict) and attempt < RETRIES - 1:
                    _backoff(attempt)
                    continue
                err = self._db_error(e)
                if err is not None:
                    raise err from e
                raise
            self._depth = 0
            if commit:
                try:
                    self._commit(savepoint=True)
                except _Conflict:  # raised by a statement sent with it: still open (in
                    # error), else it rolled back whole (and what was deferred is written again)
                    if self._in_error() and attempt < RETRIES - 1 and \
                            self._to_savepoint(undo_mark):
                        _backoff(attempt)
                        continue
                    if self._in_error():
                        self._rolled_back()
                    raise
            return out
        raise AssertionError("unreachable")

    def _to_savepoint(self, undo_mark: int) -> bool:
        """Roll back to the savepoint of :meth:`_after_savepoint`, running the rollback actions
        registered after it; False (everything rolled back) if the database refuses."""
        try:
            self._run(_RAW[id(_ROLLBACK_TO)][1], None)
        except psycopg.Error:
            self._rolled_back()
            return False
        self._ledger_locked = False  # (taken again by the operation run again)
        self._tail = None
        undo, self._undo = self._undo[undo_mark:], self._undo[:undo_mark]
        for fn in reversed(undo):
            fn()
        self._vers.clear()  # (versions read or written after it are undone)
        self._ivals.clear()
        self._fresh.clear()
        return True

    # -- transactions and durability -------------------------------------------------------------
    def _end_reads(self) -> None:
        """Roll the open transaction back on both layers (SQLAlchemy's and the driver's)."""
        self._queued.clear()
        with contextlib.suppress(SQLAlchemyError):
            self.conn.rollback()
        with contextlib.suppress(psycopg.Error, SQLAlchemyError):
            raw = self._driver()
            if raw.info.transaction_status != TransactionStatus.IDLE:
                raw.rollback()

    def _rollback_db(self) -> None:
        self._end_reads()
        self._tail = None
        self._wrote = self._ledger_locked = False
        self._touched.clear()
        self._claimed_absent.clear()
        self._fresh.clear()
        self._vers.clear()
        self._ivals.clear()

    def _db_error(self, e: BaseException) -> MetaError | None:
        return self._meta_error(e) if isinstance(e, (DBAPIError, psycopg.Error)) else None

    def commit(self) -> None:
        """Commit the open transaction; once this returns it is durable on the server (its
        WAL flushed, as PostgreSQL's ``synchronous_commit`` promises). A refused commit rolls
        back whole and raises MetaError."""
        self._commit()

    def _commit(self, savepoint: bool = False, read: tuple[Any, Mapping[str, Any]] | None = None
                ) -> _Result | None:
        """:meth:`commit`; with ``savepoint`` (:meth:`_after_savepoint`'s), a conflict raised
        by a statement sent with the commit (the COMMIT then skipped) leaves the transaction
        open for a rollback to its savepoint; with ``read`` (a hot statement, in a
        transaction that wrote, on an attached engine) that statement runs just before the
        commit, in its round trip, and its result is returned."""
        out = None
        try:
            if self._in_transaction():
                if self._wrote and self.session_id is not None:
                    out = self._commit_fenced(read)  # (sends the change notice too)
                elif self._touched:
                    self._send_notice()
                self._send_queued()
                if self.conn.in_transaction():
                    self.conn.commit()  # (the driver's transaction with it)
                raw = self._driver()
                if raw.info.transaction_status != TransactionStatus.IDLE:
                    raw.commit()
            self._wrote = self._ledger_locked = False
            self._touched.clear()
            self._claimed_absent.clear()
            self._fresh.clear()
        except (DBAPIError, psycopg.Error) as e:
            err = self._meta_error(e)
            if not (savepoint and isinstance(err, _Conflict) and self._in_error()):
                self._rolled_back()
            raise err from e
        self._undo.clear()
        self._commits += 1
        if self.on_commit is not None:
            self.on_commit()
        return out

    # -- sessions, holds and change notices (several machines) ------------------------------
    def attach(self, session_id: bytes,
               on_expired: Callable[[str], None] | None = None) -> None:
        """Fence this engine's commits by the session ``session_id`` (see :class:`PgSession`);
        ``on_expired(why)`` hears the first commit refused for it."""
        self.session_id = session_id
        self._session_k = self._h(b"S", session_id)
        self._on_expired = on_expired
        if self._locks is not None:
            self._locks.close()
        self._locks = PgLocks(self.engine.url, self.keys, session_id)

    def set_lock(self, ino: int, owner: int, kind: str, ltype: int, start: int, end: int,
                 pid: int) -> Held | None:
        """See :meth:`MetaEngine.set_lock` (on :class:`PgLocks`' own connection)."""
        return self._lock_table().set(ino, owner, kind, ltype, start, end, pid)

    def test_lock(self, ino: int, owner: int, kind: str, ltype: int, start: int,
                  end: int) -> Held | None:
        """See :meth:`MetaEngine.test_lock`."""
        return self._lock_table().test(ino, owner, kind, ltype, start, end)

    def _lock_table(self) -> PgLocks:
        if self._locks is None:
            raise LocksUnavailable(f"metadata database {self.where}: no session (file locks "
                                   "are a mounted machine's)")
        return self._locks

    def _commit_fenced(self, read: tuple[Any, Mapping[str, Any]] | None = None
                       ) -> _Result | None:
        """Commit the open transaction if this machine's session is live by the database's
        clock, in one round trip: the queued statements, the hot statement ``read`` (its
        result is returned), the fence (_FENCE, with the change
        notice if this transaction changed inodes: a notice is sent only if it commits) and
        the COMMIT (skipped, with nothing committed, when the fence fails). The session's row
        is key-share locked until the commit, so a live machine cleaning it up (a DELETE)
        waits for this commit and then sees what it wrote. A session not live: rolled back,
        SessionExpired (and ``on_expired`` told, once)."""
        params = {"sess": self._session_k}
        if self._touched:
            params.update(self._notice())
        raw = self._driver()
        try:
            stmts = self._take_queued(raw)
            pgconn = raw.pgconn
            prep = None
            if read is not None:
                _stmt, sql, lits = _RAW[id(read[0])]
                rname, prep, rvals, rfmts = self._bind(pgconn, sql, {**lits, **read[1]})
                stmts.append((rname, rvals, rfmts))
            name, _prep, vals, fmts = self._bind(
                pgconn, _RAW[id(_FENCE_NOTIFY if self._touched else _FENCE)][1], params)
            res = self._round_trip(pgconn, [*stmts, (name, vals, fmts), (b"COMMIT", None, None)],
                                   want=len(stmts) - 1)
        except psycopg.Error as e:
            self._driver_failed(raw, e)
            if e.sqlstate != FENCE_FAILED:
                raise
        else:
            return self._rows(prep, res) if prep is not None else None
        self._rolled_back()
        err = SessionExpired(
            f"metadata database {self.where}: this machine's session expired (it was "
            "frozen or cut off longer than the session lifetime): nothing more is committed")
        hook, self._on_expired = self._on_expired, None
        if hook is not None:
            hook(str(err))
        raise err

    def _notice(self) -> dict[str, str]:
        """The parameters of the change notice of the open transaction (the inodes it
        changed): ``channel`` and ``notice`` (see _NOTIFY)."""
        inos = sorted(self._touched) if len(self._touched) <= NOTICE_INODES else []
        return {"channel": channel(self.keys),
                "notice": seal_notice(self.keys, self.sender, inos)}

    def _send_notice(self) -> None:
        self._run(_RAW[id(_NOTIFY)][1], self._notice())

    def hold(self, ino: int) -> None:
        """This machine has ``ino`` open: its last name going does not delete it (written,
        committed with the next commit). Nothing without a session."""
        if self.session_id is None:
            return
        k, i_h = self._h(b"h", self.session_id, ino), self._h(b"H", ino)
        self._x(_INSERT_HOLD, later=True, params={
            "k": k, "ino": i_h, "sess": self._session_k,
            "v": crypto.seal(self.keys.row, _pack(self.session_id, ino),
                             _ad("holds", 0, k, i_h, self._session_k))})

    def open_inode(self, ino: int) -> Inode | None:
        """See :meth:`MetaEngine.open_inode`: the hold, the inode's read and the commit
        (fenced, with whatever the open transaction wrote) in one round trip. An inode not
        found: its hold is let go at once."""
        if self.session_id is None:
            return self.get_inode(ino)
        k = self._h(b"i", ino)
        self.hold(ino)
        res = self._commit(read=(_GET["inodes"], {"key": k}))
        if res is None:  # (not expected: a hold writes)
            return self.get_inode(ino)
        for _k, vals in self._opened(inodes, res):
            return self._keep(k, Inode(*vals))
        self.unhold(ino)
        self.commit()
        return None

    def unhold(self, ino: int) -> None:
        """This machine closed ``ino`` (written, committed with the next commit)."""
        if self.session_id is not None:
            self._x(_DELETE_HOLD, {"hold": self._h(b"h", self.session_id, ino)})

    def drop_unlinked(self, ino: int, unhold: bool = False) -> Changed:
        """See :meth:`NamespaceOps.drop_unlinked`; with ``unhold``, this machine's hold goes
        in the statement that reads (and locks) the inode: outside a transaction that
        statement is a transaction of its own, committed without waiting for the server's
        WAL flush (:meth:`_unflushed`: a file's close is one round trip, and no disk wait),
        and only an inode found without a name is then deleted in a transaction. The hold's
        removal is not fenced (a machine whose session expired only lets go of what the
        session's reaper would drop); the inode's deletion is."""
        if not unhold or self.session_id is None:
            return super().drop_unlinked(ino, unhold)
        k, hk = self._h(b"i", ino), self._h(b"h", self.session_id, ino)
        if not self._depth and (not self._in_transaction() or self._reads_open()):
            rows = list(self._opened(inodes, self._unflushed(_UNHOLD_GET,
                                                             {"hold": hk, "key": k})))
            self._vers.pop(("inodes", k), None)  # (read outside a transaction: not kept)
            if not rows or Inode(*rows[0][1]).nlink > 0:
                return Changed()

        def run() -> Changed:
            out = Changed()
            node = None
            for _k, vals in self._opened(inodes, self._x(_UNHOLD_GET, {"hold": hk, "key": k},
                                                         fenced=False)):
                node = self._keep(k, Inode(*vals))
            if node is not None and node.nlink <= 0 and not self.held(ino):
                self.delete_inode(ino)
                out.removed.add(ino)
            return out

        return self.atomically(run)

    def held(self, ino: int) -> bool:
        """Whether any session holds ``ino`` open."""
        return self._x(_HELD, {"ino": self._h(b"H", ino)}).first() is not None

    def live_sessions(self) -> int:
        """How many sessions other than this engine's are live."""
        return int(self._x(select(func.count()).select_from(sessions).where(
            sessions.c.k != self._session_k,
            sessions.c.expires > func.clock_timestamp())).scalar() or 0)

    def session_purposes(self) -> list[str]:
        """What each live session other than this engine's is for: "mount", or "repair" (a
        ``cryptfs fsck --repair``, which mounts wait for); the 6th field of its sealed ``v``
        (a session written without it: "mount")."""
        out = []
        for r in self._x(select(sessions.c.k, sessions.c.v).where(
                sessions.c.k != self._session_k,
                sessions.c.expires > func.clock_timestamp())).all():
            who = self._open("sessions", 0, (bytes(r.k),), r.v)
            out.append(who[5] if len(who) > 5 and isinstance(who[5], str) else "mount")
        return out

    def session_horizons(self, own: bool = False) -> list[float]:
        """See :meth:`MetaEngine.session_horizons` (the 5th field of a session's sealed
        ``v``, written by :meth:`PgSession.beat`); with ``own`` this engine's session's too."""
        out = []
        for r in self._x(select(sessions.c.k, sessions.c.v).where(
                sessions.c.k != (b"" if own else self._session_k),
                sessions.c.expires > func.clock_timestamp())).all():
            who = self._open("sessions", 0, (bytes(r.k),), r.v)
            out.append(who[4] / 1e9 if len(who) > 4 and isinstance(who[4], int) else 0.0)
        return out

    def reap_sessions(self) -> tuple[int, set[int]]:
        """Clean up sessions that expired (their machines died or were cut off, and are
        fenced): drop their holds and file locks, and the inodes only they kept (open, no
        name left). Returns
        how many sessions went and the inodes deleted. Rows another machine is reaping are
        skipped. A hold that fails to open (tampered with) is dropped with a warning: it
        cannot name an inode, so none is deleted for it (an inode only it kept stays, with
        no name, for fsck)."""

        def run() -> tuple[int, set[int]]:
            dead = [bytes(r.k) for r in self._x(
                select(sessions.c.k).where(sessions.c.expires <= func.clock_timestamp())
                .with_for_update(skip_locked=True)).all()]
            if not dead:
                return 0, set()
            kept = set()
            for r in self._x(select(holds).where(holds.c.sess.in_(dead))).all():
                try:
                    _sid, ino = _unpack(crypto.open_sealed(
                        self.keys.row, bytes(r.v),
                        _ad("holds", 0, bytes(r.k), bytes(r.ino), bytes(r.sess))))
                except IntegrityError:  # edited, swapped or forged: it names no inode
                    log.warning("metadata database %s: a hold of an expired session fails "
                                "authentication (tampered with); it is dropped", self.where)
                    continue
                kept.add(int(ino))
            self._x(delete(holds).where(holds.c.sess.in_(dead)))
            if self._x(delete(locks).where(locks.c.sess.in_(dead))).rowcount:
                self._x(select(func.pg_notify(lock_channel(self.keys), "")))
            self._x(delete(sessions).where(sessions.c.k.in_(dead)))
            gone = set()
            for ino in sorted(kept):
                node = self.get_inode(ino)
                if node is not None and node.nlink <= 0 and not self.held(ino):
                    self.delete_inode(ino)
                    gone.add(ino)
            return len(dead), gone

        return self.atomically(run)

    def lock_ledger(self) -> None:
        """In a transaction about to append to the ledger: wait for other machines' appends
        (the chain's one serialisation point), so the head read next is the newest."""
        # (sent with the head's read: in one round trip, each its own statement, the read's
        # snapshot taken once the lock is held; a deadlock is raised by the read)
        self._x(_XACT_LOCK, {"lock": checkpoint_lock(self.keys) ^ 1}, later=True)
        self._ledger_locked = True

    def sync(self) -> None:
        """Commit: a committed transaction is already durable on the server."""
        self.commit()

    def start_checkpointer(self) -> None:
        """Nothing to start: the server checkpoints its own log (the SQLite engine's WAL
        checkpointer has no counterpart here)."""

    def close(self) -> None:
        """Commit and close every connection of the engine: its own, the file locks', the
        reader kept for :meth:`freeze` (a :class:`PgFrozen` still open closes its own when
        it closes)."""
        if self._locks is not None:
            self._locks.close()
        with contextlib.suppress(Exception):
            self.commit()
        with contextlib.suppress(Exception):
            self.conn.close()
        self.engine.dispose()
        with self._reader_lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(Exception):
                spare.close()
        self._reader.dispose()

    def changes(self) -> bytes | None:
        """Commit; None: this engine ships no segments, every checkpoint stores an
        :meth:`image`."""
        self.commit()
        return None

    def shipped(self) -> None:
        """Nothing to remember: every shipment is a whole image."""

    def change_count(self) -> int:
        """Commits made through this engine so far (a conservative count of writes: a commit
        that wrote nothing is counted too, so an fsync may checkpoint more than it needs to,
        never less)."""
        return self._commits

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """A block of reads that all see one snapshot (REPEATABLE READ, READ ONLY), whatever
        other machines commit meanwhile (a check while they are mounted); commits first,
        writes nothing."""
        self.commit()
        self._x(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        self._wrote = False
        try:
            yield
        finally:
            self._rollback_db()

    def freeze(self) -> PgFrozen:
        """See :meth:`MetaEngine.freeze`. Commits, then begins a REPEATABLE READ, READ ONLY
        transaction on a connection of its own (the engine's reader, kept from one
        checkpoint to the next) and reads the ledger's head there: that first read fixes
        the transaction's snapshot, which holds everything committed so far, this machine's
        and the others'. The rest is read by the :class:`PgFrozen` without the filesystem
        lock, from that snapshot, whatever is committed meanwhile. The reader takes no lock
        a writer, the heartbeat or a session's reaper waits for (a read-only transaction's
        table share locks conflict only with DDL). A kept connection that fails (the server
        restarted since) is replaced once."""
        self.commit()
        for attempt in range(2):
            conn, fresh = self._take_reader()
            try:
                conn.execute(_READ_ONLY)
                r = conn.execute(_LEDGER_LAST).first()
                seq = 0 if r is None else int(self._open(
                    "ledger", 0, (r.seq.to_bytes(8, "big"),), r.v)[0])
            except DBAPIError as e:
                self._give_back(conn, keep=False)
                if fresh or attempt:
                    raise MetaError(f"metadata database {self.where}: {_first_line(e.orig)}"
                                    ) from None
                continue
            except BaseException:
                self._give_back(conn, keep=False)
                raise
            return PgFrozen(self, conn, seq)
        raise AssertionError("unreachable")

    def _take_reader(self) -> tuple[Connection, bool]:
        """The reader connection kept since the last :class:`PgFrozen` closed, or a new one
        (True); a new one that cannot be made is a one-line MetaError."""
        with self._reader_lock:
            conn, self._spare = self._spare, None
        if conn is not None:
            return conn, False
        try:
            return self._reader.connect(), True
        except DBAPIError as e:
            raise MetaError(f"metadata database {self.where}: {_first_line(e.orig)}") from None

    def _give_back(self, conn: Connection, keep: bool) -> None:
        """A :class:`PgFrozen`'s connection, its transaction ended: kept for the next one if
        ``keep`` (and the engine is open and keeps none yet), else closed. Any thread."""
        with self._reader_lock:
            if keep and not self._closed and self._spare is None:
                self._spare, conn = conn, None  # type: ignore[assignment]
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def image(self, leave_out: Callable[[ChunkRef], bool] | None = None) -> bytes:
        """Commit; the committed metadata as one SQLite image (:meth:`PgFrozen.image` of a
        :meth:`freeze` of it)."""
        frozen = self.freeze()
        try:
            return frozen.image(leave_out)
        finally:
            frozen.close()

    # -- key/value state -------------------------------------------------------------------------
    def get_state(self, key: str) -> str | None:
        got = self._get(state, self._h(b"s", key))
        return None if got is None else got[1]

    def set_state(self, key: str, value: str) -> None:
        k = self._h(b"s", key)

        def put() -> None:
            with self.transaction():
                if not self._replace(state, k, key, value):
                    self._put(state, k, key, value)

        if self._depth:
            put()
        else:
            self._retrying(put)

    # -- inodes ----------------------------------------------------------------------------------
    @staticmethod
    def _inode_vals(n: Inode) -> tuple[Any, ...]:
        return (n.ino, n.mode, n.uid, n.gid, n.size, n.nlink, n.atime_ns, n.mtime_ns,
                n.ctime_ns, n.rdev, n.target)

    def get_inode(self, ino: int) -> Inode | None:
        """The inode; one this transaction inserted and wrote last here is not read again
        (no other machine sees it before the commit: the row is what was written)."""
        k = self._h(b"i", ino)
        if ino in self._fresh:
            got = self._ivals.get(ino)
            if got is not None and got[0] == self._vers.get(("inodes", k)):
                return dataclasses.replace(got[1])
        if not self._locking:
            got = self._get(inodes, k)
            return None if got is None else self._keep(k, Inode(*got))
        for _k, vals in self._opened(inodes, self._x(_GET_LOCKED["inodes"], {"key": k})):
            return self._keep(k, Inode(*vals))
        return None

    def _keep(self, k: bytes, node: Inode) -> Inode:
        """Remember ``node`` (row key ``k``) at the version just read or written."""
        ver = self._vers.get(("inodes", k))
        if ver is not None:
            self._ivals[node.ino] = (ver, dataclasses.replace(node))
        return node

    def touch_inode(self, ino: int, now_ns: int, nlink: int = 0, mtime: bool = False,
                    known: Inode | None = None) -> Inode | None:
        """See :meth:`MetaEngine.touch_inode` (``known`` is not taken: other machines write
        the rows; this engine keeps its own record of them). In an operation that
        :meth:`atomically` runs again on a conflict, an inode read or written here before at
        the version the database still has is not read again: the update is conditional on
        that version (checked by row count), so a change by another writer meanwhile is a
        conflict and the operation runs again on what the database holds — one statement
        instead of a locking read and an update (each create touches its directory)."""
        k = self._h(b"i", ino)
        got = self._ivals.get(ino)
        if not self._retryable or got is None or got[0] != self._vers.get(("inodes", k)):
            return super().touch_inode(ino, now_ns, nlink, mtime)
        node = touched(dataclasses.replace(got[1]), now_ns, nlink, mtime)
        self.update_inode(node)
        return node

    def readdir(self, ino: int) -> list[tuple[bytes, int, int]]:
        """See :meth:`NamespaceOps.readdir`; it locks nothing (it writes nothing, and a lock
        would be held until this machine's next commit)."""
        self._reads_only = True
        try:
            return super().readdir(ino)
        finally:
            self._reads_only = False

    def insert_inode(self, node: Inode) -> int:
        ino = node.ino
        if not ino:
            ino = self._next_ino()
        else:  # numbers the sequence hands out later stay above it
            self._x(text("SELECT setval('cryptfs_ino_seq', greatest(:ino, last_value)) "
                         "FROM cryptfs_ino_seq"), {"ino": ino})
        vals = self._inode_vals(node)
        k = self._h(b"i", ino)
        self._put(inodes, k, ino, *vals[1:])
        self._keep(k, dataclasses.replace(node, ino=ino))
        self._fresh[ino] = {}
        self._touched.add(ino)
        return ino

    def _next_ino(self) -> int:
        if not self._inos:  # (numbers are never handed out twice, used or not)
            self._inos = [int(n) for n in self._x(_NEXT_INOS, {"n": INO_BATCH}).scalars()]
        return self._inos.pop(0)

    def mknod(self, parent: int, name: bytes, node: Inode,
              xattrs: Mapping[bytes, bytes] | None = None, commit: bool = True,
              known: Mapping[int, Inode] | None = None) -> Changed:
        """See :meth:`NamespaceOps.mknod` (``known`` is not taken: other machines write the
        rows). In an operation :meth:`atomically` runs again on a conflict, with the parent
        directory as this engine last read or wrote it at the version the database still has
        (each create after the first in a directory), one statement: the inode, the name
        (unless it exists: EEXIST, and the statement's writes are rolled back with the
        operation) and the parent's update, conditional on that version (another writer's
        change meanwhile is a conflict: the operation runs again, reading the parent)."""
        if xattrs:
            return super().mknod(parent, name, node, xattrs, commit)
        check_name(name)
        isdir = stat.S_ISDIR(node.mode)

        def run() -> Changed:
            new = created(node)
            now = new.ctime_ns
            pk = self._h(b"i", parent)
            got = self._ivals.get(parent)
            if not self._retryable or got is None or got[0] != self._vers.get(("inodes", pk)):
                new.ino = self.insert_inode(new)
                if not self.add_dentry_if_absent(parent, name, new.ino):
                    raise os_error(errno_mod.EEXIST)
                pnode = self._touch_dir(parent, now, nlink=1 if isdir else 0)
            else:
                pnode = touched(dataclasses.replace(got[1]), now, 1 if isdir else 0, True)
                if not stat.S_ISDIR(pnode.mode):
                    raise os_error(errno_mod.ENOTDIR)
                if pnode.nlink - (1 if isdir else 0) <= 0:
                    raise os_error(errno_mod.ENOENT)
                new.ino = self._create(parent, name, new, pnode, got[0])
            return Changed(ino=new.ino, inodes={new.ino: new, parent: pnode},
                           entries={(parent, name): new.ino})

        return self.atomically(run, commit)

    def _create(self, parent: int, name: bytes, new: Inode, pnode: Inode, pver: int) -> int:
        """The one statement of :meth:`mknod`; the new inode's number."""
        ino = self._next_ino()
        new.ino = ino
        k, pk = self._h(b"i", ino), self._h(b"i", parent)
        p_h, n_s, i_h = self._h(b"p", parent), self._name_siv(parent, name), self._h(b"d", ino)
        self._touched.update((ino, parent))
        r = self._x(_CREATE, {
            "ik": k, "iv": self._seal("inodes", 1, (k,), *self._inode_vals(new)),
            "pk": pk, "pold": pver, "pnew": pver + 1,
            "pv": self._seal("inodes", pver + 1, (pk,), *self._inode_vals(pnode)),
            "dp": p_h, "dn": n_s, "di": i_h,
            "dv": self._seal("dentries", 1, (p_h, n_s, i_h), parent, ino)}).first()
        if r.u != 1:
            self._ivals.pop(parent, None)
            self._vers.pop(("inodes", pk), None)
            raise _Conflict(f"metadata database {self.where}: inode {parent} was changed by "
                            "another writer meanwhile (the operation was rolled back)")
        if r.d != 1:
            raise os_error(errno_mod.EEXIST)
        self._remember("inodes", k, 1)
        self._keep(k, dataclasses.replace(new))
        self._fresh[ino] = {}
        self._remember("inodes", pk, pver + 1)
        self._keep(pk, pnode)
        return ino

    def update_inode(self, node: Inode) -> None:
        """Re-seal an inode at its next version; a conflict (MetaError) if another writer
        changed it since it was read, or removed it (a directory removed by another machine
        while this one creates in it: the retried operation then finds it gone)."""
        self._touched.add(node.ino)
        k = self._h(b"i", node.ino)
        if not self._replace(inodes, k, *self._inode_vals(node), mine=node.ino in self._fresh):
            self._ivals.pop(node.ino, None)
            raise _Conflict(f"metadata database {self.where}: inode {node.ino} was removed by "
                            "another writer meanwhile (the operation was rolled back)")
        self._keep(k, node)

    def delete_inode(self, ino: int) -> list[str]:
        """Remove an inode with its xattrs, chunk map and any names left pointing at it;
        return the objects it referenced."""
        k = self._h(b"i", ino)
        self._touched.add(ino)
        ver = self._vers.pop(("inodes", k), None)
        where = [inodes.c.k == k] + ([inodes.c.ver == ver] if ver is not None else [])
        if not self._x(delete(inodes).where(*where)).rowcount and ver is not None:
            # changed since it was read (a name made in a directory being removed) or gone:
            # the operation is run again on what is there now
            raise _Conflict(f"metadata database {self.where}: inode {ino} was changed by "
                            "another writer meanwhile (the operation was rolled back)")
        objs = self.remove_blocks_from(ino, 0)
        self._fresh.pop(ino, None)
        self._x(delete(dentries).where(dentries.c.ino == self._h(b"d", ino)))
        self._x(delete(xattrs).where(xattrs.c.ino == self._h(b"X", ino)))
        return objs

    def orphan_inodes(self) -> list[int]:
        return sorted(v[0] for _k, v in self._all(inodes) if v[5] <= 0)

    def count_inodes(self) -> int:
        return int(self._x(select(func.count()).select_from(inodes)).scalar() or 0)

    def inode_modes(self) -> dict[int, tuple[int, int]]:
        """``{ino: (mode, nlink)}`` of every inode."""
        return {v[0]: (v[1], v[5]) for _k, v in self._all(inodes)}

    def set_nlink(self, ino: int, nlink: int) -> None:
        node = self.get_inode(ino)
        if node is not None:
            node.nlink = nlink
            self.update_inode(node)

    def drop_inode_rows(self, ino: int) -> None:
        """Remove an inode with its chunk map and xattrs, leaving reference counts to fsck."""
        self._fresh.pop(ino, None)
        self._x(delete(blocks).where(blocks.c.ino == self._h(b"B", ino)))
        self._x(delete(xattrs).where(xattrs.c.ino == self._h(b"X", ino)))
        self._x(delete(inodes).where(inodes.c.k == self._h(b"i", ino)))

    # -- directory entries -----------------------------------------------------------------------
    def _dentry_rows(self, *where: Any) -> Iterator[tuple[int, bytes, int]]:
        """(parent, name, ino) of the entries matching ``where``, opened."""
        q = select(dentries.c.parent, dentries.c.name, dentries.c.ino, dentries.c.ver,
                   dentries.c.v).where(*where)
        for r in self._x(q).all():
            p_h, n_s, i_h = bytes(r.parent), bytes(r.name), bytes(r.ino)
            parent, ino = self._open("dentries", r.ver, (p_h, n_s, i_h), r.v)
            yield parent, self._name_open(parent, n_s), ino

    def lookup(self, parent: int, name: bytes) -> int | None:
        p_h, n_s = self._h(b"p", parent), self._name_siv(parent, name)
        r = self._x(_LOOKUP, {"parent": p_h, "name": n_s}).first()
        if r is None:
            return None
        _parent, ino = self._open("dentries", r.ver, (p_h, n_s, bytes(r.ino)), r.v)
        return int(ino)

    def add_dentry(self, parent: int, name: bytes, ino: int) -> None:
        p_h, n_s, i_h = self._h(b"p", parent), self._name_siv(parent, name), self._h(b"d", ino)
        self._touched.add(parent)
        self._x(_INSERT["dentries"], {
            "parent": p_h, "name": n_s, "ino": i_h, "ver": 1,
            "v": self._seal("dentries", 1, (p_h, n_s, i_h), parent, ino)})

    def _dir_rows(self, parent: int) -> Iterator[tuple[int, bytes, int]]:
        """(parent, name, ino) of the entries of ``parent``, opened."""
        p_h = self._h(b"p", parent)
        for r in self._x(_DIR, {"parent": p_h}).all():
            n_s, i_h = bytes(r.name), bytes(r.ino)
            parent_, ino = self._open("dentries", r.ver, (p_h, n_s, i_h), r.v)
            yield parent_, self._name_open(parent_, n_s), ino

    def _nodes_maps(self, inos: Iterable[int]
                    ) -> tuple[dict[int, Inode], dict[int, list[tuple[str, int | None]]]]:
        """The inodes ``inos`` and the objects their chunk maps name, with their stored sizes
        where the pages have them, in one statement."""
        inos = set(inos)
        nodes: dict[int, Inode] = {}
        maps: dict[int, list[tuple[str, int | None]]] = {}
        if not inos:
            return nodes, maps
        for r in self._x(_NODES_MAPS, {"ikeys": [self._h(b"i", i) for i in inos],
                                       "bkeys": [self._h(b"B", i) for i in inos]}).all():
            k = bytes(r.k)
            if r.t == 0:
                self._remember("inodes", k, r.ver)
                node = Inode(*self._open("inodes", r.ver, (k,), r.v))
                nodes[node.ino] = node
            else:
                self._remember("blocks", k, r.ver)
                ino, _page, *flat = self._open("blocks", r.ver, (k, bytes(r.g)), r.v)
                maps.setdefault(ino, []).extend(_entries(flat).values())
        return nodes, maps

    def _allocated(self, nodes: dict[int, Inode], maps: dict[int, list[tuple[str, int | None]]],
                   chunk_size: int, unit: int) -> dict[int, int]:
        """:meth:`allocated` of each inode of ``nodes`` (0 unless a regular file): the sizes
        the chunk map pages hold, the object rows read only for those they do not (pages
        written before schema version 3)."""
        regular = [i for i, n in nodes.items() if stat.S_ISREG(n.mode)]
        sizes = self._sizes(e for i in regular for e in maps.get(i, ()))
        alloc = dict.fromkeys(nodes, 0)
        for i in regular:
            alloc[i] = _allocated(maps.get(i, []), sizes, chunk_size, unit)
        return alloc

    def _sizes(self, entries: Iterable[tuple[str, int | None]]) -> dict[str, int]:
        """The stored sizes of the objects chunk map ``entries`` name: as the pages hold them,
        else (pages written before schema version 3) from the object rows, in one query."""
        entries = list(entries)
        sizes = {o: n for o, n in entries if n is not None}
        sizes.update((r.name, r.size)
                     for r in self._refs(o for o, n in entries if n is None).values())
        return sizes

    def lookup_stat(self, parent: int, name: bytes, chunk_size: int,
                    unit: int) -> tuple[Inode, int] | None:
        """Two queries (the entry; its inode and chunk map), and the objects its chunk map
        names if its pages do not hold their sizes; see :meth:`MetaEngine.lookup_stat`."""
        ino = self.lookup(parent, name)
        if ino is None:
            return None
        nodes, maps = self._nodes_maps([ino])
        if ino not in nodes:
            return None
        return nodes[ino], self._allocated(nodes, maps, chunk_size, unit)[ino]

    def stat_dir(self, parent: int, chunk_size: int,
                 unit: int) -> list[tuple[bytes, Inode, int]]:
        """Two queries for the whole directory (its entries; their inodes and chunk maps), and
        the objects of chunk map pages that do not hold their sizes (written before schema
        version 3); see :meth:`MetaEngine.stat_dir`."""
        names = [(n, i) for _p, n, i in self._dir_rows(parent)]
        nodes, maps = self._nodes_maps(i for _n, i in names)
        alloc = self._allocated(nodes, maps, chunk_size, unit)
        return [(n, nodes[i], alloc[i]) for n, i in names if i in nodes]

    def add_dentry_if_absent(self, parent: int, name: bytes, ino: int) -> bool:
        """One statement (an insert that does nothing if the name exists, committed or being
        inserted by another writer: it waits for that one's end); see
        :meth:`MetaEngine.add_dentry_if_absent`."""
        p_h, n_s, i_h = self._h(b"p", parent), self._name_siv(parent, name), self._h(b"d", ino)
        res = self._x(_INSERT_NEW["dentries"], {
            "parent": p_h, "name": n_s, "ino": i_h, "ver": 1,
            "v": self._seal("dentries", 1, (p_h, n_s, i_h), parent, ino)})
        if res.first() is None:
            return False
        self._touched.add(parent)
        return True

    def remove_dentry(self, parent: int, name: bytes) -> None:
        self._touched.add(parent)
        self._x(_DELETE_DENTRY, {"parent": self._h(b"p", parent),
                                 "name": self._name_siv(parent, name)})

    def list_dir(self, parent: int, after: bytes | None = None,
                 limit: int | None = None) -> list[tuple[bytes, int, int]]:
        """``(name, ino, mode)`` in name order (sorted here), after ``after``, at most
        ``limit``."""
        entries = sorted((n, i) for _p, n, i in self._dir_rows(parent))
        if after is not None:
            entries = [e for e in entries if e[0] > after]
        if limit:
            entries = entries[:limit]
        modes = self._modes({i for _n, i in entries})
        return [(n, i, modes[i]) for n, i in entries if i in modes]

    def _modes(self, inos: Iterable[int]) -> dict[int, int]:
        by_key = {self._h(b"i", i): i for i in inos}
        if not by_key:
            return {}
        out = {}
        for k, v in self._opened(inodes, self._x(_GET_MANY["inodes"], {"keys": list(by_key)})):
            out[by_key[k]] = v[1]
        return out

    def has_children(self, parent: int, ignore_prefix: bytes | None = None) -> bool:
        p_h = self._h(b"p", parent)
        if ignore_prefix is None:
            return self._x(select(dentries.c.ino).where(dentries.c.parent == p_h).limit(1)
                           ).first() is not None
        return any(not n.startswith(ignore_prefix) for _p, n, _i in self._dir_rows(parent))

    def hidden_dentries(self, prefix: bytes) -> list[tuple[int, bytes, int]]:
        """``(parent, name, ino)`` of every entry whose name starts with ``prefix``."""
        return [e for e in self._dentry_rows() if e[1].startswith(prefix)]

    def names_of(self, ino: int) -> list[tuple[int, bytes]]:
        return [(p, n) for p, n, _i in self._dentry_rows(dentries.c.ino == self._h(b"d", ino))]

    def parent_of(self, ino: int) -> int | None:
        i_h = self._h(b"d", ino)
        r = self._x(select(dentries.c.parent, dentries.c.name, dentries.c.ver, dentries.c.v)
                    .where(dentries.c.ino == i_h).limit(1)).first()
        if r is None:
            return None
        return int(self._open("dentries", r.ver, (bytes(r.parent), bytes(r.name), i_h), r.v)[0])

    def paths_of(self, ino: int, limit: int = 3) -> list[str]:
        """Up to ``limit`` paths of an inode (for error messages)."""
        out = []
        for parent, name in self.names_of(ino)[:limit]:
            parts, seen = [name], {ino}
            while parent != ROOT_INO and parent not in seen:
                seen.add(parent)
                up = self.names_of(parent)
                if not up:
                    parts.append(b"?")
                    break
                parent, pname = up[0]
                parts.append(pname)
            out.append("/" + "/".join(p.decode("utf-8", "surrogateescape")
                                      for p in reversed(parts)))
        return out

    def all_dentries(self) -> list[tuple[int, bytes, int]]:
        return list(self._dentry_rows())

    # -- chunk maps: pages of MAP_PAGE consecutive chunk indexes, one row each ------------------
    # a blocks row: (ino, page, SIZED, idx, object, size, idx, object, size, ...) for the stored
    # chunks of the page (see _entries)
    def _pages(self, ino: int, lo: int = 0, hi: int = -1
               ) -> dict[int, dict[int, tuple[str, int | None]]]:
        """``{page: {idx: (object, stored size or None)}}``: the pages of ``ino`` that hold
        chunks of ``lo <= idx < hi`` (a few pages by key; a wide window or ``hi`` < 0: all of
        them, by ``ino``)."""
        first, last = lo // MAP_PAGE, (hi - 1) // MAP_PAGE
        if 0 <= hi <= lo:
            return {}
        fresh = self._fresh.get(ino)
        if fresh is not None:  # inserted by this transaction: its pages are those written
            return {p: dict(e) for p, e in fresh.items() if hi < 0 or first <= p <= last}
        if hi >= 0 and last - first < 32:
            rows = self._opened(blocks, self._x(_GET_MANY["blocks"], {
                "keys": [self._h(b"b", ino, p) for p in range(first, last + 1)]}))
        else:
            rows = self._all(blocks, blocks.c.ino == self._h(b"B", ino))
        return {page: _entries(flat) for _k, (_ino, page, *flat) in rows}

    def _map(self, ino: int) -> dict[int, str]:
        """``{idx: object}``: the whole chunk map of ``ino``."""
        return {i: e[0] for entries in self._pages(ino).values() for i, e in entries.items()}

    def _write_page(self, ino: int, page: int, entries: dict[int, tuple[str, int | None]],
                    existed: bool) -> None:
        k, i_h = self._h(b"b", ino, page), self._h(b"B", ino)
        self._touched.add(ino)
        fresh = self._fresh.get(ino)
        if fresh is not None:
            if entries:
                fresh[page] = dict(entries)
            else:
                fresh.pop(page, None)
        flat = [SIZED, *(x for i in sorted(entries) for x in (i, *entries[i]))]
        if not entries:
            if existed:
                self._x(delete(blocks).where(blocks.c.k == k))
                self._vers.pop(("blocks", k), None)
        elif existed:
            self._replace(blocks, k, ino, page, *flat, extra=(i_h,))
        else:  # (an inode this transaction inserted: no other writer knows its pages)
            self._x(_INSERT["blocks"], {
                "k": k, "ino": i_h, "ver": 1,
                "v": self._seal("blocks", 1, (k, i_h), ino, page, *flat)},
                later=fresh is not None)
            self._remember("blocks", k, 1)

    def _refs(self, names: Iterable[str]) -> dict[str, ChunkRef]:
        by_key = {self._h(b"o", n): n for n in set(names)}
        if not by_key:
            return {}
        return {v[0]: ChunkRef(v[0], v[1], v[2]) for _k, v in self._opened(
            objects, self._x(_GET_MANY["objects"], {"keys": list(by_key)}))}

    def get_blocks(self, ino: int, lo: int, hi: int) -> dict[int, ChunkRef]:
        """Chunk refs of ``ino`` for indexes ``lo <= idx < hi`` (holes are absent)."""
        window = {i: e[0] for entries in self._pages(ino, lo, hi).values()
                  for i, e in entries.items() if lo <= i < hi}
        refs = self._refs(window.values())
        return {i: refs[o] for i, o in sorted(window.items()) if o in refs}

    def set_block(self, ino: int, idx: int, ref: ChunkRef | None, staged: bool) -> str | None:
        """Point chunk ``idx`` at ``ref`` (None: a hole), adjusting reference counts; returns
        the object referenced before, if any."""
        page = idx // MAP_PAGE
        pages = self._pages(ino, idx, idx + 1)
        entries = pages.get(page, {})
        old = entries[idx][0] if idx in entries else None
        if old is not None and ref is not None and old == ref.name:
            return None
        if old is None and ref is None:
            return None
        if old is not None:
            self._addref(old, -1)
            del entries[idx]
        if ref is not None:
            self.reference(ref, staged)
            entries[idx] = (ref.name, ref.size)
        self._write_page(ino, page, entries, page in pages)
        return old

    def _drop_blocks(self, ino: int, drop: Callable[[int], bool], counts: bool = True
                     ) -> list[str]:
        gone = []
        for page, entries in self._pages(ino).items():
            here = [i for i in entries if drop(i)]
            if not here:
                continue
            for i in here:
                gone.append(entries.pop(i)[0])
                if counts:
                    self._addref(gone[-1], -1)
            self._write_page(ino, page, entries, True)
        return gone

    def remove_blocks_from(self, ino: int, first_idx: int) -> list[str]:
        return self._drop_blocks(ino, lambda i: i >= first_idx)

    def remove_blocks_range(self, ino: int, lo: int, hi: int) -> list[str]:
        return self._drop_blocks(ino, lambda i: lo <= i < hi)

    def drop_block(self, ino: int, idx: int) -> None:
        """Remove one chunk map entry without touching reference counts (fsck repairs them)."""
        self._drop_blocks(ino, lambda i: i == idx, counts=False)

    def next_hole(self, ino: int, idx: int) -> int:
        have = self._map(ino)
        while idx in have:
            idx += 1
        return idx

    def next_block(self, ino: int, idx: int) -> int | None:
        return min((i for i in self._map(ino) if i >= idx), default=None)

    def allocated(self, ino: int, chunk_size: int, unit: int) -> int:
        entries = [e for page in self._pages(ino).values() for e in page.values()]
        return _allocated(entries, self._sizes(entries), chunk_size, unit)

    def first_chunks_after(self, parent: int, name: bytes,
                           count: int) -> list[tuple[bytes, ChunkRef]]:
        """The directory's entries, then the inodes and first chunk map pages of the next
        2 * ``count`` after ``name`` and the objects of the regular files' first chunks, a
        round at a time (three queries, whatever the directory's size: the entries before
        ``name`` and past the window are not opened, only their names, whose opening is
        cached)."""
        p_h = self._h(b"p", parent)
        rows = [(n, r) for r in self._x(_DIR, {"parent": p_h}).all()
                if (n := self._name_open(parent, r.name)) > name]
        rows.sort(key=lambda x: x[0])
        out: list[tuple[bytes, ChunkRef]] = []
        while rows and len(out) < count:
            window, rows = rows[:2 * count], rows[2 * count:]
            batch = [(n, self._open("dentries", r.ver, (p_h, bytes(r.name), bytes(r.ino)),
                                    r.v)[1]) for n, r in window]
            inos = {i for _n, i in batch}
            regular: set[int] = set()
            first: dict[int, str] = {}
            for r in self._x(_NODES_FIRST_PAGES, {
                    "ikeys": [self._h(b"i", i) for i in inos],
                    "pkeys": [self._h(b"b", i, 0) for i in inos]}).all():
                k = bytes(r.k)
                if r.t == 0:
                    node = Inode(*self._open("inodes", r.ver, (k,), r.v))
                    if stat.S_ISREG(node.mode):
                        regular.add(node.ino)
                    continue
                ino, _page, *flat = self._open("blocks", r.ver, (k, bytes(r.g)), r.v)
                entry = _entries(flat).get(0)
                if entry is not None:
                    first[ino] = entry[0]
            refs = self._refs(o for i, o in first.items() if i in regular)
            out += [(n, refs[first[i]]) for n, i in batch if first.get(i) in refs]
        return out[:count]

    def all_blocks(self) -> list[tuple[int, int, str]]:
        return [(ino, i, e[0]) for _k, (ino, _page, *flat) in self._all(blocks)
                for i, e in _entries(flat).items()]

    def object_users(self, name: str) -> list[int]:
        return sorted({ino for ino, _i, o in self.all_blocks() if o == name})

    # -- objects and reference counts ------------------------------------------------------------
    # an object row: (name, size, sha256, refcount, state), and for a tombstone (state "gone")
    # the wall-clock time of its deletion in ns: (name, size, sha256, 0, "gone", deleted_ns)
    def _object(self, name: str, lock: bool = False) -> tuple[Any, ...] | None:
        """An object's row; with ``lock`` locked until the commit (FOR UPDATE: waits for
        another machine's uncommitted change of it and reads the result), so that its
        reference count, sealed in the row, is changed by one writer at a time: two machines
        storing the same content share one object row, never a conflict."""
        k = self._h(b"o", name)
        if not lock:
            return self._get(objects, k)
        for _k, vals in self._opened(objects, self._x(_GET_LOCKED["objects"], {"key": k})):
            return vals
        return None

    def _addref(self, name: str, delta: int) -> None:
        got = self._object(name, lock=True)
        if got is not None:
            self._replace(objects, self._h(b"o", name), *got[:3], got[3] + delta, got[4])

    def reference(self, ref: ChunkRef, staged: bool) -> None:
        """Insert the object's row (reference count 1), or if it exists (recorded, or being
        inserted by another machine: the insert waits for its end) count one more reference
        on it, locked. New content is the common case: one statement. A row being collected or
        collected (state "deleting" or "gone", see :meth:`collect_objects`) is taken over: it
        becomes ``ref``'s, in the state given, with one more reference (the caller stored the
        object again: :meth:`claim_object`). Unless this transaction claimed the object while
        it had no row (nothing was locked, and a collection or ``cryptfs gc`` came in between):
        then the object may be gone and the caller did not store it again, and the transaction
        is rolled back as a conflict (:meth:`atomically` runs it again: the claim now fails).
        Such an object's row is inserted with the next statement (no round trip of its own),
        and any row found then, live or not, is that conflict."""
        k = self._h(b"o", ref.name)
        if ref.name in self._claimed_absent:
            # claimed with no row (nothing locked): inserted with the next statement; a row
            # made meanwhile (another machine's, a collection's tombstone) is a unique
            # violation, raised there: the operation runs again, and the claim sees the row
            self._x(_INSERT["objects"], {
                "k": k, "ver": 1, "v": self._seal("objects", 1, (k,), ref.name, ref.size,
                                                  ref.sha256, 1, "staged" if staged else
                                                  "stored")}, later=True)
            self._claimed_absent.discard(ref.name)
            self._remember("objects", k, 1)
            return
        res = self._x(_INSERT_NEW["objects"], {
            "k": k, "ver": 1, "v": self._seal("objects", 1, (k,), ref.name, ref.size,
                                              ref.sha256, 1, "staged" if staged else "stored")})
        if res.first() is not None:
            self._remember("objects", k, 1)
            return
        got = self._object(ref.name, lock=True)
        if got is None:
            raise _Conflict(f"metadata database {self.where}: an object row came and went "
                            "meanwhile (the operation was rolled back)")
        if got[4] in ("deleting", GONE):
            if ref.name in self._claimed_absent:
                raise _Conflict(f"metadata database {self.where}: an object was collected "
                                "while a commit referenced it (the commit was rolled back)")
            self._replace(objects, k, ref.name, ref.size, ref.sha256, max(got[3], 0) + 1,
                          "staged" if staged else "stored")
            return
        self._replace(objects, k, *got[:3], got[3] + 1, got[4])

    def get_object(self, name: str) -> tuple[ChunkRef, int, str] | None:
        """The object's record; None for a tombstone too (see :meth:`collect_objects`)."""
        got = self._object(name)
        if got is None:
            if len(self._seen_absent) >= VERSION_CACHE_ROWS:
                self._seen_absent.clear()
            self._seen_absent.add(name)
        if got is None or got[4] == GONE:
            return None
        return ChunkRef(got[0], got[1], got[2]), got[3], got[4]

    def mark_stored(self, name: str) -> None:
        """A staged object reached the store; a row collected meanwhile (its object deleted
        maybe after this upload) stays as it is: a commit stores it again."""
        got = self._object(name, lock=True)
        if got is not None and got[4] not in ("deleting", GONE):
            self._replace(objects, self._h(b"o", name), *got[:4], "stored")

    def set_refcount(self, name: str, refcount: int) -> None:
        got = self._object(name, lock=True)
        if got is not None and got[4] != GONE:
            self._replace(objects, self._h(b"o", name), *got[:3], refcount, got[4])

    def _objects(self) -> list[tuple[Any, ...]]:
        """The rows of recorded objects (tombstones left out: they record no object)."""
        return [v for _k, v in self._all(objects) if v[4] != GONE]

    # -- packs: a shared vault writes none (docs/FORMAT.md 4.3) -------------------------------
    def journal_chunk(self, ino: int, idx: int, seq: int, off: int, sealed: bytes) -> None:
        raise MetaError(f"inode {ino}: a vault on PostgreSQL keeps no journal (its fsync "
                        "commits whole chunks)")

    def journaled(self) -> list[tuple[int, int, int, int, bytes]]:
        return []

    def record_pack(self, ref: ChunkRef) -> None:
        raise MetaError(f"pack {ref.name}: a vault on PostgreSQL stores no packs")

    def pack_members(self, pack: str) -> list[ChunkRef]:
        return []

    def empty_packs(self, packs: Collection[str]) -> list[ChunkRef]:
        return []

    def move_to_pack(self, ref: ChunkRef) -> None:
        self.record_pack(ref)

    def packs_in_use(self) -> set[str]:
        return set()

    def objects_named(self, *prefixes: str) -> list[ChunkRef]:
        """Recorded objects whose name starts with one of ``prefixes`` (names are sealed:
        every row is read, once for all of them)."""
        return [ChunkRef(v[0], v[1], v[2]) for v in self._objects() if v[0].startswith(prefixes)]

    def all_objects(self) -> list[tuple[ChunkRef, int, str]]:
        return [(ChunkRef(v[0], v[1], v[2]), v[3], v[4]) for v in self._objects()]

    def objects_in_state(self, st: str) -> list[ChunkRef]:
        return [ChunkRef(v[0], v[1], v[2]) for v in self._objects() if v[4] == st]

    def unreferenced_objects(self) -> list[ChunkRef]:
        """Objects no chunk map references, stored or being collected (a collection that
        did not finish: see :meth:`collect_objects`)."""
        return [ChunkRef(v[0], v[1], v[2]) for v in self._objects() if _collectable(v)]

    def object_states(self) -> dict[str, tuple[int, str, int]]:
        """``{name: (refcount, state, size)}`` of every recorded object."""
        return {v[0]: (v[3], v[4], v[1]) for v in self._objects()}

    def stored_bytes(self) -> int:
        return sum(v[1] for v in self._objects())

    def _forget(self, name: str) -> None:
        """Drop an object's row and its copies' (as the SQLite engine's trigger does)."""
        self._x(delete(objects).where(objects.c.k == self._h(b"o", name)))
        self._x(delete(copies).where(copies.c.obj == self._h(b"C", name)))

    def drop_object_if_unreferenced(self, name: str) -> bool:
        """Drop an unreferenced object's row (locked first: a commit referencing it meanwhile
        is waited for, and then the reference it made is seen and the row stays)."""
        got = self._object(name, lock=True)
        if got is None or got[3] > 0 or got[4] == GONE:
            return False
        self._forget(name)
        return True

    def claim_object(self, name: str, new: bool = False) -> bool:
        """See :meth:`MetaEngine.claim_object` (:meth:`claim_objects` of one)."""
        return not self.claim_objects({name: new})

    def claim_objects(self, names: Mapping[str, bool]) -> set[str]:
        """See :meth:`MetaEngine.claim_objects`: the rows are locked until the commit (one
        statement, in key order); a row being collected or collected (state "deleting" or
        "gone") is not live (its object may be gone). A new object with no row cannot be
        locked: :meth:`reference` checks it again (a row collected meanwhile rolls the
        commit back as a conflict)."""
        if not names:
            return set()
        seen = {n for n, new in names.items() if new and n in self._seen_absent}
        self._seen_absent -= seen
        self._claimed_absent |= seen
        by_k = {self._h(b"o", n): n for n in names if n not in seen}
        if not by_k:
            return set()
        rows = {k: v for k, v in self._opened(objects, self._x(_CLAIM, {"keys": list(by_k)}))}
        lost = set()
        for k, name in by_k.items():
            got = rows.get(k)
            if got is None and names[name]:
                self._claimed_absent.add(name)
            elif got is None or got[4] in ("deleting", GONE):
                lost.add(name)
        return lost

    def collect_objects(self, refs: list[ChunkRef],
                        delete: Callable[[list[ChunkRef]], set[str]]) -> list[ChunkRef]:
        """See :meth:`MetaEngine.collect_objects`. Other machines commit meanwhile, so: first
        the rows still unreferenced are marked "deleting" (one committed transaction: a crash
        after a store deletion below leaves marked rows, never a row that a commit would take
        for a stored object; a later collection finishes them); then, in a second
        transaction, each marked row still unreferenced and marked is locked, their objects
        deleted from the store (``delete``, all at once) *while the rows are locked*, and
        each row whose object went turned into a tombstone (state "gone", with the time of
        the deletion; its copies' rows go).
        A commit referencing the object (:meth:`claim_object`, :meth:`reference`) locks the
        row too: before, its reference is seen and the row stays; during, it waits; after,
        it finds the row gone (or marked) and the object deleted for good, and stores the
        object again itself. That holds for a commit of a write that stored the object itself
        before the deletion, without any record then (the tombstone tells it: see
        :meth:`drop_tombstones` for how long one stays). Rows are locked in name order."""
        refs = sorted(refs, key=lambda r: r.name)

        def mark() -> list[ChunkRef]:
            marked = []
            for ref in refs:
                got = self._object(ref.name, lock=True)
                if got is None or got[3] > 0 or got[4] not in ("stored", "deleting"):
                    continue
                if got[4] != "deleting":
                    self._replace(objects, self._h(b"o", ref.name), *got[:4], "deleting")
                marked.append(ChunkRef(got[0], got[1], got[2]))
            return marked

        def drop(marked: list[ChunkRef]) -> list[ChunkRef]:
            locked = []
            for ref in marked:
                got = self._object(ref.name, lock=True)
                if got is None or got[3] > 0 or got[4] != "deleting":
                    continue  # taken over by a commit meanwhile
                locked.append((ref, got))
            done = delete([ref for ref, _got in locked]) if locked else set()
            gone = []
            for ref, got in locked:
                if ref.name in done:
                    self._bury(got)
                    gone.append(ref)
            return gone

        marked = self.atomically(mark)
        return self.atomically(lambda: drop(marked)) if marked else []

    def _bury(self, got: tuple[Any, ...]) -> None:
        """Turn the (locked) row ``got`` into a tombstone deleted now; its copies go."""
        self._replace(objects, self._h(b"o", got[0]), *got[:3], 0, GONE, time.time_ns())
        self._x(delete(copies).where(copies.c.obj == self._h(b"C", got[0])))

    def bury_object(self, name: str, size: int) -> bool:
        """See :meth:`MetaEngine.bury_object`: a tombstone row is inserted (or a tombstone's
        time renewed); False if a live row exists."""
        k = self._h(b"o", name)
        got = self._object(name, lock=True)
        if got is None:
            res = self._x(pg_insert(objects).values(
                k=k, ver=1, v=self._seal("objects", 1, (k,), name, size, b"\0" * 32, 0, GONE,
                                         time.time_ns())
            ).on_conflict_do_nothing().returning(objects.c.k))
            if res.first() is not None:
                self._remember("objects", k, 1)
                return True
            got = self._object(name, lock=True)  # another machine's insert came first
        if got is None or got[4] != GONE:
            return False
        self._bury(got)
        return True

    def drop_tombstones(self) -> int:
        """See :meth:`MetaEngine.drop_tombstones`: a tombstone goes once it is older than the
        oldest deletion horizon of the live sessions (this engine's included), less
        TOMBSTONE_MARGIN; all go when no session is live. A live session's writes not committed
        yet all started after its horizon, so after the deletion: their objects are in the
        store. Commits."""

        def run() -> int:
            hs = self.session_horizons(own=True)
            limit = int((min(hs) - TOMBSTONE_MARGIN) * 1e9) if hs else None
            n = 0
            for v in [v for _k, v in self._all(objects) if v[4] == GONE]:
                if limit is not None and len(v) > 5 and v[5] >= limit:
                    continue
                got = self._object(v[0], lock=True)
                if got is not None and got[4] == GONE:
                    self._forget(v[0])
                    n += 1
            return n

        return self.atomically(run)

    def forget_object(self, name: str) -> None:
        self._forget(name)

    def forget_deleted_object(self, name: str) -> None:
        """Drop the record of an object a restored ledger says was deleted: any object but a
        chunk that is still referenced."""
        got = self._object(name)
        if got is not None and (got[3] <= 0 or not name.startswith("data/")):
            self._forget(name)

    def unreference_object(self, ref: ChunkRef) -> None:
        """Record ``ref`` as stored and unreferenced (a deletion that failed)."""
        self.reference(ref, staged=False)
        self.set_refcount(ref.name, 0)

    # -- copies on the stores of a replicated vault ----------------------------------------------
    # a copy row: (object, store, state)
    def record_copy(self, name: str, store: str, st: str) -> bool:
        k = self._h(b"c", name, store)
        got = self._get(copies, k)
        if got is not None and got[2] == st:
            return False
        o_h = self._h(b"C", name)
        if got is None:
            self._x(insert(copies).values(
                k=k, obj=o_h, ver=1, v=self._seal("copies", 1, (k, o_h), name, store, st)))
            self._remember("copies", k, 1)
        else:
            self._replace(copies, k, name, store, st, extra=(o_h,))
        return True

    def copies_of(self, name: str) -> dict[str, str]:
        return {v[1]: v[2] for _k, v in self._all(copies, copies.c.obj == self._h(b"C", name))}

    def _copies(self) -> list[tuple[bytes, tuple[Any, ...]]]:
        return list(self._all(copies))

    def all_copies(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for _k, (n, st, s) in self._copies():
            out.setdefault(n, {})[st] = s
        return out

    def pending_copies(self, limit: int = 1000) -> list[tuple[ChunkRef, str]]:
        want = [(n, st) for _k, (n, st, s) in self._copies() if s == "pending"]
        refs = self._refs(n for n, _st in want)
        return [(refs[n], st) for n, st in want if n in refs][:limit]

    def pending_deletes(self) -> list[tuple[str, str]]:
        return [(n, st) for _k, (n, st, s) in self._copies() if s == "delete"]

    def forget_copy(self, name: str, store: str) -> None:
        self._x(delete(copies).where(copies.c.k == self._h(b"c", name, store)))

    def pending_copy_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _k, (_n, st, s) in self._copies():
            if s != "ok":
                out[st] = out.get(st, 0) + 1
        return out

    def forget_store_copies(self, store: str) -> None:
        self._drop_copies([k for k, (_n, st, _s) in self._copies() if st == store])

    def forget_stray_copies(self) -> None:
        """Drop copy records of objects the metadata does not know (never committed)."""
        known = {v[0] for v in self._objects()}
        self._drop_copies([k for k, (n, _st, s) in self._copies()
                           if s != "delete" and n not in known])

    def _drop_copies(self, keys: list[bytes]) -> None:
        if keys:
            self._x(delete(copies).where(copies.c.k.in_(keys)))

    # -- xattrs ----------------------------------------------------------------------------------
    # an xattr row: (ino, name, value)
    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        got = self._get(xattrs, self._h(b"x", ino, name))
        return None if got is None else got[2]

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        k, i_h = self._h(b"x", ino, name), self._h(b"X", ino)
        self._touched.add(ino)
        if not self._replace(xattrs, k, ino, name, value, extra=(i_h,)):
            self._x(insert(xattrs).values(
                k=k, ino=i_h, ver=1, v=self._seal("xattrs", 1, (k, i_h), ino, name, value)))
            self._remember("xattrs", k, 1)

    def list_xattrs(self, ino: int) -> list[bytes]:
        return sorted(v[1] for _k, v in self._all(xattrs, xattrs.c.ino == self._h(b"X", ino)))

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        self._touched.add(ino)
        res = self._x(delete(xattrs).where(xattrs.c.k == self._h(b"x", ino, name)))
        return bool(res.rowcount)

    def inodes_with_xattrs(self) -> set[int]:
        return {v[0] for _k, v in self._all(xattrs)}

    # -- the ledger's rows -----------------------------------------------------------------------
    def _ledger(self, q: Any) -> list[LedgerRow]:
        out = []
        for seq, v in self._x(q).all():
            row = self._open("ledger", 0, (seq.to_bytes(8, "big"),), v)
            out.append(row)  # type: ignore[arg-type]
        return out

    def ledger_last(self) -> LedgerRow | None:
        """The newest row. In an operation whose commit :meth:`atomically` runs again on a
        conflict, the row this engine last read or wrote here, without a query: the append
        after it (:meth:`ledger_insert`) checks in the database that it is still the newest
        (see _INSERT_LEDGER_AFTER: one round trip fewer per append)."""
        tail = self._tail
        if tail is not None and self._commits_retried and \
                time.monotonic() >= self._trust_tail_at:
            return tail[0]
        self._tail = None
        for seq, v in self._x(_LEDGER_LAST).all():
            row: LedgerRow = self._open("ledger", 0, (seq.to_bytes(8, "big"),), v)  # type: ignore[assignment]
            self._tail = (row, bytes(v))
            return row
        return None

    def ledger_get(self, seq: int) -> LedgerRow | None:
        rows = self._ledger(select(ledger).where(ledger.c.seq == seq))
        return rows[0] if rows else None

    def ledger_last_named(self, op: str, prefix: str) -> LedgerRow | None:
        """The newest row with operation ``op`` whose object name starts with ``prefix``
        (rows opened newest first, a page at a time)."""
        before = None
        while True:
            q = select(ledger).order_by(ledger.c.seq.desc()).limit(1000)
            if before is not None:
                q = q.where(ledger.c.seq < before)
            rows = self._ledger(q)
            if not rows:
                return None
            for r in rows:
                if r[2] == op and r[3].startswith(prefix):
                    return r
            before = rows[-1][0]

    def ledger_page(self, after: int, limit: int) -> list[LedgerRow]:
        return self._ledger(select(ledger).where(ledger.c.seq > after)
                            .order_by(ledger.c.seq).limit(limit))

    def ledger_newest(self, n: int) -> list[LedgerRow]:
        return self._ledger(select(ledger).order_by(ledger.c.seq.desc()).limit(n))

    def ledger_count(self) -> int:
        return int(self._x(select(func.count()).select_from(ledger)).scalar() or 0)

    def ledger_insert(self, rows: list[LedgerRow]) -> None:
        if not rows:
            return
        params = [{"seq": r[0], "v": crypto.seal(self.keys.row, _pack(*r),
                                                 _ad("ledger", 0, r[0].to_bytes(8, "big")))}
                  for r in rows]
        tail, self._tail = self._tail, None
        if len(rows) > 1:
            self._x(_INSERT_LEDGER, params)
            return
        if tail is not None and self._commits_retried and rows[0][0] == tail[0][0] + 1:
            # after the head ledger_last gave without a query: checked there (a conflict if
            # it moved), sent with the next statement
            self._x(_INSERT_LEDGER_AFTER, {**params[0], "prev": tail[0][0],
                                           "prev_v": tail[1]}, later=True)
        else:  # (after lock_ledger and the head read in its transaction: no other writer's
            # row can take its place, see Ledger.append)
            self._x(_INSERT_LEDGER, params[0], later=self._ledger_locked)
        self._tail = (rows[0], params[0]["v"])

    def ledger_truncate_after(self, seq: int) -> None:
        self._tail = None
        self._x(delete(ledger).where(ledger.c.seq > seq))


def _first_line(e: object) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class PgFrozen:
    """A committed state of the metadata (:meth:`PgMetaStore.freeze`,
    :class:`cryptfs.meta.engine.Frozen`): a REPEATABLE READ, READ ONLY transaction on a
    connection of its own, read by one thread while the engine is used by others; the rows
    are read and opened here (none of the engine's caches is touched). A database error is
    a one-line MetaError (the connection is dropped), a row that fails to open an
    IntegrityError."""

    def __init__(self, owner: PgMetaStore, conn: Connection, ledger_seq: int) -> None:
        self._owner = owner
        self._conn: Connection | None = conn
        self._keys = owner.keys
        self._where = owner.where
        self._siv = AESSIV(owner.keys.name)
        self.ledger_seq = ledger_seq
        self._objs: list[tuple[Any, ...]] | None = None  # the object rows, once read

    def _read(self, q: Any) -> list[Any]:
        if self._conn is None:
            raise MetaError(f"metadata database {self._where}: the frozen state was let go")
        try:
            return self._conn.execute(q).all()
        except DBAPIError as e:
            conn, self._conn = self._conn, None
            self._owner._give_back(conn, keep=False)
            raise MetaError(f"metadata database {self._where}: {_first_line(e.orig)}"
                            ) from None

    def _rows(self, t: Table) -> Iterator[tuple[Any, ...]]:
        """The opened content of every row of the single-key table ``t``."""
        for r in self._read(select(*_cols(t))):
            key = (bytes(r.k), *(bytes(x) for x in r[3:]))
            yield _open_row(self._keys, self._where, t.name, r.ver, key, r.v)

    def _objects(self) -> list[tuple[Any, ...]]:
        """The rows of recorded objects (tombstones left out), read once."""
        if self._objs is None:
            self._objs = [v for v in self._rows(objects) if v[4] != GONE]
        return self._objs

    def staged(self) -> list[ChunkRef]:
        return [ChunkRef(v[0], v[1], v[2]) for v in self._objects() if v[4] == "staged"]

    def unreferenced_objects(self) -> list[ChunkRef]:
        return [ChunkRef(v[0], v[1], v[2]) for v in self._objects() if _collectable(v)]

    def objects_named(self, *prefixes: str) -> list[ChunkRef]:
        return [ChunkRef(v[0], v[1], v[2]) for v in self._objects() if v[0].startswith(prefixes)]

    def image(self, leave_out: Callable[[ChunkRef], bool] | None = None) -> bytes:
        """This state as one SQLite image (what a checkpoint stores), built in an in-memory
        SQLite engine: a vault can always be opened from the store onto SQLite. A row that
        fails to open fails the image (IntegrityError).

        Only objects that are in the store: rows being collected ("deleting") are left out,
        and so is each staged object (an upload, maybe another machine's, not finished) for
        which ``leave_out(ref)`` says so, with the chunk map entries naming it (in the image
        those chunks are holes, until a later image names them)."""
        from cryptfs.meta.sqlite import MetaStore  # the image format is the SQLite engine's

        out = MetaStore(":memory:")
        try:
            with out.transaction():
                for vals in self._rows(inodes):
                    out.insert_inode(Inode(*vals))
                for r in self._read(select(dentries.c.parent, dentries.c.name, dentries.c.ino,
                                           dentries.c.ver, dentries.c.v)):
                    p_h, n_s, i_h = bytes(r.parent), bytes(r.name), bytes(r.ino)
                    parent, ino = _open_row(self._keys, self._where, "dentries", r.ver,
                                            (p_h, n_s, i_h), r.v)
                    out.add_dentry(parent, _open_name(self._siv, self._where, parent, n_s), ino)
                objs = [v for v in self._objects() if v[4] != "deleting" and not (
                    v[4] == "staged" and leave_out is not None
                    and leave_out(ChunkRef(v[0], v[1], v[2])))]
                by_name = {}
                for v in objs:
                    by_name[v[0]] = ref = ChunkRef(v[0], v[1], v[2])
                    out.reference(ref, staged=v[4] == "staged")
                for ino, _page, *flat in self._rows(blocks):
                    for idx, (obj, _size) in _entries(flat).items():
                        if obj in by_name:  # (a chunk map naming no object: fsck's to repair)
                            out.set_block(ino, idx, by_name[obj], staged=False)
                for v in objs:
                    out.set_refcount(v[0], v[3])
                for ino, xname, value in self._rows(xattrs):
                    out.set_xattr(ino, xname, value)
                for name, store, st in self._rows(copies):
                    out.record_copy(name, store, st)
                for key, value in self._rows(state):
                    out.set_state(key, value)
                after = 0
                while rows := self._read(select(ledger).where(ledger.c.seq > after)
                                         .order_by(ledger.c.seq).limit(5000)):
                    page = [_open_row(self._keys, self._where, "ledger", 0,
                                      (seq.to_bytes(8, "big"),), v) for seq, v in rows]
                    out.ledger_insert(page)  # type: ignore[arg-type]
                    after = page[-1][0]
            return out.image()
        finally:
            out.close()

    def close(self) -> None:
        """End the transaction; the connection is kept for the engine's next state."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.rollback()
        except SQLAlchemyError:  # (a connection lost meanwhile: not kept)
            self._owner._give_back(conn, keep=False)
            return
        self._owner._give_back(conn, keep=True)


class PgSession:
    """A mounted machine's session in the database, on a connection of its own (the
    heartbeat must not wait for the filesystem): :meth:`start` inserts it live for ``ttl``
    seconds by the database's clock, :meth:`beat` extends it (False once it expired: a
    session never comes back, the machine is fenced), :meth:`elect` takes the vault's
    checkpoint lock if nobody holds it (a session-level advisory lock: a dead machine's
    connection drops and frees it), :meth:`end` removes the session with its holds and locks.

    What the database learns from a session: that a machine is mounted and when it beats
    (its host, pid and machine id are sealed in ``v``)."""

    def __init__(self, url: str, keys: DbKeys, ttl: float) -> None:
        self.keys = keys
        self.ttl = ttl
        self.id = crypto.random_bytes(16)
        self.k = _hash(keys, b"S", self.id)
        self.elected = False
        self.engine = pg_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        self.where = self.engine.url.render_as_string(hide_password=True)
        self.conn: Connection | None = None
        self._lock = threading.Lock()
        self._ident: tuple[Any, ...] = ()
        self.purpose = "mount"

    def _c(self) -> Connection:
        if self.conn is None:
            self.conn = self.engine.connect()
            self.elected = False  # a new connection holds no advisory lock
        return self.conn

    def _run(self, stmt: Any) -> Any:
        """One statement in its own transaction; a failure drops the connection (the next
        call makes a new one) and raises a one-line MetaError. Thread-safe (the heartbeat
        and the checkpoint writer's :meth:`elect` share the connection)."""
        with self._lock:
            try:
                return self._c().execute(stmt)
            except DBAPIError as e:
                self._drop()
                raise MetaError(f"metadata database {self.where}: {_first_line(e.orig)}"
                                ) from None

    def _drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None
        self.elected = False

    def _expiry(self) -> Any:
        return func.clock_timestamp() + func.make_interval(0, 0, 0, 0, 0, 0, self.ttl)

    def _who(self, horizon: float) -> bytes:
        """The sealed ``v``: host, pid, machine id, start, the deletion horizon (ns) and the
        purpose ("mount", or "repair": ``cryptfs fsck --repair``)."""
        return crypto.seal(self.keys.row, _pack(*self._ident, int(horizon * 1e9),
                                                self.purpose),
                           _ad("sessions", 0, self.k))

    def start(self, purpose: str = "mount") -> None:
        """Insert the session, live for ``ttl`` seconds; ``purpose`` is sealed in it (see
        :meth:`PgMetaStore.session_purposes`)."""
        self.purpose = purpose
        self._ident = (socket.gethostname(), os.getpid(), machine_id(), time.time_ns())
        self._run(insert(sessions).values(k=self.k, expires=self._expiry(),
                                          v=self._who(time.time())))

    def beat(self, horizon: float | None = None) -> bool:
        """Extend the session, publishing ``horizon`` (this machine's
        ``ChunkStore.horizon``: every object it wrote before that is recorded); False if
        it expired (or was cleaned up) meanwhile. MetaError if the database cannot be
        reached (the session may still be live)."""
        values: dict[str, Any] = {"expires": self._expiry()}
        if horizon is not None:
            values["v"] = self._who(horizon)
        res = self._run(update(sessions).where(
            sessions.c.k == self.k, sessions.c.expires > func.clock_timestamp()
        ).values(**values))
        return bool(res.rowcount == 1)

    def elect(self) -> bool:
        """Hold the vault's checkpoint lock if nobody else does; whether this session holds
        it, asked of the database each time (a connection lost and made again, as when the
        server restarts, holds no lock any more: another machine may hold it now). False
        when the database cannot be reached."""
        try:
            self.elected = bool(self._run(
                select(func.pg_try_advisory_lock(checkpoint_lock(self.keys)))).scalar())
        except MetaError:
            self.elected = False
        return self.elected

    def end(self) -> None:
        """Remove the session with its holds and file locks (a clean unmount), release the
        checkpoint lock."""
        with contextlib.suppress(MetaError):
            self._run(delete(holds).where(holds.c.sess == self.k))
            if self._run(delete(locks).where(locks.c.sess == self.k)).rowcount:
                self._run(select(func.pg_notify(lock_channel(self.keys), "")))
            self._run(delete(sessions).where(sessions.c.k == self.k))
        self._drop()
        self.engine.dispose()


class PgLocks:
    """The file locks of one machine's session (see :mod:`cryptfs.meta.locks`), in the
    ``locks`` table, on a connection of its own (a lock call must not wait for file
    operations, nor they for it). Thread-safe: calls are serialised here.

    Setting a lock is one transaction: this session must be live by the database's clock (a
    fenced machine gets no lock), the inode's locks are serialised by a transaction-level
    advisory lock on its hashed key, the locks of live sessions are read and opened, checked
    for a conflict here, and this owner's row replaced. A row that fails to open (tampered
    with) is skipped with a warning: the operator can delete rows anyway (deny service)."""

    def __init__(self, url: URL | str, keys: DbKeys, session_id: bytes) -> None:
        self.keys = keys
        self.session_id = session_id
        self.sess = _hash(keys, b"S", session_id)
        self.engine = pg_engine(url, poolclass=NullPool, isolation_level="READ COMMITTED")
        self.where = self.engine.url.render_as_string(hide_password=True)
        self.conn: Connection | None = None
        self._mutex = threading.Lock()

    def close(self) -> None:
        with self._mutex:
            self._drop()
        self.engine.dispose()

    def _drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    def _in_transaction(self, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)`` in one transaction; a database error drops the connection and raises
        LocksUnavailable, but on a connection made before this call (it may have gone with a
        server restarted since) ``fn`` is run once more on a new one (a lock or unlock set
        twice is set once)."""
        with self._mutex:
            while True:
                fresh = self.conn is None
                try:
                    if self.conn is None:
                        self.conn = self.engine.connect()
                    with self.conn.begin():
                        return fn(self.conn)
                except DBAPIError as e:
                    self._drop()
                    if not fresh:
                        continue
                    raise LocksUnavailable(f"metadata database {self.where}: file locks: "
                                           f"{_first_line(e.orig)}") from None

    def _key(self, ino: int, owner: int, kind: str) -> bytes:
        return _hash(self.keys, b"l", self.session_id, owner, kind, ino)

    def _rows(self, conn: Connection, ino: int, kind: str
              ) -> Iterator[tuple[bytes, int, list[Held]]]:
        """``(row key, owner, locks)`` of every lock of ``kind`` on ``ino`` held by a live
        session (this one included)."""
        i_h = _hash(self.keys, b"K", ino)
        for r in conn.execute(
                select(locks.c.k, locks.c.sess, locks.c.v)
                .join(sessions, sessions.c.k == locks.c.sess)
                .where(locks.c.ino == i_h, sessions.c.expires > func.clock_timestamp())).all():
            k = bytes(r.k)
            try:
                vals = _unpack(crypto.open_sealed(self.keys.row, bytes(r.v),
                                                  _ad("locks", 0, k, i_h, bytes(r.sess))))
            except IntegrityError:
                vals = ()
            if len(vals) < 3 or vals[0] not in (POSIX, FLOCK) or vals[1] != ino \
                    or (len(vals) - 3) % 4:
                log.warning("metadata database %s: a file lock row fails authentication "
                            "(tampered with); it is skipped", self.where)
                continue
            if vals[0] != kind:
                continue
            yield k, int(vals[2]), [Held(*vals[i:i + 4]) for i in range(3, len(vals), 4)]

    def set(self, ino: int, owner: int, kind: str, ltype: int, start: int, end: int,
            pid: int) -> Held | None:
        """See :meth:`MetaEngine.set_lock`."""
        mine = self._key(ino, owner, kind)

        def run(conn: Connection) -> Held | None:
            i_h = _hash(self.keys, b"K", ino)
            # (one round trip: the session row key-share locked, so a machine reaping it
            # waits for this commit, then the inode's advisory lock)
            live = conn.execute(
                select(sessions.c.k, func.pg_advisory_xact_lock(
                    int.from_bytes(i_h[:8], "big", signed=True)))
                .where(sessions.c.k == self.sess, sessions.c.expires > func.clock_timestamp())
                .with_for_update(read=True, key_share=True, of=sessions)).first()
            if live is None:
                raise LocksUnavailable(f"metadata database {self.where}: this machine's "
                                       "session expired: no file lock is set")
            own: list[Held] = []
            others: list[Held] = []
            for k, _owner, held in self._rows(conn, ino, kind):
                (own if k == mine else others).extend(held)
            hit = conflict(others, ltype, start, end)
            if hit is not None:
                return hit
            after = apply(own, ltype, start, end, pid)
            if after == own:
                return None  # (an unlock of what it does not hold, a lock it holds)
            if ltype != F_WRLCK and own:  # (something may be free now: waiters try again)
                conn.execute(select(func.pg_notify(lock_channel(self.keys), "")))
            if not after:
                conn.execute(delete(locks).where(locks.c.k == mine))
                return None
            v = crypto.seal(self.keys.row, _pack(kind, ino, owner, *[
                x for h in after for x in (h.ltype, h.start, h.end, h.pid)]),
                _ad("locks", 0, mine, i_h, self.sess))
            conn.execute(pg_insert(locks).values(k=mine, ino=i_h, sess=self.sess, v=v)
                         .on_conflict_do_update(index_elements=[locks.c.k], set_={"v": v}))
            return None

        return self._in_transaction(run)

    def test(self, ino: int, owner: int, kind: str, ltype: int, start: int,
             end: int) -> Held | None:
        """See :meth:`MetaEngine.test_lock`."""
        mine = self._key(ino, owner, kind)

        def run(conn: Connection) -> Held | None:
            others = [h for k, _o, held in self._rows(conn, ino, kind) if k != mine
                      for h in held]
            return conflict(others, ltype, start, end)

        return self._in_transaction(run)


class PgWatcher:
    """Hears the change notices other mounts' commits send (LISTEN on the vault's channel)
    and calls ``on_change`` with the inodes they changed (None: anything may have changed —
    a notice listing too many, or a connection lost and made again, during which notices
    were missed). Notices of ``sender`` (this mount's own engine) are skipped. With
    ``on_unlock`` it also hears the file locks released (:func:`lock_channel`). A thread of
    its own, until :meth:`stop`."""

    def __init__(self, url: str, keys: DbKeys, sender: bytes,
                 on_change: Callable[[set[int] | None], None],
                 on_unlock: Callable[[], None] | None = None) -> None:
        """``on_unlock()``: a machine (this one too) released a file lock (see
        :func:`lock_channel`)."""
        self.keys = keys
        self.sender = sender
        self.on_change = on_change
        self.on_unlock = on_unlock
        self.engine = pg_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        self._stop = threading.Event()
        self.listening = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pg-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.engine.dispose()

    def _run(self) -> None:
        lost = False  # said so once per outage: a database down for a while is one line
        while not self._stop.is_set():
            try:
                with self.engine.connect() as conn:
                    if self.on_unlock is not None:
                        conn.execute(text(f'LISTEN "{lock_channel(self.keys)}"'))
                    # (last: pg_stat_activity shows the change notices' channel, tests read it)
                    conn.execute(text(f'LISTEN "{channel(self.keys)}"'))
                    self.listening.set()
                    if lost:
                        log.info("change notices from other mounts: listening again")
                        lost = False
                    self.on_change(None)  # anything changed before this could be missed
                    raw = conn.connection.driver_connection
                    while not self._stop.is_set():
                        for n in raw.notifies(timeout=0.5):  # type: ignore[union-attr]
                            if n.channel == lock_channel(self.keys):
                                if self.on_unlock is not None:
                                    self.on_unlock()
                            else:
                                self._heard(n.payload)
            except Exception as e:  # noqa: BLE001 - a lost connection: listen again
                self.listening.clear()
                if not lost:
                    log.warning("change notices from other mounts: %s (listening again "
                                "once the database can be reached)", _first_line(e))
                    lost = True
                self._stop.wait(1.0)

    def _heard(self, payload: str) -> None:
        try:
            sender, inos = open_notice(self.keys, payload)
        except IntegrityError:
            log.warning("a change notice that fails authentication was ignored")
            return
        if sender != self.sender:
            self.on_change(inos or None)

