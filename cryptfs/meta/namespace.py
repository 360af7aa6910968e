"""The namespace operations of every metadata engine, written once over its row-level primitives.

Each operation (:meth:`NamespaceOps.mknod`, ``link``, ``unlink``, ``rmdir``, ``rename``,
``setattr``, ``setxattr``, ``removexattr``, ``readdir``, ``drop_unlinked``, ``recover``) is one
atomic unit run by :meth:`NamespaceOps.atomically`: it reads, inside the transaction, every row
its POSIX checks need (the hot ones through compound row primitives such as
:meth:`NamespaceOps.touch_inode`, which write a row and return it, and which an engine may do
in one statement each; a row the caller passes in ``known`` instead, where an operation takes
that, and only on an engine that is not ``shared``: see :meth:`NamespaceOps.mknod`), raises
``OSError(errno)`` (EEXIST, ENOENT, ENOTDIR, EISDIR, ENOTEMPTY, EINVAL, EPERM, ENODATA,
ENAMETOOLONG) with nothing written, keeps link counts and the parents' times, and returns a
:class:`~cryptfs.meta.engine.Changed` that says what the layer above must update in its caches.
Durability is the engine's: a call returns once its transaction committed (with
``commit=False``: written, committed with the next commit); a call that raises rolled back
whole.

An engine gets the operations by inheriting :class:`NamespaceOps` (the SQLite engine does); an
engine whose transactions can fail for conflicts between clients (PostgreSQL's serialization
failures) overrides :meth:`NamespaceOps.atomically` to run the operation again in a new
transaction: every operation re-reads what it checks, so running it again is safe.

libfuse's hidden entries: libfuse's high-level API renames a file unlinked while it is open to a
name starting with :data:`HIDDEN` and unlinks that name at release. Such a rename always takes a
link off (the release can reach the filesystem before libfuse, racing, decides to hide the
file), so an entry is libfuse-hidden iff its name starts with HIDDEN and its inode has more names
than links; hidden entries do not count as links, are not listed and do not keep a directory
from being removed. A user's file whose name merely begins the same way counts like any other.

Longer than ~400 lines: every namespace operation with its POSIX checks, written once for
every engine; splitting it would split the rules an operation must keep together.
"""

from __future__ import annotations

import errno
import stat
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, TypeVar

from cryptfs.errors import os_error
from cryptfs.meta.engine import ROOT_INO, Changed, Inode

if TYPE_CHECKING:
    from cryptfs.meta.engine import MetaEngine as _Rows
else:
    _Rows = object

NAME_MAX = 255
HIDDEN = b".fuse_hidden"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2

T = TypeVar("T")


