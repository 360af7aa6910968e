"""What programs see beyond POSIX calls: ACLs, fallocate modes, sparse files, df, directory sizes.

Every test does the same thing with real programs (setfacl, getfacl, rsync, cp, tar, du,
fallocate) in a plain local directory (the oracle: what Linux really does on the disk under
/tmp) and inside a live cryptfs mount, and compares; where cryptfs differs on purpose (no space
reserved in advance; the FUSE kernel module refuses COLLAPSE/INSERT_RANGE) the test asserts the
documented behaviour. Other users' access runs in forked children as uid 65534, as in
tests/test_60_posix.py.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import pickle
import random
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cryptfs.fs import acl
from cryptfs.vault.core import LOCAL_CHUNK_SIZE

NOBODY = 65534
CS = LOCAL_CHUNK_SIZE  # the chunk size of the local-store vault the suite mounts
GIB = 1 << 30


@pytest.fixture
def roots(cryptfs_dir: Path) -> Iterator[tuple[Path, Path]]:
    """(oracle, cryptfs): a fresh world-traversable directory on the local disk and one in the
    mount, with umask 022 (what a user's shell has)."""
    base = tempfile.mkdtemp(prefix="cryptfs-fidelity-", dir="/tmp")
    old = os.umask(0o022)
    try:
        os.chmod(base, 0o755)
        local = Path(base, "root")
        local.mkdir(mode=0o755)
        yield local, cryptfs_dir
    finally:
        os.umask(old)
        shutil.rmtree(base)


def run(*cmd: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def acls(root: Path) -> list[str]:
    """getfacl of everything below ``root``, paths relative to it, sorted by path (getfacl
    walks in directory order, which differs between filesystems)."""
    return sorted(run("getfacl", "-R", "-p", ".", cwd=root).stdout.strip().split("\n\n"))


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): os.lstat(p).st_mode for p in sorted(root.rglob("*"))}


