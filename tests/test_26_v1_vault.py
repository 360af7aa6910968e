"""A version 1 vault, made by cryptfs as it was before the metadata schema was stamped, opens
with today's code; the schema version is stored, checked and migrated (FORMAT.md 5.2).

``tests/data/v1_vault.tar.gz`` was written by ``tests/data/make_v1_vault.sh`` with the code of
commit 846eb6b: a local-store vault (config version 1, metadata schema version 1, i.e. no stamp)
with a directory tree, a symlink, xattrs, a hard link, a file of four chunks and a sparse file.
Each test extracts it to a temporary root and points the local config at the extracted store.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_fixtures import VaultEnv, _mounted, _tmp_root
from test_25_format import FormatError, FormatReader

from cryptfs.errors import ConfigError
from cryptfs.meta import sqlite as metadata

DATA = Path(__file__).parent / "data" / "v1_vault.tar.gz"
PASSPHRASE = "v1 vault passphrase"
DB_MEMBER = "data/cryptfs/vaults/default/metadata.db"

# path: (kind, SHA-256 of the content or the symlink target, permission bits, xattrs)
EXPECTED: dict[str, tuple[str, str, int, dict[bytes, bytes]]] = {
    "dir": ("dir", "", 0o750, {b"user.tag": b"a directory"}),
    "dir/chunks.bin": (
        "file", "2667fa24efc6f86aa082a7cc0d96cbe2415f7025a4978c1ec04476833ab7d218", 0o644, {}),
    "dir/hardlink.txt": (
        "file", "e060a3623d662ce2306c00a56c36c815ea0f6e7c6ef48d2e3c3eb79f09a4b801", 0o640,
        {b"user.comment": b"kept since v1"}),
    "dir/sub": ("dir", "", 0o755, {}),
    "dir/sub/small.bin": (
        "file", "480b67e5681a91ea920488aca325b0c2390591d7a388f698111bd9c97715e9d3", 0o644, {}),
    "hello.txt": (
        "file", "e060a3623d662ce2306c00a56c36c815ea0f6e7c6ef48d2e3c3eb79f09a4b801", 0o640,
        {b"user.comment": b"kept since v1"}),
    "link": ("symlink", hashlib.sha256(b"dir/chunks.bin").hexdigest(), 0o777, {}),
    "sparse.bin": (
        "file", "c96a955b53b6e367153340c571ce0ea07bfb5ff2e3772b4c9d2e6ff5a8afe11e", 0o644, {}),
}
SIZES = {"dir/chunks.bin": 3 * 65536 + 12345, "sparse.bin": 2 * 65536 + 5000}


@pytest.fixture
def v1() -> Iterator[VaultEnv]:
    """The v1 vault, extracted (with the real tar) to a fresh root, config pointed at it."""
    root = _tmp_root()
    try:
        subprocess.run(["tar", "-xzf", str(DATA), "-C", str(root)], check=True)
        url = f"file://{root}/store"
        cfg = root / "config" / "cryptfs" / "vaults" / "default.json"
        body = json.loads(cfg.read_text())
        assert body["vault"]["version"] == 1  # the test data is what it says it is
        body["store"] = url
        cfg.write_text(json.dumps(body))
        yield VaultEnv(root, url, passphrase=PASSPHRASE)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def user_version(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("PRAGMA user_version").fetchone()[0])
    finally:
        con.close()


def set_user_version(db: Path, v: int) -> None:
    con = sqlite3.connect(db)
    try:
        con.execute(f"PRAGMA user_version = {v}")
        con.commit()
    finally:
        con.close()


def mount_tree(mnt: Path) -> dict[str, tuple[str, str, int, dict[bytes, bytes]]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            xattrs = {k.encode(): os.getxattr(p, k, follow_symlinks=False)
                      for k in os.listxattr(p, follow_symlinks=False)}
            if stat.S_ISDIR(st.st_mode):
                kind, digest = "dir", ""
            elif stat.S_ISLNK(st.st_mode):
                kind, digest = "symlink", hashlib.sha256(os.fsencode(os.readlink(p))).hexdigest()
            else:
                kind, digest = "file", hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(mnt))] = (kind, digest, stat.S_IMODE(st.st_mode), xattrs)
    return out


def reader_tree(env: VaultEnv) -> tuple[dict[str, tuple[str, str, int, dict[bytes, bytes]]], int]:
    """The newest checkpoint's tree as the independent reader of test_25 sees it, and the schema
    version of its snapshot."""
    assert env.store_dir is not None
    work = env.root / f"reader-{len(list(env.root.glob('reader-*')))}"
    work.mkdir()
    reader = FormatReader(env.store_dir, PASSPHRASE.encode())
    tree = reader.tree(work)
    out = {}
    for rel, (kind, payload, perm, xattrs) in tree.items():
        digest = "" if kind == "dir" else hashlib.sha256(payload).hexdigest()
        out[rel] = (kind, digest, perm, xattrs)
    return out, reader.schema_version


def check_mounted_tree(env: VaultEnv, mnt: Path) -> None:
    assert mount_tree(mnt) == EXPECTED
    a, b = (mnt / "hello.txt").stat(), (mnt / "dir" / "hardlink.txt").stat()
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    for rel, size in SIZES.items():
        assert (mnt / rel).stat().st_size == size
    with open(mnt / "sparse.bin", "rb") as f:  # the hole is still a hole
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == 2 * 65536


def assert_verify_full_clean(env: VaultEnv) -> None:
    res = env.cli("verify", "--full", check=False)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert res.stdout.strip().splitlines()[-1].startswith("verify: clean - "), res.stdout


def refused(res: subprocess.CompletedProcess[str]) -> str:
    """A refusal: exit 4 and one line on stderr; returns the line."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 4 and len(lines) == 1, (res.returncode, res.stderr)
    assert lines[0].startswith("cryptfs: ")
    return lines[0]


