"""The filesystem layer's commits, in-process on a real vault (local store, real SQLite file).

A new regular file is written at once and committed with its close (one commit per small file);
a failing operation in between rolls back only itself: the created file stays, and is committed
by the close. Directories made during the mount answer lookups of missing names from memory.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptfs.errors import MetaError
from cryptfs.meta.sqlite import ROOT_INO
from cryptfs.paths import VaultPaths
from cryptfs.vault.core import Vault, create_vault

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Vault]:
    for k in ("CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"XDG_{k}_HOME", str(tmp_path / k.lower()))
    paths = VaultPaths("unit")
    create_vault(paths, [f"file://{tmp_path}/store"], b"pw", 64 << 10, os.getuid(), os.getgid())
    v = Vault.open(paths, b"pw")
    try:
        yield v
    finally:
        v.close()


def committed_names(v: Vault) -> set[bytes]:
    """Names in the root directory as another connection sees them (committed only)."""
    con = sqlite3.connect(v.paths.db)
    try:
        return {bytes(r[0]) for r in con.execute("SELECT name FROM dentries WHERE parent = 1")}
    finally:
        con.close()


def test_create_is_committed_with_the_close(vault: Vault) -> None:
    fs = vault.fs
    assert fs is not None
    node, fh = fs.create(ROOT_INO, b"new", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    fs.write(fh, 0, b"hello")
    assert b"new" not in committed_names(vault)
    assert fs.lookup(ROOT_INO, b"new").ino == node.ino  # this mount sees it at once
    fs.flush(fh)
    assert b"new" in committed_names(vault)
    fs.release(fh)


def test_failed_operation_keeps_an_uncommitted_create(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, meta = vault.fs, vault.meta
    assert fs is not None and meta is not None
    root_nlink = fs.getattr(ROOT_INO).nlink
    node, fh = fs.create(ROOT_INO, b"kept", 0o640, os.O_WRONLY | os.O_CREAT, 0, 0)
    fs.write(fh, 0, b"data")
    real_insert = meta.insert_inode
    failures = []

    def insert_fails_once(n):  # noqa: ANN001, ANN202
        if not failures:
            failures.append(n)
            raise sqlite3.OperationalError("disk I/O error")
        return real_insert(n)

    monkeypatch.setattr(meta, "insert_inode", insert_fails_once)
    with pytest.raises(MetaError):  # the engine's errno-carrying error
        fs.mkdir(ROOT_INO, b"failed", 0o755, 0, 0)  # rolled back, and the create with it...
    monkeypatch.setattr(meta, "insert_inode", real_insert)
    fs.flush(fh)  # ...which was written again, so the close commits it
    fs.release(fh)
    assert committed_names(vault) == {b"kept"}
    assert fs.lookup(ROOT_INO, b"kept").size == 4
    assert fs.getattr(ROOT_INO).nlink == root_nlink  # the failed mkdir left no link behind
    with pytest.raises(OSError) as e:
        fs.lookup(ROOT_INO, b"failed")
    assert e.value.errno == errno.ENOENT
    con = sqlite3.connect(vault.paths.db)
    try:
        (mode, size, nlink) = con.execute(
            "SELECT mode, size, nlink FROM inodes WHERE ino = ?", (node.ino,)).fetchone()
        (root_db_nlink,) = con.execute("SELECT nlink FROM inodes WHERE ino = 1").fetchone()
    finally:
        con.close()
    assert (mode & 0o7777, size, nlink) == (0o640, 4, 1)
    assert root_db_nlink == root_nlink


def test_missing_names_in_new_directories_need_no_sql(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, meta = vault.fs, vault.meta
    assert fs is not None and meta is not None
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    sub = fs.mkdir(d, b"sub", 0o755, 0, 0).ino
    _node, fh = fs.create(d, b"f", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    fs.release(fh)
    fs.rename(d, b"f", d, b"g")
    fs.link(fs.lookup(d, b"g").ino, sub, b"h")
    lookups = []
    for asks in ("lookup", "lookup_stat"):  # the engine's two ways to look a name up
        real = getattr(meta, asks)
        monkeypatch.setattr(meta, asks,
                            lambda p, n, *a, real=real: lookups.append(n) or real(p, n, *a))
    for name in (b"f", b"missing", b"x" * 200):
        with pytest.raises(OSError) as e:
            fs.lookup(d, name)
        assert e.value.errno == errno.ENOENT
    assert fs.lookup(d, b"g").ino == fs.lookup(sub, b"h").ino
    assert lookups == []
    fs.unlink(sub, b"h")
    fs.rmdir(d, b"sub")
    lookups.clear()  # the engine's unlink and rmdir re-check their names in the database
    with pytest.raises(OSError):
        fs.lookup(d, b"sub")
    assert lookups == []
    # the root existed before the mount: its missing names are looked up in the database
    with pytest.raises(OSError):
        fs.lookup(ROOT_INO, b"nothing")
    assert lookups == [b"nothing"]



def test_a_stat_asks_the_engine_only_for_what_it_has_not_cached(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stat that follows a create asks nothing (a new file has no chunks); a cold lookup
    reads the entry with its inode and its allocation in one query, which its stat uses."""
    fs, meta = vault.fs, vault.meta
    assert fs is not None and meta is not None
    node, fh = fs.create(ROOT_INO, b"f", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    calls: list[str] = []
    for asks in ("lookup", "lookup_stat", "get_inode", "allocated"):
        real = getattr(meta, asks)
        monkeypatch.setattr(meta, asks,
                            lambda *a, real=real, asks=asks: calls.append(asks) or real(*a))
    assert fs.st_blocks(fs.getattr(node.ino)) == 0 and calls == []
    fs.write(fh, 0, b"x" * 5000)
    fs.release(fh)
    with fs.lock:  # as after a remount
        fs.inodes.clear()
        fs.dentries.clear()
        fs._alloc.clear()
    fs.getattr(ROOT_INO)  # (the directory: read once for all its names)
    calls.clear()
    node = fs.lookup(ROOT_INO, b"f")
    assert node.size == 5000 and calls == ["lookup_stat"]
    assert fs.st_blocks(fs.getattr(node.ino)) > 0 and calls == ["lookup_stat"]

def test_background_checkpoint_moves_commits_into_the_database_file(tmp_path: Path) -> None:
    """Commits go to the WAL; once they pause, the checkpointer thread copies them into the
    main database file (read here without the WAL), and closing stops it."""
    from cryptfs.meta import sqlite as metadata

    meta = metadata.MetaStore(tmp_path / "m.db")
    try:
        meta.start_checkpointer()
        for i in range(20):
            meta.set_state(f"k{i}", "v")

        def in_main_file() -> set[str]:
            copy = tmp_path / "copy.db"
            copy.write_bytes((tmp_path / "m.db").read_bytes())  # no -wal beside it
            con = sqlite3.connect(copy)
            try:
                return {r[0] for r in con.execute("SELECT key FROM state")}
            except sqlite3.OperationalError:  # not even the tables are there yet
                return set()
            finally:
                con.close()
                copy.unlink()

        assert "k19" not in in_main_file()  # still only in the WAL, right after the burst
        deadline = time.monotonic() + metadata.CHECKPOINT_IDLE + 5
        while "k19" not in in_main_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {f"k{i}" for i in range(20)} <= in_main_file()
    finally:
        meta.close()
    assert meta._checkpointer is None
