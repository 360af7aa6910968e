"""File locks shared by several machines: the rules, independent of where the locks are kept.

Two kinds, as the Linux kernel keeps them on one machine, and as independent of each other as
there (a ``flock`` never conflicts with a POSIX record lock):

- ``POSIX`` record locks (``fcntl`` F_GETLK/F_SETLK/F_SETLKW, ``lockf``): byte ranges, read
  (shared) or write (exclusive), per lock owner. An owner's new lock replaces what it held of
  the range (splitting its ranges, converting read to write and back) and merges with its
  adjacent or overlapping ranges of the same type; an unlock of a range splits too.
- ``FLOCK`` (BSD ``flock``): the whole file, shared or exclusive, per open file description
  (the kernel's lock owner of a flock).

A lock is :class:`Held`: its type (``F_RDLCK``/``F_WRLCK``), its range ``[start, end]`` (both
inclusive, ``end`` :data:`OFFSET_MAX` for "to the end of the file, however long") and the pid
of the process that set it. An owner is whatever tells owners apart (an engine: the machine's
session and the kernel's lock owner).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterable
from dataclasses import dataclass

POSIX = "posix"
FLOCK = "flock"
OFFSET_MAX = (1 << 63) - 1
F_RDLCK, F_WRLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK


@dataclass(frozen=True)
class Held:
    """One lock: ``ltype`` F_RDLCK or F_WRLCK over ``[start, end]``, set by process ``pid``."""

    ltype: int
    start: int
    end: int
    pid: int


def conflict(others: Iterable[Held], ltype: int, start: int, end: int) -> Held | None:
    """The first of other owners' locks ``others`` that a lock of ``ltype`` over
    ``[start, end]`` conflicts with (overlapping, and one of the two a write lock); None if
    there is none (an unlock conflicts with nothing)."""
    if ltype == F_UNLCK:
        return None
    for h in others:
        if h.start <= end and start <= h.end and F_WRLCK in (ltype, h.ltype):
            return h
    return None


def apply(own: Iterable[Held], ltype: int, start: int, end: int, pid: int) -> list[Held]:
    """An owner's locks ``own`` after it sets ``ltype`` (F_UNLCK: unlocks) over
    ``[start, end]``: what it held there is cut out (ranges split around it), the new lock
    put in and merged with the owner's adjacent or overlapping locks of the same type.
    Sorted by start."""
    out: list[Held] = []
    for h in own:
        if h.end < start or h.start > end:
            out.append(h)
            continue
        if h.start < start:
            out.append(Held(h.ltype, h.start, start - 1, h.pid))
        if h.end > end:
            out.append(Held(h.ltype, end + 1, h.end, h.pid))
    if ltype != F_UNLCK:
        new = Held(ltype, start, end, pid)
        keep = []
        for h in out:  # same type, touching or overlapping: one range
            if h.ltype == ltype and h.start <= new.end + 1 and new.start <= h.end + 1:
                new = Held(ltype, min(h.start, new.start), max(h.end, new.end), pid)
            else:
                keep.append(h)
        out = keep + [new]
    return sorted(out, key=lambda h: h.start)
