"""Exceptions that cross layer boundaries.

Every error a user can cause or meet is a :class:`CryptfsError` with a one-line message and an
exit code; the CLI prints ``cryptfs: <message>`` and exits with that code, never a traceback.
"""

from __future__ import annotations

import errno as _errno
import os as _os


def os_error(code: int) -> OSError:
    """The error a filesystem operation answers with ``code`` (an errno)."""
    return OSError(code, _os.strerror(code))


class CryptfsError(Exception):
    """An error with a one-line, user-facing message and a stable exit code."""

    exit_code = 1
    errno = _errno.EIO  # what a filesystem call that this error ends answers

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def line(self) -> str:
        msg = str(self)
        return f"{msg} ({self.hint})" if self.hint else msg


class UsageError(CryptfsError):
    """Bad arguments or options."""

    exit_code = 2


class AuthError(CryptfsError):
    """Wrong passphrase or key."""

    exit_code = 3


class ConfigError(CryptfsError):
    """Missing, corrupt or unsupported vault config or local state."""

    exit_code = 4


class StoreError(CryptfsError):
    """The object store cannot be reached or refused an operation."""

    exit_code = 5


class StoreFull(StoreError):
    """The store (or the local staging area) has no space left."""

    errno = _errno.ENOSPC


class ObjectNotFound(StoreError):
    """The named object does not exist in the store."""


class IntegrityError(CryptfsError):
    """Stored data or the ledger does not match what was recorded: tampering or corruption."""

    exit_code = 6


class ObjectTooLarge(IntegrityError):
    """A store returned (or announced) more bytes for an object than cryptfs reads of it."""


class MetaError(CryptfsError):
    """The metadata database failed an operation (it was rolled back)."""

    exit_code = 4


class MetaFull(MetaError):
    """The metadata database's disk is full."""

    errno = _errno.ENOSPC


class MountError(CryptfsError):
    """The mountpoint is unusable or the mount failed."""

    exit_code = 7


class LockedError(CryptfsError):
    """The vault is in use by another mount."""

    exit_code = 8
