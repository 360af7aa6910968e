"""The vault through a real FUSE mount, on the local store and on the moto S3 server:
real programs (cp, tar, sqlite3, git), random writes against a reference, POSIX semantics
programs rely on, persistence across remounts and from the store alone, what the store sees."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from mount_fixtures import _MOUNTS, CRYPTFS, VaultEnv

MARKER = b"PLAINTEXT-MARKER-7f3a9c"


def tree_digest(root: Path) -> dict[str, tuple]:
    """Everything a copy must preserve: type, mode, size, content hash, target, xattrs."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode, st.st_mtime_ns)
            else:
                h = hashlib.sha256(p.read_bytes()).hexdigest()
                xa = sorted((a, os.getxattr(p, a)) for a in os.listxattr(p))
                out[rel] = ("f", st.st_mode, st.st_size, h, st.st_mtime_ns, st.st_nlink, xa)
    return out


def make_tree(root: Path, chunk: int = 1 << 20) -> None:
    rnd = random.Random(42)
    (root / "sub" / "deeper").mkdir(parents=True)
    sizes = {"empty": 0, "one": 1, "chunk-1": chunk - 1, "chunk": chunk, "chunk+1": chunk + 1,
             "several": 3 * chunk + 12345}
    for name, size in sizes.items():
        (root / name).write_bytes(rnd.randbytes(size))
    (root / "sub" / "big50").write_bytes(rnd.randbytes(50 << 20))
    (root / "sub" / "deeper" / "text.txt").write_bytes(MARKER + b" hello\n")
    os.symlink("../one", root / "sub" / "link-to-one")
    os.link(root / "one", root / "sub" / "hardlink")
    os.chmod(root / "chunk", 0o600)
    os.setxattr(root / "one", "user.color", b"blue")
    os.utime(root / "several", ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))


def test_cp_a_roundtrip_and_remount(mounted: tuple[VaultEnv, Path], tmp_path: Path) -> None:
    env, mnt = mounted
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    subprocess.run(["cp", "-a", f"{src}/.", str(mnt / "copy")], check=True)
    want = tree_digest(src)
    assert tree_digest(mnt / "copy") == want
    env.umount(mnt)
    env.mount(mnt)
    assert tree_digest(mnt / "copy") == want
    back = tmp_path / "back"
    subprocess.run(["cp", "-a", str(mnt / "copy"), str(back)], check=True)
    assert tree_digest(back) == want


def test_tar_roundtrip(mounted: tuple[VaultEnv, Path], tmp_path: Path) -> None:
    env, mnt = mounted
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src, chunk=1 << 16)
    (src / "sub" / "big50").unlink()
    tarball = tmp_path / "t.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(tarball), "."], check=True)
    (mnt / "x").mkdir()
    subprocess.run(["tar", "-C", str(mnt / "x"), "--xattrs", "-xpf", str(tarball)], check=True)
    out = tmp_path / "out.tar"
    subprocess.run(["tar", "-C", str(mnt / "x"), "-cf", str(out), "."], check=True)
    ext = tmp_path / "ext"
    ext.mkdir()
    subprocess.run(["tar", "-C", str(ext), "-xpf", str(out)], check=True)
    def essentials(d: dict[str, tuple]) -> dict[str, tuple]:  # tar keeps whole seconds only
        return {k: v[:4] if v[0] == "f" else v[:2] for k, v in d.items()}

    assert essentials(tree_digest(src)) == essentials(tree_digest(ext))


