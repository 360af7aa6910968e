"""The write path: buffering, sealing, committing chunk maps (and journaling for an fsync),
truncate, fallocate, flush, fsync and release (the durability contract in
:mod:`cryptfs.fs.base`)."""

from __future__ import annotations

import errno
import os
import stat
import time
from concurrent.futures import Future

from cryptfs.errors import CryptfsError
from cryptfs.format.codec import ChunkRef
from cryptfs.fs.base import (
    DIRTY_LIMIT,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    INLINE_SEAL,
    FileSystemBase,
    OpenFile,
    Sealing,
    _err,
    log,
)
from cryptfs.fs.journal import Logged
from cryptfs.meta import Inode


class Writes(FileSystemBase):
    """Writes, sealing and commits of open files; truncate, fallocate, lseek, release."""

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
                    new = True
                else:
                    new = False
                f.touch(idx, min(within, len(buf)), within + n, new, cs)
                if len(buf) < within:
                    buf.extend(bytes(within - len(buf)))
                buf[within : within + n] = view[:n]
                pos += n
                view = view[n:]
            f.size = max(f.size, pos)
            f.mtime_ns = time.time_ns()
            # seal complete chunks behind the write position (but not one only a little of
            # which changed: an fsync journals that); everything if over the limit (each
            # scan only where it can find something: a write's cost stays flat)
            if len(f.dirty) > 1:
                full = [i for i, b in f.dirty.items()
                        if len(b) == cs and i != idx and not self._journals(f, i)]
                if full:
                    self._seal(f, full)
            if len(f.dirty) * cs > DIRTY_LIMIT and f.dirty_bytes() > DIRTY_LIMIT:
                self._seal(f, list(f.dirty))
        return len(data)

    def _seal(self, f: OpenFile, idxs: list[int], inline: bool = False,
              pack: bool = False) -> None:
        """Hand dirty chunks to the sealing threads (caller holds f.lock); small ones, and
        with ``inline`` all, are sealed in this thread. ``pack``: the file is being closed, so
        its short last chunk may go into a pack (:class:`ChunkStore`); a chunk sealed for an
        fsync or while the file is written is not (a database rewrites its tail at every
        fsync: packed, each version would leave garbage in a pack)."""
        for idx in sorted(idxs):
            buf = f.dirty.pop(idx)
            f.forget(idx)
            if buf and buf[-1] == 0:  # trailing zeros read back as zeros: not stored
                del buf[len(buf.rstrip(b"\0")):]
            old = f.pending.get(idx)
            if inline or len(buf) < INLINE_SEAL:  # a thread hand-off costs more than sealing
                fut: Future[ChunkRef | None] = Future()
                try:
                    fut.set_result(self.chunks.put_or_hole(buf, pack))
                except CryptfsError as e:
                    fut.set_exception(e)
            else:
                fut = self.chunks.put_async(buf, pack)
            f.pending[idx] = Sealing(buf, fut)
            f.tail = (idx, buf)
            if old is not None:
                self._unpin_later(old)

    def _unpin_later(self, s: Sealing) -> None:
        def done(fut: Future[ChunkRef | None]) -> None:
            if fut.exception() is None and fut.result() is not None:
                self.chunks.unpin([fut.result().name])  # type: ignore[union-attr]

        s.fut.add_done_callback(done)

    def _commit(self, f: OpenFile, pack: bool = False, journal: bool = False) -> Logged | None:
        """Seal all dirty chunks and commit the chunk map and size (caller holds f.lock).
        ``journal`` (an fsync on a vault one machine writes): a dirty chunk whose changes
        since it was made from the chunk map's span at most ``journal_max`` bytes stays dirty,
        those bytes journaled in the same transaction (docs/FORMAT.md 5.3).
        If a chunk cannot be stored, its data goes back to the dirty buffers and the error
        is raised (ENOSPC or EIO), so a later flush can retry. On a vault other machines
        write (``meta.shared``) the commit merges with theirs: the inode is read as committed
        and locked, the chunks written here replace theirs and the others stay, the size is
        the larger (this one's if it truncated since its last commit), and the open file then
        reads the merged chunk map; a conflict re-runs the commit (``meta.atomically``).
        ``pack``: the file is being closed (see :meth:`_seal`). Returns the commit as a
        :class:`Logged` if it journaled and nothing more and the fsync log gave it a place."""
        if not f.pending and f.mtime_ns is None and (journal or not f.dirty):
            return None  # (nothing written since the last commit, which journaled any dirty)
        kept, journaled = self._journal_rows(f) if journal else (set(), {})
        seal = [idx for idx in f.dirty if idx not in kept]
        if seal:  # one chunk (a small write's): sealed here, the caller waits for it anyway
            self._seal(f, seal, inline=len(seal) == 1, pack=pack)
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
            raise _err(failed.errno)
        shared = self.meta.shared
        slot: tuple[int, int, int] | None = None

        def run() -> Inode | None:
            nonlocal slot
            # shared: the inode as committed now, locked until this commit (another
            # machine's commit of this file in between is merged, never overwritten)
            node = self.meta.get_inode(f.ino) if shared else (
                self.inodes.get(f.ino) or self.meta.get_inode(f.ino))
            if node is None:  # removed meanwhile
                return None
            if shared:  # what it deduplicated against, stored again if collected meanwhile
                self._claim_kept(refs)  # (their ledger entries: before_commit below)
            for idx, ref in refs.items():
                if idx * self.cs < f.size:
                    staged = self.chunks.remote or (ref is not None and ref.pack is not None)
                    self.meta.set_block(f.ino, idx, ref, staged=staged)
            for idx, (seq, off, data) in journaled.items():  # (after: set_block drops rows)
                self.meta.journal_chunk(f.ino, idx, seq, off, data)
            # the larger size: another machine may have written further (unless this one
            # truncated since its last commit: then its size is the file's)
            node.size = f.size if f.truncated or not shared else max(node.size, f.size)
            if f.mtime_ns is not None:
                node.mtime_ns = node.ctime_ns = f.mtime_ns
            self._save(node)
            if self.before_commit is not None:  # last but the mark: other machines wait for
                self.before_commit()  # the ledger's lock from here to the commit
            if journal:  # (one machine's vault: after the ledger entries, in the log's record)
                slot = self._log_mark(refs, journaled)
            return node

        with self.lock:
            before = self.meta.change_count()
            node = self.meta.atomically(run)
            changes = (before, self.meta.change_count())
            if node is None:
                self._discard(f)
                return None
            if shared:  # chunks other machines committed are read from the map again
                f.refs.clear()
                f.loaded.clear()
                f.size = node.size
            for idx, ref in refs.items():
                if ref is None or idx * self.cs >= f.size:
                    f.refs.pop(idx, None)
                else:
                    f.refs[idx] = ref
            f.truncated = False
            for idx, (seq, _off, data) in journaled.items():  # (the next row holds the
                f.rows[idx] = seq + 1  # changes from here on)
                f.row_bytes[idx] = f.row_bytes.get(idx, 0) + len(data)
                f.fresh[idx] = (self.cs, 0)
            self.inodes[f.ino] = node
            self._alloc.pop(f.ino, None)
        tail, f.tail = f.tail, None
        if tail is not None and refs.get(tail[0]) is not None:
            self.chunks.remember(refs[tail[0]].name, tail[1])  # type: ignore[union-attr]
        self.chunks.unpin(r.name for r in refs.values() if r is not None)
        f.pending.clear()
        f.mtime_ns = None
        if slot is None or slot[2] != changes[1]:  # (none, or the commit wrote more)
            return None
        return Logged(slot[:2], f.ino, node.size, node.mtime_ns, node.ctime_ns,
                      [(i, *row) for i, row in journaled.items()], changes,
                      [(i, r) for i, r in refs.items() if i * self.cs < f.size])  # (as set)

    def _claim_kept(self, refs: dict[int, ChunkRef | None]) -> bool:
        """In a commit's transaction on a vault other machines write: the chunks written are
        claimed (the rows of those deduplicated against a record then stay until this commit,
        which references them; a chunk this machine stored itself, unrecorded, needs no row,
        only none collected since); one another machine collected meanwhile (or ``cryptfs gc``
        deleted) is stored again, and its new ref replaces the old in ``refs``. Whether any
        was stored again (its ledger entry is queued: this commit must write it, before any
        later history of the object)."""
        kept = {ref.name: self.chunks.kept_new(ref.name) for ref in refs.values()
                if ref is not None and self.chunks.kept(ref.name)}
        lost = self.meta.claim_objects(kept)
        again = {name: self.chunks.restore(name) for name in sorted(lost)}
        for idx, ref in refs.items():
            if ref is not None and ref.name in again:
                refs[idx] = again[ref.name]
        return bool(again)

    def _discard(self, f: OpenFile) -> None:
        for s in f.pending.values():
            self._unpin_later(s)
        f.pending.clear()
        f.dirty.clear()
        f.span.clear()
        f.fresh.clear()
        f.rows.clear()
        f.tail = None

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
                        f.forget(idx)
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
                f.mtime_ns = time.time_ns()
                # to its own size (SQLite's after a WAL checkpoint): the times, pending as a write's
                if size != f.size or self.meta.shared:
                    f.size, f.truncated = size, True
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
                f.forget(idx)
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
            new = buf is None
            if buf is None:
                buf = bytearray(self._plain(f, idx))
                del buf[max(0, f.size - idx * cs):]  # data past EOF is not file content
            a = max(lo, idx * cs) - idx * cs
            b = min(hi, (idx + 1) * cs) - idx * cs
            if a < len(buf):
                buf[a:b] = bytes(min(b, len(buf)) - a)
                f.dirty[idx] = buf
                f.touch(idx, a, min(b, len(buf)), new, cs)

    def flush(self, fh: int, closing: bool = True) -> Logged | None:
        """Make the file's data survive a crash of this process (see module docstring).
        ``closing``: called for a close (FUSE flush), not for an fsync (which journals what
        it can, on a vault one machine writes: see :meth:`_commit` for what it returns)."""
        h = self.handles.get(fh)
        if h is None or h.file is None:
            return None
        with h.file.lock:
            logged = self._commit(h.file, pack=closing,
                                  journal=not closing and not self.meta.shared)
        if self._deferred:  # attribute changes made before the close survive it too
            self.commit_deferred()
        return logged

    def fsync(self, fh: int | None) -> None:
        """Flush, then make everything durable (see the module docstring of :mod:`.base`)."""
        self.on_sync(self.flush(fh, closing=False) if fh is not None else None)

    def release(self, fh: int) -> None:
        with self.lock:
            h = self.handles.get(fh)
        if h is None or h.file is None:
            return
        f = h.file
        with f.lock:
            try:
                self._commit(f, pack=True)
            finally:
                with self.lock:
                    self.handles.pop(fh, None)
                    f.handles -= 1
                    if f.handles <= 0:
                        del self.files[f.ino]
                        if self.meta.shared:
                            # the unhold, and whether another machine unlinked it
                            # meanwhile (the database says), in one transaction
                            self._apply(self.meta.drop_unlinked(f.ino, unhold=True))
                        else:
                            self.meta.unhold(f.ino)
                            node = self.inodes.get(f.ino) or self.meta.get_inode(f.ino)
                            if node is not None and node.nlink <= 0:
                                self._apply(self.meta.drop_unlinked(f.ino))

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
