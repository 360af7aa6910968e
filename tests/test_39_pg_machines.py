"""Several machines on one PostgreSQL vault (issue 14).

Engine level: two :class:`PgMetaStore` instances (two connections, as two machines) race on
the same names; every namespace operation is atomic across them (one creator gets EEXIST, a
directory removed while another creates in it leaves no orphan, two renames of one name: one
wins, and the tree stays a tree).
"""

from __future__ import annotations

import errno
import stat
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pg_fixtures import PgPlace

from cryptfs.meta import ROOT_INO, Inode
from cryptfs.meta.postgres import DbKeys, PgMetaStore

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
