"""The vault config: format version, vault id, chunk size and key slots.

The config is stored in the store as the object ``config`` (so a vault can be opened from the
store alone) and copied into the local config file (mode 0600). It is JSON; the master key
appears only wrapped in its key slots (AES-256-GCM under a scrypt-derived key for a passphrase,
RSA-OAEP-SHA256 for a public key), and the whole document is authenticated with an HMAC under a
sub-key of the master key, checked after unlocking. See docs/FORMAT.md.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptfs import crypto, layout
from cryptfs.errors import AuthError, ConfigError, IntegrityError, UsageError

FORMAT = "cryptfs"
VERSION = 2  # 2 adds ``generation``; version 1 configs (no generation) still open
VERSIONS = (1, 2)
CONFIG_OBJECT = layout.CONFIG
PUBLIC_KEY_SLOT = "public-key"
RSA_OAEP_ALG = "rsa-oaep-sha256"
RSA_MIN_BITS = 3072
MAX_SLOTS = 32


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


def _slot_aad(vault_id: bytes, slot_id: str) -> bytes:
    return b"cryptfs/keyslot/v1\0" + vault_id + slot_id.encode()


def public_key_fingerprint(public_key: Any) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo of an RSA public key."""
    return crypto.sha256(public_key.export_key(format="DER")).hex()


