"""The keys of a vault's PostgreSQL metadata database (:mod:`cryptfs.meta.postgres`), in a module
of their own: the vault derives them at open without importing the engine and its driver
(psycopg), which only a vault with its metadata in PostgreSQL loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptfs.format import crypto


@dataclass(frozen=True)
class DbKeys:
    """The engine's keys: ``row`` seals row contents (AES-256-GCM), ``name`` encrypts entry
    names deterministically (AES-SIV, 64 bytes), ``index`` hashes row identities into key
    columns (keyed BLAKE2b)."""

    row: bytes = field(repr=False)
    name: bytes = field(repr=False)
    index: bytes = field(repr=False)

    @classmethod
    def derive(cls, master: bytes, vault_id: bytes) -> DbKeys:
        """The keys of a vault's database, derived from its master key as the codec derives
        its own (HKDF-SHA256, salt the vault id, one purpose string each)."""
        return cls(
            crypto.subkey(master, vault_id, crypto.PURPOSE_DB_ROW),
            crypto.subkey(master, vault_id, crypto.PURPOSE_DB_NAME)
            + crypto.subkey(master, vault_id, crypto.PURPOSE_DB_NAME + b" 2"),
            crypto.subkey(master, vault_id, crypto.PURPOSE_DB_INDEX),
        )
