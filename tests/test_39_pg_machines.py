"""Several machines on one PostgreSQL vault (issue 14).

Engine level: two :class:`PgMetaStore` instances (two connections, as two machines) race on
the same names; every namespace operation is atomic across them (one creator gets EEXIST, a
directory removed while another creates in it leaves no orphan, two renames of one name: one
wins, and the tree stays a tree).

Through real mounts: two mounts of one vault, each with its own XDG homes (two machines, the
second attached with ``cryptfs init URL --meta``): writers of different files, then every byte
read back from both, then from the store alone (the database lost: the last machine out wrote
the checkpoint), on a local store and on S3; one name created on both at once (one EEXIST); a
rename on one seen on the other within the stated bound, and close-to-open; a mount killed with
SIGKILL: what it fsync'd is readable, its session expires and the other mount cleans it up (the
file it held open, unlinked, goes); a frozen mount whose session expired turns read-only.

Against the database operator: sessions and holds rows edited, swapped or deleted (detected or
harmless, each said why); fork consistency through the mounts (the ledger truncated under them
turns them read-only, an older dump restored refuses their mounts) and a pg_dump of a database
two mounts use, and their change notices, show no name and no plaintext marker.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from faultproxy import FaultProxy
from mount_fixtures import VaultEnv, _mounted, _tmp_root, force_unmount
from pg_fixtures import PgPlace

from cryptfs.chunks.chunkstore import ChunkStore
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.fs import CommitHooks, FileSystem
from cryptfs.meta import ROOT_INO, Inode
from cryptfs.meta.ledger import Ledger
from cryptfs.meta.postgres import (
    _FENCE,
    TOMBSTONE_MARGIN,
    DbKeys,
    PgFrozen,
    PgMetaStore,
    PgSession,
    PgWatcher,
    SessionExpired,
    pg_engine,
)
from cryptfs.paths import VaultPaths
from cryptfs.stores import ObjectStore
from cryptfs.stores.memory import MemoryStore
from cryptfs.vault.checkpointer import Checkpointer

pytestmark = pytest.mark.timeout(90)

KEYS = DbKeys.derive(b"\3" * 32, b"vault-id-0000003")
DIR, REG = 0o40755, 0o100644


def node(mode: int) -> Inode:
    return Inode(0, mode, 1000, 1000, 0, 0, 0, 0, 0)


@pytest.fixture
def machines(pg_place: PgPlace) -> Iterator[tuple[PgMetaStore, PgMetaStore]]:
    a = PgMetaStore(pg_place.url, KEYS)
    b = PgMetaStore(pg_place.url, KEYS)
    try:
        with a.transaction():
            a.insert_inode(Inode(ROOT_INO, DIR, 0, 0, 0, 2, 0, 0, 0))
        yield a, b
    finally:
        a.close()
        b.close()


def race(*calls: tuple[Any, ...]) -> list[str]:
    """Run the calls ``(function, *args)`` at once (after a barrier): "ok" or the OSError's
    errno name of each."""
    out = [""] * len(calls)
    start = threading.Barrier(len(calls), timeout=20)

    def run(i: int) -> None:
        start.wait()
        try:
            calls[i][0](*calls[i][1:])
            out[i] = "ok"
        except OSError as e:
            out[i] = errno.errorcode[e.errno]

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return out


def assert_a_tree(e: PgMetaStore) -> None:
    """Every entry in an existing directory, every inode named (but the root), link counts
    of directories right, every directory reachable from the root."""
    modes = e.inode_modes()
    entries = e.all_dentries()
    named: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    for parent, _name, ino in entries:
        assert parent in modes and stat.S_ISDIR(modes[parent][0]), (parent, _name)
        assert ino in modes, (parent, _name, ino)
        named[ino] = named.get(ino, 0) + 1
        if stat.S_ISDIR(modes[ino][0]):
            subdirs[parent] = subdirs.get(parent, 0) + 1
    for ino, (mode, nlink) in modes.items():
        if ino == ROOT_INO:
            continue
        assert named.get(ino, 0) >= 1, f"inode {ino} has no name"
        if stat.S_ISDIR(mode):
            assert named[ino] == 1 and nlink == 2 + subdirs.get(ino, 0), (ino, nlink)
    assert modes[ROOT_INO][1] == 2 + subdirs.get(ROOT_INO, 0)
    for ino in modes:  # reachable: walking up ends at the root
        seen = set()
        while ino != ROOT_INO:
            assert ino not in seen, "a directory cycle"
            seen.add(ino)
            up = e.parent_of(ino)
            assert up is not None
            ino = up
    assert e.orphan_inodes() == []


def test_two_machines_creating_one_name_one_gets_eexist(
    machines: tuple[PgMetaStore, PgMetaStore],
) -> None:
    a, b = machines
    a.get_inode(ROOT_INO), b.get_inode(ROOT_INO)  # reads leave a transaction open
    for i in range(12):
        name = f"same-{i}".encode()
        kind = DIR if i % 2 else REG
        got = race((a.mknod, ROOT_INO, name, node(kind)), (b.mknod, ROOT_INO, name, node(kind)))
        assert sorted(got) == ["EEXIST", "ok"], got
        assert a.lookup(ROOT_INO, name) == b.lookup(ROOT_INO, name) is not None
    assert len(a.list_dir(ROOT_INO)) == 12
    assert_a_tree(a)


def test_rmdir_racing_a_create_inside_leaves_no_orphan(
    machines: tuple[PgMetaStore, PgMetaStore],
) -> None:
    a, b = machines
    for i in range(12):
        d = a.mknod(ROOT_INO, f"d{i}".encode(), node(DIR)).ino
        b.get_inode(d)
        got = race((a.rmdir, ROOT_INO, f"d{i}".encode()),
                   (b.mknod, d, b"f", node(REG if i % 2 else DIR)))
        assert got in (["ok", "ENOENT"], ["ENOTEMPTY", "ok"]), got
        assert_a_tree(b)


def test_renames_racing_on_one_name_and_crosswise_keep_a_tree(
    machines: tuple[PgMetaStore, PgMetaStore],
) -> None:
    a, b = machines
    for i in range(8):
        f = f"f{i}".encode()
        a.mknod(ROOT_INO, f, node(REG))
        got = race((a.rename, ROOT_INO, f, ROOT_INO, f + b"-a"),
                   (b.rename, ROOT_INO, f, ROOT_INO, f + b"-b"))
        assert sorted(got) == ["ENOENT", "ok"], got
        x = a.mknod(ROOT_INO, f"x{i}".encode(), node(DIR)).ino
        y = a.mknod(ROOT_INO, f"y{i}".encode(), node(DIR)).ino
        # x into y and y into x at once: one of them must fail (EINVAL, or ENOENT if the
        # winner moved the loser's source away), never a cycle
        got = race((a.rename, ROOT_INO, f"x{i}".encode(), y, b"x"),
                   (b.rename, ROOT_INO, f"y{i}".encode(), x, b"y"))
        assert got.count("ok") == 1, got
        # unlink of one name on both machines: one wins, the inode goes once
        left = f + b"-a" if a.lookup(ROOT_INO, f + b"-a") else f + b"-b"
        got = race((a.unlink, ROOT_INO, left), (b.unlink, ROOT_INO, left))
        assert sorted(got) == ["ENOENT", "ok"], got
        assert_a_tree(a)


def test_two_machines_storing_the_same_content_share_one_object_row(
    machines: tuple[PgMetaStore, PgMetaStore],
) -> None:
    """Deduplication across machines: the object row is locked, not raced (no conflict, no
    lost reference count)."""
    a, b = machines
    same = ChunkRef("data/same/" + "0" * 60, 4096, b"\7" * 32)

    def store(e: PgMetaStore, name: bytes) -> None:
        with e.transaction():
            f = e.insert_inode(node(REG))
            e.set_block(f, 0, same, staged=False)

    for i in range(10):
        assert race((store, a, f"a{i}".encode()), (store, b, f"b{i}".encode())) == ["ok", "ok"]
    assert a.get_object(same.name)[1:] == (20, "stored")  # type: ignore[index]


def _unreferenced(e: PgMetaStore, r: ChunkRef) -> None:
    """``r`` recorded as stored with no reference left (a file holding it was removed)."""
    with e.transaction():
        f = e.insert_inode(node(REG))
        e.set_block(f, 0, r, staged=False)
    with e.transaction():
        e.remove_blocks_from(f, 0)
    assert e.get_object(r.name)[1:] == (0, "stored")  # type: ignore[index]


def test_collection_waits_for_a_commit_referencing_the_object_and_keeps_it(
    machines: tuple[PgMetaStore, PgMetaStore],
) -> None:
    """Machine b's commit deduplicates against an unreferenced object (its transaction holds
    the reference, not committed yet) while a's collection drops unreferenced rows: the
    collection waits for b's commit and then keeps the object (before the row was locked,
    it read the old count and deleted the row b had just referenced)."""
    a, b = machines
    r = ChunkRef("data/dd/" + "d" * 62, 4096, b"\4" * 32)
    _unreferenced(a, r)
    with b.transaction():
        f = b.insert_inode(node(REG))
        b.set_block(f, 0, r, staged=False)  # the row is b's until it commits
        dropped: list[bool] = []
        t = threading.Thread(target=lambda: dropped.append(a.drop_object_if_unreferenced(r.name)))
        t.start()
        t.join(0.5)  # a waits for b's commit (or, unfixed, for its row lock, then deletes it)
    t.join(20)
    a.commit()
    assert dropped == [False]
    assert a.get_object(r.name) == (r, 1, "stored")


def test_a_commit_never_finds_a_collected_row_gone_before_its_object(
    machines: tuple[PgMetaStore, PgMetaStore],
) -> None:
    """a collects an unreferenced object while b, which deduplicated a write against it,
    commits: b's claim waits while a deletes the object (its row locked), then finds it not
    live and b stores the object again and references its new copy. A collection that
    died after marking the row (its store deletion done or not) leaves it "deleting": not
    live either, and a commit takes the row over."""
    a, b = machines
    r = ChunkRef("data/ee/" + "e" * 62, 4096, b"\4" * 32)
    _unreferenced(a, r)
    order: list[str] = []
    deleting, go = threading.Event(), threading.Event()

    def delete(refs: list[ChunkRef]) -> set[str]:
        deleting.set()
        go.wait(20)
        order.extend(f"deleted {ref.name[:7]}" for ref in refs)
        return {ref.name for ref in refs}

    collector = threading.Thread(target=lambda: a.collect_objects([r], delete))
    collector.start()
    assert deleting.wait(20)
    claimed: list[bool] = []

    def claim() -> None:
        with b.transaction():
            claimed.append(b.claim_object(r.name))
            order.append(f"claimed {claimed[-1]}")
            if not claimed[-1]:  # stored again: a new sealing, a new hash
                b.set_block(b.insert_inode(node(REG)), 0, again, staged=False)

    again = ChunkRef(r.name, r.size, b"\6" * 32)
    committer = threading.Thread(target=claim)
    committer.start()
    committer.join(0.5)  # b waits for a's deletion
    go.set()
    collector.join(20)
    committer.join(20)
    assert order == ["deleted data/ee", "claimed False"]
    assert a.get_object(r.name) == (again, 1, "stored")
    # a collection that died between marking and deleting
    r2 = ChunkRef("data/ef/" + "f" * 62, 4096, b"\4" * 32)
    _unreferenced(a, r2)

    def dies(_refs: list[ChunkRef]) -> set[str]:
        raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        a.collect_objects([r2], dies)
    assert a.get_object(r2.name)[1:] == (0, "deleting")  # type: ignore[index]
    assert r2 in a.unreferenced_objects()  # the next collection finishes it
    again2 = ChunkRef(r2.name, r2.size, b"\7" * 32)
    with b.transaction():
        assert b.claim_object(r2.name) is False
        b.set_block(b.insert_inode(node(REG)), 0, again2, staged=False)
    assert a.get_object(r2.name) == (again2, 1, "stored")
    assert a.collect_objects([r2], dies) == []  # referenced again: not collected


def deleting(store: ObjectStore) -> Callable[[list[ChunkRef]], set[str]]:
    """A collection's delete: each object from ``store``."""
    return lambda refs: {r.name for r in refs if store.delete(r.name) is None}


