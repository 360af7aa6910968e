"""How plaintext becomes stored objects and back: names, padding, sealing, verification.

Chunk objects (``data/<2 hex>/<64 hex>``): the name is the keyed hash of the plaintext under the
naming sub-key (BLAKE3 in vaults of config version 3, BLAKE2b-256 before), so identical chunks
get one object without revealing a plain hash.
The stored bytes are ``0x01 || AES-256-GCM(chunk key, pad(u32 length || plaintext))`` with
associated data binding the format, vault id and object name, so an object moved to another
name fails to open; the nonce is derived from the name and padded length (convergent: the same
chunk is sealed to the same bytes on every machine). Padding follows Padmé, so object sizes
leak only a few bits of file sizes, capped at ``chunk_size + 4`` bytes: a full chunk is stored
unpadded (every full chunk has the same size anyway), and a partial chunk Padmé would pad past
that size gets that size too, so the sizes fall into exactly the classes uncapped Padmé makes
(docs/FORMAT.md section 4).

Reading a chunk checks its size and authenticates it, but does not hash it: chunk names are
keyed hashes of the plaintext, so any authentic object under a name holds that name's plaintext
(see :meth:`Codec.open_chunk`). The SHA-256 recorded for every object serves the ledger,
replication and ``verify --full``.

Metadata snapshots and checkpoints are sealed the same way under their own sub-keys.
"""

from __future__ import annotations

import hmac
import struct
import zlib
from dataclasses import dataclass

from cryptfs.errors import IntegrityError
from cryptfs.format import crypto
from cryptfs.format.layout import DATA_PREFIX

OBJ_VERSION = 1
NAME_HASHES = ("blake2b", "blake3")  # how chunks are named (the config's ``name_hash``)


def padme(length: int) -> int:
    """Padmé padded length: at most ~12 % overhead, leaks O(log log L) bits of L."""
    if length < 256:
        return 256
    e = length.bit_length() - 1
    s = e.bit_length()
    mask = (1 << (e - s)) - 1
    return (length + mask) & ~mask


@dataclass(frozen=True)
class ChunkRef:
    """What the metadata records for a stored object: its name, stored size and SHA-256."""

    name: str
    size: int
    sha256: bytes

    def matches(self, blob: bytes) -> bool:
        """Whether ``blob`` is the recorded object (size and SHA-256, compared in constant
        time)."""
        return len(blob) == self.size and hmac.compare_digest(crypto.sha256(blob), self.sha256)


