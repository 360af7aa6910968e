"""The object store contract: a flat namespace of immutable objects.

Names are ``/``-separated ASCII strings such as ``data/ab/ab12...``. An object, once put, is never
changed in place by cryptfs; a new version of anything is a new name. Implementations must be
safe to call from several threads at once.

A store is either *plain* (one directory, one bucket, memory: :class:`PlainStore` gives the
parts of the contract that only matter with copies) or keeps copies of every object on several
member stores (:class:`cryptfs.stores.replicated.ReplicatedStore`). Nothing above this package
asks which: what replication needs is in the contract (``get(check=)``, :meth:`drain`,
:attr:`members`, :meth:`targets`), and a plain store answers it with no members.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

from cryptfs.errors import IntegrityError, ObjectTooLarge
from cryptfs.format.layout import MAX_PACK

T = TypeVar("T")


def too_large(name: str, size: int | None, max_size: int) -> ObjectTooLarge:
    """The error for an object bigger than cryptfs reads of it (``size`` None: unknown)."""
    has = f"{size} bytes" if size is not None else "more bytes"
    return ObjectTooLarge(f"object {name} has {has}, more than the {max_size} expected: "
                          "refusing to read it")


def checked(name: str, blob: bytes, check: Callable[[bytes], bool] | None) -> bytes:
    """``blob`` if ``check`` (if any) accepts it; else IntegrityError naming the object."""
    if check is not None and not check(blob):
        raise IntegrityError(f"object {name} ({len(blob)} bytes) does not match its recorded "
                             "size and hash")
    return blob


class Member(Protocol):
    """One member store of a store that keeps copies on several, with its health. Calls made
    through :meth:`call` keep the health record; ``store`` is the member's own store (its own
    URL and credentials), for reading and writing that member's copy alone."""

    id: str  # the store id recorded in the metadata and the ledger
    store: ObjectStore
    failures: int  # calls failed in a row (0: it answers)
    latency: float  # moving average of its successful calls, seconds

    @property
    def url(self) -> str: ...

    def down(self) -> bool:
        """True while it is believed down (after a failure, until its back-off ends)."""

    def call(self, fn: Callable[[], T]) -> T:
        """Run one call on the member, recording success or failure (not-found is a healthy
        answer); errors are raised as they are."""


