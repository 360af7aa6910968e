"""Group commit and in-place chunk objects against ``kill -9``.

Attribute changes (chmod, chown, utimens) are committed with the next commit instead of one
each; a close must still take every change made before it along. New chunk objects are written
in place on the local store: one torn by a crash is never referenced, and a put over it
replaces it atomically.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from mount_fixtures import VaultEnv, _mounted, force_unmount
from test_80_crash import (  # noqa: F401
    CHUNK,
    _store_only_view,
    assert_verifies,
    crash_env,
    kill_daemon,
    mount,
)

from cryptfs.format.codec import DATA_PREFIX
from cryptfs.stores.local import LocalStore

BOUND = 1 << 30  # the most bytes a test reads of one object

pytestmark = pytest.mark.log_problems_expected  # kill -9 makes the next mount log recovery


@pytest.mark.timeout(180)
@pytest.mark.parametrize("store_kind", ["local"])
def test_created_files_survive_kill(
    crash_env: tuple[VaultEnv, list[int]],  # noqa: F811 - the fixture of test_80_crash
) -> None:
    """A new file is committed with its close (one commit per small file): files closed just
    before kill -9 are all there with their data; one created and still open is committed
    within the commit delay; one created and renamed at once (a namespace operation) too."""
    env, pids = crash_env
    mnt = env.root / "mnt"
    mount(env, mnt, pids)
    held = []
    try:
        (mnt / "d").mkdir()
        want = {f"d/f{i}": random.Random(i).randbytes(1000 + i) for i in range(50)}
        held.append(os.open(mnt / "open-empty", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        held.append(os.open(mnt / "d" / "tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.rename(mnt / "d" / "tmp", mnt / "d" / "renamed")
        time.sleep(1.0)  # > COMMIT_DELAY
        for name, data in want.items():
            (mnt / name).write_bytes(data)
        kill_daemon(env, mnt)
    finally:
        for fd in held:
            try:
                os.close(fd)
            except OSError:
                pass
        if _mounted(str(mnt)):
            force_unmount(str(mnt))

    mount(env, mnt, pids)
    try:
        got = {f"d/{n}": (mnt / "d" / n).read_bytes() for n in os.listdir(mnt / "d")}
        top = sorted(os.listdir(mnt))
    finally:
        env.umount(mnt)
    assert got == {**want, "d/renamed": b""}
    assert top == ["d", "open-empty"]
    assert_verifies(env)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("store_kind", ["local"])
def test_attributes_set_before_close_survive_kill(
    crash_env: tuple[VaultEnv, list[int]],  # noqa: F811 - the fixture of test_80_crash
) -> None:
    """Like tar: write, futimens, fchown, fchmod on the open file, close, kill -9 at once.
    After a remount the file has its data, times, owner and mode; a chmod by path without a
    close after it is committed within the commit delay; a chmod and a mknod followed by the
    close of a file only read (whose open sends no flush when nothing awaits a commit) are
    committed by that close."""
    env, pids = crash_env
    mnt = env.root / "mnt"
    data = random.Random(3).randbytes(CHUNK + 99)
    mtime_ns = 1_600_000_000_123_456_789
    mount(env, mnt, pids)
    try:
        (mnt / "later").write_bytes(b"x")
        (mnt / "read").write_bytes(b"r")
        os.chmod(mnt / "later", 0o640)  # no close after it: the commit delay covers it
        time.sleep(1.0)
        fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            os.fchown(fd, 1234, 5678)
            os.fchmod(fd, 0o751)
        finally:
            os.close(fd)
        os.chmod(mnt / "read", 0o604)
        os.mknod(mnt / "node", 0o640 | stat.S_IFREG)
        assert (mnt / "read").read_bytes() == b"r"  # (opened read-only, closed)
        kill_daemon(env, mnt)
    finally:
        if _mounted(str(mnt)):
            force_unmount(str(mnt))

    mount(env, mnt, pids)
    try:
        st = os.stat(mnt / "f")
        got = (mnt / "f").read_bytes()
        later = os.stat(mnt / "later")
        read = os.stat(mnt / "read")
        node = (mnt / "node").exists()
    finally:
        env.umount(mnt)
    assert got == data
    assert stat.S_IMODE(st.st_mode) == 0o751
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == mtime_ns
    assert stat.S_IMODE(later.st_mode) == 0o640
    assert (stat.S_IMODE(read.st_mode), node) == (0o604, True)
    assert_verifies(env)


def test_local_chunk_put_replaces_a_torn_object(tmp_path: Path) -> None:
    """A chunk object torn by a crash (a prefix at its final name) is replaced whole by the
    next put of that name; other objects keep temp file and rename; no temp files remain."""
    store = LocalStore(tmp_path / "s", create=True)
    name = DATA_PREFIX + "ab/" + "ab" * 32
    blob = random.Random(4).randbytes(5000)
    store.put(name, blob)
    assert store.get(name, BOUND) == blob
    (tmp_path / "s" / name).write_bytes(blob[:100])  # what a crash mid-write leaves
    store.put(name, blob)
    assert store.get(name, BOUND) == blob
    store.put("meta/x", b"snapshot")
    assert store.get("meta/x", BOUND) == b"snapshot"
    leftovers = [p for p in (tmp_path / "s").rglob("*") if p.name.startswith(".tmp.")]
    assert not leftovers
    assert oct((tmp_path / "s" / name).stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("store_kind", ["local"])
def test_sqlite_commits_and_overwrites_fsynced_survive_kill_in_the_store_alone(
    crash_env: tuple[VaultEnv, list[int]],  # noqa: F811 - the fixture of test_80_crash
    tmp_path: Path,
) -> None:
    """SQLite on the mount (WAL, synchronous=FULL, one row a transaction) and 4 KiB overwrites
    with fsync, then kill -9 as soon as the last returned: a new machine with nothing but the
    store has every committed row and the last overwrite (each fsync's round makes its chunk,
    segment and checkpoint durable, one head write a round, collection put off between
    rounds); this machine mounts again, has them too, and verify is clean."""
    env, pids = crash_env
    mnt = env.root / "mnt"
    mount(env, mnt, pids)
    rows = [os.urandom(100) for _ in range(40)]
    block = b""
    con = None
    try:
        fd = os.open(mnt / "probe", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, os.urandom(3 * CHUNK), 0)
            for i in range(20):
                block = os.urandom(4096)
                os.pwrite(fd, block, 4096 * (i % 3))
                os.fsync(fd)
        finally:
            os.close(fd)
        con = sqlite3.connect(mnt / "db.sqlite", isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        for v in rows:
            con.execute("BEGIN")
            con.execute("INSERT INTO t (v) VALUES (?)", (v,))
            con.execute("COMMIT")
        kill_daemon(env, mnt)
    finally:
        if con is not None:
            with contextlib.suppress(sqlite3.Error):
                con.close()
        if _mounted(str(mnt)):
            force_unmount(str(mnt))

    def committed(files: dict[str, bytes]) -> tuple[list[bytes], bytes]:
        d = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for name in ("db.sqlite", "db.sqlite-wal"):
            if name in files:
                (d / name).write_bytes(files[name])
        c = sqlite3.connect(d / "db.sqlite")
        try:
            got = [bytes(r[0]) for r in c.execute("SELECT v FROM t ORDER BY id")]
        finally:
            c.close()
        return got, files["probe"][4096 * (19 % 3):4096 * (19 % 3) + 4096]

    assert committed(_store_only_view(env, env.root)) == (rows, block)
    mount(env, mnt, pids)
    try:
        here = {n: (mnt / n).read_bytes() for n in os.listdir(mnt)}
    finally:
        env.umount(mnt)
    assert committed(here) == (rows, block)
    assert_verifies(env)
