"""A store in a local directory (``file:///path``): one file per object."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from cryptfs.errors import ObjectNotFound, StoreError, StoreFull
from cryptfs.format.codec import DATA_PREFIX
from cryptfs.paths import names_durable_with_files
from cryptfs.stores.base import PlainStore, check_range, checked, size_fits, too_large, wrong_size

_libc = ctypes.CDLL(None, use_errno=True)
# more files and directories than this to make durable: one syncfs of the whole filesystem is
# cheaper than an fsync of each
SYNCFS_ABOVE = 64


class LocalStore(PlainStore):
    """Objects are files below ``root``; ``a/b/c`` is ``root/a/b/c``.

    ``put`` writes a temporary file in the target directory and renames it into place, so an
    object is either absent or complete, also after a crash of the process (new chunk objects,
    which are verified against the metadata, are written in place: see :meth:`_put_new`);
    :meth:`sync` makes every object put so far survive power loss: it fsyncs exactly the files
    put since the last sync and the directories that got new entries (on ext4 and xfs only the
    parents of new directories, each once a mount: there a file's fsync makes its name durable, see
    :func:`cryptfs.paths.names_durable_with_files`; a syncfs of the store's filesystem instead
    when there are more than SYNCFS_ABOVE of them). Deletions are not made durable: an object
    that comes back after a power loss is unreferenced, and collected.
    """

    def __init__(self, root: str | os.PathLike[str], create: bool = False) -> None:
        self.root = Path(root)
        self.url = "file://" + str(self.root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.root.is_dir():
            raise StoreError(f"store directory {self.root} does not exist",
                             hint="run 'cryptfs init' first or check the URL")
        self._root = str(self.root)
        # a put's paths are strings (it makes several, and a Path costs more than its write);
        # the directories put has seen, as strings
        self._dirs_made: set[str] = set()
        self._lock = threading.Lock()
        # what sync must make durable: files put since the last sync (strings), directories
        # whose entries changed (a new object: strings; a new subdirectory: see _new_dirs)
        self._unsynced: set[str] = set()
        self._unsynced_dirs: set[str] = set()
        # directories this process first put into since the last sync, each with whether it
        # created it (else a process that crashed before syncing it may have): their parents
        # are synced once, not at every first put below them
        self._new_dirs: dict[Path, bool] = {}
        # per directory, the entries a sync of this process made durable (those it held when
        # that sync listed it, before its fsync): a directory found there is not new
        self._durable: dict[Path, set[str]] = {}
        # an fsync of a file makes its name durable too: directories need none of their own,
        # only the parents of new ones (see cryptfs.paths.names_durable_with_files)
        self._names_with_files = names_durable_with_files(self.root)

    def _path(self, name: str) -> Path:
        _check_name(name)
        return self.root / name

    def _open(self, name: str) -> int:
        """A read-only descriptor of object ``name`` (the hot path of every read: no Path, no
        file object, half the cost of ``open``)."""
        _check_name(name)
        return os.open(f"{self._root}/{name}", os.O_RDONLY | os.O_CLOEXEC)

    def put(self, name: str, data: bytes) -> None:
        _check_name(name)
        path = f"{self._root}/{name}"
        parent, _, base = path.rpartition("/")
        if parent not in self._dirs_made:
            self._first_put_into(Path(parent), name)
        if not (name.startswith(DATA_PREFIX) and self._put_new(path, name, data)):
            tmp = f"{parent}/.tmp.{base}.{os.getpid()}.{threading.get_ident()}"
            self._write(tmp, name, data, os.O_TRUNC)
            try:
                os.rename(tmp, path)
            except OSError as e:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                self._put_failed(name, e)
        with self._lock:
            self._unsynced.add(path)
            self._unsynced_dirs.add(parent)

    appendable = True

    def append(self, name: str, at: int, data: bytes) -> None:
        """Written in place from ``at`` and synced with ``fdatasync`` (the object's name is
        durable since the sync after its put). Over zeros written ahead that syncs the data
        alone (~140 us here, against ~205 for an append that grows the file). Nothing here
        stats the file: after a stat, the next write updates its times at once and the
        ``fdatasync`` commits the filesystem's journal as an append does (measured)."""
        _check_name(name)
        try:
            fd = os.open(f"{self._root}/{name}", os.O_WRONLY)
        except OSError as e:
            self._put_failed(name, e)
        try:
            try:
                view, end = memoryview(data), at
                while view:
                    n = os.pwrite(fd, view, end)
                    view, end = view[n:], end + n
                os.fdatasync(fd)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, at)
                    os.fdatasync(fd)
                self._put_failed(name, e)
        finally:
            os.close(fd)

    def _first_put_into(self, parent: Path, name: str) -> None:
        """The first put of this process into directory ``parent`` (for object ``name``):
        create it and the missing ones above it, and remember which need their entries made
        durable by the next sync."""
        try:
            created = _make_dirs(parent)
        except OSError as e:
            self._put_failed(name, e)
        # it and the directories above it may have been created just now (or by a process
        # that crashed before syncing them): each one this process has not seen yet needs
        # its entry made durable, once (seen ones: by the sync that follows their first put),
        # unless a sync of this process already did (a mount of an existing vault syncs
        # data/ once, not once for each of its 256 directories)
        with self._lock:
            fresh = [d for d in (parent, *parent.parents)
                     if d.is_relative_to(self.root) and str(d) not in self._dirs_made]
            self._dirs_made.update(str(d) for d in fresh)
            self._new_dirs.update((d, d in created) for d in fresh
                                  if d in created or
                                  d.name not in self._durable.get(d.parent, ()))

    def _put_new(self, path: str, name: str, data: bytes) -> bool:
        """Write a chunk object that does not exist yet in place (one file operation fewer
        than temp file and rename, which is most of the cost of a small file); False if it
        exists (then the caller replaces it atomically). Safe for chunk objects only: they are
        named by their content and checked against the size and hash the metadata records,
        and the metadata names one only after its put returned, so one torn by a crash is
        never referenced and the sweep after the crash deletes it."""
        try:
            self._write(path, name, data, os.O_EXCL)
        except FileExistsError:
            return False
        return True

    def _write(self, path: str, name: str, data: bytes, flag: int) -> None:
        """Create ``path`` (``flag``: O_TRUNC or O_EXCL) holding ``data``; on a failure remove
        what was written and raise StoreError (O_EXCL on an existing file: FileExistsError)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag, 0o600)
        except FileExistsError:
            raise
        except OSError as e:
            self._put_failed(name, e)
        try:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._put_failed(name, e)

    def _put_failed(self, name: str, e: OSError) -> NoReturn:
        if e.errno == errno.ENOSPC:
            raise StoreFull(f"store {self.root} is full (no space left on device)") from None
        raise StoreError(f"cannot write object {name} to {self.root}: {e.strerror}") from None

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create ``name`` only if it does not exist yet (``link`` of a complete temp file,
        atomic and exclusive); False if it exists."""
        path = self._path(name)
        tmp = path.with_name(f".tmp.{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        except OSError as e:
            raise StoreError(f"cannot write object {name} to {self.root}: {e.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, name: str, max_size: int,
            check: Callable[[bytes], bool] | None = None) -> bytes:
        try:
            fd = self._open(name)
            try:
                size = os.fstat(fd).st_size
                if size > max_size:
                    raise too_large(name, size, max_size)
                data = os.pread(fd, max_size + 1, 0)  # the file may have grown since the fstat
            finally:
                os.close(fd)
            if len(data) > max_size:
                raise too_large(name, None, max_size)
            return checked(name, data, check)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {name} not found in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read object {name} from {self.root}: {e.strerror}") from None

    def get_range(self, name: str, offset: int, length: int, size: int | None) -> bytes:
        """One pread, after an fstat that the file has ``size`` bytes."""
        check_range(name, offset, length, size)
        try:
            fd = self._open(name)
            try:
                got = os.fstat(fd).st_size
                if not size_fits(got, size, offset, length):
                    raise wrong_size(name, got, size)
                data = os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {name} not found in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read object {name} from {self.root}: {e.strerror}") from None
        if len(data) != length:  # it shrank since the fstat
            raise wrong_size(name, None, size)
        return data

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        except OSError as e:
            msg = f"cannot delete object {name} from {self.root}: {e.strerror}"
            raise StoreError(msg) from None

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        base = str(self.root)
        found = []
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            rel = "" if rel == "." else rel + "/"
            if prefix and not (rel.startswith(prefix) or prefix.startswith(rel)):
                _dirs[:] = []
                continue
            for f in files:
                if f.startswith(".tmp."):
                    continue
                name = rel + f
                if name.startswith(prefix):
                    try:
                        found.append((name, os.stat(os.path.join(dirpath, f)).st_size))
                    except FileNotFoundError:
                        continue
        yield from sorted(found)

    def list_aged(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        """Like :meth:`list`, with each object's modification time (seconds since the epoch)."""
        for name, size in self.list(prefix):
            try:
                yield name, size, os.stat(self.root / name).st_mtime
            except FileNotFoundError:
                continue

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def sync(self) -> None:
        """Make every object put so far durable: fsync of each file put since the last sync,
        then of each directory that got an entry (ext4, xfs: each new directory's parent), or
        one syncfs when there are many. On a
        failure what was not synced is kept for the next call, and StoreError is raised."""
        with self._lock:
            files, dirs, made = self._unsynced, self._unsynced_dirs, self._new_dirs
            self._unsynced, self._unsynced_dirs, self._new_dirs = set(), set(), {}
        if not files and not dirs and not made:
            return
        # the directories holding the entries of new directories; and (except on ext4, xfs)
        # those that got objects; each once, the deepest first
        parents = {d.parent for d in made if d != self.root}
        todo = parents | {Path(d) for d in dirs} if not self._names_with_files else parents
        try:
            # what a parent of directories found (not created) holds now is durable once it is
            # synced (listed first: an entry added meanwhile is not counted)
            listed = {d.parent: os.listdir(d.parent) for d, mine in made.items()
                      if not mine and d != self.root}
            if len(files) + len(todo) > SYNCFS_ABOVE:
                self._syncfs()
            else:
                _fsync_all(sorted(files), os.O_RDONLY)
                _fsync_all(sorted(todo, key=lambda d: len(d.parts), reverse=True),
                           os.O_RDONLY | os.O_DIRECTORY)
            with self._lock:
                for d, names in listed.items():
                    self._durable.setdefault(d, set()).update(names)
        except OSError as e:
            with self._lock:
                self._unsynced |= files
                self._unsynced_dirs |= dirs
                self._new_dirs.update(made)
            raise StoreError(f"cannot sync the store {self.root}: {e.strerror}") from None

    def _syncfs(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


def _check_name(name: str) -> None:
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise StoreError(f"invalid object name {name!r}")


def _make_dirs(path: Path) -> list[Path]:
    """Create directory ``path`` and the missing ones above it (0700); the ones created."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return []
    except FileNotFoundError:
        made = _make_dirs(path.parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return made
        return [*made, path]
    return [path]


def _fsync_all(paths: list[str] | list[Path], flags: int) -> None:
    """fsync each of ``paths`` (one deleted meanwhile, an object collected, needs nothing).
    One after the other: the first one's journal commit covers the others' names and new
    blocks as far as their writeback has begun; starting it for all first (sync_file_range)
    cost more than it saved on a busy machine (it blocks while the journal commits)."""
    for p in paths:
        try:
            fd = os.open(p, flags)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
