"""The PostgreSQL engine against its database operator: what a dump shows, what tampering gives.

The contract every engine shares is test_35's; this is what only PostgreSQL promises: the
database holds no file name and no plaintext (a ``pg_dump`` scan), a row edited, swapped, moved
to another directory or given another version fails to open (IntegrityError, errno EIO) and
never reads as wrong data, a database of another vault or schema version is refused in one line,
and an update that another writer overtook is a conflict, not a lost update. Fork consistency:
a machine's ledger that verified a head refuses (once said, for good) a database whose ledger
does not extend it — truncated, rolled back, edited, or showing it another history — and
checks a newer head by reading only the entries added since.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from mount_fixtures import VaultEnv, _mounted, _tmp_root, force_unmount
from pg_fixtures import PgPlace
from sqlalchemy import event

from cryptfs.errors import ConfigError, IntegrityError, MetaError
from cryptfs.format import crypto
from cryptfs.format.codec import ChunkRef
from cryptfs.meta import ROOT_INO, Inode, postgres
from cryptfs.meta.ledger import Ledger
from cryptfs.meta.postgres import (
    MAP_PAGE,
    SCHEMA_VERSION,
    SIZED,
    DbKeys,
    PgMetaStore,
    _ad,
    _hash,
    _open_row,
)

pytestmark = pytest.mark.timeout(60)

KEYS = DbKeys.derive(b"\1" * 32, b"vault-id-0000001")
DIR, REG, LNK = 0o40755, 0o100644, 0o120777
T = TypeVar("T")


def node(ino: int, mode: int, size: int = 0, target: bytes | None = None) -> Inode:
    return Inode(ino, mode, 1000, 1000, size, 2 if mode == DIR else 1, 11, 22, 33, 0, target)


@pytest.fixture
def engine(pg_place: PgPlace) -> Iterator[PgMetaStore]:
    e = PgMetaStore(pg_place.url, KEYS)
    try:
        with e.transaction():
            e.insert_inode(node(ROOT_INO, DIR))
        yield e
    finally:
        e.close()


def tree(e: PgMetaStore) -> dict[str, int]:
    """Two directories, two files with chunks and xattrs, a symlink."""
    with e.transaction():
        a = e.insert_inode(node(0, DIR))
        b = e.insert_inode(node(0, DIR))
        e.add_dentry(ROOT_INO, b"dir-a", a)
        e.add_dentry(ROOT_INO, b"dir-b", b)
        f = e.insert_inode(node(0, REG, size=123456789))
        g = e.insert_inode(node(0, REG, size=5))
        e.add_dentry(a, b"secret-report-4711.txt", f)
        e.add_dentry(b, b"other-file", g)
        s = e.insert_inode(node(0, LNK, target=b"MARKER-symlink-target"))
        e.add_dentry(a, b"link", s)
        e.set_xattr(f, b"user.MARKER-xattr-name", b"MARKER-xattr-value")
        e.set_xattr(g, b"user.note", b"g-note")
        e.set_block(f, 0, ChunkRef("data/aa/" + "a" * 60, 4096, b"\2" * 32), staged=False)
        e.set_block(g, 0, ChunkRef("data/bb/" + "b" * 60, 5, b"\3" * 32), staged=True)
    e.set_state("MARKER-state-key", "MARKER-state-value")
    Ledger(e, b"k" * 32).append("put", "meta/MARKER-ledger", 1, b"\4" * 32)
    return {"a": a, "b": b, "f": f, "g": g, "s": s}


def test_a_dump_of_the_database_shows_no_name_and_no_plaintext(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    t = tree(engine)
    assert engine.lookup(t["a"], b"secret-report-4711.txt") == t["f"]  # it is there
    dump = pg_place.server.pg_dump(pg_place.db, pg_place.schema)
    assert b"COPY " in dump and b"\\x" in dump  # rows dumped, bytea as hex
    low = dump.lower()
    for secret in (b"secret-report-4711", b"dir-a", b"other-file", b"MARKER", b"g-note",
                   b"a" * 60, b"b" * 60, b"123456789"):
        assert secret.lower() not in low, secret
        assert secret.hex().encode() not in low, secret  # nor inside a bytea


def _tamper(place: PgPlace, stmt: str) -> None:
    place.sql(stmt)


def test_an_edited_row_fails_to_open(engine: PgMetaStore, pg_place: PgPlace) -> None:
    t = tree(engine)
    k = engine._h(b"i", t["f"]).hex()
    # flip one byte of the sealed attributes (the last one: the tag)
    _tamper(pg_place, "UPDATE inodes SET v = "
                      "set_byte(v, length(v) - 1, get_byte(v, length(v) - 1) # 255) "
                      f"WHERE k = '\\x{k}'")
    with pytest.raises(IntegrityError) as e:
        engine.get_inode(t["f"])
    assert e.value.errno == errno.EIO and "\n" not in str(e.value)
    assert engine.get_inode(t["g"]) == node(t["g"], REG, size=5)  # the others still open
    # a listing that needs it fails whole; it is never answered with other data
    with pytest.raises(IntegrityError):
        engine.list_dir(t["a"])
    # a block that meets it is rolled back, and the engine is usable after it
    with pytest.raises(IntegrityError), engine.transaction():
        engine.set_xattr(t["g"], b"user.x", b"1")
        engine.update_inode(engine.get_inode(t["f"]))  # type: ignore[arg-type]
    assert engine.get_xattr(t["g"], b"user.x") is None
    with pytest.raises(IntegrityError):  # no checkpoint image is made of it either
        engine.image()
    engine.set_state("after", "1")  # and the engine writes again (the image's snapshot ended)
    assert engine.get_state("after") == "1"


def test_swapped_payloads_fail_to_open(engine: PgMetaStore, pg_place: PgPlace) -> None:
    t = tree(engine)
    f, g = engine._h(b"i", t["f"]).hex(), engine._h(b"i", t["g"]).hex()
    # swap two inodes' sealed attributes, two files' xattr rows and chunk maps
    _tamper(pg_place, f"UPDATE inodes SET v = CASE k WHEN '\\x{f}' THEN "
                      f"(SELECT v FROM inodes WHERE k = '\\x{g}') ELSE "
                      f"(SELECT v FROM inodes WHERE k = '\\x{f}') END "
                      f"WHERE k IN ('\\x{f}', '\\x{g}')")
    for ino in (t["f"], t["g"]):
        with pytest.raises(IntegrityError):
            engine.get_inode(ino)
    xf, xg = engine._h(b"X", t["f"]).hex(), engine._h(b"X", t["g"]).hex()
    _tamper(pg_place, f"UPDATE xattrs SET ino = CASE ino WHEN '\\x{xf}' THEN '\\x{xg}'::bytea "
                      f"ELSE '\\x{xf}'::bytea END")
    with pytest.raises(IntegrityError):
        engine.list_xattrs(t["f"])
    bf, bg = engine._h(b"b", t["f"], 0).hex(), engine._h(b"b", t["g"], 0).hex()
    _tamper(pg_place, f"UPDATE blocks SET v = CASE k WHEN '\\x{bf}' THEN "
                      f"(SELECT v FROM blocks WHERE k = '\\x{bg}') ELSE "
                      f"(SELECT v FROM blocks WHERE k = '\\x{bf}') END")
    with pytest.raises(IntegrityError):
        engine.get_blocks(t["g"], 0, 10)
    # a row given another version (as a replay of an older one would be) does not open
    _tamper(pg_place, "UPDATE state SET ver = ver + 1")
    with pytest.raises(IntegrityError):
        engine.get_state("MARKER-state-key")


def test_an_entry_moved_to_another_directory_is_not_found_there(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    t = tree(engine)
    pa, pb = engine._h(b"p", t["a"]).hex(), engine._h(b"p", t["b"]).hex()
    n = engine._name_siv(t["a"], b"secret-report-4711.txt").hex()
    _tamper(pg_place, f"UPDATE dentries SET parent = '\\x{pb}' WHERE parent = '\\x{pa}' "
                      f"AND name = '\\x{n}'")
    assert engine.lookup(t["b"], b"secret-report-4711.txt") is None  # not under b
    assert engine.lookup(t["a"], b"secret-report-4711.txt") is None  # and gone from a
    with pytest.raises(IntegrityError):  # b's listing meets a row that does not open
        engine.list_dir(t["b"])
    assert [x[0] for x in engine.list_dir(t["a"])] == [b"link"]


# -- fork consistency: the ledger against the head a machine verified ---------------------------
LEDGER_KEY = b"k" * 32


def appended(e: PgMetaStore, n: int, tag: str) -> None:
    """``n`` entries appended by a machine (its own Ledger on the engine)."""
    led = Ledger(e, LEDGER_KEY)
    for i in range(n):
        led.append("put", f"data/{tag}-{i}", 10 + i, bytes([i]) * 32)


def verifier(e: PgMetaStore) -> tuple[Ledger, list[str]]:
    """A machine's ledger that verified the database's chain as it is now, and what its
    ``on_fork`` hears."""
    heard: list[str] = []
    led = Ledger(e, LEDGER_KEY, on_fork=heard.append)
    n, problems = led.verify_chain()
    assert not problems and n == led.head().seq  # type: ignore[union-attr]
    led.trust(led.head(), "checkpoints/0000000000000001")
    return led, heard


def assert_forked(led: Ledger, heard: list[str], *needles: str) -> None:
    with pytest.raises(IntegrityError) as e:
        led.check()
    msg = str(e.value)
    assert e.value.errno == errno.EIO and "\n" not in msg and all(n in msg for n in needles), msg
    assert heard == [msg]  # said once ...
    with pytest.raises(IntegrityError):  # ... and for good: no head, no append on that chain
        led.append("put", "data/after-the-fork", 1, b"\0" * 32)
    with pytest.raises(IntegrityError):
        led.check()
    assert len(heard) == 1


def test_a_ledger_extended_by_other_machines_is_verified_reading_only_the_new_entries(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    """The cheap check: a head read from the database is checked by reading only the entries
    between the one verified and it (not the whole chain; none when it is the next entry); an
    own append extends it without reading."""
    appended(engine, 40, "early")
    led, heard = verifier(engine)
    pages: list[int] = []
    real = engine.ledger_page

    def counted(after: int, limit: int) -> list:  # type: ignore[type-arg]
        rows = real(after, limit)
        pages.append(len(rows))
        return rows

    engine.ledger_page = counted  # type: ignore[method-assign]
    appended(engine, 3, "other")  # another machine
    assert led.check().seq == 43 and led.verified.seq == 43  # type: ignore[union-attr]
    assert sum(pages) == 2  # entries 41 and 42 (43 is the head read)
    appended(engine, 1, "checkpoint-like")
    Ledger(engine, LEDGER_KEY).append("put", "checkpoints/0000000000000045", 5, b"\5" * 32)
    pages.clear()
    assert led.check().seq == 45 and led.checkpoint == "checkpoints/0000000000000045"
    own = led.append("put", "data/own", 1, b"\6" * 32)
    assert led.verified == own and sum(pages) == 1 and heard == []
    assert led.check() == own  # nothing new: no page read
    appended(engine, 1, "next")
    assert led.check().seq == 47  # type: ignore[union-attr]
    assert sum(pages) == 1 and heard == []  # the next entry alone: no page read


def test_a_truncated_or_rolled_back_ledger_is_a_fork(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    appended(engine, 8, "a")
    led, heard = verifier(engine)
    pg_place.sql("DELETE FROM ledger WHERE seq > 5")  # truncated (or an older dump restored)
    assert_forked(led, heard, "ends at sequence 5", "verified sequence 8", "rolled back")


def test_two_machines_shown_different_histories_find_out(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    """A database that shows a machine a history other than the one it verified: the same
    length with another last entry, or a longer one that does not go through its head."""
    appended(engine, 6, "common")
    same_length, heard1 = verifier(engine)
    longer, heard2 = verifier(engine)
    pg_place.sql("DELETE FROM ledger WHERE seq > 4")  # the operator forks after entry 4 ...
    appended(engine, 2, "fork")  # ... and another machine writes on that branch
    assert_forked(same_length, heard1, "differs at sequence 6")
    appended(engine, 3, "fork-more")
    assert_forked(longer, heard2, "broken at sequence 7")


def test_an_edited_or_replayed_ledger_row_is_a_fork(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    appended(engine, 5, "a")
    led, heard = verifier(engine)
    appended(engine, 3, "b")
    # entry 7's sealed row given entry 3's payload: it does not open at 7 (the seal binds seq)
    pg_place.sql("UPDATE ledger SET v = (SELECT v FROM ledger WHERE seq = 3) WHERE seq = 7")
    assert_forked(led, heard, "fails authentication")


def test_another_vaults_database_or_version_is_refused(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    with pytest.raises(ConfigError, match="belongs to another vault") as e:
        PgMetaStore(pg_place.url, DbKeys.derive(b"\2" * 32, b"vault-id-0000001"))
    assert "\n" not in str(e.value)
    pg_place.sql("UPDATE cryptfs_schema SET version = 99")
    with pytest.raises(ConfigError, match="schema version 99"):
        PgMetaStore(pg_place.url, KEYS)


@pytest.mark.parametrize("old", [1, 2])
def test_an_older_database_is_stamped_the_current_version_and_its_marker_resealed(
    engine: PgMetaStore, pg_place: PgPlace, old: int
) -> None:
    """Schema version 2 (tombstones, the locks table) and 3 (chunk map pages with sizes): a
    version 1 or 2 database (its marker sealed for that version, as such a cryptfs wrote it)
    opens and is stamped 3, with a marker that opens only as version 3, so that an older
    cryptfs (which reads a tombstone as a stored object, or a sized page wrongly) refuses it;
    a version stamp edited back is a tampered marker."""
    sealed = crypto.seal(KEYS.row, b"cryptfs postgresql metadata",
                         _ad("cryptfs_schema", old, b"1"))
    engine.close()
    pg_place.sql(f"UPDATE cryptfs_schema SET version = {old}, v = '\\x{sealed.hex()}'::bytea")
    assert pg_place.sql("SELECT version FROM cryptfs_schema") == [(old,)]
    PgMetaStore(pg_place.url, KEYS).close()
    (version, marker), = pg_place.sql("SELECT version, v FROM cryptfs_schema")
    assert version == SCHEMA_VERSION == 3
    crypto.open_sealed(KEYS.row, bytes(marker), _ad("cryptfs_schema", 3, b"1"))
    with pytest.raises(IntegrityError):
        crypto.open_sealed(KEYS.row, bytes(marker), _ad("cryptfs_schema", old, b"1"))
    pg_place.sql(f"UPDATE cryptfs_schema SET version = {old}")
    with pytest.raises(ConfigError, match="tampered"):
        PgMetaStore(pg_place.url, KEYS)


def test_an_overtaken_update_is_a_conflict_not_a_lost_update(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    other = PgMetaStore(pg_place.url, KEYS)
    try:
        ino = engine.get_inode(ROOT_INO)
        assert ino is not None and other.get_inode(ROOT_INO) == ino
        with other.transaction():
            other.update_inode(Inode(**{**vars(ino), "mtime_ns": 1000}))
        with pytest.raises(MetaError, match="changed by another writer"), engine.transaction():
            engine.update_inode(Inode(**{**vars(ino), "mtime_ns": 2000}))
        assert engine.get_inode(ROOT_INO).mtime_ns == 1000  # type: ignore[union-attr]
        with engine.transaction():  # having read it again, the update goes through
            engine.update_inode(Inode(**{**vars(ino), "mtime_ns": 3000}))
        assert other.get_inode(ROOT_INO).mtime_ns == 3000  # type: ignore[union-attr]
    finally:
        other.close()


def test_a_deadlock_ends_one_block_with_a_clear_meta_error(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    """Two writers locking two rows in opposite orders: PostgreSQL picks one to fail; its block
    is rolled back with a one-line MetaError that says so, the other commits."""
    with engine.transaction():
        x, y = engine.insert_inode(node(0, REG)), engine.insert_inode(node(0, REG))
    other = PgMetaStore(pg_place.url, KEYS)
    errors: list[BaseException] = []
    first_locked = threading.Barrier(2, timeout=20)

    def writer(e: PgMetaStore, a: int, b: int) -> None:
        try:
            with e.transaction():
                e.update_inode(node(a, REG, size=a))
                first_locked.wait()
                e.update_inode(node(b, REG, size=a))
        except MetaError as err:
            errors.append(err)

    try:
        ts = [threading.Thread(target=writer, args=(engine, x, y)),
              threading.Thread(target=writer, args=(other, y, x))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert len(errors) == 1, errors
        assert "conflicted with another writer" in str(errors[0]) and "\n" not in str(errors[0])
        sizes = {engine.get_inode(i).size for i in (x, y)}  # type: ignore[union-attr]
        assert sizes in ({x}, {y})  # the winner's two updates, none of the loser's
    finally:
        other.close()


def test_a_restarted_server_fails_an_operation_with_eio_then_the_engine_resumes(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    engine.set_state("before", "1")
    engine.freeze().close()  # its reader connection is kept for the next checkpoint
    pg_place.server.halt()
    try:
        with pytest.raises(MetaError) as e:
            engine.get_state("before")
        assert e.value.errno == errno.EIO and "\n" not in str(e.value)
        with pytest.raises(MetaError) as e:
            engine.freeze()
        assert e.value.errno == errno.EIO and "\n" not in str(e.value)
    finally:
        pg_place.server.start()
    assert engine.get_state("before") == "1"  # a new connection, the committed rows
    engine.set_state("after", "2")
    assert engine.get_state("after") == "2"
    engine.freeze().close()
    pg_place.server.halt()  # the kept reader connection is lost...
    pg_place.server.start()
    frozen = engine.freeze()  # ...and replaced
    try:
        assert frozen.image()[:16] == b"SQLite format 3\0"
    finally:
        frozen.close()


def test_hot_operations_take_few_round_trips(engine: PgMetaStore, pg_place: PgPlace) -> None:
    """What a small file's life costs in round trips: its create two (inode numbers come 64
    at a time; the directory read before is not read again: the inode, the name and the
    directory's update, conditional on the version this engine wrote, are one statement,
    sent with the BEGIN; the session check, the change notice and the COMMIT go together),
    its create, hold and first flush five in one transaction (the statements whose results
    are not needed go with the next one), its close one (no session check: only its own hold
    goes, in a transaction of its own whose commit waits for no WAL flush; the commits after
    it wait again), a directory's stat three for all its files. Another machine's
    change of the directory in between is a conflict the create runs again after, on its
    result; a name that exists is EEXIST with nothing of the create left."""
    trips: list[list[str]] = []
    event.listen(engine.engine, "before_cursor_execute",
                 lambda _c, _cur, stmt, *_a: trips.append([stmt.split()[0].upper()]))
    round_trip = engine._round_trip  # (the hot statements go to libpq directly)

    def counted(pgconn: Any, stmts: list[tuple[bytes, Any, Any]], want: int = -1) -> Any:
        sql = {name: q for q, name in engine._prep_names.items()}
        trips.append([(sql[n] if f is not None else n.decode()).split()[0].upper()
                      for n, _v, f in stmts])
        return round_trip(pgconn, stmts, want)

    engine._round_trip = counted  # type: ignore[method-assign]
    sid = os.urandom(16)
    pg_place.sql("INSERT INTO sessions (k, expires, v) VALUES "
                 f"('\\x{_hash(KEYS, b'S', sid).hex()}', now() + interval '1 hour', '\\x00')")
    engine.attach(sid)
    d = engine.mknod(ROOT_INO, b"d", node(0, DIR)).ino
    engine.mknod(d, b"first", node(0, REG))

    def round_trips(fn: Callable[..., T], *args: object) -> tuple[T, list[list[str]]]:
        trips.clear()
        out = fn(*args)
        return out, list(trips)

    made, rts = round_trips(engine.mknod, d, b"f", node(0, REG))
    assert rts == [["BEGIN", "WITH"], ["SELECT", "COMMIT"]]  # inode + name + dir; session +
    count = pg_place.sql("SELECT count(*) FROM inodes")    # notice + commit
    with pytest.raises(FileExistsError):
        engine.mknod(d, b"f", node(0, REG))
    assert pg_place.sql("SELECT count(*) FROM inodes") == count
    f = made.ino
    engine.hold(f)
    engine.commit()
    assert engine.held(f)
    engine.commit()  # (ends the read's transaction: a close comes after its flush's commit)
    _, rts = round_trips(engine.drop_unlinked, f, True)
    assert rts == [["BEGIN", "SET", "WITH", "COMMIT"]]  # a transaction of its own
    assert pg_place.sql("SELECT count(*) FROM holds") == [(0,)]  # committed: seen by all
    assert not engine.held(f) and engine.get_inode(f) is not None  # named still: kept
    # a reader's open: the hold, the inode as committed, the fence and the commit at once;
    # its close: the transaction its reads left open ends in the same round trip
    engine.commit()
    opened, rts = round_trips(engine.open_inode, f)
    assert rts == [["BEGIN", "INSERT", "SELECT", "SELECT", "COMMIT"]]
    assert opened == engine.get_inode(f) and engine.held(f)
    engine.commit()
    assert engine.get_blocks(f, 0, 8) == {}  # (reads: a transaction left open)
    _, rts = round_trips(engine.drop_unlinked, f, True)
    assert rts == [["ROLLBACK", "BEGIN", "SET", "WITH", "COMMIT"]]
    assert pg_place.sql("SELECT count(*) FROM holds") == [(0,)]
    engine.commit()
    show = engine._driver().execute("SHOW synchronous_commit").fetchone()
    assert show == ("on",)  # (SET LOCAL: the next commits wait for the flush again)
    engine._driver().rollback()
    listing, rts = round_trips(engine.stat_dir, d, 4096, 4096)
    assert len(rts) <= 3 and sorted(n for n, _i, _a in listing) == [b"f", b"first"]

    # a small file's create, hold and first flush (its chunk, its size, a ledger entry), in
    # a directory this engine made (as a create after the first in a directory)
    ref = ChunkRef("ab" * 32, 4200, bytes(32))
    d2 = engine.mknod(d, b"d2", node(0, DIR)).ino

    def small_file(name: bytes = b"small", lookup: bool = False) -> int:
        new = engine.mknod(d2, name, node(0, REG), commit=False).ino
        engine.hold(new)
        if lookup:  # (the chunk store's, before it stores a chunk: none recorded)
            assert engine.get_object(ref.name) is None

        def flush() -> None:
            assert not engine.claim_objects({ref.name: True})
            engine.set_block(new, 0, ref, staged=False)
            n = engine.get_inode(new)
            assert n is not None
            n.size = 4096
            engine.update_inode(n)
            engine.lock_ledger()
            last = engine.ledger_last()
            seq = last[0] + 1 if last else 1
            engine.ledger_insert([(seq, 1, "put", ref.name, ref.size, ref.sha256,
                                   bytes(32), bytes(32))])

        engine.atomically(flush)
        return new

    small, rts = round_trips(small_file)
    assert rts == [["BEGIN", "WITH"], ["INSERT", "SAVEPOINT", "SELECT"],  # hold; claim
                   ["INSERT", "INSERT", "UPDATE", "SELECT", "SELECT"],  # ledger: lock, head
                   ["INSERT", "SELECT", "COMMIT"]]
    assert engine.held(small) and engine.get_inode(small).size == 4096  # type: ignore[union-attr]
    assert engine.get_blocks(small, 0, 1) == {0: ref} and engine.ledger_last()[3] == ref.name
    # the next one as a mount makes it: its chunk looked up (not found: stored), its flush
    # one round trip (the claim is that lookup's answer, the append after the head this
    # engine wrote: both checked by the statements that depend on them)
    ref = ChunkRef("cd" * 32, 4200, bytes(32))
    engine.commit()
    small, rts = round_trips(small_file, b"small2", True)
    assert rts == [["BEGIN", "WITH"], ["INSERT", "SELECT"],
                   ["SAVEPOINT", "INSERT", "INSERT", "UPDATE", "SELECT", "WITH", "SELECT",
                    "COMMIT"]]
    assert engine.get_blocks(small, 0, 1) == {0: ref} and engine.ledger_last()[3] == ref.name
    assert [r[0] for r in engine.ledger_page(0, 10)] == [1, 2]
    other = PgMetaStore(pg_place.url, KEYS)
    try:
        other.setattr(d, 0o700)
        made = engine.mknod(d, b"g", node(0, REG))
        assert made.inodes[d].mode & 0o777 == 0o700  # run again on the other's change
        assert sorted(n for n, _i, _m in other.list_dir(d)) == [b"d2", b"f", b"first", b"g"]
    finally:
        other.close()


def test_an_append_after_a_head_that_moved_runs_again(
    engine: PgMetaStore, pg_place: PgPlace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operation's append after the ledger head this engine last read or wrote (not read
    again) is checked by the database: another machine's append in between, or that head
    edited, is a conflict, and the operation runs again after reading the head; the chain has
    no gap nor fork, and a small file's create before its flush stays. An edited head then
    fails to open: nothing is appended after it."""
    monkeypatch.setattr(postgres, "HEAD_TRUST_PAUSE", 0.0)
    retries: list[int] = []
    monkeypatch.setattr(postgres, "_backoff", retries.append)
    other = PgMetaStore(pg_place.url, KEYS)
    mine, theirs = Ledger(engine, LEDGER_KEY), Ledger(other, LEDGER_KEY)

    def append(led: Ledger, name: str) -> None:
        led.meta.atomically(lambda: led.append("put", name, 1, bytes(32)))

    try:
        append(mine, "data/a1")
        append(mine, "data/a2")  # (after the head it wrote)
        append(theirs, "data/b3")
        assert retries == []
        append(mine, "data/a4")  # after a2: b3 is in its place; run again after b3
        assert retries == [0]
        d = engine.mknod(ROOT_INO, b"d", node(0, DIR)).ino
        append(theirs, "data/b5")  # (the same for the other after b3)
        assert retries == [0, 0]
        f = engine.mknod(d, b"f", node(0, REG), commit=False).ino  # a create, then its flush

        def flush() -> None:
            engine.set_block(f, 0, ChunkRef("ef" * 32, 9, bytes(32)), staged=False)
            mine.append("put", "data/a6", 1, bytes(32))

        engine.atomically(flush)  # after a4: b5 is in its place; again from the savepoint
        entries = list(mine.entries())
        assert [e.name for e in entries] == [f"data/{x}" for x in
                                             ("a1", "a2", "b3", "a4", "b5", "a6")]
        assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
        assert all(e.prev == p.hash for p, e in zip(entries, entries[1:], strict=False))
        assert engine.get_blocks(f, 0, 1)[0].name == "ef" * 32  # the create stayed
        assert [n for n, _i, _m in other.list_dir(d)] == [b"f"]
        assert retries == [0, 0, 0]  # a4, b5 and a6: each ran again once
        # its head edited (a byte of the sealed row flipped): the append conflicts, the head
        # read again fails authentication
        pg_place.sql("UPDATE ledger SET v = set_byte(v, 0, get_byte(v, 0) # 1) WHERE seq = 6")
        with pytest.raises(IntegrityError):
            append(mine, "data/a7")
        assert retries == [0, 0, 0, 0]
        assert pg_place.sql("SELECT max(seq) FROM ledger") == [(6,)]
    finally:
        other.close()


