"""File locks shared by several machines (a PostgreSQL vault, ``meta.shared``).

``fcntl`` record locks and ``flock`` are kept by the engine (:meth:`MetaEngine.set_lock`), so
a lock set on one machine holds against every other; the rules are
:mod:`cryptfs.meta.locks`'. A vault of one machine (SQLite) keeps the kernel's own locks: the
FUSE adapter registers these operations only for a shared engine.

None of these calls takes the filesystem's lock (a waiting lock must not stop the mount); the
engine serialises its lock calls itself. A blocking lock (F_SETLKW, ``flock`` without
LOCK_NB) tries again each time a lock is released on any machine
(:meth:`Locks.locks_released`, from the engine's notices), and at least with backoff (from
:data:`POLL_FIRST` doubling to :data:`POLL_MAX` seconds: a notice lost costs no more), and
ends as soon as ``interrupted()`` answers an errno: the FUSE adapter answers EINTR once the
waiting process got a signal (the kernel then asks libfuse to interrupt the request), ENOLCK
once the mount is ending.

Releases: POSIX locks go when their owner closes any descriptor of the file (libfuse's flush
unlocks the whole file for that owner: :meth:`Locks.setlk` with F_UNLCK), ``flock`` on the
last close of the open file description (:meth:`Locks.release_flock`); all of a machine's
locks go with its session (unmount, or a live machine reaping it once expired). To keep
closes cheap, an unlock asks the engine only for an owner that locked something on the file
during this mount.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptfs.errors import os_error as _err
from cryptfs.fs.base import FileSystemBase
from cryptfs.meta.locks import F_UNLCK, FLOCK, OFFSET_MAX, POSIX, Held

POLL_FIRST = 0.005
POLL_MAX = 1.0
INTERRUPT_CHECK = 0.01  # how often a waiting lock asks whether it was interrupted
# Each waiting lock takes one of libfuse's worker threads until it is granted: beyond this many
# waiting at once a blocking lock answers ENOLCK (one log line each) rather than wait, so the
# mount, which runs LOCK_THREADS workers, always has threads left for everything else.
MAX_WAITING = 48
LOCK_THREADS = MAX_WAITING + 16

log = logging.getLogger("cryptfs.fs")


class Locks(FileSystemBase):
    """Record locks and flocks of open files, kept by the engine for every machine."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (ino, owner, kind) that locked something during this mount, each with the
        # generation of its last lock, so a close (which unlocks) asks the engine only for
        # those; guarded by their own mutex, not self.lock
        self._lockers: dict[tuple[int, int, str], int] = {}
        self._lockers_gen = 0
        self._waiting = 0  # blocking locks waiting now
        self._lockers_mutex = threading.Lock()
        # waiting locks sleep on this; locks_released() wakes them (the generation grows)
        self._released = threading.Condition()
        self._released_gen = 0

    def locks_released(self) -> None:
        """A machine (this one too) released or downgraded a file lock: the waiting locks
        try again at once (else at their next poll)."""
        with self._released:
            self._released_gen += 1
            self._released.notify_all()

    def _mark(self, key: tuple[int, int, str]) -> None:
        with self._lockers_mutex:
            self._lockers_gen += 1
            self._lockers[key] = self._lockers_gen

    def getlk(self, ino: int, owner: int, ltype: int, start: int, end: int) -> Held | None:
        """F_GETLK: the lock of another owner, on any machine, that a lock of ``ltype`` over
        ``[start, end]`` of ``ino`` (an open file) would conflict with (None: it would not)."""
        return self.meta.test_lock(ino, owner, POSIX, ltype, start, end)

    def setlk(self, ino: int, owner: int, ltype: int, start: int, end: int, pid: int,
              wait: bool, interrupted: Callable[[], int]) -> None:
        """F_SETLK (``wait`` False: EAGAIN on a conflict) or F_SETLKW (waits, until
        ``interrupted()`` answers an errno: see :meth:`_wait`) of owner ``owner`` (the
        kernel's lock owner) on ``ino`` (an open file); F_UNLCK unlocks."""
        self._set(ino, owner, POSIX, ltype, start, end, pid, wait, interrupted)

    def flock(self, ino: int, owner: int, ltype: int, wait: bool,
              interrupted: Callable[[], int]) -> None:
        """``flock`` (F_RDLCK for LOCK_SH, F_WRLCK for LOCK_EX, F_UNLCK for LOCK_UN) of the
        open file description ``owner`` on ``ino``; ``wait`` as for
        :meth:`setlk` (False: LOCK_NB, EWOULDBLOCK on a conflict)."""
        self._set(ino, owner, FLOCK, ltype, 0, OFFSET_MAX, 0, wait, interrupted)

    def release_flock(self, ino: int, owner: int) -> None:
        """The open file description ``owner`` is closed for good (its last descriptor): its
        flock goes."""
        self._set(ino, owner, FLOCK, F_UNLCK, 0, OFFSET_MAX, 0, False,
                  lambda: 0)

    def _set(self, ino: int, owner: int, kind: str, ltype: int, start: int, end: int,
             pid: int, wait: bool, interrupted: Callable[[], int]) -> None:
        key = (ino, owner, kind)
        if ltype == F_UNLCK:
            with self._lockers_mutex:
                gen = self._lockers.get(key)
            if gen is None:
                return  # (every close unlocks: no round trip for an owner that never locked)
        else:
            self._mark(key)
        if wait:
            self._wait(ino, owner, kind, ltype, start, end, pid, interrupted)
        elif self.meta.set_lock(ino, owner, kind, ltype, start, end, pid) is not None:
            raise _err(errno.EAGAIN)
        if ltype != F_UNLCK:
            self._mark(key)  # (again: a whole unlock that ran meanwhile must not forget it)
        elif start == 0 and end == OFFSET_MAX:
            with self._lockers_mutex:
                if self._lockers.get(key) == gen:  # (no lock of the key since it was read)
                    del self._lockers[key]

    def _wait(self, ino: int, owner: int, kind: str, ltype: int, start: int, end: int,
              pid: int, interrupted: Callable[[], int]) -> None:
        """Set the lock once no other owner's conflicts: tried again after each release a
        notice tells of, and with backoff; ends with the errno ``interrupted()`` answers
        once it answers one (0: go on waiting), ENOLCK if MAX_WAITING locks wait already."""
        with self._released:
            gen = self._released_gen  # (read before each try: a release after it wakes us)
        if self.meta.set_lock(ino, owner, kind, ltype, start, end, pid) is None:
            return
        with self._lockers_mutex:
            if self._waiting >= MAX_WAITING:
                log.warning("%d file locks wait already: a blocking lock answers ENOLCK",
                            self._waiting)
                raise _err(errno.ENOLCK)
            self._waiting += 1
        try:
            delay = POLL_FIRST
            while True:
                until = time.monotonic() + delay
                while True:
                    code = interrupted()
                    if code:
                        raise _err(code)
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    with self._released:
                        if self._released_gen == gen:
                            self._released.wait(min(left, INTERRUPT_CHECK))
                        if self._released_gen != gen:
                            break
                with self._released:
                    gen = self._released_gen
                if self.meta.set_lock(ino, owner, kind, ltype, start, end, pid) is None:
                    return
                delay = min(delay * 2, POLL_MAX)
        finally:
            with self._lockers_mutex:
                self._waiting -= 1
