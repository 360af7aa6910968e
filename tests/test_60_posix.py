"""POSIX conformance suite in the spirit of pjdfstest.

Every test runs twice through the ``fsroot`` fixture: once on a plain local directory (proof that
the expectation is what Linux really does) and once inside a live cryptfs mount.  Any test that
passes on ``localdir`` and fails on ``cryptfs`` is a conformance bug in cryptfs.

Tests are grouped by system call; every test function is named ``test_<group>_...`` so that
``posix_report.py`` can count passes and failures per group.  Operations by an unprivileged user run
in a forked child (see ``as_user``) that drops to uid/gid 65534 and reports the errno back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import shutil
import stat
import tempfile
import time
import unicodedata
from pathlib import Path

import pytest

NOBODY = 65534  # the unprivileged user the tests switch to
OTHER = 65533  # a second unprivileged uid, "someone else"
FOREIGN_GID = 4242  # a group NOBODY is not a member of

NAME255 = "n" * 255
NAME256 = "n" * 256
TICK = 0.011  # sleep between an operation and the one whose timestamps it must change
NOW_SLACK_NS = 50_000_000  # kernel timestamps use a coarse clock; allow for it

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

KINDS = ["file", "dir", "symlink", "dangling", "fifo"]


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def zero_umask():
    """Modes given to mkdir/open/mkfifo must be kept exactly: take the umask out of the way."""
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.fixture(params=["localdir", "cryptfs"])
def fsroot(request):
    """A fresh, empty, world-traversable directory on the filesystem under test."""
    request.node.user_properties.append(("fsroot", request.param))
    if request.param == "cryptfs":
        yield Path(request.getfixturevalue("cryptfs_dir"))
        return
    # pytest's own tmp_path lives below /tmp/pytest-of-root (mode 0700), which uid 65534 cannot
    # traverse; use a fresh directory directly in /tmp with 0755 instead.
    base = tempfile.mkdtemp(prefix="cryptfs-posix-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        root = Path(base, "root")
        root.mkdir(mode=0o755)
        yield root
    finally:
        shutil.rmtree(base)


def errname(fn, *args, **kwargs) -> str:
    """Call fn; return "OK" or the symbolic errno name of the OSError it raised."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "OK"


