"""The object store contract: a flat namespace of immutable objects.

Names are ``/``-separated ASCII strings such as ``data/ab/ab12...``. An object, once put, is never
changed in place by cryptfs; a new version of anything is a new name. Implementations must be
safe to call from several threads at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from cryptfs.errors import ObjectTooLarge


def too_large(name: str, size: int | None, max_size: int) -> ObjectTooLarge:
    """The error for an object bigger than cryptfs reads of it (``size`` None: unknown)."""
    has = f"{size} bytes" if size is not None else "more bytes"
    return ObjectTooLarge(f"object {name} has {has}, more than the {max_size} expected: "
                          "refusing to read it")


class ObjectStore(Protocol):
    """What every store (local directory, S3 bucket, memory) provides."""

    url: str

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, atomically: readers see all of it or nothing. When
        this returns the object survives a crash of this process; after :meth:`sync` it is
        durable (S3: already when the PUT is acknowledged)."""

    def sync(self) -> None:
        """Make every object put so far durable (local: syncfs; S3: nothing to do)."""

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create ``name`` only if it does not exist (a conditional write where the store
        supports it); return False if it exists. Used for the mount lease only."""

    def get(self, name: str, max_size: int) -> bytes:
        """Return the object's bytes; raise :class:`cryptfs.errors.ObjectNotFound` if absent
        and :class:`cryptfs.errors.ObjectTooLarge` (naming the object) if it has more than
        ``max_size`` bytes. The bound is enforced before or while the body is read, so an
        oversized object never costs more than ``max_size`` bytes of memory (see
        :mod:`cryptfs.layout` for the bounds each kind of object is read with)."""

    def delete(self, name: str) -> None:
        """Remove the object. Deleting an absent object is not an error."""

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Yield ``(name, size)`` for every object whose name starts with ``prefix``."""

    def list_aged(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        """Yield ``(name, size, modification time in seconds since the epoch)``."""

    def exists(self, name: str) -> bool:
        """True if the object exists."""

    def close(self) -> None:
        """Release connections and file handles."""