# -- the v1 vault through real mounts -------------------------------------------------------------
def test_v1_vault_opens_reads_back_and_is_migrated(v1: VaultEnv) -> None:
    assert user_version(v1.db) == 0
    assert reader_tree(v1) == (EXPECTED, 1)  # the store as the old code left it
    mnt = v1.root / "mnt"
    v1.mount(mnt)
    try:
        check_mounted_tree(v1, mnt)
        (mnt / "dir" / "new.txt").write_bytes(b"written by today's code\n")
    finally:
        v1.umount(mnt)
    assert not _mounted(str(mnt))
    assert user_version(v1.db) == metadata.SCHEMA_VERSION
    # the unmount's checkpoint carries the stamp in its snapshot
    tree, version = reader_tree(v1)
    assert version == metadata.SCHEMA_VERSION
    assert tree == {**EXPECTED, "dir/new.txt": (
        "file", hashlib.sha256(b"written by today's code\n").hexdigest(), 0o644, {})}
    assert_verify_full_clean(v1)
    assert "migrated from schema version 1 to" in v1.log_text()


def chunk_versions(env: VaultEnv) -> set[int]:
    """The version bytes of the chunk objects in the vault's store."""
    assert env.store_dir is not None
    return {p.read_bytes()[0] for p in (env.store_dir / "data").rglob("*") if p.is_file()}