def test_statements_deallocated_by_someone_are_prepared_again(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    """The hot statements are prepared once per connection; if something deallocates them (a
    DEALLOCATE ALL, as a connection pooler's reset does), the call that finds one gone fails
    with a one-line MetaError and the next prepares it again: a lookup, and a close's unhold
    (its own unflushed transaction)."""
    sid = os.urandom(16)
    pg_place.sql("INSERT INTO sessions (k, expires, v) VALUES "
                 f"('\\x{_hash(KEYS, b'S', sid).hex()}', now() + interval '1 hour', '\\x00')")
    engine.attach(sid)
    f = engine.mknod(ROOT_INO, b"f", node(0, REG)).ino
    for call in (lambda: engine.lookup(ROOT_INO, b"f"), lambda: engine.drop_unlinked(f, True)):
        engine.hold(f)
        engine.commit()
        call()  # prepared
        engine._driver().execute("DEALLOCATE ALL")
        engine._driver().commit()
        with pytest.raises(MetaError) as e:
            call()
        assert "\n" not in str(e.value)
        call()  # prepared again
    assert engine.lookup(ROOT_INO, b"f") == f and not engine.held(f)


def test_chunk_maps_are_stored_in_pages(engine: PgMetaStore, pg_place: PgPlace) -> None:
    """One row per MAP_PAGE chunk indexes (the database sees a file's size to that many
    chunks); windows, holes and removals that cross page boundaries."""
    assert MAP_PAGE == 64
    f = engine.insert_inode(node(0, REG))
    refs = {i: ChunkRef(f"data/pg/{i:062d}", 100 + i, bytes([i % 256]) * 32)
            for i in (0, 1, 62, 63, 64, 65, 130, 200)}
    with engine.transaction():
        for i, r in refs.items():
            engine.set_block(f, i, r, staged=False)
    assert pg_place.sql("SELECT count(*) FROM blocks") == [(4,)]  # pages 0, 1, 2, 3
    assert engine.get_blocks(f, 63, 66) == {i: refs[i] for i in (63, 64, 65)}
    assert engine.get_blocks(f, 0, 1 << 40) == refs  # a wide window: every page
    assert engine.next_hole(f, 62) == 66 and engine.next_block(f, 66) == 130
    with engine.transaction():
        assert sorted(engine.remove_blocks_range(f, 63, 131)) == sorted(
            refs[i].name for i in (63, 64, 65, 130))
    assert pg_place.sql("SELECT count(*) FROM blocks") == [(2,)]  # emptied pages are gone
    assert engine.next_hole(f, 62) == 63 and engine.next_block(f, 63) == 200
    with engine.transaction():
        engine.drop_block(f, 200)
        assert engine.set_block(f, 1, None, staged=False) == refs[1].name
    assert engine.all_blocks() == [(f, 0, refs[0].name), (f, 62, refs[62].name)]
    assert engine.get_object(refs[200].name)[1] == 1  # type: ignore[index]  # left to fsck


def _page(place: PgPlace, ino: int, page: int) -> tuple[int, tuple[object, ...]]:
    """The version and the opened values of a chunk map page's row."""
    k = _hash(KEYS, b"b", ino, page)
    (ver, v, g), = place.sql(f"SELECT ver, v, ino FROM blocks WHERE k = '\\x{k.hex()}'")
    return ver, _open_row(KEYS, "test", "blocks", ver, (k, bytes(g)), bytes(v))


def test_pages_hold_stored_sizes_and_pages_written_before_them_are_read(
    engine: PgMetaStore, pg_place: PgPlace
) -> None:
    """Schema version 3: a chunk map page holds each chunk's stored size, so that a stat
    (st_blocks) reads no object row; a page written by schema version 2 (idx, object pairs)
    is read as before (the sizes from the object rows) and written with sizes when it
    changes, its old entries' sizes left unknown."""
    d = engine.mknod(ROOT_INO, b"d", node(0, DIR)).ino
    f = engine.mknod(d, b"f", node(0, REG, 3 * 4096)).ino
    g = engine.mknod(d, b"g", node(0, REG, 4096)).ino
    a, b, c = (ChunkRef(f"data/pg/{i:062d}", 5000 + i, bytes(32)) for i in range(3))
    with engine.transaction():
        engine.set_block(f, 0, a, staged=False)
        engine.set_block(f, 2, b, staged=False)
        engine.set_block(g, 0, c, staged=False)
    assert _page(pg_place, f, 0)[1] == (f, 0, SIZED, 0, a.name, a.size, 2, b.name, b.size)
    expect = {b"f": 2 * 8192, b"g": 8192}  # (5000-odd bytes in 4 KiB units)
    # a version 2 page of g: its sizes come from its object row
    k, i_h = _hash(KEYS, b"b", g, 0), _hash(KEYS, b"B", g)
    ver, _vals = _page(pg_place, g, 0)
    old = crypto.seal(KEYS.row, b"".join(
        [b"i" + v.to_bytes(9, "big") for v in (g, 0, 0)]
        + [b"s" + len(c.name).to_bytes(4, "big") + c.name.encode()]), _ad("blocks", ver, k, i_h))
    pg_place.sql(f"UPDATE blocks SET v = '\\x{old.hex()}' WHERE k = '\\x{k.hex()}'")
    assert _page(pg_place, g, 0)[1] == (g, 0, 0, c.name)

    queries: list[str] = []
    round_trip = engine._round_trip  # (how many statements a stat takes)

    def counted(pgconn: Any, stmts: list[tuple[bytes, Any, Any]], want: int = -1) -> Any:
        queries.extend(n.decode() for n, _v, f in stmts if f is not None)  # (not BEGIN)
        return round_trip(pgconn, stmts, want)

    engine._round_trip = counted  # type: ignore[method-assign]
    engine.commit()
    got = {n: alloc for n, _i, alloc in engine.stat_dir(d, 65536, 4096)}
    assert got == expect and len(queries) == 3  # entries, inodes and pages, g's object
    assert engine.allocated(g, 65536, 4096) == 8192 and engine.get_blocks(g, 0, 1) == {0: c}
    queries.clear()
    engine.commit()
    assert engine.lookup_stat(d, b"f", 65536, 4096)[1] == expect[b"f"]  # type: ignore[index]
    assert len(queries) == 2  # (no object row: the page has the sizes)
    engine._round_trip = round_trip  # type: ignore[method-assign]
    with engine.transaction():
        engine.set_block(g, 1, a, staged=False)  # rewritten: sized, c's size still unknown
    assert _page(pg_place, g, 0)[1] == (g, 0, SIZED, 0, c.name, None, 1, a.name, a.size)
    assert engine.allocated(g, 65536, 4096) == 2 * 8192
    assert engine.all_blocks() == sorted([(f, 0, a.name), (f, 2, b.name), (g, 0, c.name),
                                          (g, 1, a.name)])


def test_an_unreachable_database_or_a_bad_url_is_one_line_without_the_password() -> None:
    with pytest.raises(ConfigError, match="cannot be reached") as e:
        PgMetaStore("postgresql+psycopg://nobody:pw-SECRET@/x?host=/nonexistent-dir", KEYS)
    assert "\n" not in str(e.value) and "SECRET" not in e.value.line()
    with pytest.raises(ConfigError, match="not usable") as e:
        PgMetaStore("postgresql+psycopg://nobody:pw-SECRET@host:notaport/x", KEYS)
    assert "SECRET" not in e.value.line()


def test_keys_are_the_vaults_own() -> None:
    """Each purpose its own key, all derived from the master key and vault id."""
    a = DbKeys.derive(b"\1" * 32, b"vault-id-0000001")
    assert a == KEYS and len(a.name) == 64
    assert len({a.row, a.name[:32], a.name[32:], a.index}) == 4
    assert DbKeys.derive(b"\1" * 32, b"vault-id-0000002") != a
    assert a.row != crypto.subkey(b"\1" * 32, b"vault-id-0000001", crypto.PURPOSE_META)


@pytest.mark.timeout(180)  # mounts, a checkpoint and a restore: minutes on a loaded machine
def test_a_vault_with_its_metadata_in_postgresql_mounts_and_opens_from_the_store_alone(
    pg_place: PgPlace,
) -> None:
    """``cryptfs init --meta URL``: no local database, the files survive a remount, verify,
    fsck and gc work on it, the database holds none of their names, and with the database
    lost the vault opens from the store alone onto SQLite (a checkpoint is the SQLite image of
    the database)."""
    root = _tmp_root()
    env = VaultEnv(root, f"file://{root}/store")
    mnt = root / "mnt"
    try:
        env.init("--meta", pg_place.url)
        env.mount(mnt)
        try:
            (mnt / "secret-dir").mkdir()
            (mnt / "secret-dir" / "secret-name.txt").write_bytes(b"payload" * 20000)
            os.symlink("secret-target", mnt / "lnk")
        finally:
            env.umount(mnt)
        assert not env.db.exists()
        env.mount(mnt)
        try:
            assert (mnt / "secret-dir" / "secret-name.txt").read_bytes() == b"payload" * 20000
            assert os.readlink(mnt / "lnk") == "secret-target"
        finally:
            env.umount(mnt)
        for cmd in ("verify", "fsck", "gc"):  # the admin commands on it
            env.cli(cmd)
        dump = pg_place.server.pg_dump(pg_place.db, pg_place.schema).lower()
        assert b"copy " in dump and b"secret" not in dump and b"secret".hex().encode() not in dump
        lost = VaultEnv(root / "elsewhere", env.store_url)  # another machine, no database
        lost.init()
        lost.mount(root / "mnt2")
        try:
            assert (root / "mnt2" / "secret-dir" / "secret-name.txt").read_bytes() == \
                b"payload" * 20000
        finally:
            lost.umount(root / "mnt2")
    finally:
        for mp in (mnt, root / "mnt2"):
            if _mounted(str(mp)):
                force_unmount(str(mp))
        subprocess.run(["rm", "-rf", str(root)], check=False)
