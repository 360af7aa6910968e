"""Lookups, creating, removing and renaming (see :mod:`cryptfs.fs.base` for the contract)."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import time

from cryptfs.fs import acl
from cryptfs.fs.base import (
    ALLOC_UNIT,
    DIR_SIZE,
    HIDDEN,
    INODE_CACHE_MAX,
    NAME_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    FileSystemBase,
    _err,
)
from cryptfs.meta import ROOT_INO, Inode


class Namespace(FileSystemBase):
    """Lookups, creating, removing and renaming; each namespace change one transaction."""

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
        ``umask`` is applied to the mode (see :mod:`cryptfs.fs.acl`)."""
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
                hidden = self._libfuse_hidden(ino, name)
                self.meta.remove_dentry(parent, name)
                if hidden:  # already counted as unlinked
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
            if self._has_children(ino):
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

    def _libfuse_hidden(self, ino: int, name: bytes) -> bool:
        """Whether an entry is one libfuse made for a file unlinked while open (renamed to a
        hidden name): such an entry does not count as a link (the rename took one off), so
        the inode has more names than links. A user's file whose name merely begins the same
        way counts like any other name."""
        if not name.startswith(HIDDEN):
            return False
        return len(self.meta.names_of(ino)) > self._node(ino).nlink

    def _has_children(self, dir_ino: int) -> bool:
        """Whether a directory holds an entry other than libfuse's hidden ones."""
        if self.meta.has_children(dir_ino, HIDDEN):
            return True
        return any(p == dir_ino and not self._libfuse_hidden(ino, name)
                   for p, name, ino in self.meta.hidden_dentries(HIDDEN))

    def _drop_hidden(self, dir_ino: int) -> None:
        """Remove libfuse's hidden entries of a directory that is going away (in a
        transaction; the directory holds nothing else)."""
        for _p, name, ino in self.meta.hidden_dentries(HIDDEN):
            if _p != dir_ino:
                continue
            self.meta.remove_dentry(dir_ino, name)
            self.dentries.pop((dir_ino, name), None)
            node = self._node(ino)
            node.nlink += 1
            self._drop_link(node, time.time_ns())

    def recover(self) -> int:
        """After a crash: drop libfuse's hidden entries and inodes that no name refers to."""
        with self.lock, self.meta.transaction():
            hidden = [(p, n) for p, n, i in self.meta.hidden_dentries(HIDDEN)
                      if self._libfuse_hidden(i, n)]
            for parent, name in hidden:
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
            parent = self.meta.parent_of(ino)
            if parent is None:
                return False
            ino = parent
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
                if ddir and self._has_children(dnode.ino):
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
                    # libfuse hiding a file unlinked while open (not "src in self.files": its
                    # release may have reached us before libfuse, racing, decided to hide it)
                    snode.nlink -= 1
                snode.ctime_ns = now
                self._save(snode)
                for pn in {p1: pn1, p2: pn2}.values():
                    pn.mtime_ns = pn.ctime_ns = now
                    self._save(pn)
            self.dentries.pop((p1, n1), None)
            self.dentries[(p2, n2)] = src
            return None

    def _exchange(self, pn1: Inode, n1: bytes, a: Inode, pn2: Inode, n2: bytes, b: Inode) -> None:
        if a.ino == b.ino:
            return  # two names of one inode (or one name twice): swapping changes nothing
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
