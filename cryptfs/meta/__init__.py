"""The metadata layer: one engine interface (:mod:`cryptfs.meta.engine`), engines behind it.

Engines: SQLite (:mod:`cryptfs.meta.sqlite`, the embedded default) and PostgreSQL
(:mod:`cryptfs.meta.postgres`, every row sealed, for several machines on one vault). Everything
above this layer (the ledger, the vault, the filesystem, fsck) talks to an engine only through
the interface; ``tests/test_35_meta_engine.py`` is the conformance suite every engine must pass,
and ``tests/test_05_layers.py`` checks that no SQL or database driver is used outside the
engines.
"""

from cryptfs.meta.engine import ROOT_INO, Changed, Frozen, Inode, LedgerRow, MetaEngine

__all__ = ["ROOT_INO", "Changed", "Frozen", "Inode", "LedgerRow", "MetaEngine"]
