"""The vault config: format version, vault id, chunk size, chunk name hash and key slots.

The config is stored in the store as the object ``config`` (so a vault can be opened from the
store alone) and copied into the local config file (mode 0600). It is JSON; the master key
appears only wrapped in its key slots (AES-256-GCM under a scrypt-derived key for a passphrase,
RSA-OAEP-SHA256 for a public key), and the whole document is authenticated with an HMAC under a
sub-key of the master key, checked after unlocking. See docs/FORMAT.md.

Longer than ~400 lines: the config format and every validation rule a hostile config must pass
(docs/FORMAT.md section 3) belong together.
"""

from __future__ import annotations

import base64
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from cryptfs.errors import AuthError, ConfigError, IntegrityError, UsageError
from cryptfs.format import crypto, layout

FORMAT = "cryptfs"
# 2 adds ``generation``, 3 ``name_hash`` (new vaults name chunks with BLAKE3); versions 1 and 2
# (BLAKE2b names) still open and keep their version and names
VERSION = 3
VERSIONS = (1, 2, 3)
NEW_NAME_HASH = "blake3"  # a new vault's
CONFIG_OBJECT = layout.CONFIG
PUBLIC_KEY_SLOT = "public-key"
RSA_OAEP_ALG = "rsa-oaep-sha256"
RSA_MIN_BITS = 3072
RSA_MAX_BITS = 16384
MAX_SLOTS = 32
MAX_LABEL = 200
SLOT_ID_RE = re.compile(r"[0-9a-f]{8}")
FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
HEX32_RE = re.compile(r"[0-9a-f]{32}")
PASSPHRASE_SLOT_KEYS = {"id", "type", "kdf", "wrapped", "label"}
PUBLIC_KEY_SLOT_KEYS = {"id", "type", "alg", "bits", "fingerprint", "wrapped", "label"}
KDF_KEYS = {"name", "salt", "n", "r", "p"}
WRAPPED_PASSPHRASE_LEN = crypto.SEAL_OVERHEAD + crypto.KEY_SIZE


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


# -- validation of key slots (every field is checked before anything uses it) --------------------
class _Bad(Exception):
    """A slot breaks a format rule; the message says which (becomes a ConfigError)."""