class ObjectStore(Protocol):
    """What every store (local directory, S3 bucket, memory, several of them) provides."""

    url: str
    members: Sequence[Member]
    """The member stores that each hold copies of their own (a replicated store), each with its
    id, URL and health: for status, verify, repair and the copy survey. Empty for a plain store,
    which keeps one copy and has nothing to level."""

    appendable: bool
    """Whether :meth:`append` works (a local directory); objects of other stores are only
    ever put whole."""

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, atomically: readers see all of it or nothing. When
        this returns the object survives a crash of this process; after :meth:`sync` it is
        durable (S3: already when the PUT is acknowledged). A replicated store returns once
        its quorum of members has the object; the other copies follow in the background."""

    def sync(self) -> None:
        """Make every object put so far durable (local: fsync of the files and directories
        written, or syncfs; S3: nothing to do)."""

    def append(self, name: str, at: int, data: bytes) -> None:
        """Write ``data`` into existing object ``name`` at offset ``at``, the end of what was
        put and appended before (an fsync log), durably: when this returns the object has it
        after a power loss. What the object holds from ``at`` on (zeros its writer put there
        ahead: overwriting blocks the disk holds already costs it one write, growing the file
        a journal commit too) is overwritten; the object grows where ``data`` goes past its
        end. On a failure the object is cut off at ``at`` (what was written of ``data`` is
        gone again) and StoreError is raised. Only where :attr:`appendable`; elsewhere
        NotImplementedError."""

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create ``name`` only if it does not exist (a conditional write where the store
        supports it); return False if it exists. Used for the mount lease only."""

    def get(self, name: str, max_size: int,
            check: Callable[[bytes], bool] | None = None) -> bytes:
        """Return the object's bytes; raise :class:`cryptfs.errors.ObjectNotFound` if absent
        and :class:`cryptfs.errors.ObjectTooLarge` (naming the object) if it has more than
        ``max_size`` bytes. The bound is enforced before or while the body is read, so an
        oversized object never costs more than ``max_size`` bytes of memory (see
        :mod:`cryptfs.format.layout` for the bounds each kind of object is read with).

        With ``check`` the bytes returned are ones ``check`` accepts: a plain store raises
        :class:`cryptfs.errors.IntegrityError` naming the object if its copy fails; a replicated
        store reads another member's copy instead (and re-writes the bad one in the background),
        and raises IntegrityError only if every copy fails."""

    def get_range(self, name: str, offset: int, length: int, size: int | None) -> bytes:
        """Bytes ``[offset, offset + length)`` of the object, which must have exactly ``size``
        bytes (its recorded size; ``0 <= offset``, ``0 < length``, ``offset + length <= size``):
        checked before any byte is used (local: the file's size; S3: the total in
        Content-Range), so a truncated or grown object is :class:`cryptfs.errors.IntegrityError`
        naming it, as is a short answer; ObjectNotFound if absent. Reads at most ``length``
        bytes (+1 to detect a longer answer). A store where a partial read is not worth it
        (several copies) may read the whole object (:func:`range_of_whole`).

        ``size`` None: a pack (docs/FORMAT.md 4.3), whose size nothing records and whose members
        are each authenticated: the object must merely hold the range (at most MAX_PACK
        bytes are read of it where a store reads whole)."""

    def delete(self, name: str) -> None:
        """Remove the object. Deleting an absent object is not an error. A replicated store
        removes it from every member that answers; a member's copy it could not delete is
        reported (``on_stray``) to be deleted later, and only if no member answered is it an
        error."""

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Yield ``(name, size)`` for every object whose name starts with ``prefix`` (a
        replicated store: the union of the members that answer)."""

    def list_aged(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        """Yield ``(name, size, modification time in seconds since the epoch)``."""

    def exists(self, name: str) -> bool:
        """True if the object exists."""

    def targets(self, name: str) -> list[Member]:
        """The members that should hold a copy of ``name`` (every member, or as many as the
        replication policy asks for); empty for a plain store."""

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for writes still running in the background (the
        copies a replicated store writes beyond its quorum, and re-writes of bad copies); True
        if none is left. This only waits for the copies beyond what :meth:`put` promised when it
        returned (a plain store has none: True at once)."""

    def close(self) -> None:
        """Release connections and file handles (background copies not finished are
        abandoned: :meth:`drain` first to keep them)."""


def check_range(name: str, offset: int, length: int, size: int | None) -> None:
    """Refuse a range outside an object of ``size`` bytes (a caller's mistake: ValueError)."""
    if offset < 0 or length <= 0 or (size is not None and offset + length > size):
        raise ValueError(f"bad range {offset}+{length} of {name} ({size} bytes)")


def wrong_size(name: str, got: int | None, size: int | None) -> IntegrityError:
    """The error for an object whose stored size is not its recorded one (``size`` None: a
    pack too short for the range read)."""
    has = "another number of" if got is None else str(got)
    if size is None:
        return IntegrityError(f"object {name} has {has} bytes, fewer than its members need")
    return IntegrityError(f"object {name} has {has} bytes, expected {size}")


def size_fits(got: int, size: int | None, offset: int, length: int) -> bool:
    """Whether an object of ``got`` bytes is the one a range read of ``[offset, offset +
    length)`` expects: exactly ``size`` bytes, or (``size`` None, a pack) enough."""
    return got == size if size is not None else got >= offset + length


def range_of_whole(store: ObjectStore, name: str, offset: int, length: int,
                   size: int | None) -> bytes:
    """:meth:`ObjectStore.get_range` by a whole :meth:`ObjectStore.get` (bounded by ``size``,
    or MAX_PACK for a pack; a copy of another size counting as bad), then a slice."""
    check_range(name, offset, length, size)
    blob = store.get(name, MAX_PACK if size is None else size,
                     check=lambda b: size_fits(len(b), size, offset, length))
    return blob[offset : offset + length]


class PlainStore:
    """The replication part of :class:`ObjectStore` for a store that keeps one copy: no
    members, nothing written in the background. Its ``get`` applies ``check`` with
    :func:`checked`."""

    members: Sequence[Member] = ()
    appendable = False

    def append(self, name: str, at: int, data: bytes) -> None:
        raise NotImplementedError(f"{type(self).__name__} objects are put whole")

    def targets(self, name: str) -> list[Member]:
        return []

    def drain(self, timeout: float) -> bool:
        return True
