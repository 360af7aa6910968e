"""`cryptfs fsck`: finds each kind of metadata damage, repairs what is safe, and leaves a vault
that verifies and mounts with its data intact."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from mount_fixtures import VaultEnv
from test_45_fs_commits import vault  # noqa: F401 - a vault opened in this process

from cryptfs.vault.core import Vault


def test_fsck_finds_and_repairs(mounted: tuple[VaultEnv, Path]) -> None:
    env, mnt = mounted
    data = {f"f{i}": os.urandom(50_000 + i) for i in range(5)}
    for n, d in data.items():
        (mnt / n).write_bytes(d)
    (mnt / "dir").mkdir()
    os.link(mnt / "f0", mnt / "dir" / "f0-link")
    env.umount(mnt)
    assert env.cli("fsck").returncode == 0

    con = sqlite3.connect(env.db)
    with con:
        con.execute("UPDATE objects SET refcount = refcount + 5 WHERE name LIKE 'data/%' "
                    "AND rowid = (SELECT min(rowid) FROM objects WHERE name LIKE 'data/%')")
        ino_f1 = con.execute("SELECT ino FROM dentries WHERE name = ?", (b"f1",)).fetchone()[0]
        con.execute("UPDATE inodes SET nlink = 7 WHERE ino = ?", (ino_f1,))
        con.execute("INSERT INTO inodes (mode, uid, gid, size, nlink, atime_ns, mtime_ns, "
                    "ctime_ns, rdev) VALUES (33188, 0, 0, 0, 1, 0, 0, 0, 0)")  # orphan
        con.execute("INSERT INTO dentries (parent, name, ino) VALUES (1, ?, 999999)",
                    (b"dangling",))
        con.execute("INSERT INTO dentries (parent, name, ino) VALUES (1, ?, ?)",
                    (b".fuse_hidden0000000100000001", ino_f1))
    con.close()
    env.data_dir.joinpath("staging").mkdir(exist_ok=True)
    (env.data_dir / "staging" / "data_ff_stray").write_bytes(b"x")

    res = env.cli("fsck", check=False)
    assert res.returncode == 6
    out = res.stdout
    for needle in ("reference count", "link count 7", "no name (orphan)", "missing inode 999999",
                   "hidden entry", "stray staged file"):
        assert needle in out, (needle, out)

    res = env.cli("fsck", "--repair", check=False)
    assert res.returncode == 0, res.stdout
    assert res.stdout.count("repaired:") >= 6
    assert env.cli("fsck").stdout.strip().endswith("fsck: clean (0 repaired)")
    assert env.cli("verify").returncode == 0

    env.mount(mnt)
    for n, d in data.items():
        assert hashlib.sha256((mnt / n).read_bytes()).digest() == hashlib.sha256(d).digest()
    assert os.stat(mnt / "f1").st_nlink == 1
    assert sorted(os.listdir(mnt)) == ["dir", *sorted(data)]
    assert os.stat(mnt / "f0").st_nlink == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("check", ["fsck", "verify"])
def test_checks_take_the_filesystem_lock(vault: Vault, check: str) -> None:  # noqa: F811
    """fsck and verify use the engine's connection only under the filesystem lock, which
    guards it (on a shared vault the change-notice thread checks the ledger on it under that
    lock): while another thread holds the lock, the check waits, then finishes clean."""
    from cryptfs.admin.fsck import fsck
    from cryptfs.admin.verify import verify

    assert vault.fs is not None
    run = (lambda: fsck(vault)) if check == "fsck" else (lambda: verify(vault, progress=False))
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(run().clean))
    with vault.fs.lock:
        t.start()
        t.join(0.5)
        assert t.is_alive() and not out  # waiting for the lock this thread holds
    t.join(50)
    assert out == [True]
