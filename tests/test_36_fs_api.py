"""The filesystem layer's API in-process, without FUSE (like S3QL's t3_fs_api).

A :class:`cryptfs.fs.FileSystem` composed as ``Vault._start`` composes it, over a memory store
and a real SQLite engine, with a small chunk size so chunk boundaries are cheap to reach. Every
failure must be an ``OSError`` with the right errno (the FUSE layer passes it on as it is).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cryptfs.chunks.chunkstore import ChunkStore
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.fs import HIDDEN, CommitHooks, FileSystem
from cryptfs.fs.base import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    SEEK_DATA,
    SEEK_HOLE,
    XATTR_CREATE,
    XATTR_REPLACE,
)
from cryptfs.meta import ROOT_INO, Inode
from cryptfs.meta.sqlite import MetaStore
from cryptfs.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(60)

CS = 4096  # chunk size
UID, GID = os.getuid(), os.getgid()
RW = os.O_RDWR


def open_engine(path: Path) -> tuple[MetaStore, CommitHooks]:
    """An engine whose commits and rollbacks a filesystem built with the hooks hears."""
    hooks = CommitHooks()
    return MetaStore(path, on_commit=hooks.committed, on_rollback=hooks.rolled_back), hooks


class Rig:
    """A FileSystem over a memory store and a SQLite file, as Vault._start composes it."""

    def __init__(self, tmp_path: Path, remote: bool = False,
                 store: MemoryStore | None = None, db_dir: Path | None = None) -> None:
        self.tmp_path = tmp_path
        self.remote = remote
        self.closed = False
        self.meta, hooks = open_engine((db_dir or tmp_path) / "m.db")
        if self.meta.get_inode(ROOT_INO) is None:
            now = time.time_ns()
            with self.meta.transaction():
                self.meta.insert_inode(Inode(ROOT_INO, 0o40755, UID, GID, 0, 2, now, now, now))
        self.store = store if store is not None else MemoryStore()
        self.stored: list[ChunkRef] = []
        staging = tmp_path / "staging"
        staging.mkdir(exist_ok=True)
        self.chunks = ChunkStore(
            self.store,
            Codec(b"m" * 32, b"v" * 16),
            remote=remote,
            staging=staging,
            cache=tmp_path / "cache" if remote else None,
            cache_bytes=1 << 20,
            lookup=self._lookup,
            on_stored=self._on_stored,
        )
        self.fs = FileSystem(self.meta, self.chunks, CS, lambda: None,
                             statfs_source=lambda: os.statvfs(tmp_path), hooks=hooks)

    def _on_stored(self, ref: ChunkRef) -> None:
        """As the vault: a remote upload marks the object stored (the local store's refs are
        recorded for the ledger)."""
        self.stored.append(ref)
        if self.remote:
            with self.fs.lock, self.meta.transaction():
                self.meta.mark_stored(ref.name)

    def _lookup(self, name: str) -> ChunkRef | None:
        with self.fs.lock:
            found = self.meta.get_object(name)
        return found[0] if found else None

    def check(self) -> None:
        """What fsck checks, through the engine's interface: after every release, each inode
        is reachable from the root, its link count is its names (a directory's: 2 and its
        subdirectories), and each chunk object's reference count is the chunk maps using it."""
        self.fs.release_all()
        self.fs.commit_deferred()
        meta = self.meta
        with self.fs.lock:
            # no libfuse hidden entry is left (one the inode does not count as a link; a
            # user's file whose name only begins the same way counts like any other)
            leftover = [h for h in meta.hidden_dentries(HIDDEN)
                        if len(meta.names_of(h[2])) > meta.get_inode(h[2]).nlink]  # type: ignore
            assert leftover == [] and meta.orphan_inodes() == []
            names: dict[int, int] = {}
            subdirs: dict[int, int] = {ROOT_INO: 0}
            todo, seen = [ROOT_INO], {ROOT_INO}
            while todo:
                d = todo.pop()
                for _name, ino, mode in meta.list_dir(d):
                    names[ino] = names.get(ino, 0) + 1
                    if stat.S_ISDIR(mode):
                        subdirs[d] += 1
                        subdirs[ino] = 0
                        assert ino not in seen, "a directory with two names"
                        seen.add(ino)
                        todo.append(ino)
                    seen.add(ino)
            assert meta.count_inodes() == len(seen), "inodes no name reaches"
            uses: dict[str, int] = {}
            for ino in seen:
                node = meta.get_inode(ino)
                assert node is not None
                if stat.S_ISDIR(node.mode):
                    assert node.nlink == 2 + subdirs[ino], f"nlink of directory {ino}"
                    continue
                assert node.nlink == names[ino], f"nlink of inode {ino}"
                for r in meta.get_blocks(ino, 0, 1 << 62).values():
                    uses[r.name] = uses.get(r.name, 0) + 1
            counts = {r.name: n for r, n, _st in meta.all_objects() if n > 0}
            assert counts == uses, "reference counts differ from the chunk maps"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.fs.release_all()
        self.fs.commit_deferred()
        self.chunks.close()
        self.meta.close()


@pytest.fixture(autouse=True)
def no_warnings(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
                ) -> Iterator[None]:
    """The filesystem logs no warning or error, unless the test expects them."""
    with caplog.at_level(logging.WARNING, logger="cryptfs"):
        yield
    if request.node.get_closest_marker("log_problems_expected") is None:
        bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert bad == []


