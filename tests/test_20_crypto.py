"""The AES-256-GCM seal format: ``cryptography`` (what cryptfs uses) and pycryptodome (what the
format was first written with, and what the independent reader in test_25 uses) agree byte for
byte, in both directions; tampering with any part fails authentication."""

from __future__ import annotations

import os

import pytest
from Crypto.Cipher import AES

from cryptfs.errors import IntegrityError
from cryptfs.format import crypto

KEY = bytes(range(32))
AAD = b"cryptfs-test-aad"


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
