"""The AES-256-GCM seal format: ``cryptography`` (what cryptfs uses) and pycryptodome (what the
format was first written with, and what the independent reader in test_25 uses) agree byte for
byte, in both directions; tampering with any part fails authentication. Chunks are sealed
convergently in segments (nonces derived from the name, padded length and segment index) and
older (version 1) ones still open."""

from __future__ import annotations

import os
import struct

import pytest
from Crypto.Cipher import AES

from cryptfs.errors import IntegrityError
from cryptfs.format import crypto
from cryptfs.format.codec import ChunkRef, Codec

KEY = bytes(range(32))
AAD = b"cryptfs-test-aad"
# the segmented chunk of FORMAT.md 4 (see test_segmented_chunk_test_vector)
VECTOR_NAME = "data/88/884f08b4d1d41b1fcd09d9e166c754a5150fd0b909d2da50caeda6b2ef5bd663"
VECTOR_HEAD = "03935c4efe8db89e7e982f9cfd95ba0e"
VECTOR_TAG0 = "7f220d5c6c1528fa53c6d5bc35d144c7"
VECTOR_SHA256 = "e56a4e8a31bd6699abf41b3754a395b8db35db32e02925a0df7252e25f323cc4"


def pycryptodome_seal(key: bytes, plain: bytes, aad: bytes, nonce: bytes) -> bytes:
    c = AES.new(key, AES.MODE_GCM, nonce=nonce)
    c.update(aad)
    ct, tag = c.encrypt_and_digest(plain)
    return nonce + ct + tag


def pycryptodome_open(key: bytes, blob: bytes, aad: bytes) -> bytes:
    c = AES.new(key, AES.MODE_GCM, nonce=blob[:12])
    c.update(aad)
    return c.decrypt_and_verify(blob[12:-16], blob[-16:])


@pytest.mark.parametrize("size", [0, 1, 15, 16, 4096, 1 << 20])
def test_each_library_opens_what_the_other_sealed(size: int) -> None:
    plain = os.urandom(size)
    ours = crypto.seal(KEY, plain, AAD)
    assert len(ours) == size + crypto.SEAL_OVERHEAD
    assert pycryptodome_open(KEY, ours, AAD) == plain
    theirs = pycryptodome_seal(KEY, plain, AAD, os.urandom(12))
    assert crypto.open_sealed(KEY, theirs, AAD) == plain
    assert crypto.open_sealed(KEY, memoryview(theirs), AAD) == plain  # views are accepted


def test_same_nonce_gives_the_same_bytes() -> None:
    nonce = bytes(12)
    plain = b"x" * 1000
    ref = pycryptodome_seal(KEY, plain, AAD, nonce)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    assert nonce + AESGCM(KEY).encrypt(nonce, plain, AAD) == ref


@pytest.mark.parametrize("where", ["nonce", "body", "tag"])
def test_tampering_fails_authentication(where: str) -> None:
    blob = bytearray(crypto.seal(KEY, b"secret data" * 100, AAD))
    pos = {"nonce": 3, "body": 500, "tag": len(blob) - 2}[where]
    blob[pos] ^= 1
    with pytest.raises(IntegrityError):
        crypto.open_sealed(KEY, bytes(blob), AAD)


def test_wrong_key_aad_or_short_input_fail() -> None:
    blob = crypto.seal(KEY, b"data", AAD)
    with pytest.raises(IntegrityError):
        crypto.open_sealed(bytes(32), blob, AAD)
    with pytest.raises(IntegrityError):
        crypto.open_sealed(KEY, blob, AAD + b"x")
    with pytest.raises(IntegrityError):
        crypto.open_sealed(KEY, blob[:20], AAD)


# -- convergent chunk sealing (docs/FORMAT.md section 4) ---------------------------------------
def _codec(chunk_size: int | None = 1 << 16) -> Codec:
    return Codec(bytes(range(32)), b"vault-id-0000020", chunk_size)


def test_a_chunk_sealed_twice_is_the_same_object() -> None:
    """Two machines storing the same content store the same bytes (one SHA-256 for both
    records); another chunk gets other bytes. The object is version 2 (segments), and its first
    segment opens with pycryptodome under the documented nonce and associated data."""
    codec = _codec()
    plain = os.urandom(5000)
    name = codec.chunk_name(plain)
    a, b = codec.seal_chunk(name, plain), codec.seal_chunk(name, bytearray(plain))
    assert a == b
    assert _codec().seal_chunk(name, memoryview(plain)) == a  # another Codec of the vault
    assert codec.open_chunk(ChunkRef(name, len(a), crypto.sha256(a)), a) == plain
    other = os.urandom(5000)
    assert codec.seal_chunk(codec.chunk_name(other), other)[1:13] != a[1:13]
    # FORMAT.md 4: T = padme(5004) = 5120, one segment: 0x02 || ciphertext || tag
    assert a[0] == 2 and len(a) == 1 + 5120 + 16
    key = crypto.subkey(bytes(range(32)), b"vault-id-0000020", b"cryptfs chunk nonce v1")
    nonce = crypto.mac(key, b"chunk-seg-nonce" + name.encode() + struct.pack(">II", 5120, 0))
    aad = b"cryptfs/chunk/v1\0" + b"vault-id-0000020" + name.encode() + b"\0\0\0\0\x01"
    ckey = crypto.subkey(bytes(range(32)), b"vault-id-0000020", crypto.PURPOSE_CHUNK)
    padded = pycryptodome_open(ckey, nonce[:12] + a[1:], aad)
    assert padded == plain + bytes(5120 - 5004) + struct.pack(">I", 5000)


