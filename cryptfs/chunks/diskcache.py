"""A bounded local cache of sealed objects, for vaults on remote stores.

The cache holds objects exactly as the store does (encrypted and authenticated), one file per
object, mode 0600 in a 0700 directory. Nothing in it is trusted: every entry is checked against
the recorded size and SHA-256 before use, and a bad one is deleted. So entries are written in
place, without a temporary file: one torn by a crash fails the check and is fetched again.

Eviction is least-recently-used by bytes, tracked in memory (file access times are not
reliable under ``relatime``/``noatime``); at start the order is taken from the files' mtimes.
Deleting the directory is always safe.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptfs.format.codec import ChunkRef
from cryptfs.paths import private_dir

if TYPE_CHECKING:
    from cryptfs.metrics import Metrics

log = logging.getLogger("cryptfs.chunks.diskcache")



def read_at_most(path: Path, limit: int) -> bytes | None:
    """A local file's bytes, or None if it holds more than ``limit`` (never reads more than
    ``limit + 1`` bytes: a planted or damaged file costs no memory). OSError as from open."""
    with open(path, "rb", buffering=0) as f:
        data = f.read(limit + 1)
    return data if len(data) <= limit else None


def read_range_of(path: Path, size: int, offset: int, length: int) -> bytes | None:
    """Bytes ``[offset, offset + length)`` of a local file, or None unless it has exactly
    ``size`` bytes (one pread after an fstat). OSError as from open."""
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size != size:
            return None
        data = os.pread(f.fileno(), length, offset)
    return data if len(data) == length else None


class DiskCache:
    """LRU cache of sealed objects in ``root``, at most ``max_bytes`` (0 disables it);
    ``metrics`` (optional) counts evictions."""

    def __init__(self, root: Path, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.root = root
        self.metrics = metrics
        self.max_bytes = max(0, max_bytes)
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()  # file -> size
        self._writing: set[str] = set()  # files being written: not complete yet
        self.bytes = 0
        private_dir(root)
        found = []
        for f in root.iterdir():
            try:
                if f.name.endswith(".tmp"):  # left by versions that wrote through a temp file
                    f.unlink()
                    continue
                st = f.stat()
            except OSError:
                continue
            found.append((st.st_mtime, f.name, st.st_size))
        for _mtime, fname, size in sorted(found):
            self._lru[fname] = size
            self.bytes += size
        self._evict()

    @staticmethod
    def _file(name: str) -> str:
        return name.replace("/", "_")

    def path(self, name: str) -> Path:
        return self.root / self._file(name)

    def read(self, ref: ChunkRef) -> bytes | None:
        """The cached object if it has the recorded size (a wrong size deletes the entry); the
        caller authenticates it and discards it if it fails."""
        def whole(path: Path) -> bytes | None:
            blob = read_at_most(path, ref.size)
            return blob if blob is not None and len(blob) == ref.size else None

        return self._read(ref, whole)

    def read_range(self, ref: ChunkRef, offset: int, length: int) -> bytes | None:
        """Bytes ``[offset, offset + length)`` of the cached object if the entry has the
        recorded size (a wrong size deletes it); the caller authenticates them (and discards
        the entry if they fail)."""
        return self._read(ref, lambda path: read_range_of(path, ref.size, offset, length))

    def read_member(self, ref: ChunkRef, lo: int = 0, n: int | None = None) -> bytes | None:
        """Bytes ``[lo, lo + n)`` (default: all) of pack member ``ref`` from the cached copy of
        its pack (docs/FORMAT.md 4.3), if that holds the member (a copy too short to is
        deleted); the caller authenticates them (and discards the pack's entry if they fail)."""
        assert ref.pack is not None
        want = ref.size - lo if n is None else n
        end = ref.offset + ref.size

        def part(path: Path) -> bytes | None:
            with open(path, "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size < end:
                    return None
                data = os.pread(f.fileno(), want, ref.offset + lo)
            return data if len(data) == want else None

        return self._read_file(self._file(ref.pack), part)

    def _read(self, ref: ChunkRef, read: Callable[[Path], bytes | None]) -> bytes | None:
        """``read(path)`` of the entry of ``ref`` (None: not there, being written, or the wrong
        size, which deletes it), the entry marked as used."""
        return self._read_file(self._file(ref.name), read)

    def _read_file(self, fname: str, read: Callable[[Path], bytes | None]) -> bytes | None:
        with self._lock:
            if fname in self._writing:
                return None
        try:
            data = read(self.root / fname)
        except OSError:
            self._forget(fname)
            return None
        if data is None:
            self._drop(fname)
            return None
        with self._lock:
            if fname in self._lru:
                self._lru.move_to_end(fname)
        return data

    def write(self, name: str, blob: bytes) -> None:
        """Keep a copy of an object just fetched (best effort: a full disk only logs)."""
        if self.max_bytes <= 0 or len(blob) > self.max_bytes:
            return
        fname = self._file(name)
        with self._lock:
            if fname in self._lru or fname in self._writing:
                return
            self._writing.add(fname)
        try:
            try:
                fd = os.open(self.root / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # a file the index lost: track it (it is checked when read)
                self._admit(fname, len(blob))
                return
            try:
                os.write(fd, blob)
            except OSError:
                self._unlink(fname)
                raise
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("cannot write the chunk cache: %s", e.strerror)
            return
        finally:
            with self._lock:
                self._writing.discard(fname)
        self._admit(fname, len(blob))

    def adopt(self, path: Path, name: str) -> None:
        """Move a file holding the object (an uploaded staging file) into the cache, or delete
        it when the cache is disabled."""
        if self.max_bytes <= 0:
            path.unlink(missing_ok=True)
            return
        fname = self._file(name)
        try:
            size = path.stat().st_size
            os.replace(path, self.root / fname)
        except OSError:  # the cache on another filesystem (EXDEV), or a full one: copy it
            try:
                blob = path.read_bytes()
            except OSError:
                blob = None
            path.unlink(missing_ok=True)
            if blob is not None:
                self._drop(fname)
                self.write(name, blob)
            return
        self._forget(fname)
        self._admit(fname, size)

    def discard(self, name: str) -> None:
        """Forget an object (it was deleted from the store)."""
        self._drop(self._file(name))

    def _admit(self, fname: str, size: int) -> None:
        with self._lock:
            if fname not in self._lru:
                self._lru[fname] = size
                self.bytes += size
        self._evict()

    def _evict(self) -> None:
        victims = []
        with self._lock:
            while self.bytes > self.max_bytes and self._lru:
                fname, size = self._lru.popitem(last=False)
                self.bytes -= size
                victims.append(fname)
        if victims and self.metrics is not None:
            self.metrics.cache_evictions.inc(len(victims))
        for fname in victims:
            self._unlink(fname)

    def _forget(self, fname: str) -> None:
        with self._lock:
            size = self._lru.pop(fname, None)
            if size is not None:
                self.bytes -= size

    def _drop(self, fname: str) -> None:
        self._forget(fname)
        self._unlink(fname)

    def _unlink(self, fname: str) -> None:
        try:
            (self.root / fname).unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot delete from the chunk cache: %s", e.strerror)
