"""Attributes, extended attributes (and POSIX ACLs), directory listings and statfs."""

from __future__ import annotations

import errno
import stat
import time

from cryptfs.fs import acl
from cryptfs.fs.base import (
    NAME_MAX,
    XATTR_CREATE,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    FileSystemBase,
    Handle,
    _err,
)
from cryptfs.meta import Inode


class Attributes(FileSystemBase):
    """chmod, chown, utimens (group-committed), xattrs and ACLs, directory listings."""

    # -- attributes -----------------------------------------------------------------------
    def _setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                 gid: int | None = None, atime_ns: int | None = None,
                 mtime_ns: int | None = None) -> Inode:
        """Write an attribute change without committing it (caller holds self.lock): the next
        commit takes it along (the file's flush at close, the next create, an fsync), or the
        committer thread within COMMIT_DELAY. Programs that unpack files set times, owner and
        mode on each before closing it: one commit instead of four.

        On a vault of one machine (an engine that is not ``shared``) the cached inode is the
        row as written (every write to the engine is made and cached under self.lock), so
        the new row is made here and written whole (``update_inode``, as a file's commit
        writes it) instead of by ``set_attrs``, whose one statement also returns the row (in
        SQLite three times the cost of the plain write; a tar extract sets three attributes
        per file). A shared engine sets the given columns on the row as other machines left
        it."""
        node = None if self.meta.shared else self.inodes.get(ino)
        if node is None:
            changed = self.meta.setattr(ino, mode, uid, gid, atime_ns, mtime_ns, commit=False)
            self._apply(changed)
            node = changed.inodes[ino]
        else:
            node = Inode(
                ino, node.mode if mode is None else stat.S_IFMT(node.mode) | (mode & 0o7777),
                node.uid if uid is None else uid, node.gid if gid is None else gid, node.size,
                node.nlink, node.atime_ns if atime_ns is None else atime_ns,
                node.mtime_ns if mtime_ns is None else mtime_ns, time.time_ns(), node.rdev,
                node.target)
            with self.meta.transaction(commit=False):
                self._save(node)
            self.inodes[ino] = node
        self._defer(node)
        return self._view(node)

    def chmod(self, ino: int, mode: int) -> Inode:
        with self.lock:
            self._writable()
            node = self._node(ino)
            access = self._get_xattr(ino, acl.ACCESS)
            if access is None:
                return self._setattr(ino, mode=mode)
            # the ACL's owner, mask and other entries follow the mode
            new = acl.chmod(access, stat.S_IFMT(node.mode) | (mode & 0o7777))
            changed = self.meta.setattr(ino, mode=mode, xattrs={acl.ACCESS: new})
            self._apply(changed)
            return self._view(changed.inodes[ino])

    def chown(self, ino: int, uid: int, gid: int) -> Inode:
        with self.lock:
            self._writable()
            node = self._node(ino)
            mode = None
            if not stat.S_ISDIR(node.mode):
                # like the kernel for unprivileged chown: drop set-user-ID/set-group-ID bits
                mode = node.mode & ~stat.S_ISUID
                if mode & stat.S_IXGRP:
                    mode &= ~stat.S_ISGID
            return self._setattr(ino, mode=mode,
                                 uid=None if uid in (-1, 0xFFFFFFFF) else uid,
                                 gid=None if gid in (-1, 0xFFFFFFFF) else gid)

    def utimens(self, ino: int, atime_ns: int | None, mtime_ns: int | None) -> Inode:
        """Set times; ``None`` leaves a time unchanged (UTIME_OMIT is resolved by the caller)."""
        with self.lock:
            self._writable()
            self._node(ino)
            f = self.files.get(ino)
            if f is not None and f.mtime_ns is not None:
                if mtime_ns is None:
                    mtime_ns = f.mtime_ns  # an earlier write's time, unless set here
                f.mtime_ns = None
            return self._setattr(ino, atime_ns=atime_ns, mtime_ns=mtime_ns)

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
            self._apply(self.meta.setxattr(ino, name, value, flags))
            self.xattr_inos.add(ino)
            return None

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
        mode = None
        if name == acl.DEFAULT:
            if not stat.S_ISDIR(node.mode):
                raise _err(errno.EACCES)
            acl.parse(value)
            store = value
        else:
            mode, store = acl.update_mode(value, node.mode)
        self._apply(self.meta.setattr(ino, mode=mode, xattrs={name: store}))
        if store is not None:
            self.xattr_inos.add(ino)

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
            self._apply(self.meta.removexattr(ino, name))
            if not self.meta.list_xattrs(ino):
                self.xattr_inos.discard(ino)

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
                listing = self.meta.readdir(ino)
                if h is not None:
                    h.listing = listing
            else:
                listing = h.listing
            return [(n, i, m, k + 1) for k, (n, i, m) in enumerate(listing) if k >= offset]

    def releasedir(self, fh: int) -> None:
        with self.lock:
            self.handles.pop(fh, None)

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