def _field_b64(d: dict[str, Any], key: str, what: str, lo: int, hi: int) -> bytes:
    v = d.get(key)
    if not isinstance(v, str) or len(v) > 4 * (hi // 3 + 1):
        raise _Bad(f"{what} is not a base64 string of at most {hi} bytes")
    try:
        raw = base64.b64decode(v.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):  # binascii.Error is a ValueError
        raise _Bad(f"{what} is not valid base64") from None
    if not lo <= len(raw) <= hi:
        raise _Bad(f"{what} has {len(raw)} bytes (expected {lo}" + (f" to {hi})" if hi > lo
                                                                   else ")"))
    return raw


def check_label(label: object) -> str | None:
    """What is wrong with a slot label (None if fine): a string of at most 200 characters
    without control characters (it is printed by 'key list' and 'info')."""
    if not isinstance(label, str):
        return "label is not a string"
    if len(label) > MAX_LABEL:
        return f"label is longer than {MAX_LABEL} characters"
    if any(unicodedata.category(c)[0] == "C" for c in label):
        return "label contains control characters"
    return None


def _check_slot(s: object, index: int) -> int:
    """Raise _Bad if a slot is malformed; returns its scrypt work (N*r*p, 0 for key slots)."""
    if not isinstance(s, dict):
        raise _Bad(f"key slot #{index} is not an object")
    sid, kind = s.get("id"), s.get("type")
    if not isinstance(sid, str) or not SLOT_ID_RE.fullmatch(sid):
        raise _Bad(f"key slot #{index} has no valid id (8 lowercase hex digits)")
    where = f"key slot {sid}"
    if "label" in s and (problem := check_label(s["label"])):
        raise _Bad(f"{where}: {problem}")
    if kind == "passphrase":
        unknown = set(s) - PASSPHRASE_SLOT_KEYS
        if unknown:
            raise _Bad(f"{where} has unknown fields {', '.join(sorted(unknown))}")
        kdf = s.get("kdf")
        if not isinstance(kdf, dict):
            raise _Bad(f"{where} has no kdf object")
        if set(kdf) != KDF_KEYS or kdf.get("name") != "scrypt":
            raise _Bad(f"{where}: kdf must have exactly name (scrypt), salt, n, r and p")
        salt = _field_b64(kdf, "salt", f"{where}: kdf salt", 1, crypto.SCRYPT_SALT_MAX)
        problem = crypto.scrypt_params_problem(kdf["n"], kdf["r"], kdf["p"], len(salt))
        if problem:
            raise _Bad(f"{where}: {problem}")
        _field_b64(s, "wrapped", f"{where}: wrapped key", WRAPPED_PASSPHRASE_LEN,
                   WRAPPED_PASSPHRASE_LEN)
        return int(kdf["n"]) * int(kdf["r"]) * int(kdf["p"])
    if kind == PUBLIC_KEY_SLOT:
        unknown = set(s) - PUBLIC_KEY_SLOT_KEYS
        if unknown:
            raise _Bad(f"{where} has unknown fields {', '.join(sorted(unknown))}")
        if s.get("alg") != RSA_OAEP_ALG:
            raise _Bad(f"{where}: alg must be {RSA_OAEP_ALG}")
        bits = s.get("bits")
        if type(bits) is not int or not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            raise _Bad(f"{where}: bits must be an integer from {RSA_MIN_BITS} to {RSA_MAX_BITS}")
        fp = s.get("fingerprint")
        if not isinstance(fp, str) or not FINGERPRINT_RE.fullmatch(fp):
            raise _Bad(f"{where}: fingerprint must be 64 lowercase hex digits")
        size = (bits + 7) // 8
        _field_b64(s, "wrapped", f"{where}: wrapped key", size, size)
        return 0
    raise _Bad(f"{where} has unknown type {str(kind)[:40]!r} (known: passphrase, "
               f"{PUBLIC_KEY_SLOT})")


def validate_fields(d: dict[str, Any], where: str) -> None:
    """The config's own fields (docs/FORMAT.md 3.1): ``vault_id`` 32 lowercase hex digits,
    ``chunk_size`` an integer from 4096 to 64 MiB, ``created`` a short string without control
    characters, ``mac`` 64 lowercase hex digits, ``name_hash`` "blake3" in version 3 and
    absent before. ConfigError (one line) otherwise."""
    problem = None
    if not isinstance(d.get("vault_id"), str) or not HEX32_RE.fullmatch(d["vault_id"]):
        problem = "vault_id is not 32 lowercase hex digits"
    elif type(d.get("chunk_size")) is not int or not 4096 <= d["chunk_size"] <= 64 << 20:
        problem = "chunk_size is not an integer from 4096 to 67108864"
    elif not isinstance(d.get("created", ""), str) or len(d.get("created", "")) > 64 or any(
            unicodedata.category(c)[0] == "C" for c in d.get("created", "")):
        problem = "created is not a short string"
    elif not isinstance(d.get("mac"), str) or not FINGERPRINT_RE.fullmatch(d["mac"]):
        problem = "mac is not 64 lowercase hex digits"
    elif d.get("version") == 3 and d.get("name_hash") != "blake3":
        problem = 'name_hash is not "blake3" (config version 3)'
    elif d.get("version") != 3 and "name_hash" in d:
        problem = "name_hash in a config before version 3"
    if problem:
        raise ConfigError(f"{where} is corrupt or was tampered with: {problem}",
                          hint="nothing was changed")


def validate_slots(slots: object, where: str) -> list[dict[str, Any]]:
    """The key slots of a config, checked field by field (docs/FORMAT.md 3.2): 1 to 32 slots,
    unique ids, known types, every field of the right type, length and encoding, scrypt
    parameters within the bounds and their total work bounded. Raises ConfigError (one line)
    otherwise, before any key derivation allocates memory."""
    try:
        if not isinstance(slots, list):
            raise _Bad("slots is not a list")
        if not 1 <= len(slots) <= MAX_SLOTS:
            raise _Bad(f"{len(slots)} key slots (1 to {MAX_SLOTS} are allowed)")
        work = 0
        for i, s in enumerate(slots):
            work += _check_slot(s, i + 1)
        ids = [s["id"] for s in slots]
        if len(set(ids)) != len(ids):
            raise _Bad("two key slots have the same id")
        if work > crypto.SCRYPT_MAX_TOTAL_WORK:
            raise _Bad("the passphrase slots together demand more scrypt work than allowed "
                       f"(sum of N*r*p {work} > {crypto.SCRYPT_MAX_TOTAL_WORK})")
    except _Bad as e:
        raise ConfigError(f"{where} is corrupt or was tampered with: {e}",
                          hint="nothing was changed") from None
    return slots


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
    name_hash: str = "blake2b"  # how chunks are named (codec.NAME_HASHES); version 3 records it

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls, passphrase: bytes, chunk_size: int, scrypt_n: int | None = None, created: str = "",
        name_hash: str = NEW_NAME_HASH,
    ) -> tuple[VaultConfig, bytes]:
        """A new config with a random master key wrapped under ``passphrase`` (version 3, with
        BLAKE3 chunk names; ``name_hash`` "blake2b" makes a version 2 config, as before)."""
        if not passphrase:
            raise AuthError("the passphrase must not be empty")
        master = crypto.random_bytes(crypto.KEY_SIZE)
        cfg = cls(vault_id=crypto.random_bytes(16), chunk_size=chunk_size, created=created,
                  name_hash=name_hash)
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
        n = scrypt_n or _scrypt_n_from_env()
        _check_new_label(label)
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
        kdf = slot["kdf"]  # checked by validate_slots when the config was read
        kek = crypto.derive_kek(passphrase, _unb64(kdf["salt"]), kdf["n"], kdf["r"], kdf["p"])
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
        if public_key.size_in_bits() > RSA_MAX_BITS:
            raise UsageError(f"the public key has {public_key.size_in_bits()} bits; at most "
                             f"{RSA_MAX_BITS} are allowed")
        _check_new_label(label)
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
            "version": self.version,
            "vault_id": self.vault_id.hex(),
            "chunk_size": self.chunk_size,
            "created": self.created,
            "slots": self.slots,
            "mac": self.mac,
        }
        if self.generation:  # a version 1 config stays byte-identical (its MAC covers it)
            d["generation"] = self.generation
        if self.name_hash != "blake2b":
            d["name_hash"] = self.name_hash
        return d

    @property
    def version(self) -> int:
        """3 for BLAKE3 chunk names; else 2, or 1 for a config never signed again since
        version 1 (its bytes, and MAC, unchanged)."""
        return 3 if self.name_hash != "blake2b" else 2 if self.generation else 1

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_dict(cls, d: Any, where: str) -> VaultConfig:
        try:
            if d.get("format") != FORMAT:
                raise ConfigError(f"{where} is not a cryptfs vault config")
            version = d.get("version")
            if version not in VERSIONS or isinstance(version, bool):
                raise ConfigError(f"{where} has unsupported format version "
                                  f"{str(version)[:20]}", hint="a newer cryptfs wrote it")
            validate_fields(d, where)
            generation = d.get("generation", 0) if version >= 2 else 0
            if version >= 2 and (type(generation) is not int or not 1 <= generation < 2**53):
                raise ValueError
            if version == 1 and "generation" in d:
                raise ValueError
            name_hash = d["name_hash"] if version >= 3 else "blake2b"  # (checked above)
            cfg = cls(
                vault_id=bytes.fromhex(d["vault_id"]),
                chunk_size=int(d["chunk_size"]),
                slots=list(validate_slots(d.get("slots"), where)),
                created=str(d.get("created", "")),
                mac=str(d["mac"]),
                generation=generation,
                name_hash=name_hash,
            )
            if len(cfg.vault_id) != 16 or not (4096 <= cfg.chunk_size <= 64 << 20):
                raise ValueError
            return cfg
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
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
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ConfigError(f"{where} is corrupt (not valid JSON)") from None
        return cls.from_dict(d, where)


def _scrypt_n_from_env() -> int:
    """N for a new passphrase slot: $CRYPTFS_SCRYPT_N (tests use 2^14) or the default."""
    text = os.environ.get("CRYPTFS_SCRYPT_N", "")
    if not text:
        return crypto.SCRYPT_DEFAULT_N
    n = int(text) if text.isdigit() and len(text) < 10 else -1
    if crypto.scrypt_params_problem(n, crypto.SCRYPT_R, crypto.SCRYPT_P, 16):
        raise UsageError(f"CRYPTFS_SCRYPT_N={text[:20]} is not a power of two from 16384 to "
                         "1048576")
    return n


def _check_new_label(label: str) -> None:
    if label and (problem := check_label(label)):
        raise UsageError(f"invalid --label: {problem}")
