"""The FUSE adapter: maps mfusepy's path-based callbacks onto :class:`cryptfs.fs.FileSystem`.

Paths are resolved to inodes through the filesystem's dentry cache; calls that carry a file
handle use it instead of the path (``nullpath_ok``), so files stay usable after unlink.
Unexpected exceptions become EIO with one log line, never a crashed mount.

Longer than ~400 lines: one thin method per FUSE callback.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy  # noqa: E402  (the library choice above must come first)

from cryptfs.errors import CryptfsError  # noqa: E402
from cryptfs.fs import DIR_SIZE, FileSystem  # noqa: E402
from cryptfs.fuse_row import (  # noqa: E402
    FUSE_BUCKETS,
    FUSE_BYTES,
    FUSE_CALLS,
    FUSE_ERRNOS,
    FUSE_ERRORS,
    FUSE_SAMPLE,
    FUSE_SECONDS,
)
from cryptfs.meta import ROOT_INO, Inode  # noqa: E402
from cryptfs.meta.locks import OFFSET_MAX  # noqa: E402

if TYPE_CHECKING:
    from cryptfs.metrics import FuseRecorder, Metrics

# the three fastest latency buckets, chosen by comparisons (most callbacks fall in them)
_B0, _B1, _B2 = FUSE_BUCKETS[:3]
_UNTIMED = FUSE_SAMPLE - 1  # the callbacks not timed: n & _UNTIMED

log = logging.getLogger("cryptfs.fuse")

_STAT_SIZE = ctypes.sizeof(mfusepy.c_stat)
FUSE_READDIR_PLUS = 1  # libfuse 3: enum fuse_readdir_flags, enum fuse_fill_dir_flags
FUSE_FILL_DIR_PLUS = 2

# a read-only memoryview of memory this process does not own (a write request's data, in
# libfuse's buffer): no copy, no ctypes array type per size
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_memory_view.restype = ctypes.py_object
_PYBUF_READ = 0x100

_invalidate_path = mfusepy._libfuse.fuse_invalidate_path
_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_invalidate_path.restype = ctypes.c_int

# the kernel's read-ahead window asked for each mount (KiB): a sequential read then reaches
# the daemon in requests of 1 MiB, the most one carries (libfuse asks for max_pages 256)
READAHEAD_KIB = 1024


def widen_readahead(mountpoint: str, kib: int = READAHEAD_KIB) -> None:
    """Let the kernel read ahead ``kib`` KiB on the FUSE mount at ``mountpoint`` (an absolute
    path without symbolic links, as /proc/self/mountinfo shows it; the topmost mount there),
    unless it already reads ahead more: the ``read_ahead_kb`` of the mount's device in sysfs.
    A FUSE mount's window starts at 128 KiB, which caps the ``max_readahead`` the filesystem
    asks at init, and the kernel sends a sequential read in requests no larger than the
    window: 128 KiB each, eight callbacks for what one could carry. Reads the mount table
    only, never the mount (called while the kernel waits for the init's answer). Needs root
    (sysfs); failing, the window stays as it was (a debug line)."""
    try:
        with open("/proc/self/mountinfo") as f:
            devs = [fields[2] for fields in map(str.split, f)
                    if len(fields) > 4 and _unescape(fields[4]) == mountpoint]
        if not devs:
            return
        with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "r+") as f:
            if int(f.read()) < kib:
                f.seek(0)
                f.write(str(kib))
    except (OSError, ValueError) as e:
        log.debug("the read-ahead window of %s stays as it was: %s", mountpoint, e)


def _unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it, with its octal escapes (space, tab,
    newline, backslash) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# libfuse 3 capability bits of fuse_conn_info.want (fuse_common.h); mfusepy exposes the
# want/capable fields but not these names
FUSE_CAP_POSIX_LOCKS = 1 << 1
FUSE_CAP_DONT_MASK = 1 << 6
FUSE_CAP_FLOCK_LOCKS = 1 << 10
FUSE_CAP_POSIX_ACL = 1 << 19

# libfuse calls mfusepy does not declare: whether the kernel asked to interrupt the request this
# worker thread answers (its process got a signal), and whether the session is ending
_fuse_interrupted = mfusepy._libfuse.fuse_interrupted
_fuse_interrupted.argtypes = []
_fuse_interrupted.restype = ctypes.c_int
_fuse_get_session = mfusepy._libfuse.fuse_get_session
_fuse_get_session.argtypes = [ctypes.c_void_p]
_fuse_get_session.restype = ctypes.c_void_p
_fuse_session_exited = mfusepy._libfuse.fuse_session_exited
_fuse_session_exited.argtypes = [ctypes.c_void_p]
_fuse_session_exited.restype = ctypes.c_int

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
NOW = -1
OMIT = -2


# A ctypes callback from a thread that has no Python thread state (libfuse's workers) creates
# one and destroys it again on return, which costs more than many callbacks themselves. The
# first callback in each worker thread takes one more reference to its thread state, so the
# state lives as long as the thread (libfuse keeps its workers until unmount).
_PyGILState_Ensure = ctypes.pythonapi.PyGILState_Ensure
_PyGILState_Ensure.restype = ctypes.c_int
_thread_kept = threading.local()


def _keep_thread_state() -> None:
    if not getattr(_thread_kept, "kept", False):
        _PyGILState_Ensure()
        _thread_kept.kept = True


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _answer(name: str, e: Exception) -> int:
    """The errno answer to FUSE callback ``name`` that raised ``e`` (not an OSError), logged
    in one line (a traceback for an internal error)."""
    if isinstance(e, CryptfsError):
        log.error("%s failed: %s", name, e.line())
        return e.errno
    log.error("internal error in %s", name, exc_info=e)
    return errno.EIO


def _errno(e: OSError) -> int:
    """The errno an OSError raised by an operation answers (EINVAL when it has none)."""
    code = e.errno
    if type(code) is int and code > 0:
        return code
    log.error("an operation raised an OSError without an errno (%s): answering EINVAL", e)
    return errno.EINVAL


def fill_stat(st: Any, node: Inode, blocks: int) -> None:
    """What :func:`stat_dict` says, written into libfuse's ``struct stat`` ``st`` (zeroed)."""
    st.st_ino = node.ino
    st.st_mode = node.mode
    st.st_nlink = node.nlink
    st.st_uid = node.uid
    st.st_gid = node.gid
    st.st_size = DIR_SIZE if stat.S_ISDIR(node.mode) else node.size
    st.st_rdev = node.rdev
    st.st_blksize = 4096
    st.st_blocks = blocks
    st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = divmod(node.atime_ns, 1_000_000_000)
    st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(node.mtime_ns, 1_000_000_000)
    st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(node.ctime_ns, 1_000_000_000)


def stat_dict(node: Inode, blocks: int) -> dict[str, int]:
    """The stat of ``node``; ``blocks`` its 512-byte blocks (FileSystem.st_blocks). A
    directory reports ext4's size for a small one."""
    return {
        "st_ino": node.ino,
        "st_mode": node.mode,
        "st_nlink": node.nlink,
        "st_uid": node.uid,
        "st_gid": node.gid,
        "st_size": DIR_SIZE if stat.S_ISDIR(node.mode) else node.size,
        "st_atime": node.atime_ns,
        "st_mtime": node.mtime_ns,
        "st_ctime": node.ctime_ns,
        "st_rdev": node.rdev,
        "st_blksize": 4096,
        "st_blocks": blocks,
    }


class CryptfsOperations(mfusepy.Operations):
    """mfusepy operations for one mounted vault. They raise OSError for an errno answer;
    :class:`CryptfsFUSE` turns that, and any other exception, into the answer."""

    use_ns = True
    flag_nopath = True
    flag_nullpath_ok = True
    # a close of a file opened read-only while no attribute change or creation awaits a
    # commit has nothing to commit (a file's data is its writers' to commit), and the kernel
    # keeps this machine's locks: the kernel is told to send no flush for it (FOPEN_NOFLUSH)
    flush_read_only = False

    def __init__(
        self,
        fs: FileSystem,
        on_init: Callable[[], None] | None = None,
        on_destroy: Callable[[], None] | None = None,
        attr_timeout: float = 1.0,
    ) -> None:
        self.fs = fs
        self.on_init = on_init
        self.on_destroy = on_destroy
        self.attr_timeout = attr_timeout
        self.dir_inos: dict[int, int] = {}
        self._dirs: dict[str, int] = {}
        self._fuse: Any = None
        self._own_umask = False  # FUSE_CAP_DONT_MASK granted: creates apply the umask here

    def _invalidate(self, ino: int, keep: str | None = None) -> None:
        """libfuse's high-level API gives every name of a hard-linked file its own kernel
        inode; after a change through one name, drop the kernel's cached attributes and pages
        of the others."""
        if self._fuse is None:
            return
        for p in self.fs.paths_of(ino):
            if p != keep:
                _invalidate_path(self._fuse, _enc(p))

    def _after_change(self, ino: int, path: str | None) -> None:
        if self.fs.nlink(ino) > 1:
            self._invalidate(ino, path)

    # -- path resolution --------------------------------------------------------------------
    def _ino(self, path: str | None, fh: int | None = None) -> int:
        if fh is not None:
            h = self.fs.handles.get(fh)
            if h is not None:
                return h.file.ino if h.file is not None else self.dir_inos.get(fh, ROOT_INO)
        if path is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        head, _, name = path.rpartition("/")
        parent = self._dir_ino(head)
        return self.fs.lookup(parent, _enc(name)).ino if name else parent

    def _dir_ino(self, path: str) -> int:
        """The inode of directory ``path``, through a cache of directory paths. libfuse locks
        the paths an operation touches, and the cache is cleared by every rename and rmdir, so
        an entry never outlives its directory."""
        if not path or path == "/":
            return ROOT_INO
        ino = self._dirs.get(path)
        if ino is None:
            head, _, name = path.rpartition("/")
            node = self.fs.lookup(self._dir_ino(head), _enc(name))
            ino = node.ino
            if stat.S_ISDIR(node.mode):
                if len(self._dirs) >= 100_000:
                    self._dirs.clear()
                self._dirs[path] = ino
        return ino

    def _parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return self._dir_ino(head), _enc(name)

    @staticmethod
    def _ctx() -> tuple[int, int]:
        uid, gid, _pid = mfusepy.fuse_get_context()
        return uid, gid

    def _caller(self) -> tuple[int, int, int]:
        """The caller's uid, gid and umask: the umask when the kernel leaves it to us (see
        init_with_config), else 0 (the kernel applied it). mfusepy's fuse_get_context() drops
        the umask: all three are read from libfuse's struct fuse_context, which mfusepy
        declares with it (one call for the three)."""
        c = mfusepy._libfuse.fuse_get_context().contents
        return c.uid, c.gid, int(c.umask) if self._own_umask else 0

    # -- lifecycle --------------------------------------------------------------------------
    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            conn.max_readahead = max(conn.max_readahead, 1 << 20)
            # POSIX ACLs: the kernel checks them (this implies default_permissions) and caches
            # them; the filesystem stores them as system.posix_acl_* xattrs, keeps them and the
            # mode in step and applies default ACLs to new nodes (cryptfs.fs.acl). Where a default
            # ACL applies the umask must not be, so the kernel leaves the umask to us.
            if conn.capable & FUSE_CAP_POSIX_ACL and conn.capable & FUSE_CAP_DONT_MASK:
                conn.want |= FUSE_CAP_POSIX_ACL | FUSE_CAP_DONT_MASK
                self._own_umask = True
            log.debug("FUSE connection: max_write=%d max_readahead=%d max_background=%d",
                      conn.max_write, conn.max_readahead, conn.max_background)
        if config is not None:
            config.entry_timeout = self.attr_timeout
            config.attr_timeout = self.attr_timeout
            config.negative_timeout = 0.0
            config.use_ino = 1
            config.nullpath_ok = 1
        try:
            self._fuse = mfusepy._libfuse.fuse_get_context().contents.fuse
        except (AttributeError, ValueError):
            self._fuse = None
        if self.on_init:
            self.on_init()

    def destroy(self, path: str) -> None:
        if self.on_destroy:
            self.on_destroy()

    # -- attributes -------------------------------------------------------------------------
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        return stat_dict(*self.stat(path, fh))

    def stat(self, path: str | None, fh: int | None = None) -> tuple[Inode, int]:
        """The node of ``path`` (or of open file ``fh``) and its 512-byte blocks."""
        node = self.fs.getattr(self._ino(path, fh))
        return node, self.fs.st_blocks(node)

    def access(self, path: str, amode: int) -> int:
        self._ino(path)
        return 0

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        ino = self._ino(path, fh)
        self.fs.chmod(ino, mode)
        self._after_change(ino, path)
        return 0

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        ino = self._ino(path, fh)
        self.fs.chown(ino, uid, gid)
        self._after_change(ino, path)
        return 0

    def utimens(
        self, path: str | None, times: tuple[int, int] | None = None, fh: int | None = None
    ) -> int:
        now = time.time_ns()
        if times is None:
            a = m = now
        else:
            a, m = (now if t == NOW else None if t == OMIT else t for t in times)
        ino = self._ino(path, fh)
        self.fs.utimens(ino, a, m)
        self._after_change(ino, path)
        return 0

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        ino = self._ino(path, fh)
        self.fs.truncate(ino, length, fh)
        self._after_change(ino, path)
        return 0

    # -- names ------------------------------------------------------------------------------
    def readlink(self, path: str) -> str:
        return self.fs.readlink(self._ino(path)).decode("utf-8", "surrogateescape")

    def mknod(self, path: str, mode: int, dev: int) -> int:
        parent, name = self._parent(path)
        uid, gid, umask = self._caller()
        self.fs.mknod(parent, name, mode, dev, uid, gid, umask=umask)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self._parent(path)
        uid, gid, umask = self._caller()
        self.fs.mkdir(parent, name, mode, uid, gid, umask=umask)
        return 0

    def unlink(self, path: str) -> int:
        ino = self._ino(path)
        self.fs.unlink(*self._parent(path))
        self._invalidate(ino)
        return 0

    def rmdir(self, path: str) -> int:
        self.fs.rmdir(*self._parent(path))
        self._dirs.clear()
        return 0

    def symlink(self, target: str, source: str) -> int:
        parent, name = self._parent(target)
        self.fs.symlink(parent, name, _enc(source), *self._ctx())
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        p1, n1 = self._parent(old)
        p2, n2 = self._parent(new)
        try:
            replaced: int | None = self._ino(new)
        except OSError:
            replaced = None
        self.fs.rename(p1, n1, p2, n2, flags)
        self._dirs.clear()
        if replaced is not None:
            self._invalidate(replaced)
        return 0

    def link(self, target: str, source: str) -> int:
        parent, name = self._parent(target)
        ino = self._ino(source)
        self.fs.link(ino, parent, name)
        self._invalidate(ino, target)
        return 0

    # -- files ------------------------------------------------------------------------------
    def create(self, path: str, mode: int, flags: int) -> int:
        parent, name = self._parent(path)
        uid, gid, umask = self._caller()
        _node, fh = self.fs.create(parent, name, mode, flags, uid, gid, umask=umask)
        return fh

    def open(self, path: str, flags: int) -> int:
        fh = self.fs.open(self._ino(path), flags)
        if not flags & (os.O_WRONLY | os.O_RDWR):
            self.fs.prefetch_siblings(*self._parent(path))
        return fh

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        """(Defining it registers libfuse's read callback; the mounted filesystem's reads go
        through :meth:`CryptfsFUSE.read` and :meth:`read_parts`.)"""
        return self.fs.read(fh, offset, size)

    def read_parts(self, path: str | None, size: int, offset: int, fh: int) -> list[bytes]:
        return self.fs.read_parts(fh, offset, size)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self.fs.write(fh, offset, data)

    def flush(self, path: str | None, fh: int) -> int:
        self.fs.flush(fh)
        return 0

    def release(self, path: str | None, fh: int, flock_owner: int | None = None) -> int:
        """``flock_owner``: the open file description's last close, which had a flock
        (libfuse's ``flock_release``; only with :class:`SharedLocksOperations`): it goes."""
        ino = self._ino(None, fh)
        try:
            if flock_owner is not None:
                self.fs.release_flock(ino, flock_owner)
        finally:
            self.fs.release(fh)
        self._after_change(ino, None)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.fs.fsync(fh)
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        self.fs.fallocate(fh, mode, offset, size)
        return 0

    def lseek(self, path: str | None, offset: int, whence: int, fh: int) -> int:
        """SEEK_DATA / SEEK_HOLE (the kernel answers the other kinds itself)."""
        return self.fs.lseek(fh, offset, whence)

    # -- directories ------------------------------------------------------------------------
    def opendir(self, path: str) -> int:
        ino = self._ino(path)
        fh = self.fs.opendir(ino)
        self.dir_inos[fh] = ino
        return fh

    def readdir_with_offset(
        self, path: str | None, offset: int, fh: int
    ) -> Iterator[tuple[str, dict[str, int], int]]:
        ino = self.dir_inos.get(fh)
        if ino is None:
            ino = self._ino(path)
        # read here, not in a generator: an error must reach _guard (errno, one log line)
        entries = self.fs.readdir(ino, fh, offset)
        return (
            (name.decode("utf-8", "surrogateescape"),
             {"st_ino": child, "st_mode": stat.S_IFMT(mode)}, nxt)
            for name, child, mode, nxt in entries
        )

    def readdir_plus(self, path: str | None, offset: int, fh: int
                     ) -> list[tuple[bytes, int, int, int, tuple[Inode, int] | None]]:
        """:meth:`readdir_with_offset`'s entries as ``(name, ino, mode, next offset, full)``,
        ``full`` each one's node and blocks where the filesystem has them at hand (see
        :meth:`FileSystem.readdir_stat`)."""
        ino = self.dir_inos.get(fh)
        return self.fs.readdir_stat(self._ino(path) if ino is None else ino, fh, offset)

    def releasedir(self, path: str | None, fh: int) -> int:
        self.fs.releasedir(fh)
        self.dir_inos.pop(fh, None)
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self.fs.fsync(None)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return self.fs.statfs()

    # -- xattrs -----------------------------------------------------------------------------
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        ino = self._ino(path)
        self.fs.setxattr(ino, _enc(name), bytes(value), options)
        self._after_change(ino, path)  # an ACL also changes the mode; the kernel caches both
        return 0

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.fs.getxattr(self._ino(path), _enc(name))

    def listxattr(self, path: str) -> list[str]:
        return [n.decode("utf-8", "surrogateescape") for n in self.fs.listxattr(self._ino(path))]

    def removexattr(self, path: str, name: str) -> int:
        ino = self._ino(path)
        self.fs.removexattr(ino, _enc(name))
        self._after_change(ino, path)
        return 0


class SharedLocksOperations(CryptfsOperations):
    """The operations of a vault whose engine is ``shared`` (several machines): ``fcntl``
    record locks and ``flock`` kept by the engine for every machine
    (:mod:`cryptfs.fs.locks`), instead of the kernel's, which are one machine's. A vault of
    one machine mounts :class:`CryptfsOperations`, which has no lock operations: the kernel
    keeps its locks, at no cost."""

    flush_read_only = True  # (libfuse lets go of a read-only file's fcntl locks at its flush)

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            want = FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS
            if conn.capable & want != want:
                log.warning("the kernel cannot hand file locks to the filesystem: fcntl and "
                            "flock locks are this machine's only")
            conn.want |= conn.capable & want
        super().init_with_config(conn, config)

    def _interrupted(self) -> int:
        """Whether a waiting lock must give up, as the errno it ends with (0: no): EINTR once
        its process got a signal (the kernel asked libfuse to interrupt the request),
        ENOLCK once the mount is ending (libfuse waits for its worker threads: a wait must
        not keep the unmount waiting)."""
        if _fuse_interrupted():
            return errno.EINTR
        if self._fuse is not None and _fuse_session_exited(_fuse_get_session(self._fuse)):
            return errno.ENOLCK
        return 0

    def lock(self, path: str | None, fh: int, owner: int, cmd: int, lk: Any) -> int:
        """F_GETLK / F_SETLK / F_SETLKW of lock owner ``owner``; ``lk`` points at libfuse's
        ``struct flock`` (SEEK_SET, ``l_len`` 0: to the end), filled in for F_GETLK."""
        ino = self._ino(path, fh)
        fl = lk.contents
        start = fl.l_start
        end = OFFSET_MAX if fl.l_len <= 0 else fl.l_start + fl.l_len - 1
        if cmd == fcntl.F_GETLK:
            held = self.fs.getlk(ino, owner, fl.l_type, start, end)
            if held is None:
                fl.l_type = fcntl.F_UNLCK
            else:
                fl.l_type, fl.l_whence, fl.l_start = held.ltype, os.SEEK_SET, held.start
                fl.l_len = 0 if held.end == OFFSET_MAX else held.end - held.start + 1
                fl.l_pid = held.pid
            return 0
        if cmd not in (fcntl.F_SETLK, fcntl.F_SETLKW):
            raise mfusepy.FuseOSError(errno.EINVAL)
        self.fs.setlk(ino, owner, fl.l_type, start, end, fl.l_pid, cmd == fcntl.F_SETLKW,
                      self._interrupted)
        return 0

    def flock(self, path: str | None, fh: int, owner: int, op: int) -> int:
        """``flock(op)`` of the open file description ``owner``."""
        ltype = {fcntl.LOCK_SH: fcntl.F_RDLCK, fcntl.LOCK_EX: fcntl.F_WRLCK,
                 fcntl.LOCK_UN: fcntl.F_UNLCK}.get(op & ~fcntl.LOCK_NB)
        if ltype is None:
            raise mfusepy.FuseOSError(errno.EINVAL)
        self.fs.flock(self._ino(path, fh), owner, ltype, not op & fcntl.LOCK_NB,
                      self._interrupted)
        return 0


class CryptfsFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with file handles passed to chmod/chown/utimens (for open files that
    were unlinked) and UTIME_NOW / UTIME_OMIT preserved, and its own :meth:`_wrapper` around
    every callback. With ``metrics`` every callback is counted by kind there (with its errno,
    and read/write bytes), and a sample of them timed."""

    def __init__(self, operations: CryptfsOperations, mountpoint: str,
                 metrics: Metrics | None = None, **kwargs: Any) -> None:
        self.record_into(metrics)
        super().__init__(operations, mountpoint, **kwargs)

    def record_into(self, metrics: Metrics | None) -> None:
        """Record every callback in ``metrics`` from now on (None: record nothing)."""
        self._recorder: FuseRecorder | None = (metrics.fuse_recorder() if metrics is not None
                                               else None)
        # what the wrapper reads per callback: the recorder's thread-local (see _wrapper)
        self._record = self._recorder.local if self._recorder is not None else None

    def _wrapper(self, func: Callable[..., Any], *args: Any) -> int:  # type: ignore[override]
        """Runs libfuse callback ``func`` (one of this class's methods, which call the
        operations): its result, or ``-errno`` for an OSError it raised, or for another
        exception the errno :func:`_answer` gives it (one log line, never a crashed mount).
        Replaces mfusepy's, which formats a debug line and an strerror for every errno answer,
        and is the only Python frame between libfuse and the operation: the errno answers
        and the metrics are here, not in a wrapper per operation. The first callback in a
        worker thread keeps its thread state (:func:`_keep_thread_state`).

        With metrics, the callback is counted, and added to the calling thread's row of
        ``func`` (:class:`cryptfs.metrics.FuseRecorder`) right here, without a call: the bytes
        it returned or its errno, and for one callback in ``FUSE_SAMPLE`` of its kind in this
        thread (the first, then every ``FUSE_SAMPLE``-th) its latency bucket and seconds. A
        record costs a daemon what it touches in memory (the caches are cold after the two
        context switches of a FUSE round trip) and the clock: one thread-local, one dict and
        one list, and two clock reads only when the callback is timed (they were half of a
        record's cost)."""
        local = self._record  # the recorder's thread-local, or None without metrics
        if local is None:
            if not getattr(_thread_kept, "kept", False):
                _keep_thread_state()
            try:
                return func(*args) or 0
            except OSError as e:
                return -_errno(e)
            except Exception as e:
                return -self._failed(func, e)
            except BaseException as e:
                return self._critical(func, e)
        try:
            rows = local.rows
        except AttributeError:  # the first callback in this thread
            _keep_thread_state()
            rows = self._recorder.thread_rows()  # type: ignore[union-attr]
        try:
            row = rows[func]
        except KeyError:
            row = self._recorder.new_row(rows, func)  # type: ignore[union-attr]
        n = row[FUSE_CALLS]
        row[FUSE_CALLS] = n + 1
        t = 0.0 if n & _UNTIMED else perf_counter()
        code = out = 0
        try:
            out = func(*args) or 0
        except OSError as e:
            code = _errno(e)
        except Exception as e:
            code = self._failed(func, e)
        except BaseException as e:
            return self._critical(func, e)
        if t:
            d = perf_counter() - t
            row[0 if d < _B0 else 1 if d < _B1 else 2 if d < _B2
                else bisect_left(FUSE_BUCKETS, d)] += 1
            row[FUSE_SECONDS] += d
        if not code:
            if out:  # bytes for read and write (what other callbacks return is not reported)
                row[FUSE_BYTES] += out
            return out  # type: ignore[no-any-return]
        if code < FUSE_ERRNOS:
            row[FUSE_ERRORS + code] += 1
        else:
            big = row[-1]
            big[code] = big.get(code, 0) + 1
        return -code

    @staticmethod
    def _failed(func: Callable[..., Any], e: Exception) -> int:
        name = func.__name__
        if name.startswith("init"):  # libfuse cannot be told: mfusepy raises it too
            raise e
        return _answer(name.removesuffix("_fuse_3"), e)

    def _critical(self, func: Callable[..., Any], e: BaseException) -> int:
        """What mfusepy does for a BaseException (SystemExit, KeyboardInterrupt): stop the
        FUSE loop, and FUSE() raises it."""
        self._FUSE__critical_exception = e
        log.critical("FUSE operation %s raised %s: stopping", func.__name__, type(e).__name__)
        mfusepy.fuse_exit()
        return -errno.EFAULT

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    @staticmethod
    def _fh(fip: Any) -> int | None:
        return fip.contents.fh if fip else None

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        """mfusepy's read without joining the pieces (a chunk each) into one bytes object:
        each is copied straight into the request's buffer."""
        at = ctypes.cast(buf, ctypes.c_void_p).value
        n = 0
        for piece in self.operations.read_parts(self._path(path), size, offset,
                                                fip.contents.fh):
            if type(piece) is not bytes:  # (ctypes takes the address of bytes only)
                piece = bytes(piece)
            ctypes.memmove(at + n, piece, len(piece))
            n += len(piece)
        return n

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        """mfusepy's write without copying the data into a bytes object first: the operation
        reads it in place, in libfuse's buffer, valid only during this call
        (:meth:`cryptfs.fs.FileSystem.write` copies what it keeps before it returns)."""
        data = _memory_view(ctypes.cast(buf, ctypes.c_void_p).value, size, _PYBUF_READ)
        try:
            return self.operations.write(self._path(path), data, offset, fip.contents.fh)
        finally:
            data.release()

    def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        """mfusepy's getattr without its dict: the node straight into the struct (the
        callback of every lookup and stat)."""
        node, blocks = self.operations.stat(self._path(path), self._fh(fip))
        ctypes.memset(buf, 0, _STAT_SIZE)
        fill_stat(buf.contents, node, blocks)
        return 0

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int,
                       fip: Any, flags: int) -> int:
        """With FUSE_READDIR_PLUS (the kernel's first listing of a directory, or one whose
        entries it looked up since), every entry's whole stat: the kernel then looks none of
        them up while its entry timeout runs (``ls -l``, ``find``, a tree read back); without,
        mfusepy's (the mode and inode number)."""
        if not flags & FUSE_READDIR_PLUS:
            return super().readdir_fuse_3(path, buf, filler, offset, fip, flags)
        st = mfusepy.c_stat()
        for name, ino, mode, nxt, full in self.operations.readdir_plus(
                self._path(path), offset, fip.contents.fh):
            ctypes.memset(ctypes.byref(st), 0, _STAT_SIZE)
            if full is None:
                st.st_ino, st.st_mode = ino, stat.S_IFMT(mode)
            else:
                fill_stat(st, *full)
            if filler(buf, name, st, nxt, 0 if full is None else FUSE_FILL_DIR_PLUS) != 0:
                break
        return 0

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.operations.chmod(self._path(path), mode, self._fh(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        if ctypes.c_uint32(uid + 1).value == 0:
            uid = -1
        if ctypes.c_uint32(gid + 1).value == 0:
            gid = -1
        return self.operations.chown(self._path(path), uid, gid, self._fh(fip))

    def open(self, path: bytes, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.open(self._path(path), fi.flags)
        if not fi.flags & (os.O_WRONLY | os.O_RDWR) and not self.operations.flush_read_only \
                and not self.operations.fs.awaiting_commit():
            fi.noflush = 1
        return 0

    def create(self, path: bytes, mode: int, fip: Any) -> int:  # without inspect per call
        fip.contents.fh = self.operations.create(self._path(path), mode, fip.contents.flags)
        return 0

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(self._path(path), length, self._fh(fip))

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        def conv(ts: Any) -> int:
            if ts.tv_nsec == UTIME_NOW:
                return NOW
            if ts.tv_nsec == UTIME_OMIT:
                return OMIT
            return ts.tv_sec * 10**9 + ts.tv_nsec

        times = (conv(buf.contents.actime), conv(buf.contents.modtime)) if buf else None
        return self.operations.utimens(self._path(path), times, self._fh(fip))

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(self._path(old), self._path(new), flags)

    def release(self, path: bytes | None, fip: Any) -> int:
        c = fip.contents
        return self.operations.release(self._path(path), c.fh,
                                       c.lock_owner if c.flock_release else None)

    # registered only for SharedLocksOperations (mfusepy leaves out the operations that
    # CryptfsOperations inherits unimplemented); they pass libfuse's lock owner on
    def lock(self, path: bytes | None, fip: Any, cmd: int, lk: Any) -> int:
        return self.operations.lock(self._path(path), fip.contents.fh,
                                    fip.contents.lock_owner, cmd, lk)

    def flock(self, path: bytes | None, fip: Any, op: int) -> int:
        return self.operations.flock(self._path(path), fip.contents.fh,
                                     fip.contents.lock_owner, op)

    def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
        """mfusepy declares libfuse 3's lseek callback but has no wrapper for it."""
        return self.operations.lseek(self._path(path), offset, whence, self._fh(fip))
