"""Open files and the read path: chunk lookup, read-ahead, the disk-cache admission rule
(scan resistance), sibling prefetch, and seeking over holes."""

from __future__ import annotations

import errno
import os
import stat

from cryptfs.errors import CryptfsError, IntegrityError
from cryptfs.format.codec import ChunkRef
from cryptfs.fs.base import (
    REF_WINDOW,
    SEEK_DATA,
    SEEK_HOLE,
    FileSystemBase,
    Handle,
    OpenFile,
    Sealing,
    _err,
    log,
)
from cryptfs.meta import Inode


class Reads(FileSystemBase):
    """Open files and reads (the chunk map cached per open file, read-ahead)."""

    # -- files ----------------------------------------------------------------------------
    def _add_handle(self, h: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return fh

    def _open_locked(self, node: Inode, flags: int, held: bool = False) -> int:
        """A handle on ``node``; the first one holds the file (other machines: see
        MetaEngine.hold) unless ``held`` (MetaEngine.open_inode did)."""
        if stat.S_ISDIR(node.mode) or self.readonly and \
                flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            if held:
                self.meta.unhold(node.ino)
                self.meta.commit()
            raise _err(errno.EISDIR if stat.S_ISDIR(node.mode) else errno.EROFS)
        f = self.files.get(node.ino)
        if f is None:
            f = self.files[node.ino] = OpenFile(node.ino, node.size)
            if not held:
                self.meta.hold(node.ino)
        f.handles += 1
        return self._add_handle(Handle(f, flags))

    def open(self, ino: int, flags: int) -> int:
        """Open a file; O_TRUNC truncates it (libfuse 3 passes it through: atomic_o_trunc).
        On a vault other machines write, the first open reads the inode as committed
        (close-to-open) and holds it, the hold committed before this returns (another
        machine's unlink then keeps the file), in one round trip (MetaEngine.open_inode)."""
        with self.lock:
            if self.meta.shared and ino not in self.files:
                self._fresh()
                node = self.meta.open_inode(ino)
                if node is None:
                    self.inodes.pop(ino, None)
                    raise _err(errno.ENOENT)
                self.inodes.pop(ino, None)  # close-to-open: the attributes as committed
                node = self._cache(node)
                fh = self._open_locked(node, flags, held=True)
            else:  # (open here already: held, and as fresh as its other handles)
                fh = self._open_locked(self._node(ino), flags)
        if flags & os.O_TRUNC:
            try:
                self.truncate(ino, 0, fh)
            except OSError:
                self.release(fh)
                raise
        return fh

    def awaiting_commit(self) -> bool:
        """Whether attribute changes or creations wait for a commit (the next flush commits
        them: see :mod:`.base`). A read-only open made while none does needs no flush at its
        close: the FUSE adapter then has the kernel send none."""
        with self.lock:
            return bool(self._deferred or self._deferred_new)

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
            rows = self.meta.first_chunks_after(parent, name, count)
            if rows:
                self._prefetched[parent] = rows[len(rows) // 2][0]
        self.chunks.prefetch([ref for _n, ref in rows])

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
            raise _err(e.errno) from None

    def _plain(self, f: OpenFile, idx: int, journal: bool = True) -> bytes:
        s = f.pending.get(idx)
        if s is not None and s.buf is not None:
            return bytes(s.buf)  # still sealing (or failed): the plaintext is here
        if journal and self.journal_rows:
            got = self._journaled(f, idx)
            if got is not None:
                return got
        ref = self._ref(f, idx)
        if ref is None:
            return b""
        return self._get_chunk(f.ino, ref)

    def _get_chunk(self, ino: int, ref: ChunkRef) -> bytes:
        try:
            return self.chunks.get(ref)
        except CryptfsError as e:
            raise self._read_failed(ino, e) from None

    def _chunk_part(self, ino: int, ref: ChunkRef, lo: int, hi: int, keep: bool,
                    ranged: bool) -> bytes:
        """Bytes ``[lo, hi)`` of a chunk (cut short past its data): with ``ranged`` (a random
        read) only the segments holding them, else the whole chunk (cached, as sequential reads
        want), and if it fails authentication, its segments holding them (a damaged segment
        elsewhere in the chunk fails only the reads that touch it). EIO if they fail."""
        try:
            if not ranged:
                try:
                    return self.chunks.get(ref, keep)[lo:hi]
                except IntegrityError:
                    pass
            return self.chunks.read_range(ref, lo, hi - lo, keep)
        except CryptfsError as e:
            raise self._read_failed(ino, e) from None

    def _read_failed(self, ino: int, e: CryptfsError) -> OSError:
        """Log a failed read of inode ``ino`` and count it; the error to raise (EIO)."""
        self.read_errors += 1
        with self.lock:
            paths = self.meta.paths_of(ino) or [f"<inode {ino}>"]
        kind = "integrity" if isinstance(e, IntegrityError) else "store"
        log.error("read of %s failed (%s error): %s", ", ".join(paths), kind, e)
        return _err(errno.EIO)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        parts = self.read_parts(fh, offset, size)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_parts(self, fh: int, offset: int, size: int) -> list[bytes]:
        """:meth:`read` in pieces, in order (one per chunk it spans, and zeros): what the FUSE
        adapter copies into the request's buffer one by one, not joined into one object."""
        f = self._file(fh)
        cs = self.cs
        parts: list[bytes | ChunkRef | None] = []
        with f.lock:
            end = min(offset + size, f.size)
            if offset >= end:
                return []
            first, last = offset // cs, (end - 1) // cs
            for idx in range(first, last + 1):
                buf = f.dirty.get(idx)
                if buf is None and idx in f.pending:
                    buf = f.pending[idx].buf
                if buf is None and self.journal_rows:
                    buf = self._journaled(f, idx)
                parts.append(bytes(buf) if buf is not None else self._ref(f, idx))
            sequential = offset == f.last_read_end
            # part of a stream, also when the kernel's parallel read-ahead requests arrive out
            # of order, or larger than a chunk (the kernel's read-ahead of a stream's start: up
            # to 1 MiB on a mount): a big file read that way does not enter the disk cache
            window = self.chunks.readahead * cs
            streaming = f.last_read_end >= 0 and abs(offset - f.last_read_end) <= window or \
                end - offset > cs
            f.last_read_end = end
            keep = not streaming or f.size <= self.chunks.stream_cache_limit
            # a random read (away from the last one, not at a chunk's start): read only the
            # segments it needs of a chunk not in memory, rather than fetch the whole chunk
            ranged = not streaming and offset % cs != 0
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
                lo = max(offset, idx * cs) - idx * cs
                hi = min(end, (idx + 1) * cs) - idx * cs
                pieces.append(self._chunk_part(f.ino, p, lo, hi, keep, ranged)
                              if isinstance(p, ChunkRef) else (p or b"")[lo:hi])
                if len(pieces[-1]) < hi - lo:  # past the chunk's data, within the file: zeros
                    pieces.append(bytes(hi - lo - len(pieces[-1])))
            return pieces
        finally:
            self.chunks.unpin(r.name for r in refs)

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