@pytest.fixture(params=["local", "remote"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    """Chunks written to the store at once (local) or staged and uploaded (remote)."""
    r = Rig(tmp_path, remote=request.param == "remote")
    try:
        yield r
        if not r.closed:
            r.check()
    finally:
        r.close()


@pytest.fixture
def fs(rig: Rig) -> FileSystem:
    return rig.fs


def fails(code: int, fn: Callable[..., object], *args: object) -> None:
    """``fn(*args)`` raises an OSError carrying ``code``."""
    with pytest.raises(OSError) as e:
        fn(*args)
    assert isinstance(e.value, OSError)
    assert e.value.errno == code, f"{fn.__name__}: {errno.errorcode.get(e.value.errno)}"


def make(fs: FileSystem, name: bytes, data: bytes = b"", parent: int = ROOT_INO) -> int:
    node, fh = fs.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, UID, GID)
    if data:
        assert fs.write(fh, 0, data) == len(data)
    fs.release(fh)
    return node.ino


def contents(fs: FileSystem, ino: int) -> bytes:
    fh = fs.open(ino, os.O_RDONLY)
    try:
        return fs.read(fh, 0, fs.getattr(ino).size + 10)
    finally:
        fs.release(fh)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed * 13 + i // 251) % 251 + 1 for i in range(n))  # never zero


def names(fs: FileSystem, ino: int) -> list[bytes]:
    fh = fs.opendir(ino)
    try:
        return [n for n, _i, _m, _o in fs.readdir(ino, fh, 0)]
    finally:
        fs.releasedir(fh)


# -- data ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, CS - 1, CS, CS + 1, 3 * CS, 3 * CS + 17])
def test_write_read_round_trip_at_chunk_boundaries(rig: Rig, size: int) -> None:
    fs = rig.fs
    data = pattern(size)
    node, fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR | os.O_CREAT, UID, GID)
    assert fs.write(fh, 0, data) == size
    assert fs.read(fh, 0, size + 100) == data  # before any flush: from the buffers
    assert fs.getattr(node.ino).size == size
    fs.flush(fh)
    for off in sorted({0, CS - 1, CS, CS + 1, size - 1, size, size + 5}):
        for n in (1, 2, CS, 2 * CS + 3):
            assert fs.read(fh, off, n) == data[off : off + n], (off, n)
    fs.release(fh)
    assert contents(fs, node.ino) == data
    assert rig.meta.get_inode(node.ino).size == size  # type: ignore[union-attr]
    blocks = rig.meta.get_blocks(node.ino, 0, 100)
    assert sorted(blocks) == list(range(-(-size // CS)))
    # sealed: stored objects hold no plaintext (a long enough piece to tell)
    probe = data[:32] if size >= 32 else b"\x00" * 64
    rig.chunks.wait_uploaded()  # a remote store's uploads run in the background
    assert rig.store.objects and all(probe not in blob for blob in rig.store.objects.values())


def test_writes_across_boundaries_into_a_committed_file(fs: FileSystem) -> None:
    model = bytearray(pattern(4 * CS))
    ino = make(fs, b"f", bytes(model))
    fh = fs.open(ino, RW)
    for off, n in ((CS - 3, 6), (2 * CS, CS), (0, 1), (4 * CS - 1, 5), (CS + 100, 2 * CS)):
        piece = pattern(n, seed=off)
        fs.write(fh, off, piece)
        model[off : off + n] = piece
        assert fs.read(fh, 0, len(model) + 1) == bytes(model)
    fs.release(fh)
    assert contents(fs, ino) == bytes(model)
    assert fs.getattr(ino).size == len(model) == 4 * CS + 4


def test_identical_chunks_are_stored_once(rig: Rig) -> None:
    fs = rig.fs
    data = pattern(CS) * 3
    a = make(fs, b"a", data)
    b = make(fs, b"b", data)
    refs = rig.meta.get_blocks(a, 0, 10)
    assert len({r.name for r in refs.values()}) == 1
    assert rig.meta.get_object(refs[0].name)[1] == 6  # type: ignore[index]
    assert rig.meta.get_blocks(b, 0, 10) == refs
    rig.chunks.wait_uploaded()
    assert len(rig.store.objects) == 1


def test_sparse_write_leaves_holes(rig: Rig) -> None:
    fs = rig.fs
    node, fh = fs.create(ROOT_INO, b"sparse", 0o644, RW | os.O_CREAT, UID, GID)
    fs.write(fh, 10 * CS + 5, b"tail")
    assert fs.read(fh, 0, 11 * CS) == bytes(10 * CS + 5) + b"tail"
    fs.release(fh)
    size = 10 * CS + 9
    assert fs.getattr(node.ino).size == size
    assert sorted(rig.meta.get_blocks(node.ino, 0, 100)) == [10]
    assert fs.st_blocks(fs.getattr(node.ino)) == 4096 // 512  # one stored chunk
    assert contents(fs, node.ino) == bytes(10 * CS + 5) + b"tail"
    # zeros written explicitly are not stored either
    z = make(fs, b"zeros", bytes(3 * CS))
    assert rig.meta.get_blocks(z, 0, 10) == {}
    assert contents(fs, z) == bytes(3 * CS)
    assert fs.st_blocks(fs.getattr(z)) == 0


def test_truncate_shrink_then_grow_reads_zeros(rig: Rig) -> None:
    fs = rig.fs
    data = pattern(3 * CS)
    ino = make(fs, b"f", data)
    before = rig.meta.get_blocks(ino, 0, 10)
    node = fs.truncate(ino, CS + 10)  # without a handle
    assert node.size == CS + 10
    assert contents(fs, ino) == data[: CS + 10]
    assert rig.meta.get_object(before[2].name)[1] == 0  # type: ignore[index]
    fh = fs.open(ino, RW)
    fs.truncate(ino, 3 * CS, fh)  # grow with a handle: the cut bytes do not come back
    assert fs.read(fh, 0, 4 * CS) == data[: CS + 10] + bytes(2 * CS - 10)
    fs.release(fh)
    assert contents(fs, ino) == data[: CS + 10] + bytes(2 * CS - 10)
    assert fs.truncate(ino, 0).size == 0
    assert rig.meta.get_blocks(ino, 0, 10) == {}
    assert contents(fs, ino) == b""
    fails(errno.EINVAL, fs.truncate, ino, -1)
    fails(errno.EISDIR, fs.truncate, ROOT_INO, 0)


def test_open_with_o_trunc_empties_the_file(fs: FileSystem) -> None:
    ino = make(fs, b"f", pattern(2 * CS))
    fh = fs.open(ino, os.O_WRONLY | os.O_TRUNC)
    assert fs.getattr(ino).size == 0
    fs.release(fh)
    assert contents(fs, ino) == b""


def test_fallocate_punch_hole_keep_size(rig: Rig) -> None:
    fs = rig.fs
    data = pattern(4 * CS)
    ino = make(fs, b"f", data)
    fh = fs.open(ino, RW)
    fs.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, CS - 10, 2 * CS + 20)
    model = bytearray(data)
    model[CS - 10 : 3 * CS + 10] = bytes(2 * CS + 20)
    assert fs.read(fh, 0, 5 * CS) == bytes(model)
    fs.release(fh)
    assert fs.getattr(ino).size == 4 * CS
    assert contents(fs, ino) == bytes(model)
    assert sorted(rig.meta.get_blocks(ino, 0, 10)) == [0, 3]  # chunks 1, 2 wholly punched
    fh = fs.open(ino, RW)
    fs.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 3 * CS, 10 * CS)  # past EOF
    assert fs.getattr(ino).size == 4 * CS
    assert fs.read(fh, 3 * CS, CS) == bytes(CS)
    fails(errno.EOPNOTSUPP, fs.fallocate, fh, FALLOC_FL_PUNCH_HOLE, 0, CS)
    fails(errno.EOPNOTSUPP, fs.fallocate, fh, 0x08, 0, CS)  # COLLAPSE_RANGE
    fails(errno.EINVAL, fs.fallocate, fh, 0, 0, 0)
    fails(errno.EINVAL, fs.fallocate, fh, 0, -1, 10)
    fs.release(fh)
    fails(errno.EBADF, fs.fallocate, fh, 0, 0, 10)


def test_fallocate_zero_range_and_keep_size(rig: Rig) -> None:
    fs = rig.fs
    data = pattern(2 * CS)
    ino = make(fs, b"f", data)
    fh = fs.open(ino, RW)
    fs.fallocate(fh, FALLOC_FL_ZERO_RANGE, 10, 20)
    model = bytearray(data)
    model[10:30] = bytes(20)
    assert fs.read(fh, 0, 3 * CS) == bytes(model)
    fs.fallocate(fh, FALLOC_FL_ZERO_RANGE, CS + 5, 3 * CS)  # extends the size
    model[CS + 5 :] = bytes(len(model) - CS - 5)
    model += bytes(4 * CS + 5 - len(model))
    assert fs.getattr(ino).size == 4 * CS + 5
    assert fs.read(fh, 0, 5 * CS) == bytes(model)
    fs.fallocate(fh, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 4 * CS, 4 * CS)
    assert fs.getattr(ino).size == 4 * CS + 5
    fs.fallocate(fh, FALLOC_FL_KEEP_SIZE, 0, 100 * CS)  # reserves nothing, changes nothing
    assert fs.getattr(ino).size == 4 * CS + 5
    fs.fallocate(fh, 0, 0, CS)  # within the size: nothing
    assert fs.getattr(ino).size == 4 * CS + 5
    fs.fallocate(fh, 0, 6 * CS, 7)  # mode 0 extends
    assert fs.getattr(ino).size == 6 * CS + 7
    fs.release(fh)
    assert contents(fs, ino) == bytes(model) + bytes(6 * CS + 7 - len(model))
    assert sorted(rig.meta.get_blocks(ino, 0, 10)) == [0, 1]  # only chunk 0's data is left


def test_lseek_data_and_hole(fs: FileSystem) -> None:
    ino = make(fs, b"f")
    fh = fs.open(ino, RW)
    fs.write(fh, 0, pattern(CS))  # chunk 0 full
    fs.write(fh, 3 * CS, pattern(100))  # chunks 1, 2 holes; chunk 3 short
    fs.truncate(ino, 5 * CS, fh)  # a trailing hole
    assert fs.lseek(fh, 0, SEEK_DATA) == 0
    assert fs.lseek(fh, 0, SEEK_HOLE) == CS
    assert fs.lseek(fh, 10, SEEK_HOLE) == CS
    assert fs.lseek(fh, CS, SEEK_DATA) == 3 * CS
    assert fs.lseek(fh, CS + 5, SEEK_HOLE) == CS + 5
    assert fs.lseek(fh, 3 * CS + 50, SEEK_DATA) == 3 * CS + 50
    assert fs.lseek(fh, 3 * CS, SEEK_HOLE) == 3 * CS + 100  # the rest of chunk 3 reads zeros
    fails(errno.ENXIO, fs.lseek, fh, 3 * CS + 100, SEEK_DATA)
    assert fs.lseek(fh, 4 * CS, SEEK_HOLE) == 4 * CS
    fails(errno.ENXIO, fs.lseek, fh, 5 * CS, SEEK_DATA)
    fails(errno.ENXIO, fs.lseek, fh, 5 * CS, SEEK_HOLE)
    fails(errno.EINVAL, fs.lseek, fh, -1, SEEK_DATA)
    fails(errno.EINVAL, fs.lseek, fh, 0, os.SEEK_SET)
    fs.release(fh)


def test_read_and_write_on_a_bad_handle(fs: FileSystem) -> None:
    fails(errno.EBADF, fs.read, 999, 0, 10)
    fails(errno.EBADF, fs.write, 999, 0, b"x")
    fh = fs.opendir(ROOT_INO)
    fails(errno.EBADF, fs.read, fh, 0, 10)  # a directory handle
    fs.releasedir(fh)
    fails(errno.EISDIR, fs.open, ROOT_INO, os.O_RDONLY)
    fails(errno.ENOENT, fs.open, 424242, os.O_RDONLY)


def test_huge_sizes_store_nothing(rig: Rig) -> None:
    fs = rig.fs
    ino = make(fs, b"huge")
    fs.truncate(ino, 1 << 50)
    assert fs.getattr(ino).size == 1 << 50
    assert rig.meta.get_blocks(ino, 0, 1 << 40) == {}
    fh = fs.open(ino, RW)
    assert fs.read(fh, (1 << 50) - 10, 100) == bytes(10)
    fs.write(fh, 1 << 40, b"far")
    assert fs.lseek(fh, 0, SEEK_DATA) == 1 << 40
    assert fs.lseek(fh, 1 << 40, SEEK_HOLE) == (1 << 40) + 3
    fs.release(fh)
    assert sorted(rig.meta.get_blocks(ino, 0, 1 << 40)) == [(1 << 40) // CS]
    assert fs.st_blocks(fs.getattr(ino)) == 8


def test_st_blocks_counts_dirty_and_committed_chunks(fs: FileSystem) -> None:
    node, fh = fs.create(ROOT_INO, b"f", 0o644, RW | os.O_CREAT, UID, GID)
    assert fs.st_blocks(fs.getattr(node.ino)) == 0
    fs.write(fh, 0, b"x" * 100)
    assert fs.st_blocks(fs.getattr(node.ino)) == 8  # not committed yet: one 4 KiB unit
    fs.write(fh, 2 * CS, pattern(CS))
    fs.flush(fh)
    st = fs.st_blocks(fs.getattr(node.ino))
    assert 16 <= st <= 24  # two chunks stored (sealed sizes round up), the hole nothing
    fs.release(fh)
    assert fs.st_blocks(fs.getattr(ROOT_INO)) == 8
    assert fs.st_blocks(fs.symlink(ROOT_INO, b"l", b"f", UID, GID)) == 0


def test_a_restart_reads_everything_back_from_the_store(rig: Rig, tmp_path: Path) -> None:
    fs = rig.fs
    files = {b"a": pattern(3 * CS + 5), b"b": b"", b"c": pattern(7, seed=3)}
    inos = {n: make(fs, n, d) for n, d in files.items()}
    d = fs.mkdir(ROOT_INO, b"d", 0o700, UID, GID).ino
    fs.symlink(d, b"l", b"../a", UID, GID)
    fs.setxattr(inos[b"a"], b"user.k", b"v", 0)
    store = rig.store
    rig.close()
    again = Rig(tmp_path, remote=rig.remote, store=store)  # a cold cache, the same store
    try:
        fs = again.fs
        for n, data in files.items():
            assert contents(fs, fs.lookup(ROOT_INO, n).ino) == data
        assert fs.readlink(fs.lookup(d, b"l").ino) == b"../a"
        assert fs.getxattr(inos[b"a"], b"user.k") == b"v"
        assert stat.S_IMODE(fs.getattr(d).mode) == 0o700
        assert all(store.exists(r.name) for r, _n, _s in again.meta.all_objects())
    finally:
        again.close()


@pytest.mark.log_problems_expected
def test_a_tampered_chunk_reads_as_eio(rig: Rig, tmp_path: Path) -> None:
    fs = rig.fs
    ino = make(fs, b"f", pattern(2 * CS))
    ref = rig.meta.get_blocks(ino, 0, 1)[0]
    store = rig.store
    rig.close()
    blob = bytearray(store.objects[ref.name])
    blob[-1] ^= 1
    store.objects[ref.name] = bytes(blob)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # a remote store's local copies
    again = Rig(tmp_path, remote=rig.remote, store=store)
    try:
        fh = again.fs.open(ino, os.O_RDONLY)
        fails(errno.EIO, again.fs.read, fh, 0, 10)
        assert again.fs.read(fh, CS, 10) == pattern(2 * CS)[CS : CS + 10]  # the other chunk
        again.fs.release(fh)
        assert again.fs.read_errors == 1
    finally:
        again.close()


def test_recover_drops_hidden_entries_and_nameless_inodes(rig: Rig, tmp_path: Path) -> None:
    """After a crash with a file unlinked while open, the next start removes it."""
    fs = rig.fs
    ino = make(fs, b"f", pattern(CS))
    keep = make(fs, b"keep", b"k")
    ref = rig.meta.get_blocks(ino, 0, 1)[0]
    fh = fs.open(ino, os.O_RDONLY)
    fs.rename(ROOT_INO, b"f", ROOT_INO, HIDDEN + b"0000000a0000000b")
    with fs.lock, rig.meta.transaction():
        n = rig.meta.insert_inode(Inode(0, stat.S_IFREG | 0o644, UID, GID, 0, 0, 1, 1, 1))
    # the next start: another engine connection and filesystem over the same database
    meta, hooks = open_engine(tmp_path / "m.db")
    try:
        fresh = FileSystem(meta, rig.chunks, CS, lambda: None, hooks=hooks)
        assert fresh.recover() == 3  # one hidden entry, two nameless inodes
        assert meta.get_inode(ino) is None and meta.get_inode(n) is None
        assert meta.hidden_dentries(HIDDEN) == [] and meta.orphan_inodes() == []
        assert meta.get_object(ref.name)[1] == 0  # type: ignore[index]
        assert fresh.lookup(ROOT_INO, b"keep").ino == keep
    finally:
        meta.close()
    fs.release(fh)


@pytest.mark.log_problems_expected
def test_a_close_that_succeeds_after_a_full_metadata_disk_keeps_the_file(tmp_path: Path) -> None:
    """The metadata disk fills up and a commit fails; once there is room again, a file created
    just before (committed with its close, see fs.base) and closed without error is there."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(small)],
                   check=True)
    try:
        rig = Rig(tmp_path, db_dir=small)
        fs = rig.fs
        try:
            i = 0
            with pytest.raises(Exception):  # noqa: B017 - the failure itself is test_35's
                for i in range(1000):
                    fs.setxattr(ROOT_INO, b"user.%d" % i, os.urandom(3000), 0)
            node, fh = fs.create(ROOT_INO, b"a", 0o644, os.O_WRONLY | os.O_CREAT, UID, GID)
            with pytest.raises(Exception):  # noqa: B017 - the disk is still full
                fs.setxattr(ROOT_INO, b"user.more", os.urandom(3000), 0)
            subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
            fs.write(fh, 0, b"kept")
            fs.release(fh)  # no error: the file and its data must be committed
            assert fs.lookup(ROOT_INO, b"a").ino == node.ino
        finally:
            rig.close()
        meta = MetaStore(small / "m.db")  # what the next mount finds
        try:
            ino = meta.lookup(ROOT_INO, b"a")
            assert ino is not None, "a file closed without error is missing"
            assert meta.get_inode(ino).size == 4  # type: ignore[union-attr]
        finally:
            meta.close()
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- names --------------------------------------------------------------------------------------
def test_mkdir_rmdir(fs: FileSystem) -> None:
    root_links = fs.getattr(ROOT_INO).nlink
    d = fs.mkdir(ROOT_INO, b"d", 0o750, UID, GID)
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o750 and d.nlink == 2
    assert fs.getattr(ROOT_INO).nlink == root_links + 1
    sub = fs.mkdir(d.ino, b"sub", 0o755, UID, GID)
    assert fs.getattr(d.ino).nlink == 3
    fails(errno.EEXIST, fs.mkdir, ROOT_INO, b"d", 0o755, UID, GID)
    fails(errno.ENOTEMPTY, fs.rmdir, ROOT_INO, b"d")
    make(fs, b"f", b"x", parent=sub.ino)
    fails(errno.ENOTEMPTY, fs.rmdir, d.ino, b"sub")
    fails(errno.ENOTDIR, fs.rmdir, sub.ino, b"f")
    fails(errno.ENOENT, fs.rmdir, ROOT_INO, b"nothing")
    fails(errno.EINVAL, fs.rmdir, ROOT_INO, b".")
    fails(errno.ENOTDIR, fs.mkdir, fs.lookup(sub.ino, b"f").ino, b"x", 0o755, UID, GID)
    fails(errno.ENAMETOOLONG, fs.mkdir, ROOT_INO, b"n" * 256, 0o755, UID, GID)
    fails(errno.EINVAL, fs.mkdir, ROOT_INO, b"a/b", 0o755, UID, GID)
    fails(errno.EINVAL, fs.mkdir, ROOT_INO, b"..", 0o755, UID, GID)
    assert fs.mkdir(ROOT_INO, b"n" * 255, 0o755, UID, GID).nlink == 2
    fs.unlink(sub.ino, b"f")
    fs.rmdir(d.ino, b"sub")
    fails(errno.ENOENT, fs.lookup, d.ino, b"sub")
    fails(errno.ENOENT, fs.getattr, sub.ino)
    assert fs.getattr(d.ino).nlink == 2
    fs.rmdir(ROOT_INO, b"d")
    assert fs.getattr(ROOT_INO).nlink == root_links + 1  # the 255-byte name is left


def test_rmdir_ignores_and_removes_hidden_entries(rig: Rig) -> None:
    """A directory holding only a file unlinked while open (libfuse's hidden name) is empty."""
    fs = rig.fs
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    node, fh = fs.create(d, b"f", 0o644, RW | os.O_CREAT, UID, GID)
    fs.write(fh, 0, b"still here")
    fs.rename(d, b"f", d, HIDDEN + b"0000000100000002")  # what libfuse does on unlink
    assert fs.getattr(node.ino).nlink == 0
    assert names(fs, d) == [b".", b".."]
    fs.rmdir(ROOT_INO, b"d")
    assert rig.meta.hidden_dentries(HIDDEN) == []
    assert fs.read(fh, 0, 100) == b"still here"
    fs.release(fh)
    assert rig.meta.get_inode(node.ino) is None


def test_rmdir_leaves_nothing_behind_a_name_starting_like_a_hidden_one(rig: Rig) -> None:
    """A user's file whose name begins with the hidden prefix followed by a byte 0xff: rmdir
    either refuses (ENOTEMPTY) or removes the file with the directory; it must not leave the
    file's entry in a directory that no longer exists."""
    fs = rig.fs
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    f = make(fs, HIDDEN + b"\xff", b"data", parent=d)
    try:
        fs.rmdir(ROOT_INO, b"d")
    except OSError as e:
        assert e.errno == errno.ENOTEMPTY
        assert fs.lookup(d, HIDDEN + b"\xff").ino == f
        return
    assert rig.meta.list_dir(d) == []
    assert rig.meta.hidden_dentries(HIDDEN) == []
    assert rig.meta.get_inode(f) is None


def test_a_file_created_under_a_hidden_looking_name_is_gone_after_unlink(rig: Rig) -> None:
    """A program may create a file whose name begins like libfuse's hidden names; creating and
    then unlinking it must not leave its inode (and its chunks) behind."""
    fs = rig.fs
    ino = make(fs, HIDDEN + b"mine", pattern(CS))
    assert fs.getattr(ino).nlink == 1
    fs.unlink(ROOT_INO, HIDDEN + b"mine")
    fails(errno.ENOENT, fs.lookup, ROOT_INO, HIDDEN + b"mine")
    assert rig.meta.get_inode(ino) is None


def test_unlink_of_an_open_file(rig: Rig) -> None:
    fs = rig.fs
    data = pattern(2 * CS + 3)
    ino = make(fs, b"f", data)
    refs = rig.meta.get_blocks(ino, 0, 10)
    fh = fs.open(ino, os.O_RDONLY)
    fs.unlink(ROOT_INO, b"f")
    fails(errno.ENOENT, fs.lookup, ROOT_INO, b"f")
    assert b"f" not in names(fs, ROOT_INO)
    assert fs.getattr(ino).nlink == 0
    assert fs.read(fh, 0, 3 * CS) == data  # readable until released
    fs.release(fh)
    assert rig.meta.get_inode(ino) is None
    fails(errno.ENOENT, fs.getattr, ino)
    assert all(rig.meta.get_object(r.name)[1] == 0 for r in refs.values())  # type: ignore[index]
    assert rig.meta.orphan_inodes() == []
    fails(errno.ENOENT, fs.unlink, ROOT_INO, b"f")
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID)
    fails(errno.EISDIR, fs.unlink, ROOT_INO, b"d")
    assert fs.lookup(ROOT_INO, b"d").ino == d.ino


def test_link_counts_after_link_unlink_rename(rig: Rig) -> None:
    fs = rig.fs
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    ino = make(fs, b"a", b"abc")
    assert fs.link(ino, d, b"b").nlink == 2
    assert fs.lookup(d, b"b").ino == ino
    fails(errno.EEXIST, fs.link, ino, ROOT_INO, b"a")
    fails(errno.EPERM, fs.link, d, ROOT_INO, b"dirlink")
    fails(errno.ENOTDIR, fs.link, ino, ino, b"x")
    fs.rename(d, b"b", ROOT_INO, b"c")
    assert fs.getattr(ino).nlink == 2
    other = make(fs, b"other", b"xyz")
    fs.rename(ROOT_INO, b"other", ROOT_INO, b"c")  # replaces one name of ino
    assert fs.getattr(ino).nlink == 1
    assert fs.lookup(ROOT_INO, b"c").ino == other
    fs.unlink(ROOT_INO, b"a")
    fails(errno.ENOENT, fs.getattr, ino)
    assert rig.meta.get_inode(ino) is None
    assert fs.getattr(other).nlink == 1
    assert contents(fs, other) == b"xyz"


def test_rename_onto_itself_and_onto_another_link(fs: FileSystem) -> None:
    ino = make(fs, b"a", b"1")
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"a")
    assert fs.lookup(ROOT_INO, b"a").ino == ino and fs.getattr(ino).nlink == 1
    fs.link(ino, ROOT_INO, b"b")
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b")  # the same inode: POSIX says do nothing
    assert fs.lookup(ROOT_INO, b"a").ino == ino and fs.lookup(ROOT_INO, b"b").ino == ino
    assert fs.getattr(ino).nlink == 2
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    fs.rename(ROOT_INO, b"d", ROOT_INO, b"d")
    assert fs.lookup(ROOT_INO, b"d").ino == d


def test_rename_errors(fs: FileSystem) -> None:
    make(fs, b"f", b"1")
    make(fs, b"g", b"2")
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    sub = fs.mkdir(d, b"sub", 0o755, UID, GID).ino
    full = fs.mkdir(ROOT_INO, b"full", 0o755, UID, GID).ino
    make(fs, b"x", b"", parent=full)
    empty = fs.mkdir(ROOT_INO, b"empty", 0o755, UID, GID).ino
    fails(errno.EEXIST, fs.rename, ROOT_INO, b"f", ROOT_INO, b"g", RENAME_NOREPLACE)
    fails(errno.EINVAL, fs.rename, ROOT_INO, b"d", sub, b"moved")  # into its own subtree
    fails(errno.EINVAL, fs.rename, ROOT_INO, b"d", d, b"self")
    fails(errno.ENOTEMPTY, fs.rename, ROOT_INO, b"empty", ROOT_INO, b"full")
    fails(errno.EISDIR, fs.rename, ROOT_INO, b"f", ROOT_INO, b"empty")
    fails(errno.ENOTDIR, fs.rename, ROOT_INO, b"empty", ROOT_INO, b"f")
    fails(errno.ENOENT, fs.rename, ROOT_INO, b"missing", ROOT_INO, b"h")
    fails(errno.ENOENT, fs.rename, ROOT_INO, b"f", ROOT_INO, b"h", RENAME_EXCHANGE)
    fails(errno.EINVAL, fs.rename, ROOT_INO, b"f", ROOT_INO, b"h",
          RENAME_EXCHANGE | RENAME_NOREPLACE)
    fails(errno.EINVAL, fs.rename, ROOT_INO, b"f", ROOT_INO, b"h", 4)  # RENAME_WHITEOUT
    fails(errno.ENOTDIR, fs.rename, ROOT_INO, b"f", fs.lookup(ROOT_INO, b"g").ino, b"h")
    fails(errno.ENAMETOOLONG, fs.rename, ROOT_INO, b"f", ROOT_INO, b"n" * 256)
    # nothing moved
    assert sorted(names(fs, ROOT_INO)) == sorted([b".", b"..", b"f", b"g", b"d", b"full",
                                                  b"empty"])
    assert names(fs, d) == [b".", b"..", b"sub"]
    # an empty directory may be replaced; the target's link is gone from the parent count
    links = fs.getattr(ROOT_INO).nlink
    fs.rename(ROOT_INO, b"d", ROOT_INO, b"empty")
    assert fs.lookup(ROOT_INO, b"empty").ino == d
    fails(errno.ENOENT, fs.getattr, empty)
    assert fs.getattr(ROOT_INO).nlink == links - 1


def test_rename_directory_between_parents(fs: FileSystem) -> None:
    a = fs.mkdir(ROOT_INO, b"a", 0o755, UID, GID).ino
    b = fs.mkdir(ROOT_INO, b"b", 0o755, UID, GID).ino
    c = fs.mkdir(a, b"c", 0o755, UID, GID).ino
    fs.rename(a, b"c", b, b"c2")
    assert fs.getattr(a).nlink == 2 and fs.getattr(b).nlink == 3
    fh = fs.opendir(c)
    assert fs.readdir(c, fh, 0)[1][:2] == (b"..", b)  # its parent is the new one
    fs.releasedir(fh)
    assert fs.paths_of(c) == ["/b/c2"]


def test_rename_exchange(fs: FileSystem) -> None:
    a = fs.mkdir(ROOT_INO, b"a", 0o755, UID, GID).ino
    b = fs.mkdir(ROOT_INO, b"b", 0o755, UID, GID).ino
    f = make(fs, b"f", b"file", parent=a)
    sub = fs.mkdir(b, b"sub", 0o755, UID, GID).ino
    fs.rename(a, b"f", b, b"sub", RENAME_EXCHANGE)  # a file and a directory trade places
    assert fs.lookup(a, b"f").ino == sub and fs.lookup(b, b"sub").ino == f
    assert fs.getattr(a).nlink == 3 and fs.getattr(b).nlink == 2
    assert fs.getattr(f).nlink == 1 and fs.getattr(sub).nlink == 2
    g = make(fs, b"g", b"gee", parent=a)
    fs.rename(a, b"g", a, b"f", RENAME_EXCHANGE)  # same directory
    assert fs.lookup(a, b"g").ino == sub and fs.lookup(a, b"f").ino == g
    assert contents(fs, fs.lookup(a, b"f").ino) == b"gee"
    inner = fs.mkdir(sub, b"inner", 0o755, UID, GID).ino
    fails(errno.EINVAL, fs.rename, a, b"g", inner, b"x", 0)  # sub into its own subtree
    make(fs, b"x", b"", parent=inner)
    fails(errno.EINVAL, fs.rename, a, b"g", inner, b"x", RENAME_EXCHANGE)


def test_rename_exchange_of_a_name_with_itself_changes_nothing(fs: FileSystem) -> None:
    """renameat2(RENAME_EXCHANGE) of a name with itself, or with another link of the same
    file, succeeds and changes nothing (Linux: same inode, nothing to do)."""
    ino = make(fs, b"f", b"1")
    fs.rename(ROOT_INO, b"f", ROOT_INO, b"f", RENAME_EXCHANGE)
    assert fs.lookup(ROOT_INO, b"f").ino == ino and fs.getattr(ino).nlink == 1
    fs.link(ino, ROOT_INO, b"g")
    fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", RENAME_EXCHANGE)
    assert fs.lookup(ROOT_INO, b"f").ino == ino == fs.lookup(ROOT_INO, b"g").ino
    assert fs.getattr(ino).nlink == 2


def test_rename_replacing_an_open_file(rig: Rig) -> None:
    fs = rig.fs
    old = make(fs, b"old", b"old contents")
    new = make(fs, b"new", b"new")
    fh = fs.open(old, os.O_RDONLY)
    fs.rename(ROOT_INO, b"new", ROOT_INO, b"old")
    assert fs.lookup(ROOT_INO, b"old").ino == new
    fails(errno.ENOENT, fs.lookup, ROOT_INO, b"new")
    assert fs.getattr(old).nlink == 0
    assert fs.read(fh, 0, 100) == b"old contents"  # still readable through the handle
    fs.release(fh)
    assert rig.meta.get_inode(old) is None
    assert contents(fs, new) == b"new"


def test_rename_directory_over_an_empty_one_in_another_parent(fs: FileSystem) -> None:
    a = fs.mkdir(ROOT_INO, b"a", 0o755, UID, GID).ino
    b = fs.mkdir(ROOT_INO, b"b", 0o755, UID, GID).ino
    x = fs.mkdir(a, b"x", 0o755, UID, GID).ino
    y = fs.mkdir(b, b"y", 0o755, UID, GID).ino
    make(fs, b"inside", b"i", parent=x)
    fs.rename(a, b"x", b, b"y")
    assert fs.getattr(a).nlink == 2 and fs.getattr(b).nlink == 3
    fails(errno.ENOENT, fs.getattr, y)
    assert names(fs, b) == [b".", b"..", b"y"]
    assert names(fs, x) == [b".", b"..", b"inside"]


def test_create_flags_umask_and_setgid_directories(fs: FileSystem) -> None:
    ino = make(fs, b"f", b"abc")
    fails(errno.EEXIST, fs.create, ROOT_INO, b"f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
          UID, GID)
    fs.mkdir(ROOT_INO, b"dir", 0o755, UID, GID)
    fails(errno.EISDIR, fs.create, ROOT_INO, b"dir", 0o644, os.O_WRONLY | os.O_CREAT, UID, GID)
    node, fh = fs.create(ROOT_INO, b"f", 0o600, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, UID, GID)
    assert node.ino == ino and node.size == 0
    assert stat.S_IMODE(node.mode) == 0o644  # an existing file keeps its mode
    fs.release(fh)
    d = fs.mkdir(ROOT_INO, b"d", 0o777, UID, GID, umask=0o022)
    assert stat.S_IMODE(d.mode) == 0o755
    node, fh = fs.create(d.ino, b"g", 0o666, os.O_WRONLY | os.O_CREAT, UID, GID, umask=0o027)
    fs.release(fh)
    assert stat.S_IMODE(node.mode) == 0o640
    fs.chown(d.ino, UID, 4242)
    fs.chmod(d.ino, 0o2775)
    sub = fs.mkdir(d.ino, b"sub", 0o755, UID, GID)
    assert sub.gid == 4242 and sub.mode & stat.S_ISGID  # directories inherit group and bit
    node, fh = fs.create(d.ino, b"h", 0o644, os.O_WRONLY | os.O_CREAT, UID, GID)
    fs.release(fh)
    assert node.gid == 4242 and not node.mode & stat.S_ISGID  # files only the group


def test_symlink_readlink(fs: FileSystem) -> None:
    target = b"../some/where\xff"
    node = fs.symlink(ROOT_INO, b"l", target, UID, GID)
    assert stat.S_ISLNK(node.mode) and node.size == len(target)
    assert fs.readlink(node.ino) == target
    assert fs.lookup(ROOT_INO, b"l").ino == node.ino
    fails(errno.EEXIST, fs.symlink, ROOT_INO, b"l", b"x", UID, GID)
    fails(errno.ENAMETOOLONG, fs.symlink, ROOT_INO, b"long", b"x" * 4096, UID, GID)
    assert fs.readlink(fs.symlink(ROOT_INO, b"max", b"x" * 4095, UID, GID).ino) == b"x" * 4095
    fails(errno.EINVAL, fs.readlink, make(fs, b"f"))
    fails(errno.EINVAL, fs.readlink, ROOT_INO)
    fails(errno.EINVAL, fs.truncate, node.ino, 0)
    fs.unlink(ROOT_INO, b"l")
    fails(errno.ENOENT, fs.readlink, node.ino)


def test_mknod_kinds(fs: FileSystem) -> None:
    fifo = fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o640, 0, UID, GID)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_IMODE(fifo.mode) == 0o640
    dev = fs.mknod(ROOT_INO, b"dev", stat.S_IFCHR | 0o600, os.makedev(1, 3), UID, GID)
    assert fs.getattr(dev.ino).rdev == os.makedev(1, 3)
    fails(errno.EINVAL, fs.mknod, ROOT_INO, b"dir", stat.S_IFDIR | 0o755, 0, UID, GID)