def store_alone_holds(a: VaultEnv, want: dict[str, bytes], verify: bool = False) -> None:
    """The database lost: a new machine opens the vault from the store alone (onto SQLite)
    and reads every file of ``want`` whole (after a clean ``verify`` if asked)."""
    lost = VaultEnv(a.root.parent / "c", a.store_url)
    lost.init()
    if verify:
        res = lost.cli("verify", check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    lost.mount(a.root.parent / "mc")
    try:
        for rel, data in want.items():
            assert (a.root.parent / "mc" / rel).read_bytes() == data, rel
    finally:
        lost.umount(a.root.parent / "mc")


class FsMachine:
    """One machine's filesystem in-process, composed as ``Vault._start`` composes it: its own
    engine (connection) and chunk store (``keep_dedup``, as for a shared database) over a
    store all machines share."""

    def __init__(self, url: str, store: MemoryStore, staging: Path) -> None:
        hooks = CommitHooks()
        self.meta = PgMetaStore(url, KEYS, on_commit=hooks.committed,
                                on_rollback=hooks.rolled_back)
        if self.meta.get_inode(ROOT_INO) is None:
            with self.meta.transaction():
                self.meta.insert_inode(Inode(ROOT_INO, DIR, 0, 0, 0, 2, 0, 0, 0))
        staging.mkdir()
        self.chunks = ChunkStore(store, Codec(b"\3" * 32, b"vault-id-0000003"), remote=False,
                                 staging=staging, cache=None, cache_bytes=0,
                                 lookup=self._lookup, on_stored=lambda _r: None,
                                 keep_dedup=True)
        self.fs = FileSystem(self.meta, self.chunks, CHUNK, lambda: None,
                             statfs_source=lambda: os.statvfs(staging), hooks=hooks)

    def _lookup(self, name: str) -> ChunkRef | None:
        with self.fs.lock:
            found = self.meta.get_object(name)
        return found[0] if found else None

    def read(self, name: bytes) -> bytes:
        self.fs.invalidate(None)
        ino = self.fs.lookup(ROOT_INO, name).ino
        fh = self.fs.open(ino, os.O_RDONLY)
        try:
            return self.fs.read(fh, 0, 1 << 20)
        finally:
            self.fs.release(fh)

    def close(self) -> None:
        self.fs.release_all()
        self.chunks.close()
        self.meta.close()

    @classmethod
    def joining(cls, url: str, store: MemoryStore, staging: Path, name: bytes) -> bytes:
        """What a machine that joins now reads of ``name``."""
        c = cls(url, store, staging)
        try:
            return c.read(name)
        finally:
            c.close()


CHUNK = 4096


@pytest.fixture(params=[False, True], ids=["kept", "spilled"])
def fs_pair(pg_place: PgPlace, tmp_path: Path,
            request: pytest.FixtureRequest) -> Iterator[tuple[MemoryStore, FsMachine, FsMachine]]:
    """Machines a and b in-process over one memory store; b keeps the chunks it writes until
    its commit in memory, or (the second parameter) spills them to its staging at once."""
    store = MemoryStore()
    a = FsMachine(pg_place.url, store, tmp_path / "a")
    b = FsMachine(pg_place.url, store, tmp_path / "b")
    if request.param:
        b.chunks.keep_bytes = 0
    try:
        yield store, a, b
    finally:
        a.close()
        b.close()


def test_a_write_deduplicated_against_an_object_another_machine_collects_is_stored_again(
    fs_pair: tuple[MemoryStore, FsMachine, FsMachine], pg_place: PgPlace, tmp_path: Path,
) -> None:
    """Machine b writes what a file of a removed (the object unreferenced, still recorded):
    b's write deduplicates against it, and before b's commit a's collection deletes it.
    b's commit finds it collected and stores it again (from the plaintext it kept, or the
    sealed copy it spilled past its memory budget): b's file reads whole, from b and from a
    new machine (before, b's file referenced the deleted object: EIO)."""
    store, a, b = fs_pair
    data = os.urandom(3 * CHUNK + 100)
    node, fh = a.fs.create(ROOT_INO, b"x", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    a.fs.write(fh, 0, data)
    a.fs.release(fh)
    a.fs.unlink(ROOT_INO, b"x")
    garbage = a.meta.unreferenced_objects()
    assert len(garbage) == 4 and all(store.exists(r.name) for r in garbage)
    node, fh = b.fs.create(ROOT_INO, b"y", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    b.fs.write(fh, 0, data)  # sealed: deduplicated against a's objects
    with a.fs.lock:
        gone = a.meta.collect_objects(garbage, deleting(store))
    assert {r.name for r in gone} == {r.name for r in garbage}
    assert not any(store.exists(r.name) for r in gone)
    b.fs.release(fh)  # b's commit
    assert all(store.exists(r.name) for r in garbage)
    assert b.read(b"y") == data
    assert FsMachine.joining(pg_place.url, store, tmp_path / "c", b"y") == data
    assert not list((tmp_path / "b").iterdir())  # nothing kept once committed


def test_a_fresh_write_of_content_another_machine_stores_and_collects_is_stored_again(
    fs_pair: tuple[MemoryStore, FsMachine, FsMachine], pg_place: PgPlace, tmp_path: Path,
) -> None:
    """Machine b writes new content (stored, no record yet); a writes the same into a file
    (its own objects: the same bytes, convergent sealing), commits, removes it, and a's
    collection deletes them, before b's commit. The collected rows stay as tombstones (not
    recorded objects), so b's commit stores the chunks again: they are in the store with the
    recorded hashes, b's file reads whole from a new machine. Before: b's commit recorded
    the deleted objects anew (EIO reading them)."""
    store, a, b = fs_pair
    data = os.urandom(3 * CHUNK + 100)
    _node, fb = b.fs.create(ROOT_INO, b"y", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    b.fs.write(fb, 0, data)  # full chunks sealed and stored by b: nothing recorded yet
    by_b = {n: store.get(n, 1 << 20) for n, _z in store.list("data/")}
    assert len(by_b) == 3
    _node, fa = a.fs.create(ROOT_INO, b"x", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    a.fs.write(fa, 0, data)
    a.fs.release(fa)
    blobs = {n: store.get(n, 1 << 20) for n, _z in store.list("data/")}
    assert len(blobs) == 4 and by_b.items() <= blobs.items()  # a stored the same bytes
    a.fs.unlink(ROOT_INO, b"x")
    garbage = a.meta.unreferenced_objects()
    assert {r.name for r in garbage} == set(blobs)
    with a.fs.lock:
        gone = a.meta.collect_objects(garbage, deleting(store))
    assert len(gone) == 4 and not list(store.list("data/"))
    assert all(a.meta.get_object(n) is None for n in blobs)  # tombstones: no record
    assert a.meta.all_objects() == [] and a.meta.stored_bytes() == 0
    b.fs.release(fb)  # b's commit finds them collected: stores them again
    assert {n: store.get(n, 1 << 20) for n, _z in store.list("data/")} == blobs
    for ref, refcount, st in a.meta.all_objects():
        assert (refcount, st) == (1, "stored") and ref.matches(blobs[ref.name])
    assert FsMachine.joining(pg_place.url, store, tmp_path / "c", b"y") == data
    assert not list((tmp_path / "b").iterdir())  # nothing kept once committed


def test_gc_deleting_an_unrecorded_object_another_machine_then_references(
    machines: tuple[PgMetaStore, PgMetaStore],
) -> None:
    """``cryptfs gc`` on a records an object no row names (b stored it, its commit not
    done) as deleted, committed, before deleting it. b's commit then finds the tombstone and
    stores the object again; if b claimed it just before (no row: nothing to lock), its
    reference finds the tombstone and the commit runs again, storing it. A tombstone is no
    recorded object; gc finding the object recorded meanwhile leaves it alone."""
    a, b = machines
    r = ChunkRef("data/ab/" + "a" * 62, 4096, b"\4" * 32)
    again = ChunkRef(r.name, r.size, b"\6" * 32)
    claims: list[bool] = []

    def commit() -> None:
        claims.append(b.claim_object(r.name, new=True))
        if len(claims) == 1:  # gc on a, between b's claim and b's reference
            with a.transaction():
                assert a.bury_object(r.name, r.size)
        b.set_block(b.insert_inode(node(REG)), 0, r if claims[-1] else again, staged=False)

    b.atomically(commit)
    assert claims == [True, False]
    assert a.get_object(r.name) == (again, 1, "stored")
    with a.transaction():
        assert not a.bury_object(r.name, r.size)  # recorded now: not garbage
    assert a.get_object(r.name) == (again, 1, "stored")
    # gc before b's claim
    r2 = ChunkRef("data/ac/" + "c" * 62, 4096, b"\4" * 32)
    with a.transaction():
        assert a.bury_object(r2.name, r2.size)
    assert a.get_object(r2.name) is None and r2.name not in a.object_states()
    assert a.unreferenced_objects() == [] and a.objects_named("data/ac") == []
    with b.transaction():
        assert b.claim_object(r2.name, new=True) is False
        assert b.claim_object(r2.name) is False
        b.set_block(b.insert_inode(node(REG)), 0, r2, staged=False)
    assert a.get_object(r2.name) == (r2, 1, "stored")


def test_a_checkpoint_reads_its_image_while_file_operations_go_on(
    pg_place: PgPlace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The elected writer's checkpoint reads the database's rows without the filesystem lock:
    held in the middle of its image's read (a hook on the statements run), a file created and
    written and a stat on another thread complete (before, the image was read under the lock:
    they waited, and the hook gave up). The checkpoint is of the state fixed before: restored
    from the store alone, its metadata has the file written before and not the one created
    meanwhile, and its ledger (the image's, then the checkpoint's tail) is one chain to the
    checkpoint's head; the next checkpoint has the new file."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from cryptfs.meta.sqlite import MetaStore
    from cryptfs.vault.checkpoints import read_checkpoints
    from cryptfs.vault.restore import restore_from_store

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    store = MemoryStore()
    m = FsMachine(pg_place.url, store, tmp_path / "a")
    codec = Codec(b"\3" * 32, b"vault-id-0000003")
    paths = VaultPaths("writer")
    paths.data_dir.mkdir(parents=True)
    ledger = Ledger(m.meta, codec.ledger_key)
    fenced: list[str] = []
    ck = Checkpointer(meta=m.meta, ledger=ledger, chunks=m.chunks, store=store, codec=codec,
                      paths=paths, lock=m.fs.lock, metrics=None, flush_stored=lambda: None,
                      queued=lambda: False, gate=lambda: None, fence=fenced.append,
                      on_checkpoint=lambda _n, _b: None, held=lambda _pins: set())
    data = os.urandom(2 * CHUNK)
    reading, done = threading.Event(), threading.Event()
    waited: list[bool] = []
    errors: list[BaseException] = []

    def written(name: bytes, content: bytes) -> None:
        _node, fh = m.fs.create(ROOT_INO, name, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        m.fs.write(fh, 0, content)
        m.fs.release(fh)

    def hook(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        # the image's read of every directory entry, in the checkpoint's thread: held here
        # until the other thread's file operations are done (or 20 s went by)
        if threading.current_thread() is writer and "FROM dentries" in sql \
                and "WHERE" not in sql and not reading.is_set():
            reading.set()
            waited.append(done.wait(20))

    def checkpoint() -> None:
        try:
            ck.sync()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def meanwhile() -> None:
        try:
            written(b"during", b"x" * 100)
            assert m.fs.lookup(ROOT_INO, b"before").size == len(data)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            done.set()

    def restored(name: str) -> MetaStore:
        other = VaultPaths(name)
        other.data_dir.mkdir(parents=True)
        restore_from_store(other, store, codec)
        return MetaStore(other.db)

    event.listen(Engine, "before_cursor_execute", hook)
    try:
        written(b"before", data)
        writer = threading.Thread(target=checkpoint)
        writer.start()
        assert reading.wait(30)
        other = threading.Thread(target=meanwhile)
        other.start()
        other.join(30)
        writer.join(30)
        assert not errors and not fenced
        assert waited == [True]  # the file operations did not wait for the image's read
        first = restored("r1")
        try:
            assert first.lookup(ROOT_INO, b"before") is not None
            assert first.lookup(ROOT_INO, b"during") is None  # committed after the freeze
            assert Ledger(first, codec.ledger_key).verify_chain()[1] == []
            newest = read_checkpoints(store, codec)[0][0]
            assert first.ledger_last()[0] == newest.seq  # type: ignore[index]
        finally:
            first.close()
        ck.sync()
        second = restored("r2")
        try:
            assert second.lookup(ROOT_INO, b"during") is not None
            assert Ledger(second, codec.ledger_key).verify_chain()[1] == []
        finally:
            second.close()
    finally:
        event.remove(Engine, "before_cursor_execute", hook)
        done.set()
        m.close()


class _SlowDeletes(MemoryStore):
    """A store whose chunk deletes take a while, recording how many run at once."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events, self.active, self.most = events, 0, 0
        self._count = threading.Lock()

    def delete(self, name: str) -> None:
        if not name.startswith("data/"):
            return super().delete(name)
        with self._count:
            self.active += 1
            self.most = max(self.most, self.active)
            self.events.append("delete")
        time.sleep(0.02)
        try:
            super().delete(name)
        finally:
            with self._count:
                self.active -= 1


def collector(m: FsMachine, store: MemoryStore, codec: Codec) -> Checkpointer:
    """A checkpointer of machine ``m`` (elected, holding nothing) that collects (the caller
    points XDG_DATA_HOME at a temporary directory)."""
    paths = VaultPaths("collector")
    paths.data_dir.mkdir(parents=True)
    return Checkpointer(meta=m.meta, ledger=Ledger(m.meta, codec.ledger_key), chunks=m.chunks,
                        store=store, codec=codec, paths=paths, lock=m.fs.lock, metrics=None,
                        flush_stored=lambda: None, queued=lambda: False, gate=lambda: None,
                        fence=lambda _why: None, on_checkpoint=lambda _n, _b: None,
                        held=lambda _pins: set())


def test_a_collection_deletes_a_batch_at_once_and_lets_file_operations_in_between(
    pg_place: PgPlace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shared vault's collection runs under the filesystem lock a batch at a time: a
    batch's store deletes run at once (several in flight), and between two batches a file
    operation waiting for the lock gets it. The checkpoints, segments and pins it looks for
    (every object row read) are read without the lock. Every unreferenced chunk is deleted,
    the referenced one stays."""
    from cryptfs.vault import checkpointer

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    events: list[str] = []
    store = _SlowDeletes(events)
    m = FsMachine(pg_place.url, store, tmp_path / "a")
    codec = Codec(b"\3" * 32, b"vault-id-0000003")
    ck = collector(m, store, codec)
    count = 3 * checkpointer.COLLECT_BATCH
    free: list[bool] = []
    named = PgFrozen.objects_named

    def take_lock() -> None:
        got = m.fs.lock.acquire(timeout=5)
        if got:
            m.fs.lock.release()
        free.append(got)

    def objects_named(frozen: PgFrozen, *prefixes: str) -> list[ChunkRef]:
        taker = threading.Thread(target=take_lock)
        taker.start()
        taker.join(10)
        return named(frozen, *prefixes)

    monkeypatch.setattr(PgFrozen, "objects_named", objects_named)
    try:
        for i in range(count + 1):
            _node, fh = m.fs.create(ROOT_INO, b"f%d" % i, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
            m.fs.write(fh, 0, os.urandom(100))
            m.fs.release(fh)
        m.chunks.wait_uploaded()
        for i in range(count):
            m.fs.unlink(ROOT_INO, b"f%d" % i)
        stop = threading.Event()

        def file_operations() -> None:
            while not stop.is_set():
                with m.fs.lock:
                    if events and events[-1] != "operation":
                        events.append("operation")
                time.sleep(0.001)

        other = threading.Thread(target=file_operations)
        other.start()
        try:
            ck.sync(collect=True)
        finally:
            stop.set()
            other.join(10)
        deletes = [i for i, e in enumerate(events) if e == "delete"]
        assert len(deletes) == count and store.most > 1  # all of them, several at a time
        between = events[deletes[0]:deletes[-1]]
        assert between.count("operation") >= 2  # in each gap between the three batches
        assert free == [True]  # another thread took the lock while the objects were read
        assert len(list(store.list("data/"))) == 1 and m.read(b"f%d" % count)
    finally:
        m.close()


class _DeleteHook(MemoryStore):
    """A memory store that calls ``hook`` before its first deletion."""

    def __init__(self, hook: Callable[[], None]) -> None:
        super().__init__()
        self.hook: Callable[[], None] | None = hook

    def delete(self, name: str) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        super().delete(name)


def test_a_collections_del_entries_come_before_another_machine_stores_the_objects_again(
    pg_place: PgPlace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """a's collection deletes objects (a's file removed) that b's write was deduplicated
    against; b's commit waits for their rows, finds them collected and stores them again as
    soon as a's deleting transaction ends, before a's collection is over. The ledger has a's
    ``del`` of each object before b's ``put``: a writes them in the transaction that buries the
    rows. (Written at the end of the collection, they came after b's puts: the ledger called
    stored objects deleted, and verify failed.)"""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    codec = Codec(b"\3" * 32, b"vault-id-0000003")
    b_meta = PgMetaStore(pg_place.url, KEYS)
    b_ledger = Ledger(b_meta, codec.ledger_key)
    blobs: dict[str, bytes] = {}
    garbage: list[ChunkRef] = []

    def b_commit() -> None:  # b's commit of a file deduplicated against a's objects
        with b_meta.transaction():
            ino = b_meta.insert_inode(node(REG))
            for i, r in enumerate(garbage):
                if not b_meta.claim_object(r.name):  # collected: stored again (same bytes)
                    store.put(r.name, blobs[r.name])
                    b_ledger.append("put", r.name, r.size, r.sha256)
                b_meta.set_block(ino, i, r, staged=False)

    committer = threading.Thread(target=b_commit)
    store = _DeleteHook(committer.start)  # (b then waits for the rows a deletes)
    a = FsMachine(pg_place.url, store, tmp_path / "a")
    ck = collector(a, store, codec)
    drop_tombstones = a.meta.drop_tombstones

    def after_b() -> int:  # a's collection goes on once b committed
        committer.join(20)
        return drop_tombstones()

    monkeypatch.setattr(a.meta, "drop_tombstones", after_b)
    try:
        _node, fh = a.fs.create(ROOT_INO, b"x", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        a.fs.write(fh, 0, os.urandom(3 * CHUNK + 100))
        a.fs.release(fh)
        a.fs.unlink(ROOT_INO, b"x")
        garbage += a.meta.unreferenced_objects()
        blobs.update((r.name, store.get(r.name, 1 << 20)) for r in garbage)
        assert len(garbage) == 4
        ck.sync(collect=True)
        assert not committer.is_alive()
        ops: dict[str, list[str]] = {}
        for e in Ledger(b_meta, codec.ledger_key).entries():
            ops.setdefault(e.name, []).append(e.op)
        # (the harness's machine a writes no put of its own objects: its on_stored is none)
        assert all(ops[r.name] == ["del", "put"] for r in garbage), ops
        assert all(store.get(r.name, 1 << 20) == blobs[r.name] for r in garbage)
        assert all(b_meta.get_object(r.name)[1:] == (1, "stored") for r in garbage)  # type: ignore[index]
    finally:
        a.close()
        b_meta.close()


def test_a_frozen_state_blocks_no_writer_heartbeat_or_reaper_and_leaves_no_connection(
    machines: tuple[PgMetaStore, PgMetaStore], pg_place: PgPlace, tmp_path: Path,
) -> None:
    """A checkpoint's frozen state (a read-only snapshot on the engine's reader connection)
    held open: the other machine and this one commit, this one's heartbeat goes through and
    the other reaps its session once expired (the snapshot locks nothing they wait for); the
    image read after is of the state before them. The reader connection is kept for the next
    state and closed with the engine; a state still open then closes its own when it closes."""
    from cryptfs.meta.sqlite import MetaStore

    a, b = machines

    def count() -> int:
        return int(pg_place.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                "current_database() AND pid <> pg_backend_pid()")[0][0])

    def connections(want: int | None = None) -> int:
        """The server's connections to the database; with ``want``, once they are that many
        or 5 s passed (a server process leaves pg_stat_activity a moment after its client
        closed the connection)."""
        deadline = time.monotonic() + 5
        while (n := count()) != want and want is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        return n

    sa = PgSession(pg_place.url, KEYS, 60.0)
    try:
        sa.start()
        a.attach(sa.id)
        frozen = a.freeze()
        try:
            b.mknod(ROOT_INO, b"by-b", node(REG))
            a.mknod(ROOT_INO, b"by-a", node(REG))  # (fenced by its live session)
            assert sa.beat()
            pg_place.sql("UPDATE sessions SET expires = clock_timestamp() - interval '1 s'")
            assert b.reap_sessions() == (1, set())
            (tmp_path / "image.db").write_bytes(frozen.image())
        finally:
            frozen.close()
        image = MetaStore(tmp_path / "image.db")
        try:
            assert image.lookup(ROOT_INO, b"by-a") is None
            assert image.lookup(ROOT_INO, b"by-b") is None
        finally:
            image.close()
    finally:
        sa.end()
    before, deadline = -1, time.monotonic() + 5  # (the session's connection may be leaving)
    while before != (before := count()) and time.monotonic() < deadline:
        time.sleep(0.2)
    c = PgMetaStore(pg_place.url, KEYS)
    first = c.freeze()
    first.close()
    second = c.freeze()  # the kept connection
    assert connections(before + 2) == before + 2  # the engine's and its reader
    second.close()
    held = c.freeze()
    c.close()
    assert connections(before + 1) == before + 1  # the state still open
    held.close()
    assert connections(before) == before


def test_tombstones_stay_while_a_live_session_may_commit_what_it_stored_before(
    machines: tuple[PgMetaStore, PgMetaStore], pg_place: PgPlace,
) -> None:
    """A tombstone goes only once every live session's deletion horizon is more than the
    clock margin past it, or no session is live."""
    a, _b = machines
    r = ChunkRef("data/ad/" + "d" * 62, 4096, b"\4" * 32)
    with a.transaction():
        assert a.bury_object(r.name, r.size)
    s = PgSession(pg_place.url, KEYS, 60.0)
    s.start()
    try:
        assert s.beat(time.time() - 3600)  # a write begun an hour ago, not committed yet
        assert a.drop_tombstones() == 0
        assert s.beat(time.time() + TOMBSTONE_MARGIN - 10)  # within the margin
        assert a.drop_tombstones() == 0
        assert a.claim_object(r.name, new=True) is False
        a.commit()
        assert s.beat(time.time() + TOMBSTONE_MARGIN + 10)
        assert a.drop_tombstones() == 1
        assert pg_place.sql("SELECT count(*) FROM objects") == [(0,)]
        with a.transaction():
            assert a.bury_object(r.name, r.size)
    finally:
        s.end()
    assert a.drop_tombstones() == 1  # no session live
    assert pg_place.sql("SELECT count(*) FROM objects") == [(0,)]


@contextlib.contextmanager
def sessions(machines: tuple[PgMetaStore, PgMetaStore], pg_place: PgPlace, life_a: float = 60.0,
             life_b: float = 60.0) -> Iterator[tuple[PgSession, PgSession]]:
    """Each machine attached to a session of its own (lifetimes in seconds), ended after."""
    a, b = machines
    sa, sb = PgSession(pg_place.url, KEYS, life_a), PgSession(pg_place.url, KEYS, life_b)
    try:
        sa.start()
        sb.start()
        a.attach(sa.id)
        b.attach(sb.id)
        yield sa, sb
    finally:
        sa.end()
        sb.end()


def test_a_machine_whose_session_expired_cannot_commit_and_is_cleaned_up(
    machines: tuple[PgMetaStore, PgMetaStore], pg_place: PgPlace,
) -> None:
    """Fencing in the database: once its session expired by the database's clock (a frozen
    or cut-off machine) nothing it writes commits (EROFS, nothing written); another machine
    reaps the session and deletes the file only it held open with no name left."""
    a, b = machines
    with sessions(machines, pg_place, 2.0, 60.0) as (sa, sb):
        f = a.mknod(ROOT_INO, b"open-on-a", node(REG)).ino
        with a.transaction():
            a.hold(f)
        b.unlink(ROOT_INO, b"open-on-a")  # a holds it: the inode stays
        assert b.get_inode(f) is not None and b.held(f)
        assert b.reap_sessions() == (0, set()) and b.live_sessions() == 1
        time.sleep(2.3)  # a is frozen past its session's lifetime
        with pytest.raises(SessionExpired) as e:
            a.mknod(ROOT_INO, b"too-late", node(REG))
        assert e.value.errno == errno.EROFS and "\n" not in str(e.value)
        assert b.lookup(ROOT_INO, b"too-late") is None
        assert not sa.beat()  # an expired session never comes back
        assert b.live_sessions() == 0
        assert b.reap_sessions() == (1, {f})
        assert b.get_inode(f) is None and pg_place.sql("SELECT count(*) FROM holds") == [(0,)]
        assert_a_tree(b)
        assert sb.elect() and not sa.elect()  # one checkpoint writer
    assert pg_place.sql("SELECT count(*) FROM sessions") == [(0,)]


def test_an_open_holds_the_file_for_every_machine_when_it_returns(
    machines: tuple[PgMetaStore, PgMetaStore], pg_place: PgPlace,
) -> None:
    """open_inode (a mount's first open of a file): the inode as committed, with another
    machine's change made before it, and the hold committed: the other machine's unlink
    then keeps the file; an inode gone is None with no hold left behind."""
    a, b = machines
    with sessions(machines, pg_place) as (sa, sb):
        f = a.mknod(ROOT_INO, b"f", node(REG)).ino
        g = a.mknod(ROOT_INO, b"g", node(REG)).ino
        assert a.get_inode(f).size == 0  # type: ignore[union-attr]
        got = b.get_inode(f)
        assert got is not None
        got.size = 77
        b.update_inode(got)
        b.commit()
        opened = a.open_inode(f)
        assert opened is not None and opened.size == 77  # as committed, not as cached
        assert b.held(f)
        b.unlink(ROOT_INO, b"f")
        assert b.get_inode(f) is not None  # held by a: kept
        b.unlink(ROOT_INO, b"g")
        assert a.open_inode(g) is None
        assert pg_place.sql("SELECT count(*) FROM holds") == [(1,)]  # f's alone
        a.drop_unlinked(f, True)  # a closes it: gone
        assert b.get_inode(f) is None
        assert pg_place.sql("SELECT count(*) FROM holds") == [(0,)]


def test_a_commit_keeps_its_session_from_the_reaper_but_not_from_the_heartbeat(
    machines: tuple[PgMetaStore, PgMetaStore], pg_place: PgPlace,
) -> None:
    """A commit's fence (the statement sent before its COMMIT, in the same round trip)
    key-share locks its session's row until the transaction ends: the heartbeat (an update
    of the expiry) goes through meanwhile, while a live machine reaping the session (had it
    expired meanwhile) skips it and a delete of the row waits; once the transaction ends the
    reaper takes it. The fence is run here in a transaction left open, in place of the
    engine's round trip, which leaves no moment to look in between."""
    a, b = machines
    sa = PgSession(pg_place.url, KEYS, 60.0)
    try:
        sa.start()
        a.attach(sa.id)
        other = pg_engine(pg_place.url)
        with other.connect() as fenced:  # what a committing machine holds
            assert fenced.execute(_FENCE, {"sess": a._session_k}).scalar() == 1
            beats: list[bool] = []
            beat = threading.Thread(target=lambda: beats.append(sa.beat()))
            beat.start()
            beat.join(10)  # (blocked, it would end with the transaction)
            assert beats == [True]  # not blocked by the lock
            pg_place.sql("UPDATE sessions SET expires = clock_timestamp() - interval '1 s'")
            assert b.reap_sessions() == (0, set())  # locked: skipped, not waited for
            with pytest.raises(psycopg.errors.LockNotAvailable):
                pg_place.sql("SET lock_timeout = '300ms'; DELETE FROM sessions")
            assert pg_place.sql("SELECT count(*) FROM sessions") == [(1,)]
            fenced.rollback()
        other.dispose()
        assert b.reap_sessions() == (1, set())
        assert pg_place.sql("SELECT count(*) FROM sessions") == [(0,)]
    finally:
        sa.end()


def test_change_notices_reach_the_other_machines_only(
    machines: tuple[PgMetaStore, PgMetaStore], pg_place: PgPlace,
) -> None:
    """A commit's notice names the inodes it changed; its own machine's watcher skips it."""
    a, b = machines
    heard: dict[str, list[set[int] | None]] = {"a": [], "b": []}
    watchers = [PgWatcher(pg_place.url, KEYS, e.sender, heard[n].append)
                for n, e in (("a", a), ("b", b))]
    try:
        for w in watchers:
            w.start()
            assert w.listening.wait(20)
        d = a.mknod(ROOT_INO, b"made-on-a", node(DIR)).ino
        deadline = time.monotonic() + 10
        while {ROOT_INO, d} not in heard["b"]:
            assert time.monotonic() < deadline, heard
            time.sleep(0.02)
        assert heard["a"] == [None]  # (only the "anything may have changed" of its start)
    finally:
        for w in watchers:
            w.stop()


def test_tampered_sessions_and_holds_rows_are_detected_or_harmless(
    machines: tuple[PgMetaStore, PgMetaStore], pg_place: PgPlace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the database operator gets by editing, swapping or deleting rows of the tables
    several machines add (README, "what the database operator can and cannot do"):

    - a session's sealed ``v`` (host, pid, machine id) edited or swapped with another's:
      harmless — nothing reads it to decide anything (it is for people), a live session keeps
      committing;
    - a session's ``expires`` moved into the past, or the row deleted: the machine is fenced
      (its next commit is refused, EROFS, nothing written) — availability, which the operator
      controls anyway; no data is changed;
    - a hold's sealed ``v`` edited or swapped: detected when the session is reaped (one
      warning), the row dropped; the inode it named is not deleted (no name left: fsck's
      orphan), never another inode;
    - a hold deleted: not detected; the unlinked file it kept open is deleted at once, as
      deleting the file's own rows would (the operator can always destroy data); what is read
      is authentic or absent, never other data."""
    a, b = machines
    with sessions(machines, pg_place) as (sa, sb):
        f, g, h = (a.mknod(ROOT_INO, n, node(REG)).ino for n in (b"f", b"g", b"h"))
        with a.transaction():
            for ino in (f, g, h):
                a.hold(ino)
        # sessions' payloads edited and swapped: a still commits
        pg_place.sql("UPDATE sessions s SET v = o.v FROM sessions o WHERE s.k <> o.k")
        pg_place.sql("UPDATE sessions SET v = set_byte(v, 19, get_byte(v, 19) # 255)")
        a.mknod(ROOT_INO, b"still-commits", node(REG))
        # holds: f's payload edited, g's deleted, h's untouched; b unlinks all three
        fh, gh = (a._h(b"h", sa.id, i).hex() for i in (f, g))
        pg_place.sql("UPDATE holds SET v = "
                     "set_byte(v, length(v) - 1, get_byte(v, length(v) - 1) # 255) "
                     f"WHERE k = '\\x{fh}'")
        pg_place.sql(f"DELETE FROM holds WHERE k = '\\x{gh}'")
        for n in (b"f", b"g", b"h"):
            b.unlink(ROOT_INO, n)
        assert b.get_inode(g) is None  # its hold deleted: gone at once (not detected)
        assert b.get_inode(f) is not None and b.get_inode(h) is not None  # held
        # a's expiry moved into the past: a is fenced, b reaps it
        pg_place.sql(f"UPDATE sessions SET expires = now() - interval '1 second' "
                     f"WHERE k = '\\x{sa.k.hex()}'")
        with pytest.raises(SessionExpired):
            a.mknod(ROOT_INO, b"fenced", node(REG))
        with caplog.at_level("WARNING", logger="cryptfs.meta.postgres"):
            assert b.reap_sessions() == (1, {h})  # f's tampered hold names nothing
        assert [r.getMessage() for r in caplog.records].count(
            f"metadata database {b.where}: a hold of an expired session fails authentication "
            "(tampered with); it is dropped") == 1
        assert b.get_inode(f) is not None and f in b.orphan_inodes()  # left for fsck
        assert pg_place.sql("SELECT count(*) FROM holds") == [(0,)]
        # b's own session row deleted: b is fenced too (nothing written)
        pg_place.sql(f"DELETE FROM sessions WHERE k = '\\x{sb.k.hex()}'")
        with pytest.raises(SessionExpired):
            b.mknod(ROOT_INO, b"fenced-too", node(REG))
        assert b.lookup(ROOT_INO, b"fenced") is None and b.lookup(ROOT_INO, b"fenced-too") is None


# -- through real mounts ---------------------------------------------------------------------
SESSION_SECONDS = "3"  # CRYPTFS_LEASE_SECONDS: the session lifetime, short for the kill test
# what README states: a change shows on the other machines within ~1 s after its notice (the
# kernel's attribute/entry timeout), 2 s without it; the tests allow for a loaded machine
BOUND = 6.0


@contextlib.contextmanager
def machines_mounted(pg_url: str, store_url: str, count: int, session_seconds: str = SESSION_SECONDS
                     ) -> Iterator[list[tuple[VaultEnv, Path]]]:
    """``count`` machines (own XDG homes) mounting one vault on ``store_url`` (the first
    creates it, the others attach): ``[(env, mountpoint)]``; unmounted (cleanly, then by
    force) and removed at the end."""
    root = _tmp_root()
    url = store_url.replace("{root}", str(root))
    extra = {"CRYPTFS_LEASE_SECONDS": session_seconds}
    envs = [VaultEnv(root / chr(97 + i), url, extra_env=extra) for i in range(count)]
    mps = [root / f"m{chr(97 + i)}" for i in range(count)]
    try:
        envs[0].init("--meta", pg_url)  # creates the vault; the others attach to it
        for env in envs[1:]:
            env.init("--meta", pg_url)
        # the machines mount at once (as machines booting together do)
        failed: list[BaseException] = []

        def mount(env: VaultEnv, mp: Path) -> None:
            try:
                env.mount(mp)
            except BaseException as e:  # noqa: BLE001 - raised below
                failed.append(e)

        ts = [threading.Thread(target=mount, args=em) for em in zip(envs, mps, strict=True)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        if failed:
            raise failed[0]
        yield list(zip(envs, mps, strict=True))
        for env, mp in zip(envs, mps, strict=True):
            if _mounted(str(mp)):
                env.umount(mp)
    finally:
        for mp in mps:
            if _mounted(str(mp)):
                force_unmount(str(mp))
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def two_mounts(pg_place: PgPlace, request: pytest.FixtureRequest
               ) -> Iterator[tuple[VaultEnv, Path, VaultEnv, Path]]:
    """Two machines (own XDG homes) mounting one vault: on a local store shared by both, or
    (``indirect`` parameter "s3") on the moto S3 server."""
    kind = getattr(request, "param", "local")
    url = "file://{root}/store" if kind == "local" else request.getfixturevalue("s3_url")
    with machines_mounted(pg_place.url, url, 2) as ((a, ma), (b, mb)):
        yield a, ma, b, mb


def appears(path: Path, want: bool = True) -> float:
    """Seconds until ``path`` exists (``want``) or is gone; fails after BOUND."""
    start = time.monotonic()
    while os.path.lexists(path) != want:
        assert time.monotonic() - start < BOUND, f"{path} {'missing' if want else 'still there'}"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize("two_mounts", ["local", "s3"], indirect=True)
def test_two_mounts_write_different_files_and_both_read_every_byte(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path],
) -> None:
    a, ma, b, mb = two_mounts
    want: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def writer(mp: Path, tag: str) -> None:
        try:
            (mp / f"dir-{tag}").mkdir()
            for i in range(15):
                data = os.urandom(1000 + i * 37_000)
                rel = f"dir-{tag}/f{i}" if i % 2 else f"root-{tag}-{i}"
                (mp / rel).write_bytes(data)
                want[rel] = data
            for i in range(40):  # small files in the directory both write to, same content
                (mp / f"small-{tag}-{i}").write_bytes(b"same small content")
                want[f"small-{tag}-{i}"] = b"same small content"
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(ma, "a")),
          threading.Thread(target=writer, args=(mb, "b"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    for mp in (ma, mb):
        for rel, data in want.items():
            appears(mp / rel)
            assert (mp / rel).read_bytes() == data, (mp, rel)
        assert sorted(p.name for p in mp.iterdir()) == sorted(
            ["dir-a", "dir-b"] + [r for r in want if "/" not in r])
    a.umount(ma)
    b.umount(mb)  # the last machine out writes the checkpoint (it holds the writer's lock)
    store_alone_holds(a, want)


def test_one_name_created_on_both_mounts_at_once_one_gets_eexist(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path],
) -> None:
    _a, ma, _b, mb = two_mounts
    for i in range(8):
        got: list[str] = ["", ""]
        start = threading.Barrier(2, timeout=20)

        def make(k: int, mp: Path, i: int = i, start: threading.Barrier = start,
                 got: list[str] = got) -> None:
            start.wait()
            try:
                if i % 2:
                    os.mkdir(mp / f"same-{i}")
                else:
                    os.close(os.open(mp / f"same-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                got[k] = "ok"
            except OSError as e:
                got[k] = errno.errorcode[e.errno]

        ts = [threading.Thread(target=make, args=(k, mp)) for k, mp in enumerate((ma, mb))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert sorted(got) == ["EEXIST", "ok"], (i, got)
    for mp in (ma, mb):
        for i in range(8):
            appears(mp / f"same-{i}")
        assert len(os.listdir(mp)) == 8


def test_a_rename_on_one_mount_shows_on_the_other_within_the_bound(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path],
) -> None:
    _a, ma, _b, mb = two_mounts
    (ma / "old").write_bytes(b"first version")
    appears(mb / "old")
    assert (mb / "old").read_bytes() == b"first version"
    start = time.monotonic()
    os.rename(ma / "old", ma / "new")
    appears(mb / "new")
    appears(mb / "old", want=False)
    took = time.monotonic() - start
    assert (mb / "new").read_bytes() == b"first version"
    # close-to-open: rewritten and closed on A, B reads it whole once it opens it again
    (ma / "new").write_bytes(b"second version, longer than the first")
    deadline = time.monotonic() + BOUND
    while (mb / "new").read_bytes() != b"second version, longer than the first":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    print(f"rename seen on the other mount after {took:.2f}s")


def test_names_made_and_removed_in_a_directory_the_other_mount_read_whole_show_in_the_bound(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path],
) -> None:
    """On a shared vault a mount reads a directory whole at its first lookup there and
    answers names missing from it without the database; a name another machine makes or
    removes there still shows within the bound (its change notice drops the copy, and the
    caches empty every second)."""
    _a, ma, _b, mb = two_mounts
    (ma / "dir").mkdir()
    for i in range(5):
        (ma / "dir" / f"f{i}").write_bytes(b"old")
    appears(mb / "dir" / "f0")  # the directory read whole on B
    assert not os.path.lexists(mb / "dir" / "new")  # missing there
    (ma / "dir" / "new").write_bytes(b"made on A")
    took = appears(mb / "dir" / "new")
    assert (mb / "dir" / "new").read_bytes() == b"made on A"
    os.unlink(ma / "dir" / "f1")
    took = max(took, appears(mb / "dir" / "f1", want=False))
    assert sorted(os.listdir(mb / "dir")) == ["f0", "f2", "f3", "f4", "new"]
    print(f"seen on the other mount after {took:.2f}s at most")


def test_a_killed_mount_expires_and_the_other_cleans_up_after_it(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path], pg_place: PgPlace,
) -> None:
    a, ma, b, mb = two_mounts
    data = os.urandom(300_000)
    with open(mb / "kept", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    (mb / "held").write_bytes(b"open on b")
    appears(ma / "held")
    fd = os.open(mb / "held", os.O_RDONLY)  # b holds it open ...
    try:
        os.unlink(ma / "held")  # ... while a removes its last name: the inode stays
        assert pg_place.sql("SELECT count(*) FROM holds") == [(1,)]
        inodes = pg_place.sql("SELECT count(*) FROM inodes")[0][0]
        pid = int((b.data_dir / "mount.lock").read_text())
        os.kill(pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(OSError):  # (the mount is gone under it)
            os.close(fd)
    force_unmount(str(mb))
    deadline = time.monotonic() + 30  # expiry (3 s) and a's next heartbeat (1 s)
    while pg_place.sql("SELECT count(*) FROM sessions") != [(1,)]:
        assert time.monotonic() < deadline, "the dead session was not cleaned up"
        time.sleep(0.2)
    assert pg_place.sql("SELECT count(*) FROM holds") == [(0,)]
    assert pg_place.sql("SELECT count(*) FROM inodes")[0][0] == inodes - 1
    assert "cleaned up 1 expired sessions" in a.log_text()
    assert (ma / "kept").read_bytes() == data  # what the killed mount fsync'd
    (ma / "after").write_text("a still writes")
    assert (ma / "after").read_text() == "a still writes"


def test_a_frozen_mount_whose_session_expired_turns_read_only(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path], pg_place: PgPlace,
) -> None:
    a, ma, b, mb = two_mounts
    pid = int((b.data_dir / "mount.lock").read_text())
    os.kill(pid, signal.SIGSTOP)  # frozen: no heartbeat, its connections still open
    try:
        deadline = time.monotonic() + 30
        while pg_place.sql("SELECT count(*) FROM sessions") != [(1,)]:  # a reaped it
            assert time.monotonic() < deadline, "the frozen session was not cleaned up"
            time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + BOUND
    while True:  # its first commit is refused by the database, its heartbeat fences it
        try:
            os.mkdir(mb / f"late-{time.monotonic_ns()}")
        except OSError as e:
            assert e.errno == errno.EROFS, e
            break
        assert time.monotonic() < deadline, "the expired mount still writes"
        time.sleep(0.1)
    assert not [n for n in os.listdir(ma) if n.startswith("late-")]  # nothing committed
    log_text = b.log_text()
    assert log_text.count("the mount is read-only now") == 1, log_text
    assert log_text.count("session expired") <= 2, log_text  # that line and the refused op's
    (ma / "a-writes").write_text("the live machine")
    assert (ma / "a-writes").read_text() == "the live machine"


def test_an_expiry_found_by_several_threads_at_once_fences_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The heartbeat and refused commits may find the expired session together: the mount
    turns read-only with one log line (the lines are slowed here so that, unlocked, the
    threads would all pass the check before any set the reason)."""
    from types import SimpleNamespace

    from cryptfs.vault import core

    lines: list[str] = []

    def slow_error(msg: str, *args: object) -> None:
        lines.append(msg % args)
        time.sleep(0.05)

    monkeypatch.setattr(core.log, "error", slow_error)
    v: Any = SimpleNamespace(fs=SimpleNamespace(readonly=False), readonly=False,
                             readonly_reason=None, session_lost=False,
                             _fence_lock=threading.Lock())
    v.fence = lambda why: core.Vault.fence(v, why)
    threads = [threading.Thread(target=core.Vault._session_expired, args=(v, f"expired {i}"))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(lines) == 1, lines
    assert v.session_lost and v.fs.readonly and v.readonly_reason in lines[0]


MARKERS = (b"secret-dir-MARKER1", b"secret-name-MARKER2", b"PLAINTEXT-MARKER3",
           b"MARKER4-symlink-target", b"link-MARKER5", b"MARKER6", b"MARKER7-value",
           b"after-the-dump-MARKER8", b"MARKER")


def assert_no_marker(blob: bytes, what: str) -> None:
    low = blob.lower()
    for m in MARKERS:
        assert m.lower() not in low and m.hex().encode() not in low, (what, m)


def head_seq(env: VaultEnv) -> int:
    p = env.data_dir / "head.json"
    return int(json.loads(p.read_text())["seq"]) if p.exists() else 0


def test_a_rolled_back_or_truncated_database_is_detected_and_its_dump_shows_nothing(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path], pg_place: PgPlace,
) -> None:
    """Two machines use the database: a pg_dump of it (sessions and holds included) and the
    change notices they send show no name and no plaintext marker. Each machine records the
    newest ledger head it verified in its head file; the ledger truncated under the mounts
    turns both read-only (one log line each); the older dump restored refuses both mounts
    (one line, exit code 6), although nothing in the restored database fails to open, until
    ``cryptfs verify --accept`` takes its state deliberately."""
    a, ma, b, mb = two_mounts
    d = ma / "secret-dir-MARKER1"
    d.mkdir()
    f = d / "secret-name-MARKER2.txt"
    f.write_bytes(b"PLAINTEXT-MARKER3 " * 1000)
    os.symlink("MARKER4-symlink-target", ma / "link-MARKER5")
    os.setxattr(f, "user.MARKER6", b"MARKER7-value")
    appears(mb / "secret-dir-MARKER1" / "secret-name-MARKER2.txt")
    fd = os.open(mb / "secret-dir-MARKER1" / "secret-name-MARKER2.txt", os.O_RDONLY)
    try:
        assert os.read(fd, 17) == b"PLAINTEXT-MARKER3"
        assert pg_place.sql("SELECT count(*) FROM holds") == [(1,)]
        assert pg_place.sql("SELECT count(*) FROM sessions") == [(2,)]
        old = pg_place.server.pg_dump(pg_place.db, pg_place.schema)
        assert b".holds (" in old and b".sessions (" in old
        assert_no_marker(old, "pg_dump")
        # the change notices of a commit on a (heard by a listener of the test's own)
        listens = pg_place.server.admin(
            "SELECT DISTINCT query FROM pg_stat_activity WHERE query LIKE 'LISTEN %' "
            f"AND datname = '{pg_place.db}'")
        assert len(listens) == 1, listens
        with psycopg.connect(pg_place.server.dsn(pg_place.db), autocommit=True) as lc:
            lc.execute(str(listens[0][0]).encode())
            with open(ma / "after-the-dump-MARKER8", "wb") as w:
                w.write(b"PLAINTEXT-MARKER3 and more " * 2000)
                os.fsync(w.fileno())
            notices = [n.payload for n in lc.notifies(timeout=BOUND, stop_after=1)]
        assert notices
        for p in notices:
            assert_no_marker(p.encode() + base64.b64decode(p), "change notice")
        appears(mb / "after-the-dump-MARKER8")
        # both machines record the newest head they verified
        newest = int(pg_place.sql("SELECT max(seq) FROM ledger")[0][0])  # type: ignore[arg-type]
        deadline = time.monotonic() + 2 * BOUND  # (a heartbeat is 1 s here; a loaded machine)
        while min(head_seq(a), head_seq(b)) < newest:
            assert time.monotonic() < deadline, (head_seq(a), head_seq(b), newest)
            time.sleep(0.1)
        # the ledger truncated under the mounts: both turn read-only
        pg_place.sql(f"DELETE FROM ledger WHERE seq > {newest - 2}")
        for env, mp in ((a, ma), (b, mb)):
            deadline = time.monotonic() + 2 * BOUND
            while True:
                try:
                    os.mkdir(mp / f"late-{time.monotonic_ns()}")
                except OSError as e:
                    assert e.errno == errno.EROFS, e
                    break
                assert time.monotonic() < deadline, "a forked mount still writes"
                time.sleep(0.1)
            log_text = env.log_text()
            assert log_text.count("the mount is read-only now") == 1, log_text
            assert "read-only now: the ledger in the metadata database" in log_text and \
                "rolled back, truncated or shows this machine another history" in log_text, \
                log_text
        assert (mb / "after-the-dump-MARKER8").read_bytes()[:17] == b"PLAINTEXT-MARKER3"
    finally:
        os.close(fd)
    a.umount(ma)
    b.umount(mb)
    # an older dump restored: every row in it opens, but it is behind what both machines saw
    pg_place.server.restore(pg_place.db, pg_place.schema, old)
    for env, mp in ((a, ma), (b, mb)):
        res = env.cli("mount", "--name", env.name, str(mp), check=False)
        assert res.returncode == 6, (res.returncode, res.stderr)
        line = res.stderr.strip()
        assert "\n" not in line and "the ledger in the metadata database ends at sequence" in line \
            and "this machine saw sequence" in line, line
        assert not _mounted(str(mp))
    # accepting the database's state deliberately makes it a's reference again
    res = a.cli("verify", "--accept", "--name", a.name, check=False)
    assert "accepted the current state" in res.stdout, (res.stdout, res.stderr)
    a.mount(ma)
    assert (ma / "secret-dir-MARKER1" / "secret-name-MARKER2.txt").read_bytes() == \
        b"PLAINTEXT-MARKER3 " * 1000
    assert not (ma / "after-the-dump-MARKER8").exists()  # (what the restored dump lacks)


MiB = 1 << 20


def _write_at(path: Path, parts: dict[int, bytes]) -> int:
    """Open ``path`` (existing) and write ``{offset: data}``; returns the fd (still open)."""
    fd = os.open(path, os.O_WRONLY)
    for off, data in parts.items():
        os.pwrite(fd, data, off)
    return fd


def test_two_mounts_writing_one_file_both_writes_land(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path],
) -> None:
    """Both machines have one file open and write disjoint (chunk-aligned) ranges; each fsyncs
    and closes. The second commit merges with the first (the other machine's chunks kept,
    the larger size), whichever comes first; both then read the union."""
    _a, ma, _b, mb = two_mounts
    (ma / "shared").write_bytes(b"")
    appears(mb / "shared")
    want = bytearray(3 * MiB)
    a_parts = {0: os.urandom(MiB), 2 * MiB: os.urandom(MiB)}  # a's file ends at 3 MiB
    b_parts = {MiB: os.urandom(MiB)}  # b's at 2 MiB: the larger size must stay
    fa, fb = _write_at(ma / "shared", a_parts), _write_at(mb / "shared", b_parts)
    for fd in (fa, fb):  # a commits first, b's commit merges
        os.fsync(fd)
        os.close(fd)
    for off, data in {**a_parts, **b_parts}.items():
        want[off:off + len(data)] = data
    # round two: b extends the file while a rewrites its first chunk; b commits first
    a_parts = {0: os.urandom(MiB)}
    b_parts = {3 * MiB: os.urandom(MiB // 2)}
    fa, fb = _write_at(ma / "shared", a_parts), _write_at(mb / "shared", b_parts)
    for fd in (fb, fa):
        os.fsync(fd)
        os.close(fd)
    want[0:MiB] = a_parts[0]
    want += b_parts[3 * MiB]
    for mp in (ma, mb):
        deadline = time.monotonic() + BOUND
        while (got := (mp / "shared").read_bytes()) != want:
            assert time.monotonic() < deadline, (mp, len(got), len(want))
            time.sleep(0.05)
    os.truncate(mb / "shared", MiB)  # a truncate sets the size (the larger does not win)
    for mp in (mb, ma):
        deadline = time.monotonic() + BOUND
        while (got := (mp / "shared").read_bytes()) != want[:MiB]:
            assert time.monotonic() < deadline, (mp, len(got))
            time.sleep(0.05)


OUTAGE_OP_SECONDS = 20.0  # an operation during the outage answers within this (never hangs)


@pytest.mark.log_problems_expected
def test_postgresql_stopped_and_started_under_two_mounts(pg_place: PgPlace) -> None:
    """The database server stops and starts again while two machines are mounted: operations
    meanwhile answer (served from what is cached, or EIO) within a bound, never hang; nothing
    fsync'd is lost; both mounts write again once it is back, without a remount. (Sessions
    live 30 s here: an outage longer than a session's lifetime turns a mount read-only, as a
    frozen machine's.)"""
    server = pg_place.server
    with machines_mounted(pg_place.url, "file://{root}/store", 2, session_seconds="30"
                          ) as ((a, ma), (b, mb)):
        kept = os.urandom(600_000)
        with open(ma / "kept", "wb") as f:
            f.write(kept)
            f.flush()
            os.fsync(f.fileno())
        appears(mb / "kept")
        server.halt()
        outcomes: list[str] = []
        try:
            for mp in (ma, mb):
                for op in (lambda mp=mp: (mp / "during").write_bytes(b"x"),
                           lambda mp=mp: os.mkdir(mp / "during-dir"),
                           lambda mp=mp: (mp / "kept").read_bytes(),
                           lambda mp=mp: os.listdir(mp)):
                    start = time.monotonic()
                    try:
                        op()
                        outcomes.append("ok")
                    except OSError as e:
                        outcomes.append(errno.errorcode[e.errno])
                    assert time.monotonic() - start < OUTAGE_OP_SECONDS, outcomes
        finally:
            server.start()
        assert set(outcomes) <= {"ok", "EIO"}, outcomes
        assert "EIO" in outcomes  # (no write can commit without the database)
        for env, mp in ((a, ma), (b, mb)):  # both write again, without a remount
            deadline = time.monotonic() + 30
            while True:
                try:
                    (mp / f"after-{env.root.name}").write_bytes(env.root.name.encode() * 1000)
                    break
                except OSError as e:
                    assert e.errno == errno.EIO and time.monotonic() < deadline, e
                    time.sleep(0.5)
        for mp in (ma, mb):
            assert (mp / "kept").read_bytes() == kept
            for name in ("a", "b"):
                appears(mp / f"after-{name}")
                assert (mp / f"after-{name}").read_bytes() == name.encode() * 1000
        for env in (a, b):  # one line per failed operation, one per thread that noticed
            problems = [line for line in env.log_text().splitlines()
                        if " WARNING " in line or " ERROR " in line]
            assert len(problems) <= outcomes.count("EIO") + 3, problems


def test_gc_on_another_machine_keeps_what_a_mounted_machine_is_writing(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path], pg_place: PgPlace,
) -> None:
    """``cryptfs gc --grace 0`` on a third machine while b has a file open with chunks
    stored but not committed (the database does not know them yet): only b's deletion
    horizon keeps them, and they stay; an old unrecorded object is deleted; b's file, closed
    afterwards, reads whole on a."""
    a, ma, _b, mb = two_mounts
    assert a.store_dir is not None
    garbage = a.store_dir / "data" / "zz" / ("f" * 64)
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(b"an object nothing records")
    old = time.time() - 7200
    os.utime(garbage, (old, old))
    c = VaultEnv(a.root.parent / "c", a.store_url, extra_env={"CRYPTFS_LEASE_SECONDS": "30"})
    c.init("--meta", pg_place.url)
    data = os.urandom(5 * MiB)
    (a.root.parent / "data").write_bytes(data)
    # the writer is a process of its own: a file descriptor of this one would be closed (a
    # FUSE flush: a commit) in every child it starts, the gc's among them
    writer = subprocess.Popen(
        [sys.executable, "-c", "import os, sys\n"
         "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
         "os.write(fd, open(sys.argv[2], 'rb').read())\n"
         "print('written', flush=True)\n"
         "sys.stdin.read()\n"
         "os.close(fd)\n",
         str(mb / "being-written"), str(a.root.parent / "data")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "written\n"
        deadline = time.monotonic() + 30
        while True:  # (sealing is asynchronous) b's stored, unrecorded chunks
            dry = c.cli("gc", "--name", c.name, "--grace", "0", "--dry-run").stdout
            kept = [ln for ln in dry.splitlines() if ln.startswith("keeping data/")]
            if len(kept) >= 4:
                break
            assert time.monotonic() < deadline, dry
            time.sleep(0.5)
        assert f"would delete data/zz/{'f' * 64}" in dry, dry
        out = c.cli("gc", "--name", c.name, "--grace", "0").stdout
        assert "gc: deleted 1 unreferenced objects" in out, out
    finally:
        writer.communicate("", timeout=60)  # b closes the file: it commits
    assert writer.returncode == 0
    assert not garbage.exists()
    appears(ma / "being-written")
    assert (ma / "being-written").read_bytes() == data
    assert (mb / "being-written").read_bytes() == data


def _data_objects(env: VaultEnv) -> dict[str, int]:
    """The chunk objects in ``env``'s local store: name -> size."""
    assert env.store_dir is not None
    found: dict[str, int] = {}
    for p in (env.store_dir / "data").glob("*/*"):
        with contextlib.suppress(FileNotFoundError):  # (collected meanwhile)
            if not p.name.startswith("."):
                found[str(p.relative_to(env.store_dir))] = p.stat().st_size
    return found


def test_a_mount_writing_what_the_other_removes_while_it_collects_loses_nothing(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path], pg_place: PgPlace,
) -> None:
    """Through the mounts, in the order that lost data: a writes a file; b writes the same
    bytes into a file it keeps open (its chunks deduplicated against a's); a removes its
    file (the chunks' last reference) and both fsync another file (asking the elected
    writer, whichever it is, for a checkpoint, which collects them: the test waits until a's
    last chunk, which b has not written yet, is gone from the store); then b closes its
    file. Each round, b's file
    reads whole on both mounts, and after both unmount, from the store alone (the database
    lost), where verify is clean (the chunks b stored again have their ledger entries)."""
    a, ma, b, mb = two_mounts
    kept: dict[str, bytes] = {}
    for i in range(4):
        data = os.urandom(3 * (256 << 10) + 1000 + i)  # full chunks (256 KiB) sealed at write
        before = _data_objects(a)
        (ma / f"a{i}").write_bytes(data)
        added = {n: size for n, size in _data_objects(a).items() if n not in before}
        tail = min(added, key=lambda n: added[n])  # a's last chunk (1000 bytes)
        appears(mb / f"a{i}")
        with open(mb / f"b{i}", "wb") as f:
            f.write(data)  # deduplicated against a's chunks, not committed yet
            os.unlink(ma / f"a{i}")
            for mp in (ma, mb):
                with open(mp / f"sync-{mp.name}", "wb") as g:
                    g.write(os.urandom(100 + i))
                    os.fsync(g.fileno())  # asks the writer for a checkpoint: collection
            deadline = time.monotonic() + 60
            while (a.store_dir / tail).exists():  # type: ignore[operator]
                assert time.monotonic() < deadline, "the writer's checkpoint collected nothing"
                time.sleep(0.1)
        kept[f"b{i}"] = data
        for mp in (ma, mb):
            appears(mp / f"b{i}")
            assert (mp / f"b{i}").read_bytes() == data, (mp, i)
    # (whichever is the writer: b's own collection marks the rows but skips what b pinned)
    assert "was deduplicated against it" in b.log_text()
    # a third machine verifies while both are mounted: b's commit wrote the ledger entries of
    # what it stored again (a later commit's would come after the object's later history)
    c = VaultEnv(a.root.parent / "c3", a.store_url, extra_env={"CRYPTFS_LEASE_SECONDS": "30"})
    c.init("--meta", pg_place.url)
    res = c.cli("verify", "--name", c.name, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    a.umount(ma)
    b.umount(mb)
    store_alone_holds(a, kept, verify=True)


def test_fsck_checks_while_other_machines_write_and_repairs_only_alone(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path], pg_place: PgPlace,
) -> None:
    """``cryptfs fsck`` on a third machine while a and b are mounted and a writes: the check
    reads one snapshot and is clean; ``--repair`` is refused with one line and exit code 8
    (before: it ran, its repairs racing the mounts' commits); once both are unmounted it
    runs."""
    a, ma, b, mb = two_mounts
    (mb / "g").write_bytes(os.urandom(100_000))
    c = VaultEnv(a.root.parent / "c", a.store_url, extra_env={"CRYPTFS_LEASE_SECONDS": "30"})
    c.init("--meta", pg_place.url)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            (ma / f"w{i}").write_bytes(os.urandom(5000 + i))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        res = c.cli("fsck", "--name", c.name, check=False)
        refused = c.cli("fsck", "--name", c.name, "--repair", check=False)
    finally:
        stop.set()
        t.join(30)
    assert res.returncode == 0 and "fsck: clean" in res.stdout, res.stdout + res.stderr
    assert refused.returncode == 8, refused.stdout + refused.stderr
    assert "2 other machine(s) have this vault mounted" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) <= 2 and "Traceback" not in refused.stderr
    assert pg_place.sql("SELECT count(*) FROM sessions") == [(2,)]  # c's went
    a.umount(ma)
    b.umount(mb)
    res = c.cli("fsck", "--name", c.name, "--repair", check=False)
    assert res.returncode == 0 and "fsck: clean" in res.stdout, res.stdout + res.stderr


@pytest.mark.timeout(240)
def test_a_checkpoint_leaves_out_chunks_another_machine_has_not_uploaded(
    pg_place: PgPlace, s3_server: Any, s3_bucket: str,
) -> None:
    """b reaches the bucket through a proxy that fails its uploads (they stay staged, b
    retries): b's file is committed in the database, its chunks are not in the store. a,
    the checkpoint writer, unmounts: its final checkpoint waits for b's uploads, then leaves
    them out (one warning). b dies. The database lost, the store alone opens onto SQLite and
    verifies clean: a's file whole, b's file with holes where its chunks were (before, the
    checkpoint named objects the store never got: verify found them missing)."""
    root = _tmp_root()
    proxy = FaultProxy(s3_server.endpoint).start()
    extra = {"CRYPTFS_LEASE_SECONDS": SESSION_SECONDS}
    a = VaultEnv(root / "a", f"s3://{s3_bucket}/vault?endpoint={s3_server.endpoint}",
                 extra_env=extra)
    b = VaultEnv(root / "b", f"s3://{s3_bucket}/vault?endpoint={proxy.endpoint}",
                 extra_env=extra)
    ma, mb, mc = root / "ma", root / "mb", root / "mc"
    try:
        a.init("--meta", pg_place.url)
        b.init("--meta", pg_place.url)
        a.mount(ma)  # first: a holds the checkpoint writer's lock
        b.mount(mb)
        data = os.urandom(200_000)
        (ma / "from-a").write_bytes(data)
        proxy.set_fault("error500", methods={"PUT"})
        (mb / "from-b").write_bytes(os.urandom(100_000))  # committed; its chunks staged on b
        appears(ma / "from-b")
        assert pg_place.sql("SELECT count(*) FROM objects")[0][0] > 0
        a.umount(ma)
        os.kill(int((b.data_dir / "mount.lock").read_text()), signal.SIGKILL)
        force_unmount(str(mb))
        lost = VaultEnv(root / "c", a.store_url)  # the database lost: the store alone
        lost.init()
        res = lost.cli("verify", check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "this checkpoint leaves them out" in a.log_text()
        lost.mount(mc)
        try:
            assert (mc / "from-a").read_bytes() == data
            assert (mc / "from-b").read_bytes() == bytes(100_000)  # holes
        finally:
            lost.umount(mc)
    finally:
        proxy.stop()
        for mp in (ma, mb, mc):
            if _mounted(str(mp)):
                force_unmount(str(mp))
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _newest_checkpoint(env: VaultEnv) -> int:
    """The sequence of the newest checkpoint object in ``env``'s local store (0: none)."""
    assert env.store_dir is not None
    try:
        names = os.listdir(env.store_dir / "checkpoints")
    except FileNotFoundError:
        return 0
    return max((int(n) for n in names if n.isdigit()), default=0)


def _kill_mount(env: VaultEnv, mp: Path) -> None:
    """kill -9 the mount daemon of ``env`` (no final checkpoint), then drop its mount."""
    os.kill(int((env.data_dir / "mount.lock").read_text()), signal.SIGKILL)
    force_unmount(str(mp))


@pytest.mark.timeout(180)
def test_the_writers_fsync_stops_at_the_database_and_a_checkpoint_follows(
    pg_place: PgPlace,
) -> None:
    """On a PostgreSQL vault the checkpoint writer's fsync (a single machine: the writer)
    returns without storing a checkpoint (before, each one stored a full metadata image):
    killed with SIGKILL right after it, no newer checkpoint is in the store, and a remount
    reads the file whole (the database is the durability point). An fsync asks for a
    checkpoint in the background: it comes (bounded), and with the mount killed again (no
    unmount checkpoint) the store alone opens with the file."""
    root = _tmp_root()
    env = VaultEnv(root / "a", f"file://{root}/store",
                   extra_env={"CRYPTFS_LEASE_SECONDS": SESSION_SECONDS})
    mp = root / "m"

    def fsynced(name: str, data: bytes) -> None:
        with open(mp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def checkpoint_after(seq: int) -> int:
        """Wait (bounded) for a checkpoint newer than ``seq``, asking with an fsync of the
        mount's root (nothing new to make durable) every half second."""
        deadline = time.monotonic() + 60
        while (newest := _newest_checkpoint(env)) <= seq:
            assert time.monotonic() < deadline, "no checkpoint followed the fsync"
            fd = os.open(mp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            time.sleep(0.5)
        return newest

    try:
        env.init("--meta", pg_place.url)
        env.mount(mp)
        first, second = os.urandom(70_000), os.urandom(600_000)
        fsynced("first", first)
        ck = checkpoint_after(_newest_checkpoint(env))
        # the next requested checkpoint waits at least a second after that one's round ended
        # (REQUEST_SPACING): the kill right after the fsync lands in that window
        fsynced("second", second)
        _kill_mount(env, mp)
        assert _newest_checkpoint(env) == ck  # the fsync stored no checkpoint
        env.mount(mp)
        assert (mp / "second").read_bytes() == second  # durable in the database
        checkpoint_after(ck)  # (the mount before the kill never checkpointed "second")
        _kill_mount(env, mp)
        store_alone_holds(env, {"first": first, "second": second})
    finally:
        for m in (mp, root / "mc"):
            if _mounted(str(m)):
                force_unmount(str(m))
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.mark.timeout(240)  # four machines made and mounted: about 40 s of it on an idle host
def test_four_mounts_on_s3_write_different_directories_and_all_read_every_byte(
    pg_place: PgPlace, s3_url: str,
) -> None:
    """Four machines on one S3 vault write files in their own directories at once (a file
    of two chunks among them); every mount then reads every byte of every file."""
    with machines_mounted(pg_place.url, s3_url, 4) as mounts:
        want: dict[str, bytes] = {}
        errors: list[BaseException] = []

        def writer(i: int, mp: Path) -> None:
            try:
                (mp / f"dir-{i}" / "sub").mkdir(parents=True)
                for j, size in enumerate((100, 70_000, 1_100_000)):
                    rel = f"dir-{i}/{'sub/' if j % 2 else ''}f{j}"
                    data = os.urandom(size)
                    (mp / rel).write_bytes(data)
                    want[rel] = data
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        start = time.monotonic()
        ts = [threading.Thread(target=writer, args=(i, mp))
              for i, (_env, mp) in enumerate(mounts)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errors, errors
        print(f"written after {time.monotonic() - start:.1f}s")
        assert len(want) == 12
        for _env, mp in mounts:
            for rel, data in want.items():
                appears(mp / rel)
                assert (mp / rel).read_bytes() == data, (mp, rel)
            assert sorted(os.listdir(mp)) == [f"dir-{i}" for i in range(4)]
        print(f"read back after {time.monotonic() - start:.1f}s")