def as_user(fn, *args, uid: int = NOBODY, gid: int = NOBODY, groups=()) -> str:
    """Run fn(*args) in a forked child as uid/gid (no supplementary groups).

    Returns "OK" or the errno name of the OSError the child got, sent back through a pipe.
    Any other exception in the child fails the calling test.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        result = ("EXC", "child did not report")
        try:
            os.close(rfd)
            try:
                os.setgroups(list(groups))
                os.setgid(gid)
                os.setuid(uid)
            except BaseException as exc:
                result = ("EXC", f"could not switch credentials: {exc!r}")
            else:
                try:
                    fn(*args)
                    result = ("OK", "")
                except OSError as exc:
                    result = (errno.errorcode.get(exc.errno, str(exc.errno)), str(exc)[:300])
                except BaseException as exc:
                    result = ("EXC", repr(exc)[:300])
            os.write(wfd, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    code, message = pickle.loads(data)
    assert code != "EXC", f"child as uid {uid} failed: {message}"
    return code


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def mkfile(path, data: bytes = b"", mode: int = 0o644, uid=None, gid=None):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        os.chmod(path, mode)  # chown clears set-id bits
    return path


def mkdir(path, mode: int = 0o755, uid=None, gid=None) -> Path:
    os.mkdir(path, mode)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(path, mode)  # mkdir(2) ignores S_ISGID in mode
    return Path(path)


def userdir(root: Path, name: str = "u", mode: int = 0o755, uid: int = NOBODY) -> Path:
    """A directory owned by an unprivileged user."""
    return mkdir(root / name, mode, uid, uid)


def make_kind(path: Path, kind: str) -> Path:
    if kind == "file":
        mkfile(path, b"data")
    elif kind == "dir":
        os.mkdir(path)
    elif kind == "symlink":
        target = path.with_name(path.name + ".target")
        mkfile(target)
        os.symlink(target.name, path)
    elif kind == "dangling":
        os.symlink("does-not-exist", path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


def make_loop(root: Path) -> Path:
    """Two symlinks pointing at each other; resolving either gives ELOOP."""
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    return root / "loop_a"


def mode_of(path, follow: bool = True) -> int:
    return stat.S_IMODE(os.stat(path, follow_symlinks=follow).st_mode)


def times(path, follow: bool = True) -> tuple[int, int, int]:
    st = os.stat(path, follow_symlinks=follow)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def tick() -> None:
    time.sleep(TICK)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def nsubdirs(path) -> int:
    return sum(1 for e in os.scandir(path) if e.is_dir(follow_symlinks=False))


def assert_dir_nlink(path) -> None:
    assert os.lstat(path).st_nlink == 2 + nsubdirs(path)


def assert_now(ns: int, before: int, after: int) -> None:
    assert before - NOW_SLACK_NS <= ns <= after + NOW_SLACK_NS


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]


_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def linkat(src, dst, follow: bool) -> None:
    """linkat(2); os.link() calls plain link(2), which never follows, whatever it is told."""
    flags = AT_SYMLINK_FOLLOW if follow else 0
    if _libc.linkat(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


def utimensat(path, atime: tuple[int, int], mtime: tuple[int, int], follow: bool = True) -> None:
    """utimensat(2) with raw timespecs, so UTIME_NOW/UTIME_OMIT can be passed."""
    spec = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    flags = 0 if follow else AT_SYMLINK_NOFOLLOW
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), spec, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


# --------------------------------------------------------------------------------------------
# chmod
# --------------------------------------------------------------------------------------------

FILE_MODES = [0o000, 0o400, 0o644, 0o755, 0o777, 0o1644, 0o2755, 0o4755, 0o6777, 0o7777]
DIR_CHMODS = [0o000, 0o700, 0o755, 0o1777, 0o2755, 0o7777]


@pytest.mark.parametrize("mode", FILE_MODES, ids=oct)
def test_chmod_file_mode_kept(fsroot, mode):
    f = mkfile(fsroot / "f")
    os.chmod(f, mode)
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


@pytest.mark.parametrize("mode", DIR_CHMODS, ids=oct)
def test_chmod_dir_mode_kept(fsroot, mode):
    d = mkdir(fsroot / "d")
    os.chmod(d, mode)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


def test_chmod_fifo_mode_kept(fsroot):
    p = fsroot / "fifo"
    os.mkfifo(p, 0o600)
    os.chmod(p, 0o640)
    assert stat.S_ISFIFO(os.stat(p).st_mode)
    assert mode_of(p) == 0o640


def test_chmod_updates_ctime_not_mtime(fsroot):
    f = mkfile(fsroot / "f", b"x")
    before = times(f)
    tick()
    os.chmod(f, 0o600)
    after = times(f)
    assert after[2] > before[2]
    assert after[1] == before[1]


def test_chmod_dir_updates_ctime(fsroot):
    d = mkdir(fsroot / "d")
    before = times(d)
    tick()
    os.chmod(d, 0o700)
    after = times(d)
    assert after[2] > before[2]
    assert after[1] == before[1]


def test_chmod_follows_symlink(fsroot):
    f = mkfile(fsroot / "f", mode=0o644)
    os.symlink("f", fsroot / "l")
    os.chmod(fsroot / "l", 0o600)
    assert mode_of(f) == 0o600
    assert stat.S_ISLNK(os.lstat(fsroot / "l").st_mode)


def test_chmod_enoent(fsroot):
    assert errname(os.chmod, fsroot / "missing", 0o644) == "ENOENT"
    assert errname(os.chmod, fsroot / "missing" / "f", 0o644) == "ENOENT"


def test_chmod_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.chmod, fsroot / "f" / "x", 0o644) == "ENOTDIR"


def test_chmod_enametoolong(fsroot):
    assert errname(os.chmod, fsroot / NAME256, 0o644) == "ENAMETOOLONG"


def test_chmod_name_255(fsroot):
    f = mkfile(fsroot / NAME255)
    os.chmod(f, 0o611)
    assert mode_of(f) == 0o611


def test_chmod_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.chmod, loop, 0o644) == "ELOOP"
    assert errname(os.chmod, loop / "x", 0o644) == "ELOOP"


def test_chmod_eperm_not_owner(fsroot):
    f = mkfile(fsroot / "f", mode=0o666)  # writable by everyone, but owned by root
    assert as_user(os.chmod, f, 0o600) == "EPERM"
    assert mode_of(f) == 0o666


def test_chmod_owner_non_root(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", mode=0o644, uid=NOBODY, gid=NOBODY)
    assert as_user(os.chmod, f, 0o4700) == "OK"
    assert mode_of(f) == 0o4700


def test_chmod_non_member_drops_setgid(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", uid=NOBODY, gid=FOREIGN_GID)
    assert as_user(os.chmod, f, 0o2755) == "OK"
    assert mode_of(f) == 0o755


def test_chmod_eacces_search(fsroot):
    locked = mkdir(fsroot / "locked", 0o700)
    f = mkfile(locked / "f", uid=NOBODY, gid=NOBODY)
    assert as_user(os.chmod, f, 0o600) == "EACCES"
    assert mode_of(f) == 0o644


# --------------------------------------------------------------------------------------------
# chown
# --------------------------------------------------------------------------------------------


def test_chown_root_sets_uid_gid(fsroot):
    f = mkfile(fsroot / "f")
    os.chown(f, NOBODY, FOREIGN_GID)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (NOBODY, FOREIGN_GID)


def test_chown_uid_only(fsroot):
    f = mkfile(fsroot / "f")
    os.chown(f, FOREIGN_GID, -1)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (FOREIGN_GID, 0)


def test_chown_gid_only(fsroot):
    f = mkfile(fsroot / "f")
    os.chown(f, -1, FOREIGN_GID)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (0, FOREIGN_GID)


def test_chown_dir(fsroot):
    d = mkdir(fsroot / "d", 0o2755)
    os.chown(d, NOBODY, NOBODY)
    st = os.stat(d)
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(st.st_mode) == 0o2755  # set-gid stays on directories


def test_chown_updates_ctime_not_mtime(fsroot):
    f = mkfile(fsroot / "f", b"x")
    before = times(f)
    tick()
    os.chown(f, NOBODY, NOBODY)
    after = times(f)
    assert after[2] > before[2]
    assert after[1] == before[1]


def test_chown_same_owner_updates_ctime(fsroot):
    f = mkfile(fsroot / "f")
    before = times(f)
    tick()
    os.chown(f, 0, 0)
    assert times(f)[2] > before[2]


def test_chown_root_clears_setuid_setgid(fsroot):
    f = mkfile(fsroot / "f", mode=0o6755)
    os.chown(f, NOBODY, NOBODY)
    assert mode_of(f) == 0o755


def test_chown_non_root_clears_setuid_setgid(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", mode=0o6755, uid=NOBODY, gid=NOBODY)
    assert mode_of(f) == 0o6755
    assert as_user(os.chown, f, NOBODY, NOBODY) == "OK"
    assert mode_of(f) == 0o755


def test_chown_non_root_give_away_eperm(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", uid=NOBODY, gid=NOBODY)
    assert as_user(os.chown, f, OTHER, -1) == "EPERM"
    assert os.stat(f).st_uid == NOBODY


def test_chown_non_root_to_own_group(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", uid=NOBODY, gid=0)
    assert as_user(os.chown, f, -1, NOBODY) == "OK"
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


def test_chown_non_root_to_foreign_group_eperm(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", uid=NOBODY, gid=NOBODY)
    assert as_user(os.chown, f, -1, FOREIGN_GID) == "EPERM"
    assert os.stat(f).st_gid == NOBODY


def test_chown_non_owner_eperm(fsroot):
    f = mkfile(fsroot / "f", mode=0o666)
    assert as_user(os.chown, f, NOBODY, NOBODY) == "EPERM"
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_chown_follows_symlink(fsroot):
    f = mkfile(fsroot / "f")
    os.symlink("f", fsroot / "l")
    os.chown(fsroot / "l", NOBODY, NOBODY)
    assert os.stat(f).st_uid == NOBODY
    assert os.lstat(fsroot / "l").st_uid == 0


def test_chown_lchown_symlink_itself(fsroot):
    f = mkfile(fsroot / "f")
    os.symlink("f", fsroot / "l")
    os.lchown(fsroot / "l", NOBODY, FOREIGN_GID)
    lst = os.lstat(fsroot / "l")
    assert (lst.st_uid, lst.st_gid) == (NOBODY, FOREIGN_GID)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (0, 0)


def test_chown_enoent(fsroot):
    assert errname(os.chown, fsroot / "missing", NOBODY, NOBODY) == "ENOENT"
    assert errname(os.lchown, fsroot / "missing", NOBODY, NOBODY) == "ENOENT"


def test_chown_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.chown, fsroot / "f" / "x", NOBODY, NOBODY) == "ENOTDIR"


def test_chown_enametoolong(fsroot):
    assert errname(os.chown, fsroot / NAME256, NOBODY, NOBODY) == "ENAMETOOLONG"


def test_chown_name_255(fsroot):
    f = mkfile(fsroot / NAME255)
    os.chown(f, NOBODY, NOBODY)
    assert os.stat(f).st_uid == NOBODY


def test_chown_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.chown, loop, NOBODY, NOBODY) == "ELOOP"
    assert errname(os.lchown, loop / "x", NOBODY, NOBODY) == "ELOOP"


def test_chown_eacces_search(fsroot):
    locked = mkdir(fsroot / "locked", 0o700)
    f = mkfile(locked / "f", uid=NOBODY, gid=NOBODY)
    assert as_user(os.chown, f, NOBODY, NOBODY) == "EACCES"


# --------------------------------------------------------------------------------------------
# link
# --------------------------------------------------------------------------------------------


def test_link_basic(fsroot):
    f = mkfile(fsroot / "f", b"hello")
    os.link(f, fsroot / "g")
    sf, sg = os.stat(f), os.stat(fsroot / "g")
    assert sf.st_ino == sg.st_ino
    assert sf.st_nlink == sg.st_nlink == 2
    assert read(fsroot / "g") == b"hello"


def test_link_write_visible_through_other_name(fsroot):
    f = mkfile(fsroot / "f", b"hello")
    os.link(f, fsroot / "g")
    with open(fsroot / "g", "ab") as out:
        out.write(b" world")
    assert read(f) == b"hello world"
    assert os.stat(f).st_size == 11


def test_link_into_other_dir(fsroot):
    f = mkfile(fsroot / "f", b"abc")
    d = mkdir(fsroot / "d")
    os.link(f, d / "g")
    assert os.stat(d / "g").st_ino == os.stat(f).st_ino
    assert read(d / "g") == b"abc"


def test_link_many_nlink(fsroot):
    f = mkfile(fsroot / "f", b"x")
    for i in range(10):
        os.link(f, fsroot / f"l{i}")
    assert os.stat(f).st_nlink == 11
    for i in range(10):
        os.unlink(fsroot / f"l{i}")
        assert os.stat(f).st_nlink == 10 - i
    assert read(f) == b"x"


def test_link_unlink_original_keeps_data(fsroot):
    f = mkfile(fsroot / "f", b"payload")
    ino = os.stat(f).st_ino
    os.link(f, fsroot / "g")
    os.unlink(f)
    st = os.stat(fsroot / "g")
    assert (st.st_ino, st.st_nlink) == (ino, 1)
    assert read(fsroot / "g") == b"payload"


def test_link_updates_ctime_not_mtime(fsroot):
    f = mkfile(fsroot / "f", b"x")
    before = times(f)
    tick()
    os.link(f, fsroot / "g")
    after = times(f)
    assert after[2] > before[2]
    assert after[1] == before[1]


def test_link_updates_parent_times(fsroot):
    f = mkfile(fsroot / "f")
    d = mkdir(fsroot / "d")
    before = times(d)
    tick()
    os.link(f, d / "g")
    after = times(d)
    assert after[1] > before[1]
    assert after[2] > before[2]


@pytest.mark.parametrize("kind", KINDS)
def test_link_eexist(fsroot, kind):
    f = mkfile(fsroot / "f")
    make_kind(fsroot / "t", kind)
    assert errname(os.link, f, fsroot / "t") == "EEXIST"
    assert os.stat(f).st_nlink == 1


def test_link_enoent(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.link, fsroot / "missing", fsroot / "g") == "ENOENT"
    assert errname(os.link, fsroot / "f", fsroot / "nodir" / "g") == "ENOENT"


def test_link_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.link, fsroot / "f" / "x", fsroot / "g") == "ENOTDIR"
    assert errname(os.link, fsroot / "f", fsroot / "f" / "g") == "ENOTDIR"


def test_link_directory_eperm(fsroot):
    d = mkdir(fsroot / "d")
    assert errname(os.link, d, fsroot / "e") == "EPERM"
    assert not os.path.lexists(fsroot / "e")


def test_link_enametoolong(fsroot):
    f = mkfile(fsroot / "f")
    assert errname(os.link, f, fsroot / NAME256) == "ENAMETOOLONG"
    assert errname(os.link, fsroot / NAME256, fsroot / "g") == "ENAMETOOLONG"


def test_link_name_255(fsroot):
    f = mkfile(fsroot / "f", b"x")
    os.link(f, fsroot / NAME255)
    assert os.stat(fsroot / NAME255).st_ino == os.stat(f).st_ino
    assert NAME255 in os.listdir(fsroot)


def test_link_eloop(fsroot):
    loop = make_loop(fsroot)
    mkfile(fsroot / "f")
    assert errname(linkat, loop, fsroot / "g", follow=True) == "ELOOP"
    assert errname(os.link, fsroot / "f", loop / "g") == "ELOOP"


def test_link_follow_symlink(fsroot):
    f = mkfile(fsroot / "f")
    os.symlink("f", fsroot / "l")
    linkat(fsroot / "l", fsroot / "g", follow=True)
    assert os.lstat(fsroot / "g").st_ino == os.stat(f).st_ino
    assert stat.S_ISREG(os.lstat(fsroot / "g").st_mode)


def test_link_symlink_itself(fsroot):
    mkfile(fsroot / "f")
    os.symlink("f", fsroot / "l")
    linkat(fsroot / "l", fsroot / "g", follow=False)
    lg = os.lstat(fsroot / "g")
    assert stat.S_ISLNK(lg.st_mode)
    assert lg.st_ino == os.lstat(fsroot / "l").st_ino
    assert lg.st_nlink == 2
    assert os.readlink(fsroot / "g") == "f"


def test_link_fifo(fsroot):
    os.mkfifo(fsroot / "p", 0o600)
    os.link(fsroot / "p", fsroot / "q")
    st = os.lstat(fsroot / "q")
    assert stat.S_ISFIFO(st.st_mode)
    assert st.st_nlink == 2
    assert st.st_ino == os.lstat(fsroot / "p").st_ino


def test_link_readdir_ino_matches_stat(fsroot):
    mkfile(fsroot / "f")
    os.link(fsroot / "f", fsroot / "g")
    os.mkdir(fsroot / "d")
    os.symlink("f", fsroot / "l")
    os.mkfifo(fsroot / "p")
    entries = {e.name: e.inode() for e in os.scandir(fsroot)}
    assert set(entries) == {"f", "g", "d", "l", "p"}
    for name, ino in entries.items():
        assert ino == os.lstat(fsroot / name).st_ino, name
    assert entries["f"] == entries["g"]


def test_link_non_root_own_file(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", uid=NOBODY, gid=NOBODY)
    assert as_user(os.link, f, u / "g") == "OK"
    assert os.stat(f).st_nlink == 2


def test_link_eacces_non_root(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", uid=NOBODY, gid=NOBODY)
    ro = mkdir(fsroot / "ro", 0o755)
    assert as_user(os.link, f, ro / "g") == "EACCES"
    assert os.stat(f).st_nlink == 1


def test_link_protected_hardlinks(fsroot):
    """With fs.protected_hardlinks=1 a user may not link a file it neither owns nor can write."""
    with open("/proc/sys/fs/protected_hardlinks") as f:
        protected = f.read().strip() == "1"
    u = userdir(fsroot)
    src = mkfile(fsroot / "rootfile", mode=0o644)
    assert as_user(os.link, src, u / "g") == ("EPERM" if protected else "OK")


# --------------------------------------------------------------------------------------------
# mkdir
# --------------------------------------------------------------------------------------------

DIR_MODES = [0o000, 0o500, 0o700, 0o711, 0o755, 0o777, 0o1777]


@pytest.mark.parametrize("mode", DIR_MODES, ids=oct)
def test_mkdir_mode_kept(fsroot, mode):
    os.mkdir(fsroot / "d", mode)
    st = os.stat(fsroot / "d")
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


def test_mkdir_mode_setgid_ignored_without_setgid_parent(fsroot):
    """Linux: mkdir ignores S_ISGID in mode; it is only inherited from a set-gid parent."""
    os.mkdir(fsroot / "d", 0o2755)
    assert mode_of(fsroot / "d") == 0o755


def test_mkdir_owner_root(fsroot):
    os.mkdir(fsroot / "d")
    st = os.stat(fsroot / "d")
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_mkdir_owner_non_root(fsroot):
    u = userdir(fsroot)
    assert as_user(os.mkdir, u / "d", 0o750) == "OK"
    st = os.stat(u / "d")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(st.st_mode) == 0o750


def test_mkdir_setgid_parent_inherits_group(fsroot):
    parent = mkdir(fsroot / "sg", 0o2777, uid=0, gid=FOREIGN_GID)
    assert as_user(os.mkdir, parent / "d", 0o755) == "OK"
    st = os.stat(parent / "d")
    assert (st.st_uid, st.st_gid) == (NOBODY, FOREIGN_GID)
    assert stat.S_IMODE(st.st_mode) == 0o2755


def test_mkdir_nlink(fsroot):
    d = mkdir(fsroot / "d")
    assert os.stat(d).st_nlink == 2
    for i in range(3):
        os.mkdir(d / f"s{i}")
        assert os.stat(d).st_nlink == 3 + i
    mkfile(d / "file")
    os.symlink("s0", d / "link")
    assert os.stat(d).st_nlink == 5
    assert_dir_nlink(d)
    assert os.stat(d / "s0").st_nlink == 2


def test_mkdir_dotdot_is_parent(fsroot):
    d = mkdir(fsroot / "d")
    os.mkdir(d / "e")
    assert os.listdir(d / "e") == []
    assert os.stat(os.path.join(d, "e", "..")).st_ino == os.stat(d).st_ino
    assert os.stat(os.path.join(d, "e", ".")).st_ino == os.stat(d / "e").st_ino


def test_mkdir_updates_parent_times(fsroot):
    before = times(fsroot)
    tick()
    os.mkdir(fsroot / "d")
    after = times(fsroot)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_mkdir_new_dir_times_are_now(fsroot):
    t0 = time.time_ns()
    os.mkdir(fsroot / "d")
    t1 = time.time_ns()
    for ns in times(fsroot / "d"):
        assert_now(ns, t0, t1)


@pytest.mark.parametrize("kind", KINDS)
def test_mkdir_eexist(fsroot, kind):
    make_kind(fsroot / "t", kind)
    assert errname(os.mkdir, fsroot / "t") == "EEXIST"


def test_mkdir_enoent(fsroot):
    assert errname(os.mkdir, fsroot / "missing" / "d") == "ENOENT"


def test_mkdir_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.mkdir, fsroot / "f" / "d") == "ENOTDIR"


def test_mkdir_enametoolong(fsroot):
    assert errname(os.mkdir, fsroot / NAME256) == "ENAMETOOLONG"
    assert os.listdir(fsroot) == []


def test_mkdir_name_255(fsroot):
    os.mkdir(fsroot / NAME255)
    assert os.listdir(fsroot) == [NAME255]
    mkfile(fsroot / NAME255 / NAME255, b"deep")
    assert read(fsroot / NAME255 / NAME255) == b"deep"


def test_mkdir_multibyte_name_length_in_bytes(fsroot):
    ok, too_long = "\u20ac" * 85, "\u20ac" * 86  # 255 and 258 bytes of UTF-8
    os.mkdir(fsroot / ok)
    assert os.listdir(fsroot) == [ok]
    assert errname(os.mkdir, fsroot / too_long) == "ENAMETOOLONG"


def test_mkdir_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.mkdir, loop / "d") == "ELOOP"


def test_mkdir_eacces_non_root(fsroot):
    ro = mkdir(fsroot / "ro", 0o755)
    assert as_user(os.mkdir, ro / "d") == "EACCES"
    assert os.listdir(ro) == []


def test_mkdir_eacces_search(fsroot):
    u = userdir(fsroot, mode=0o677)  # owner may write, but not search
    assert as_user(os.mkdir, u / "d") == "EACCES"


# --------------------------------------------------------------------------------------------
# mkfifo (and mknod)
# --------------------------------------------------------------------------------------------

FIFO_MODES = [0o000, 0o600, 0o644, 0o666, 0o777]


@pytest.mark.parametrize("mode", FIFO_MODES, ids=oct)
def test_mkfifo_mode_kept(fsroot, mode):
    os.mkfifo(fsroot / "p", mode)
    st = os.lstat(fsroot / "p")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


def test_mkfifo_attributes(fsroot):
    os.mkfifo(fsroot / "p", 0o640)
    st = os.lstat(fsroot / "p")
    assert (st.st_nlink, st.st_size, st.st_uid, st.st_gid) == (1, 0, 0, 0)


def test_mkfifo_owner_non_root(fsroot):
    u = userdir(fsroot)
    assert as_user(os.mkfifo, u / "p", 0o620) == "OK"
    st = os.lstat(u / "p")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(st.st_mode) == 0o620


def test_mkfifo_updates_parent_times(fsroot):
    before = times(fsroot)
    tick()
    os.mkfifo(fsroot / "p")
    after = times(fsroot)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_mkfifo_data_flows(fsroot):
    os.mkfifo(fsroot / "p", 0o600)
    rfd = os.open(fsroot / "p", os.O_RDONLY | os.O_NONBLOCK)
    try:
        wfd = os.open(fsroot / "p", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(wfd, b"through the pipe")
        finally:
            os.close(wfd)
        assert os.read(rfd, 100) == b"through the pipe"
    finally:
        os.close(rfd)
    assert os.stat(fsroot / "p").st_size == 0


@pytest.mark.parametrize("kind", KINDS)
def test_mkfifo_eexist(fsroot, kind):
    make_kind(fsroot / "t", kind)
    assert errname(os.mkfifo, fsroot / "t") == "EEXIST"


def test_mkfifo_enoent(fsroot):
    assert errname(os.mkfifo, fsroot / "missing" / "p") == "ENOENT"


def test_mkfifo_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.mkfifo, fsroot / "f" / "p") == "ENOTDIR"


def test_mkfifo_enametoolong(fsroot):
    assert errname(os.mkfifo, fsroot / NAME256) == "ENAMETOOLONG"


def test_mkfifo_name_255(fsroot):
    os.mkfifo(fsroot / NAME255)
    assert stat.S_ISFIFO(os.lstat(fsroot / NAME255).st_mode)


def test_mkfifo_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.mkfifo, loop / "p") == "ELOOP"


def test_mkfifo_eacces_non_root(fsroot):
    ro = mkdir(fsroot / "ro", 0o755)
    assert as_user(os.mkfifo, ro / "p") == "EACCES"


def test_mkfifo_mknod_fifo(fsroot):
    os.mknod(fsroot / "p", stat.S_IFIFO | 0o640)
    st = os.lstat(fsroot / "p")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640


def test_mkfifo_mknod_regular_file(fsroot):
    os.mknod(fsroot / "f", stat.S_IFREG | 0o604)
    st = os.lstat(fsroot / "f")
    assert stat.S_ISREG(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o604, 0)
    assert read(fsroot / "f") == b""


def test_mkfifo_mknod_socket(fsroot):
    os.mknod(fsroot / "s", stat.S_IFSOCK | 0o600)
    st = os.lstat(fsroot / "s")
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_mkfifo_mknod_chardev_as_root(fsroot):
    dev = os.makedev(1, 3)
    os.mknod(fsroot / "c", stat.S_IFCHR | 0o600, dev)
    st = os.lstat(fsroot / "c")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == dev


def test_mkfifo_mknod_chardev_eperm_non_root(fsroot):
    u = userdir(fsroot)
    assert as_user(os.mknod, u / "c", stat.S_IFCHR | 0o600, os.makedev(1, 3)) == "EPERM"
    assert not os.path.lexists(u / "c")


# --------------------------------------------------------------------------------------------
# open
# --------------------------------------------------------------------------------------------

CREATE_MODES = [0o000, 0o400, 0o600, 0o644, 0o755, 0o777, 0o1755, 0o2755, 0o4755, 0o6777]
WR_CREATE = os.O_WRONLY | os.O_CREAT


def create(path, mode=0o644, flags=WR_CREATE):
    os.close(os.open(path, flags, mode))


@pytest.mark.parametrize("mode", CREATE_MODES, ids=oct)
def test_open_create_mode_kept(fsroot, mode):
    create(fsroot / "f", mode)
    st = os.stat(fsroot / "f")
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


def test_open_create_owner_root(fsroot):
    create(fsroot / "f")
    st = os.stat(fsroot / "f")
    assert (st.st_uid, st.st_gid, st.st_size, st.st_nlink) == (0, 0, 0, 1)


def test_open_create_owner_non_root(fsroot):
    u = userdir(fsroot)
    assert as_user(create, u / "f", 0o640) == "OK"
    st = os.stat(u / "f")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(st.st_mode) == 0o640


def test_open_create_setgid_parent_inherits_group(fsroot):
    parent = mkdir(fsroot / "sg", 0o2777, uid=0, gid=FOREIGN_GID)
    assert as_user(create, parent / "f", 0o2755) == "OK"
    st = os.stat(parent / "f")
    assert (st.st_uid, st.st_gid) == (NOBODY, FOREIGN_GID)
    # NOBODY is not in FOREIGN_GID, so the set-gid bit it asked for must not be kept
    assert stat.S_IMODE(st.st_mode) == 0o755


def test_open_create_updates_parent_times(fsroot):
    before = times(fsroot)
    tick()
    create(fsroot / "f")
    after = times(fsroot)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_open_create_new_file_times_are_now(fsroot):
    t0 = time.time_ns()
    create(fsroot / "f")
    t1 = time.time_ns()
    for ns in times(fsroot / "f"):
        assert_now(ns, t0, t1)


def test_open_create_existing_keeps_mode_and_data(fsroot):
    f = mkfile(fsroot / "f", b"keep", mode=0o600)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o777)
    os.close(fd)
    assert mode_of(f) == 0o600
    assert read(f) == b"keep"


@pytest.mark.parametrize("kind", KINDS)
def test_open_excl_eexist(fsroot, kind):
    make_kind(fsroot / "t", kind)
    assert errname(create, fsroot / "t", 0o644, WR_CREATE | os.O_EXCL) == "EEXIST"
    assert not os.path.lexists(fsroot / "does-not-exist")  # O_EXCL never follows a symlink


def test_open_create_through_dangling_symlink(fsroot):
    os.symlink("target", fsroot / "l")
    create(fsroot / "l", 0o640)
    assert stat.S_ISLNK(os.lstat(fsroot / "l").st_mode)
    assert stat.S_ISREG(os.lstat(fsroot / "target").st_mode)
    assert mode_of(fsroot / "target") == 0o640


def test_open_enoent(fsroot):
    assert errname(os.open, fsroot / "missing", os.O_RDONLY) == "ENOENT"
    assert errname(create, fsroot / "missing" / "f") == "ENOENT"


def test_open_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.open, fsroot / "f" / "x", os.O_RDONLY) == "ENOTDIR"
    assert errname(create, fsroot / "f" / "x") == "ENOTDIR"
    assert errname(os.open, fsroot / "f", os.O_RDONLY | os.O_DIRECTORY) == "ENOTDIR"


@pytest.mark.parametrize(
    "flags",
    [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_CREAT, os.O_RDONLY | os.O_CREAT],
    ids=["wronly", "rdwr", "wronly_creat", "rdonly_creat"],
)
def test_open_eisdir(fsroot, flags):
    d = mkdir(fsroot / "d")
    assert errname(os.open, d, flags, 0o644) == "EISDIR"


def test_open_directory_rdonly(fsroot):
    d = mkdir(fsroot / "d")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def test_open_enametoolong(fsroot):
    assert errname(os.open, fsroot / NAME256, os.O_RDONLY) == "ENAMETOOLONG"
    assert errname(create, fsroot / NAME256) == "ENAMETOOLONG"
    assert os.listdir(fsroot) == []


def test_open_name_255(fsroot):
    mkfile(fsroot / NAME255, b"long name")
    assert os.listdir(fsroot) == [NAME255]
    assert read(fsroot / NAME255) == b"long name"


def test_open_multibyte_name_length_in_bytes(fsroot):
    ok, too_long = "\u00e9" * 127 + "x", "\u00e9" * 128  # 255 and 256 bytes of UTF-8
    mkfile(fsroot / ok, b"x")
    assert os.listdir(fsroot) == [ok]
    assert errname(create, fsroot / too_long) == "ENAMETOOLONG"


def test_open_statvfs_namemax_is_honest(fsroot):
    namemax = os.statvfs(fsroot).f_namemax
    assert namemax >= 255
    mkfile(fsroot / ("m" * namemax))
    assert errname(create, fsroot / ("m" * (namemax + 1))) == "ENAMETOOLONG"


def test_open_non_utf8_name(fsroot):
    name = b"\xff\xfe-latin1-\xe9"
    path = os.path.join(os.fsencode(fsroot), name)
    mkfile(path, b"bytes")
    assert os.listdir(os.fsencode(fsroot)) == [name]
    assert read(path) == b"bytes"


def test_open_nfc_nfd_names_distinct(fsroot):
    nfc = unicodedata.normalize("NFC", "caf\u00e9")
    nfd = unicodedata.normalize("NFD", "caf\u00e9")
    mkfile(fsroot / nfc, b"nfc")
    mkfile(fsroot / nfd, b"nfd")
    assert sorted(os.listdir(fsroot)) == sorted([nfc, nfd])
    assert (read(fsroot / nfc), read(fsroot / nfd)) == (b"nfc", b"nfd")


def test_open_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.open, loop, os.O_RDONLY) == "ELOOP"
    assert errname(create, loop / "f") == "ELOOP"


def test_open_nofollow_on_symlink_eloop(fsroot):
    mkfile(fsroot / "f")
    os.symlink("f", fsroot / "l")
    assert errname(os.open, fsroot / "l", os.O_RDONLY | os.O_NOFOLLOW) == "ELOOP"


def test_open_eacces_read(fsroot):
    f = mkfile(fsroot / "f", b"secret", mode=0o600)
    assert as_user(os.open, f, os.O_RDONLY) == "EACCES"


def test_open_eacces_write(fsroot):
    f = mkfile(fsroot / "f", b"data", mode=0o644)
    assert as_user(os.open, f, os.O_WRONLY) == "EACCES"
    assert as_user(os.open, f, os.O_RDONLY) == "OK"


def test_open_eacces_own_file_mode_000(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", mode=0o000, uid=NOBODY, gid=NOBODY)
    assert as_user(os.open, f, os.O_RDONLY) == "EACCES"


def test_open_eacces_group_bits(fsroot):
    """Group permission bits apply to group members even when "other" bits would allow more."""
    f = mkfile(fsroot / "f", mode=0o604, uid=0, gid=NOBODY)
    assert as_user(os.open, f, os.O_RDONLY) == "EACCES"
    assert as_user(os.open, f, os.O_RDONLY, gid=OTHER) == "OK"


def test_open_eacces_create_in_readonly_dir(fsroot):
    ro = mkdir(fsroot / "ro", 0o755)
    assert as_user(create, ro / "f") == "EACCES"
    assert os.listdir(ro) == []


def test_open_eacces_search(fsroot):
    locked = mkdir(fsroot / "locked", 0o766)  # others may read/write, but not search
    mkfile(locked / "f", mode=0o666)
    assert as_user(os.open, locked / "f", os.O_RDONLY) == "EACCES"


def test_open_create_mode_000_fd_still_writable(fsroot):
    """The fd returned by open(O_CREAT|O_RDWR, 0) is usable even though the mode forbids it."""
    u = userdir(fsroot)

    def work(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o000)
        try:
            write_all(fd, b"written through a mode-000 file")
            os.fsync(fd)
            if os.pread(fd, 100, 0) != b"written through a mode-000 file":
                raise AssertionError("read back mismatch")
        finally:
            os.close(fd)

    assert as_user(work, u / "f") == "OK"
    assert read(u / "f") == b"written through a mode-000 file"
    assert mode_of(u / "f") == 0o000


def test_open_trunc(fsroot):
    f = mkfile(fsroot / "f", b"x" * 10000)
    before = times(f)
    tick()
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    after = times(f)
    assert os.stat(f).st_size == 0
    assert read(f) == b""
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_open_trunc_with_rdonly(fsroot):
    """O_TRUNC with O_RDONLY truncates on Linux (behaviour is unspecified by POSIX)."""
    f = mkfile(fsroot / "f", b"abc")
    os.close(os.open(f, os.O_RDONLY | os.O_TRUNC))
    assert os.stat(f).st_size == 0


def test_open_write_updates_mtime_ctime(fsroot):
    f = mkfile(fsroot / "f", b"x")
    before = times(f)
    tick()
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, b"y", 0)
    finally:
        os.close(fd)
    after = times(f)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_open_read_keeps_mtime_ctime(fsroot):
    f = mkfile(fsroot / "f", b"content")
    before = times(f)
    tick()
    assert read(f) == b"content"
    after = times(f)
    assert after[1:] == before[1:]


def test_open_append(fsroot):
    f = mkfile(fsroot / "f", b"one")
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"two")
    finally:
        os.close(fd)
    assert read(f) == b"onetwo"


def test_open_sparse_hole_reads_zeros(fsroot):
    f = fsroot / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"tail", 1_048_576 + 13)
    finally:
        os.close(fd)
    data = read(f)
    assert len(data) == 1_048_576 + 17
    assert data[:-4] == bytes(1_048_576 + 13)
    assert data[-4:] == b"tail"


def test_open_overwrite_across_block_boundaries(fsroot):
    base = bytes(range(256)) * 64  # 16 KiB
    f = mkfile(fsroot / "f", base)
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, b"X" * 10, 4090)
        os.pwrite(fd, b"Y" * 3, 8191)
    finally:
        os.close(fd)
    expected = bytearray(base)
    expected[4090:4100] = b"X" * 10
    expected[8191:8194] = b"Y" * 3
    assert read(f) == bytes(expected)


def test_open_write_clears_setuid_non_root(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", b"x", mode=0o4755, uid=NOBODY, gid=NOBODY)
    assert mode_of(f) == 0o4755

    def append(path):
        with open(path, "ab") as out:
            out.write(b"more")

    assert as_user(append, f) == "OK"
    assert mode_of(f) == 0o755
    assert read(f) == b"xmore"


# --------------------------------------------------------------------------------------------
# rename
# --------------------------------------------------------------------------------------------


def test_rename_file(fsroot):
    f = mkfile(fsroot / "a", b"content")
    ino = os.stat(f).st_ino
    os.rename(f, fsroot / "b")
    assert not os.path.lexists(fsroot / "a")
    st = os.stat(fsroot / "b")
    assert (st.st_ino, st.st_nlink) == (ino, 1)
    assert read(fsroot / "b") == b"content"
    assert os.listdir(fsroot) == ["b"]


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo"])
def test_rename_keeps_inode_number_across_dirs(fsroot, kind):
    make_kind(fsroot / "a", kind)
    ino = os.lstat(fsroot / "a").st_ino
    d = mkdir(fsroot / "d")
    os.rename(fsroot / "a", d / "b")
    assert os.lstat(d / "b").st_ino == ino
    assert not os.path.lexists(fsroot / "a")


def test_rename_dir_with_contents(fsroot):
    a = mkdir(fsroot / "a")
    mkdir(a / "sub")
    mkfile(a / "sub" / "f", b"deep")
    dest = mkdir(fsroot / "dest")
    os.rename(a, dest / "moved")
    assert read(dest / "moved" / "sub" / "f") == b"deep"
    assert os.stat(os.path.join(dest, "moved", "..")).st_ino == os.stat(dest).st_ino
    assert not os.path.lexists(a)


def test_rename_over_file(fsroot):
    a = mkfile(fsroot / "a", b"new")
    b = mkfile(fsroot / "b", b"old")
    ino_a = os.stat(a).st_ino
    os.rename(a, b)
    assert os.stat(b).st_ino == ino_a
    assert read(b) == b"new"
    assert os.listdir(fsroot) == ["b"]


def test_rename_over_file_drops_target_nlink(fsroot):
    a = mkfile(fsroot / "a", b"new")
    b = mkfile(fsroot / "b", b"old")
    os.link(b, fsroot / "b2")
    before = times(fsroot / "b2")
    tick()
    os.rename(a, b)
    st = os.stat(fsroot / "b2")
    assert st.st_nlink == 1
    assert st.st_ctime_ns > before[2]
    assert read(fsroot / "b2") == b"old"


def test_rename_over_open_file_keeps_old_data(fsroot):
    a = mkfile(fsroot / "a", b"new" * 2000)
    b = mkfile(fsroot / "b", b"old" * 2000)
    fd = os.open(b, os.O_RDONLY)
    try:
        os.rename(a, b)
        assert os.pread(fd, 6000, 0) == b"old" * 2000
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert read(b) == b"new" * 2000
    assert os.listdir(fsroot) == ["b"]


def test_rename_open_file_still_usable(fsroot):
    a = mkfile(fsroot / "a", b"begin")
    fd = os.open(a, os.O_RDWR)
    try:
        os.rename(a, fsroot / "b")
        os.pwrite(fd, b"-end", 5)
        assert os.pread(fd, 100, 0) == b"begin-end"
    finally:
        os.close(fd)
    assert read(fsroot / "b") == b"begin-end"


def test_rename_over_empty_dir(fsroot):
    a = mkdir(fsroot / "a")
    mkfile(a / "f")
    b = mkdir(fsroot / "b")
    ino = os.stat(a).st_ino
    nlink = os.stat(fsroot).st_nlink
    os.rename(a, b)
    assert os.stat(b).st_ino == ino
    assert os.listdir(b) == ["f"]
    assert os.stat(fsroot).st_nlink == nlink - 1
    assert_dir_nlink(fsroot)


def test_rename_dir_between_parents_nlink(fsroot):
    p1, p2 = mkdir(fsroot / "p1"), mkdir(fsroot / "p2")
    mkdir(p1 / "d")
    assert (os.stat(p1).st_nlink, os.stat(p2).st_nlink) == (3, 2)
    os.rename(p1 / "d", p2 / "d")
    assert (os.stat(p1).st_nlink, os.stat(p2).st_nlink) == (2, 3)
    assert os.stat(os.path.join(p2, "d", "..")).st_ino == os.stat(p2).st_ino
    assert_dir_nlink(p1)
    assert_dir_nlink(p2)


@pytest.mark.parametrize("content", ["file", "dir"])
def test_rename_dir_over_nonempty_dir_enotempty(fsroot, content):
    a = mkdir(fsroot / "a")
    b = mkdir(fsroot / "b")
    make_kind(b / "x", content)
    assert errname(os.rename, a, b) == "ENOTEMPTY"
    assert os.path.isdir(a)
    assert os.listdir(b) == ["x"]


def test_rename_file_over_dir_eisdir(fsroot):
    mkfile(fsroot / "f")
    mkdir(fsroot / "d")
    assert errname(os.rename, fsroot / "f", fsroot / "d") == "EISDIR"


def test_rename_dir_over_file_enotdir(fsroot):
    mkfile(fsroot / "f")
    mkdir(fsroot / "d")
    assert errname(os.rename, fsroot / "d", fsroot / "f") == "ENOTDIR"
    assert os.path.isfile(fsroot / "f")


@pytest.mark.parametrize("depth", [1, 2])
def test_rename_into_own_subdir_einval(fsroot, depth):
    d = mkdir(fsroot / "d")
    mkdir(d / "sub")
    target = d / "new" if depth == 1 else d / "sub" / "new"
    assert errname(os.rename, d, target) == "EINVAL"
    assert os.path.isdir(d / "sub")


def test_rename_dir_over_own_ancestor_enotempty(fsroot):
    d = mkdir(fsroot / "d")
    mkdir(d / "sub")
    assert errname(os.rename, d / "sub", d) == "ENOTEMPTY"


def test_rename_to_itself_is_noop(fsroot):
    f = mkfile(fsroot / "f", b"same")
    os.rename(f, f)
    assert read(f) == b"same"
    d = mkdir(fsroot / "d")
    os.rename(d, d)
    assert os.path.isdir(d)


def test_rename_between_hard_links_is_noop(fsroot):
    f = mkfile(fsroot / "a", b"x")
    os.link(f, fsroot / "b")
    os.rename(fsroot / "a", fsroot / "b")
    assert sorted(os.listdir(fsroot)) == ["a", "b"]
    assert os.stat(fsroot / "a").st_nlink == 2


def test_rename_dot_and_dotdot(fsroot):
    d = mkdir(fsroot / "d")
    assert errname(os.rename, os.path.join(d, "."), fsroot / "x") in ("EBUSY", "EINVAL")
    assert errname(os.rename, os.path.join(d, ".."), fsroot / "x") in ("EBUSY", "EINVAL")
    assert os.path.isdir(d)


def test_rename_enoent(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.rename, fsroot / "missing", fsroot / "x") == "ENOENT"
    assert errname(os.rename, fsroot / "f", fsroot / "nodir" / "x") == "ENOENT"
    assert os.path.exists(fsroot / "f")


def test_rename_enotdir(fsroot):
    mkfile(fsroot / "f")
    mkfile(fsroot / "g")
    assert errname(os.rename, fsroot / "f" / "x", fsroot / "y") == "ENOTDIR"
    assert errname(os.rename, fsroot / "g", fsroot / "f" / "y") == "ENOTDIR"


def test_rename_enametoolong(fsroot):
    f = mkfile(fsroot / "f")
    assert errname(os.rename, f, fsroot / NAME256) == "ENAMETOOLONG"
    assert errname(os.rename, fsroot / NAME256, fsroot / "g") == "ENAMETOOLONG"
    assert os.listdir(fsroot) == ["f"]


def test_rename_name_255(fsroot):
    f = mkfile(fsroot / "f", b"x")
    d = mkdir(fsroot / "d")
    os.rename(f, fsroot / NAME255)
    os.rename(d, fsroot / ("d" * 255))
    assert sorted(os.listdir(fsroot)) == sorted([NAME255, "d" * 255])
    os.rename(fsroot / NAME255, fsroot / ("d" * 255) / NAME255)
    assert read(fsroot / ("d" * 255) / NAME255) == b"x"


def test_rename_eloop(fsroot):
    loop = make_loop(fsroot)
    mkfile(fsroot / "f")
    assert errname(os.rename, loop / "x", fsroot / "y") == "ELOOP"
    assert errname(os.rename, fsroot / "f", loop / "y") == "ELOOP"


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_rename_updates_ctime_not_mtime(fsroot, kind):
    a = make_kind(fsroot / "a", kind)
    before = times(a)
    tick()
    os.rename(a, fsroot / "b")
    after = times(fsroot / "b")
    assert after[2] > before[2]
    assert after[1] == before[1]


def test_rename_updates_both_parent_times(fsroot):
    p1, p2 = mkdir(fsroot / "p1"), mkdir(fsroot / "p2")
    mkfile(p1 / "f")
    b1, b2 = times(p1), times(p2)
    tick()
    os.rename(p1 / "f", p2 / "f")
    a1, a2 = times(p1), times(p2)
    assert a1[1] > b1[1] and a1[2] > b1[2]
    assert a2[1] > b2[1] and a2[2] > b2[2]


def test_rename_same_dir_updates_parent_times(fsroot):
    d = mkdir(fsroot / "d")
    mkfile(d / "a")
    before = times(d)
    tick()
    os.rename(d / "a", d / "b")
    after = times(d)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_rename_symlink_itself(fsroot):
    mkfile(fsroot / "target", b"t")
    os.symlink("target", fsroot / "l")
    d = mkdir(fsroot / "d")
    os.rename(fsroot / "l", fsroot / "m")
    assert os.readlink(fsroot / "m") == "target"
    assert read(fsroot / "m") == b"t"
    os.rename(fsroot / "m", d / "m")
    assert os.readlink(d / "m") == "target"  # now dangling: relative to d
    assert not os.path.exists(d / "m")
    assert read(fsroot / "target") == b"t"


def test_rename_over_symlink_replaces_link(fsroot):
    mkfile(fsroot / "target", b"keep")
    os.symlink("target", fsroot / "l")
    mkfile(fsroot / "f", b"new")
    os.rename(fsroot / "f", fsroot / "l")
    assert stat.S_ISREG(os.lstat(fsroot / "l").st_mode)
    assert read(fsroot / "l") == b"new"
    assert read(fsroot / "target") == b"keep"


def test_rename_fifo(fsroot):
    os.mkfifo(fsroot / "p", 0o604)
    os.rename(fsroot / "p", fsroot / "q")
    st = os.lstat(fsroot / "q")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o604


def test_rename_swap_three_way(fsroot):
    mkfile(fsroot / "a", b"A")
    mkfile(fsroot / "b", b"B")
    os.rename(fsroot / "a", fsroot / "tmp")
    os.rename(fsroot / "b", fsroot / "a")
    os.rename(fsroot / "tmp", fsroot / "b")
    assert (read(fsroot / "a"), read(fsroot / "b")) == (b"B", b"A")
    assert sorted(os.listdir(fsroot)) == ["a", "b"]


def test_rename_non_root_own_dir(fsroot):
    u = userdir(fsroot)
    mkfile(u / "f", uid=NOBODY, gid=NOBODY)
    assert as_user(os.rename, u / "f", u / "g") == "OK"
    assert os.listdir(u) == ["g"]


def test_rename_eacces_non_root_dest_dir(fsroot):
    u = userdir(fsroot)
    mkfile(u / "f", uid=NOBODY, gid=NOBODY)
    ro = mkdir(fsroot / "ro", 0o755)
    assert as_user(os.rename, u / "f", ro / "f") == "EACCES"
    assert os.listdir(u) == ["f"]


def test_rename_eacces_non_root_source_dir(fsroot):
    ro = mkdir(fsroot / "ro", 0o755)
    mkfile(ro / "f", uid=NOBODY, gid=NOBODY)
    u = userdir(fsroot)
    assert as_user(os.rename, ro / "f", u / "f") == "EACCES"
    assert os.listdir(ro) == ["f"]


def test_rename_sticky_dir_eperm(fsroot):
    sticky = mkdir(fsroot / "sticky", 0o1777)
    mkfile(sticky / "rootfile", mode=0o666)
    assert as_user(os.rename, sticky / "rootfile", sticky / "mine") == "EPERM"
    mkfile(sticky / "own", uid=NOBODY, gid=NOBODY)
    assert as_user(os.rename, sticky / "own", sticky / "mine") == "OK"
    assert sorted(os.listdir(sticky)) == ["mine", "rootfile"]


def test_rename_dir_to_other_parent_needs_write_on_dir(fsroot):
    """Moving a directory rewrites its "..", which needs write permission on the directory."""
    p1, p2 = userdir(fsroot, "p1"), userdir(fsroot, "p2")
    mkdir(p1 / "rootdir", 0o755)
    assert as_user(os.rename, p1 / "rootdir", p2 / "rootdir") == "EACCES"
    assert as_user(os.rename, p1 / "rootdir", p1 / "renamed") == "OK"
    assert os.listdir(p1) == ["renamed"]


# --------------------------------------------------------------------------------------------
# rmdir
# --------------------------------------------------------------------------------------------


def test_rmdir_basic(fsroot):
    d = mkdir(fsroot / "d")
    nlink = os.stat(fsroot).st_nlink
    os.rmdir(d)
    assert not os.path.lexists(d)
    assert os.stat(fsroot).st_nlink == nlink - 1
    assert os.listdir(fsroot) == []


def test_rmdir_updates_parent_times(fsroot):
    mkdir(fsroot / "d")
    before = times(fsroot)
    tick()
    os.rmdir(fsroot / "d")
    after = times(fsroot)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_rmdir_mode_000(fsroot):
    d = mkdir(fsroot / "d", 0o000)
    os.rmdir(d)
    assert not os.path.lexists(d)


def test_rmdir_then_recreate_is_empty(fsroot):
    d = mkdir(fsroot / "d")
    mkfile(d / "f")
    os.unlink(d / "f")
    os.rmdir(d)
    os.mkdir(d)
    assert os.listdir(d) == []
    assert os.stat(d).st_nlink == 2


@pytest.mark.parametrize("kind", KINDS)
def test_rmdir_enotempty(fsroot, kind):
    d = mkdir(fsroot / "d")
    make_kind(d / "x", kind)
    assert errname(os.rmdir, d) == "ENOTEMPTY"
    assert os.path.isdir(d)


def test_rmdir_enoent(fsroot):
    assert errname(os.rmdir, fsroot / "missing") == "ENOENT"
    assert errname(os.rmdir, fsroot / "missing" / "d") == "ENOENT"


def test_rmdir_enotdir(fsroot):
    mkfile(fsroot / "f")
    mkdir(fsroot / "d")
    os.symlink("d", fsroot / "l")
    assert errname(os.rmdir, fsroot / "f") == "ENOTDIR"
    assert errname(os.rmdir, fsroot / "l") == "ENOTDIR"
    assert errname(os.rmdir, fsroot / "f" / "x") == "ENOTDIR"
    assert os.path.isdir(fsroot / "d")


def test_rmdir_enametoolong(fsroot):
    assert errname(os.rmdir, fsroot / NAME256) == "ENAMETOOLONG"


def test_rmdir_name_255(fsroot):
    os.mkdir(fsroot / NAME255)
    os.rmdir(fsroot / NAME255)
    assert os.listdir(fsroot) == []


def test_rmdir_dot_einval(fsroot):
    d = mkdir(fsroot / "d")
    assert errname(os.rmdir, os.path.join(d, ".")) == "EINVAL"
    assert os.path.isdir(d)


def test_rmdir_dotdot_enotempty(fsroot):
    d = mkdir(fsroot / "d")
    mkdir(d / "e")
    assert errname(os.rmdir, os.path.join(d, "e", "..")) == "ENOTEMPTY"


def test_rmdir_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.rmdir, loop / "d") == "ELOOP"


def test_rmdir_non_root_own(fsroot):
    u = userdir(fsroot)
    mkdir(u / "d", uid=NOBODY, gid=NOBODY)
    assert as_user(os.rmdir, u / "d") == "OK"
    assert os.listdir(u) == []


def test_rmdir_eacces_non_root(fsroot):
    ro = mkdir(fsroot / "ro", 0o755)
    mkdir(ro / "d", uid=NOBODY, gid=NOBODY)
    assert as_user(os.rmdir, ro / "d") == "EACCES"
    assert os.path.isdir(ro / "d")


def test_rmdir_sticky_eperm(fsroot):
    sticky = mkdir(fsroot / "sticky", 0o1777)
    mkdir(sticky / "rootdir", 0o777)
    mkdir(sticky / "own", uid=NOBODY, gid=NOBODY)
    assert as_user(os.rmdir, sticky / "rootdir") == "EPERM"
    assert as_user(os.rmdir, sticky / "own") == "OK"
    assert os.listdir(sticky) == ["rootdir"]


# --------------------------------------------------------------------------------------------
# symlink
# --------------------------------------------------------------------------------------------


def test_symlink_basic(fsroot):
    mkfile(fsroot / "f", b"via link")
    os.symlink("f", fsroot / "l")
    assert os.readlink(fsroot / "l") == "f"
    assert read(fsroot / "l") == b"via link"
    assert os.stat(fsroot / "l").st_ino == os.stat(fsroot / "f").st_ino


def test_symlink_lstat(fsroot):
    target = "some/relative/../target"
    os.symlink(target, fsroot / "l")
    st = os.lstat(fsroot / "l")
    assert stat.S_ISLNK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o777
    assert st.st_size == len(target)
    assert st.st_nlink == 1


def test_symlink_owner_non_root(fsroot):
    u = userdir(fsroot)
    assert as_user(os.symlink, "anything", u / "l") == "OK"
    st = os.lstat(u / "l")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


def test_symlink_dangling(fsroot):
    os.symlink("nowhere", fsroot / "l")
    assert errname(os.stat, fsroot / "l") == "ENOENT"
    assert stat.S_ISLNK(os.lstat(fsroot / "l").st_mode)
    assert os.listdir(fsroot) == ["l"]


def test_symlink_absolute_target(fsroot):
    f = mkfile(fsroot / "f", b"abs")
    os.symlink(str(f), fsroot / "l")
    assert os.readlink(fsroot / "l") == str(f)
    assert read(fsroot / "l") == b"abs"


def test_symlink_relative_resolution_chain(fsroot):
    d = mkdir(fsroot / "d")
    mkfile(d / "f", b"chained")
    os.symlink("d", fsroot / "dl")  # symlink to a directory
    os.symlink("dl/f", fsroot / "l1")
    os.symlink("l1", fsroot / "l2")
    os.symlink("../l2", d / "up")
    assert read(fsroot / "dl" / "f") == b"chained"
    assert read(fsroot / "l2") == b"chained"
    assert read(d / "up") == b"chained"
    assert sorted(os.listdir(fsroot / "dl")) == ["f", "up"]


def test_symlink_target_4095_bytes(fsroot):
    target = (("t" * 254 + "/") * 17)[:4095]
    assert len(target) == 4095
    os.symlink(target, fsroot / "l")
    assert os.readlink(fsroot / "l") == target
    assert os.lstat(fsroot / "l").st_size == 4095


def test_symlink_target_4096_bytes_enametoolong(fsroot):
    assert errname(os.symlink, "t/" * 2048, fsroot / "l") == "ENAMETOOLONG"


def test_symlink_empty_target_enoent(fsroot):
    assert errname(os.symlink, "", fsroot / "l") == "ENOENT"


def test_symlink_non_utf8_target(fsroot):
    target = b"\xff\xfe/odd\nname\x01"
    link = os.path.join(os.fsencode(fsroot), b"l")
    os.symlink(target, link)
    assert os.readlink(link) == target


@pytest.mark.parametrize("kind", KINDS)
def test_symlink_eexist(fsroot, kind):
    make_kind(fsroot / "t", kind)
    assert errname(os.symlink, "x", fsroot / "t") == "EEXIST"


def test_symlink_enoent(fsroot):
    assert errname(os.symlink, "x", fsroot / "missing" / "l") == "ENOENT"


def test_symlink_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.symlink, "x", fsroot / "f" / "l") == "ENOTDIR"


def test_symlink_enametoolong(fsroot):
    assert errname(os.symlink, "x", fsroot / NAME256) == "ENAMETOOLONG"


def test_symlink_name_255(fsroot):
    os.symlink(NAME255, fsroot / NAME255)  # points at itself
    assert os.readlink(fsroot / NAME255) == NAME255
    assert errname(os.stat, fsroot / NAME255) == "ELOOP"


def test_symlink_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.stat, loop) == "ELOOP"
    assert errname(os.symlink, "x", loop / "l") == "ELOOP"
    assert os.readlink(loop) == "loop_b"


def test_symlink_updates_parent_times(fsroot):
    before = times(fsroot)
    tick()
    os.symlink("x", fsroot / "l")
    after = times(fsroot)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_symlink_eacces_non_root(fsroot):
    ro = mkdir(fsroot / "ro", 0o755)
    assert as_user(os.symlink, "x", ro / "l") == "EACCES"
    assert os.listdir(ro) == []


# --------------------------------------------------------------------------------------------
# truncate
# --------------------------------------------------------------------------------------------

BLOCKY_SIZES = [0, 1, 4095, 4096, 4097, 10000]


@pytest.mark.parametrize("size", BLOCKY_SIZES)
def test_truncate_shrink(fsroot, size):
    data = os.urandom(12288)
    f = mkfile(fsroot / "f", data)
    os.truncate(f, size)
    assert os.stat(f).st_size == size
    assert read(f) == data[:size]


def test_truncate_grow_zero_fills(fsroot):
    f = mkfile(fsroot / "f", b"abc")
    os.truncate(f, 10000)
    assert os.stat(f).st_size == 10000
    assert read(f) == b"abc" + bytes(9997)


@pytest.mark.parametrize("cut", [3, 4095, 4100])
def test_truncate_shrink_then_grow_no_stale_data(fsroot, cut):
    data = b"\xaa" * 12000
    f = mkfile(fsroot / "f", data)
    os.truncate(f, cut)
    os.truncate(f, 12000)
    assert read(f) == data[:cut] + bytes(12000 - cut)


def test_truncate_updates_mtime_ctime(fsroot):
    f = mkfile(fsroot / "f", b"x" * 100)
    before = times(f)
    tick()
    os.truncate(f, 50)
    after = times(f)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_truncate_huge_is_sparse_or_efbig(fsroot):
    f = mkfile(fsroot / "f", b"start")
    size = 1 << 40
    t0 = time.monotonic()
    result = errname(os.truncate, f, size)
    elapsed = time.monotonic() - t0
    assert result in ("OK", "EFBIG")
    assert elapsed < 10
    if result == "OK":
        assert os.stat(f).st_size == size
        with open(f, "rb") as fh:
            fh.seek(size - 4096)
            assert fh.read() == bytes(4096)
        os.truncate(f, 5)
    assert read(f) == b"start"


def test_truncate_follows_symlink(fsroot):
    f = mkfile(fsroot / "f", b"abcdef")
    os.symlink("f", fsroot / "l")
    os.truncate(fsroot / "l", 2)
    assert read(f) == b"ab"


def test_truncate_enoent(fsroot):
    assert errname(os.truncate, fsroot / "missing", 0) == "ENOENT"


def test_truncate_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.truncate, fsroot / "f" / "x", 0) == "ENOTDIR"


def test_truncate_eisdir(fsroot):
    d = mkdir(fsroot / "d")
    assert errname(os.truncate, d, 0) == "EISDIR"


def test_truncate_fifo_einval(fsroot):
    os.mkfifo(fsroot / "p", 0o666)
    assert errname(os.truncate, fsroot / "p", 0) == "EINVAL"


def test_truncate_negative_einval(fsroot):
    f = mkfile(fsroot / "f", b"abc")
    assert errname(os.truncate, f, -1) == "EINVAL"
    assert read(f) == b"abc"


def test_truncate_enametoolong(fsroot):
    assert errname(os.truncate, fsroot / NAME256, 0) == "ENAMETOOLONG"


def test_truncate_name_255(fsroot):
    f = mkfile(fsroot / NAME255, b"12345")
    os.truncate(f, 1)
    assert read(f) == b"1"


def test_truncate_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.truncate, loop, 0) == "ELOOP"


def test_truncate_eacces_non_owner(fsroot):
    f = mkfile(fsroot / "f", b"abc", mode=0o644)
    assert as_user(os.truncate, f, 0) == "EACCES"
    assert read(f) == b"abc"


def test_truncate_eacces_own_readonly_file(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", b"abc", mode=0o444, uid=NOBODY, gid=NOBODY)
    assert as_user(os.truncate, f, 0) == "EACCES"
    assert read(f) == b"abc"


def test_truncate_non_root_writable(fsroot):
    f = mkfile(fsroot / "f", b"abcdef", mode=0o666)
    assert as_user(os.truncate, f, 3) == "OK"
    assert read(f) == b"abc"


def test_truncate_clears_setuid_non_root(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", b"abc", mode=0o4755, uid=NOBODY, gid=NOBODY)
    assert as_user(os.truncate, f, 1) == "OK"
    assert mode_of(f) == 0o755


# --------------------------------------------------------------------------------------------
# ftruncate
# --------------------------------------------------------------------------------------------


def ftruncate_path(path, size, flags=os.O_RDWR):
    fd = os.open(path, flags)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", BLOCKY_SIZES)
def test_ftruncate_shrink(fsroot, size):
    data = os.urandom(12288)
    f = mkfile(fsroot / "f", data)
    ftruncate_path(f, size)
    assert os.stat(f).st_size == size
    assert read(f) == data[:size]


def test_ftruncate_grow_and_write(fsroot):
    f = mkfile(fsroot / "f", b"abc")
    fd = os.open(f, os.O_RDWR)
    try:
        os.ftruncate(fd, 8192)
        assert os.fstat(fd).st_size == 8192
        os.pwrite(fd, b"end", 8189)
        assert os.pread(fd, 8192, 0) == b"abc" + bytes(8186) + b"end"
    finally:
        os.close(fd)
    assert os.stat(f).st_size == 8192


@pytest.mark.parametrize("cut", [3, 4095, 4100])
def test_ftruncate_shrink_then_grow_no_stale_data(fsroot, cut):
    data = b"\x55" * 12000
    f = mkfile(fsroot / "f", data)
    fd = os.open(f, os.O_RDWR)
    try:
        os.ftruncate(fd, cut)
        os.ftruncate(fd, 12000)
        assert os.pread(fd, 12000, 0) == data[:cut] + bytes(12000 - cut)
    finally:
        os.close(fd)
    assert read(f) == data[:cut] + bytes(12000 - cut)


def test_ftruncate_updates_mtime_ctime(fsroot):
    f = mkfile(fsroot / "f", b"x" * 100)
    before = times(f)
    tick()
    ftruncate_path(f, 10)
    after = times(f)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_ftruncate_rdonly_fd_einval(fsroot):
    f = mkfile(fsroot / "f", b"abc")
    assert errname(ftruncate_path, f, 0, os.O_RDONLY) == "EINVAL"
    assert read(f) == b"abc"


def test_ftruncate_negative_einval(fsroot):
    f = mkfile(fsroot / "f", b"abc")
    assert errname(ftruncate_path, f, -1) == "EINVAL"
    assert read(f) == b"abc"


def test_ftruncate_directory_fd_einval(fsroot):
    d = mkdir(fsroot / "d")
    assert errname(ftruncate_path, d, 0, os.O_RDONLY) == "EINVAL"


def test_ftruncate_closed_fd_ebadf(fsroot):
    f = mkfile(fsroot / "f")
    fd = os.open(f, os.O_RDWR)
    os.close(fd)
    assert errname(os.ftruncate, fd, 0) == "EBADF"


def test_ftruncate_on_fd_of_readonly_mode_file(fsroot):
    """A file created 0444 through open(O_CREAT|O_RDWR) can be ftruncated through that fd."""
    u = userdir(fsroot)

    def work(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            write_all(fd, b"0123456789")
            os.ftruncate(fd, 4)
        finally:
            os.close(fd)

    assert as_user(work, u / "f") == "OK"
    assert read(u / "f") == b"0123"
    assert mode_of(u / "f") == 0o444
    assert as_user(ftruncate_path, u / "f", 0) == "EACCES"  # reopening for write is refused


def test_ftruncate_non_owner_with_write_fd(fsroot):
    f = mkfile(fsroot / "f", b"abcdef", mode=0o666)
    assert as_user(ftruncate_path, f, 2) == "OK"
    assert read(f) == b"ab"


def test_ftruncate_huge_is_sparse_or_efbig(fsroot):
    f = mkfile(fsroot / "f", b"start")
    t0 = time.monotonic()
    result = errname(ftruncate_path, f, 1 << 40)
    assert time.monotonic() - t0 < 10
    assert result in ("OK", "EFBIG")
    if result == "OK":
        assert os.stat(f).st_size == 1 << 40
        ftruncate_path(f, 5)
    assert read(f) == b"start"


# --------------------------------------------------------------------------------------------
# unlink
# --------------------------------------------------------------------------------------------


def test_unlink_file(fsroot):
    f = mkfile(fsroot / "f", b"x")
    os.unlink(f)
    assert not os.path.lexists(f)
    assert os.listdir(fsroot) == []


def test_unlink_updates_parent_times(fsroot):
    mkfile(fsroot / "f")
    before = times(fsroot)
    tick()
    os.unlink(fsroot / "f")
    after = times(fsroot)
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_unlink_one_of_two_links(fsroot):
    f = mkfile(fsroot / "f", b"shared")
    os.link(f, fsroot / "g")
    before = times(fsroot / "g")
    tick()
    os.unlink(f)
    st = os.stat(fsroot / "g")
    assert st.st_nlink == 1
    assert st.st_ctime_ns > before[2]
    assert st.st_mtime_ns == before[1]
    assert read(fsroot / "g") == b"shared"


def test_unlink_symlink_not_target(fsroot):
    mkfile(fsroot / "f", b"t")
    os.symlink("f", fsroot / "l")
    os.unlink(fsroot / "l")
    assert os.listdir(fsroot) == ["f"]
    assert read(fsroot / "f") == b"t"


def test_unlink_dangling_symlink(fsroot):
    os.symlink("nowhere", fsroot / "l")
    os.unlink(fsroot / "l")
    assert os.listdir(fsroot) == []


def test_unlink_fifo(fsroot):
    os.mkfifo(fsroot / "p")
    os.unlink(fsroot / "p")
    assert os.listdir(fsroot) == []


def test_unlink_open_file_still_usable(fsroot):
    f = mkfile(fsroot / "f", b"still here")
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert os.listdir(fsroot) == []  # no hidden placeholder entries either
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"!", 10)
        os.ftruncate(fd, 11)
        assert os.pread(fd, 100, 0) == b"still here!"
    finally:
        os.close(fd)
    assert os.listdir(fsroot) == []
    mkfile(f, b"new")  # the name is free again
    assert read(f) == b"new"


def test_unlink_enoent(fsroot):
    assert errname(os.unlink, fsroot / "missing") == "ENOENT"
    assert errname(os.unlink, fsroot / "missing" / "f") == "ENOENT"


def test_unlink_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.unlink, fsroot / "f" / "x") == "ENOTDIR"


def test_unlink_eisdir(fsroot):
    d = mkdir(fsroot / "d")
    assert errname(os.unlink, d) == "EISDIR"
    assert os.path.isdir(d)


def test_unlink_enametoolong(fsroot):
    assert errname(os.unlink, fsroot / NAME256) == "ENAMETOOLONG"


def test_unlink_name_255(fsroot):
    mkfile(fsroot / NAME255)
    os.unlink(fsroot / NAME255)
    assert os.listdir(fsroot) == []


def test_unlink_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.unlink, loop / "f") == "ELOOP"
    os.unlink(loop)  # the loop link itself is removable
    assert os.listdir(fsroot) == ["loop_b"]


def test_unlink_non_root_in_writable_dir(fsroot):
    d = mkdir(fsroot / "d", 0o777)
    mkfile(d / "rootfile", mode=0o600)
    assert as_user(os.unlink, d / "rootfile") == "OK"  # only the directory's mode matters
    assert os.listdir(d) == []


def test_unlink_eacces_non_root(fsroot):
    ro = mkdir(fsroot / "ro", 0o755)
    mkfile(ro / "f", uid=NOBODY, gid=NOBODY, mode=0o666)
    assert as_user(os.unlink, ro / "f") == "EACCES"
    assert os.listdir(ro) == ["f"]


def test_unlink_eacces_search(fsroot):
    d = mkdir(fsroot / "d", 0o776)
    mkfile(d / "f")
    assert as_user(os.unlink, d / "f") == "EACCES"


def test_unlink_sticky_dir(fsroot):
    sticky = mkdir(fsroot / "sticky", 0o1777)
    mkfile(sticky / "rootfile", mode=0o666)
    mkfile(sticky / "own", uid=NOBODY, gid=NOBODY)
    assert as_user(os.unlink, sticky / "rootfile") == "EPERM"
    assert as_user(os.unlink, sticky / "own") == "OK"
    assert os.listdir(sticky) == ["rootfile"]


def test_unlink_sticky_dir_owner_may_delete(fsroot):
    sticky = mkdir(fsroot / "sticky", 0o1777, uid=NOBODY, gid=NOBODY)
    mkfile(sticky / "theirs", uid=OTHER, gid=OTHER)
    assert as_user(os.unlink, sticky / "theirs", uid=OTHER - 1, gid=OTHER - 1) == "EPERM"
    assert as_user(os.unlink, sticky / "theirs") == "OK"
    assert os.listdir(sticky) == []


# --------------------------------------------------------------------------------------------
# utimensat
# --------------------------------------------------------------------------------------------

A_NS = 1_500_000_000_123_456_789
M_NS = 1_600_000_000_987_654_321


def test_utimensat_explicit_ns(fsroot):
    f = mkfile(fsroot / "f")
    os.utime(f, ns=(A_NS, M_NS))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (A_NS, M_NS)


def test_utimensat_dir_explicit_ns(fsroot):
    d = mkdir(fsroot / "d")
    os.utime(d, ns=(A_NS, M_NS))
    st = os.stat(d)
    assert (st.st_atime_ns, st.st_mtime_ns) == (A_NS, M_NS)


def test_utimensat_fifo_explicit_ns(fsroot):
    os.mkfifo(fsroot / "p")
    os.utime(fsroot / "p", ns=(A_NS, M_NS))
    st = os.stat(fsroot / "p")
    assert (st.st_atime_ns, st.st_mtime_ns) == (A_NS, M_NS)


@pytest.mark.parametrize(
    "ns",
    [0, 1, 999_999_999, 4_102_444_800_000_000_001, -1_000_000_000 + 7],
    ids=["epoch", "1ns", "just_under_1s", "after_2038", "before_1970"],
)
def test_utimensat_edge_values(fsroot, ns):
    f = mkfile(fsroot / "f")
    os.utime(f, ns=(ns, ns))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (ns, ns)


def test_utimensat_updates_ctime(fsroot):
    f = mkfile(fsroot / "f")
    before = times(f)
    tick()
    os.utime(f, ns=(A_NS, M_NS))
    assert times(f)[2] > before[2]


def test_utimensat_null_sets_now(fsroot):
    f = mkfile(fsroot / "f")
    os.utime(f, ns=(A_NS, M_NS))
    t0 = time.time_ns()
    os.utime(f)
    t1 = time.time_ns()
    a, m, _ = times(f)
    assert_now(a, t0, t1)
    assert_now(m, t0, t1)


def test_utimensat_utime_now(fsroot):
    f = mkfile(fsroot / "f")
    os.utime(f, ns=(A_NS, M_NS))
    t0 = time.time_ns()
    utimensat(f, (0, UTIME_NOW), (0, UTIME_NOW))
    t1 = time.time_ns()
    a, m, _ = times(f)
    assert_now(a, t0, t1)
    assert_now(m, t0, t1)


def test_utimensat_omit_atime(fsroot):
    f = mkfile(fsroot / "f")
    os.utime(f, ns=(A_NS, M_NS))
    before = times(f)
    tick()
    utimensat(f, (0, UTIME_OMIT), (1_700_000_000, 5))
    after = times(f)
    assert after[0] == A_NS
    assert after[1] == 1_700_000_000_000_000_005
    assert after[2] > before[2]


def test_utimensat_omit_mtime(fsroot):
    f = mkfile(fsroot / "f")
    os.utime(f, ns=(A_NS, M_NS))
    utimensat(f, (1_700_000_000, 5), (0, UTIME_OMIT))
    assert times(f)[:2] == (1_700_000_000_000_000_005, M_NS)


def test_utimensat_now_and_omit(fsroot):
    f = mkfile(fsroot / "f")
    os.utime(f, ns=(A_NS, M_NS))
    t0 = time.time_ns()
    utimensat(f, (0, UTIME_NOW), (0, UTIME_OMIT))
    t1 = time.time_ns()
    a, m, _ = times(f)
    assert_now(a, t0, t1)
    assert m == M_NS


def test_utimensat_omit_both_changes_nothing(fsroot):
    f = mkfile(fsroot / "f")
    os.utime(f, ns=(A_NS, M_NS))
    before = times(f)
    tick()
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_OMIT))
    assert times(f) == before


def test_utimensat_symlink_nofollow(fsroot):
    f = mkfile(fsroot / "f")
    os.symlink("f", fsroot / "l")
    target_before = times(f)
    os.utime(fsroot / "l", ns=(A_NS, M_NS), follow_symlinks=False)
    lst = os.lstat(fsroot / "l")
    assert (lst.st_atime_ns, lst.st_mtime_ns) == (A_NS, M_NS)
    assert times(f)[:2] == target_before[:2]


def test_utimensat_dangling_symlink_nofollow(fsroot):
    os.symlink("nowhere", fsroot / "l")
    utimensat(fsroot / "l", (0, UTIME_OMIT), (1_234_567_890, 42), follow=False)
    assert os.lstat(fsroot / "l").st_mtime_ns == 1_234_567_890_000_000_042


def test_utimensat_follows_symlink(fsroot):
    f = mkfile(fsroot / "f")
    os.symlink("f", fsroot / "l")
    link_mtime = os.lstat(fsroot / "l").st_mtime_ns
    os.utime(fsroot / "l", ns=(A_NS, M_NS))
    assert times(f)[:2] == (A_NS, M_NS)
    assert os.lstat(fsroot / "l").st_mtime_ns == link_mtime  # (its atime moves when followed)


def test_utimensat_futimens(fsroot):
    f = mkfile(fsroot / "f", mode=0o444)
    fd = os.open(f, os.O_RDONLY)
    try:
        os.utime(fd, ns=(A_NS, M_NS))
    finally:
        os.close(fd)
    assert times(f)[:2] == (A_NS, M_NS)


def test_utimensat_einval_bad_nsec(fsroot):
    f = mkfile(fsroot / "f")
    assert errname(utimensat, f, (0, 1_000_000_000), (0, 0)) == "EINVAL"
    assert errname(utimensat, f, (0, 0), (0, -1)) == "EINVAL"


def test_utimensat_enoent(fsroot):
    assert errname(os.utime, fsroot / "missing", ns=(A_NS, M_NS)) == "ENOENT"
    os.symlink("nowhere", fsroot / "l")
    assert errname(os.utime, fsroot / "l", ns=(A_NS, M_NS)) == "ENOENT"


def test_utimensat_enotdir(fsroot):
    mkfile(fsroot / "f")
    assert errname(os.utime, fsroot / "f" / "x", ns=(A_NS, M_NS)) == "ENOTDIR"


def test_utimensat_enametoolong(fsroot):
    assert errname(os.utime, fsroot / NAME256, ns=(A_NS, M_NS)) == "ENAMETOOLONG"


def test_utimensat_name_255(fsroot):
    f = mkfile(fsroot / NAME255)
    os.utime(f, ns=(A_NS, M_NS))
    assert times(f)[:2] == (A_NS, M_NS)


def test_utimensat_eloop(fsroot):
    loop = make_loop(fsroot)
    assert errname(os.utime, loop, ns=(A_NS, M_NS)) == "ELOOP"


def test_utimensat_owner_non_root_explicit(fsroot):
    u = userdir(fsroot)
    f = mkfile(u / "f", mode=0o444, uid=NOBODY, gid=NOBODY)
    assert as_user(lambda p: os.utime(p, ns=(A_NS, M_NS)), f) == "OK"
    assert times(f)[:2] == (A_NS, M_NS)


def test_utimensat_non_owner_explicit_eperm(fsroot):
    f = mkfile(fsroot / "f", mode=0o666)
    os.utime(f, ns=(A_NS, M_NS))
    assert as_user(lambda p: os.utime(p, ns=(1, 1)), f) == "EPERM"
    assert as_user(utimensat, f, (0, UTIME_NOW), (0, UTIME_OMIT)) == "EPERM"
    assert times(f)[:2] == (A_NS, M_NS)


def test_utimensat_non_owner_writable_now(fsroot):
    f = mkfile(fsroot / "f", mode=0o666)
    os.utime(f, ns=(A_NS, M_NS))
    assert as_user(os.utime, f) == "OK"
    assert times(f)[1] != M_NS
    os.utime(f, ns=(A_NS, M_NS))
    assert as_user(utimensat, f, (0, UTIME_NOW), (0, UTIME_NOW)) == "OK"
    assert times(f)[1] != M_NS


def test_utimensat_non_owner_not_writable_eacces(fsroot):
    f = mkfile(fsroot / "f", mode=0o644)
    os.utime(f, ns=(A_NS, M_NS))
    assert as_user(os.utime, f) == "EACCES"
    assert times(f)[:2] == (A_NS, M_NS)