def check_name(name: bytes) -> None:
    """ENAMETOOLONG or EINVAL unless ``name`` can be a directory entry."""
    if len(name) > NAME_MAX:
        raise os_error(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise os_error(errno.EINVAL)


class _Op:
    """The rows one operation read and changed: each inode read once, so that two roles of one
    inode (both parents of a rename within a directory) share one record."""

    def __init__(self, rows: _Rows) -> None:
        self.rows = rows
        self.now = time.time_ns()
        self.read: dict[int, Inode] = {}
        self.out = Changed()

    def node(self, ino: int) -> Inode:
        node = self.read.get(ino)
        if node is None:
            node = self.rows.get_inode(ino)
            if node is None:
                raise os_error(errno.ENOENT)
            self.read[ino] = node
        return node

    def dir(self, ino: int) -> Inode:
        node = self.node(ino)
        if not stat.S_ISDIR(node.mode):
            raise os_error(errno.ENOTDIR)
        return node

    def named(self, parent: int, name: bytes) -> tuple[Inode, Inode]:
        """The directory ``parent`` and the inode ``name`` names in it (ENOENT: none)."""
        pnode = self.dir(parent)
        ino = self.rows.lookup(parent, name)
        if ino is None:
            raise os_error(errno.ENOENT)
        return pnode, self.node(ino)

    def touch(self, node: Inode, mtime: bool = False) -> None:
        """``node`` changed: ctime (and with ``mtime`` the mtime) now; written by :meth:`save`."""
        node.ctime_ns = self.now
        if mtime:
            node.mtime_ns = self.now
        self.out.inodes[node.ino] = node

    def save(self) -> Changed:
        for ino, node in self.out.inodes.items():
            if ino not in self.out.removed:
                self.rows.update_inode(node)
        for ino in self.out.removed:
            self.out.inodes.pop(ino, None)
        return self.out

    def entry(self, parent: int, name: bytes, ino: int | None) -> None:
        if ino is None:
            self.rows.remove_dentry(parent, name)
        else:
            self.rows.add_dentry(parent, name, ino)
        self.out.entries[(parent, name)] = ino

    def delete(self, ino: int) -> None:
        self.rows.delete_inode(ino)
        self.out.removed.add(ino)

    def drop_link(self, node: Inode, keep: Collection[int], counted: bool = True) -> None:
        """One name of ``node`` is gone (``counted``: one that was a link, not a hidden one);
        the inode goes with its last link unless it is in ``keep`` (open here) or another
        machine holds it open (:meth:`MetaEngine.held`)."""
        if counted:
            node.nlink -= 1
        self.touch(node)
        if node.nlink <= 0 and node.ino not in keep and not self.rows.held(node.ino):
            self.delete(node.ino)

    def hidden(self, ino: int, name: bytes) -> bool:
        """Whether ``(…, name) -> ino`` is one of libfuse's hidden entries (module docstring)."""
        if not name.startswith(HIDDEN):
            return False
        return len(self.rows.names_of(ino)) > self.node(ino).nlink

    def hidden_children(self, dir_ino: int) -> list[tuple[bytes, int]] | None:
        """The entries of a directory if all are libfuse-hidden (it counts as empty), else
        None."""
        if self.rows.has_children(dir_ino, HIDDEN):
            return None
        entries = [(name, ino) for name, ino, _mode in self.rows.list_dir(dir_ino)]
        if any(not self.hidden(ino, name) for name, ino in entries):
            return None
        return entries

    def remove_dir(self, parent: Inode, name: bytes, dnode: Inode, keep: Collection[int]) -> None:
        """Remove the empty directory ``dnode`` named ``name`` in ``parent``, with the hidden
        entries it holds (their inodes lose nothing: hidden names are not links)."""
        for hname, hino in self.hidden_children(dnode.ino) or []:
            self.entry(dnode.ino, hname, None)
            self.drop_link(self.node(hino), keep, counted=False)
        self.entry(parent.ino, name, None)
        parent.nlink -= 1
        self.delete(dnode.ino)

    def is_ancestor(self, anc: int, ino: int) -> bool:
        """True if directory ``anc`` is ``ino`` or one of its ancestors."""
        seen = set()
        while ino not in seen:
            if ino == anc:
                return True
            if ino == ROOT_INO:
                return False
            seen.add(ino)
            parent = self.rows.parent_of(ino)
            if parent is None:
                return False
            ino = parent
        return False


def created(node: Inode) -> Inode:
    """The inode :meth:`NamespaceOps.mknod` creates for ``node``: its type, mode, owner, size,
    rdev and target, the link count of a new file or directory, its times now; number 0 (the
    engine gives it one)."""
    now = time.time_ns()
    return Inode(0, node.mode, node.uid, node.gid, node.size,
                 2 if stat.S_ISDIR(node.mode) else 1, now, now, now, node.rdev, node.target)


def touched(node: Inode, now_ns: int, nlink: int, mtime: bool) -> Inode:
    """``node`` (changed in place) as :meth:`NamespaceOps.touch_inode` leaves it: ``nlink``
    more links, changed at ``now_ns`` (modified too with ``mtime``)."""
    node.nlink += nlink
    node.ctime_ns = now_ns
    if mtime:
        node.mtime_ns = now_ns
    return node


class NamespaceOps(_Rows):
    """POSIX namespace operations over the row-level primitives of
    :class:`~cryptfs.meta.engine.MetaEngine` (see the module docstring for the contract).
    ``keep``: inodes that stay when their last link goes (files still open; the caller deletes
    them later with :meth:`drop_unlinked`)."""

    def atomically(self, fn: Callable[[], T], commit: bool = True) -> T:
        """Run ``fn`` in one transaction (see :meth:`MetaEngine.transaction`) and return its
        result. An engine whose transactions can conflict overrides this to retry ``fn``."""
        with self.transaction(commit=commit):
            return fn()

    def _touch_dir(self, ino: int, now: int, nlink: int = 0, removing: bool = False,
                   known: Inode | None = None) -> Inode:
        """An entry in directory ``ino`` was added (or with ``removing``, removed): its times
        are ``now`` and ``nlink`` is added to its link count; the directory after. ENOENT if
        it is gone (or, when adding, being removed), ENOTDIR if it is no directory (nothing
        is written then that the operation's rollback does not undo). ``known``: its row
        as the caller knows it (see :meth:`touch_inode`)."""
        node = self.touch_inode(ino, now, nlink=nlink, mtime=True, known=known)
        if node is None:
            raise os_error(errno.ENOENT)
        if not stat.S_ISDIR(node.mode):
            raise os_error(errno.ENOTDIR)
        if not removing and node.nlink - nlink <= 0:
            raise os_error(errno.ENOENT)
        return node

    # -- compound row primitives: a read and a write here; an engine may do each in one --------
    def touch_inode(self, ino: int, now_ns: int, nlink: int = 0, mtime: bool = False,
                    known: Inode | None = None) -> Inode | None:
        node = self.get_inode(ino)  # (``known`` is only a hint: read, the row is certain)
        if node is not None:
            self.update_inode(touched(node, now_ns, nlink, mtime))
        return node

    def set_attrs(self, ino: int, now_ns: int, perms: int | None = None,
                  uid: int | None = None, gid: int | None = None, atime_ns: int | None = None,
                  mtime_ns: int | None = None) -> Inode | None:
        node = self.get_inode(ino)
        if node is not None:
            if perms is not None:
                node.mode = stat.S_IFMT(node.mode) | perms
            node.uid = node.uid if uid is None else uid
            node.gid = node.gid if gid is None else gid
            node.atime_ns = node.atime_ns if atime_ns is None else atime_ns
            node.mtime_ns = node.mtime_ns if mtime_ns is None else mtime_ns
            node.ctime_ns = now_ns
            self.update_inode(node)
        return node

    def lookup_stat(self, parent: int, name: bytes, chunk_size: int,
                    unit: int) -> tuple[Inode, int] | None:
        ino = self.lookup(parent, name)
        node = None if ino is None else self.get_inode(ino)
        if node is None:
            return None
        return node, self.allocated(node.ino, chunk_size, unit) if stat.S_ISREG(node.mode) else 0

    def stat_dir(self, parent: int, chunk_size: int,
                 unit: int) -> list[tuple[bytes, Inode, int]]:
        out = []
        for name, _ino, _mode in self.list_dir(parent):
            found = self.lookup_stat(parent, name, chunk_size, unit)
            if found is not None:
                out.append((name, *found))
        return out

    def add_dentry_if_absent(self, parent: int, name: bytes, ino: int) -> bool:
        if self.lookup(parent, name) is not None:
            return False
        self.add_dentry(parent, name, ino)
        return True

    def pop_dentry(self, parent: int, name: bytes) -> int | None:
        ino = self.lookup(parent, name)
        if ino is not None:
            self.remove_dentry(parent, name)
        return ino

    # -- creating ---------------------------------------------------------------------------
    def mknod(self, parent: int, name: bytes, node: Inode,
              xattrs: Mapping[bytes, bytes] | None = None, commit: bool = True,
              known: Mapping[int, Inode] | None = None) -> Changed:
        """Create an inode like ``node`` (its type, mode, owner, rdev, target, size; the
        engine sets the number, link count and times) named ``name`` in ``parent``, with
        ``xattrs``. Changed.ino is the new inode. EEXIST if the name exists; ENOENT if the
        parent is gone (or being removed); ENOTDIR if it is no directory.

        ``known``: inodes as the caller knows their rows are in the database (a caller on an
        engine that is not ``shared`` makes every write itself: its cache). The parent's row
        found there may be touched and written whole instead of being read back
        (:meth:`touch_inode`); the outcome is the same (ENOENT still if the row is gone).
        An engine that is shared reads the row whatever ``known`` says."""
        check_name(name)
        isdir = stat.S_ISDIR(node.mode)
        prow = None if known is None else known.get(parent)

        def run() -> Changed:
            new = created(node)
            now = new.ctime_ns
            new.ino = self.insert_inode(new)
            if not self.add_dentry_if_absent(parent, name, new.ino):
                raise os_error(errno.EEXIST)
            pnode = self._touch_dir(parent, now, nlink=1 if isdir else 0, known=prow)
            for n, v in (xattrs or {}).items():
                self.set_xattr(new.ino, n, v)
            return Changed(ino=new.ino, inodes={new.ino: new, parent: pnode},
                           entries={(parent, name): new.ino})

        return self.atomically(run, commit)

    def link(self, ino: int, parent: int, name: bytes,
             known: Mapping[int, Inode] | None = None) -> Changed:
        """Give ``ino`` (not a directory: EPERM) one more name. Changed.ino is ``ino``.
        ``known``: as for :meth:`mknod` (the parent's row may be taken from it)."""
        check_name(name)
        prow = None if known is None else known.get(parent)

        def run() -> Changed:
            now = time.time_ns()
            node = self.touch_inode(ino, now, nlink=1)
            if node is None:
                raise os_error(errno.ENOENT)
            if stat.S_ISDIR(node.mode):
                raise os_error(errno.EPERM)
            if not self.add_dentry_if_absent(parent, name, ino):
                raise os_error(errno.EEXIST)
            pnode = self._touch_dir(parent, now, known=prow)
            return Changed(ino=ino, inodes={ino: node, parent: pnode},
                           entries={(parent, name): ino})

        return self.atomically(run)

    # -- removing ---------------------------------------------------------------------------
    def unlink(self, parent: int, name: bytes, keep: Collection[int] = (),
               known: Mapping[int, Inode] | None = None) -> Changed:
        """Remove a name of a non-directory (EISDIR). Its inode goes with its last link unless
        it is in ``keep``. Removing a libfuse-hidden name takes no link off (it is none).
        ``known``: as for :meth:`mknod` (the parent's row may be taken from it)."""
        prow = None if known is None else known.get(parent)

        def run() -> Changed:
            op = _Op(self)
            ino = self.pop_dentry(parent, name)
            if ino is None:
                op.dir(parent)  # ENOENT or ENOTDIR for the directory first
                raise os_error(errno.ENOENT)
            op.out.entries[(parent, name)] = None
            # a hidden name: its inode has more names than links (this one counted too)
            hidden = name.startswith(HIDDEN) and len(self.names_of(ino)) >= op.node(ino).nlink
            node = self.touch_inode(ino, op.now, nlink=0 if hidden else -1)
            if node is None:
                raise os_error(errno.ENOENT)
            if stat.S_ISDIR(node.mode):
                raise os_error(errno.EISDIR)
            if not hidden:
                op.out.inodes[parent] = self._touch_dir(parent, op.now, removing=True,
                                                        known=prow)
            if node.nlink <= 0 and ino not in keep and not self.held(ino):
                op.delete(ino)  # (held: another machine has it open)
            else:
                op.out.inodes[ino] = node
            return op.out

        return self.atomically(run)

    def rmdir(self, parent: int, name: bytes, keep: Collection[int] = ()) -> Changed:
        """Remove an empty directory (ENOTEMPTY; libfuse-hidden entries do not count and go
        with it, their inodes unless in ``keep``)."""
        if name == b".":
            raise os_error(errno.EINVAL)

        def run() -> Changed:
            op = _Op(self)
            pnode, node = op.named(parent, name)
            if not stat.S_ISDIR(node.mode):
                raise os_error(errno.ENOTDIR)
            if op.hidden_children(node.ino) is None:
                raise os_error(errno.ENOTEMPTY)
            op.remove_dir(pnode, name, node, keep)
            op.touch(pnode, mtime=True)
            return op.save()

        return self.atomically(run)

    # -- renaming ---------------------------------------------------------------------------
    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0,
               keep: Collection[int] = ()) -> Changed:
        """rename(2) with renameat2's RENAME_NOREPLACE (EEXIST if ``n2`` exists) and
        RENAME_EXCHANGE (swap two existing names). A replaced name loses a link (an empty
        directory goes; its inode unless in ``keep``); EINVAL for a directory moved below
        itself; ENOTDIR/EISDIR/ENOTEMPTY as POSIX says. A rename to a libfuse-hidden name from a
        name that is not one takes a link off (module docstring)."""
        check_name(n2)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise os_error(errno.EINVAL)

        def run() -> Changed:
            op = _Op(self)
            pn1, pn2 = op.dir(p1), op.dir(p2)
            src = self.lookup(p1, n1)
            if src is None:
                raise os_error(errno.ENOENT)
            snode = op.node(src)
            dst = self.lookup(p2, n2)
            dnode = op.node(dst) if dst is not None else None
            if flags & RENAME_EXCHANGE:
                if dnode is None:
                    raise os_error(errno.ENOENT)
                return self._exchange(op, pn1, n1, snode, pn2, n2, dnode)
            if dnode is not None and flags & RENAME_NOREPLACE:
                raise os_error(errno.EEXIST)
            sdir = stat.S_ISDIR(snode.mode)
            if sdir and p1 != p2 and op.is_ancestor(src, p2):
                raise os_error(errno.EINVAL)
            if dnode is not None:
                if dnode.ino == src:
                    return op.out
                ddir = stat.S_ISDIR(dnode.mode)
                if sdir and not ddir:
                    raise os_error(errno.ENOTDIR)
                if ddir and not sdir:
                    raise os_error(errno.EISDIR)
                if ddir:
                    if op.hidden_children(dnode.ino) is None:
                        raise os_error(errno.ENOTEMPTY)
                    op.remove_dir(pn2, n2, dnode, keep)
                else:
                    op.entry(p2, n2, None)
                    op.drop_link(dnode, keep)
            op.entry(p1, n1, None)
            op.entry(p2, n2, src)
            if sdir and p1 != p2:
                pn1.nlink -= 1
                pn2.nlink += 1
            if n2.startswith(HIDDEN) and not n1.startswith(HIDDEN):
                snode.nlink -= 1  # libfuse hides a file unlinked while open
            op.touch(snode)
            op.touch(pn1, mtime=True)
            op.touch(pn2, mtime=True)
            return op.save()

        return self.atomically(run)

    def _exchange(self, op: _Op, pn1: Inode, n1: bytes, a: Inode, pn2: Inode, n2: bytes,
                  b: Inode) -> Changed:
        if a.ino == b.ino:
            return op.out  # two names of one inode (or one name twice): nothing changes
        adir, bdir = stat.S_ISDIR(a.mode), stat.S_ISDIR(b.mode)
        if pn1.ino != pn2.ino and (
            (adir and op.is_ancestor(a.ino, pn2.ino)) or (bdir and op.is_ancestor(b.ino, pn1.ino))
        ):
            raise os_error(errno.EINVAL)
        op.entry(pn1.ino, n1, None)
        op.entry(pn2.ino, n2, None)
        op.entry(pn1.ino, n1, b.ino)
        op.entry(pn2.ino, n2, a.ino)
        if pn1.ino != pn2.ino and adir != bdir:
            delta = 1 if adir else -1
            pn1.nlink -= delta
            pn2.nlink += delta
        for n in (a, b):
            op.touch(n)
        op.touch(pn1, mtime=True)
        op.touch(pn2, mtime=True)
        return op.save()

    # -- attributes and xattrs --------------------------------------------------------------
    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, xattrs: Mapping[bytes, bytes | None] | None = None,
                commit: bool = True) -> Changed:
        """Set the given attributes (``mode``: the permission bits, the type stays) and ctime,
        and the ``xattrs`` given (None removes one), together. ENOENT for a missing inode."""

        perms = None if mode is None else mode & 0o7777

        def run() -> Changed:
            node = self.set_attrs(ino, time.time_ns(), perms, uid, gid, atime_ns, mtime_ns)
            if node is None:
                raise os_error(errno.ENOENT)
            for n, v in (xattrs or {}).items():
                if v is None:
                    self.remove_xattr(ino, n)
                else:
                    self.set_xattr(ino, n, v)
            return Changed(inodes={ino: node})

        return self.atomically(run, commit)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> Changed:
        """Set an xattr (XATTR_CREATE: EEXIST if it exists; XATTR_REPLACE: ENODATA if not)."""

        def run() -> Changed:
            op = _Op(self)
            node = op.node(ino)
            old = self.get_xattr(ino, name)
            if flags & XATTR_CREATE and old is not None:
                raise os_error(errno.EEXIST)
            if flags & XATTR_REPLACE and old is None:
                raise os_error(errno.ENODATA)
            self.set_xattr(ino, name, value)
            op.touch(node)
            return op.save()

        return self.atomically(run)

    def removexattr(self, ino: int, name: bytes) -> Changed:
        """Remove an xattr (ENODATA if there is none)."""

        def run() -> Changed:
            op = _Op(self)
            node = op.node(ino)
            if not self.remove_xattr(ino, name):
                raise os_error(errno.ENODATA)
            op.touch(node)
            return op.save()

        return self.atomically(run)

    # -- listing and cleaning up ----------------------------------------------------------------
    def readdir(self, ino: int) -> list[tuple[bytes, int, int]]:
        """``(name, ino, mode)`` of ``.``, ``..`` and every entry but libfuse's hidden ones, in
        name order after the first two (ENOENT, ENOTDIR)."""

        def run() -> list[tuple[bytes, int, int]]:
            op = _Op(self)
            node = op.dir(ino)
            parent = (self.parent_of(ino) or ROOT_INO) if ino != ROOT_INO else ROOT_INO
            entries = [(b".", ino, node.mode), (b"..", parent, stat.S_IFDIR)]
            return entries + [e for e in self.list_dir(ino) if not op.hidden(e[1], e[0])]

        return self.atomically(run, commit=False)

    def drop_unlinked(self, ino: int, unhold: bool = False) -> Changed:
        """Delete ``ino`` if no link keeps it and no machine holds it open (its last user
        closed it after its last name went); Changed.removed says whether it went. With
        ``unhold`` this machine lets go of it first (:meth:`MetaEngine.unhold`), in the same
        transaction."""

        def run() -> Changed:
            op = _Op(self)
            if unhold:
                self.unhold(ino)
            node = self.get_inode(ino)
            if node is not None and node.nlink <= 0 and not self.held(ino):
                op.delete(ino)
            return op.out

        return self.atomically(run)

    def recover(self) -> int:
        """After a crash (no file is open here): drop libfuse's hidden entries and the inodes
        no link keeps, but those another machine holds open; returns how many went."""

        def run() -> int:
            op = _Op(self)
            hidden = [(p, n) for p, n, i in self.hidden_dentries(HIDDEN)
                      if op.hidden(i, n) and not self.held(i)]
            for parent, name in hidden:
                self.remove_dentry(parent, name)
            orphans = [i for i in self.orphan_inodes() if not self.held(i)]
            for ino in orphans:
                self.delete_inode(ino)
            return len(hidden) + len(orphans)

        return self.atomically(run)