class Codec:
    """Seals and opens objects for one vault (one master key)."""

    def __init__(self, master: bytes, vault_id: bytes, chunk_size: int | None = None,
                 name_hash: str = "blake2b") -> None:
        """``chunk_size``: the vault's; chunks are padded to at most ``chunk_size + 4`` bytes
        (None: no cap, for a codec that only reads). ``name_hash``: how the vault names chunks
        (NAME_HASHES; a codec that only reads needs none)."""
        if name_hash not in NAME_HASHES:
            raise ValueError(f"unknown chunk name hash {name_hash!r}")
        self._name_hash = crypto.keyed_hash3 if name_hash == "blake3" else crypto.keyed_hash
        self.vault_id = vault_id
        self._pad_cap = None if chunk_size is None else chunk_size + 4
        self._chunk_key = crypto.subkey(master, vault_id, crypto.PURPOSE_CHUNK)
        self._nonce_key = crypto.subkey(master, vault_id, crypto.PURPOSE_CHUNK_NONCE)
        self._name_key = crypto.subkey(master, vault_id, crypto.PURPOSE_NAME)
        self._meta_key = crypto.subkey(master, vault_id, crypto.PURPOSE_META)
        self.ledger_key = crypto.subkey(master, vault_id, crypto.PURPOSE_LEDGER)
        self.config_key = crypto.subkey(master, vault_id, crypto.PURPOSE_CONFIG)

    def _aad(self, kind: bytes, name: str) -> bytes:
        return b"cryptfs/" + kind + b"/v1\0" + self.vault_id + name.encode()

    # -- chunks -----------------------------------------------------------------------------
    def chunk_name(self, plain: bytes | bytearray | memoryview) -> str:
        h = self._name_hash(self._name_key, plain).hex()
        return f"{DATA_PREFIX}{h[:2]}/{h}"

    def chunk_nonce(self, name: str, padded_len: int) -> bytes:
        """The AES-GCM nonce of the chunk ``name`` padded to ``padded_len`` bytes:
        HMAC-SHA256(nonce key, "chunk-nonce" || name || u32(T))[:12]. The name is the keyed
        hash of the plaintext, and the padding rule gives one padded plaintext per (plaintext,
        T), so a nonce is only ever used again for the same message and associated data."""
        msg = b"chunk-nonce" + name.encode() + struct.pack(">I", padded_len)
        return crypto.mac(self._nonce_key, msg)[: crypto.NONCE_SIZE]

    def seal_chunk(self, name: str, plain: bytes | bytearray | memoryview) -> bytes:
        """The object for chunk ``name`` (= :meth:`chunk_name` of ``plain``). Convergent: the
        same plaintext always gives the same bytes (nonce from :meth:`chunk_nonce`), so two
        machines storing the same content store one object, whose SHA-256 matches either's
        record. Readers take the nonce from the object (older random-nonce objects open)."""
        n = len(plain)
        size = padme(n + 4)
        if self._pad_cap is not None and n + 4 <= self._pad_cap < size:
            size = self._pad_cap  # a full chunk, or a tail in the same Padmé class: unpadded
        padded = bytearray(size)
        struct.pack_into(">I", padded, 0, n)
        padded[4 : 4 + n] = plain
        return bytes([OBJ_VERSION]) + crypto.seal(
            self._chunk_key, padded, self._aad(b"chunk", name), self.chunk_nonce(name, size)
        )

    def open_chunk(self, ref: ChunkRef, blob: bytes) -> bytes:
        """Check the stored size, then authenticate and decrypt. Raises IntegrityError naming
        the object on any mismatch.

        No SHA-256 against ``ref``: the tag authenticates every byte, and the associated data
        binds kind, vault and name, so only an object sealed under this name opens. Names are
        keyed hashes of the plaintext (only :meth:`chunk_name` names what :meth:`seal_chunk`
        seals), so every such object, including an older copy replayed in the store, holds
        the same plaintext: the hash would catch nothing more on this path."""
        if len(blob) != ref.size:
            raise IntegrityError(f"object {ref.name} has {len(blob)} bytes, expected {ref.size}")
        return self.open_chunk_unchecked(ref.name, blob)

    def open_chunk_unchecked(self, name: str, blob: bytes) -> bytes:
        if not blob or blob[0] != OBJ_VERSION:
            raise IntegrityError(f"object {name} has an unknown format version")
        try:
            padded = crypto.open_sealed(
                self._chunk_key, memoryview(blob)[1:], self._aad(b"chunk", name)
            )
        except IntegrityError:
            raise IntegrityError(f"object {name} fails authentication") from None
        (n,) = struct.unpack_from(">I", padded, 0)
        if n > len(padded) - 4:
            raise IntegrityError(f"object {name} has a bad length field")
        return padded[4 : 4 + n]

    # -- metadata snapshots and checkpoints ---------------------------------------------------
    def seal_blob(self, kind: bytes, name: str, plain: bytes, compress: bool = False) -> bytes:
        body = zlib.compress(plain, 1) if compress else plain
        flag = b"\x01" if compress else b"\x00"
        return bytes([OBJ_VERSION]) + crypto.seal(
            self._meta_key, flag + body, self._aad(kind, name)
        )

    def open_blob(self, kind: bytes, name: str, blob: bytes) -> bytes:
        if not blob or blob[0] != OBJ_VERSION:
            raise IntegrityError(f"object {name} has an unknown format version")
        try:
            body = crypto.open_sealed(self._meta_key, memoryview(blob)[1:], self._aad(kind, name))
        except IntegrityError:
            raise IntegrityError(f"object {name} fails authentication") from None
        if body[:1] not in (b"\x00", b"\x01"):
            raise IntegrityError(f"object {name} has an unknown flag byte")
        if body[:1] == b"\x01":
            try:
                return zlib.decompress(body[1:])
            except zlib.error:
                raise IntegrityError(f"object {name} is corrupt after decryption") from None
        return body[1:]
