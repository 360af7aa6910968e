"""The vault config: format version, vault id, chunk size and key slots.

The config is stored in the store as the object ``config`` (so a vault can be opened from the
store alone) and copied into the local config file (mode 0600). It is JSON; the master key
appears only wrapped (AES-256-GCM under a scrypt-derived key) in its passphrase slots, and the
whole document is authenticated with an HMAC under a sub-key of the master key, checked after
unlocking. See docs/FORMAT.md.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptfs import crypto
from cryptfs.errors import AuthError, ConfigError, IntegrityError

FORMAT = "cryptfs"
VERSION = 1
CONFIG_OBJECT = "config"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


def _slot_aad(vault_id: bytes, slot_id: str) -> bytes:
    return b"cryptfs/keyslot/v1\0" + vault_id + slot_id.encode()


@dataclass
class VaultConfig:
    vault_id: bytes
    chunk_size: int
    slots: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""
    mac: str = ""

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls, passphrase: bytes, chunk_size: int, scrypt_n: int | None = None, created: str = ""
    ) -> tuple[VaultConfig, bytes]:
        """A new config with a random master key wrapped under ``passphrase``."""
        if not passphrase:
            raise AuthError("the passphrase must not be empty")
        master = crypto.random_bytes(crypto.KEY_SIZE)
        cfg = cls(vault_id=crypto.random_bytes(16), chunk_size=chunk_size, created=created)
        cfg.add_passphrase_slot(master, passphrase, scrypt_n)
        cfg.sign(master)
        return cfg, master

    def add_passphrase_slot(
        self, master: bytes, passphrase: bytes, scrypt_n: int | None = None
    ) -> None:
        n = scrypt_n or int(os.environ.get("CRYPTFS_SCRYPT_N", crypto.SCRYPT_DEFAULT_N))
        salt = crypto.random_bytes(16)
        kek = crypto.derive_kek(passphrase, salt, n)
        slot_id = crypto.random_bytes(4).hex()
        wrapped = crypto.seal(kek, master, _slot_aad(self.vault_id, slot_id))
        self.slots.append(
            {
                "id": slot_id,
                "type": "passphrase",
                "kdf": {
                    "name": "scrypt",
                    "salt": _b64(salt),
                    "n": n,
                    "r": crypto.SCRYPT_R,
                    "p": crypto.SCRYPT_P,
                },
                "wrapped": _b64(wrapped),
            }
        )

    # -- authentication ---------------------------------------------------------------------
    def _signed_bytes(self) -> bytes:
        body = self.to_dict()
        body.pop("mac", None)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def sign(self, master: bytes) -> None:
        key = crypto.subkey(master, self.vault_id, crypto.PURPOSE_CONFIG)
        self.mac = crypto.mac(key, self._signed_bytes()).hex()

    def unlock(self, passphrase: bytes) -> bytes:
        """Return the master key, or raise AuthError. Checks the config's MAC."""
        master = None
        for slot in self.slots:
            if slot.get("type") != "passphrase":
                continue
            kdf = slot["kdf"]
            kek = crypto.derive_kek(
                passphrase, _unb64(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
            )
            try:
                master = crypto.open_sealed(
                    kek, _unb64(slot["wrapped"]), _slot_aad(self.vault_id, slot["id"])
                )
                break
            except IntegrityError:
                continue
        if master is None:
            raise AuthError("wrong passphrase")
        key = crypto.subkey(master, self.vault_id, crypto.PURPOSE_CONFIG)
        try:
            tag = bytes.fromhex(self.mac)
        except ValueError:
            tag = b""
        if not crypto.verify_mac(key, self._signed_bytes(), tag):
            raise IntegrityError(
                "the vault config fails authentication",
                hint="it was modified by someone without the key",
            )
        return master

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "vault_id": self.vault_id.hex(),
            "chunk_size": self.chunk_size,
            "created": self.created,
            "slots": self.slots,
            "mac": self.mac,
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_dict(cls, d: Any, where: str) -> VaultConfig:
        try:
            if d.get("format") != FORMAT:
                raise ConfigError(f"{where} is not a cryptfs vault config")
            if d.get("version") != VERSION:
                raise ConfigError(f"{where} has unsupported format version {d.get('version')}")
            cfg = cls(
                vault_id=bytes.fromhex(d["vault_id"]),
                chunk_size=int(d["chunk_size"]),
                slots=list(d["slots"]),
                created=str(d.get("created", "")),
                mac=str(d["mac"]),
            )
            if len(cfg.vault_id) != 16 or not (4096 <= cfg.chunk_size <= 64 << 20):
                raise ValueError
            for s in cfg.slots:
                _ = (s["id"], s["type"], s["wrapped"])
            return cfg
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(
                f"{where} is corrupt (missing or malformed fields)",
                hint="move it away and run 'cryptfs init STORE_URL' to attach the vault from "
                "its store again",
            ) from None

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> VaultConfig:
        try:
            d = json.loads(data.decode())
        except (UnicodeDecodeError, ValueError):
            raise ConfigError(f"{where} is corrupt (not valid JSON)") from None
        return cls.from_dict(d, where)