@dataclass
class VaultConfig:
    vault_id: bytes
    chunk_size: int
    slots: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""
    mac: str = ""
    generation: int = 0  # +1 at every signed change; 0: a version 1 config (none recorded)

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
        self,
        master: bytes,
        passphrase: bytes,
        scrypt_n: int | None = None,
        *,
        slot_id: str | None = None,
        label: str = "",
    ) -> str:
        """Wrap the master key under ``passphrase`` in a new slot; returns its id."""
        if not passphrase:
            raise AuthError("the passphrase must not be empty")
        n = scrypt_n or int(os.environ.get("CRYPTFS_SCRYPT_N", crypto.SCRYPT_DEFAULT_N))
        salt = crypto.random_bytes(16)
        kek = crypto.derive_kek(passphrase, salt, n)
        slot_id = slot_id or self._new_slot_id()
        wrapped = crypto.seal(kek, master, _slot_aad(self.vault_id, slot_id))
        slot: dict[str, Any] = {
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
        if label:
            slot["label"] = label
        self.slots.append(slot)
        return slot_id

    # -- authentication ---------------------------------------------------------------------
    def _signed_bytes(self) -> bytes:
        body = self.to_dict()
        body.pop("mac", None)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def sign(self, master: bytes) -> None:
        """Start the next generation of this config and authenticate it. A reader refuses a
        config older than the newest generation it has seen (rollback of the store's config)."""
        self.generation += 1
        key = crypto.subkey(master, self.vault_id, crypto.PURPOSE_CONFIG)
        self.mac = crypto.mac(key, self._signed_bytes()).hex()

    def verify_mac(self, master: bytes) -> bool:
        return self.mac_ok(crypto.subkey(master, self.vault_id, crypto.PURPOSE_CONFIG))

    def mac_ok(self, config_key: bytes) -> bool:
        """Whether the config MAC verifies under the config sub-key (constant time)."""
        try:
            tag = bytes.fromhex(self.mac)
        except ValueError:
            tag = b""
        return crypto.verify_mac(config_key, self._signed_bytes(), tag)

    def _checked(self, master: bytes) -> bytes:
        if not self.verify_mac(master):
            raise IntegrityError(
                "the vault config fails authentication",
                hint="it was modified by someone without the key",
            )
        return master

    def unlock(self, passphrase: bytes) -> bytes:
        """Return the master key, or raise AuthError. Checks the config's MAC."""
        return self.unlock_slot(passphrase)[0]

    def unlock_slot(self, passphrase: bytes) -> tuple[bytes, str]:
        """(master key, id of the passphrase slot that opened it), or AuthError."""
        for slot in self.slots:
            if slot.get("type") != "passphrase":
                continue
            try:
                return self._checked(self._open_passphrase_slot(slot, passphrase)), slot["id"]
            except AuthError:
                continue
        raise AuthError("wrong passphrase")  # exactly this line: tests and scripts match it

    def _open_passphrase_slot(self, slot: dict[str, Any], passphrase: bytes) -> bytes:
        kdf = slot["kdf"]
        kek = crypto.derive_kek(
            passphrase, _unb64(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        )
        try:
            return crypto.open_sealed(
                kek, _unb64(slot["wrapped"]), _slot_aad(self.vault_id, slot["id"])
            )
        except IntegrityError:
            raise AuthError("wrong passphrase") from None

    def unlock_private_key(self, private_key: Any) -> tuple[bytes, str]:
        """(master key, slot id) from the public-key slot matching an RSA private key."""
        from Crypto.Cipher import PKCS1_OAEP
        from Crypto.Hash import SHA256

        fp = public_key_fingerprint(private_key.publickey())
        for slot in self.slots:
            if slot.get("type") != PUBLIC_KEY_SLOT or slot.get("fingerprint") != fp:
                continue
            if slot.get("alg") != RSA_OAEP_ALG:
                continue
            cipher = PKCS1_OAEP.new(
                private_key, hashAlgo=SHA256, label=_slot_aad(self.vault_id, slot["id"])
            )
            try:
                master = cipher.decrypt(_unb64(slot["wrapped"]))
            except (ValueError, TypeError):
                continue
            if len(master) == crypto.KEY_SIZE:
                return self._checked(master), slot["id"]
        raise AuthError(
            "this private key opens no key slot of the vault",
            hint="see 'cryptfs key list' (fingerprint " + fp[:16] + ")",
        )

    def check_master(self, master: bytes) -> None:
        """Accept a master key given directly (key slots lost) if it verifies the config MAC."""
        if not self.verify_mac(master):
            raise AuthError(
                "this master key does not open the vault",
                hint="check the file; a config changed without the key also fails this way",
            )

    # -- key slots: public keys, removal, description -------------------------------------------
    def add_public_key_slot(self, master: bytes, public_key: Any, label: str = "") -> str:
        """Wrap the master key for an RSA public key (RSA-OAEP, SHA-256); returns the slot id."""
        from Crypto.Cipher import PKCS1_OAEP
        from Crypto.Hash import SHA256

        if public_key.size_in_bits() < RSA_MIN_BITS:
            raise UsageError(
                f"the public key has {public_key.size_in_bits()} bits; at least "
                f"{RSA_MIN_BITS} are required",
                hint="create one with 'cryptfs key generate FILE'",
            )
        slot_id = self._new_slot_id()
        cipher = PKCS1_OAEP.new(
            public_key.publickey(), hashAlgo=SHA256, label=_slot_aad(self.vault_id, slot_id)
        )
        slot: dict[str, Any] = {
            "id": slot_id,
            "type": PUBLIC_KEY_SLOT,
            "alg": RSA_OAEP_ALG,
            "bits": public_key.size_in_bits(),
            "fingerprint": public_key_fingerprint(public_key.publickey()),
            "wrapped": _b64(cipher.encrypt(master)),
        }
        if label:
            slot["label"] = label
        self.slots.append(slot)
        return slot_id

    def _new_slot_id(self) -> str:
        if len(self.slots) >= MAX_SLOTS:
            raise UsageError(f"the vault already has {MAX_SLOTS} key slots",
                             hint="remove one first with 'cryptfs key remove'")
        taken = {s.get("id") for s in self.slots}
        while True:
            slot_id = crypto.random_bytes(4).hex()
            if slot_id not in taken:
                return slot_id

    def find_slot(self, slot_id: str) -> dict[str, Any]:
        for s in self.slots:
            if s.get("id") == slot_id:
                return s
        raise UsageError(f"the vault has no key slot {slot_id!r}", hint="see 'cryptfs key list'")

    def remove_slot(self, slot_id: str) -> dict[str, Any]:
        slot = self.find_slot(slot_id)
        if len(self.slots) <= 1:
            raise UsageError(
                f"refusing to remove key slot {slot_id}: it is the last one and the vault "
                "could not be opened any more",
                hint="add another slot first with 'cryptfs key add'",
            )
        self.slots.remove(slot)
        return slot

    def replace_passphrase(self, master: bytes, slot_id: str, passphrase: bytes) -> None:
        """Re-wrap the master key under a new passphrase in the same slot (same id and place)."""
        slot = self.find_slot(slot_id)
        if slot.get("type") != "passphrase":
            raise UsageError(f"key slot {slot_id} is not a passphrase slot")
        at = self.slots.index(slot)
        label = slot.get("label", "")
        self.add_passphrase_slot(master, passphrase, slot_id=slot_id, label=label)
        self.slots[at] = self.slots.pop()

    def describe_slots(self) -> list[dict[str, Any]]:
        """One summary per slot (nothing secret): id, type and what identifies it."""
        out = []
        for s in self.slots:
            d: dict[str, Any] = {"id": s.get("id"), "type": s.get("type")}
            if s.get("type") == "passphrase":
                kdf = s.get("kdf", {})
                d["detail"] = f"scrypt N=2^{int(kdf.get('n', 1)).bit_length() - 1}"
            elif s.get("type") == PUBLIC_KEY_SLOT:
                d["detail"] = (f"{s.get('alg')} {s.get('bits')} bits, fingerprint "
                               f"SHA256:{str(s.get('fingerprint', ''))[:32]}")
                d["fingerprint"] = s.get("fingerprint")
            else:
                d["detail"] = "unknown slot type"
            if s.get("label"):
                d["label"] = s["label"]
            out.append(d)
        return out

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION if self.generation else 1,
            "vault_id": self.vault_id.hex(),
            "chunk_size": self.chunk_size,
            "created": self.created,
            "slots": self.slots,
            "mac": self.mac,
        }
        if self.generation:  # a version 1 config stays byte-identical (its MAC covers it)
            d["generation"] = self.generation
        return d

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_dict(cls, d: Any, where: str) -> VaultConfig:
        try:
            if d.get("format") != FORMAT:
                raise ConfigError(f"{where} is not a cryptfs vault config")
            version = d.get("version")
            if version not in VERSIONS or isinstance(version, bool):
                raise ConfigError(f"{where} has unsupported format version {version}",
                                  hint="a newer cryptfs wrote it")
            generation = d.get("generation", 0) if version == 2 else 0
            if version == 2 and (type(generation) is not int or not 1 <= generation < 2**53):
                raise ValueError
            if version == 1 and "generation" in d:
                raise ValueError
            cfg = cls(
                vault_id=bytes.fromhex(d["vault_id"]),
                chunk_size=int(d["chunk_size"]),
                slots=list(d["slots"]),
                created=str(d.get("created", "")),
                mac=str(d["mac"]),
                generation=generation,
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
    def from_store(cls, store: Any) -> VaultConfig:
        """The config object of ``store``; ConfigError if the store holds no vault."""
        from cryptfs.errors import ObjectNotFound

        try:
            raw = store.get(CONFIG_OBJECT, layout.MAX_CONFIG)
        except ObjectNotFound:
            raise ConfigError(
                f"the store {store.url} holds no cryptfs vault (no config object)",
                hint="check the URL, or the store was wiped; 'cryptfs init URL' creates one",
            ) from None
        return cls.from_bytes(raw, f"{store.url}/{CONFIG_OBJECT}")

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> VaultConfig:
        try:
            d = json.loads(data.decode())
        except (UnicodeDecodeError, ValueError):
            raise ConfigError(f"{where} is corrupt (not valid JSON)") from None
        return cls.from_dict(d, where)