def test_creating_leaves_the_parent_row_as_the_filesystem_answers_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each kind of create (mkdir, create, mknod, symlink), link and unlink in a directory
    whose chmod, chown and utimens are written but not committed yet: the engine's row of the
    directory is the one the filesystem answers (link count, times, mode, owner), before and
    after the commit. On a vault of one machine the cached directory is written touched, not
    read back."""
    fs = rig.fs
    touch = rig.meta.touch_inode
    known: list[Inode | None] = []  # what each touch of a directory was given

    def touch_dir(*a: object, **kw: object) -> Inode | None:
        if kw.get("mtime"):
            known.append(kw.get("known"))  # type: ignore[arg-type]
        return touch(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rig.meta, "touch_inode", touch_dir)
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    fs.chmod(d, 0o1770)
    fs.chown(d, 1234, 4321)
    fs.utimens(d, 5, 6)
    fs.mkdir(d, b"sub", 0o755, UID, GID)
    _node, fh = fs.create(d, b"f", 0o644, RW | os.O_CREAT, UID, GID)
    fs.mknod(d, b"fifo", stat.S_IFIFO | 0o600, 0, UID, GID)
    fs.symlink(d, b"l", b"f", UID, GID)
    view = fs.getattr(d)
    assert (view.mode, view.uid, view.gid, view.nlink, view.atime_ns) == (
        stat.S_IFDIR | 0o1770, 1234, 4321, 3, 5)
    assert view.mtime_ns == view.ctime_ns == fs.getattr(fs.lookup(d, b"l").ino).ctime_ns
    assert rig.meta.get_inode(d) == view
    fs.release(fh)
    fs.commit_deferred()
    assert rig.meta.get_inode(d) == view == fs.getattr(d)
    fs.link(fs.lookup(d, b"f").ino, d, b"f2")
    assert rig.meta.get_inode(d) == fs.getattr(d) != view
    fs.unlink(d, b"f")
    fs.rmdir(d, b"sub")
    assert rig.meta.get_inode(d) == fs.getattr(d)
    assert fs.getattr(d).nlink == 2 and names(fs, d) == [b".", b"..", b"f2", b"fifo", b"l"]
    assert len(known) == 7 and None not in known  # the cached parent each time


# -- attributes and xattrs ----------------------------------------------------------------------
def test_chmod_chown_utimens(rig: Rig) -> None:
    fs = rig.fs
    ino = make(fs, b"f", b"x")
    assert stat.S_IMODE(fs.chmod(ino, 0o4711).mode) == 0o4711
    node = fs.chown(ino, 1234, -1)
    assert (node.uid, node.gid) == (1234, GID)
    assert not node.mode & stat.S_ISUID  # chown drops set-user-ID
    node = fs.utimens(ino, 5, None)
    assert node.atime_ns == 5 and node.mtime_ns != 5
    fs.commit_deferred()
    row = rig.meta.get_inode(ino)  # the engine's row has every change, the type kept
    assert row is not None
    assert (row.uid, row.gid, row.mode, row.atime_ns) == (1234, GID, stat.S_IFREG | 0o711, 5)
    assert row.ctime_ns == node.ctime_ns and row.mtime_ns == node.mtime_ns


def test_xattrs(fs: FileSystem) -> None:
    ino = make(fs, b"f")
    assert fs.listxattr(ino) == []
    fails(errno.ENODATA, fs.getxattr, ino, b"user.a")
    fails(errno.ENODATA, fs.setxattr, ino, b"user.a", b"1", XATTR_REPLACE)
    fs.setxattr(ino, b"user.a", b"1", XATTR_CREATE)
    fails(errno.EEXIST, fs.setxattr, ino, b"user.a", b"2", XATTR_CREATE)
    fs.setxattr(ino, b"user.a", b"2", XATTR_REPLACE)
    fs.setxattr(ino, b"user.b", b"", 0)
    assert fs.getxattr(ino, b"user.a") == b"2"
    assert fs.getxattr(ino, b"user.b") == b""
    assert fs.listxattr(ino) == [b"user.a", b"user.b"]
    fails(errno.E2BIG, fs.setxattr, ino, b"user.big", b"x" * 65537, 0)
    fails(errno.ERANGE, fs.setxattr, ino, b"", b"x", 0)
    fails(errno.ERANGE, fs.setxattr, ino, b"u" * 256, b"x", 0)
    fails(errno.EOPNOTSUPP, fs.setxattr, ino, b"system.other", b"x", 0)
    fs.removexattr(ino, b"user.a")
    fails(errno.ENODATA, fs.removexattr, ino, b"user.a")
    fails(errno.ENODATA, fs.getxattr, ino, b"user.a")
    fs.removexattr(ino, b"user.b")
    assert fs.listxattr(ino) == []
    fails(errno.ENODATA, fs.getxattr, ino, b"user.b")
    fails(errno.ENOENT, fs.setxattr, 424242, b"user.a", b"1", 0)
    fs.setxattr(ROOT_INO, b"trusted.x", b"t", 0)
    assert fs.getxattr(ROOT_INO, b"trusted.x") == b"t"


def test_acl_errors(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    f = make(fs, b"f")
    link = fs.symlink(ROOT_INO, b"l", b"f", UID, GID).ino
    access, default = b"system.posix_acl_access", b"system.posix_acl_default"
    fails(errno.EINVAL, fs.setxattr, f, access, b"garbage", 0)
    fails(errno.EINVAL, fs.setxattr, d, default, b"\x02\x00\x00\x00", 0)
    fails(errno.EACCES, fs.setxattr, f, default, b"\x02\x00\x00\x00", 0)
    fails(errno.EOPNOTSUPP, fs.setxattr, link, access, b"\x02\x00\x00\x00", 0)
    fails(errno.ENODATA, fs.setxattr, f, access, b"\x02\x00\x00\x00", XATTR_REPLACE)
    fails(errno.ENODATA, fs.getxattr, f, access)
    assert stat.S_IMODE(fs.getattr(f).mode) == 0o644  # nothing changed the mode


# -- directories --------------------------------------------------------------------------------
def test_a_listing_with_whole_stats(rig: Rig, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """readdir_stat (FUSE's readdirplus): each entry with what getattr and st_blocks give it,
    an open file's uncommitted size too; none for . and .., for an entry gone since the
    listing began, or for a directory too big to read whole that is not in the caches."""
    from cryptfs.fs import namespace

    fs = rig.fs
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    for i in range(8):
        make(fs, b"f%d" % i, pattern(i * 1500, seed=i), parent=d)
    fs.mkdir(d, b"sub", 0o700, UID, GID)
    fs.symlink(d, b"l", b"f1", UID, GID)

    def check(fs: FileSystem, offset: int = 0, fh: int | None = None) -> list[bytes]:
        """The names listed with stats, each stat checked against getattr's."""
        fh = fs.opendir(d) if fh is None else fh
        with_stats = []
        for name, ino, mode, _nxt, full in fs.readdir_stat(d, fh, offset):
            if full is not None:
                node = fs.getattr(ino)
                assert full == (node, fs.st_blocks(node)) and full[0].mode == mode
                with_stats.append(name)
        return with_stats

    _node, open_fh = fs.create(d, b"open", 0o600, RW | os.O_CREAT, UID, GID)
    fs.write(open_fh, 0, pattern(2 * CS + 1))  # (not committed: its size is the open file's)
    everything = sorted([b"f%d" % i for i in range(8)] + [b"sub", b"l", b"open"])
    assert sorted(check(fs)) == everything
    assert fs.getattr(fs.lookup(d, b"open").ino).size == 2 * CS + 1
    fh = fs.opendir(d)
    check(fs, 0, fh)
    fs.unlink(d, b"f5")  # (after the listing began: the rest of the stream still names it)
    assert b"f5" not in check(fs, 5, fh) and b"f6" in check(fs, 5, fh)
    fs.release(open_fh)
    store = rig.store
    rig.close()
    cold = Rig(tmp_path, remote=rig.remote, store=store)  # empty caches: read whole
    try:
        assert sorted(check(cold.fs)) == sorted(set(everything) - {b"f5"})
    finally:
        cold.close()
    monkeypatch.setattr(namespace, "PLUS_SCAN_MAX", 4)
    cold = Rig(tmp_path, remote=rig.remote, store=store)
    try:
        assert check(cold.fs) == []  # too big to read for a listing
        cold.fs.lookup(d, b"f1")
        cold.fs.lookup(d, b"f2")  # (the second lookup that misses reads the directory)
        assert sorted(check(cold.fs)) == sorted(set(everything) - {b"f5"})
    finally:
        cold.close()


def test_readdir_with_offsets(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    files = [f"f{i:02d}".encode() for i in range(10)]
    for n in reversed(files):
        make(fs, n, b"", parent=d)
    fs.mkdir(d, b"sub", 0o700, UID, GID)
    fh = fs.opendir(d)
    full = fs.readdir(d, fh, 0)
    assert [e[0] for e in full] == [b".", b"..", *files, b"sub"]
    assert full[0][1] == d and full[1][1] == ROOT_INO
    assert [e[3] for e in full] == list(range(1, len(full) + 1))
    assert stat.S_ISDIR(full[-1][2]) and stat.S_ISREG(full[2][2])
    # resuming at an offset gives the rest; changes after the stream began do not shift it
    fs.unlink(d, b"f00")
    make(fs, b"a-new", b"", parent=d)
    assert fs.readdir(d, fh, 5) == full[5:]
    assert fs.readdir(d, fh, len(full)) == []
    # a new stream (offset 0) sees the changes
    again = [e[0] for e in fs.readdir(d, fh, 0)]
    assert again == [b".", b"..", b"a-new", *files[1:], b"sub"]
    fs.releasedir(fh)
    fails(errno.ENOTDIR, fs.opendir, fs.lookup(d, b"f01").ino)
    fails(errno.ENOENT, fs.opendir, 424242)


def test_readdir_of_root_names_itself_as_parent(fs: FileSystem) -> None:
    fh = fs.opendir(ROOT_INO)
    assert fs.readdir(ROOT_INO, fh, 0)[:2] == [
        (b".", ROOT_INO, fs.getattr(ROOT_INO).mode, 1),
        (b"..", ROOT_INO, stat.S_IFDIR, 2),
    ]
    fs.releasedir(fh)


def test_lookup(fs: FileSystem) -> None:
    ino = make(fs, b"f", b"abc")
    assert fs.lookup(ROOT_INO, b"f").size == 3
    assert fs.lookup(ROOT_INO, b".").ino == ROOT_INO
    fails(errno.ENOENT, fs.lookup, ROOT_INO, b"g")
    fails(errno.ENAMETOOLONG, fs.lookup, ROOT_INO, b"n" * 256)
    fails(errno.ENOTDIR, fs.lookup, ino, b"x")


def test_statfs(rig: Rig) -> None:
    fs = rig.fs
    before = fs.statfs()
    make(fs, b"f")
    st = fs.statfs()
    host = os.statvfs(rig.tmp_path)
    assert st["f_namemax"] == 255
    assert st["f_bsize"] == st["f_frsize"] == 4096
    assert st["f_blocks"] == host.f_blocks * host.f_frsize // 4096
    assert 0 <= st["f_bavail"] <= st["f_bfree"] <= st["f_blocks"]
    assert st["f_files"] - st["f_ffree"] == 2 == before["f_files"] - before["f_ffree"] + 1


def test_statfs_without_a_local_filesystem(rig: Rig) -> None:
    """A remote store reports a large free count and the stored chunk bytes as used."""
    make(rig.fs, b"f", pattern(3 * CS))
    meta, hooks = open_engine(rig.tmp_path / "m.db")
    try:
        st = FileSystem(meta, rig.chunks, CS, lambda: None, hooks=hooks).statfs()
    finally:
        meta.close()
    assert st["f_bfree"] == st["f_bavail"] == 1 << 40
    used = st["f_blocks"] - st["f_bfree"]
    assert used == -(-rig.meta.stored_bytes() // 4096) and used >= 3


# -- read-only ----------------------------------------------------------------------------------
def test_read_only_filesystem_refuses_every_change(rig: Rig) -> None:
    d = rig.fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    f = make(rig.fs, b"f", b"data")
    rig.fs.setxattr(f, b"user.a", b"1", 0)
    ro_meta, hooks = open_engine(rig.tmp_path / "m.db")  # a second connection, as read-only
    ro = FileSystem(ro_meta, rig.chunks, CS, lambda: None, readonly=True, hooks=hooks)
    for call in (
        lambda: ro.mkdir(ROOT_INO, b"x", 0o755, UID, GID),
        lambda: ro.create(ROOT_INO, b"x", 0o644, os.O_WRONLY | os.O_CREAT, UID, GID),
        lambda: ro.mknod(ROOT_INO, b"x", stat.S_IFIFO | 0o644, 0, UID, GID),
        lambda: ro.symlink(ROOT_INO, b"x", b"t", UID, GID),
        lambda: ro.link(f, ROOT_INO, b"x"),
        lambda: ro.unlink(ROOT_INO, b"f"),
        lambda: ro.rmdir(ROOT_INO, b"d"),
        lambda: ro.rename(ROOT_INO, b"f", ROOT_INO, b"x"),
        lambda: ro.chmod(f, 0o600),
        lambda: ro.chown(f, 1, 1),
        lambda: ro.utimens(f, 1, 1),
        lambda: ro.setxattr(f, b"user.b", b"1", 0),
        lambda: ro.removexattr(f, b"user.a"),
        lambda: ro.truncate(f, 0),
        lambda: ro.open(f, os.O_WRONLY),
        lambda: ro.open(f, os.O_RDWR),
        lambda: ro.open(f, os.O_RDONLY | os.O_TRUNC),
    ):
        fails(errno.EROFS, call)
    fh = ro.open(f, os.O_RDONLY)
    assert ro.read(fh, 0, 10) == b"data"
    fails(errno.EROFS, ro.write, fh, 0, b"x")
    fails(errno.EROFS, ro.fallocate, fh, 0, 0, 100)
    ro.release(fh)
    assert ro.getxattr(f, b"user.a") == b"1"
    assert [n for n in names(ro, ROOT_INO)] == [b".", b"..", b"d", b"f"]
    assert rig.fs.lookup(ROOT_INO, b"f").ino == f and rig.fs.lookup(ROOT_INO, b"d").ino == d
    ro_meta.close()
    assert contents(rig.fs, f) == b"data" and stat.S_IMODE(rig.fs.getattr(f).mode) == 0o644


def test_a_small_write_after_a_commit_does_not_read_the_chunk_back(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk a commit sealed last stays in memory: rewriting a few bytes of it and
    appending to it (what a database's log does between fsyncs) fetch nothing from the store,
    and the file reads back as written."""
    fs = rig.fs
    _node, fh = fs.create(ROOT_INO, b"log", 0o644, RW | os.O_CREAT, UID, GID)
    data = bytearray(os.urandom(2 * CS + 1000))
    fs.write(fh, 0, bytes(data))
    fs.flush(fh)
    fetched: list[str] = []
    real = rig.chunks._fetch

    def fetch(ref: ChunkRef, keep: bool) -> bytes:
        fetched.append(ref.name)
        return real(ref, keep)

    monkeypatch.setattr(rig.chunks, "_fetch", fetch)
    for i in range(5):
        at = 2 * CS + 100 * i
        piece = os.urandom(300)
        fs.write(fh, at, piece)
        data[at:at + len(piece)] = piece
        fs.flush(fh)
    assert fetched == []
    fs.write(fh, 10, b"x")  # another chunk: read back once
    data[10:11] = b"x"
    fs.flush(fh)
    assert len(fetched) == 1
    assert fs.read(fh, 0, len(data) + 10) == bytes(data)
    fs.release(fh)
