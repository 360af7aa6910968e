"""Metadata engine conformance: the contract of :class:`cryptfs.meta.MetaEngine`, for every engine.

In the spirit of JuiceFS's ``testMeta`` (pkg/meta/base_test.go): one suite, run unchanged against
each engine in ``ENGINES`` (today SQLite files). A second engine is one more entry there: how to
open it on an empty directory, a second connection that sees only committed writes, and how to
open an engine on a database image (the vault's restore of a snapshot). The methods are used as
cryptfs's own callers use them (fs/, vault/, admin/fsck.py, admin/verify.py, meta/ledger.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import multiprocessing
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from pg_fixtures import PgServer

from cryptfs.errors import ConfigError, MetaError
from cryptfs.format import crypto
from cryptfs.format.codec import ChunkRef
from cryptfs.meta import ROOT_INO, Changed, Inode, MetaEngine
from cryptfs.meta.ledger import GENESIS, Entry, Ledger, entry_hash
from cryptfs.meta.namespace import (
    HIDDEN,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
)
from cryptfs.meta.postgres import DbKeys, PgMetaStore
from cryptfs.meta.sqlite import MetaStore

pytestmark = pytest.mark.timeout(60)

DIR, REG, LNK = 0o40755, 0o100644, 0o120777


@dataclass(frozen=True)
class EngineKind:
    """How the suite makes and inspects one kind of engine."""

    open: Callable[[Path], MetaEngine]  # a new engine on an empty directory (again: reopen)
    observer: Callable[[MetaEngine, Path], MetaEngine]  # another connection: committed rows
    from_image: Callable[[bytes, Path], MetaEngine]  # an engine on an image() (a restore)
    # a directory to open an engine on whose database lives on a small real filesystem
    small_disk: Callable[[Path], contextlib.AbstractContextManager[Path]]


def _sqlite_from_image(image: bytes, d: Path) -> MetaEngine:
    p = d / "restored.db"  # as cryptfs.vault.restore.restore_from_store opens it
    p.write_bytes(image)
    return MetaStore(p)


@contextlib.contextmanager
def _tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB filesystem (tmpfs) for the engine's files, unmounted however it ends."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(d)],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


SQLITE = EngineKind(
    open=lambda d: MetaStore(d / "m.db"),
    observer=lambda _e, d: MetaStore(d / "m.db"),
    from_image=_sqlite_from_image,
    small_disk=_tmpfs,
)
PG_KEYS = DbKeys.derive(b"m" * 32, b"v" * 16)


def _pg_kind(server: PgServer, made: list[str]) -> EngineKind:
    """PostgreSQL on the session's real server: a directory names a schema of the shared
    database (made on first open, dropped after the test); an image restores onto SQLite, as a
    vault whose database is lost is opened from the store."""
    shared = server.shared_database()

    def db(d: Path) -> str:
        return "t" + hashlib.sha256(str(d).encode()).hexdigest()[:20]

    def open_(d: Path) -> MetaEngine:
        if d in small:
            return PgMetaStore(server.url(db(d)), PG_KEYS)
        if db(d) not in made:
            server.admin(f"CREATE SCHEMA IF NOT EXISTS {db(d)}", shared)
            made.append(db(d))
        return PgMetaStore(server.url(shared, db(d)), PG_KEYS)

    small: set[Path] = set()

    @contextlib.contextmanager
    def small_disk(tmp_path: Path) -> Iterator[Path]:
        # the tables (not the catalog) on a 1 MiB tmpfs: a tablespace as their default
        with server.small_tablespace("1M") as (d, ts):
            server.create_database(db(d))
            small.add(d)
            try:
                server.admin(f"ALTER DATABASE {db(d)} SET default_tablespace = {ts}")
                yield d
            finally:
                server.drop_database(db(d))

    return EngineKind(open=open_, observer=lambda _e, d: open_(d),
                      from_image=_sqlite_from_image, small_disk=small_disk)


ENGINES = ["postgresql", "sqlite"]


@pytest.fixture(params=ENGINES)
def kind(request: pytest.FixtureRequest) -> Iterator[EngineKind]:
    if request.param == "sqlite":
        yield SQLITE
        return
    server: PgServer = request.getfixturevalue("pg_server")
    made: list[str] = []
    try:
        yield _pg_kind(server, made)
    finally:
        for name in made:
            server.drop_schema(server.shared_database(), name)


@pytest.fixture
def engine(kind: EngineKind, tmp_path: Path) -> Iterator[MetaEngine]:
    e = kind.open(tmp_path)
    try:
        with e.transaction():
            e.insert_inode(inode(ROOT_INO, DIR, nlink=2))
        yield e
    finally:
        e.close()


@pytest.fixture
def observer(kind: EngineKind, engine: MetaEngine, tmp_path: Path) -> Iterator[MetaEngine]:
    o = kind.observer(engine, tmp_path)
    try:
        yield o
    finally:
        o.close()


def inode(ino: int = 0, mode: int = REG, *, size: int = 0, nlink: int = 1,
          target: bytes | None = None) -> Inode:
    return Inode(ino, mode, 1000, 1000, size, nlink, 11, 22, 33, 0, target)


def ref(tag: str, size: int = 100) -> ChunkRef:
    return ChunkRef(f"data/{tag[:2]}/{tag}", size, crypto.sha256(tag.encode()))


def refcount(e: MetaEngine, name: str) -> int | None:
    found = e.get_object(name)
    return None if found is None else found[1]


def new_file(e: MetaEngine, parent: int, name: bytes, mode: int = REG) -> int:
    with e.transaction():
        ino = e.insert_inode(inode(0, mode, nlink=2 if mode == DIR else 1))
        e.add_dentry(parent, name, ino)
    return ino


# -- inodes -------------------------------------------------------------------------------------
def test_inode_insert_get_update_delete(engine: MetaEngine) -> None:
    with engine.transaction():
        a = engine.insert_inode(inode(0, REG, size=5))
        b = engine.insert_inode(inode(0, LNK, size=3, target=b"a\xffb"))
        c = engine.insert_inode(inode(77, DIR, nlink=2))
    assert len({ROOT_INO, a, b, c}) == 4 and c == 77
    assert engine.get_inode(a) == inode(a, REG, size=5)
    assert engine.get_inode(b).target == b"a\xffb"  # type: ignore[union-attr]
    assert engine.get_inode(424242) is None
    assert engine.count_inodes() == 4
    changed = Inode(a, 0o104711, 5, 6, 1 << 40, 3, 7, 8, 9, 1234, None)
    with engine.transaction():
        engine.update_inode(changed)
    assert engine.get_inode(a) == changed
    assert engine.get_inode(b) == inode(b, LNK, size=3, target=b"a\xffb")  # untouched
    with engine.transaction():
        engine.update_inode(replace(changed, nlink=0))
    assert engine.orphan_inodes() == [a]
    with engine.transaction():
        assert engine.delete_inode(a) == []
    assert engine.get_inode(a) is None
    assert engine.count_inodes() == 3
    assert engine.orphan_inodes() == []



def test_touch_inode_counts_links_and_sets_times_returning_the_row(
    engine: MetaEngine, observer: MetaEngine
) -> None:
    with engine.transaction():
        a = engine.insert_inode(inode(0, REG, size=5, nlink=1))
    with engine.transaction():
        got = engine.touch_inode(a, 500, nlink=1)
    after = inode(a, REG, size=5, nlink=2)
    after.ctime_ns = 500  # mtime stays
    assert got == after == observer.get_inode(a)
    with engine.transaction():
        got = engine.touch_inode(a, 600, nlink=-2, mtime=True)
    after.nlink, after.mtime_ns, after.ctime_ns = 0, 600, 600
    assert got == after == observer.get_inode(a)
    with engine.transaction():
        assert engine.touch_inode(424242, 700, nlink=1) is None
    assert engine.get_inode(424242) is None
    with pytest.raises(ZeroDivisionError), engine.transaction():
        engine.touch_inode(a, 800, nlink=5, mtime=True)
        _ = 1 // 0
    assert engine.get_inode(a) == after  # rolled back with its block


def test_touch_inode_of_a_known_row_leaves_it_as_reading_it_does(
    engine: MetaEngine, observer: MetaEngine
) -> None:
    """``known``: the caller's row (what a filesystem on an engine of one machine caches)
    gives the same row, written whole, as one read in the block; the caller's copy stays."""
    with engine.transaction():
        a = engine.insert_inode(inode(0, DIR, nlink=2))
        b = engine.insert_inode(inode(0, DIR, nlink=2))
    row = engine.get_inode(a)
    assert row is not None
    with engine.transaction():
        got = engine.touch_inode(a, 500, nlink=1, mtime=True, known=row)
        read = engine.touch_inode(b, 500, nlink=1, mtime=True)
    assert row == inode(a, DIR, nlink=2)  # not changed in place
    assert got == replace(read, ino=a) == observer.get_inode(a)  # type: ignore[type-var]
    assert (got.nlink, got.mtime_ns, got.ctime_ns) == (3, 500, 500)  # type: ignore[union-attr]
    with engine.transaction():  # a row that is gone: None, nothing written
        assert engine.touch_inode(424242, 700, nlink=1, known=replace(row, ino=424242)) is None
    assert engine.get_inode(424242) is None
    with pytest.raises(ZeroDivisionError), engine.transaction():
        engine.touch_inode(a, 800, nlink=5, known=got)
        _ = 1 // 0
    assert engine.get_inode(a) == got  # rolled back with its block


def test_set_attrs_sets_what_is_given_returning_the_row(
    engine: MetaEngine, observer: MetaEngine
) -> None:
    with engine.transaction():
        a = engine.insert_inode(inode(0, REG | 0o644, size=5))
    with engine.transaction():
        got = engine.set_attrs(a, 500, perms=0o4711, gid=9)
    after = inode(a, stat.S_IFREG | 0o4711, size=5)
    after.gid, after.ctime_ns = 9, 500  # the type stays; uid and times not given stay
    assert got == after == observer.get_inode(a)
    with engine.transaction():
        got = engine.set_attrs(a, 600, uid=0, atime_ns=1, mtime_ns=2)
    after.uid, after.atime_ns, after.mtime_ns, after.ctime_ns = 0, 1, 2, 600
    assert got == after == observer.get_inode(a)
    with engine.transaction():
        assert engine.set_attrs(424242, 700, perms=0o600) is None
    assert engine.get_inode(424242) is None

