"""Packs (docs/FORMAT.md 4.3), through real mounts on the moto S3 server: small files' chunk
objects share pack objects, read back whole and from the store alone; a pack with deleted
members keeps the others readable and ``cryptfs gc`` repacks it; a damaged member is EIO for its
file and for nothing else; a pack a crash left open is closed and uploaded at the next mount, and
the row of a pack a crash left deleted goes."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from mount_fixtures import PASSPHRASE, VaultEnv, force_unmount
from test_25_format import FormatReader

from cryptfs.format.layout import DATA_PREFIX, PACK_PREFIX

pytestmark = [pytest.mark.timeout(300), pytest.mark.parametrize("store_kind", ["s3"])]


def small_files(n: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"d{i % 3}/f{i:03d}": rng.randbytes(rng.randrange(1, 20_000)) for i in range(n)}


def write_tree(mnt: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = mnt / rel
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)


def rows(env: VaultEnv) -> list[tuple[str, int, bytes, str | None, int | None, int]]:
    """(name, size, sha256, pack, offset, refcount) of every object row."""
    con = sqlite3.connect(env.db)
    try:
        return [(n, z, bytes(h), p, o, rc) for n, z, h, p, o, rc in con.execute(
            "SELECT name, size, sha256, pack, off, refcount FROM objects ORDER BY name")]
    finally:
        con.close()


def listed(env: VaultEnv, prefix: str) -> dict[str, int]:
    store = env.store()
    try:
        return dict(store.list(prefix))
    finally:
        store.close()


def cold_remount(env: VaultEnv, mnt: Path) -> None:
    env.umount(mnt)
    shutil.rmtree(env.root / "cache", ignore_errors=True)  # no cached copy of any object
    env.mount(mnt)


def assert_tree(mnt: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        got = (mnt / rel).read_bytes()
        assert got == data, f"{rel}: {len(got)} bytes read back, {len(data)} written"


def assert_store_alone(env: VaultEnv, files: dict[str, bytes]) -> None:
    """A new machine (its own XDG home) attached to the store alone reads ``files``."""
    other = VaultEnv(env.root / "newmachine", env.store_url)
    other.init()
    mnt2 = env.root / "newmachine" / "mnt"
    other.mount(mnt2, "ro")
    try:
        assert_tree(mnt2, files)
    finally:
        other.umount(mnt2)


def test_small_files_share_packs_and_read_back_from_the_store_alone(
        vault_env: VaultEnv) -> None:
    env = vault_env
    mnt = env.root / "mnt"
    files = small_files(60, 1)
    big = random.Random(2).randbytes(3 << 20)  # whole chunks stay objects of their own
    env.mount(mnt)
    try:
        write_tree(mnt, files)
        (mnt / "big").write_bytes(big)
    finally:
        env.umount(mnt)

    packs = listed(env, PACK_PREFIX)
    data = listed(env, DATA_PREFIX)
    members = [r for r in rows(env) if r[3] is not None]
    assert 1 <= len(packs) <= 2, f"60 small files went into {len(packs)} packs"
    assert len(members) == 60 and {r[3] for r in members} <= set(packs)
    assert len(data) == 3, f"the big file's 3 whole chunks are objects, found {sorted(data)}"
    store = env.store()
    try:  # each member lies in its pack exactly as recorded
        for name, size, sha, pack, off, _rc in members:
            assert off is not None and pack is not None
            blob = store.get_range(pack, off, size, None)
            assert hashlib.sha256(blob).digest() == sha, f"{name} is not at {pack}+{off}"
    finally:
        store.close()

    env.mount(mnt)
    try:
        cold_remount(env, mnt)
        assert_tree(mnt, files)
        assert (mnt / "big").read_bytes() == big
    finally:
        env.umount(mnt)

    assert_store_alone(env, files)
    res = env.cli("verify", "--name", env.name, "--full")
    assert "clean" in res.stdout, res.stdout

    # the independent reader of test_25, on a copy of the bucket, reads the members by FORMAT.md
    dump = env.root / "dump"
    store = env.store()
    try:
        for name, size in store.list(""):
            (dump / name).parent.mkdir(parents=True, exist_ok=True)
            (dump / name).write_bytes(store.get(name, size))
    finally:
        store.close()
    reader = FormatReader(dump, PASSPHRASE.encode())
    tree = reader.tree(env.root)
    assert len(reader.pack_members) == len(files)
    for rel, data in files.items():
        assert tree[rel][:2] == ("file", data), rel
    assert tree["big"][:2] == ("file", big)


def test_deleted_members_leave_the_others_readable_and_gc_repacks(vault_env: VaultEnv) -> None:
    env = vault_env
    mnt = env.root / "mnt"
    files = small_files(40, 3)
    env.mount(mnt)
    try:
        write_tree(mnt, files)
        fd = os.open(mnt / sorted(files)[-1], os.O_RDONLY)
        try:
            os.fsync(fd)  # a checkpoint: every staged object, the pack too, is in the store
        finally:
            os.close(fd)
        (pack,) = listed(env, PACK_PREFIX)
        gone = sorted(files)[::4] + sorted(files)[1::4] + sorted(files)[2::4]
        for rel in gone:
            (mnt / rel).unlink()
            del files[rel]
        cold_remount(env, mnt)
        assert_tree(mnt, files)  # the pack stays: its other members are still live
    finally:
        env.umount(mnt)
    assert set(listed(env, PACK_PREFIX)) == {pack}
    assert {r[3] for r in rows(env) if r[3]} == {pack} and len(
        [r for r in rows(env) if r[3]]) == len(files)

    res = env.cli("gc", "--name", env.name, "--grace", "0")
    assert "repacked 1 " in res.stdout, res.stdout
    packs = listed(env, PACK_PREFIX)
    assert pack not in packs and len(packs) == 1, f"after gc the store holds packs {packs}"
    (new,) = packs
    assert packs[new] < listed_size_bound(files), "the new pack holds only the live members"
    assert {r[3] for r in rows(env) if r[3]} == {new}
    env.mount(mnt)
    try:
        cold_remount(env, mnt)
        assert_tree(mnt, files)
    finally:
        env.umount(mnt)
    res = env.cli("verify", "--name", env.name, "--full")
    assert "clean" in res.stdout, res.stdout


def test_gc_keeps_a_pack_a_snapshot_holds(vault_env: VaultEnv) -> None:
    """A pack mostly deleted in the live tree is not repacked away while a snapshot's
    metadata still names it: the snapshot reads back every file."""
    env = vault_env
    mnt = env.root / "mnt"
    files = small_files(20, 6)
    env.mount(mnt)
    try:
        write_tree(mnt, files)
    finally:
        env.umount(mnt)
    (pack,) = listed(env, PACK_PREFIX)
    env.cli("snapshot", "create", "--name", "s1")
    env.mount(mnt)
    try:
        for rel in sorted(files)[:15]:
            (mnt / rel).unlink()
    finally:
        env.umount(mnt)
    res = env.cli("gc", "--name", env.name, "--grace", "0")
    assert "repacked" not in res.stdout, res.stdout
    assert pack in listed(env, PACK_PREFIX)
    shutil.rmtree(env.root / "cache", ignore_errors=True)
    past = env.root / "past"
    past.mkdir()
    env.cli("mount", "--at", "s1", str(past))
    try:
        assert_tree(past, files)
    finally:
        env.umount(past)


def listed_size_bound(files: dict[str, bytes]) -> int:
    """More than the live members and the index can take (padding, tags)."""
    return sum(len(d) for d in files.values()) * 2 + 64 * 1024


def test_a_damaged_member_is_eio_for_its_file_only(vault_env: VaultEnv) -> None:
    env = vault_env
    mnt = env.root / "mnt"
    files = small_files(12, 4)
    env.mount(mnt)
    try:
        write_tree(mnt, files)
    finally:
        env.umount(mnt)
    members = {r[0]: r for r in rows(env) if r[3]}
    con = sqlite3.connect(env.db)
    try:  # the object of d1/f004
        (victim,) = con.execute(
            "SELECT b.obj FROM blocks b JOIN dentries f ON f.ino = b.ino JOIN dentries d "
            "ON d.ino = f.parent WHERE f.name = ? AND d.name = ?", (b"f004", b"d1")).fetchone()
    finally:
        con.close()
    _n, size, _h, pack, off, _rc = members[victim]
    assert pack is not None and off is not None
    store = env.store()
    try:
        blob = bytearray(store.get(pack, 64 << 20))
        blob[off + size // 2] ^= 0x01
        store.put(pack, bytes(blob))
    finally:
        store.close()
    shutil.rmtree(env.root / "cache", ignore_errors=True)
    env.mount(mnt)
    try:
        with pytest.raises(OSError) as e:
            (mnt / "d1/f004").read_bytes()
        assert e.value.errno == errno.EIO
        del files["d1/f004"]
        assert_tree(mnt, files)
    finally:
        env.umount(mnt)
    res = env.cli("verify", "--name", env.name, "--full", check=False)
    assert res.returncode != 0 and victim in res.stdout + res.stderr


def test_an_open_pack_left_by_kill_9_is_closed_and_uploaded_at_the_next_mount(
        vault_env: VaultEnv) -> None:
    env = vault_env
    mnt = env.root / "mnt"
    files = small_files(20, 5)
    env.mount(mnt)
    try:
        write_tree(mnt, files)  # closed, not fsynced: committed locally, the pack still open
        staged = [p.name for p in (env.data_dir / "staging").iterdir()]
        assert any(n.startswith("packs_") for n in staged), staged
        pid = _daemon(mnt)
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
    finally:
        force_unmount(str(mnt))
    assert not listed(env, PACK_PREFIX), "the pack was uploaded before the kill"
    env.mount(mnt)  # resumes: the pack is closed with the members the metadata records
    try:
        assert_tree(mnt, files)
    finally:
        env.umount(mnt)
    assert len(listed(env, PACK_PREFIX)) == 1
    assert not list((env.data_dir / "staging").iterdir())
    assert_store_alone(env, files)


def test_a_pack_row_a_crash_left_after_the_pack_was_deleted_goes_at_the_next_mount(
        vault_env: VaultEnv) -> None:
    """A collection deletes an emptied pack from the store, then its row: a crash in between
    leaves a row naming a pack the store no longer has, with no member (verify: missing).
    The next mount's first collection looks at every pack and drops that row (a ledger "del"
    entry): verify is clean. The crash is reproduced by putting back, after a clean
    collection, the pack rows it dropped, and the unclean mark a crash leaves."""
    env = vault_env
    mnt = env.root / "mnt"
    files = small_files(12, 9)
    env.mount(mnt)
    write_tree(mnt, files)
    env.umount(mnt)
    packs = [r for r in _rows_of(env, "objects") if r[0].startswith(PACK_PREFIX)]
    assert packs and set(listed(env, PACK_PREFIX)) == {r[0] for r in packs}
    env.mount(mnt)
    for rel in files:
        (mnt / rel).unlink()
    env.umount(mnt)  # its collection deletes the members' rows, the packs, their rows
    assert not listed(env, PACK_PREFIX)
    assert not [r for r in _rows_of(env, "objects") if r[0].startswith(PACK_PREFIX)]
    con = sqlite3.connect(env.db)
    try:
        with con:
            con.executemany(f"INSERT INTO objects VALUES ({', '.join('?' * len(packs[0]))})",
                            packs)
            con.execute("UPDATE state SET value = '0' WHERE key = 'clean'")
    finally:
        con.close()
    res = env.cli("verify", check=False)
    assert res.returncode != 0 and "missing" in res.stdout and packs[0][0] in res.stdout
    env.mount(mnt)  # crash recovery, then (at the latest when unmounting) a collection
    env.umount(mnt)
    assert not [r for r in _rows_of(env, "objects") if r[0].startswith(PACK_PREFIX)]
    res = env.cli("verify", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    con = sqlite3.connect(env.db)
    try:
        ops = {n: op for op, n in con.execute("SELECT op, name FROM ledger ORDER BY seq")}
    finally:
        con.close()
    assert all(ops[r[0]] == "del" for r in packs)


def _rows_of(env: VaultEnv, table: str) -> list[tuple[object, ...]]:
    con = sqlite3.connect(env.db)
    try:
        return list(con.execute(f"SELECT * FROM {table}"))
    finally:
        con.close()


def _daemon(mnt: Path) -> int:
    """The pid of the daemon serving ``mnt`` (its command line names the mountpoint)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(mnt).encode() in cmd and any(b"cryptfs" in c for c in cmd):
                return int(d.name)
    raise AssertionError(f"no daemon serves {mnt}")


def _reap(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return  # (a zombie: dead, not reaped by its parent yet)
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon {pid} still alive after kill -9")
