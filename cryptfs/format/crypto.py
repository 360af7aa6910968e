"""Cryptographic primitives, each used for one purpose.

- scrypt (pycryptodome) turns a passphrase into a key-encryption key; parameters are stored in
  the config and must lie within fixed bounds (:func:`scrypt_params_problem`): enough cost to
  slow guessing, and at most 1 GiB of memory per attempt, so a tampered config cannot make an
  unlock exhaust the machine.
- HKDF-SHA256 derives one sub-key per purpose from the 32-byte master key (salt: vault id).
- AES-256-GCM seals everything that is stored: 12-byte nonce (random; for chunks derived from
  the object name and padded length, docs/FORMAT.md section 4), 16-byte tag, associated
  data that binds the format version, vault id and object name. Sealing and opening use the
  ``cryptography`` package (OpenSSL): 20 times faster than pycryptodome for a 4 KiB chunk and
  about 3 times for 1 MiB on this kind of machine; the bytes are the same (tests/test_20_crypto).
- Keyed BLAKE2b-256 names chunks by content (dedup) without revealing a plain hash.
- HMAC-SHA256 authenticates the config and ledger heads; secrets are compared in constant time.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os

import blake3
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF, scrypt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cryptfs.errors import ConfigError, IntegrityError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE
MAX_SEALED = (1 << 31) - 1  # more than any object cryptfs writes; stores bound reads below it

SCRYPT_MIN_N = 2**14
SCRYPT_MAX_N = 2**20  # scrypt takes 128*N*r bytes: 1 GiB at r=8 (about 6 s on a 2-core VM)
SCRYPT_DEFAULT_N = 2**17  # 128 MiB, about 0.7 s
SCRYPT_R = 8  # the only r and p cryptfs writes or accepts: p multiplies the time, r the memory
SCRYPT_P = 1
SCRYPT_SALT_MIN, SCRYPT_SALT_MAX = 16, 64
# the sum of N*r*p over all passphrase slots of one config: an unlock that tries every slot does
# at most four passes at the maximum cost (32 slots at the default cost is the same figure)
SCRYPT_MAX_TOTAL_WORK = 4 * SCRYPT_MAX_N * SCRYPT_R * SCRYPT_P

# Sub-key purposes (HKDF info strings); see docs/FORMAT.md.
PURPOSE_CHUNK = b"cryptfs chunk encryption v1"
PURPOSE_CHUNK_NONCE = b"cryptfs chunk nonce v1"  # convergent sealing (docs/FORMAT.md section 4)
PURPOSE_NAME = b"cryptfs chunk naming v1"
PURPOSE_META = b"cryptfs metadata encryption v1"
PURPOSE_LEDGER = b"cryptfs ledger mac v1"
PURPOSE_CONFIG = b"cryptfs config mac v1"
# the PostgreSQL metadata engine's keys (cryptfs.meta.postgres.DbKeys): row sealing, entry names
# (AES-SIV takes two of these keys, the second with " 2" appended), key-column hashing
PURPOSE_DB_ROW = b"cryptfs database rows v1"
PURPOSE_DB_NAME = b"cryptfs database names v1"
PURPOSE_DB_INDEX = b"cryptfs database index v1"


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def scrypt_params_problem(n: object, r: object, p: object, salt_len: int) -> str | None:
    """What is wrong with these scrypt parameters (None if they are within the bounds): N a
    power of two from 2^14 to 2^20, r = 8, p = 1, a salt of 16 to 64 bytes. Checked before any
    memory is allocated."""
    for name, v in (("n", n), ("r", r), ("p", p)):
        if type(v) is not int:
            return f"scrypt {name} is not an integer"
    assert isinstance(n, int)
    if n & (n - 1) or not SCRYPT_MIN_N <= n <= SCRYPT_MAX_N:
        return f"scrypt N must be a power of two from 2^14 to 2^20 (it is {n})"
    if r != SCRYPT_R or p != SCRYPT_P:
        return f"scrypt r and p must be {SCRYPT_R} and {SCRYPT_P} (they are {r} and {p})"
    if not SCRYPT_SALT_MIN <= salt_len <= SCRYPT_SALT_MAX:
        return f"the scrypt salt must be 16 to 64 bytes (it is {salt_len})"
    return None


def derive_kek(
    passphrase: bytes, salt: bytes, n: int, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> bytes:
    """Key-encryption key from a passphrase. Refuses parameters outside the bounds of
    :func:`scrypt_params_problem` (configs are checked when read; this is the last guard)."""
    problem = scrypt_params_problem(n, r, p, len(salt))
    if problem:
        raise ConfigError(f"key derivation parameters are outside the bounds: {problem}",
                          hint="the config may have been tampered with")
    return scrypt(passphrase, salt, KEY_SIZE, N=n, r=r, p=p)  # type: ignore[return-value]


def subkey(master: bytes, vault_id: bytes, purpose: bytes) -> bytes:
    """HKDF-SHA256(master, salt=vault_id, info=purpose) -> 32 bytes."""
    return HKDF(master, KEY_SIZE, vault_id, SHA256, context=purpose)  # type: ignore[return-value]


@functools.lru_cache(maxsize=16)
def _aead(key: bytes) -> AESGCM:
    """One cipher object per sub-key (a vault uses a handful)."""
    if len(key) != KEY_SIZE:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    return AESGCM(key)


def seal(key: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes,
         nonce: bytes | None = None) -> bytes:
    """AES-256-GCM: nonce || ciphertext || tag. ``nonce``: a random one if None; a caller
    giving one must never give the same nonce with the same key for a different plaintext or
    associated data (see :meth:`cryptfs.format.codec.Codec.seal_chunk`)."""
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif len(nonce) != NONCE_SIZE:
        raise ValueError("AES-256-GCM takes a 12-byte nonce here")
    return nonce + _aead(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes | memoryview, aad: bytes) -> bytes:
    """Inverse of :func:`seal`; raises IntegrityError if authentication fails."""
    if len(blob) < SEAL_OVERHEAD:
        raise IntegrityError("sealed data is too short")
    if len(blob) > MAX_SEALED:  # the AEAD panics (a BaseException) on inputs of 2^31 bytes
        raise IntegrityError("sealed data is too large")
    view = memoryview(blob)
    try:
        return _aead(key).decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
    except InvalidTag:
        raise IntegrityError("authentication failed") from None


def gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes | bytearray | memoryview,
                aad: bytes) -> bytes:
    """AES-256-GCM without the nonce prefix: ciphertext || tag. For segmented chunk objects,
    whose nonces are derived, not stored (same rule as :func:`seal` for a given nonce)."""
    return _aead(key).encrypt(nonce, plaintext, aad)


def gcm_decrypt_into(key: bytes, nonce: bytes, sealed: bytes | memoryview, aad: bytes,
                     out: memoryview) -> None:
    """Inverse of :func:`gcm_encrypt`, the plaintext written into ``out`` (as long as it is:
    no copy of its own); raises IntegrityError if authentication fails (``out`` then holds
    nothing to use)."""
    if len(sealed) < TAG_SIZE or len(out) != len(sealed) - TAG_SIZE:
        raise IntegrityError("sealed data is too short")
    try:
        _aead(key).decrypt_into(nonce, sealed, aad, out)
    except InvalidTag:
        raise IntegrityError("authentication failed") from None


def keyed_hash(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """Keyed BLAKE2b-256 (releases the GIL for large inputs)."""
    return hashlib.blake2b(data, digest_size=32, key=key).digest()


def keyed_hash3(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """Keyed BLAKE3 (its keyed_hash mode, 32-byte key and output): the chunk names of vaults
    from config version 3, at several times BLAKE2b's speed (SIMD, one thread here)."""
    return blake3.blake3(data, key=key, max_threads=1).digest()


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def mac_state(key: bytes, prefix: bytes) -> hmac.HMAC:
    """An HMAC-SHA256 state that has taken ``prefix``: ``copy()`` it, ``update`` the rest."""
    return hmac.new(key, prefix, hashlib.sha256)


def verify_mac(key: bytes, data: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(mac(key, data), tag)


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()