def test_delete_inode_takes_its_xattrs_chunks_and_names(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    other = new_file(engine, ROOT_INO, b"other")
    shared, own = ref("shared"), ref("own")
    with engine.transaction():
        engine.add_dentry(ROOT_INO, HIDDEN + b"0001", f)  # a second (hidden) name
        engine.set_xattr(f, b"user.a", b"1")
        engine.set_xattr(other, b"user.a", b"2")
        engine.set_block(f, 0, shared, staged=False)
        engine.set_block(f, 1, own, staged=False)
        engine.set_block(other, 0, shared, staged=False)
    assert refcount(engine, shared.name) == 2
    with engine.transaction():
        released = engine.delete_inode(f)
    assert sorted(released) == sorted([shared.name, own.name])
    assert refcount(engine, shared.name) == 1 and refcount(engine, own.name) == 0
    assert engine.lookup(ROOT_INO, b"f") is None
    assert engine.lookup(ROOT_INO, HIDDEN + b"0001") is None
    assert engine.get_xattr(f, b"user.a") is None and engine.list_xattrs(f) == []
    assert engine.get_blocks(f, 0, 10) == {}
    assert engine.inodes_with_xattrs() == {other}
    assert engine.get_xattr(other, b"user.a") == b"2"
    assert engine.get_blocks(other, 0, 10) == {0: shared}


# -- directory entries --------------------------------------------------------------------------
def test_dentries_lookup_add_remove(engine: MetaEngine) -> None:
    d = new_file(engine, ROOT_INO, b"d", DIR)
    f = new_file(engine, d, b"f")
    assert engine.lookup(ROOT_INO, b"d") == d
    assert engine.lookup(d, b"f") == f
    assert engine.lookup(ROOT_INO, b"f") is None  # names are per directory
    assert engine.lookup(d, b"F") is None  # and exact
    with engine.transaction():
        engine.add_dentry(ROOT_INO, b"f2", f)  # a hard link
        engine.remove_dentry(d, b"f")
    assert engine.lookup(d, b"f") is None
    assert engine.lookup(ROOT_INO, b"f2") == f
    with engine.transaction():
        engine.remove_dentry(d, b"never-there")  # removing a missing name is no error
    assert engine.has_children(d) is False



def test_dentry_compound_primitives(engine: MetaEngine, observer: MetaEngine) -> None:
    """lookup_stat, add_dentry_if_absent and pop_dentry: what lookup, get_inode, allocated,
    add_dentry and remove_dentry do together, each written or refused whole."""
    d = new_file(engine, ROOT_INO, b"d", DIR)
    f = new_file(engine, d, b"f")
    with engine.transaction():
        engine.set_block(f, 0, ref("a", 5000), staged=False)
        engine.set_block(f, 3, ref("b", 10), staged=False)
    assert engine.lookup_stat(d, b"f", 4096, 512) == (engine.get_inode(f), 4096 + 512)
    assert engine.lookup_stat(d, b"f", 4096, 512)[1] == engine.allocated(f, 4096, 512)  # type: ignore[index]
    assert engine.lookup_stat(ROOT_INO, b"d", 4096, 512) == (engine.get_inode(d), 0)
    assert engine.lookup_stat(d, b"missing", 4096, 512) is None
    assert engine.lookup_stat(ROOT_INO, b"f", 4096, 512) is None  # names are per directory
    with engine.transaction():
        assert engine.add_dentry_if_absent(ROOT_INO, b"f2", f) is True  # a hard link
        assert engine.add_dentry_if_absent(d, b"f", d) is False  # taken: left as it was
    assert observer.lookup(ROOT_INO, b"f2") == f and observer.lookup(d, b"f") == f
    assert engine.lookup_stat(ROOT_INO, b"f2", 4096, 4096) == (engine.get_inode(f), 8192)
    # stat_dir: lookup_stat of every entry at once (a dangling entry left out)
    e = new_file(engine, d, b"e", DIR)
    with engine.transaction():
        engine.add_dentry(d, b"dangling", 999_999)
    assert sorted(engine.stat_dir(d, 4096, 512)) == sorted(
        (n, *engine.lookup_stat(d, n, 4096, 512)) for n in (b"f", b"e"))  # type: ignore[misc]
    assert {n: a for n, _node, a in engine.stat_dir(ROOT_INO, 4096, 4096)} == {
        b"d": 0, b"f2": 8192}
    assert engine.stat_dir(e, 4096, 512) == []
    with engine.transaction():
        assert engine.pop_dentry(d, b"f") == f
        assert engine.pop_dentry(d, b"f") is None
        assert engine.pop_dentry(d, b"never-there") is None
    assert observer.lookup(d, b"f") is None and observer.lookup(ROOT_INO, b"f2") == f
    with pytest.raises(ZeroDivisionError), engine.transaction():
        assert engine.pop_dentry(ROOT_INO, b"f2") == f
        assert engine.add_dentry_if_absent(d, b"g", f) is True
        _ = 1 // 0
    assert engine.lookup(ROOT_INO, b"f2") == f and engine.lookup(d, b"g") is None

def test_list_dir_sorted_by_bytes_with_paging(engine: MetaEngine) -> None:
    d = new_file(engine, ROOT_INO, b"d", DIR)
    names = [b"b", b"a", b"B", b"\xff\xfe", b"a x", b"aa", b"\xc3\xa9", b"z" * 255]
    inos = {}
    for n in names:
        inos[n] = new_file(engine, d, n, DIR if n == b"aa" else REG)
    listing = engine.list_dir(d)
    assert [n for n, _i, _m in listing] == sorted(names)  # memcmp order, not text order
    assert all(i == inos[n] for n, i, _m in listing)
    assert dict((n, m) for n, _i, m in listing)[b"aa"] == DIR
    assert dict((n, m) for n, _i, m in listing)[b"b"] == REG
    # paging as readdir and prefetch do it: after the last name seen, a page at a time
    pages, after = [], None
    while True:
        page = engine.list_dir(d, after=after, limit=3)
        if not page:
            break
        assert len(page) <= 3
        pages.append(page)
        after = page[-1][0]
    assert [e for p in pages for e in p] == listing
    assert len(pages) == 3
    assert engine.list_dir(d, after=b"a") == listing[2:]  # strictly after, a missing name too
    assert engine.list_dir(d, after=b"B") == listing[1:]
    assert engine.list_dir(d, after=b"\xff\xff") == []
    assert engine.list_dir(inos[b"aa"]) == []
    assert [n for n, _i, _m in engine.list_dir(ROOT_INO)] == [b"d"]


def test_has_children_ignores_a_prefix(engine: MetaEngine) -> None:
    d = new_file(engine, ROOT_INO, b"d", DIR)
    assert not engine.has_children(d)
    assert not engine.has_children(d, HIDDEN)
    f = new_file(engine, d, HIDDEN + b"00000001")
    assert engine.has_children(d)
    assert not engine.has_children(d, HIDDEN)
    with engine.transaction():
        engine.add_dentry(d, b".fuse_hidde", f)  # shorter than the prefix: a real child
    assert engine.has_children(d, HIDDEN)
    assert engine.has_children(ROOT_INO, HIDDEN)


def test_hidden_entries_in_every_directory(engine: MetaEngine) -> None:
    d = new_file(engine, ROOT_INO, b"d", DIR)
    a = new_file(engine, d, HIDDEN + b"0000000a")
    b = new_file(engine, ROOT_INO, HIDDEN + b"0000000b")
    new_file(engine, ROOT_INO, b"x" + HIDDEN)  # contains it, does not start with it
    new_file(engine, ROOT_INO, HIDDEN[:-1] + b"e")  # a longer name, not the prefix
    assert sorted(engine.hidden_dentries(HIDDEN)) == sorted(
        [(d, HIDDEN + b"0000000a", a), (ROOT_INO, HIDDEN + b"0000000b", b)]
    )
    assert engine.hidden_dentries(b".nothing") == []


def test_hidden_entries_include_names_with_any_bytes_after_the_prefix(engine: MetaEngine) -> None:
    """Linux names are any bytes but NUL and '/': every name that starts with the prefix is a
    hidden entry (has_children ignores the same names, so rmdir relies on finding them all)."""
    d = new_file(engine, ROOT_INO, b"d", DIR)
    odd = new_file(engine, d, HIDDEN + b"\xff\x01")
    assert not engine.has_children(d, HIDDEN)  # counted as hidden here...
    assert engine.hidden_dentries(HIDDEN) == [(d, HIDDEN + b"\xff\x01", odd)]  # ...so found here


def test_paths_of(engine: MetaEngine) -> None:
    d = new_file(engine, ROOT_INO, b"d", DIR)
    e = new_file(engine, d, b"e", DIR)
    f = new_file(engine, e, b"f\xff")
    with engine.transaction():
        engine.add_dentry(ROOT_INO, b"g", f)
    assert sorted(engine.paths_of(f)) == ["/d/e/f\udcff", "/g"]
    assert len(engine.paths_of(f, limit=1)) == 1
    assert engine.paths_of(d) == ["/d"]
    assert engine.paths_of(999) == []
    with engine.transaction():
        engine.remove_dentry(ROOT_INO, b"d")  # e's parent no longer has a name
    assert sorted(engine.paths_of(f)) == ["/?/e/f\udcff", "/g"]


def test_parent_of(engine: MetaEngine) -> None:
    d = new_file(engine, ROOT_INO, b"d", DIR)
    e = new_file(engine, d, b"e", DIR)
    f = new_file(engine, e, b"f")
    assert engine.parent_of(d) == ROOT_INO
    assert engine.parent_of(e) == d
    assert engine.parent_of(f) == e
    assert engine.parent_of(ROOT_INO) is None  # the root has no entry
    assert engine.parent_of(424242) is None
    with engine.transaction():
        engine.remove_dentry(d, b"e")
        engine.add_dentry(ROOT_INO, b"e2", e)  # moved
    assert engine.parent_of(e) == ROOT_INO


def test_first_chunks_after(engine: MetaEngine) -> None:
    """The sibling prefetch: the next entries' first chunks, in name order, only entries
    with a stored chunk 0 counting."""
    d = new_file(engine, ROOT_INO, b"d", DIR)
    other = new_file(engine, ROOT_INO, b"a-elsewhere")
    refs = {}
    with engine.transaction():
        engine.set_block(other, 0, ref("else"), staged=False)
    for name in (b"a", b"b", b"c", b"d", b"e"):
        ino = new_file(engine, d, name)
        with engine.transaction():
            if name == b"b":
                engine.set_block(ino, 1, ref("b001"), staged=False)  # chunk 0 is a hole
            elif name != b"d":  # d is empty
                refs[name] = ref(name.decode() + "000")
                engine.set_block(ino, 0, refs[name], staged=False)
    assert engine.first_chunks_after(d, b"", 10) == [(n, refs[n]) for n in (b"a", b"c", b"e")]
    assert engine.first_chunks_after(d, b"a", 1) == [(b"c", refs[b"c"])]
    assert engine.first_chunks_after(d, b"c", 10) == [(b"e", refs[b"e"])]
    assert engine.first_chunks_after(d, b"e", 10) == []
    assert engine.first_chunks_after(ROOT_INO, b"", 10) == [(b"a-elsewhere", ref("else"))]


def test_open_inode(engine: MetaEngine) -> None:
    """A first open: the inode as committed (held where machines share the vault); None for
    one that is not there."""
    f = new_file(engine, ROOT_INO, b"f")
    assert engine.open_inode(f) == engine.get_inode(f)
    assert engine.open_inode(424242) is None


# -- chunk maps and reference counts -------------------------------------------------------------
def test_set_block_replaces_and_counts_references(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    a, b = ref("aaaa", 10), ref("bbbb", 20)
    with engine.transaction():
        assert engine.set_block(f, 0, a, staged=True) is None
        assert engine.set_block(f, 1, a, staged=True) is None  # same object twice (dedup)
    assert refcount(engine, a.name) == 2
    assert engine.get_object(a.name) == (a, 2, "staged")
    with engine.transaction():
        assert engine.set_block(f, 1, a, staged=True) is None  # unchanged: counts unchanged
    assert refcount(engine, a.name) == 2
    with engine.transaction():
        assert engine.set_block(f, 1, b, staged=False) == a.name
    assert refcount(engine, a.name) == 1 and refcount(engine, b.name) == 1
    assert engine.get_object(b.name) == (b, 1, "stored")
    with engine.transaction():
        assert engine.set_block(f, 0, None, staged=False) == a.name  # a hole now
        assert engine.set_block(f, 5, None, staged=False) is None  # a hole stays a hole
    assert refcount(engine, a.name) == 0  # kept (unreferenced), until dropped
    assert engine.get_blocks(f, 0, 100) == {1: b}


def test_reference_keeps_the_state_of_a_known_object(engine: MetaEngine) -> None:
    a = ref("cccc")
    with engine.transaction():
        engine.reference(a, staged=False)
        engine.reference(a, staged=True)  # dedup against a stored object: still stored
        engine.reference(replace(a, size=1), staged=True)  # known by name: the record stays
    assert engine.get_object(a.name) == (a, 3, "stored")
    assert engine.get_object("data/no/such") is None


def test_get_blocks_windows(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    g = new_file(engine, ROOT_INO, b"g")
    refs = {i: ref(f"r{i:04d}", 100 + i) for i in (0, 3, 255, 256, 1000, 1 << 33)}
    with engine.transaction():
        for i, r in refs.items():
            engine.set_block(f, i, r, staged=False)
        engine.set_block(g, 3, ref("gggg"), staged=False)
    assert engine.get_blocks(f, 0, 256) == {i: refs[i] for i in (0, 3, 255)}
    assert engine.get_blocks(f, 256, 512) == {256: refs[256]}
    assert engine.get_blocks(f, 4, 255) == {}
    assert engine.get_blocks(f, 1 << 33, (1 << 33) + 1) == {1 << 33: refs[1 << 33]}
    assert engine.get_blocks(g, 0, 256) == {3: ref("gggg")}


def test_remove_blocks_from_and_range(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    g = new_file(engine, ROOT_INO, b"g")
    rs = [ref(f"x{i:03d}") for i in range(6)]
    with engine.transaction():
        for i, r in enumerate(rs):
            engine.set_block(f, i, r, staged=False)
        engine.set_block(f, 6, rs[0], staged=False)  # rs[0] twice in f
        engine.set_block(g, 0, rs[4], staged=False)
    with engine.transaction():
        released = engine.remove_blocks_range(f, 1, 3)
    assert sorted(released) == [rs[1].name, rs[2].name]
    assert sorted(engine.get_blocks(f, 0, 10)) == [0, 3, 4, 5, 6]
    assert refcount(engine, rs[1].name) == 0 and refcount(engine, rs[2].name) == 0
    with engine.transaction():
        assert engine.remove_blocks_range(f, 1, 3) == []  # holes already
        released = engine.remove_blocks_from(f, 4)
    assert sorted(released) == sorted([rs[4].name, rs[5].name, rs[0].name])
    assert sorted(engine.get_blocks(f, 0, 10)) == [0, 3]
    assert refcount(engine, rs[0].name) == 1 and refcount(engine, rs[4].name) == 1
    assert engine.get_blocks(g, 0, 10) == {0: rs[4]}  # other files untouched
    with engine.transaction():
        assert engine.remove_blocks_from(f, 100) == []
        assert sorted(engine.remove_blocks_from(f, 0)) == sorted([rs[0].name, rs[3].name])
    assert engine.get_blocks(f, 0, 10) == {}


def test_next_hole_next_block_and_allocated(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    g = new_file(engine, ROOT_INO, b"g")
    with engine.transaction():
        for i, size in ((0, 100), (1, 4096), (2, 4097), (5, 70000)):
            engine.set_block(f, i, ref(f"h{i:03d}", size), staged=False)
        engine.set_block(g, 3, ref("g003", 1), staged=False)
    assert [engine.next_hole(f, i) for i in range(8)] == [3, 3, 3, 3, 4, 6, 6, 7]
    assert [engine.next_block(f, i) for i in range(7)] == [0, 1, 2, 5, 5, 5, None]
    assert engine.next_hole(g, 0) == 0 and engine.next_hole(g, 3) == 4
    assert engine.next_block(g, 0) == 3 and engine.next_block(g, 4) is None
    empty = new_file(engine, ROOT_INO, b"empty")
    assert engine.next_hole(empty, 0) == 0 and engine.next_block(empty, 0) is None
    # each chunk's stored size, at most the chunk size (65536), rounded up to 4096
    assert engine.allocated(f, 65536, 4096) == 4096 + 4096 + 8192 + 65536
    assert engine.allocated(g, 65536, 4096) == 4096
    assert engine.allocated(empty, 65536, 4096) == 0
    assert engine.stored_bytes() == 100 + 4096 + 4097 + 70000 + 1


# -- objects ------------------------------------------------------------------------------------
def test_object_states_and_unreferenced(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    staged, stored, meta = ref("st01"), ref("so01"), ChunkRef("meta/abc", 9, b"\1" * 32)
    with engine.transaction():
        engine.set_block(f, 0, staged, staged=True)
        engine.set_block(f, 1, stored, staged=False)
        engine.reference(meta, staged=False)
    assert engine.objects_in_state("staged") == [staged]
    assert sorted(r.name for r in engine.objects_in_state("stored")) == sorted(
        [meta.name, stored.name]
    )
    with engine.transaction():
        engine.mark_stored(staged.name)
        engine.mark_stored("data/unknown")  # no such object: nothing happens
    assert engine.objects_in_state("staged") == []
    assert engine.get_object("data/unknown") is None
    with engine.transaction():
        engine.remove_blocks_from(f, 0)
    assert sorted(r.name for r in engine.unreferenced_objects()) == [stored.name, staged.name]
    assert engine.object_users(stored.name) == []
    with engine.transaction():
        assert engine.drop_object_if_unreferenced(meta.name) is False  # still referenced
        assert engine.drop_object_if_unreferenced(stored.name) is True
        assert engine.drop_object_if_unreferenced(stored.name) is False  # gone already
    assert engine.get_object(stored.name) is None
    assert {r.name: (rc, st) for r, rc, st in engine.all_objects()} == {
        staged.name: (0, "stored"),
        meta.name: (1, "stored"),
    }


def test_objects_named_by_one_or_several_prefixes(engine: MetaEngine) -> None:
    """What a collection reads of checkpoints, metadata objects and pins (in one call)."""
    ck, snap, pin = (ChunkRef(n, 9, b"\1" * 32) for n in (
        "checkpoints/0000000000000007", "meta/ab", "snapshots/cd"))
    f = new_file(engine, ROOT_INO, b"f")
    with engine.transaction():
        for r in (ck, snap, pin):
            engine.reference(r, staged=False)
        engine.set_block(f, 0, ref("da01"), staged=False)
    assert engine.objects_named("meta/") == [snap]
    assert sorted(engine.objects_named("checkpoints/", "meta/", "snapshots/"),
                  key=lambda r: r.name) == [ck, snap, pin]
    assert engine.objects_named("checkpoints/", "nothing/") == [ck]


def test_collect_objects_deletes_only_what_nothing_references(engine: MetaEngine) -> None:
    """Collection: the store deletion of the objects still unreferenced (one call for all),
    their rows gone after; a referenced one, one whose deletion failed (recorded
    again, unreferenced) and an unknown one stay. ``claim_object``: a recorded object is live,
    a collected or unknown one is not (a commit stores such a one again), unless the caller
    stored it itself (``new``: an unknown one is fine)."""
    f = new_file(engine, ROOT_INO, b"f")
    used, free, fails = ref("cused"), ref("cfree"), ref("cfail")
    with engine.transaction():
        engine.set_block(f, 0, used, staged=False)
        engine.set_block(f, 1, free, staged=False)
        engine.set_block(f, 2, fails, staged=False)
        engine.remove_blocks_from(f, 1)
    asked: list[str] = []

    def delete(refs: list[ChunkRef]) -> set[str]:  # (all at once)
        asked.extend(r.name for r in refs)
        return {r.name for r in refs if r.name != fails.name}

    gone = engine.collect_objects([used, free, fails, ref("cnone")], delete)
    assert gone == [free] and sorted(asked) == sorted([free.name, fails.name])
    assert engine.get_object(free.name) is None
    assert engine.get_object(used.name) == (used, 1, "stored")
    assert engine.get_object(fails.name) == (fails, 0, "stored") or \
        engine.get_object(fails.name)[1:] == (0, "deleting")  # type: ignore[index]
    assert fails.name in {r.name for r in engine.unreferenced_objects()}  # the next one
    with engine.transaction():
        assert engine.claim_object(used.name) is True
        assert engine.claim_object(free.name) is False
        assert engine.claim_object("data/never") is False
        # a chunk the caller stored itself needs no row; a collected one is lost all the same
        assert engine.claim_object("data/never", new=True) is True
        assert engine.claim_objects({used.name: True, "data/never": True,
                                     free.name: False}) == {free.name}
        again = ChunkRef(fails.name, fails.size, b"\5" * 32)  # stored again (resealed)
        engine.set_block(f, 3, again, staged=False)
    assert engine.get_object(fails.name) in ((again, 1, "stored"), (fails, 1, "stored"))


def test_unreferenced_objects_leave_out_staged_ones(engine: MetaEngine) -> None:
    """An object still staged (upload pending) is not garbage even at refcount 0."""
    f = new_file(engine, ROOT_INO, b"f")
    r = ref("pend")
    with engine.transaction():
        engine.set_block(f, 0, r, staged=True)
        engine.set_block(f, 0, None, staged=True)
    assert engine.get_object(r.name) == (r, 0, "staged")
    assert engine.unreferenced_objects() == []


def test_object_users(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    g = new_file(engine, ROOT_INO, b"g")
    r = ref("user")
    with engine.transaction():
        engine.set_block(f, 0, r, staged=False)
        engine.set_block(f, 7, r, staged=False)
        engine.set_block(g, 2, r, staged=False)
    assert sorted(engine.object_users(r.name)) == sorted([f, g])  # each inode once
    assert engine.object_users("data/none") == []


def test_forget_and_unreference_objects(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    used, meta_obj, ck = ref("used"), ChunkRef("meta/m1", 5, b"\1" * 32), ChunkRef("ck/1", 3,
                                                                                  b"\2" * 32)
    with engine.transaction():
        engine.set_block(f, 0, used, staged=False)
        engine.reference(meta_obj, staged=False)
        engine.reference(ck, staged=False)
        engine.record_copy(ck.name, "s1", "ok")
    with engine.transaction():
        engine.forget_deleted_object(used.name)  # a chunk a chunk map names: kept
        engine.forget_deleted_object(meta_obj.name)  # any other object: forgotten
    assert engine.get_object(used.name) == (used, 1, "stored")
    assert engine.get_object(meta_obj.name) is None
    with engine.transaction():
        engine.set_block(f, 0, None, staged=False)
        engine.forget_deleted_object(used.name)  # unreferenced now: forgotten
        engine.forget_object(ck.name)  # whatever its count
        engine.forget_object("data/never")  # unknown: nothing happens
    assert engine.get_object(used.name) is None and engine.get_object(ck.name) is None
    assert engine.copies_of(ck.name) == {}  # its copies go with it
    # a deletion that failed: recorded as stored and unreferenced, for the next collection
    gone = ref("gone")
    with engine.transaction():
        engine.unreference_object(gone)
        engine.reference(meta_obj, staged=False)
        engine.reference(meta_obj, staged=False)
        engine.unreference_object(meta_obj)
    assert engine.get_object(gone.name) == (gone, 0, "stored")
    assert engine.get_object(meta_obj.name) == (meta_obj, 0, "stored")
    assert sorted(r.name for r in engine.unreferenced_objects()) == sorted(
        [gone.name, meta_obj.name])


# -- copies on the stores of a replicated vault ---------------------------------------------------
def test_copies(engine: MetaEngine) -> None:
    a, b = ref("cop1"), ref("cop2")
    with engine.transaction():
        engine.reference(a, staged=False)
        engine.reference(b, staged=False)
        assert engine.record_copy(a.name, "s1", "ok") is True
        assert engine.record_copy(a.name, "s1", "ok") is False  # nothing changed
        assert engine.record_copy(a.name, "s2", "pending") is True
        assert engine.record_copy(b.name, "s2", "pending") is True
        assert engine.record_copy(b.name, "s1", "delete") is True
        assert engine.record_copy("data/zz/unknown", "s2", "pending") is True
    assert engine.copies_of(a.name) == {"s1": "ok", "s2": "pending"}
    assert engine.copies_of("data/none") == {}
    assert engine.all_copies() == {
        a.name: {"s1": "ok", "s2": "pending"},
        b.name: {"s2": "pending", "s1": "delete"},
        "data/zz/unknown": {"s2": "pending"},
    }
    # only copies of known objects are to be made
    assert sorted(engine.pending_copies(), key=lambda x: x[0].name) == [(a, "s2"), (b, "s2")]
    assert len(engine.pending_copies(limit=1)) == 1
    assert engine.pending_deletes() == [(b.name, "s1")]
    assert engine.pending_copy_counts() == {"s1": 1, "s2": 3}
    with engine.transaction():
        assert engine.record_copy(a.name, "s2", "ok") is True
        engine.forget_stray_copies()
    assert "data/zz/unknown" not in engine.all_copies()
    assert engine.pending_copy_counts() == {"s1": 1, "s2": 1}
    with engine.transaction():
        engine.forget_copy(b.name, "s1")
    assert engine.pending_deletes() == []
    with engine.transaction():
        engine.forget_store_copies("s2")
    assert engine.all_copies() == {a.name: {"s1": "ok"}}


def test_dropping_an_object_forgets_its_copies(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    a = ref("gone")
    with engine.transaction():
        engine.set_block(f, 0, a, staged=False)
        engine.record_copy(a.name, "s1", "ok")
        engine.record_copy(a.name, "s2", "pending")
        engine.record_copy("data/other", "s1", "delete")
        engine.set_block(f, 0, None, staged=False)
        assert engine.drop_object_if_unreferenced(a.name) is True
    assert engine.copies_of(a.name) == {}
    assert engine.pending_deletes() == [("data/other", "s1")]  # whoever deletes, only its own


# -- xattrs and key/value state -------------------------------------------------------------------
def test_xattrs(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    assert engine.get_xattr(f, b"user.x") is None
    assert engine.list_xattrs(f) == []
    assert engine.inodes_with_xattrs() == set()
    with engine.transaction():
        engine.set_xattr(f, b"user.b", b"")
        engine.set_xattr(f, b"user.a", b"\x00\xff" * 1000)
        engine.set_xattr(f, b"user.b", b"two")  # replaces
        engine.set_xattr(ROOT_INO, b"user.a", b"root")
    assert engine.get_xattr(f, b"user.b") == b"two"
    assert engine.get_xattr(f, b"user.a") == b"\x00\xff" * 1000
    assert engine.list_xattrs(f) == [b"user.a", b"user.b"]
    assert engine.inodes_with_xattrs() == {f, ROOT_INO}
    with engine.transaction():
        assert engine.remove_xattr(f, b"user.b") is True
        assert engine.remove_xattr(f, b"user.b") is False
    assert engine.list_xattrs(f) == [b"user.a"]
    assert engine.get_xattr(ROOT_INO, b"user.a") == b"root"


def test_empty_xattr_value_is_not_a_missing_one(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    with engine.transaction():
        engine.set_xattr(f, b"user.e", b"")
    assert engine.get_xattr(f, b"user.e") == b""


def test_state(engine: MetaEngine, observer: MetaEngine) -> None:
    assert engine.get_state("clean") is None
    engine.set_state("clean", "0")  # its own transaction, committed
    assert observer.get_state("clean") == "0"
    engine.set_state("clean", "1")
    engine.set_state("other", "x")
    assert engine.get_state("clean") == "1" and observer.get_state("other") == "x"


# -- transactions -------------------------------------------------------------------------------
def test_commit_on_success(engine: MetaEngine, observer: MetaEngine) -> None:
    commits = []
    engine.on_commit = lambda: commits.append(1)
    # reads first (they may begin a transaction underneath): the block still commits at its end
    assert engine.list_dir(ROOT_INO) == [] and engine.get_state("x") is None
    assert engine.all_objects() == [] and engine.lookup(ROOT_INO, b"f") is None
    with engine.transaction():
        ino = engine.insert_inode(inode())
        engine.add_dentry(ROOT_INO, b"f", ino)
        assert observer.lookup(ROOT_INO, b"f") is None  # not before the block ends
    assert commits == [1]
    assert observer.lookup(ROOT_INO, b"f") == ino
    assert observer.get_inode(ino) == inode(ino)


def test_rollback_undoes_every_write_of_the_block(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    a = ref("roll")
    with engine.transaction():
        engine.set_block(f, 0, a, staged=False)
        engine.set_xattr(f, b"user.k", b"v")
    before = (engine.get_inode(f), engine.get_object(a.name), engine.list_dir(ROOT_INO))
    count = engine.count_inodes()
    rollbacks = []
    engine.on_rollback = lambda: rollbacks.append(1)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), engine.transaction():
        g = engine.insert_inode(inode())
        engine.add_dentry(ROOT_INO, b"g", g)
        engine.update_inode(replace(engine.get_inode(f), size=999))  # type: ignore[arg-type]
        engine.set_block(f, 0, ref("new0"), staged=True)
        engine.set_block(f, 1, a, staged=False)
        engine.set_xattr(f, b"user.k", b"changed")
        engine.remove_xattr(f, b"user.k")
        engine.remove_dentry(ROOT_INO, b"f")
        engine.record_copy(a.name, "s1", "ok")
        assert engine.lookup(ROOT_INO, b"g") == g  # visible inside the block
        assert engine.count_inodes() == count + 1  # counted inside: not kept past the rollback
        raise Boom
    assert rollbacks == [1]
    assert (engine.get_inode(f), engine.get_object(a.name), engine.list_dir(ROOT_INO)) == before
    assert engine.get_inode(g) is None
    assert engine.count_inodes() == count
    assert engine.get_object(ref("new0").name) is None
    assert engine.get_blocks(f, 0, 10) == {0: a}
    assert engine.get_xattr(f, b"user.k") == b"v"
    assert engine.copies_of(a.name) == {}


def test_rollback_also_undoes_uncommitted_writes_before_the_block(
    engine: MetaEngine, observer: MetaEngine
) -> None:
    """Writes made outside any block (a deferred create, an attribute change) belong to the
    open transaction: a failing block undoes them too, and on_rollback lets the caller write
    them again (FileSystem._reapply_deferred)."""
    ino = engine.insert_inode(inode())
    engine.add_dentry(ROOT_INO, b"deferred", ino)
    assert observer.lookup(ROOT_INO, b"deferred") is None
    with pytest.raises(ZeroDivisionError), engine.transaction():
        engine.set_xattr(ino, b"user.a", b"1")
        _ = 1 // 0
    assert engine.lookup(ROOT_INO, b"deferred") is None
    assert engine.get_inode(ino) is None


def test_nested_blocks_join_the_outer_one(engine: MetaEngine, observer: MetaEngine) -> None:
    commits = []
    engine.on_commit = lambda: commits.append(1)
    with engine.transaction():
        with engine.transaction():
            a = engine.insert_inode(inode())
            engine.add_dentry(ROOT_INO, b"a", a)
        assert observer.lookup(ROOT_INO, b"a") is None  # the inner block did not commit
        assert commits == []
        with pytest.raises(KeyError), engine.transaction():
            engine.add_dentry(ROOT_INO, b"b", a)
            raise KeyError("inner")
        # an inner block's error caught in the outer one undoes nothing by itself
        assert engine.lookup(ROOT_INO, b"b") == a
    assert commits == [1]
    assert observer.lookup(ROOT_INO, b"a") == a and observer.lookup(ROOT_INO, b"b") == a
    # an error leaving the outer block undoes the inner blocks' writes too
    with pytest.raises(RuntimeError), engine.transaction():
        with engine.transaction():
            engine.add_dentry(ROOT_INO, b"c", a)
        raise RuntimeError
    assert engine.lookup(ROOT_INO, b"c") is None
    with engine.transaction():  # and the engine is usable after it
        engine.add_dentry(ROOT_INO, b"c", a)
    assert observer.lookup(ROOT_INO, b"c") == a


def test_commit_false_leaves_writes_for_the_next_commit(
    engine: MetaEngine, observer: MetaEngine
) -> None:
    with engine.transaction(commit=False):
        a = engine.insert_inode(inode())
        engine.add_dentry(ROOT_INO, b"later", a)
    assert engine.lookup(ROOT_INO, b"later") == a
    assert observer.lookup(ROOT_INO, b"later") is None
    with engine.transaction():  # the next block commits them along
        engine.set_xattr(a, b"user.x", b"1")
    assert observer.lookup(ROOT_INO, b"later") == a
    with engine.transaction(commit=False):
        engine.add_dentry(ROOT_INO, b"later2", a)
    assert observer.lookup(ROOT_INO, b"later2") is None
    engine.commit()  # or an explicit commit
    assert observer.lookup(ROOT_INO, b"later2") == a


def test_sync_and_close_keep_committed_rows(kind: EngineKind, tmp_path: Path) -> None:
    e = kind.open(tmp_path)
    with e.transaction():
        e.insert_inode(inode(ROOT_INO, DIR, nlink=2))
        e.add_dentry(ROOT_INO, b"x", ROOT_INO)
    e.sync()
    with e.transaction(commit=False):
        e.add_dentry(ROOT_INO, b"y", ROOT_INO)
    e.close()  # commits what is left
    e = kind.open(tmp_path)
    try:
        assert [n for n, _i, _m in e.list_dir(ROOT_INO)] == [b"x", b"y"]
    finally:
        e.close()


def test_a_commit_survives_a_crash_of_the_process(kind: EngineKind, tmp_path: Path) -> None:
    """Killed with SIGKILL (no close, no checkpoint): committed rows are there at the next
    open, uncommitted ones are not."""

    def child() -> None:
        e = kind.open(tmp_path)
        with e.transaction():
            e.insert_inode(inode(ROOT_INO, DIR, nlink=2))
            e.add_dentry(ROOT_INO, b"committed", ROOT_INO)
        with e.transaction(commit=False):
            e.add_dentry(ROOT_INO, b"uncommitted", ROOT_INO)
        os.kill(os.getpid(), signal.SIGKILL)

    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    e = kind.open(tmp_path)
    try:
        assert [n for n, _i, _m in e.list_dir(ROOT_INO)] == [b"committed"]
    finally:
        e.close()


def test_errors_are_one_line_meta_errors_and_roll_back(
    kind: EngineKind, engine: MetaEngine, observer: MetaEngine
) -> None:
    """A write the database refuses (here: a name that exists) ends the block with an
    errno-carrying MetaError, and the block's other writes are undone."""
    rollbacks = []
    engine.on_rollback = lambda: rollbacks.append(1)  # type: ignore[attr-defined]
    f = new_file(engine, ROOT_INO, b"f")
    with pytest.raises(MetaError) as e, engine.transaction():
        engine.set_xattr(f, b"user.a", b"1")
        engine.add_dentry(ROOT_INO, b"f", f)
    assert isinstance(e.value.errno, int) and e.value.errno > 0
    assert "\n" not in str(e.value)
    assert rollbacks == [1]
    assert engine.get_xattr(f, b"user.a") is None
    with engine.transaction():  # usable afterwards
        engine.set_xattr(f, b"user.a", b"2")
    assert observer.get_xattr(f, b"user.a") == b"2"


@pytest.fixture
def small_disk(kind: EngineKind, tmp_path: Path) -> Iterator[Path]:
    with kind.small_disk(tmp_path) as d:
        yield d


def test_a_full_disk_is_an_enospc_meta_error_and_rolls_back(
    kind: EngineKind, small_disk: Path
) -> None:
    """When the disk fills, the block that does not fit fails with an errno-carrying
    MetaError (ENOSPC), is rolled back whole (the rollback listener runs), and the blocks
    committed before it are all there."""
    e = kind.open(small_disk)
    try:
        rollbacks: list[int] = []
        e.on_rollback = lambda: rollbacks.append(1)  # type: ignore[attr-defined]
        with e.transaction():
            e.insert_inode(inode(ROOT_INO, DIR, nlink=2))
        committed = 0
        with pytest.raises(MetaError) as err:
            for i in range(1000):  # 256 KiB hold far fewer than 1000 blocks of 3000 bytes
                with e.transaction():
                    e.set_xattr(ROOT_INO, b"user.%d" % i, os.urandom(3000))
                committed += 1
        assert err.value.errno == errno.ENOSPC
        assert rollbacks == [1]
        assert e.get_xattr(ROOT_INO, b"user.%d" % committed) is None
        assert len(e.list_xattrs(ROOT_INO)) == committed > 0
    finally:
        with contextlib.suppress(Exception):
            e.close()


# -- the ledger ---------------------------------------------------------------------------------
KEY = b"k" * 32


def test_ledger_append_chains_entries(engine: MetaEngine, observer: MetaEngine) -> None:
    led = Ledger(engine, KEY)
    assert led.head() is None and led.count() == 0 and led.newest(3) == []
    e1 = led.append("put", "data/ab/1", 10, b"\1" * 32)
    e2 = led.append("del", "data/ab/1", 10, b"\0" * 32)
    e3 = led.append("copy@1a2b3c4d", "meta/x", 0, b"\2" * 32)
    assert (e1.seq, e2.seq, e3.seq) == (1, 2, 3)
    assert e1.prev == GENESIS and e2.prev == e1.hash and e3.prev == e2.hash
    for e in (e1, e2, e3):
        assert e.hash == entry_hash(e.seq, e.time_ns, e.op, e.name, e.size, e.sha256, e.prev)
    assert list(led.entries()) == [e1, e2, e3]
    assert list(led.entries(after=1)) == [e2, e3]
    assert list(led.entries(after=3)) == []
    assert led.entry(2) == e2 and led.entry(4) is None and led.entry(0) is None
    assert led.newest(2) == [e3, e2]
    assert led.count() == 3
    assert led.head() == e3
    assert led.verify_chain() == (3, [])
    # an append outside a block commits itself; another reader sees the same chain
    other = Ledger(observer, KEY)
    assert other.head() == e3 and list(other.entries()) == [e1, e2, e3]


def test_ledger_entries_pages_past_5000(engine: MetaEngine) -> None:
    led = Ledger(engine, KEY)
    with engine.transaction():
        for i in range(5003):
            led.append("put", f"data/{i}", i, b"\0" * 32)
    seqs = [e.seq for e in led.entries()]
    assert seqs == list(range(1, 5004))
    assert led.verify_chain() == (5003, [])


def test_ledger_last_named(engine: MetaEngine) -> None:
    led = Ledger(engine, KEY)
    led.append("put", "meta/a_1", 1, b"\0" * 32)
    e2 = led.append("put", "meta/abc", 2, b"\0" * 32)
    led.append("del", "meta/abd", 3, b"\0" * 32)
    led.append("put", "data/meta/a", 4, b"\0" * 32)
    assert led.last_named("put", "meta/") == e2
    assert led.last_named("put", "meta/a_").name == "meta/a_1"  # type: ignore[union-attr]
    assert led.last_named("del", "meta/").seq == 3  # type: ignore[union-attr]
    assert led.last_named("put", "meta/%") is None  # a pattern character is a character
    assert led.last_named("config", "") is None


def test_verify_chain_detects_an_edited_row(engine: MetaEngine) -> None:
    led = Ledger(engine, KEY)
    es = [led.append("put", f"data/{i}", i, b"\3" * 32) for i in range(4)]
    led.truncate_after(2)
    assert led.count() == 2 and led.head() == es[1]
    led.add_entries([replace(es[2], size=999), es[3]])  # seq 3 edited, its hash kept
    n, problems = led.verify_chain()
    assert n == 4
    assert problems == ["ledger: chain broken at sequence 3 (entry was modified)"]


def test_verify_chain_detects_a_missing_row(engine: MetaEngine) -> None:
    led = Ledger(engine, KEY)
    es = [led.append("put", f"data/{i}", i, b"\3" * 32) for i in range(5)]
    led.truncate_after(1)
    led.add_entries([es[3], es[4]])  # 2 and 3 missing
    n, problems = led.verify_chain()
    assert n == 3
    assert problems[0] == "ledger: entries 2..3 are missing (chain broken at sequence 2)"
    assert "ledger: chain broken at sequence 4 (previous hash differs)" in problems


def test_verify_chain_detects_a_rehashed_edit(engine: MetaEngine) -> None:
    """An edit whose own hash is recomputed breaks the link to the next entry."""
    led = Ledger(engine, KEY)
    es = [led.append("put", f"data/{i}", i, b"\3" * 32) for i in range(3)]
    e = es[1]
    forged_hash = entry_hash(e.seq, e.time_ns, e.op, "data/evil", e.size, e.sha256, e.prev)
    forged = Entry(e.seq, e.time_ns, e.op, "data/evil", e.size, e.sha256, e.prev, forged_hash)
    led.truncate_after(1)
    led.add_entries([forged, es[2]])
    assert led.verify_chain()[1] == ["ledger: chain broken at sequence 3 (previous hash differs)"]


def test_ledger_append_rolled_back_with_its_block(engine: MetaEngine) -> None:
    """An entry appended in a block that fails is undone with it; the next append continues
    the committed chain (no gap, no broken link)."""
    led = Ledger(engine, KEY)
    e1 = led.append("put", "data/1", 1, b"\0" * 32)
    with pytest.raises(OSError), engine.transaction():
        led.append("put", "data/2", 2, b"\0" * 32)
        raise OSError("the chunk map could not be written")
    assert led.count() == 1
    e2 = led.append("put", "data/3", 3, b"\0" * 32)
    assert (e2.seq, e2.prev) == (2, e1.hash)
    assert led.verify_chain() == (2, [])


def test_ledger_rows(engine: MetaEngine, observer: MetaEngine) -> None:
    """The engine stores ledger rows as given; the chain is the Ledger's business."""
    rows = [(i, 1000 + i, "put" if i % 2 else "del", f"meta/{i}", i * 10, bytes([i]) * 32,
             bytes([i - 1]) * 32, bytes([i + 100]) * 32) for i in range(1, 8)]
    assert engine.ledger_last() is None and engine.ledger_count() == 0
    assert engine.ledger_page(0, 10) == [] and engine.ledger_newest(3) == []
    with pytest.raises(KeyError), engine.transaction():
        engine.ledger_insert(rows[:2])
        raise KeyError
    assert engine.ledger_count() == 0  # rolled back with its block
    with engine.transaction():
        engine.ledger_insert(rows[:3])
        engine.ledger_insert(rows[3:])
    assert observer.ledger_count() == 7
    assert engine.ledger_last() == rows[-1]
    assert engine.ledger_get(4) == rows[3] and engine.ledger_get(99) is None
    assert engine.ledger_page(0, 3) == rows[:3]
    assert engine.ledger_page(3, 100) == rows[3:]
    assert engine.ledger_page(7, 100) == []
    assert engine.ledger_newest(2) == [rows[6], rows[5]]
    assert engine.ledger_last_named("put", "meta/") == rows[6]
    assert engine.ledger_last_named("del", "meta/") == rows[5]
    assert engine.ledger_last_named("put", "meta/3") == rows[2]
    assert engine.ledger_last_named("put", "meta/_") is None  # no pattern characters
    assert engine.ledger_last_named("put", "meta/%") is None
    assert engine.ledger_last_named("copy", "") is None
    with engine.transaction():
        engine.ledger_truncate_after(4)
    assert engine.ledger_count() == 4 and engine.ledger_last() == rows[3]


# -- check and repair (fsck) ------------------------------------------------------------------
def test_whole_table_views(engine: MetaEngine) -> None:
    d = new_file(engine, ROOT_INO, b"d", DIR)
    f = new_file(engine, d, b"f")
    a, b = ref("tab1", 11), ref("tab2", 22)
    with engine.transaction():
        engine.add_dentry(ROOT_INO, HIDDEN + b"1", f)
        engine.set_block(f, 0, a, staged=False)
        engine.set_block(f, 4, b, staged=True)
        engine.set_block(f, 5, a, staged=False)
    assert engine.inode_modes() == {ROOT_INO: (DIR, 2), d: (DIR, 2), f: (REG, 1)}
    assert sorted(engine.all_dentries()) == sorted(
        [(ROOT_INO, b"d", d), (d, b"f", f), (ROOT_INO, HIDDEN + b"1", f)])
    assert sorted(engine.all_blocks()) == [(f, 0, a.name), (f, 4, b.name), (f, 5, a.name)]
    assert engine.object_states() == {a.name: (2, "stored", 11), b.name: (1, "staged", 22)}


def test_repairs_touch_only_what_they_name(engine: MetaEngine) -> None:
    f = new_file(engine, ROOT_INO, b"f")
    g = new_file(engine, ROOT_INO, b"g")
    a, b = ref("rep1"), ref("rep2")
    with engine.transaction():
        engine.set_block(f, 0, a, staged=False)
        engine.set_block(f, 1, b, staged=False)
        engine.set_block(g, 0, a, staged=False)
        engine.set_xattr(f, b"user.x", b"1")
        engine.set_xattr(g, b"user.x", b"2")
    with engine.transaction():
        engine.set_nlink(f, 7)
        engine.set_refcount(b.name, 5)
        engine.drop_block(f, 1)  # counts are left to the caller
    assert engine.get_inode(f).nlink == 7  # type: ignore[union-attr]
    assert engine.get_inode(g).nlink == 1  # type: ignore[union-attr]
    assert refcount(engine, b.name) == 5 and refcount(engine, a.name) == 2
    assert engine.get_blocks(f, 0, 10) == {0: a}
    with engine.transaction():
        engine.drop_inode_rows(f)
    assert engine.get_inode(f) is None
    assert engine.get_blocks(f, 0, 10) == {} and engine.list_xattrs(f) == []
    assert refcount(engine, a.name) == 2  # left to fsck
    assert engine.lookup(ROOT_INO, b"f") == f  # entries are fsck's own repair
    assert engine.get_blocks(g, 0, 10) == {0: a} and engine.get_xattr(g, b"user.x") == b"2"


# -- snapshot and restore -----------------------------------------------------------------------
def _populate(e: MetaEngine) -> dict[str, int]:
    d = new_file(e, ROOT_INO, b"d", DIR)
    f = new_file(e, d, b"f\xff")
    s = new_file(e, ROOT_INO, b"link", LNK)
    with e.transaction():
        e.update_inode(inode(s, LNK, size=3, target=b"d/f"))
        e.set_block(f, 0, ref("snap0", 5), staged=False)
        e.set_block(f, 9, ref("snap9", 7), staged=True)
        e.reference(ChunkRef("meta/old", 50, b"\5" * 32), staged=False)
        e.set_xattr(f, b"user.x", b"\0xattr")
        e.record_copy(ref("snap0").name, "s1", "ok")
        e.add_dentry(d, HIDDEN + b"00000001", f)
    e.set_state("clean", "0")
    Ledger(e, KEY).append("put", ref("snap0").name, 5, ref("snap0").sha256)
    return {"d": d, "f": f, "s": s}


def _rows(e: MetaEngine, inos: list[int]) -> dict[str, object]:
    return {
        "inodes": [e.get_inode(i) for i in inos],
        "count": e.count_inodes(),
        "dirs": [e.list_dir(i) for i in inos],
        "hidden": e.hidden_dentries(HIDDEN),
        "blocks": [e.get_blocks(i, 0, 1 << 20) for i in inos],
        "objects": sorted(e.all_objects(), key=lambda x: x[0].name),
        "xattrs": [(i, n, e.get_xattr(i, n)) for i in inos for n in e.list_xattrs(i)],
        "copies": e.all_copies(),
        "state": e.get_state("clean"),
        "ledger": list(Ledger(e, KEY).entries()),
        "paths": [e.paths_of(i) for i in inos],
    }


def test_snapshot_image_restores_the_same_rows(
    kind: EngineKind, engine: MetaEngine, tmp_path: Path
) -> None:
    inos = [ROOT_INO, *_populate(engine).values()]
    with engine.transaction(commit=False):
        engine.add_dentry(ROOT_INO, b"uncommitted", ROOT_INO)  # the image commits first
    image = engine.image()  # as Checkpointer._checkpoint takes it
    expected = _rows(engine, inos)
    assert len(expected["ledger"]) == 1 and expected["xattrs"]  # type: ignore[arg-type]
    restored = kind.from_image(image, tmp_path)
    try:
        assert _rows(restored, inos) == expected
        # the restored engine is a working one: writes, reference counts, the ledger chain
        with restored.transaction():
            restored.set_block(inos[2], 0, None, staged=False)
        assert refcount(restored, ref("snap0").name) == 0
        led = Ledger(restored, KEY)
        assert led.append("del", "x", 0, b"\0" * 32).seq == 2
        assert led.verify_chain() == (2, [])
    finally:
        restored.close()
    assert refcount(engine, ref("snap0").name) == 1  # the source is independent of it


def test_a_frozen_state_is_read_whole_while_the_engine_goes_on(
    kind: EngineKind, engine: MetaEngine, tmp_path: Path
) -> None:
    """freeze() commits and fixes the committed state, as a full checkpoint reads it without
    the filesystem lock: its image, staged, unreferenced and named objects and ledger head are
    of that state, whatever the engine writes and commits meanwhile, read as often as asked."""
    inos = [ROOT_INO, *_populate(engine).values()]
    with engine.transaction():
        engine.set_refcount("meta/old", 0)  # unreferenced: a collection may delete it
    with engine.transaction(commit=False):
        engine.add_dentry(ROOT_INO, b"uncommitted", ROOT_INO)  # freeze commits first
    expected = _rows(engine, inos)
    frozen = engine.freeze()
    try:
        later = new_file(engine, ROOT_INO, b"later")  # the engine goes on
        with engine.transaction():
            engine.set_block(inos[2], 0, None, staged=False)  # snap0 unreferenced now
            engine.set_block(later, 0, ref("late"), staged=True)
            engine.mark_stored(ref("snap9").name)
            engine.reference(ChunkRef("meta/later", 1, b"\0" * 32), staged=False)
        Ledger(engine, KEY).append("put", "meta/later", 1, b"\0" * 32)
        old = ChunkRef("meta/old", 50, b"\5" * 32)
        assert sorted(r.name for r in engine.objects_named("meta/")) == ["meta/later",
                                                                          "meta/old"]
        for _ in range(2):
            assert frozen.ledger_seq == 1
            assert frozen.staged() == [ref("snap9", 7)]
            assert frozen.unreferenced_objects() == [old]
            assert frozen.objects_named("meta/", "nothing/") == [old]
            image = frozen.image()
        if engine.shared:  # other machines' uploads not in the store: left out
            (tmp_path / "left").mkdir()
            left = kind.from_image(frozen.image(leave_out=lambda r: r.name.endswith("snap9")),
                                   tmp_path / "left")
            try:
                assert left.get_blocks(inos[2], 0, 10) == {0: ref("snap0", 5)}
                assert left.get_object(ref("snap9").name) is None
            finally:
                left.close()
        else:
            with pytest.raises(ValueError):
                frozen.image(leave_out=lambda r: True)
    finally:
        frozen.close()
    assert sorted(r.name for r in engine.unreferenced_objects()) == [ref("snap0").name,
                                                                     old.name]
    restored = kind.from_image(image, tmp_path)
    try:
        assert _rows(restored, inos) == expected
        assert restored.lookup(ROOT_INO, b"later") is None
        assert Ledger(restored, KEY).verify_chain() == (1, [])
    finally:
        restored.close()


def test_a_garbage_image_is_refused_in_one_line(kind: EngineKind, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        kind.from_image(b"not a database image " * 300, tmp_path)
    assert "corrupt" in str(e.value) and "\n" not in str(e.value)


# -- namespace operations (cryptfs.meta.namespace, inherited by every engine) ---------------------
def mk(e: MetaEngine, parent: int, name: bytes, mode: int = REG, **kw: object) -> int:
    return e.mknod(parent, name, Inode(0, mode, 7, 8, 0, 0, 0, 0, 0), **kw).ino  # type: ignore


def fails(code: int, fn: Callable[..., object], *args: object, **kw: object) -> None:
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    assert e.value.errno == code, (e.value, errno.errorcode[code])


def nlinks(e: MetaEngine, *inos: int) -> list[int | None]:
    return [None if (n := e.get_inode(i)) is None else n.nlink for i in inos]


def rows(e: MetaEngine) -> tuple[object, ...]:
    """Every namespace row of an engine, to show an operation left nothing behind."""
    return (e.inode_modes(), sorted(e.all_dentries()),
            sorted((i, e.list_xattrs(i)) for i in e.inodes_with_xattrs()))


def test_mknod_makes_inode_and_entry_and_refuses_a_second_create(
    engine: MetaEngine, observer: MetaEngine
) -> None:
    ch = engine.mknod(ROOT_INO, b"d", Inode(0, DIR, 7, 8, 0, 0, 0, 0, 0),
                      {b"system.posix_acl_default": b"acl"})
    d = ch.ino
    new = observer.get_inode(d)
    assert new is not None and new.mode == DIR and new.nlink == 2 and (new.uid, new.gid) == (7, 8)
    assert new.mtime_ns == new.ctime_ns > 33
    assert observer.lookup(ROOT_INO, b"d") == d  # committed when the call returns
    assert observer.get_xattr(d, b"system.posix_acl_default") == b"acl"
    root = observer.get_inode(ROOT_INO)
    assert root is not None and root.nlink == 3 and root.mtime_ns == new.mtime_ns
    assert ch.inodes == {d: new, ROOT_INO: root} and ch.entries == {(ROOT_INO, b"d"): d}
    f = mk(engine, d, b"f", LNK, xattrs=None)
    assert nlinks(engine, d, f) == [2, 1]  # a file adds no link to its directory
    before = rows(engine)
    fails(errno.EEXIST, mk, engine, d, b"f")
    fails(errno.EEXIST, mk, engine, ROOT_INO, b"d", DIR)
    fails(errno.ENOTDIR, mk, engine, f, b"x")
    fails(errno.ENOENT, mk, engine, 4242, b"x")
    for bad, code in ((b"", errno.EINVAL), (b"a/b", errno.EINVAL), (b"..", errno.EINVAL),
                      (b"n" * 256, errno.ENAMETOOLONG)):
        fails(code, mk, engine, d, bad)
    assert rows(engine) == before


def test_mknod_in_a_known_directory(engine: MetaEngine, observer: MetaEngine) -> None:
    """``known`` (the rows a filesystem on an engine of one machine caches): the same
    outcome as without, the rows passed left as they were, and every error still raised
    with nothing written: a parent gone (its row still known), being removed, no directory."""
    d = mk(engine, ROOT_INO, b"d", DIR)
    known = {i: engine.get_inode(i) for i in (ROOT_INO, d)}
    kept = {i: replace(n) for i, n in known.items()}  # type: ignore[type-var]
    ch = engine.mknod(d, b"sub", Inode(0, DIR, 7, 8, 0, 0, 0, 0, 0), known=known)
    assert known == kept
    sub, parent = observer.get_inode(ch.ino), observer.get_inode(d)
    assert sub is not None and parent is not None and (sub.nlink, parent.nlink) == (2, 3)
    assert parent.mtime_ns == parent.ctime_ns == sub.ctime_ns
    assert ch.inodes == {ch.ino: sub, d: parent} and ch.entries == {(d, b"sub"): ch.ino}
    known[d] = parent
    f = mk(engine, d, b"f", known=known, commit=False)
    assert nlinks(engine, d, f) == [3, 1] and observer.lookup(d, b"f") is None
    engine.commit()
    assert observer.lookup(d, b"f") == f
    gone = engine.get_inode(sub.ino)
    engine.rmdir(d, b"sub")
    with engine.transaction():  # a directory being removed: no link left
        e = engine.insert_inode(inode(0, DIR, nlink=0))
    known.update((i, engine.get_inode(i)) for i in (d, f, e))
    before = rows(engine)
    fails(errno.EEXIST, mk, engine, d, b"f", known=known)
    fails(errno.ENOTDIR, mk, engine, f, b"x", known=known)
    fails(errno.ENOENT, mk, engine, sub.ino, b"x", known={sub.ino: gone})  # type: ignore
    fails(errno.ENOENT, mk, engine, e, b"x", known=known)
    assert rows(engine) == before and engine.get_inode(d) == known[d]


def test_link_and_unlink_in_a_known_directory(
    engine: MetaEngine, observer: MetaEngine
) -> None:
    """``known`` as for mknod: the same links, times and errors, nothing written on an error
    (a parent gone whose row is still known, no directory), the rows passed unchanged."""
    d = mk(engine, ROOT_INO, b"d", DIR)
    gone = mk(engine, ROOT_INO, b"gone", DIR)
    f = mk(engine, ROOT_INO, b"f")
    known = {i: engine.get_inode(i) for i in (ROOT_INO, d, gone, f)}
    engine.rmdir(ROOT_INO, b"gone")
    kept = {i: replace(n) for i, n in known.items()}  # type: ignore[type-var]
    ch = engine.link(f, d, b"g", known=known)
    parent = observer.get_inode(d)
    assert parent is not None and ch.inodes == {f: observer.get_inode(f), d: parent}
    assert (parent.nlink, parent.mtime_ns) == (2, parent.ctime_ns) and nlinks(observer, f) == [2]
    before = rows(engine)
    fails(errno.ENOENT, engine.link, f, gone, b"x", known=known)
    fails(errno.ENOTDIR, engine.link, f, f, b"x", known=known)
    assert rows(engine) == before and known == kept
    known[d] = parent
    ch = engine.unlink(d, b"g", known=known)
    after = observer.get_inode(d)
    assert after is not None and ch.inodes == {f: observer.get_inode(f), d: after}
    assert (after.nlink, after.mtime_ns) == (2, after.ctime_ns) and nlinks(observer, f) == [1]
    assert after.ctime_ns >= parent.ctime_ns and known[d] == parent
    fails(errno.ENOENT, engine.unlink, d, b"g", known=known)
    fails(errno.EISDIR, engine.unlink, ROOT_INO, b"d", known=known)


def test_a_known_row_is_taken_only_by_an_engine_of_one_machine(
    engine: MetaEngine, observer: MetaEngine
) -> None:
    """An engine that is not ``shared`` writes the known parent row touched, without reading
    it (the caller's row is the database's); a shared one reads the row other machines may
    have changed. Shown with a known row that differs from the database's, for each
    operation that takes one (mknod, link, unlink)."""
    d = mk(engine, ROOT_INO, b"d", DIR)
    for i, op in enumerate((lambda k: mk(engine, d, b"f", known=k),
                            lambda k: engine.link(engine.lookup(d, b"f"), d, b"g", known=k),
                            lambda k: engine.unlink(d, b"g", known=k))):
        row = engine.get_inode(d)
        assert row is not None
        op({d: replace(row, uid=4321 + i)})
        parent = observer.get_inode(d)
        assert parent is not None and parent.nlink == 2 and parent.ctime_ns >= row.ctime_ns
        assert parent.uid == (row.uid if engine.shared else 4321 + i)


def test_mknod_commit_false_waits_for_the_next_commit(
    engine: MetaEngine, observer: MetaEngine
) -> None:
    f = mk(engine, ROOT_INO, b"f", commit=False)
    assert engine.lookup(ROOT_INO, b"f") == f and observer.lookup(ROOT_INO, b"f") is None
    engine.commit()
    assert observer.lookup(ROOT_INO, b"f") == f


def test_link_and_unlink_count_links(engine: MetaEngine, observer: MetaEngine) -> None:
    d = mk(engine, ROOT_INO, b"d", DIR)
    f = mk(engine, ROOT_INO, b"f")
    ch = engine.link(f, d, b"g")
    assert ch.ino == f and ch.entries == {(d, b"g"): f} and ch.inodes[f].nlink == 2
    assert nlinks(observer, f, d) == [2, 2]
    fails(errno.EEXIST, engine.link, f, d, b"g")
    fails(errno.EPERM, engine.link, d, ROOT_INO, b"d2")
    fails(errno.ENOENT, engine.link, 4242, ROOT_INO, b"x")
    fails(errno.ENOTDIR, engine.link, f, f, b"x")
    ch = engine.unlink(ROOT_INO, b"f")
    assert ch.entries == {(ROOT_INO, b"f"): None} and ch.removed == set()
    assert nlinks(observer, f) == [1] and observer.lookup(ROOT_INO, b"f") is None
    fails(errno.ENOENT, engine.unlink, ROOT_INO, b"f")
    fails(errno.EISDIR, engine.unlink, ROOT_INO, b"d")
    ch = engine.unlink(d, b"g")  # the last link: the inode goes
    assert ch.removed == {f} and f not in ch.inodes and observer.get_inode(f) is None


def test_an_open_inode_outlives_its_last_link(engine: MetaEngine) -> None:
    f = mk(engine, ROOT_INO, b"f")
    engine.set_block(f, 0, ref("open"), staged=False)
    engine.commit()
    ch = engine.unlink(ROOT_INO, b"f", keep={f})
    assert ch.removed == set() and ch.inodes[f].nlink == 0
    assert engine.get_blocks(f, 0, 1) == {0: ref("open")}  # readable until closed
    assert engine.drop_unlinked(f).removed == {f}
    assert engine.get_inode(f) is None and refcount(engine, ref("open").name) == 0
    g = mk(engine, ROOT_INO, b"g")
    assert engine.drop_unlinked(g).removed == set() and nlinks(engine, g) == [1]


def test_rmdir(engine: MetaEngine, observer: MetaEngine) -> None:
    d = mk(engine, ROOT_INO, b"d", DIR)
    sub = mk(engine, d, b"sub", DIR)
    f = mk(engine, d, b"f")
    fails(errno.ENOTEMPTY, engine.rmdir, ROOT_INO, b"d")
    fails(errno.ENOTDIR, engine.rmdir, d, b"f")
    fails(errno.ENOENT, engine.rmdir, d, b"nothing")
    fails(errno.EINVAL, engine.rmdir, d, b".")
    assert nlinks(engine, ROOT_INO, d) == [3, 3]
    ch = engine.rmdir(d, b"sub")
    assert ch.removed == {sub} and ch.inodes[d].nlink == 2 and ch.entries == {(d, b"sub"): None}
    engine.unlink(d, b"f")
    assert engine.rmdir(ROOT_INO, b"d").removed == {d}
    assert nlinks(observer, ROOT_INO, d, f) == [2, None, None]
    assert observer.list_dir(ROOT_INO) == []


def test_rename_moves_and_replaces(engine: MetaEngine, observer: MetaEngine) -> None:
    a, b = mk(engine, ROOT_INO, b"a", DIR), mk(engine, ROOT_INO, b"b", DIR)
    sub = mk(engine, a, b"sub", DIR)
    f, g = mk(engine, a, b"f"), mk(engine, b, b"g")
    engine.link(g, b, b"g2")
    ch = engine.rename(a, b"sub", b, b"sub")  # a directory changes parent: '..' moves
    assert ch.entries == {(a, b"sub"): None, (b, b"sub"): sub}
    assert nlinks(observer, a, b, sub) == [2, 3, 2]
    ch = engine.rename(a, b"f", b, b"g")  # over a file with two links: it keeps one
    assert observer.lookup(b, b"g") == f and nlinks(observer, g, f) == [1, 1]
    assert ch.removed == set() and ch.inodes[g].nlink == 1
    ch = engine.rename(b, b"g", b, b"g2")  # over its last link: it goes
    assert ch.removed == {g} and observer.get_inode(g) is None
    assert observer.list_dir(b) == [(b"g2", f, REG), (b"sub", sub, DIR)]
    assert engine.rename(b, b"g2", b, b"g2") == Changed()  # onto itself: nothing happens
    engine.link(f, b, b"h")
    engine.rename(b, b"g2", b, b"h")  # two names of one inode: nothing happens
    assert observer.lookup(b, b"g2") == f and nlinks(observer, f) == [2]


def test_rename_refusals_change_nothing(engine: MetaEngine) -> None:
    a = mk(engine, ROOT_INO, b"a", DIR)
    sub = mk(engine, a, b"sub", DIR)
    mk(engine, sub, b"deep", DIR)
    full, empty = mk(engine, ROOT_INO, b"full", DIR), mk(engine, ROOT_INO, b"empty", DIR)
    mk(engine, full, b"x")
    mk(engine, ROOT_INO, b"f")
    before = rows(engine)
    fails(errno.ENOTEMPTY, engine.rename, ROOT_INO, b"a", ROOT_INO, b"full")
    fails(errno.EINVAL, engine.rename, ROOT_INO, b"a", sub, b"loop")  # below itself
    fails(errno.EINVAL, engine.rename, ROOT_INO, b"a", a, b"loop")
    fails(errno.ENOTDIR, engine.rename, ROOT_INO, b"a", ROOT_INO, b"f")
    fails(errno.EISDIR, engine.rename, ROOT_INO, b"f", ROOT_INO, b"empty")
    fails(errno.EEXIST, engine.rename, ROOT_INO, b"f", ROOT_INO, b"a", RENAME_NOREPLACE)
    fails(errno.ENOENT, engine.rename, ROOT_INO, b"nothing", ROOT_INO, b"x")
    fails(errno.ENOENT, engine.rename, ROOT_INO, b"f", ROOT_INO, b"x", RENAME_EXCHANGE)
    fails(errno.EINVAL, engine.rename, ROOT_INO, b"f", ROOT_INO, b"x", 3)
    fails(errno.EINVAL, engine.rename, ROOT_INO, b"f", ROOT_INO, b"x", 4)
    fails(errno.EINVAL, engine.rename, ROOT_INO, b"f", ROOT_INO, b"a/x")
    fails(errno.EINVAL, engine.rename, ROOT_INO, b"a", sub, b"deep", RENAME_EXCHANGE)
    fails(errno.ENOTDIR, engine.rename, a, b"sub", engine.lookup(ROOT_INO, b"f"), b"x")
    assert rows(engine) == before
    engine.rename(ROOT_INO, b"a", ROOT_INO, b"empty")  # over an empty directory: it goes
    assert engine.get_inode(empty) is None and nlinks(engine, ROOT_INO) == [4]


def test_rename_exchange(engine: MetaEngine, observer: MetaEngine) -> None:
    a, b = mk(engine, ROOT_INO, b"a", DIR), mk(engine, ROOT_INO, b"b", DIR)
    d, f = mk(engine, a, b"d", DIR), mk(engine, b, b"f")
    ch = engine.rename(a, b"d", b, b"f", RENAME_EXCHANGE)
    assert ch.entries == {(a, b"d"): f, (b, b"f"): d}
    assert (observer.lookup(a, b"d"), observer.lookup(b, b"f")) == (f, d)
    assert nlinks(observer, a, b, d, f) == [2, 3, 2, 1]  # the directory's '..' moved
    assert observer.parent_of(d) == b


def test_libfuse_hidden_entries(engine: MetaEngine, observer: MetaEngine) -> None:
    d = mk(engine, ROOT_INO, b"d", DIR)
    f = mk(engine, d, b"f")
    mine = mk(engine, d, HIDDEN + b"mine")  # a user's file that merely looks like one
    hidden = HIDDEN + b"0001"
    engine.rename(d, b"f", d, hidden, keep={f})  # libfuse hides a file unlinked while open
    assert nlinks(engine, f) == [0]
    assert [n for n, _i, _m in engine.readdir(d)] == [b".", b"..", HIDDEN + b"mine"]
    assert engine.readdir(d)[1] == (b"..", ROOT_INO, stat.S_IFDIR)
    fails(errno.ENOTEMPTY, engine.rmdir, ROOT_INO, b"d")
    engine.unlink(d, HIDDEN + b"mine")  # a name like any other: the inode goes
    assert engine.get_inode(mine) is None
    ch = engine.rmdir(ROOT_INO, b"d", keep={f})  # the hidden entry does not keep it
    assert ch.entries[(d, hidden)] is None and ch.removed == {d}
    assert nlinks(observer, f) == [0]  # still open
    assert engine.recover() == 1 and engine.get_inode(f) is None  # after a crash


def test_unlinking_a_hidden_name_takes_no_link(engine: MetaEngine) -> None:
    f = mk(engine, ROOT_INO, b"f")
    engine.rename(ROOT_INO, b"f", ROOT_INO, HIDDEN + b"1", keep={f})
    ch = engine.unlink(ROOT_INO, HIDDEN + b"1", keep={f})  # libfuse at release, file open
    assert ch.removed == set() and nlinks(engine, f) == [0]
    assert engine.drop_unlinked(f).removed == {f}


def test_setattr_and_xattrs(engine: MetaEngine, observer: MetaEngine) -> None:
    f = mk(engine, ROOT_INO, b"f")
    made = engine.get_inode(f)
    ch = engine.setattr(f, mode=0o4700 | stat.S_IFDIR, uid=5, mtime_ns=99,
                        xattrs={b"user.a": b"1"})
    node = observer.get_inode(f)
    assert made is not None and node is not None
    assert node.mode == stat.S_IFREG | 0o4700  # the type stays
    assert (node.uid, node.gid, node.mtime_ns, node.atime_ns) == (5, 8, 99, made.atime_ns)
    assert node.ctime_ns >= made.ctime_ns
    assert ch.inodes == {f: node} and observer.get_xattr(f, b"user.a") == b"1"
    engine.setattr(f, gid=6, xattrs={b"user.a": None}, commit=False)
    assert observer.get_inode(f).gid == 8 and engine.get_inode(f).gid == 6  # type: ignore
    engine.commit()
    assert observer.get_xattr(f, b"user.a") is None
    engine.setxattr(f, b"user.b", b"2", XATTR_CREATE)
    fails(errno.EEXIST, engine.setxattr, f, b"user.b", b"3", XATTR_CREATE)
    fails(errno.ENODATA, engine.setxattr, f, b"user.c", b"3", XATTR_REPLACE)
    engine.setxattr(f, b"user.b", b"3", XATTR_REPLACE)
    assert observer.get_xattr(f, b"user.b") == b"3"
    engine.removexattr(f, b"user.b")
    fails(errno.ENODATA, engine.removexattr, f, b"user.b")
    fails(errno.ENOENT, engine.setattr, 4242, mode=0)
    assert observer.list_xattrs(f) == []


def test_a_namespace_operation_failing_midway_leaves_nothing_done(
    engine: MetaEngine, observer: MetaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails after the entries changed (here: the inodes' write): the whole
    operation is undone, on the engine and for another client."""
    a, b = mk(engine, ROOT_INO, b"a", DIR), mk(engine, ROOT_INO, b"b", DIR)
    mk(engine, a, b"d", DIR)
    mk(engine, b, b"f")
    engine.link(engine.lookup(b, b"f"), b, b"f2")  # type: ignore[arg-type]
    before = rows(engine)

    def boom(*_args: object, **_kw: object) -> None:
        raise MetaError("the database failed")

    for writes_an_inode in ("update_inode", "touch_inode"):
        monkeypatch.setattr(engine, writes_an_inode, boom)
    with pytest.raises(MetaError):
        engine.rename(a, b"d", b, b"d")
    with pytest.raises(MetaError):
        engine.unlink(b, b"f")
    with pytest.raises(MetaError):
        engine.rename(b, b"f", a, b"f")
    monkeypatch.undo()
    assert rows(engine) == before == rows(observer)


def test_namespace_operations_join_an_enclosing_block(engine: MetaEngine) -> None:
    before = rows(engine)
    with pytest.raises(ZeroDivisionError), engine.transaction():
        d = mk(engine, ROOT_INO, b"d", DIR)
        mk(engine, d, b"f")
        engine.rename(d, b"f", ROOT_INO, b"g")
        _ = 1 // 0
    assert rows(engine) == before


# -- the SQLite engine's statements ------------------------------------------------------------
def test_sqlite_hot_namespace_operations_read_back_no_row_they_write(tmp_path: Path) -> None:
    """Creating, linking and unlinking a name, setting attributes, and a lookup with its inode,
    are one statement per row they touch: each inode row is written and read back in one
    UPDATE ... RETURNING, the name's existence is the entries' primary key, no row is read by
    a SELECT first."""
    e = MetaStore(tmp_path / "m.db")
    seen: list[str] = []

    def statements(fn: Callable[..., object], *args: object) -> list[str]:
        seen.clear()
        fn(*args)
        return [s.split()[0].upper() for s in seen if s.split()[0].upper() not in
                ("BEGIN", "COMMIT")]

    try:
        with e.transaction():
            e.insert_inode(inode(ROOT_INO, DIR, nlink=2))
        d = mk(e, ROOT_INO, b"d", DIR)
        e.raw.set_trace_callback(seen.append)
        assert statements(mk, e, d, b"f") == ["INSERT", "INSERT", "UPDATE"]
        f = e.lookup(d, b"f")
        assert statements(e.link, f, ROOT_INO, b"g") == ["UPDATE", "INSERT", "UPDATE"]
        assert statements(e.unlink, ROOT_INO, b"g") == ["DELETE", "UPDATE", "UPDATE"]
        assert statements(e.setattr, f, 0o600, 5, None, 1, 2) == ["UPDATE"]
        assert statements(e.lookup_stat, d, b"f", 4096, 4096) == ["SELECT"]
        assert nlinks(e, f, d, ROOT_INO) == [1, 2, 3]
    finally:
        e.raw.set_trace_callback(None)
        e.close()


# -- incremental shipping (the SQLite engine: WAL frames) ----------------------------------------
def test_sqlite_ships_what_changed_across_checkpoints_and_log_restarts(tmp_path: Path) -> None:
    """image() then changes() after each round, applied in order to a copy of the image, give
    the engine's database every time: while a checkpoint from another connection runs (it
    cannot copy frames not shipped yet), after the log restarts (a new generation of salts),
    and when a shipment was begun but never confirmed (the next one covers it)."""
    import sqlite3

    from cryptfs.meta.wal import apply_segment

    e = MetaStore(tmp_path / "m.db")
    other = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    copy = tmp_path / "copy.db"
    try:
        with e.transaction():
            e.insert_inode(inode(ROOT_INO, DIR, nlink=2))
        copy.write_bytes(e.image())
        e.shipped()

        def rows(path: Path) -> list[tuple]:
            con = sqlite3.connect(path)
            try:
                return con.execute("SELECT * FROM inodes ORDER BY ino").fetchall()
            finally:
                con.close()

        def salts() -> bytes:
            return (tmp_path / "m.db-wal").read_bytes()[16:24]

        def write_round(n: int) -> None:
            with e.transaction():
                for i in range(n):
                    e.insert_inode(inode(0, REG, size=i, target=os.urandom(200)))

        def ship(confirm: bool = True) -> None:
            seg = e.changes()
            assert seg is not None
            if confirm:
                e.shipped()
                fd = os.open(copy, os.O_RDWR)
                try:
                    apply_segment(fd, seg)
                finally:
                    os.close(fd)
                assert rows(copy) == rows(e.path)

        write_round(300)
        other.execute("PRAGMA wal_checkpoint(PASSIVE)")  # stops at the shipped position...
        first = salts()
        write_round(5)  # ...so this write cannot restart the log over the 300 not shipped
        assert salts() == first
        ship()
        write_round(5)
        ship(confirm=False)  # begun, never confirmed (the store write failed)
        write_round(5)
        ship()  # covers both rounds
        other.execute("PRAGMA wal_checkpoint(PASSIVE)")  # everything shipped: all of it
        ship()  # nothing new: an empty segment, and the pin no longer holds the log
        first = salts()
        write_round(50)  # the log restarts: a new generation
        assert salts() != first
        ship()
        with e.transaction():
            e.delete_inode(2)
        ship()
        assert e.changes() is not None  # nothing new still ships a (page-less) segment
    finally:
        other.close()
        e.close()
    assert rows(copy) == rows(tmp_path / "m.db")


def test_sqlite_bounds_its_log_while_shipping(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins keep the log from restarting, so a shipment over WAL_RESTART_BYTES truncates it
    (and the next segments start from its new first frame); a backlog over MAX_SEGMENT_WAL is
    shipped as an image instead (changes() says None)."""
    import sqlite3

    from cryptfs.meta import sqlite as engine_module
    from cryptfs.meta.wal import apply_segment

    e = MetaStore(tmp_path / "m.db")
    wal = tmp_path / "m.db-wal"
    copy = tmp_path / "copy.db"

    def rows(path: Path) -> list[tuple]:
        con = sqlite3.connect(path)
        try:
            return con.execute("SELECT * FROM inodes ORDER BY ino").fetchall()
        finally:
            con.close()

    def write_round(n: int) -> None:
        with e.transaction():
            for i in range(n):
                e.insert_inode(inode(0, REG, size=i, target=os.urandom(300)))

    try:
        with e.transaction():
            e.insert_inode(inode(ROOT_INO, DIR, nlink=2))
        copy.write_bytes(e.image())
        e.shipped()
        monkeypatch.setattr(engine_module, "WAL_RESTART_BYTES", 100_000)
        for _ in range(3):
            write_round(500)
            assert wal.stat().st_size > 100_000
            seg = e.changes()
            assert seg is not None
            e.shipped()
            assert wal.stat().st_size == 0  # truncated once shipped
            fd = os.open(copy, os.O_RDWR)
            try:
                apply_segment(fd, seg)
            finally:
                os.close(fd)
            assert rows(copy) == rows(e.path)
        monkeypatch.setattr(engine_module, "MAX_SEGMENT_WAL", 50_000)
        write_round(500)
        assert e.changes() is None  # the caller ships an image
        assert e.image()[:16] == b"SQLite format 3\0"
    finally:
        e.close()


def test_reading_the_wal_by_its_index_gives_what_the_checksums_give(tmp_path: Path) -> None:
    """With the live wal-index header, the frames after a position are taken without
    hashing each (the index's last checksum must be the last frame's); the result equals the
    long way's, from the start, from a position, and after a rolled-back transaction; an index
    that does not match the log (another end, a changed copy) is not used."""
    import sqlite3

    from cryptfs.meta import wal

    db = tmp_path / "w.db"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("CREATE TABLE t (v BLOB)")
    fd = os.open(str(db) + "-wal", os.O_RDONLY)
    calls = 0
    real = wal.checksum

    def counting(data: bytes, s: tuple[int, int], big: bool) -> tuple[int, int]:
        nonlocal calls
        calls += 1
        return real(data, s, big)

    def pread(n: int, off: int) -> bytes:
        return os.pread(fd, n, off)

    def index() -> wal.WalIndex | None:
        return wal.read_wal_index((tmp_path / "w.db-shm").read_bytes()[:96])

    try:
        wal.checksum = counting  # type: ignore[assignment]
        pos = None
        for rnd in range(3):
            for i in range(4):
                con.execute("INSERT INTO t VALUES (?)", (os.urandom(3000 + 500 * i),))
            con.execute("BEGIN")
            con.execute("INSERT INTO t VALUES (?)", (os.urandom(9000),))
            con.execute("ROLLBACK")
            calls = 0
            slow = wal.read_wal(pread, pos)
            slow_calls = calls
            calls = 0
            idx = index()
            assert idx is not None
            quick = wal.read_wal(pread, pos, index=idx)
            assert slow is not None and quick == slow and slow.db_pages
            assert calls <= 2 < slow_calls, rnd  # the WAL header's checksum only
            for bad in (wal.WalIndex(idx.salts, idx.frames - 1, idx.cksum),
                        wal.WalIndex(idx.salts, idx.frames, (idx.cksum[0] ^ 1, idx.cksum[1]))):
                calls = 0
                assert wal.read_wal(pread, pos, index=bad) == slow and calls > 2
            pos = slow.position
        shm = bytearray((tmp_path / "w.db-shm").read_bytes()[:96])
        shm[60] ^= 1  # the second copy differs: an update under way
        assert wal.read_wal_index(bytes(shm)) is None
    finally:
        wal.checksum = real  # type: ignore[assignment]
        os.close(fd)
        con.close()