def test_v1_chunks_read_at_random_next_to_v2_ones(v1: VaultEnv) -> None:
    """The old vault's chunks are version 1 objects; random reads of them (which try the byte
    range of a version 2 object first) return the right bytes, and a file written now is stored
    as version 2, so the store holds both, and both read after a remount."""
    assert chunk_versions(v1) == {1}
    mnt = v1.root / "mnt"
    v1.mount(mnt)
    size = SIZES["dir/chunks.bin"]
    offsets = [70000, 5, 65536 + 4097, 200000, 3 * 65536 + 100, 131072 - 2]
    try:
        fd = os.open(mnt / "dir" / "chunks.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            pieces = {off: os.pread(fd, 4096, off) for off in offsets}
        finally:
            os.close(fd)
        whole = (mnt / "dir" / "chunks.bin").read_bytes()
        assert hashlib.sha256(whole).hexdigest() == EXPECTED["dir/chunks.bin"][1]
        for off, got in pieces.items():
            assert got == whole[off : off + 4096], off
        (mnt / "new.bin").write_bytes(whole[::-1])
    finally:
        v1.umount(mnt)
    assert chunk_versions(v1) == {1, 2}
    v1.mount(mnt)
    try:
        assert (mnt / "new.bin").read_bytes() == whole[::-1] and len(whole) == size
        fd = os.open(mnt / "dir" / "chunks.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            assert os.pread(fd, 100, 150000) == whole[150000:150100]
        finally:
            os.close(fd)
    finally:
        v1.umount(mnt)


@pytest.mark.parametrize("mounted_first", [False, True], ids=["v1-snapshot", "v2-snapshot"])
def test_v1_vault_restored_from_the_store_alone(v1: VaultEnv, mounted_first: bool) -> None:
    """Without local metadata the vault comes back from its newest checkpoint: the v1 snapshot
    as made (migrated after restore), or the stamped one today's code wrote at unmount."""
    mnt = v1.root / "mnt"
    if mounted_first:
        v1.mount(mnt)
        v1.umount(mnt)
    subprocess.run(["rm", "-rf", str(v1.data_dir)], check=True)
    v1.mount(mnt)
    try:
        check_mounted_tree(v1, mnt)
    finally:
        v1.umount(mnt)
    assert user_version(v1.db) == metadata.SCHEMA_VERSION
    assert ("migrated from schema version 1" in v1.log_text()) is not mounted_first
    assert_verify_full_clean(v1)


def test_newer_schema_database_is_refused(v1: VaultEnv) -> None:
    newer = metadata.SCHEMA_VERSION + 1
    set_user_version(v1.db, newer)
    before = v1.db.read_bytes()
    mnt = v1.root / "mnt"
    mnt.mkdir()
    line = refused(v1.cli("mount", str(mnt), check=False))
    assert not _mounted(str(mnt))
    assert line == (f"cryptfs: metadata database {v1.db} is schema version {newer}, newer than "
                    f"this cryptfs supports ({metadata.SCHEMA_VERSION})")
    assert refused(v1.cli("verify", check=False)) == line
    assert v1.db.read_bytes() == before  # nothing was changed


FUTURE_CRYPTFS = """
import sys
from cryptfs.meta import sqlite as metadata
metadata.SCHEMA_VERSION += 1  # a later cryptfs: one more migration step, here a no-op
metadata.MIGRATIONS[metadata.SCHEMA_VERSION - 1] = lambda raw: None
from cryptfs.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_newer_schema_snapshot_is_refused_on_restore(v1: VaultEnv) -> None:
    """A snapshot written by a later cryptfs (schema version + 1) cannot be restored: one line,
    exit 4, and no local database is left behind."""
    newer = metadata.SCHEMA_VERSION + 1
    res = subprocess.run([sys.executable, "-c", FUTURE_CRYPTFS, "repair"], env=v1.env,
                         cwd=v1.root, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert user_version(v1.db) == newer
    # the independent reader sees the stamp in the newest snapshot and knows no version 3
    with pytest.raises(FormatError, match=f"snapshot schema version {newer} "):
        reader_tree(v1)
    subprocess.run(["rm", "-rf", str(v1.data_dir)], check=True)
    mnt = v1.root / "mnt"
    mnt.mkdir()
    line = refused(v1.cli("mount", str(mnt), check=False))
    assert not _mounted(str(mnt))
    assert line.startswith("cryptfs: metadata snapshot meta/"), line
    assert line.endswith(f"is schema version {newer}, newer than this cryptfs supports "
                         f"({metadata.SCHEMA_VERSION})"), line
    assert not v1.db.exists()
    assert not v1.db.with_name("metadata.db.restore").exists()


# -- the schema stamp on real SQLite files --------------------------------------------------------
def v1_db(dest: Path, *, pre_replication: bool = False) -> Path:
    """The v1 vault's database; ``pre_replication`` drops what v1 databases written before
    replication lacked (the copies table, its trigger, the dentry index)."""
    with tarfile.open(DATA) as tar:
        src = tar.extractfile(DB_MEMBER)
        assert src is not None
        dest.write_bytes(src.read())
    if pre_replication:
        con = sqlite3.connect(dest)
        con.executescript("DROP TRIGGER objects_copies; DROP TABLE copies; "
                          "DROP INDEX ix_dentries_ino;")
        con.close()
    return dest


def schema_of(db: Path) -> dict[str, object]:
    """Every table's columns and indexes, and the trigger names: what must match whether a
    database was created by this code or migrated to its version."""
    con = sqlite3.connect(db)
    try:
        out: dict[str, object] = {"user_version": con.execute("PRAGMA user_version").fetchone()}
        for typ, name in con.execute("SELECT type, name FROM sqlite_master ORDER BY name"):
            if typ == "table":
                out[name] = (con.execute(f"PRAGMA table_xinfo({name})").fetchall(),
                             sorted(con.execute(f"PRAGMA index_list({name})").fetchall()))
            else:
                out[f"{typ}:{name}"] = True
        return out
    finally:
        con.close()


def test_new_and_migrated_databases_have_the_same_schema(tmp_path: Path) -> None:
    metadata.MetaStore(tmp_path / "new.db").close()
    fresh = schema_of(tmp_path / "new.db")
    assert fresh["user_version"] == (metadata.SCHEMA_VERSION,)
    # a step for every version before this one: a schema change without a step fails below
    assert sorted(metadata.MIGRATIONS) == list(range(1, metadata.SCHEMA_VERSION))
    for pre in (False, True):
        db = v1_db(tmp_path / f"v1-{pre}.db", pre_replication=pre)
        assert ("copies" in schema_of(db)) == (not pre)
        m = metadata.MetaStore(db)
        assert m.migrated_from == 1
        assert m.get_state("clean") == "1"  # rows survive
        m.close()
        assert schema_of(db) == fresh
        m = metadata.MetaStore(db)  # opened again: nothing left to migrate
        assert m.migrated_from is None
        m.close()


def test_a_failed_migration_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = v1_db(tmp_path / "v1.db", pre_replication=True)
    before = schema_of(db)
    real = metadata.MIGRATIONS[1]

    def half(raw: sqlite3.Connection) -> None:
        real(raw)
        raise RuntimeError("the machine died here")

    monkeypatch.setitem(metadata.MIGRATIONS, 1, half)
    with pytest.raises(RuntimeError):
        metadata.MetaStore(db)
    assert schema_of(db) == before  # no table, no stamp: one transaction
    monkeypatch.setitem(metadata.MIGRATIONS, 1, real)
    metadata.MetaStore(db).close()
    assert user_version(db) == metadata.SCHEMA_VERSION


def test_bad_stamps_are_one_line_config_errors(tmp_path: Path) -> None:
    db = v1_db(tmp_path / "v1.db")
    set_user_version(db, metadata.SCHEMA_VERSION + 5)
    with pytest.raises(ConfigError, match=r"is schema version \d+, newer than this cryptfs"):
        metadata.MetaStore(db)
    set_user_version(db, -3)
    with pytest.raises(ConfigError, match=r"is corrupt \(schema version -3\)"):
        metadata.MetaStore(db)
    assert user_version(db) == -3
    header = db.read_bytes()[:100]
    assert metadata.image_schema_version(header) == -3