def test_sqlite_database_on_mount(mounted: tuple[VaultEnv, Path]) -> None:
    env, mnt = mounted
    db = mnt / "app.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    with con:
        con.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"v{i}" * 20) for i in range(3000)])
    for i in range(20):  # many small transactions: journal, fsync, overwrite in place
        with con:
            con.execute("UPDATE t SET v = ? WHERE k = ?", (f"u{i}", i * 7))
    con.close()
    res = subprocess.run(["sqlite3", str(db), "PRAGMA integrity_check; SELECT count(*) FROM t;"],
                         capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["ok", "3000"]
    env.umount(mnt)
    env.mount(mnt)
    con = sqlite3.connect(db)
    assert con.execute("SELECT v FROM t WHERE k = 7").fetchone() == ("u1",)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()


def test_git_on_mount(mounted: tuple[VaultEnv, Path]) -> None:
    _env, mnt = mounted
    repo = mnt / "repo"
    repo.mkdir()
    genv = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(repo), *args], env=genv, capture_output=True,
                             text=True)
        assert res.returncode == 0, f"git {args[0]}: {res.stderr}"
        return res.stdout

    git("init", "-q")
    for i in range(30):
        (repo / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    git("add", ".")
    git("commit", "-qm", "first")
    (repo / "f3.txt").write_text("changed\n")
    git("commit", "-qam", "second")
    assert git("log", "--oneline").count("\n") == 2
    assert git("status", "--porcelain") == ""
    git("fsck", "--strict")


def test_random_offset_writes_match_reference(mounted: tuple[VaultEnv, Path],
                                              tmp_path: Path) -> None:
    env, mnt = mounted
    rnd = random.Random(7)
    ref = bytearray()
    path = mnt / "rand.bin"
    with open(path, "w+b") as f:
        for _ in range(300):
            off = rnd.randrange(0, 6 << 20)
            data = rnd.randbytes(rnd.choice([1, 100, 4096, 70000, 1 << 20, (1 << 20) + 3]))
            f.seek(off)
            f.write(data)
            if len(ref) < off:
                ref.extend(bytes(off - len(ref)))
            ref[off:off + len(data)] = data
            if rnd.random() < 0.05:
                cut = rnd.randrange(0, len(ref) + 1)
                f.truncate(cut)
                del ref[cut:]
        f.flush()
        f.seek(0)
        assert f.read() == bytes(ref)
    assert path.read_bytes() == bytes(ref)
    env.umount(mnt)
    env.mount(mnt)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(ref).digest()


def test_sparse_file_reads_zeros(mounted: tuple[VaultEnv, Path]) -> None:
    _env, mnt = mounted
    p = mnt / "sparse"
    with open(p, "wb") as f:
        f.seek(10 << 20)
        f.write(b"end")
    assert p.stat().st_size == (10 << 20) + 3
    with open(p, "rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20)
        f.seek(10 << 20)
        assert f.read() == b"end"
    os.truncate(p, 1 << 40)  # huge: no zeros written
    assert p.stat().st_size == 1 << 40


def test_semantics_rename_link_symlink_xattr_chmod(mounted: tuple[VaultEnv, Path]) -> None:
    _env, mnt = mounted
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    os.rename(mnt / "a", mnt / "b")  # over a file
    assert (mnt / "b").read_text() == "A" and not (mnt / "a").exists()
    (mnt / "d1").mkdir()
    (mnt / "d2").mkdir()
    os.rename(mnt / "d1", mnt / "d2")  # over an empty directory
    (mnt / "d2" / "f").write_text("x")
    (mnt / "d3").mkdir()
    with pytest.raises(OSError) as e:
        os.rename(mnt / "d3", mnt / "d2")
    assert e.value.errno == errno.ENOTEMPTY
    os.rename(mnt / "b", mnt / "d2" / "moved")  # across directories
    assert (mnt / "d2" / "moved").read_text() == "A"
    os.link(mnt / "d2" / "moved", mnt / "hl")
    assert os.stat(mnt / "hl").st_ino == os.stat(mnt / "d2" / "moved").st_ino
    assert os.stat(mnt / "hl").st_nlink == 2
    os.symlink("d2/moved", mnt / "sl")
    assert os.readlink(mnt / "sl") == "d2/moved" and (mnt / "sl").read_text() == "A"
    os.setxattr(mnt / "hl", "user.k", b"v" * 1000)
    assert os.getxattr(mnt / "d2" / "moved", "user.k") == b"v" * 1000
    assert os.listxattr(mnt / "hl") == ["user.k"]
    os.removexattr(mnt / "hl", "user.k")
    assert os.listxattr(mnt / "hl") == []
    os.chmod(mnt / "hl", 0o4751)
    assert os.stat(mnt / "hl").st_mode & 0o7777 == 0o4751
    long = "n" * 255
    (mnt / long).write_text("long")
    assert (mnt / long).read_text() == "long"
    with pytest.raises(OSError) as e:
        (mnt / ("n" * 256)).write_text("x")
    assert e.value.errno == errno.ENAMETOOLONG
    os.mkfifo(mnt / "fifo")
    assert (mnt / "fifo").is_fifo()
    many = mnt / "many"
    many.mkdir()
    for i in range(1500):  # a directory larger than one readdir buffer
        (many / f"entry-{i:05d}-{'x' * 40}").touch()
    assert len(os.listdir(many)) == 1500


def test_unlink_while_open(mounted: tuple[VaultEnv, Path]) -> None:
    _env, mnt = mounted
    p = mnt / "tmp"
    data = os.urandom(3 << 20)
    p.write_bytes(data)
    with open(p, "r+b") as f:
        os.unlink(p)
        assert not p.exists() and os.listdir(mnt) == []
        assert f.read() == data
        f.write(b"more")
        f.seek(0)
        assert f.read() == data + b"more"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert os.listdir(mnt) == []


def test_store_alone_restores_everything(mounted: tuple[VaultEnv, Path], tmp_path: Path) -> None:
    env, mnt = mounted
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src, chunk=1 << 16)
    (src / "sub" / "big50").unlink()
    subprocess.run(["cp", "-a", f"{src}/.", str(mnt)], check=True)
    want = tree_digest(mnt)
    env.umount(mnt)
    shutil.rmtree(env.root / "data" / "cryptfs" / "vaults")  # local metadata, ledger, staging
    shutil.rmtree(env.root / "cache", ignore_errors=True)
    env.mount(mnt)
    assert tree_digest(mnt) == want
    env.umount(mnt)
    assert env.cli("verify", "--full").returncode == 0


def _store_objects(env: VaultEnv) -> dict[str, bytes]:
    st = env.store()
    try:
        return {name: st.get(name, 1 << 30) for name, _ in st.list("")}
    finally:
        st.close()


def test_store_sees_only_ciphertext_and_dedups(mounted: tuple[VaultEnv, Path]) -> None:
    env, mnt = mounted
    secret_names = ["Quarterly-Report-Secret.txt", "diary-entry-private"]
    payload = (MARKER * 200_000)[:(3 << 20) + 17]  # 3+ chunks of marker-filled plaintext
    for n in secret_names:
        (mnt / n).write_bytes(payload)  # identical content: stored once
    (mnt / "dir-name-hidden").mkdir()
    env.umount(mnt)
    objs = _store_objects(env)
    data_objs = {n: b for n, b in objs.items() if n.startswith("data/")}
    for name, blob in objs.items():
        for needle in [MARKER, MARKER[:12], *(s.encode() for s in secret_names),
                       b"dir-name-hidden", b"Quarterly"]:
            assert needle not in blob, f"{needle!r} found in {name}"
            assert needle not in name.encode()
    # one object per chunk of the payload (the marker's phase differs in each), shared by both;
    # on S3 the last, partial chunk is a member of a pack (docs/FORMAT.md 4.3)
    cfg = json.loads((env.root / "config/cryptfs/vaults/default.json").read_text())
    chunk = cfg["vault"]["chunk_size"]
    con = sqlite3.connect(env.db)
    try:
        members = con.execute("SELECT count(*), coalesce(sum(size), 0) FROM objects "
                              "WHERE pack IS NOT NULL").fetchone()
    finally:
        con.close()
    assert members[0] == 1
    assert len(data_objs) + members[0] == -(-len(payload) // chunk)
    assert sum(len(b) for b in data_objs.values()) + members[1] < len(payload) * 1.15


@pytest.mark.log_problems_expected
def test_flipped_byte_gives_eio(mounted: tuple[VaultEnv, Path]) -> None:
    env, mnt = mounted
    (mnt / "victim").write_bytes(os.urandom(100_000))
    (mnt / "bystander").write_bytes(b"fine")
    env.umount(mnt)
    st = env.store()
    con = sqlite3.connect(env.db)
    obj, pack, off, size = con.execute(
        "SELECT b.obj, o.pack, o.off, o.size FROM blocks b JOIN dentries d ON d.ino = b.ino "
        "JOIN objects o ON o.name = b.obj WHERE d.name = ?", (b"victim",)).fetchone()
    con.close()
    if pack is not None:  # on S3 a small file's chunk lies in a pack (docs/FORMAT.md 4.3)
        obj = pack
    else:
        off = 0
    blob = bytearray(st.get(obj, 1 << 30))
    blob[off + size // 2] ^= 0x01
    st.delete(obj)
    st.put(obj, bytes(blob))
    st.close()
    shutil.rmtree(env.root / "cache", ignore_errors=True)  # the verified local copy
    env.mount(mnt)
    with pytest.raises(OSError) as e:
        (mnt / "victim").read_bytes()
    assert e.value.errno == errno.EIO
    assert (mnt / "bystander").read_bytes() == b"fine"
    env.umount(mnt)
    assert "/victim" in env.log_text()


def test_wrong_passphrase_changes_nothing(vault_env: VaultEnv) -> None:
    mnt = vault_env.root / "mnt"
    mnt.mkdir()
    before = sorted(p.name for p in vault_env.root.rglob("*"))
    bad = dict(vault_env.env, CRYPTFS_PASSPHRASE="not the passphrase")
    res = vault_env.cli("mount", str(mnt), env=bad, check=False)
    assert res.returncode == 3
    assert res.stderr.strip() == "cryptfs: wrong passphrase"
    assert "Traceback" not in res.stderr
    assert not os.path.ismount(mnt)
    assert sorted(p.name for p in vault_env.root.rglob("*")) == before


def test_fsync_puts_data_and_metadata_in_store(mounted: tuple[VaultEnv, Path]) -> None:
    env, mnt = mounted
    data = os.urandom(200_000)
    with open(mnt / "durable", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        # while still mounted: a second machine (fresh XDG home) restores it from the store
        other = VaultEnv(env.root / "other", env.store_url)
        other.cli("init", env.store_url)  # attaches the existing vault
        objs = _store_objects(env)
        assert any(n.startswith("checkpoints/") for n in objs)
    env.umount(mnt)
    mnt2 = env.root / "mnt2"
    other.mount(mnt2)
    try:
        assert (mnt2 / "durable").read_bytes() == data
    finally:
        other.umount(mnt2)


def test_only_the_mounting_user_can_enter(mounted: tuple[VaultEnv, Path]) -> None:
    _env, mnt = mounted
    (mnt / "f").write_text("private")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # as an unprivileged user, without allow_other
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.listdir(mnt)
            os.write(w, b"OK")
        except OSError as e:
            os.write(w, errno.errorcode.get(e.errno, "?").encode())
        finally:
            os._exit(0)
    os.close(w)
    result = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert result == "EACCES"


def test_local_secrets_are_private(mounted: tuple[VaultEnv, Path]) -> None:
    env, mnt = mounted
    (mnt / "f").write_text("x")
    env.umount(mnt)
    cfg = env.root / "config" / "cryptfs" / "vaults" / "default.json"
    for p in [cfg, env.db, env.data_dir / "head.json", env.data_dir / "mount.lock",
              env.data_dir / "daemon.log"]:
        assert p.stat().st_mode & 0o777 == 0o600, p
    # every directory cryptfs made: the XDG homes it had to create, its trees, the cache
    dirs = [env.root / x for x in ("config", "data", "cache") if (env.root / x).exists()]
    dirs += [p for d in list(dirs) for p in d.rglob("*") if p.is_dir()]
    assert len(dirs) >= 7 + (env.store_dir is None) * 3, dirs
    for d in dirs:
        assert d.stat().st_mode & 0o777 == 0o700, d
    # directories left open by an older version (or by hand) are tightened at the next use
    opened = [cfg.parent, cfg.parent.parent, env.data_dir, env.data_dir.parent]
    for d in opened:
        os.chmod(d, 0o755)
    env.cli("key", "list")
    for d in opened:
        assert d.stat().st_mode & 0o777 == 0o700, d
    assert passphrase_in_no_file(env)


def passphrase_in_no_file(env: VaultEnv) -> bool:
    """The passphrase appears in no local file (config, database, log, head)."""
    needle = env.passphrase.encode()
    return not any(needle in p.read_bytes() for p in env.root.rglob("*")
                   if p.is_file() and "mnt" not in p.parts)


def test_secrets_reach_no_command_line_or_log(mounted: tuple[VaultEnv, Path]) -> None:
    env, mnt = mounted
    (mnt / "f").write_bytes(os.urandom(10_000))
    pid = int((env.data_dir / "mount.lock").read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"cryptfs.cli.mountd" in cmdline  # it is the daemon
    assert env.passphrase.encode() not in cmdline
    environ = Path(f"/proc/{pid}/environ")
    assert environ.stat().st_mode & 0o077 == 0  # the environment is readable by its owner only
    # the environment it was exec'ed with (what /proc shows) has no passphrase, the rest is there
    variables = environ.read_bytes().split(b"\0")
    assert f"XDG_DATA_HOME={env.root / 'data'}".encode() in variables
    assert not any(v.startswith((b"CRYPTFS_PASSPHRASE=", b"CRYPTFS_NEW_PASSPHRASE="))
                   for v in variables)
    assert env.passphrase.encode() not in environ.read_bytes()
    # no core dumps; memory locked (the tests run as root, where locking is not limited)
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert [ln.split()[4:6] for ln in limits.splitlines() if ln.startswith("Max core")] == [
        ["0", "0"]]
    status = Path(f"/proc/{pid}/status").read_text()
    locked_kb = int(next(ln for ln in status.splitlines() if ln.startswith("VmLck:")).split()[1])
    assert os.geteuid() != 0 or locked_kb > 0
    env.umount(mnt)
    assert env.passphrase not in env.log_text()


def _without_ptrace() -> None:
    """preexec_fn: drop CAP_SYS_PTRACE from the bounding set, so the program exec'ed next (run
    as root) has every capability but that one."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 19, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_SYS_PTRACE
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def test_daemon_is_not_dumpable(vault_env: VaultEnv) -> None:
    """Observed from outside: with the same uid and capabilities, /proc/PID/exe of an ordinary
    process can be read, that of the daemon cannot (PR_SET_DUMPABLE 0 needs CAP_SYS_PTRACE of
    its readers; root has it, so the daemon and the reader both run without it here)."""
    env = vault_env
    mnt = env.root / "mnt"
    mnt.mkdir()
    subprocess.run([CRYPTFS, "mount", str(mnt)], env=env.env, check=True, timeout=60,
                   preexec_fn=_without_ptrace, stdin=subprocess.DEVNULL, capture_output=True)
    _MOUNTS.add(str(mnt))
    control = subprocess.Popen(["sleep", "30"], preexec_fn=_without_ptrace)
    try:
        pid = int((env.data_dir / "mount.lock").read_text())
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        bounding = int(next(ln for ln in status if ln.startswith("CapBnd:")).split()[1], 16)
        assert bounding & (1 << 19) == 0  # the daemon runs without CAP_SYS_PTRACE

        def readable(p: int) -> bool:
            return subprocess.run(["readlink", f"/proc/{p}/exe"], preexec_fn=_without_ptrace,
                                  capture_output=True).returncode == 0

        assert readable(control.pid)  # the control: same uid, same capabilities
        assert not readable(pid)
        assert (mnt / ".").stat()  # the mount works without CAP_SYS_PTRACE
    finally:
        control.kill()
        control.wait()
        env.umount(mnt)


def test_daemon_runs_this_source_tree() -> None:
    """The daemon is started with ``python -m cryptfs.cli.mountd``: when this cryptfs was
    imported from a source tree, that tree (the directory holding the ``cryptfs`` package)
    comes first on the daemon's PYTHONPATH, and no passphrase variable is passed on."""
    import cryptfs
    from cryptfs.cli.mount import daemon_environment

    os.environ["CRYPTFS_PASSPHRASE"] = "not for the daemon"
    try:
        env = daemon_environment()
    finally:
        del os.environ["CRYPTFS_PASSPHRASE"]
    first = env["PYTHONPATH"].split(os.pathsep)[0]
    assert Path(first) == Path(cryptfs.__file__).resolve().parents[1]
    assert (Path(first) / "cryptfs" / "cli" / "mountd.py").is_file()
    assert "CRYPTFS_PASSPHRASE" not in env


def test_foreground_daemon_environment(vault_env: VaultEnv) -> None:
    """``mount -f``: the CLI process itself becomes the daemon (same pid, by exec), without the
    passphrase in its environment; unmounting ends it with status 0."""
    env = vault_env
    mnt = env.root / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([CRYPTFS, "mount", "-f", str(mnt)], env=env.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _MOUNTS.add(str(mnt))
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        assert b"cryptfs.cli.mountd" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert env.passphrase.encode() not in Path(f"/proc/{proc.pid}/environ").read_bytes()
        (mnt / "f").write_text("foreground")
    finally:
        env.umount(mnt)
    assert proc.wait(timeout=60) == 0
    env.mount(mnt)
    try:
        assert (mnt / "f").read_text() == "foreground"
    finally:
        env.umount(mnt)


def test_a_listing_hands_the_kernel_whole_stats(local_env: VaultEnv) -> None:
    """The kernel's first listing of a directory is a readdirplus: every entry comes with its
    whole stat, so stat calls after ``ls`` (``ls -l``, ``find``, a tree read back) reach the
    daemon no more, and see exactly what a lookup gives (getattr, counted by the mount's
    metrics: one per entry without it)."""
    from test_92_metrics import metrics_addr, scrape, value

    env = local_env
    mnt = env.root / "mnt"
    env.mount(mnt)
    d = mnt / "d"
    (d / "sub").mkdir(parents=True)
    rnd = random.Random(40)
    for i in range(40):
        (d / f"f{i:02d}").write_bytes(rnd.randbytes(i * 997))
    os.link(d / "f07", d / "hard")
    os.symlink("f01", d / "sym")
    os.chmod(d / "f03", 0o640)
    os.utime(d / "f05", ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    env.umount(mnt)
    env.mount(mnt)

    names = sorted([f"f{i:02d}" for i in range(40)] + ["hard", "sym", "sub"])

    def stats() -> dict[str, tuple[int, ...]]:
        return {n: (s.st_ino, s.st_mode, s.st_nlink, s.st_uid, s.st_size, s.st_blocks,
                    s.st_mtime_ns, s.st_ctime_ns) for n in names for s in [os.lstat(d / n)]}

    want = stats()  # (each one looked up: the directory is not listed)
    env.umount(mnt)
    env.mount(mnt, "metrics=127.0.0.1:0")
    addr = metrics_addr(env, mnt)
    before = value(scrape(addr), "cryptfs_fuse_operations_total", op="getattr")
    assert sorted(os.listdir(d)) == names
    got = stats()
    looked_up = value(scrape(addr), "cryptfs_fuse_operations_total", op="getattr") - before
    assert got == want
    assert looked_up <= 2, f"{looked_up} getattr calls after a listing of {len(want)} entries"
    env.umount(mnt)


def test_a_read_only_close_sends_no_flush(local_env: VaultEnv) -> None:
    """Closing a file opened read-only costs no flush round trip (FOPEN_NOFLUSH: it would
    commit nothing); a close after writing still flushes (tests/test_80_crash.py: what it
    closed survives a kill -9)."""
    from test_92_metrics import metrics_addr, scrape, value

    env = local_env
    mnt = env.root / "mnt"
    env.mount(mnt, "metrics=127.0.0.1:0")
    addr = metrics_addr(env, mnt)

    def flushes() -> float:
        return value(scrape(addr), "cryptfs_fuse_operations_total", op="flush")

    data = {f"f{i}": random.Random(i).randbytes(1000 + i * 3000) for i in range(10)}
    before = flushes()
    for name, content in data.items():
        (mnt / name).write_bytes(content)
    assert flushes() - before == len(data)
    before = flushes()
    assert {n: (mnt / n).read_bytes() for n in data} == data
    assert flushes() - before == 0
    env.umount(mnt)


def test_a_sequential_read_comes_in_whole_mebibytes(local_env: VaultEnv) -> None:
    """The mount reads ahead 1 MiB (``widen_readahead``): a file read from start to end
    reaches the daemon in requests of 1 MiB, not the kernel's default 128 KiB (eight times
    the callbacks), and returns every byte (counted by the mount's metrics). The mount point
    has a space: the mount table escapes it."""
    from test_92_metrics import metrics_addr, scrape, value

    env = local_env
    mnt = env.root / "the mount"
    env.mount(mnt)
    data = random.Random(41).randbytes(8 << 20)
    (mnt / "big").write_bytes(data)
    env.umount(mnt)
    env.mount(mnt, "metrics=127.0.0.1:0")  # (a new mount: nothing of the file in the cache)
    addr = metrics_addr(env, mnt)
    before = value(scrape(addr), "cryptfs_fuse_operations_total", op="read")
    with open(mnt / "big", "rb", buffering=0) as f:
        got = b"".join(iter(lambda: f.read(1 << 20), b""))
    reads = value(scrape(addr), "cryptfs_fuse_operations_total", op="read") - before
    assert got == data
    assert reads <= 12, f"{reads} read calls for 8 MiB read in order"
    env.umount(mnt)
