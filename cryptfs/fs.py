"""Filesystem operations: POSIX semantics over the metadata store and the chunk store.

Inode-based and independent of FUSE: every method takes inode numbers and raw names (bytes),
returns :class:`~cryptfs.metadata.Inode` records or data, and raises ``OSError(errno)``.

Durability contract:
- every namespace operation (mkdir, mknod, symlink, link, unlink, rename, ...) and xattr
  change is one committed SQLite transaction when it returns: it survives a crash of the
  process;
- the creation of a regular file (``create``) and attribute changes (chmod, chown, utimens)
  are written at once and committed with the next commit: the file's flush at close, any
  namespace operation, an fsync, or at the latest ``COMMIT_DELAY`` later (a crash of the
  process in between may lose them; a file closed is never lost);
- ``write`` buffers in memory; ``flush`` (every close) seals the file's dirty chunks, stages
  them and commits the chunk map and every attribute change made before: the data survives a
  crash of the process and will reach the store;
- ``fsync``/``fsyncdir`` additionally wait until everything is in the store and a metadata
  snapshot and ledger checkpoint are written there (see :mod:`cryptfs.vault`).

Locking: ``self.lock`` guards metadata, caches and the open-file table; each open file has its
own lock for its buffers. A thread may take a file lock and then ``self.lock``, never the
reverse. Store reads happen outside ``self.lock``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from cryptfs import acl
from cryptfs.chunkstore import ChunkStore
from cryptfs.codec import ChunkRef
from cryptfs.errors import CryptfsError, IntegrityError
from cryptfs.metadata import ROOT_INO, Inode, MetaStore

log = logging.getLogger("cryptfs.fs")

NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_CREATE = 1
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
DIRTY_LIMIT = 64 << 20  # per open file, before its dirty chunks are sealed early
INODE_CACHE_MAX = 200_000
REF_WINDOW = 256
_SQL_NEXT_FIRST_CHUNKS = (
    "SELECT d.name, b.obj, o.size, o.sha256 FROM dentries d "
    "JOIN blocks b ON b.ino = d.ino AND b.idx = 0 JOIN objects o ON o.name = b.obj "
    "WHERE d.parent = ? AND d.name > ? ORDER BY d.name LIMIT ?"
)
INLINE_SEAL = 128 << 10
ALLOC_UNIT = 4096  # a stored chunk counts as allocated in units of this, like ext4's blocks
DIR_SIZE = 4096  # the size a directory reports (ext4's for a small one)
SEEK_DATA, SEEK_HOLE = 3, 4
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
COMMIT_DELAY = 0.1  # at most this long between an attribute change and its commit
# libfuse's high-level API renames a file that is unlinked while open to such a name and
# unlinks it at release; these entries are invisible and do not count as links.
HIDDEN = b".fuse_hidden"


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Sealing:
    """A chunk being sealed on a worker thread; keeps its plaintext until that succeeds."""

    __slots__ = ("buf", "fut")

    def __init__(self, buf: bytearray, fut: Future[ChunkRef | None]) -> None:
        self.buf: bytearray | None = buf
        self.fut = fut
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[ChunkRef | None]) -> None:
        if fut.exception() is None:
            self.buf = None

    def ref(self) -> ChunkRef | None:
        return self.fut.result()


@dataclass
class OpenFile:
    """State shared by all handles of one inode while it is open."""

    ino: int
    size: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    dirty: dict[int, bytearray] = field(default_factory=dict)
    pending: dict[int, Sealing] = field(default_factory=dict)
    refs: dict[int, ChunkRef] = field(default_factory=dict)  # committed chunk map, cached
    loaded: set[int] = field(default_factory=set)  # windows of REF_WINDOW indexes in refs
    handles: int = 0
    mtime_ns: int | None = None  # time of the last data change not yet committed
    last_read_end: int = -1
    reported: bool = False

    def dirty_bytes(self) -> int:
        return sum(len(b) for b in self.dirty.values())


@dataclass
class Handle:
    file: OpenFile | None
    flags: int
    listing: list[tuple[bytes, int, int]] | None = None


class CommitHooks:
    """What runs after each commit and each rollback of a :class:`MetaStore`. It exists before
    both: the metadata store is built with :meth:`committed` and :meth:`rolled_back` as its
    callbacks, and the filesystem, built later on that metadata store, listens from its
    constructor (its deferred writes: forgotten once committed, written again after a
    rollback). Listeners run on the thread that commits, under the filesystem lock."""

    def __init__(self) -> None:
        self._listeners: list[tuple[Callable[[], None], Callable[[], None]]] = []

    def listen(self, on_commit: Callable[[], None], on_rollback: Callable[[], None]) -> None:
        self._listeners.append((on_commit, on_rollback))

    def committed(self) -> None:
        for on_commit, _ in self._listeners:
            on_commit()

    def rolled_back(self) -> None:
        for _, on_rollback in self._listeners:
            on_rollback()


class FileSystem:
    """The filesystem. ``on_sync`` makes everything durable in the store (fsync);
    ``before_commit`` runs inside each transaction that commits file data (the vault writes
    its queued ledger entries there); ``hooks`` are the commit hooks ``meta`` was built with."""

    def __init__(
        self,
        meta: MetaStore,
        chunks: ChunkStore,
        chunk_size: int,
        on_sync: Callable[[], None],
        readonly: bool = False,
        statfs_source: Callable[[], os.statvfs_result | None] | None = None,
        *,
        hooks: CommitHooks,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.meta = meta
        self.chunks = chunks
        self.cs = chunk_size
        self.on_sync = on_sync
        self.readonly = readonly
        self.statfs_source = statfs_source
        self.lock = threading.RLock()
        self.inodes: dict[int, Inode] = {}
        self.dentries: dict[tuple[int, bytes], int] = {}
        # directories whose every entry is in self.dentries (made during this mount): a name
        # missing there does not exist, with no SQL (each create is preceded by such a lookup)
        self.complete: set[int] = set()
        self.files: dict[int, OpenFile] = {}
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.read_errors = 0
        self.before_commit = before_commit
        self._prefetched: dict[int, bytes] = {}  # directory -> name that refills the window
        # the kernel asks for security.capability on every write: answer from memory
        self.xattr_inos: set[int] = meta.inodes_with_xattrs()
        # bytes a file's committed chunks take (see st_blocks), computed on its first stat
        self._alloc: dict[int, int] = {}
        # changes written but not committed yet (see _save_later and create)
        self._deferred: dict[int, Inode] = {}
        self._deferred_new: list[tuple[int, bytes, Inode]] = []
        self._deferred_event = threading.Event()
        self._committer: threading.Thread | None = None
        hooks.listen(self._committed, self._reapply_deferred)

    # -- helpers --------------------------------------------------------------------------
    def _node(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is None:
            node = self.meta.get_inode(ino)
            if node is None:
                raise _err(errno.ENOENT)
            if len(self.inodes) >= INODE_CACHE_MAX:
                self.inodes.clear()
                self.dentries.clear()
                self.complete.clear()
            self.inodes[ino] = node
        return node

    def _save(self, node: Inode) -> None:
        self.meta.update_inode(node)

    def _save_later(self, node: Inode) -> None:
        """Write an attribute change (chmod, chown, utimens) without committing it (caller
        holds self.lock): the next commit takes it along (the file's flush at close, the next
        create, an fsync), or the committer thread within COMMIT_DELAY. Programs that unpack
        files set times, owner and mode on each before closing it: one commit instead of
        four."""
        self.meta.update_inode(node)
        self._defer(node)

    def _defer(self, node: Inode) -> None:
        """Remember a written change of ``node`` until the next commit (caller holds
        self.lock), and make sure that commit comes within COMMIT_DELAY."""
        self._deferred[node.ino] = node
        if self._committer is None:
            self._committer = threading.Thread(
                target=self._commit_deferred_loop, name="commit", daemon=True
            )
            self._committer.start()
        self._deferred_event.set()

    def _reapply_deferred(self) -> None:
        """A rollback undid the deferred writes too: write them again (still uncommitted)."""
        for parent, name, node in self._deferred_new:
            self.meta.insert_inode(node)
            self.meta.add_dentry(parent, name, node.ino)
        for node in self._deferred.values():
            self.meta.update_inode(node)

    def _committed(self) -> None:
        self._deferred.clear()
        self._deferred_new.clear()

    def commit_deferred(self) -> None:
        with self.lock:
            if self._deferred:
                self.meta.commit()

    def _commit_deferred_loop(self) -> None:
        while True:
            self._deferred_event.wait()
            time.sleep(COMMIT_DELAY)
            self._deferred_event.clear()
            try:
                self.commit_deferred()
            except Exception as e:  # noqa: BLE001 - retried with the next change or commit
                log.warning("cannot commit attribute changes: %s", e)

    def _lookup_ino(self, parent: int, name: bytes) -> int | None:
        key = (parent, name)
        ino = self.dentries.get(key)
        if ino is None and parent not in self.complete:
            ino = self.meta.lookup(parent, name)
            if ino is not None:
                self.dentries[key] = ino
        return ino

    def _check_name(self, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if not name or b"/" in name or name in (b".", b".."):
            raise _err(errno.EINVAL)

    def _writable(self) -> None:
        if self.readonly:
            raise _err(errno.EROFS)

    def _dir(self, ino: int) -> Inode:
        node = self._node(ino)
        if not stat.S_ISDIR(node.mode):
            raise _err(errno.ENOTDIR)
        return node

    def _view(self, node: Inode) -> Inode:
        """The inode as programs see it: with the size and mtime of uncommitted writes."""
        f = self.files.get(node.ino)
        if f is not None and (f.size != node.size or f.mtime_ns is not None):
            if f.mtime_ns is None:
                return dataclasses.replace(node, size=f.size)
            return dataclasses.replace(node, size=f.size, mtime_ns=f.mtime_ns,
                                       ctime_ns=f.mtime_ns)
        return node

    # -- lookups --------------------------------------------------------------------------
    def getattr(self, ino: int) -> Inode:
        with self.lock:
            return self._view(self._node(ino))

    def st_blocks(self, node: Inode) -> int:
        """512-byte blocks ``node`` takes, like ext4 counts allocated blocks: a directory one
        block; a regular file the chunks it has stored, each counted as its stored size (at
        most the chunk size) rounded up to ALLOC_UNIT, so holes take nothing; uncommitted
        chunks of an open file are added at their plaintext size; other nodes none."""
        if stat.S_ISDIR(node.mode):
            return DIR_SIZE // 512
        if not stat.S_ISREG(node.mode):
            return 0
        with self.lock:
            total = self._alloc.get(node.ino)
            if total is None:
                if len(self._alloc) >= INODE_CACHE_MAX:
                    self._alloc.clear()
                total = self._alloc[node.ino] = self.meta.allocated(node.ino, self.cs, ALLOC_UNIT)
            f = self.files.get(node.ino)
        if f is not None and (f.dirty or f.pending):
            with f.lock:
                for idx, buf in list(f.dirty.items()) + [
                    (i, s.buf) for i, s in f.pending.items() if s.buf is not None
                ]:
                    if idx not in f.refs:
                        total += -(-len(buf) // ALLOC_UNIT) * ALLOC_UNIT
        return total // 512

    def lookup(self, parent: int, name: bytes) -> Inode:
        with self.lock:
            if len(name) > NAME_MAX:
                raise _err(errno.ENAMETOOLONG)
            self._dir(parent)
            if name == b".":
                return self._view(self._node(parent))
            ino = self._lookup_ino(parent, name)
            if ino is None:
                raise _err(errno.ENOENT)
            return self._view(self._node(ino))

    def nlink(self, ino: int) -> int:
        with self.lock:
            node = self.inodes.get(ino) or self.meta.get_inode(ino)
            return node.nlink if node else 0

    def paths_of(self, ino: int) -> list[str]:
        with self.lock:
            return self.meta.paths_of(ino, limit=64)

    def readlink(self, ino: int) -> bytes:
        with self.lock:
            node = self._node(ino)
            if not stat.S_ISLNK(node.mode) or node.target is None:
                raise _err(errno.EINVAL)
            return node.target

    # -- creating -------------------------------------------------------------------------
    def _new(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes | None = None,
        size: int = 0,
        defer: bool = False,
        umask: int = 0,
    ) -> Inode:
        """Create an inode and its entry, committed now, or with ``defer`` written now and
        committed with the next commit (see :meth:`create`). In a directory with a default
        ACL the node inherits it (the mode masks the ACL, the umask is not applied); elsewhere
        ``umask`` is applied to the mode (see :mod:`cryptfs.acl`)."""
        self._writable()
        self._check_name(name)
        pnode = self._dir(parent)
        if self._lookup_ino(parent, name) is not None:
            raise _err(errno.EEXIST)
        if pnode.nlink <= 0:
            raise _err(errno.ENOENT)
        if pnode.mode & stat.S_ISGID:
            gid = pnode.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        isdir = stat.S_ISDIR(mode)
        acls: dict[bytes, bytes] = {}
        default = self._get_xattr(parent, acl.DEFAULT) if not stat.S_ISLNK(mode) else None
        if default is not None:
            mode, access, inherited = acl.inherit(default, mode, isdir)
            acls = {n: v for n, v in ((acl.ACCESS, access), (acl.DEFAULT, inherited)) if v}
            defer = False  # a rollback re-applies deferred inodes, not their xattrs
        elif not stat.S_ISLNK(mode):
            mode &= ~(umask & 0o777)
        node = Inode(0, mode, uid, gid, size, 2 if isdir else 1, now, now, now, rdev, target)
        pnode = dataclasses.replace(pnode, mtime_ns=now, ctime_ns=now,
                                    nlink=pnode.nlink + 1 if isdir else pnode.nlink)
        with self.meta.transaction(commit=not defer):
            node.ino = self.meta.insert_inode(node)
            self.meta.add_dentry(parent, name, node.ino)
            self._save(pnode)
            for n, v in acls.items():
                self.meta.set_xattr(node.ino, n, v)
        if acls:
            self.xattr_inos.add(node.ino)
        self._alloc.pop(node.ino, None)
        if defer:
            self._deferred_new.append((parent, name, node))
            self._defer(pnode)
        self.inodes[parent] = pnode
        self.inodes[node.ino] = node
        self.dentries[(parent, name)] = node.ino
        if isdir:
            self.complete.add(node.ino)  # new and empty: every entry it gets is recorded
        return node

    def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int, umask: int = 0
    ) -> Inode:
        with self.lock:
            fmt = stat.S_IFMT(mode) or stat.S_IFREG
            if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
                raise _err(errno.EINVAL)
            return self._new(parent, name, fmt | stat.S_IMODE(mode), uid, gid, rdev=rdev,
                             umask=umask)

    def mkdir(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, umask: int = 0
    ) -> Inode:
        with self.lock:
            return self._new(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid, umask=umask)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        with self.lock:
            if len(target) > 4095:
                raise _err(errno.ENAMETOOLONG)
            return self._new(
                parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target, size=len(target)
            )

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int, umask: int = 0
    ) -> tuple[Inode, int]:
        """Create (or open) a regular file. A new file is committed with its close, the next
        commit, or within COMMIT_DELAY, whichever comes first: one commit per small file
        instead of two."""
        with self.lock:
            ino = self._lookup_ino(parent, name)
            if ino is None:
                node = self._new(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid,
                                 defer=True, umask=umask)
                return self._view(node), self._open_locked(node, flags)
            if flags & os.O_EXCL:
                raise _err(errno.EEXIST)
        fh = self.open(ino, flags)  # outside self.lock: O_TRUNC takes the file lock first
        return self.getattr(ino), fh

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        with self.lock:
            self._writable()
            self._check_name(name)
            node = self._node(ino)
            if stat.S_ISDIR(node.mode):
                raise _err(errno.EPERM)
            pnode = self._dir(parent)
            if self._lookup_ino(parent, name) is not None:
                raise _err(errno.EEXIST)
            now = time.time_ns()
            with self.meta.transaction():
                self.meta.add_dentry(parent, name, ino)
                node.nlink += 1
                node.ctime_ns = now
                self._save(node)
                pnode.mtime_ns = pnode.ctime_ns = now
                self._save(pnode)
            self.dentries[(parent, name)] = ino
            return self._view(node)

    # -- removing -------------------------------------------------------------------------
    def _drop_link(self, node: Inode, now: int) -> None:
        """One directory entry of ``node`` is gone (in the caller's transaction)."""
        node.nlink -= 1
        node.ctime_ns = now
        if node.nlink <= 0 and node.ino not in self.files:
            self.meta.delete_inode(node.ino)
            self.inodes.pop(node.ino, None)
        else:
            self._save(node)

    def unlink(self, parent: int, name: bytes) -> None:
        with self.lock:
            self._writable()
            pnode = self._dir(parent)
            ino = self._lookup_ino(parent, name)
            if ino is None:
                raise _err(errno.ENOENT)
            node = self._node(ino)
            if stat.S_ISDIR(node.mode):
                raise _err(errno.EISDIR)
            now = time.time_ns()
            with self.meta.transaction():
                self.meta.remove_dentry(parent, name)
                if name.startswith(HIDDEN):  # already counted as unlinked
                    node.nlink += 1
                else:
                    pnode.mtime_ns = pnode.ctime_ns = now
                    self._save(pnode)
                self._drop_link(node, now)
            self.dentries.pop((parent, name), None)

    def rmdir(self, parent: int, name: bytes) -> None:
        with self.lock:
            self._writable()
            if name == b".":
                raise _err(errno.EINVAL)
            pnode = self._dir(parent)
            ino = self._lookup_ino(parent, name)
            if ino is None:
                raise _err(errno.ENOENT)
            node = self._dir(ino)
            if self.meta.has_children(ino, HIDDEN):
                raise _err(errno.ENOTEMPTY)
            now = time.time_ns()
            with self.meta.transaction():
                self._drop_hidden(ino)
                self.meta.remove_dentry(parent, name)
                pnode.nlink -= 1
                pnode.mtime_ns = pnode.ctime_ns = now
                self._save(pnode)
                node.nlink = 0
                self.meta.delete_inode(ino)
            self.inodes.pop(ino, None)
            self.dentries.pop((parent, name), None)
            self.complete.discard(ino)

    def _drop_hidden(self, dir_ino: int) -> None:
        """Remove the hidden entries of a directory that is going away (in a transaction)."""
        for _p, name, ino in self.meta.hidden_dentries(HIDDEN):
            if _p != dir_ino:
                continue
            self.meta.remove_dentry(dir_ino, name)
            self.dentries.pop((dir_ino, name), None)
            node = self._node(ino)
            node.nlink += 1
            self._drop_link(node, time.time_ns())

    def recover(self) -> int:
        """After a crash: drop hidden entries and inodes that no name refers to."""
        with self.lock, self.meta.transaction():
            hidden = self.meta.hidden_dentries(HIDDEN)
            for parent, name, _ino in hidden:
                self.meta.remove_dentry(parent, name)
            orphans = self.meta.orphan_inodes()
            for ino in orphans:
                self.meta.delete_inode(ino)
            self.inodes.clear()
            self.dentries.clear()
            self.complete.clear()
        return len(hidden) + len(orphans)

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """True if directory ``anc`` is ``ino`` or one of its ancestors."""
        seen = set()
        while ino not in seen:
            if ino == anc:
                return True
            if ino == ROOT_INO:
                return False
            seen.add(ino)
            row = self.meta.conn.exec_driver_sql(
                "SELECT parent FROM dentries WHERE ino = ? LIMIT 1", (ino,)
            ).first()
            if row is None:
                return False
            ino = row[0]
        return False

    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0) -> None:
        with self.lock:
            self._writable()
            self._check_name(n2)
            if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
                RENAME_NOREPLACE | RENAME_EXCHANGE
            ):
                raise _err(errno.EINVAL)
            pn1, pn2 = self._dir(p1), self._dir(p2)
            src = self._lookup_ino(p1, n1)
            if src is None:
                raise _err(errno.ENOENT)
            snode = self._node(src)
            dst = self._lookup_ino(p2, n2)
            dnode = self._node(dst) if dst is not None else None
            sdir = stat.S_ISDIR(snode.mode)
            if flags & RENAME_EXCHANGE:
                if dnode is None:
                    raise _err(errno.ENOENT)
                return self._exchange(pn1, n1, snode, pn2, n2, dnode)
            if dnode is not None and flags & RENAME_NOREPLACE:
                raise _err(errno.EEXIST)
            if sdir and p1 != p2 and self._is_ancestor(src, p2):
                raise _err(errno.EINVAL)
            if dnode is not None:
                if dnode.ino == snode.ino:
                    return None
                ddir = stat.S_ISDIR(dnode.mode)
                if sdir and not ddir:
                    raise _err(errno.ENOTDIR)
                if ddir and not sdir:
                    raise _err(errno.EISDIR)
                if ddir and self.meta.has_children(dnode.ino, HIDDEN):
                    raise _err(errno.ENOTEMPTY)
            now = time.time_ns()
            with self.meta.transaction():
                if dnode is not None:
                    self.meta.remove_dentry(p2, n2)
                    if stat.S_ISDIR(dnode.mode):
                        pn2.nlink -= 1
                        self._drop_hidden(dnode.ino)
                        self.meta.delete_inode(dnode.ino)
                        self.inodes.pop(dnode.ino, None)
                    else:
                        self._drop_link(dnode, now)
                self.meta.remove_dentry(p1, n1)
                self.meta.add_dentry(p2, n2, src)
                if sdir and p1 != p2:
                    pn1.nlink -= 1
                    pn2.nlink += 1
                if n2.startswith(HIDDEN) and not n1.startswith(HIDDEN):
                    snode.nlink -= 1  # libfuse hiding a file unlinked while open
                snode.ctime_ns = now
                self._save(snode)
                for pn in {p1: pn1, p2: pn2}.values():
                    pn.mtime_ns = pn.ctime_ns = now
                    self._save(pn)
            self.dentries.pop((p1, n1), None)
            self.dentries[(p2, n2)] = src
            return None

    def _exchange(self, pn1: Inode, n1: bytes, a: Inode, pn2: Inode, n2: bytes, b: Inode) -> None:
        adir, bdir = stat.S_ISDIR(a.mode), stat.S_ISDIR(b.mode)
        if pn1.ino != pn2.ino and (
            (adir and self._is_ancestor(a.ino, pn2.ino))
            or (bdir and self._is_ancestor(b.ino, pn1.ino))
        ):
            raise _err(errno.EINVAL)
        now = time.time_ns()
        with self.meta.transaction():
            self.meta.remove_dentry(pn1.ino, n1)
            self.meta.remove_dentry(pn2.ino, n2)
            self.meta.add_dentry(pn1.ino, n1, b.ino)
            self.meta.add_dentry(pn2.ino, n2, a.ino)
            if pn1.ino != pn2.ino and adir != bdir:
                delta = 1 if adir else -1
                pn1.nlink -= delta
                pn2.nlink += delta
            for n in (a, b):
                n.ctime_ns = now
                self._save(n)
            for pn in {pn1.ino: pn1, pn2.ino: pn2}.values():
                pn.mtime_ns = pn.ctime_ns = now
                self._save(pn)
        self.dentries[(pn1.ino, n1)] = b.ino
        self.dentries[(pn2.ino, n2)] = a.ino

    # -- attributes -----------------------------------------------------------------------
    def chmod(self, ino: int, mode: int) -> Inode:
        with self.lock:
            self._writable()
            node = self._node(ino)
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            node.ctime_ns = time.time_ns()
            access = self._get_xattr(ino, acl.ACCESS)
            if access is None:
                self._save_later(node)
            else:  # the ACL's owner, mask and other entries follow the mode
                with self.meta.transaction():
                    self.meta.set_xattr(ino, acl.ACCESS, acl.chmod(access, node.mode))
                    self._save(node)
            return self._view(node)

    def chown(self, ino: int, uid: int, gid: int) -> Inode:
        with self.lock:
            self._writable()
            node = self._node(ino)
            if uid != -1 and uid != 0xFFFFFFFF:
                node.uid = uid
            if gid != -1 and gid != 0xFFFFFFFF:
                node.gid = gid
            if not stat.S_ISDIR(node.mode):
                # like the kernel for unprivileged chown: drop set-user-ID/set-group-ID bits
                node.mode &= ~stat.S_ISUID
                if node.mode & stat.S_IXGRP:
                    node.mode &= ~stat.S_ISGID
            node.ctime_ns = time.time_ns()
            self._save_later(node)
            return self._view(node)

    def utimens(self, ino: int, atime_ns: int | None, mtime_ns: int | None) -> Inode:
        """Set times; ``None`` leaves a time unchanged (UTIME_OMIT is resolved by the caller)."""
        with self.lock:
            self._writable()
            node = self._node(ino)
            f = self.files.get(ino)
            if f is not None and f.mtime_ns is not None:
                node.mtime_ns = f.mtime_ns  # an earlier write's time, unless set below
                f.mtime_ns = None
            if atime_ns is not None:
                node.atime_ns = atime_ns
            if mtime_ns is not None:
                node.mtime_ns = mtime_ns
            node.ctime_ns = time.time_ns()
            self._save_later(node)
            return self._view(node)

    # -- xattrs ---------------------------------------------------------------------------
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        with self.lock:
            self._writable()
            if name in acl.NAMES:
                return self._set_acl(ino, name, value, flags)
            if name.startswith(b"system."):
                raise _err(errno.EOPNOTSUPP)
            if len(name) > 255 or not name:
                raise _err(errno.ERANGE)
            if len(value) > XATTR_SIZE_MAX:
                raise _err(errno.E2BIG)
            node = self._node(ino)
            old = self.meta.get_xattr(ino, name)
            if flags & XATTR_CREATE and old is not None:
                raise _err(errno.EEXIST)
            if flags & XATTR_REPLACE and old is None:
                raise _err(errno.ENODATA)
            with self.meta.transaction():
                self.meta.set_xattr(ino, name, value)
                self.xattr_inos.add(ino)
                node.ctime_ns = time.time_ns()
                self._save(node)

    def _get_xattr(self, ino: int, name: bytes) -> bytes | None:
        """An xattr's value or None (caller holds self.lock); no SQL for inodes without any."""
        if ino not in self.xattr_inos:
            return None
        return self.meta.get_xattr(ino, name)

    def _set_acl(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        """Set a POSIX ACL (caller holds self.lock). An access ACL also sets the mode's
        permission bits, and is not stored when the mode says it all; a default ACL is for
        directories only (see :mod:`cryptfs.acl`)."""
        node = self._node(ino)
        if stat.S_ISLNK(node.mode):
            raise _err(errno.EOPNOTSUPP)
        old = self._get_xattr(ino, name)
        if flags & XATTR_CREATE and old is not None:
            raise _err(errno.EEXIST)
        if flags & XATTR_REPLACE and old is None:
            raise _err(errno.ENODATA)
        store: bytes | None
        if name == acl.DEFAULT:
            if not stat.S_ISDIR(node.mode):
                raise _err(errno.EACCES)
            acl.parse(value)
            store = value
        else:
            node.mode, store = acl.update_mode(value, node.mode)
        with self.meta.transaction():
            if store is None:
                self.meta.remove_xattr(ino, name)
            else:
                self.meta.set_xattr(ino, name, store)
                self.xattr_inos.add(ino)
            node.ctime_ns = time.time_ns()
            self._save(node)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino not in self.xattr_inos:
            raise _err(errno.ENODATA)
        with self.lock:
            self._node(ino)
            v = self.meta.get_xattr(ino, name)
            if v is None:
                raise _err(errno.ENODATA)
            return v

    def listxattr(self, ino: int) -> list[bytes]:
        if ino not in self.xattr_inos:
            return []
        with self.lock:
            self._node(ino)
            return self.meta.list_xattrs(ino)

    def removexattr(self, ino: int, name: bytes) -> None:
        with self.lock:
            self._writable()
            node = self._node(ino)
            with self.meta.transaction():
                if not self.meta.remove_xattr(ino, name):
                    raise _err(errno.ENODATA)
                if not self.meta.list_xattrs(ino):
                    self.xattr_inos.discard(ino)
                node.ctime_ns = time.time_ns()
                self._save(node)

    # -- directories ----------------------------------------------------------------------
    def opendir(self, ino: int) -> int:
        with self.lock:
            self._dir(ino)
            return self._add_handle(Handle(None, 0))

    def readdir(self, ino: int, fh: int, offset: int) -> list[tuple[bytes, int, int, int]]:
        """Entries from ``offset`` on as ``(name, ino, mode, next_offset)``. The listing is
        taken when a stream starts at offset 0 and kept for that handle."""
        with self.lock:
            h = self.handles.get(fh)
            if h is None or h.listing is None or offset == 0:
                node = self._dir(ino)
                parent = ROOT_INO
                if ino != ROOT_INO:
                    row = self.meta.conn.exec_driver_sql(
                        "SELECT parent FROM dentries WHERE ino = ? LIMIT 1", (ino,)
                    ).first()
                    parent = row[0] if row else ROOT_INO
                listing = [
                    (b".", ino, node.mode),
                    (b"..", parent, stat.S_IFDIR),
                ] + [e for e in self.meta.list_dir(ino) if not e[0].startswith(HIDDEN)]
                if h is not None:
                    h.listing = listing
            else:
                listing = h.listing
            return [(n, i, m, k + 1) for k, (n, i, m) in enumerate(listing) if k >= offset]

    def releasedir(self, fh: int) -> None:
        with self.lock:
            self.handles.pop(fh, None)

    # -- files ----------------------------------------------------------------------------
    def _add_handle(self, h: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return fh

    def _open_locked(self, node: Inode, flags: int) -> int:
        if stat.S_ISDIR(node.mode):
            raise _err(errno.EISDIR)
        if self.readonly and flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise _err(errno.EROFS)
        f = self.files.get(node.ino)
        if f is None:
            f = self.files[node.ino] = OpenFile(node.ino, node.size)
        f.handles += 1
        return self._add_handle(Handle(f, flags))

    def open(self, ino: int, flags: int) -> int:
        """Open a file; O_TRUNC truncates it (libfuse 3 passes it through: atomic_o_trunc)."""
        with self.lock:
            fh = self._open_locked(self._node(ino), flags)
        if flags & os.O_TRUNC:
            try:
                self.truncate(ino, 0, fh)
            except OSError:
                self.release(fh)
                raise
        return fh

    def prefetch_siblings(self, parent: int, name: bytes, count: int = 32) -> None:
        """Programs that read a tree (tar, cp -r, rsync) open a directory's files in order:
        start fetching (and opening) the first chunks of the next ``count`` files, to overlap a
        remote store's requests, or the local disk's latency (a cold tree's objects lie
        scattered over the store's directories) and the decryption. The window slides: it is
        refilled once the reader is past its middle."""
        with self.lock:
            trigger = self._prefetched.get(parent)
            if trigger is not None and name < trigger:
                return  # most of the window fetched before still lies ahead of the reader
            rows = self.meta.raw.execute(_SQL_NEXT_FIRST_CHUNKS, (parent, name, count)).fetchall()
            if rows:
                self._prefetched[parent] = bytes(rows[len(rows) // 2][0])
        self.chunks.prefetch([ChunkRef(o, z, bytes(h)) for _n, o, z, h in rows])

    def _file(self, fh: int) -> OpenFile:
        h = self.handles.get(fh)
        if h is None or h.file is None:
            raise _err(errno.EBADF)
        return h.file

    def _ref(self, f: OpenFile, idx: int) -> ChunkRef | None:
        """The sealed or committed chunk ``idx`` of an open file (caller holds f.lock)."""
        s = f.pending.get(idx)
        if s is not None:
            return self._sealed(s)
        w = idx // REF_WINDOW
        if w not in f.loaded:
            with self.lock:
                f.refs.update(self.meta.get_blocks(f.ino, w * REF_WINDOW, (w + 1) * REF_WINDOW))
            f.loaded.add(w)
        return f.refs.get(idx)

    @staticmethod
    def _sealed(s: Sealing) -> ChunkRef | None:
        try:
            return s.ref()
        except CryptfsError as e:
            log.error("cannot store data: %s", e)
            raise _err(errno.ENOSPC if "space" in str(e) else errno.EIO) from None

    def _plain(self, f: OpenFile, idx: int) -> bytes:
        s = f.pending.get(idx)
        if s is not None and s.buf is not None:
            return bytes(s.buf)  # still sealing (or failed): the plaintext is here
        ref = self._ref(f, idx)
        if ref is None:
            return b""
        return self._get_chunk(f.ino, ref)

    def _get_chunk(self, ino: int, ref: ChunkRef, keep: bool = True) -> bytes:
        try:
            return self.chunks.get(ref, keep)
        except CryptfsError as e:
            self.read_errors += 1
            with self.lock:
                paths = self.meta.paths_of(ino) or [f"<inode {ino}>"]
            kind = "integrity" if isinstance(e, IntegrityError) else "store"
            log.error("read of %s failed (%s error): %s", ", ".join(paths), kind, e)
            raise _err(errno.EIO) from None

    def read(self, fh: int, offset: int, size: int) -> bytes:
        f = self._file(fh)
        cs = self.cs
        parts: list[bytes | ChunkRef | None] = []
        with f.lock:
            end = min(offset + size, f.size)
            if offset >= end:
                return b""
            first, last = offset // cs, (end - 1) // cs
            for idx in range(first, last + 1):
                buf = f.dirty.get(idx)
                if buf is None and idx in f.pending:
                    buf = f.pending[idx].buf
                parts.append(bytes(buf) if buf is not None else self._ref(f, idx))
            sequential = offset == f.last_read_end
            # part of a stream, also when the kernel's parallel read-ahead requests arrive out
            # of order: a big file read that way does not enter the disk cache
            window = self.chunks.readahead * cs
            streaming = f.last_read_end >= 0 and abs(offset - f.last_read_end) <= window
            f.last_read_end = end
            keep = not streaming or f.size <= self.chunks.stream_cache_limit
            ahead = []
            if sequential:
                for idx in range(last + 1, last + 1 + self.chunks.readahead):
                    if idx * cs >= f.size:
                        break
                    if idx not in f.dirty:
                        r = self._ref(f, idx)
                        if r is not None:
                            ahead.append(r)
            refs = [p for p in parts if isinstance(p, ChunkRef)]
            self.chunks.pin(r.name for r in refs)
        try:
            if ahead:
                self.chunks.prefetch(ahead, keep)
            pieces = []
            for k, p in enumerate(parts):
                idx = first + k
                plain = self._get_chunk(f.ino, p, keep) if isinstance(p, ChunkRef) else (p or b"")
                lo = max(offset, idx * cs) - idx * cs
                hi = min(end, (idx + 1) * cs) - idx * cs
                pieces.append(plain[lo:hi])
                if len(pieces[-1]) < hi - lo:  # past the chunk's data, within the file: zeros
                    pieces.append(bytes(hi - lo - len(pieces[-1])))
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        finally:
            self.chunks.unpin(r.name for r in refs)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        self._writable()
        f = self._file(fh)
        cs = self.cs
        with f.lock:
            pos = offset
            view = memoryview(data)
            idx = offset // cs
            while view:
                idx, within = divmod(pos, cs)
                n = min(cs - within, len(view))
                buf = f.dirty.get(idx)
                if buf is None:
                    if within == 0 and (n == cs or pos + n >= f.size):
                        buf = bytearray()
                    else:
                        buf = bytearray(self._plain(f, idx))
                        if (idx + 1) * cs > f.size:  # data past EOF is not file content
                            del buf[max(0, f.size - idx * cs) :]
                    f.dirty[idx] = buf
                if len(buf) < within:
                    buf.extend(bytes(within - len(buf)))
                buf[within : within + n] = view[:n]
                pos += n
                view = view[n:]
            f.size = max(f.size, pos)
            f.mtime_ns = time.time_ns()
            # seal complete chunks behind the write position; everything if over the limit
            full = [i for i, b in f.dirty.items() if len(b) == cs and i != idx]
            if full:
                self._seal(f, full)
            if f.dirty_bytes() > DIRTY_LIMIT:
                self._seal(f, list(f.dirty))
        return len(data)

    def _seal(self, f: OpenFile, idxs: list[int]) -> None:
        """Hand dirty chunks to the sealing threads (caller holds f.lock)."""
        for idx in sorted(idxs):
            buf = f.dirty.pop(idx)
            if buf and buf[-1] == 0:  # trailing zeros read back as zeros: not stored
                del buf[len(buf.rstrip(b"\0")):]
            old = f.pending.get(idx)
            if len(buf) < INLINE_SEAL:  # small: a thread hand-off costs more than sealing
                fut: Future[ChunkRef | None] = Future()
                try:
                    fut.set_result(self.chunks.put_or_hole(buf))
                except CryptfsError as e:
                    fut.set_exception(e)
            else:
                fut = self.chunks.put_async(buf)
            f.pending[idx] = Sealing(buf, fut)
            if old is not None:
                self._unpin_later(old)

    def _unpin_later(self, s: Sealing) -> None:
        def done(fut: Future[ChunkRef | None]) -> None:
            if fut.exception() is None and fut.result() is not None:
                self.chunks.unpin([fut.result().name])  # type: ignore[union-attr]

        s.fut.add_done_callback(done)

    def _commit(self, f: OpenFile) -> None:
        """Seal all dirty chunks and commit the chunk map and size (caller holds f.lock).
        If a chunk cannot be stored, its data goes back to the dirty buffers and the error
        is raised (ENOSPC or EIO), so a later flush can retry."""
        if f.dirty:
            self._seal(f, list(f.dirty))
        if not f.pending and f.mtime_ns is None:
            return
        refs: dict[int, ChunkRef | None] = {}
        failed: CryptfsError | None = None
        for idx, s in list(f.pending.items()):
            try:
                refs[idx] = s.ref()
            except CryptfsError as e:
                failed = e
                del f.pending[idx]
                if s.buf is not None:
                    f.dirty.setdefault(idx, s.buf)
        if failed is not None:  # the chunks that did seal stay pending for the retry
            log.error("cannot store data of inode %d: %s", f.ino, failed)
            raise _err(errno.ENOSPC if "space" in str(failed) else errno.EIO)
        with self.lock:
            node = self.inodes.get(f.ino) or self.meta.get_inode(f.ino)
            if node is None:  # removed meanwhile
                self._discard(f)
                return
            with self.meta.transaction():
                if self.before_commit is not None:
                    self.before_commit()
                for idx, ref in refs.items():
                    if idx * self.cs < f.size:
                        self.meta.set_block(f.ino, idx, ref, staged=self.chunks.remote)
                        if ref is None:
                            f.refs.pop(idx, None)
                        else:
                            f.refs[idx] = ref
                node.size = f.size
                if f.mtime_ns is not None:
                    node.mtime_ns = node.ctime_ns = f.mtime_ns
                self._save(node)
            self.inodes[f.ino] = node
            self._alloc.pop(f.ino, None)
        self.chunks.unpin(r.name for r in refs.values() if r is not None)
        f.pending.clear()
        f.mtime_ns = None

    def _discard(self, f: OpenFile) -> None:
        for s in f.pending.values():
            self._unpin_later(s)
        f.pending.clear()
        f.dirty.clear()

    def truncate(self, ino: int, size: int, fh: int | None = None) -> Inode:
        self._writable()
        if size < 0:
            raise _err(errno.EINVAL)
        with self.lock:
            node = self._node(ino)
            if stat.S_ISDIR(node.mode):
                raise _err(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise _err(errno.EINVAL)
            temp = ino not in self.files
            fh_t = self._open_locked(node, os.O_RDWR) if temp else None
            f = self.files[ino]
        try:
            with f.lock:
                cs = self.cs
                if size < f.size:
                    keep = (size + cs - 1) // cs  # chunks 0..keep-1 hold data
                    for idx in [i for i in f.dirty if i >= keep]:
                        del f.dirty[idx]
                    for idx in [i for i in f.pending if i >= keep]:
                        self._unpin_later(f.pending.pop(idx))
                    with self.lock, self.meta.transaction():
                        self.meta.remove_blocks_from(ino, keep)
                    for idx in [i for i in f.refs if i >= keep]:
                        del f.refs[idx]
                    if size % cs:
                        idx = size // cs
                        buf = f.dirty.get(idx)
                        if buf is None:
                            buf = bytearray(self._plain(f, idx))
                        del buf[size % cs :]
                        f.dirty[idx] = buf
                f.size = size
                f.mtime_ns = time.time_ns()
                self._commit(f)
        finally:
            if fh_t is not None:
                self.release(fh_t)
        with self.lock:
            return self._view(self._node(ino))

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2). Mode 0 extends the size; no space is reserved in advance (the store
        takes space as data arrives), so KEEP_SIZE alone changes nothing. PUNCH_HOLE (with
        KEEP_SIZE, as Linux requires) and ZERO_RANGE zero the range: chunks it covers become
        holes (nothing stored), partly covered ones are rewritten with zeros; ZERO_RANGE
        without KEEP_SIZE extends the size. COLLAPSE_RANGE, INSERT_RANGE and other modes:
        EOPNOTSUPP (the FUSE kernel module refuses them before they get here anyway)."""
        self._writable()
        if offset < 0 or length <= 0:
            raise _err(errno.EINVAL)
        keep = mode & FALLOC_FL_KEEP_SIZE
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise _err(errno.EOPNOTSUPP)
        if mode & FALLOC_FL_PUNCH_HOLE and (not keep or mode & FALLOC_FL_ZERO_RANGE):
            raise _err(errno.EOPNOTSUPP)
        f = self._file(fh)
        end = offset + length
        with f.lock:
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                self._zero(f, offset, min(end, f.size))
            elif keep or end <= f.size:
                return
            if not keep and end > f.size:
                f.size = end
            f.mtime_ns = time.time_ns()
            self._commit(f)

    def _zero(self, f: OpenFile, lo: int, hi: int) -> None:
        """Zero bytes ``lo..hi`` (within the size) of an open file (caller holds f.lock):
        chunks wholly inside become holes at once, the partly covered ones at either end get
        zeros in their dirty buffers (committed by the caller)."""
        if lo >= hi:
            return
        cs = self.cs
        full_lo = -(-lo // cs)
        full_hi = -(-hi // cs) if hi >= f.size else hi // cs  # the last chunk ends at EOF
        if full_lo < full_hi:
            for idx in [i for i in f.dirty if full_lo <= i < full_hi]:
                del f.dirty[idx]
            for idx in [i for i in f.pending if full_lo <= i < full_hi]:
                self._unpin_later(f.pending.pop(idx))
            with self.lock, self.meta.transaction():
                self.meta.remove_blocks_range(f.ino, full_lo, full_hi)
            for idx in [i for i in f.refs if full_lo <= i < full_hi]:
                del f.refs[idx]
            self._alloc.pop(f.ino, None)
        for idx in sorted({lo // cs, (hi - 1) // cs}):
            if full_lo <= idx < full_hi:
                continue
            buf = f.dirty.get(idx)
            if buf is None:
                buf = bytearray(self._plain(f, idx))
                del buf[max(0, f.size - idx * cs):]  # data past EOF is not file content
            a = max(lo, idx * cs) - idx * cs
            b = min(hi, (idx + 1) * cs) - idx * cs
            if a < len(buf):
                buf[a:b] = bytes(min(b, len(buf)) - a)
                f.dirty[idx] = buf

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE. A hole is a chunk with nothing stored, or the rest of a
        chunk past its stored bytes (found by reading the chunk before a hole); the end of
        the file is a hole. Uncommitted writes are committed first, as a flush would."""
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise _err(errno.EINVAL)
        f = self._file(fh)
        cs = self.cs
        with f.lock:
            self._commit(f)
            size = f.size
            if offset < 0:
                raise _err(errno.EINVAL)
            if offset >= size:
                raise _err(errno.ENXIO)
            idx = offset // cs
            if whence == SEEK_DATA:
                while True:
                    with self.lock:
                        d = self.meta.next_block(f.ino, idx)
                    if d is None or d * cs >= size:
                        raise _err(errno.ENXIO)
                    if d * cs > offset:  # a stored chunk holds at least one byte
                        return d * cs
                    if offset < d * cs + len(self._plain(f, d)):
                        return offset
                    idx = d + 1
            with self.lock:
                h = self.meta.next_hole(f.ino, idx)
            hole = h * cs
            if h > idx:  # the chunk before the hole may end short
                stored = len(self._plain(f, h - 1))
                if stored < cs:
                    hole = (h - 1) * cs + stored
            return min(max(offset, hole), size)

    def flush(self, fh: int) -> None:
        """Make the file's data survive a crash of this process (see module docstring)."""
        h = self.handles.get(fh)
        if h is None or h.file is None:
            return
        with h.file.lock:
            self._commit(h.file)
        if self._deferred:  # attribute changes made before the close survive it too
            self.commit_deferred()

    def fsync(self, fh: int | None) -> None:
        """Flush, then make everything durable in the store."""
        if fh is not None:
            self.flush(fh)
        self.on_sync()

    def release(self, fh: int) -> None:
        with self.lock:
            h = self.handles.get(fh)
        if h is None or h.file is None:
            return
        f = h.file
        with f.lock:
            try:
                self._commit(f)
            finally:
                with self.lock:
                    self.handles.pop(fh, None)
                    f.handles -= 1
                    if f.handles <= 0:
                        del self.files[f.ino]
                        node = self.inodes.get(f.ino) or self.meta.get_inode(f.ino)
                        if node is not None and node.nlink <= 0:
                            with self.meta.transaction():
                                self.meta.delete_inode(f.ino)
                            self.inodes.pop(f.ino, None)

    def commit_all(self) -> None:
        """Flush every open file (before a snapshot at unmount)."""
        with self.lock:
            files = list(self.files.values())
        for f in files:
            with f.lock:
                self._commit(f)

    def release_all(self) -> None:
        """After unmount: releases the kernel did not deliver are done now, so files unlinked
        while open are deleted before the final snapshot."""
        with self.lock:
            fhs = [fh for fh, h in self.handles.items() if h.file is not None]
        for fh in fhs:
            self.release(fh)
        self.recover()

    # -- filesystem -----------------------------------------------------------------------
    def statfs(self) -> dict[str, int]:
        """A local store: the figures of the filesystem it lives on. A remote store has no
        fixed size: 2**40 blocks free, and the vault's stored chunk bytes used."""
        st = self.statfs_source() if self.statfs_source else None
        bsize = 4096
        if st is not None:
            blocks = st.f_blocks * st.f_frsize // bsize
            bfree = st.f_bfree * st.f_frsize // bsize
            bavail = st.f_bavail * st.f_frsize // bsize
        else:
            bfree = bavail = 1 << 40
            with self.lock:
                blocks = bfree + -(-self.meta.stored_bytes() // bsize)
        with self.lock:
            used = self.meta.count_inodes()
        return {
            "f_bsize": bsize,
            "f_frsize": bsize,
            "f_blocks": blocks,
            "f_bfree": bfree,
            "f_bavail": bavail,
            "f_files": used + (1 << 32),
            "f_ffree": 1 << 32,
            "f_favail": 1 << 32,
            "f_namemax": NAME_MAX,
        }
