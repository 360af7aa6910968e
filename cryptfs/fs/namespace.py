"""Lookups, creating, removing and renaming (see :mod:`cryptfs.fs.base` for the contract)."""

from __future__ import annotations

import errno
import os
import stat

from cryptfs.fs import acl
from cryptfs.fs.base import (
    ALLOC_UNIT,
    DIR_SIZE,
    INODE_CACHE_MAX,
    NAME_MAX,
    FileSystemBase,
    _err,
)
from cryptfs.meta import Inode

# the lookup that misses the caches for the second time in a directory reads the whole
# directory (names, inodes, allocation: MetaEngine.stat_dir) into them: ls -l, find, tar and
# rsync stat every entry of a directory, one database query per name otherwise. On a vault
# other machines write (``meta.shared``) the first does: there a lookup is round trips to the
# server, three for one name as for a whole directory. Once per directory and mount: read
# again after the caches empty, it would bring in entries nobody asked for at a state the
# bound allows but close-to-open does not (a file another machine committed empty before it
# wrote and closed it, kept in the kernel's attributes after the close's notice).
DIR_SCAN_AFTER = 2
# a listing with whole stats (readdir_stat) reads a directory not in the caches only up to this
# many entries
PLUS_SCAN_MAX = 10_000


class Namespace(FileSystemBase):
    """Lookups, creating, removing and renaming. Each change is one namespace operation of the
    engine (:mod:`cryptfs.meta.namespace`: the POSIX checks, link counts and libfuse's hidden
    entries, against the database in its transaction); this layer adds permissions, ACL and
    umask decisions, the read-only mount, open files (which keep an unlinked inode) and deferred
    creates, and updates its caches from what the engine says changed."""

    def _known(self) -> dict[int, Inode] | None:
        """The rows the engine may take instead of reading them (``known`` of its namespace
        operations): on a vault of one machine the inode cache, since every write to the
        engine is made and cached under self.lock (a rollback's deferred writes are written
        again); None on a shared one (other machines change rows)."""
        return None if self.meta.shared else self.inodes

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
            key = (parent, name)
            ino = self.dentries.get(key)
            if ino is not None:
                return self._view(self._node(ino))
            if parent in self.complete or self._scan(parent):
                ino = self.dentries.get(key)
                if ino is None:
                    raise _err(errno.ENOENT)
                return self._view(self._node(ino))
            # the entry, its inode and its allocation in one query: in FUSE every lookup of
            # the kernel is a getattr, which needs all three
            found = self.meta.lookup_stat(parent, name, self.cs, ALLOC_UNIT)
            if found is None:
                raise _err(errno.ENOENT)
            node = self._cache(found[0])
            self.dentries[key] = node.ino
            if node.ino not in self._alloc:
                self._alloc[node.ino] = found[1]
            return self._view(node)

    def _scan(self, parent: int) -> bool:
        """Count a lookup that missed the caches in ``parent``; at the DIR_SCAN_AFTER-th of
        the mount (the first on a shared vault; once per directory), read the whole directory
        into them (caller holds self.lock). Whether it did (the directory is complete in the
        caches then)."""
        misses = self._misses[parent] = self._misses.get(parent, 0) + 1
        if misses != (1 if self.meta.shared else DIR_SCAN_AFTER):
            return False
        return self._read_dir(parent)

    def _read_dir(self, parent: int) -> bool:
        """Read directory ``parent`` whole into the caches: its entries, their inodes and
        allocations, in one engine call (caller holds self.lock); False, with nothing cached,
        if they would not fit in the inode cache."""
        rows = self.meta.stat_dir(parent, self.cs, ALLOC_UNIT)
        if len(self.inodes) + len(rows) >= INODE_CACHE_MAX:
            return False  # (it would empty the caches)
        for name, node, alloc in rows:
            node = self._cache(node)
            self.dentries[(parent, name)] = node.ino
            self._alloc.setdefault(node.ino, alloc)
        self.complete.add(parent)
        return True

    def readdir_stat(self, ino: int, fh: int, offset: int
                     ) -> list[tuple[bytes, int, int, int, tuple[Inode, int] | None]]:
        """:meth:`readdir`'s entries, each with its node and 512-byte blocks as
        :meth:`getattr` and :meth:`st_blocks` give them (a listing that hands the kernel whole
        stats: FUSE's readdirplus), read with the whole directory in one engine call unless
        the caches hold it. None for ``.`` and ``..``, an entry changed since the listing,
        and every entry of a directory not in the caches that has more than PLUS_SCAN_MAX
        entries (reading all its inodes could cost more than the lookups it saves a listing
        of names) or belongs to a vault other machines write (a listing never reads a
        directory there: see DIR_SCAN_AFTER)."""
        entries = self.readdir(ino, fh, offset)
        with self.lock:
            self._fresh()
            h = self.handles.get(fh)
            total = len(h.listing) if h is not None and h.listing is not None else len(entries)
            if ino not in self.complete and (self.meta.shared or total > PLUS_SCAN_MAX or
                                             not self._read_dir(ino)):
                return [(*e, None) for e in entries]
            out: list[tuple[bytes, int, int, int, tuple[Inode, int] | None]] = []
            for name, child, mode, nxt in entries:
                full = None
                if name not in (b".", b"..") and self.dentries.get((ino, name)) == child:
                    try:
                        node = self._view(self._node(child))
                        full = (node, self.st_blocks(node))
                    except OSError:  # (gone meanwhile)
                        pass
                out.append((name, child, mode, nxt, full))
            return out

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
        ``umask`` is applied to the mode (see :mod:`cryptfs.fs.acl`)."""
        self._writable()
        pnode = self._dir(parent)
        if pnode.mode & stat.S_ISGID:
            gid = pnode.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        isdir = stat.S_ISDIR(mode)
        acls: dict[bytes, bytes] = {}
        default = self._get_xattr(parent, acl.DEFAULT) if not stat.S_ISLNK(mode) else None
        if default is not None:
            mode, access, inherited = acl.inherit(default, mode, isdir)
            acls = {n: v for n, v in ((acl.ACCESS, access), (acl.DEFAULT, inherited)) if v}
            defer = False  # a rollback re-applies deferred inodes, not their xattrs
        elif not stat.S_ISLNK(mode):
            mode &= ~(umask & 0o777)
        changed = self.meta.mknod(parent, name, Inode(0, mode, uid, gid, size, 0, 0, 0, 0, rdev,
                                                      target), acls, commit=not defer,
                                  known=self._known())
        node = changed.inodes[changed.ino]
        if acls:
            self.xattr_inos.add(node.ino)
        self._alloc[node.ino] = 0  # new: no chunks (the stat that follows a create asks)
        self._apply(changed)
        if defer:
            self._deferred_new.append((parent, name, node))
            self._defer(changed.inodes[parent])
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
            changed = self.meta.link(ino, parent, name, known=self._known())
            self._apply(changed)
            return self._view(changed.inodes[ino])

    # -- removing -------------------------------------------------------------------------
    def unlink(self, parent: int, name: bytes) -> None:
        with self.lock:
            self._writable()
            self._apply(self.meta.unlink(parent, name, keep=self.files, known=self._known()))

    def rmdir(self, parent: int, name: bytes) -> None:
        with self.lock:
            self._writable()
            self._apply(self.meta.rmdir(parent, name, keep=self.files))

    def recover(self) -> int:
        """After a crash: drop libfuse's hidden entries and inodes that no name refers to."""
        with self.lock:
            dropped = self.meta.recover()
            self.inodes.clear()
            self.dentries.clear()
            self.complete.clear()
        return dropped

    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0) -> None:
        with self.lock:
            self._writable()
            self._apply(self.meta.rename(p1, n1, p2, n2, flags, keep=self.files))