def as_user(fn: Callable[[], object], uid: int = NOBODY) -> str:
    """Run fn() in a forked child as uid/gid ``uid`` without supplementary groups; "OK" or
    the errno name of the OSError it raised."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = "EXC"
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                fn()
                result = "OK"
            except OSError as e:
                result = errno.errorcode.get(e.errno or 0, str(e.errno))
            os.write(wfd, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result = pickle.loads(data) if data else "EXC"
    assert result != "EXC", "the child failed"
    return str(result)


# --------------------------------------------------------------------------------------------
# POSIX ACLs
# --------------------------------------------------------------------------------------------


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


BASE = ((acl.USER_OBJ, 6, 0), (acl.GROUP_OBJ, 4, 0), (acl.OTHER, 4, 0))


def test_acl_rules_without_a_mount():
    """cryptfs.fs.acl alone, on the kernel's rules: malformed ACLs are refused, the mode follows
    the ACL (mask for the group bits) and back, inheritance masks by the requested mode."""
    for bad in (b"", _acl(*BASE)[:-1], struct.pack("<I", 1) + _acl(*BASE)[4:],
                _acl(*BASE, (acl.USER, 7, 1234)), _acl(*BASE[:2]), _acl(*BASE, (0x40, 7, 0)),
                _acl(*BASE, (acl.MASK, 8, 0))):
        with pytest.raises(OSError) as e:
            acl.parse(bad)
        assert e.value.errno == errno.EINVAL
    assert acl.update_mode(_acl(*BASE), 0o100777) == (0o100644, None)
    named = _acl(*BASE, (acl.USER, 7, 1234), (acl.MASK, 5, 0))
    mode, stored = acl.update_mode(named, 0o104600)
    assert mode == 0o104654 and stored is not None
    assert acl.parse(acl.chmod(stored, 0o100700)) == [
        (acl.USER_OBJ, 7, acl.UNDEFINED_ID), (acl.USER, 7, 1234),
        (acl.GROUP_OBJ, 4, acl.UNDEFINED_ID), (acl.MASK, 0, acl.UNDEFINED_ID),
        (acl.OTHER, 0, acl.UNDEFINED_ID)]
    mode, access, default = acl.inherit(named, 0o40750, True)
    assert (mode, default) == (0o40650, named)  # owner rw- from the ACL, mask r-x, other ---
    assert (acl.MASK, 5, acl.UNDEFINED_ID) in acl.parse(access or b"")
    assert acl.inherit(_acl(*BASE), 0o100640, False) == (0o100640, None, None)


def test_acl_setfacl_getfacl_round_trip(roots):
    out = []
    for root in roots:
        f = root / "f"
        f.write_bytes(b"data")
        run("setfacl", "-m", "u:1234:rwx,g:4321:r,o::-", str(f))
        first = run("getfacl", "-p", "--omit-header", str(f)).stdout
        mode_acl = stat.S_IMODE(os.stat(f).st_mode)
        run("chmod", "640", str(f))  # the mask follows the group bits
        after_chmod = run("getfacl", "-p", "--omit-header", str(f)).stdout
        run("setfacl", "-x", "u:1234", str(f))
        removed = run("getfacl", "-p", "--omit-header", str(f)).stdout
        run("setfacl", "-b", str(f))
        cleared = run("getfacl", "-p", "--omit-header", str(f)).stdout
        out.append((first, mode_acl, after_chmod, removed, cleared,
                    stat.S_IMODE(os.stat(f).st_mode), sorted(os.listxattr(f))))
    assert "user:1234:rwx" in out[0][0] and "mask::rwx" in out[0][0]
    assert out[1] == out[0]


def test_acl_default_inherited_by_new_files_and_directories(roots):
    for root in roots:
        d = root / "shared"
        d.mkdir()
        run("setfacl", "-d", "-m", "u:1234:rwx,g::rwx,o::r", str(d))
        (d / "file").write_bytes(b"x")  # mode 0666 asked for: the ACL masks it, not the umask
        (d / "sub").mkdir()
        os.mkfifo(d / "fifo")
        (d / "sub" / "deeper").mkdir(mode=0o750)
        os.symlink("file", d / "link")
    local, crypt = roots
    assert "default:user:1234:rwx" in run("getfacl", str(crypt / "shared" / "sub")).stdout
    assert "user:1234:rwx" in run("getfacl", str(crypt / "shared" / "file")).stdout
    assert acls(crypt) == acls(local)
    assert modes(crypt) == modes(local)


def test_acl_no_default_acl_applies_the_umask(roots):
    for root in roots:
        (root / "f").write_bytes(b"x")
        (root / "d").mkdir(mode=0o777)
        os.mkfifo(root / "p", 0o666)
    assert modes(roots[1]) == modes(roots[0])
    assert stat.S_IMODE(os.stat(roots[1] / "d").st_mode) == 0o755


def test_acl_grants_and_denies_another_user(roots):
    results = []
    for root in roots:
        os.chmod(root, 0o755)
        secret = root / "secret"
        secret.write_bytes(b"for one user")
        os.chmod(secret, 0o600)
        run("setfacl", "-m", f"u:{NOBODY}:r", str(secret))  # grants what the mode does not
        public = root / "public"
        public.write_bytes(b"for all but one")
        os.chmod(public, 0o644)
        run("setfacl", "-m", f"u:{NOBODY}:-", str(public))  # denies what the mode grants
        drop = root / "drop"
        drop.mkdir(mode=0o755)
        run("setfacl", "-m", f"u:{NOBODY}:rwx", str(drop))
        masked = root / "masked"
        masked.write_bytes(b"x")
        run("setfacl", "-m", f"u:{NOBODY}:rw", str(masked))
        run("chmod", "600", str(masked))  # chmod lowers the mask: the named entry loses rw

        results.append((
            as_user(lambda s=secret: s.read_bytes()),
            as_user(lambda p=public: p.read_bytes()),
            as_user(lambda d=drop: (d / "new").write_bytes(b"by nobody")),
            as_user(lambda m=masked: m.read_bytes()),
            as_user(lambda s=secret: s.write_bytes(b"no")),
        ))
    assert results[0] == ("OK", "EACCES", "OK", "EACCES", "EACCES")
    assert results[1] == results[0]
    assert os.stat(roots[1] / "drop" / "new").st_uid == NOBODY


def test_acl_set_through_one_hard_link_holds_through_the_other(roots):
    results = []
    for root in roots:
        (root / "a").write_bytes(b"linked")
        os.chmod(root / "a", 0o644)
        os.link(root / "a", root / "b")
        os.stat(root / "b")  # the kernel caches the other name's attributes and ACL
        as_user(lambda r=root: (r / "b").read_bytes())
        run("setfacl", "-m", f"u:{NOBODY}:-", str(root / "a"))
        results.append((as_user(lambda r=root: (r / "b").read_bytes()),
                        stat.S_IMODE(os.stat(root / "b").st_mode),
                        run("getfacl", "-p", "--omit-header", str(root / "b")).stdout))
    assert results[0][0] == "EACCES"
    assert results[1] == results[0]


def _tree(src: Path) -> None:
    """A tree with everything rsync -aHAX carries: ACLs, default ACLs, xattrs, hard links,
    a sparse file, a symlink, odd modes."""
    rng = random.Random(62)
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "a").write_bytes(rng.randbytes(300_000))
    run("setfacl", "-m", "u:1234:rw,g:4321:r", str(src / "dir" / "a"))
    run("setfacl", "-d", "-m", "u:1234:rwx", str(src / "dir" / "sub"))
    (src / "dir" / "sub" / "inherits").write_bytes(b"inherits")
    os.link(src / "dir" / "a", src / "hard")
    (src / "x").write_bytes(b"xattrs")
    os.setxattr(src / "x", "user.note", b"kept")
    with open(src / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(40 << 20)
        f.write(b"middle")
    os.symlink("dir/a", src / "link")
    (src / "odd").write_bytes(b"")
    os.chmod(src / "odd", 0o4751)


def test_rsync_aHAX_twice_has_nothing_to_transfer(roots):
    local, crypt = roots
    src = local / "src"
    src.mkdir()
    _tree(src)
    first = run("rsync", "-aHAX", "--sparse", f"{src}/", f"{crypt}/dst/", check=False)
    assert first.returncode == 0, first.stderr
    second = run("rsync", "-aHAX", "--sparse", "--itemize-changes", f"{src}/", f"{crypt}/dst/")
    assert second.stdout == ""
    assert acls(crypt / "dst") == acls(src)
    assert modes(crypt / "dst") == modes(src)
    assert os.getxattr(crypt / "dst" / "x", "user.note") == b"kept"
    st = os.stat(crypt / "dst" / "sparse")
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 2 * CS + 8192


def test_cp_a_keeps_acls(roots):
    local, crypt = roots
    src = local / "src"
    src.mkdir()
    _tree(src)
    run("cp", "-a", str(src), str(crypt / "copy"))
    run("cp", "-a", str(crypt / "copy"), str(local / "back"))
    assert acls(crypt / "copy") == acls(src)
    assert acls(local / "back") == acls(src)


# --------------------------------------------------------------------------------------------
# fallocate modes
# --------------------------------------------------------------------------------------------

SIZE = 4 * CS + 12345
FALLOCATE_CASES = {
    # name: (fallocate arguments, what cryptfs does differently from the local disk)
    "extend": (["-o", str(SIZE - 100), "-l", str(CS)], None),
    "within": (["-o", "0", "-l", "1000"], None),
    "keep-size": (["-n", "-o", str(SIZE), "-l", str(4 * CS)], "no-reserve"),
    "punch-middle": (["-p", "-o", str(CS - 1000), "-l", str(2 * CS + 3000)], None),
    "punch-all": (["-p", "-o", "0", "-l", str(SIZE)], None),
    "punch-past-eof": (["-p", "-o", str(3 * CS + 5), "-l", str(10 * CS)], None),
    "punch-unaligned": (["-p", "-o", "777", "-l", "3333"], None),
    "zero-middle": (["-z", "-o", str(CS // 2), "-l", str(2 * CS)], None),
    "zero-extend": (["-z", "-o", str(SIZE - 10), "-l", str(CS)], None),
    "zero-keep-size": (["-z", "-n", "-o", str(SIZE - 10), "-l", str(CS)], None),
    "collapse": (["-c", "-o", str(CS), "-l", str(CS)], "refused"),
    "insert": (["-i", "-o", str(CS), "-l", str(CS)], "refused"),
}


@pytest.mark.parametrize("case", sorted(FALLOCATE_CASES))
def test_fallocate_modes(roots, case):
    args, difference = FALLOCATE_CASES[case]
    data = random.Random(case).randbytes(SIZE)
    seen = []
    for root in roots:
        f = root / "f"
        f.write_bytes(data)
        before = os.stat(f).st_blocks
        res = run("fallocate", *args, str(f), check=False)
        st = os.stat(f)
        seen.append((res.returncode, st.st_size, hashlib.sha256(f.read_bytes()).hexdigest(),
                     before, st.st_blocks, res.stderr))
    (lrc, lsize, lsum, lbefore, lafter, _), (crc, csize, csum, cbefore, cafter, cerr) = seen
    assert lrc == 0
    if difference == "refused":  # the FUSE kernel module answers EOPNOTSUPP for any FUSE fs
        assert crc != 0 and "not supported" in cerr
        assert (csize, csum, cafter) == (SIZE, hashlib.sha256(data).hexdigest(), cbefore)
        return
    assert crc == 0, cerr
    assert (csize, csum) == (lsize, lsum)
    if difference == "no-reserve":  # no space is reserved ahead of data
        assert lafter > lbefore and cafter == cbefore
        return
    freed_local = lbefore - lafter
    freed = cbefore - cafter
    if case.startswith("punch") or case == "zero-middle":
        # whole chunks in the range are holes now: nothing stored for them
        start, length = int(args[2]), int(args[4])
        whole = max(0, (min(start + length, SIZE) // CS) - (-(-start // CS)))
        assert freed >= whole * CS // 512
        if case.startswith("punch"):
            assert freed_local > 0 or length < 4096
    elif case in ("extend", "within"):  # no space reserved, none taken
        assert cafter == cbefore
    else:  # zeros written at the end of the data: the last chunk is rewritten, same size
        assert abs(freed) <= 8


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _check_seek(fd: int, content: bytes) -> None:
    """SEEK_DATA/SEEK_HOLE on ``fd`` agree with ``content``: every non-zero byte lies in data,
    and the walk ends at the size."""
    pos, size = 0, len(content)
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            assert e.errno == errno.ENXIO
            data = size
        assert content[pos:data].count(0) == data - pos, (pos, data)
        if data >= size:
            break
        pos = os.lseek(fd, data, os.SEEK_HOLE)
        assert data < pos <= size


def test_fsx_style_random_operations_with_fallocate_modes(roots):
    """A bounded fsx-like run (fsx skips these modes on FUSE): 600 seeded writes, truncates,
    punches, zero ranges, KEEP_SIZE allocations and reopenings on the same file in both
    directories; sizes and errors agree after every step, contents and holes every 20."""
    rng = random.Random(6262)
    paths = [root / "fsx" for root in roots]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in paths]
    limit = 5 * CS
    try:
        for step in range(600):
            op = rng.choice(["write", "write", "truncate", "punch", "zero", "zero-keep",
                             "keep", "reopen"])
            off = rng.randrange(limit)
            length = rng.choice([1, 17, 4096, CS - 3, CS, 2 * CS + 5, rng.randrange(1, limit)])
            outcome = []
            for i, fd in enumerate(fds):
                try:
                    if op == "write":
                        os.pwrite(fd, random.Random(step).randbytes(min(length, limit)), off)
                    elif op == "truncate":
                        os.ftruncate(fd, off)
                    elif op == "punch":
                        _fallocate(fd, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, off, length)
                    elif op == "zero":
                        _fallocate(fd, FALLOC_ZERO_RANGE, off, min(length, limit - off))
                    elif op == "zero-keep":
                        _fallocate(fd, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE, off, length)
                    elif op == "keep":
                        _fallocate(fd, FALLOC_KEEP_SIZE, off, length)
                    else:
                        os.close(fd)
                        fds[i] = os.open(paths[i], os.O_RDWR)
                    outcome.append("OK")
                except OSError as e:
                    outcome.append(errno.errorcode[e.errno or 0])
            sizes = [os.fstat(fd).st_size for fd in fds]
            assert outcome[1] == outcome[0] and sizes[1] == sizes[0], (step, op, off, length)
            if step % 20 == 19:
                contents = [os.pread(fd, sizes[0] + 1, 0) for fd in fds]
                assert contents[1] == contents[0], (step, op)
                _check_seek(fds[1], contents[0])
    finally:
        for fd in fds:
            os.close(fd)


def test_fallocate_punch_of_whole_file_stores_nothing(roots):
    f = roots[1] / "f"
    f.write_bytes(random.Random(1).randbytes(3 * CS))
    run("fallocate", "-p", "-o", "0", "-l", str(3 * CS), str(f))
    st = os.stat(f)
    assert (st.st_size, st.st_blocks) == (3 * CS, 0)
    assert f.read_bytes() == bytes(3 * CS)


# --------------------------------------------------------------------------------------------
# sparse files, SEEK_DATA / SEEK_HOLE
# --------------------------------------------------------------------------------------------


def _sparse_gib(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(GIB)
        f.write(b"a")
        f.seek(GIB - 1)
        f.write(b"z")


def test_sparse_gib_file_du_tar_and_seek(roots, tmp_path):
    out = {}
    for name, root in zip(("local", "cryptfs"), roots, strict=True):
        f = root / "sparse"
        _sparse_gib(f)
        du_k = int(run("du", "-k", str(f)).stdout.split()[0])
        tar = tmp_path / f"{name}.tar"
        run("tar", "-S", "-cf", str(tar), "sparse", cwd=root)
        fd = os.open(f, os.O_RDONLY)
        try:
            hole = os.lseek(fd, 0, os.SEEK_HOLE)
            data = os.lseek(fd, hole, os.SEEK_DATA)
            end_hole = os.lseek(fd, data, os.SEEK_HOLE)
            past = errno.errorcode[_errno(lambda fd=fd: os.lseek(fd, GIB, os.SEEK_DATA))]
            os.lseek(fd, 0, os.SEEK_SET)
            first = os.read(fd, 2)
            os.lseek(fd, GIB - 2, os.SEEK_SET)
            last = os.read(fd, 2)
        finally:
            os.close(fd)
        out[name] = (du_k, tar.stat().st_size, hole, data, end_hole, past, first, last,
                     os.stat(f).st_size)
    for name, (du_k, tar_size, hole, data, end_hole, past, first, last, size) in out.items():
        assert du_k < 1024, name
        assert tar_size < 1 << 20, name
        assert 0 < hole <= CS and GIB - CS <= data < GIB and end_hole == GIB, name
        assert (past, first, last, size) == ("ENXIO", b"a\0", b"\0z", GIB), name


def _errno(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno or 0
    return 0


def test_sparse_copies_keep_holes(roots):
    local, crypt = roots
    _sparse_gib(local / "src")
    run("cp", "--sparse=auto", str(local / "src"), str(crypt / "cp"))
    run("rsync", "--sparse", str(local / "src"), str(crypt / "rs"))
    run("cp", "--sparse=auto", str(crypt / "cp"), str(local / "back"))
    for f in (crypt / "cp", crypt / "rs", local / "back"):
        st = os.stat(f)
        assert st.st_size == GIB and st.st_blocks * 512 < 1 << 20, f


def test_dense_file_blocks_match_its_size(roots):
    data = random.Random(7).randbytes(3 * CS + 1000)
    blocks = []
    for root in roots:
        (root / "dense").write_bytes(data)
        blocks.append(os.stat(root / "dense").st_blocks)
    # cryptfs counts the padded stored size of the short last chunk (Padmé, at most +12 %)
    assert blocks[0] <= blocks[1] <= blocks[0] + 8 + 8


# --------------------------------------------------------------------------------------------
# df and directory sizes
# --------------------------------------------------------------------------------------------


def test_df_used_matches_the_backing_disk(posix_mount):
    store = posix_mount.parent / "store"
    mine, disk = os.statvfs(posix_mount), os.statvfs(store)
    used = (mine.f_blocks - mine.f_bfree) * mine.f_frsize
    disk_used = (disk.f_blocks - disk.f_bfree) * disk.f_frsize
    assert abs(used - disk_used) <= disk_used / 100
    assert abs(mine.f_bavail * mine.f_frsize - disk.f_bavail * disk.f_frsize) <= disk_used / 100
    df = run("df", "-k", "--output=used", str(posix_mount)).stdout.split()[-1]
    assert abs(int(df) * 1024 - disk_used) <= disk_used / 100


def test_directory_size_is_a_block_multiple(roots):
    for root in roots:
        (root / "d").mkdir()
    st = os.stat(roots[1] / "d")
    assert (st.st_size, st.st_blocks) == (4096, 8)
    if run("stat", "-f", "-c", "%T", str(roots[0])).stdout.strip() == "ext2/ext3":
        ext4 = os.stat(roots[0] / "d")
        assert (ext4.st_size, ext4.st_blocks) == (st.st_size, st.st_blocks)


@pytest.fixture
def store_kind() -> str:
    return "s3"


def test_df_on_s3_counts_the_vault_stored_bytes(mounted):
    _env, mnt = mounted
    before = os.statvfs(mnt)
    (mnt / "f").write_bytes(random.Random(3).randbytes(3 << 20))
    after = os.statvfs(mnt)
    grown = ((after.f_blocks - after.f_bfree) - (before.f_blocks - before.f_bfree)) * 4096
    assert 3 << 20 <= grown <= (3 << 20) * 1.15
    assert after.f_bfree == after.f_bavail == 1 << 40


def test_acls_and_holes_survive_a_restore_from_the_store(mounted):
    """ACLs are sealed with the rest of the metadata: after the local metadata is gone, the
    store alone brings back the ACLs, the modes they set and the holes."""
    env, mnt = mounted
    d = mnt / "shared"
    d.mkdir()
    run("setfacl", "-d", "-m", "u:1234:rwx", str(d))
    (d / "f").write_bytes(b"inherits")
    run("setfacl", "-m", f"u:{NOBODY}:r", str(d / "f"))
    _sparse_gib(mnt / "sparse")
    want = (acls(mnt), modes(mnt), os.stat(mnt / "sparse").st_blocks)
    assert "default:user:1234:rwx" in "".join(want[0]) and want[2] * 512 < 3 << 20
    env.umount(mnt)
    shutil.rmtree(env.root / "data" / "cryptfs" / "vaults")  # local metadata, ledger, staging
    shutil.rmtree(env.root / "cache", ignore_errors=True)
    env.mount(mnt)
    assert (acls(mnt), modes(mnt), os.stat(mnt / "sparse").st_blocks) == want
    fd = os.open(mnt / "sparse", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) < 1 << 20
    finally:
        os.close(fd)
