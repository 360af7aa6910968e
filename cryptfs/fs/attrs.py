"""Attributes, extended attributes (and POSIX ACLs) and directory listings."""

from __future__ import annotations

import errno
import stat
import time

from cryptfs.fs import acl
from cryptfs.fs.base import (
    XATTR_CREATE,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    FileSystemBase,
    Handle,
    _err,
)
from cryptfs.meta import ROOT_INO, Inode


class Attributes(FileSystemBase):
    """chmod, chown, utimens (group-committed), xattrs and ACLs, directory listings."""

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
        directories only (see :mod:`cryptfs.fs.acl`)."""
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
                    parent = self.meta.parent_of(ino) or ROOT_INO
                listing = [
                    (b".", ino, node.mode),
                    (b"..", parent, stat.S_IFDIR),
                ] + [e for e in self.meta.list_dir(ino) if not self._libfuse_hidden(e[1], e[0])]
                if h is not None:
                    h.listing = listing
            else:
                listing = h.listing
            return [(n, i, m, k + 1) for k, (n, i, m) in enumerate(listing) if k >= offset]

    def releasedir(self, fh: int) -> None:
        with self.lock:
            self.handles.pop(fh, None)
