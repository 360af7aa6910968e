"""Filesystem operations: POSIX semantics over the metadata engine and the chunk store.

Inode-based and independent of FUSE; the contract (what is durable when each call returns) is
in :mod:`cryptfs.fs.base`.
"""

from __future__ import annotations

from cryptfs.fs.attrs import Attributes
from cryptfs.fs.base import DIR_SIZE, HIDDEN, NAME_MAX, FileSystemBase
from cryptfs.fs.hooks import CommitHooks
from cryptfs.fs.journal import Journal
from cryptfs.fs.locks import Locks
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.reads import Reads
from cryptfs.fs.writes import Writes

__all__ = ["DIR_SIZE", "HIDDEN", "NAME_MAX", "CommitHooks", "FileSystem"]


class FileSystem(Namespace, Attributes, Reads, Writes, Journal, Locks, FileSystemBase):
    """The filesystem: every operation group over the shared state of
    :class:`~cryptfs.fs.base.FileSystemBase`."""