def test_chunk_names_by_the_vaults_name_hash() -> None:
    """A codec names chunks with the keyed hash its vault's config says: BLAKE3 (version 3)
    or BLAKE2b-256 (before), under the naming sub-key; both seal and open alike."""
    import hashlib

    import blake3

    key = crypto.subkey(bytes(range(32)), b"vault-id-0000020", crypto.PURPOSE_NAME)
    plain = os.urandom(70_000)
    new = Codec(bytes(range(32)), b"vault-id-0000020", 1 << 16, "blake3")
    h3 = blake3.blake3(plain, key=key).hexdigest()
    h2 = hashlib.blake2b(plain, digest_size=32, key=key).hexdigest()
    assert new.chunk_name(plain) == f"data/{h3[:2]}/{h3}"
    assert _codec().chunk_name(plain) == f"data/{h2[:2]}/{h2}" != new.chunk_name(plain)
    name = new.chunk_name(plain)
    assert new.open_chunk_unchecked(name, new.seal_chunk(name, plain)) == plain
    with pytest.raises(ValueError):
        Codec(bytes(range(32)), b"vault-id-0000020", 1 << 16, "sha1")


def test_the_padded_length_is_in_the_nonce() -> None:
    """A writer padding by another rule (here: no cap on the padding, as before the full-chunk
    change) seals the same chunk under other nonces: a nonce never meets two messages."""
    plain = os.urandom(1 << 16)  # a full chunk: capped at 65540 bytes, uncapped Padmé pads it
    capped, uncapped = _codec(1 << 16), _codec(None)
    name = capped.chunk_name(plain)
    a, b = capped.seal_chunk(name, plain), uncapped.seal_chunk(name, plain)
    assert len(a) != len(b) and a[1:17] != b[1:17]
    assert capped.segment_nonce(name, 65540, 0) != capped.segment_nonce(name, 69632, 0)
    assert capped.segment_nonce(name, 65540, 0) != capped.segment_nonce(name, 65540, 1)
    assert capped.open_chunk_unchecked(name, b) == plain == uncapped.open_chunk_unchecked(name, a)


def test_segmented_chunk_test_vector() -> None:
    """FORMAT.md 4's worked example: a 20,000-byte chunk of the test vault (master key
    00 01 .. 1f, vault id "vault-id-0000020", chunk size 64 KiB) is T = 20,480 bytes padded, two
    segments (16,384 and 4,096 bytes), stored in 1 + 20,480 + 2 * 16 = 20,513 bytes."""
    codec = _codec()
    plain = bytes(i % 251 for i in range(20000))
    name = codec.chunk_name(plain)
    blob = codec.seal_chunk(name, plain)
    assert name == VECTOR_NAME
    assert len(blob) == 20513 and blob[0] == 2
    assert blob[1:17].hex() == VECTOR_HEAD
    assert blob[16385:16401].hex() == VECTOR_TAG0  # segment 0's tag
    assert crypto.sha256(blob).hex() == VECTOR_SHA256


def test_version_1_chunks_still_open() -> None:
    """Version 1 objects (one seal over the padded chunk, nonce stored) open as before: written
    with a random nonce before convergent sealing, or with the convergent v1 nonce
    HMAC(nonce key, "chunk-nonce" || name || u32(T))[:12] by every writer before segments."""
    codec = _codec()
    plain = b"written by an older cryptfs" * 8
    name = codec.chunk_name(plain)
    padded = struct.pack(">I", len(plain)) + plain
    padded += bytes(256 - len(padded))
    aad = b"cryptfs/chunk/v1\0" + b"vault-id-0000020" + name.encode()
    key = crypto.subkey(bytes(range(32)), b"vault-id-0000020", crypto.PURPOSE_CHUNK)
    nkey = crypto.subkey(bytes(range(32)), b"vault-id-0000020", crypto.PURPOSE_CHUNK_NONCE)
    for nonce in (os.urandom(12),
                  crypto.mac(nkey, b"chunk-nonce" + name.encode() + struct.pack(">I", 256))[:12]):
        old = b"\x01" + pycryptodome_seal(key, padded, aad, nonce)
        assert old != codec.seal_chunk(name, plain) and len(old) == 256 + 29
        assert codec.open_chunk(ChunkRef(name, len(old), crypto.sha256(old)), old) == plain
        with pytest.raises(IntegrityError, match="authentication"):
            codec.open_chunk_unchecked(name, old[:-1] + bytes([old[-1] ^ 1]))


def test_metadata_is_compressed_where_that_pays() -> None:
    """A metadata object is zlib-compressed (flag 0x01) when a sample of it shrinks enough,
    else sealed as it is (flag 0x00: metadata holding mostly sealed bytes, where zlib spends
    its time for little); either opens to the plaintext, also where the sample and the rest
    differ."""
    codec = Codec(os.urandom(32), os.urandom(16))
    rows = b"".join(b"inode %06d name file-%06d.txt size 4096 " % (i, i) for i in range(5000))
    sealed = os.urandom(600_000)
    for plain, flag in ((rows, 1), (sealed, 0), (rows[:3000], 1), (sealed[:3000], 0),
                        (sealed[:300_000] + rows[:300_000], 1)):
        blob = codec.seal_blob(b"meta", "meta/x", plain, compress=True)
        body = crypto.open_sealed(codec._meta_key, blob[1:], codec._aad(b"meta", "meta/x"))
        assert body[0] == flag
        assert codec.open_blob(b"meta", "meta/x", blob) == plain
    assert len(codec.seal_blob(b"meta", "meta/x", rows, compress=True)) < len(rows) // 3
