"""Filesystem operations: POSIX semantics over the metadata store and the chunk store.

This module holds the shared state (caches, open files, deferred commits) and the helpers of
:class:`FileSystem`; each group of operations lives in its own module of this package:
:mod:`.namespace` (lookups, creating, removing, renaming), :mod:`.attrs` (attributes, xattrs,
directories), :mod:`.reads` (open, read, read-ahead) and :mod:`.writes` (write, seal, commit,
truncate, fallocate, seek, flush, release).

Inode-based and independent of FUSE: every method takes inode numbers and raw names (bytes),
returns :class:`~cryptfs.meta.sqlite.Inode` records or data, and raises ``OSError(errno)``.

Durability contract:
- every namespace operation (mkdir, mknod, symlink, link, unlink, rename, ...) and xattr
  change is one committed transaction of the engine when it returns: it survives a crash of the
  process;
- the creation of a regular file (``create``) and attribute changes (chmod, chown, utimens)
  are written at once and committed with the next commit: the file's flush at close, any
  namespace operation, an fsync, or at the latest ``COMMIT_DELAY`` later (a crash of the
  process in between may lose them; a file closed is never lost);
- ``write`` buffers in memory; ``flush`` (every close; on a vault of one machine none for a
  file opened read-only while nothing awaited a commit) seals the file's dirty chunks, stages
  them and commits the chunk map and every attribute change made before: the data survives a
  crash of the process and will reach the store;
- ``fsync``/``fsyncdir`` additionally wait until everything is in the store and a metadata
  snapshot and ledger checkpoint are written there (see :mod:`cryptfs.vault.checkpointer`);
  a chunk that changed little since it was last sealed is not sealed again for an fsync: the
  bytes it changed go into the metadata, sealed (the journal, ``JOURNAL_MAX``), and the chunk
  is sealed later (full, at close, or at an fsync past the limit; after a crash, when the
  vault is opened again: :mod:`cryptfs.fs.journal`); where the store appends, an fsync whose
  commit journaled only that is a record appended to the store's fsync log instead of a
  checkpoint (:class:`~cryptfs.fs.journal.Logged`, :mod:`cryptfs.vault.fsynclog`);
  with the metadata in PostgreSQL, until it is committed there and every chunk is durable in
  the store (the database is the metadata's durability point; a checkpoint follows later).

Several machines (a PostgreSQL vault, ``meta.shared``): close-to-open consistency — a file
closed (flushed) on one machine reads whole on another that opens it afterwards (``open``
re-reads the inode, and a new open file reads the chunk map from the database). Inode and
entry caches are bounded in time (SHARED_CACHE_SECONDS) while other machines have the vault
mounted, and dropped at once when their change notice arrives (:meth:`FileSystemBase.invalidate`);
with the kernel's own attribute and entry timeout (1 s), a name made, renamed or removed on one
machine shows on the others within about 1 s after the notice, 2 s without it. A file open on
a machine keeps its inode when another machine removes its last name (``MetaEngine.hold``).

Locking: ``self.lock`` guards metadata, caches and the open-file table; each open file has its
own lock for its buffers. A thread may take a file lock and then ``self.lock``, never the
reverse. Store reads happen outside ``self.lock``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptfs.chunks.chunkstore import ChunkStore
from cryptfs.errors import os_error as _err
from cryptfs.format.codec import ChunkRef
from cryptfs.fs.hooks import CommitHooks
from cryptfs.meta import Changed, Inode, MetaEngine
from cryptfs.meta.namespace import (  # noqa: F401 - the names of fs operations' flags
    HIDDEN,
    NAME_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
)

if TYPE_CHECKING:
    from cryptfs.fs.journal import Logged

log = logging.getLogger("cryptfs.fs")

XATTR_SIZE_MAX = 65536
DIRTY_LIMIT = 64 << 20  # per open file, before its dirty chunks are sealed early
INODE_CACHE_MAX = 200_000
REF_WINDOW = 256
INLINE_SEAL = 128 << 10
# an fsync journals a dirty chunk (docs/FORMAT.md 5.3: the bytes it changed go into the metadata,
# sealed, instead of the whole chunk sealed again as a new object) when it changed at most this
# many bytes of it since it was last sealed, and its rows hold at most that many in all (a page
# rewritten at every fsync is sealed now and then: the metadata stays bounded); more, and the
# chunk is sealed. Where such an fsync is a record of the fsync log (cryptfs.vault.fsynclog),
# which carries only the bytes changed since the last record, anything short of the whole
# chunk: sealing it (a new object, a checkpoint) costs as much as ten records
JOURNAL_MAX = 32 << 10
ALLOC_UNIT = 4096  # a stored chunk counts as allocated in units of this, like ext4's blocks
DIR_SIZE = 4096  # the size a directory reports (ext4's for a small one)
SEEK_DATA, SEEK_HOLE = 3, 4
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
COMMIT_DELAY = 0.1  # at most this long between an attribute change and its commit
# On a vault other machines write (a PostgreSQL one): the inode and entry caches are dropped
# when older than this, whether or not a change notice came (see FileSystemBase.invalidate)
SHARED_CACHE_SECONDS = 1.0
DENTRY_SCAN = 10_000  # a change notice scans a cache of up to this many entries, else empties it


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
    # the chunk sealed last and its plaintext: once committed it goes to the memory cache, so
    # the next small write to it (a log appended to, a block rewritten) does not read it back
    tail: tuple[int, bytearray] | None = None
    # truncated since the last commit: that commit sets the size (else, on a vault other
    # machines write, the larger of theirs and this one's, see Writes._commit)
    truncated: bool = False
    # per dirty buffer, the bytes [lo, hi) it changed of the chunk it was made from (every
    # byte if not known: then it is sealed, not journaled), those changed since its last
    # journal row (what the next one holds), its journal rows so far (Writes._commit) and the
    # bytes they hold
    span: dict[int, tuple[int, int]] = field(default_factory=dict)
    fresh: dict[int, tuple[int, int]] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)
    row_bytes: dict[int, int] = field(default_factory=dict)

    def dirty_bytes(self) -> int:
        return sum(len(b) for b in self.dirty.values())

    def changed(self, idx: int, cs: int) -> int:
        """How many bytes the dirty buffer ``idx`` changed, first to last (see ``span``)."""
        lo, hi = self.span.get(idx, (0, cs))
        return hi - lo

    def touch(self, idx: int, lo: int, hi: int, new: bool, cs: int) -> None:
        """Bytes [lo, hi) of dirty buffer ``idx`` changed (``new``: the buffer was just made
        from the chunk map's chunk)."""
        for spans in (self.span, self.fresh):
            a, b = (cs, 0) if new else spans.get(idx, (0, cs))
            spans[idx] = (min(a, lo), max(b, hi))

    def forget(self, idx: int) -> None:
        """Dirty buffer ``idx`` is gone (sealed, or cut off)."""
        self.span.pop(idx, None)
        self.fresh.pop(idx, None)
        self.rows.pop(idx, None)
        self.row_bytes.pop(idx, None)


@dataclass
class Handle:
    file: OpenFile | None
    flags: int
    listing: list[tuple[bytes, int, int]] | None = None


class FileSystemBase:
    """The filesystem's state and helpers. ``on_sync(logged)`` is fsync (module docstring;
    ``logged``: see :class:`Logged`); ``before_commit`` runs inside each transaction that
    commits file data (the vault writes its queued ledger entries there); ``hooks``: the
    commit hooks ``meta`` was built with; ``log_slot()``: the place in an fsync log a commit
    that only journals takes (or None: see :class:`Logged`); ``journal_max``: the most bytes
    of a chunk an fsync journals (JOURNAL_MAX)."""

    def __init__(
        self,
        meta: MetaEngine,
        chunks: ChunkStore,
        chunk_size: int,
        on_sync: Callable[[Logged | None], None],
        readonly: bool = False,
        statfs_source: Callable[[], os.statvfs_result | None] | None = None,
        *,
        hooks: CommitHooks,
        before_commit: Callable[[], None] | None = None,
        log_slot: Callable[[], tuple[int, int] | None] = lambda: None,
        journal_max: int = JOURNAL_MAX,
    ) -> None:
        self.meta = meta
        self.chunks = chunks
        self.cs = chunk_size
        self.on_sync = on_sync
        self.log_slot = log_slot
        self.journal_max = journal_max
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
        self._misses: dict[int, int] = {}  # directory -> lookups the caches missed (mount)
        # the kernel asks for security.capability on every write: answer from memory
        self.xattr_inos: set[int] = meta.inodes_with_xattrs()
        # bytes a file's committed chunks take (see st_blocks), computed on its first stat
        self._alloc: dict[int, int] = {}
        # changes written but not committed yet (see Attributes._setattr and create)
        self._deferred: dict[int, Inode] = {}
        self._deferred_new: list[tuple[int, bytes, Inode]] = []
        self._deferred_event = threading.Event()
        self._committer: threading.Thread | None = None
        self._cached_at = time.monotonic()  # when the caches were last emptied (shared)
        # other machines have the vault mounted (set by the vault from their sessions, and
        # by any change notice of theirs): only then are the caches bounded in time
        self.peers = meta.shared
        hooks.listen(self._committed, self._reapply_deferred)
        # journal rows read in place, where nothing is written (cryptfs.fs.journal)
        self.journal_rows: dict[tuple[int, int], list[tuple[int, int, bytes]] | bytes] = {}
        for i, x, q, o, d in meta.journaled() if readonly else []:
            self.journal_rows.setdefault((i, x), []).append((q, o, d))  # type: ignore[union-attr]

    # -- helpers --------------------------------------------------------------------------
    def invalidate(self, inos: set[int] | None) -> None:
        """Other machines changed these inodes (their attributes, names in them, chunk maps,
        xattrs; None: anything): drop what the caches hold of them. Called by the change
        notice watcher and the session reaper."""
        with self.lock:
            self.peers = self.peers or bool(inos)
            if inos is None:
                self._drop_caches()
                self.xattr_inos = self.meta.inodes_with_xattrs()
                return
            for ino in inos:
                self.inodes.pop(ino, None)
                self.complete.discard(ino)
                self._alloc.pop(ino, None)
                self._prefetched.pop(ino, None)
            self.xattr_inos |= inos  # may have xattrs now: ask the database
            if len(self.dentries) > DENTRY_SCAN:
                self.dentries.clear()  # cheaper than a scan under the lock
                self.complete.clear()
            elif inos and self.dentries:
                for key in [k for k in self.dentries if k[0] in inos or
                            self.dentries[k] in inos]:
                    del self.dentries[key]
                    self.complete.discard(key[0])  # (it lacks that entry now)

    def _drop_caches(self) -> None:
        """Empty the inode and entry caches but for inodes with uncommitted changes."""
        keep = {ino: self.inodes[ino] for ino in self._deferred if ino in self.inodes}
        keep.update((n.ino, n) for _p, _n, n in self._deferred_new)
        self.inodes = keep
        self.dentries.clear()
        self.complete.clear()
        self._alloc.clear()
        self._prefetched.clear()
        self._cached_at = time.monotonic()

    def _fresh(self) -> None:
        """With other machines mounted: empty the caches once they are older than the bound
        (a fallback: their change notices drop what they change at once)."""
        if self.peers and time.monotonic() - self._cached_at > SHARED_CACHE_SECONDS:
            self._drop_caches()

    def _node(self, ino: int) -> Inode:
        self._fresh()
        node = self.inodes.get(ino)
        if node is None:
            node = self.meta.get_inode(ino)
            if node is None:
                raise _err(errno.ENOENT)
            self._cache(node)
        return node

    def _cache(self, node: Inode) -> Inode:
        """``node`` as read from the engine, unless the cache holds it (then the cached one,
        which is the same or newer: the caller holds self.lock, under which every write to
        the engine is made and cached)."""
        cached = self.inodes.get(node.ino)
        if cached is not None:
            return cached
        if len(self.inodes) >= INODE_CACHE_MAX:
            self.inodes.clear()
            self.dentries.clear()
            self.complete.clear()
            self._alloc.clear()
        self.inodes[node.ino] = node
        return node

    def _save(self, node: Inode) -> None:
        self.meta.update_inode(node)

    def _apply(self, changed: Changed) -> None:
        """Bring the caches in line with what a namespace operation of the engine changed
        (caller holds self.lock)."""
        for ino in changed.removed:
            self.inodes.pop(ino, None)
            self.complete.discard(ino)
            self._alloc.pop(ino, None)
        self.inodes.update(changed.inodes)
        for key, ino in changed.entries.items():
            if ino is None:
                self.dentries.pop(key, None)
            else:
                self.dentries[key] = ino

    def _defer(self, node: Inode) -> None:
        """Remember a written change of ``node`` until the next commit (caller holds
        self.lock), and make sure that commit comes within COMMIT_DELAY."""
        self._deferred[node.ino] = node
        if self._committer is None:
            self._committer = threading.Thread(
                target=self._commit_deferred_loop, name="commit", daemon=True
            )
            self._committer.start()
        if not self._deferred_event.is_set():  # (else the committer's round comes anyway)
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
        self._fresh()
        key = (parent, name)
        ino = self.dentries.get(key)
        if ino is None and parent not in self.complete:
            ino = self.meta.lookup(parent, name)
            if ino is not None:
                self.dentries[key] = ino
        return ino

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
            m = f.mtime_ns
            mtime, ctime = (node.mtime_ns, node.ctime_ns) if m is None else (m, m)
            return Inode(node.ino, node.mode, node.uid, node.gid, f.size, node.nlink,
                         node.atime_ns, mtime, ctime, node.rdev, node.target)
        return node
